"""erniegen: turn any BERT-family checkpoint into a text generator.

>>> import erniegen
>>> model = erniegen.load("runs/qg/best")  # precision="int8" for fast CPU inference
>>> model.generate(["the passage ... [SEP] the answer"], num_beams=5)
"""
from __future__ import annotations

__version__ = "0.1.0"


def load(path: str = "minilm", precision: str = "fp32", **settings):
    """Load an erniegen (or any BERT-family) checkpoint; ``.generate(sources, **options)`` returns strings.

    ``precision`` (fp32 | bf16 | int8) is applied after loading the fp32 weights, every time: int8
    re-quantizes on load and nothing quantized is ever saved (see :mod:`erniegen.precision`).
    """
    from .model import Transformer
    from .precision import apply_precision, check_precision
    check_precision(precision)  # before the load, which can be slow
    return apply_precision(Transformer.from_pretrained(path, **settings).eval(), precision)
