"""How much does int8 smoothing keep of fp32's decoding, and at which migration strength α?

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/int8_smoothing.py --model runs/qg-e6/best \\
        --input ../shared/data/squad_qg_sent/dev.jsonl --calibrate ../shared/data/squad_qg_sent/train.jsonl \\
        [--start 150] [--n 150] [--alpha 0.5 0.65 0.8 0.9 1.0] [--ffn-out]

Counts the greedy questions, on ``--n`` inputs from ``--start``, that int8 decodes identical to fp32, for int8
unsmoothed and smoothed at each α (``erniegen.precision``'s smoothing, statistics from
``erniegen.precision.calibrate`` on 64 evenly spaced ``--calibrate`` sources, as ``erniegen calibrate``
records them). With ``--ffn-out`` also each layer's ``ffn_out`` smoothed and quantized (the library keeps it
out of int8): its input, the GELU output, is recorded too. One JSON line per variant (BENCHMARKS.md section 3).
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import erniegen.precision as P  # noqa: E402
from erniegen import load  # noqa: E402
from erniegen.finetune import CALIBRATION_SOURCES  # noqa: E402


def with_ffn_out(name: str, recorded=P._recorded_name) -> str | None:
    """The library's recorded modules plus each ``ffn_out`` (its own input)."""
    return name if name.endswith(".ffn_out") else recorded(name)


def decode_int8(model_dir: str, sources: list[str], maxima: dict | None, alpha: float, ffn_out: bool) -> list[str]:
    model = load(model_dir)
    model.int8_calibration = maxima
    library = (P.smooth_and_quantize, P._recorded_name, P._quantize_linears.__defaults__)
    P.smooth_and_quantize = functools.partial(library[0], alpha=alpha)
    if ffn_out:  # record and smooth ffn_out, and keep no linear out of int8
        P._recorded_name = with_ffn_out
        P._quantize_linears.__defaults__ = (P.INT8_QCONFIG, lambda name: False, None, None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the unsmoothed variant's "no int8 calibration"
            P.apply_precision(model, "int8")
        return model.generate(sources, num_beams=1, progress=False)
    finally:
        P.smooth_and_quantize, P._recorded_name, P._quantize_linears.__defaults__ = library


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--calibrate", required=True, help="sources (jsonl, field source), e.g. the training file")
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--n", type=int, default=150)
    p.add_argument("--alpha", type=float, nargs="+", default=[0.5, 0.8])
    p.add_argument("--ffn-out", action="store_true", help="also the variants with ffn_out smoothed into int8")
    args = p.parse_args()
    sources = [json.loads(line)["source"] for line in open(args.input, encoding="utf-8")][args.start:][: args.n]
    train = [json.loads(line)["source"] for line in open(args.calibrate, encoding="utf-8")]
    picked = [train[i * len(train) // CALIBRATION_SOURCES] for i in range(CALIBRATION_SOURCES)]
    fp32 = load(args.model)
    reference = fp32.generate(sources, num_beams=1, progress=False)
    maxima = P.calibrate(fp32, picked)
    variants = [(None, False)] + [(a, False) for a in args.alpha] + [(a, True) for a in args.alpha if args.ffn_out]
    if args.ffn_out:
        P._recorded_name = with_ffn_out
        maxima = P.calibrate(fp32, picked)
        P._recorded_name = with_ffn_out.__defaults__[0]
    for alpha, ffn_out in variants:
        used = None if alpha is None else {k: v for k, v in maxima.items() if ffn_out or not k.endswith("ffn_out")}
        out = decode_int8(args.model, sources, used, alpha or P.SMOOTHING_ALPHA, ffn_out)
        name = "unsmoothed" if alpha is None else f"alpha {alpha}" + (" + ffn_out" if ffn_out else "")
        print(json.dumps({"model": args.model, "dev": f"{args.start}-{args.start + len(sources) - 1}", "variant": name,
                          "identical": sum(a == b for a, b in zip(reference, out)), "of": len(sources)}), flush=True)


if __name__ == "__main__":
    main()
