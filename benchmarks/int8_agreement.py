"""Which layers int8 hurts: greedy questions identical to fp32's, per quantization variant (issue 13).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/int8_agreement.py --model runs/qg-v3/best \\
        --input ../shared/data/squad_qg_sent/dev.jsonl [--n 150]

Each variant runs ``quantize_dynamic`` with a ``qconfig_spec`` naming the linear layers it quantizes (the
vocabulary projection is the quantized copy ``head.quantized`` that ``erniegen.precision`` adds); the rest
stay fp32. A question counts when it equals fp32's greedy output exactly.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import erniegen.precision as precision  # noqa: E402
from erniegen import load  # noqa: E402

PER_TENSOR = torch.ao.quantization.default_dynamic_qconfig
PER_CHANNEL = torch.ao.quantization.per_channel_dynamic_qconfig
VARIANTS = {  # name: (qconfig, which linear layers stay fp32)
    "one scale per matrix": (PER_TENSOR, lambda n: False),
    "per-channel": (PER_CHANNEL, lambda n: False),
    "per-channel, vocabulary projection fp32": (PER_CHANNEL, lambda n: n == "head.quantized"),
    "per-channel, attention fp32": (PER_CHANNEL, lambda n: ".attn." in n),
    "per-channel, ffn_out fp32": (PER_CHANNEL, lambda n: n.endswith("ffn_out")),
}


def quantizer(qconfig, keep):
    def quantize(module: nn.Module) -> nn.Module:
        holder = nn.ModuleDict({"m": module})
        spec = {f"m.{n}" if n else "m": qconfig for n, x in module.named_modules()
                if isinstance(x, nn.Linear) and not keep(n)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.ao.quantization.quantize_dynamic(holder, spec, dtype=torch.qint8, inplace=True)
        return holder["m"]
    return quantize


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--n", type=int, default=150)
    args = p.parse_args()
    sources = [json.loads(line)["source"] for line in open(args.input, encoding="utf-8")][: args.n]
    reference = load(args.model).generate(sources, num_beams=1, progress=False)
    real = precision._quantize_linears
    for name, (qconfig, keep) in VARIANTS.items():
        precision._quantize_linears = quantizer(qconfig, keep)
        try:
            model = load(args.model, precision="int8")
        finally:
            precision._quantize_linears = real
        out = model.generate(sources, num_beams=1, progress=False)
        same = sum(a == b for a, b in zip(reference, out))
        print(json.dumps({"variant": name, "identical": same, "of": len(sources)}), flush=True)


if __name__ == "__main__":
    main()
