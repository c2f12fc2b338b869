"""What a decoding option costs in time, paired source by source in one process: each source is decoded with
option set A and with B, in alternating order, so the machine's drift (which moves separate `erniegen bench`
processes by ±15% on a shared VM) falls on both alike. Prints each side's median ms per source and the median of
the per-source ratios B / A.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/paired_decode.py --model runs/qg-teacher/best \\
        --input ../shared/data/squad_qg_sent/dev.jsonl --a '{"block_repeated_words": false}' \\
        --b '{"block_repeated_words": true}' [--num-samples 40] [--fixed-length 16] [--output results/x.json]

Batch 1, the model's own decoder; ``--fixed-length`` (both sides) makes every source take the same number of
steps, so only the per-step cost differs.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from erniegen import load  # noqa: E402
from erniegen.bench import write_results  # noqa: E402
from erniegen.data import read_examples  # noqa: E402
from erniegen.decoding import encode_sources, generate_ids, options_from_settings  # noqa: E402
from erniegen.registry import default_decoder  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--input", required=True)
    ap.add_argument("--a", type=json.loads, required=True, help="decoding options of side A, as JSON")
    ap.add_argument("--b", type=json.loads, required=True, help="decoding options of side B, as JSON")
    ap.add_argument("--num-samples", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--fixed-length", type=int, default=None)
    ap.add_argument("--output", default=None)
    args = ap.parse_args()
    model = load(args.model)
    decoder = default_decoder(model.settings.method)
    sources = [e.source for e in read_examples(args.input, require_target=False)]
    sources = encode_sources(model, sources[: args.warmup + args.num_samples])
    opts = {}
    for side in ("a", "b"):
        o = options_from_settings(model, **getattr(args, side))
        if args.fixed_length:
            o.max_length = o.min_length = args.fixed_length
        opts[side] = o
    times: dict[str, list[float]] = {"a": [], "b": []}
    with torch.no_grad():
        for i, src in enumerate(sources):
            for side in (("a", "b") if i % 2 == 0 else ("b", "a")):
                t0 = time.perf_counter()
                generate_ids(model, [src], decoder, batch_size=1, opts=opts[side])
                if i >= args.warmup:
                    times[side].append(time.perf_counter() - t0)
    result = {"model": args.model, "decoder": decoder, "a": args.a, "b": args.b, "num_samples": args.num_samples,
              "fixed_length": args.fixed_length, "threads": torch.get_num_threads(),
              "median_ms_a": round(1000 * statistics.median(times["a"]), 2),
              "median_ms_b": round(1000 * statistics.median(times["b"]), 2),
              "median_ratio_b_over_a": round(statistics.median(b / a for a, b in zip(times["a"], times["b"])), 4)}
    print(json.dumps(result))
    if args.output:
        write_results(args.output, [result])


if __name__ == "__main__":
    main()
