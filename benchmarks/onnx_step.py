"""Would an ONNX Runtime export make the fp32 infilling step fast enough (issue 13, optional item 3)?

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/onnx_step.py --model runs/qg-n02/best [--past 40]

A feasibility measurement, not an inference path: the work of one batch-1 infilling step (the previous word
and the [ATTN] placeholder, two rows, through every layer over ``--past`` cached keys/values, then the LM head
on the placeholder's row) as one function of tensors, run eagerly by PyTorch (the model's own modules, in
inference mode, so the head reads its transposed CPU copy as decoding does) and exported to ONNX and run by
ONNX Runtime on the same threads. Checks that both give the same logits, then prints the median ms of each
(two rounds, after warm-up) beside the fp32 floor as inference_precision.py measures it (weight bytes over
PyTorch's vector x matrix bandwidth, in the same run), the CPU model and the date. Needs ``pip install "erniegen[onnx]"``.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from datetime import date
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from erniegen import load  # noqa: E402
from erniegen.bench import cpu_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference_precision import bandwidth_gb_s, median_ms, streamed_weight_bytes  # noqa: E402


class TwoRowStep(nn.Module):
    """Layers over two new rows with the past keys/values given per layer, and the head on the second row."""

    def __init__(self, model):
        super().__init__()
        self.layers, self.head = model.layers, model.head

    def forward(self, x: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor, mask: torch.Tensor):
        keys, values = [], []
        for layer, k_past, v_past in zip(self.layers, past_k, past_v):
            x, (k, v) = layer(x, mask, (k_past, v_past))
            keys.append(k)
            values.append(v)
        return self.head(x[:, 1:]), torch.stack(keys), torch.stack(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--past", type=int, default=40, help="cached tokens (source + generated so far)")
    args = parser.parse_args()
    import onnxruntime

    model = load(args.model, precision="fp32")
    cfg = model.config
    heads, layers = cfg.num_attention_heads, cfg.num_hidden_layers
    torch.manual_seed(0)
    x = torch.randn(1, 2, cfg.hidden_size)
    past_k = torch.randn(layers, 1, heads, args.past, cfg.hidden_size // heads)
    past_v = torch.randn_like(past_k)
    mask = torch.ones(1, 2, args.past + 2, dtype=torch.bool)
    mask[0, 0, -1] = False  # the word does not see the placeholder after it
    step = TwoRowStep(model).eval()
    with torch.inference_mode():
        eager_logits = step(x, past_k, past_v, mask)[0]
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/step.onnx"
        with torch.no_grad():
            torch.onnx.export(step, (x, past_k, past_v, mask), path, input_names=["x", "past_k", "past_v", "mask"],
                              output_names=["logits", "k", "v"], opset_version=17, dynamo=False,
                              dynamic_axes={"past_k": {3: "past"}, "past_v": {3: "past"}, "mask": {2: "keys"}})
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feed = {"x": x.numpy(), "past_k": past_k.numpy(), "past_v": past_v.numpy(), "mask": mask.numpy()}
    torch.testing.assert_close(torch.from_numpy(session.run(None, feed)[0]), eager_logits, rtol=1e-4, atol=1e-4)
    print(f"{cpu_model()}, {date.today()}, {torch.get_num_threads()} threads, past {args.past}, onnxruntime "
          f"{onnxruntime.__version__}: logits equal within 1e-4")
    with torch.inference_mode():
        for round_ in (1, 2):
            n_bytes = streamed_weight_bytes(model)
            floor = n_bytes / (bandwidth_gb_s(n_bytes, repeats=30) * 1e9) * 1000
            eager = median_ms(lambda: step(x, past_k, past_v, mask), 200, warmup=50)
            runtime = median_ms(lambda: session.run(None, feed), 200, warmup=50)
            print(f"round {round_}: fp32 floor {floor:.2f} ms, PyTorch eager {eager:.2f} ms ({eager / floor:.2f}x "
                  f"floor), ONNX Runtime {runtime:.2f} ms ({runtime / floor:.2f}x floor)", flush=True)


if __name__ == "__main__":
    main()
