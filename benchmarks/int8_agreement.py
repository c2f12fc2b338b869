"""Which layers int8 hurts: greedy questions identical to fp32's, per quantization variant (issue 13).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/int8_agreement.py --model runs/qg-v3/best \\
        --input ../shared/data/squad_qg_sent/dev.jsonl [--n 150] [--only TEXT] [--score]

Each variant is ``erniegen.precision``'s own int8 conversion with another qconfig, activations quantized to
7 bits (PyTorch's ``reduce_range``) or 8 (VNNI CPUs only), and/or some linear layers left in fp32 (the
vocabulary projection is the quantized copy ``head.quantized`` that it adds). A question counts when it
equals fp32's greedy output exactly.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import erniegen.precision as precision  # noqa: E402
from erniegen import load  # noqa: E402
from erniegen.metrics import qg_scores  # noqa: E402

PER_TENSOR = torch.ao.quantization.default_dynamic_qconfig
PER_CHANNEL = precision.INT8_QCONFIG
FP32, BF16 = torch.float32, torch.bfloat16
VARIANTS = {  # name: (qconfig, which linear layers stay out of int8, activations in 7 bits, their dtype)
    "one scale per matrix, 7-bit activations": (PER_TENSOR, lambda n: False, True, FP32),
    "per-channel, 7-bit activations": (PER_CHANNEL, lambda n: False, True, FP32),
    "per-channel, 7-bit, vocabulary projection fp32": (PER_CHANNEL, lambda n: n == "head.quantized", True, FP32),
    "per-channel, 7-bit, attention fp32": (PER_CHANNEL, lambda n: ".attn." in n, True, FP32),
    "per-channel, 7-bit, ffn_out fp32": (PER_CHANNEL, lambda n: n.endswith("ffn_out"), True, FP32),
    # the copy head is converted on its own when a decoder first attaches it, so its linears are named bare
    "per-channel, 7-bit, ffn_out and copy head fp32":
        (PER_CHANNEL, lambda n: n.endswith("ffn_out") or n in ("query", "gate"), True, FP32),
    "per-channel, 8-bit activations": (PER_CHANNEL, lambda n: False, False, FP32),
    "per-channel, 8-bit, ffn_out fp32": (PER_CHANNEL, lambda n: n.endswith("ffn_out"), False, FP32),
    "per-channel, 8-bit, ffn_out bf16 (today's int8 on CPUs with VNNI and bf16)":
        (PER_CHANNEL, lambda n: n.endswith("ffn_out"), False, BF16),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--n", type=int, default=150)
    p.add_argument("--only", help="the variants whose name contains this text")
    p.add_argument("--score", action="store_true",
                   help="also decode the whole input with the model's default decoding and score it (nqg BLEU-4 / "
                        "METEOR / ROUGE-L against its targets)")
    args = p.parse_args()
    rows = [json.loads(line) for line in open(args.input, encoding="utf-8")]
    all_sources = [r["source"] for r in rows]
    sources = all_sources[: args.n]
    reference = load(args.model).generate(sources, num_beams=1, progress=False)
    real = precision._quantize_linears
    for name, (qconfig, keep, reduce_range, kept_dtype) in VARIANTS.items():
        if args.only and args.only not in name:
            continue
        if not reduce_range and not precision.full_range_activations():
            print(json.dumps({"variant": name, "skipped": "this CPU has no VNNI: 8-bit activations can overflow"}))
            continue
        precision._quantize_linears = functools.partial(real, qconfig=qconfig, keep=keep, kept_dtype=kept_dtype,
                                                        reduce_range=reduce_range)
        try:  # heads that decoders attach on first use (copy, length) are converted during generate
            model = load(args.model, precision="int8")
            out = model.generate(sources, num_beams=1, progress=False)
            result = {"variant": name, "identical": sum(a == b for a, b in zip(reference, out)), "of": len(sources)}
            if args.score:
                preds = model.generate(all_sources, progress=False)
                scores = qg_scores(preds, [r["target"] for r in rows], all_sources)
                result |= {k: round(scores[k], 2) for k in ("bleu4", "meteor", "rougeL")}
        finally:
            precision._quantize_linears = real
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
