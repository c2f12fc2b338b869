"""Would smoothing activation outliers into the weights save int8 quality on CPUs with 7-bit activations?

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/int8_smoothing.py --model runs/qg-e6/best \\
        --input ../shared/data/squad_qg_sent/dev.jsonl --calibrate ../shared/data/squad_qg_sent/train.jsonl

Without VNNI, PyTorch's dynamic int8 linear quantizes activations to 7 bits with one scale per batch, and a
few channels of a LayerNorm's output are ~17x larger than the median channel (measured on qg-e6), so the
rest get a handful of levels. SmoothQuant (Xiao et al. 2023) divides each input channel j by s_j and
multiplies the weight's column j by it, s_j = max|x_j|^a / max|W_:j|^(1-a): the product is unchanged in
exact arithmetic and the outliers move into the per-channel-quantized weights. Applied here to the inputs of
the query/key/value, ``ffn_in`` and the LM head's ``dense`` (each a LayerNorm output), on top of
``erniegen.precision``'s int8 as shipped. max|x_j| comes either from the fp32 model's greedy decoding of
``--calibrate`` sources, or data-free from that LayerNorm's own parameters, |beta_j| + k|gamma_j|.
Counts greedy questions on the first ``--n`` inputs identical to fp32's, as benchmarks/int8_agreement.py does.
An experiment, not the library: erniegen.precision does not smooth (yet).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from erniegen import load  # noqa: E402
from erniegen.metrics import qg_scores  # noqa: E402
from erniegen.precision import apply_precision  # noqa: E402

SMOOTHED = ("attn.query", "attn.key", "attn.value", "ffn_in", "head.dense")


class Scaled(nn.Module):
    """A linear layer whose input is divided channel-wise first (the smoothing's other half)."""

    def __init__(self, inverse: torch.Tensor, linear: nn.Linear):
        super().__init__()
        self.register_buffer("inverse", inverse)
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x * self.inverse)


def input_norm(model, name: str) -> str:
    """The LayerNorm whose output a smoothed linear reads (post-LN BERT): the previous layer's ``ffn_norm``
    (the embeddings' norm for layer 0) for q/k/v, the layer's ``attn_norm`` for ffn_in, the last layer's
    ``ffn_norm`` for the head."""
    if name == "head.dense":
        return f"layers.{len(model.layers) - 1}.ffn_norm"
    layer = int(name.split(".")[1])
    if ".attn." in name:
        return "embeddings.norm" if layer == 0 else f"layers.{layer - 1}.ffn_norm"
    return f"layers.{layer}.attn_norm"


def calibrated_maxima(model, sources: list[str]) -> dict[str, torch.Tensor]:
    """max |x_j| over the fp32 model's greedy decoding of ``sources``, per LayerNorm feeding a smoothed linear
    (hooked at the norm: in eval the fused q/k/v product bypasses the three modules)."""
    maxima: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(module, args, out):
            a = out.detach().abs().flatten(0, -2).amax(0)
            maxima[name] = torch.maximum(maxima[name], a) if name in maxima else a
        return hook

    norms = {input_norm(model, n) for n, m in model.named_modules() if n.endswith(SMOOTHED)}
    handles = [model.get_submodule(n).register_forward_hook(record(n)) for n in norms]
    model.generate(sources, num_beams=1, progress=False)
    for h in handles:
        h.remove()
    return maxima


def smooth(model, maxima: dict[str, torch.Tensor], alpha: float) -> None:
    targets = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.endswith(SMOOTHED)}
    with torch.no_grad():
        for name, linear in targets.items():
            a = maxima[input_norm(model, name)].clamp(min=1e-5)
            s = (a ** alpha / linear.weight.abs().amax(0).clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)
            linear.weight.mul_(s)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, Scaled(1 / s, linear))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--calibrate", help="sources (jsonl, field source) for the calibrated maxima; 64 are used")
    p.add_argument("--n", type=int, default=150)
    p.add_argument("--alpha", type=float, nargs="+", default=[0.5])
    p.add_argument("--k", type=float, default=4.0, help="data-free maxima: |beta| + k |gamma|")
    p.add_argument("--modes", nargs="+", default=["data-free", "calibrated"], choices=["data-free", "calibrated"])
    p.add_argument("--score", action="store_true",
                   help="also decode the whole input with the model's default decoding and score it (nqg BLEU-4 / "
                        "METEOR / ROUGE-L against its targets)")
    args = p.parse_args()
    rows = [json.loads(line) for line in open(args.input, encoding="utf-8")]
    sources = [r["source"] for r in rows][: args.n]
    reference = load(args.model).generate(sources, num_beams=1, progress=False)
    plain = load(args.model, precision="int8").generate(sources, num_beams=1, progress=False)
    print(json.dumps({"variant": "int8 as shipped", "identical": sum(a == b for a, b in zip(reference, plain)),
                      "of": len(sources)}), flush=True)
    if "calibrated" in args.modes and not args.calibrate:
        p.error("--modes calibrated needs --calibrate FILE")
    for mode in args.modes:
        for alpha in args.alpha:
            model = load(args.model)
            if mode == "calibrated":
                calib = [json.loads(line)["source"] for line in open(args.calibrate, encoding="utf-8")][:64]
                maxima = calibrated_maxima(model, calib)
            else:
                maxima = {n: m.bias.detach().abs() + args.k * m.weight.detach().abs()
                          for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
            smooth(model, maxima, alpha)
            unchanged = model.generate(sources[:30], num_beams=1, progress=False) == reference[:30]
            apply_precision(model, "int8")
            out = model.generate(sources, num_beams=1, progress=False)
            result = {"variant": f"smoothed ({mode}), alpha {alpha}",
                      "identical": sum(a == b for a, b in zip(reference, out)), "of": len(sources),
                      "fp32_first30_unchanged": unchanged}
            if args.score:
                preds = model.generate([r["source"] for r in rows], progress=False)
                scores = qg_scores(preds, [r["target"] for r in rows], [r["source"] for r in rows])
                result |= {k: round(scores[k], 2) for k in ("bleu4", "meteor", "rougeL")}
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
