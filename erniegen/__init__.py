"""erniegen: turn any BERT-family checkpoint into a text generator.

>>> import erniegen
>>> model = erniegen.load("runs/qg/best")  # precision="int8" for fast CPU inference
>>> model.generate(["the passage ... [SEP] the answer"], num_beams=5)
"""
from __future__ import annotations

__version__ = "0.1.0"


def load(path: str = "minilm", precision: str = "fp32", runtime: str = "torch", **settings):
    """Load an erniegen (or any BERT-family) checkpoint; ``.generate(sources, **options)`` returns strings.

    ``precision`` (fp32 | bf16 | int8) is applied after loading the fp32 weights, every time: int8
    re-quantizes on load and nothing quantized is ever saved (see :mod:`erniegen.precision`).
    ``runtime="onnx"`` exports the infilling step to ONNX Runtime on load (fp32, infilling decoder only;
    ``pip install "erniegen[onnx]"``, see :mod:`erniegen.onnx_runtime`); ``runtime="compile"`` compiles it with
    ``torch.compile`` on first use (infilling decoder only; :mod:`erniegen.runtimes`); the default runs it in
    eager PyTorch.
    """
    from .model import Transformer
    from .precision import apply_precision, check_precision
    from .runtimes import check_runtime, use_runtime
    check_precision(precision)  # before the load, which can be slow
    if check_runtime(runtime, precision) == "onnx":
        from .onnx_runtime import import_onnxruntime, use_onnx_runtime
        import_onnxruntime()  # before the load, which can be slow
    model = apply_precision(Transformer.from_pretrained(path, **settings).eval(), precision)
    return use_onnx_runtime(model) if runtime == "onnx" else use_runtime(model, runtime)
