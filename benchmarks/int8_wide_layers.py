"""The dtype of the layers int8 leaves out (``precision.stays_wide``: each layer's ``ffn_out``), in one process.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/int8_wide_layers.py --model runs/qg-drop-s2/best \
        [--input ../shared/data/squad_qg_sent/dev.jsonl] [--dtypes fp32,fp16] [--rounds 10] [--samples 20] \
        [--large-batch 32] [--output results/int8_wide_layers.json]

The int8 model is loaded once per dtype of its wide layers (bf16 needs a CPU with native bf16; fp16 is fbgemm's
float16 product, ``precision.Fp16Linear``; fp32 the packed fp32 product). Each is timed in alternated rounds,
the first dtype's model as the reference:
- the decode step at batch 1 (``benchmarks/compiled_step_ab.py``'s: 40 steps on the cache of the first dev source,
  median of each round);
- infilling greedy at batch 1 end to end (``erniegen.bench.bench_decoder``, the first ``--samples`` dev sources,
  16 tokens each, median ms a sample of each round);
- infilling greedy at ``--large-batch`` rows (two timed batches after two warm-up ones, samples a second).
Each row gives the ratio to the reference per round and its median, and how many of the ``--samples`` greedy
questions equal the reference's. Quality on the whole dev set is a separate ``generate --precision int8`` run.
Run it on an idle machine.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import erniegen.precision as precision  # noqa: E402
from compiled_step_ab import round_ms, stepper  # noqa: E402
from erniegen import load  # noqa: E402
from erniegen.bench import bench_decoder, write_results  # noqa: E402
from erniegen.data import read_examples  # noqa: E402
from erniegen.decoding import DecodeOptions, default_banned_ids, encode_sources  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LENGTH = 16  # tokens a sample, as in inference_precision.py


def int8_model(path: str, kept: torch.dtype):
    """``path`` loaded in int8 with its wide layers in ``kept``."""
    real = precision.default_kept_dtype
    precision.default_kept_dtype = lambda: kept
    try:
        return load(path, precision="int8")
    finally:
        precision.default_kept_dtype = real


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--input", default="../shared/data/squad_qg_sent/dev.jsonl")
    p.add_argument("--dtypes", default="fp32,fp16")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--large-batch", type=int, default=32)
    p.add_argument("--output", default="results/int8_wide_layers.json")
    args = p.parse_args()
    names = args.dtypes.split(",")
    if "bf16" in names and not precision.native_bf16():
        raise SystemExit("bf16 wide layers need a CPU with native bf16 (AVX512-BF16 or AMX)")
    models = {n: int8_model(args.model, DTYPES[n]) for n in names}
    first = next(iter(models.values()))
    examples = iter(read_examples(args.input, require_target=False))
    sources = encode_sources(first, [next(examples).source for _ in range(max(args.samples + 2, 4 * args.large_batch))])
    prev = torch.tensor([sources[0][1]])
    opts = DecodeOptions(banned_ids=default_banned_ids(first), num_beams=1, max_length=LENGTH, min_length=LENGTH)
    step, e2e, large = {n: [] for n in names}, {n: [] for n in names}, {n: [] for n in names}
    with torch.inference_mode():
        for r in range(args.rounds):
            for n in (names if r % 2 == 0 else names[::-1]):
                step[n].append(round_ms(stepper(models[n], sources[:1]), prev))
                e2e[n].append(bench_decoder(models[n], sources[:args.samples + 2], "infilling", opts, 1,
                                            warmup=2)["median_ms_per_sample"])
                large[n].append(bench_decoder(models[n], sources[:4 * args.large_batch], "infilling", opts,
                                              args.large_batch, warmup=2)["samples_per_s"])
        greedy = {n: m.generate([e.source for e in read_examples(args.input, require_target=False)][:args.samples],
                                num_beams=1, progress=False) for n, m in models.items()}
    rows = []
    for n in names:
        step_ratio = [a / b for a, b in zip(step[n], step[names[0]])]
        e2e_ratio = [a / b for a, b in zip(e2e[n], e2e[names[0]])]
        large_ratio = [a / b for a, b in zip(large[n], large[names[0]])]
        row = {"wide_layers": n, "step_ms": round(statistics.median(step[n]), 3),
               "step_over_reference": round(statistics.median(step_ratio), 3),
               "step_ratio_range": [round(min(step_ratio), 3), round(max(step_ratio), 3)],
               "greedy_b1_ms": round(statistics.median(e2e[n]), 1),
               "greedy_b1_over_reference": round(statistics.median(e2e_ratio), 3),
               "greedy_b1_ratio_range": [round(min(e2e_ratio), 3), round(max(e2e_ratio), 3)],
               f"greedy_b{args.large_batch}_samples_per_s": round(statistics.median(large[n]), 2),
               f"greedy_b{args.large_batch}_over_reference": round(statistics.median(large_ratio), 3),
               f"greedy_b{args.large_batch}_ratio_range": [round(min(large_ratio), 3), round(max(large_ratio), 3)],
               "greedy_identical_to_reference": sum(a == b for a, b in zip(greedy[n], greedy[names[0]]))}
        print(row, flush=True)
        rows.append(row)
    write_results(args.output, rows, model=args.model, reference=names[0], rounds=args.rounds, samples=args.samples,
                  large_batch=args.large_batch, length=LENGTH)


if __name__ == "__main__":
    main()
