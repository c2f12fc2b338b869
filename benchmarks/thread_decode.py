"""Batch-1 decoding latency on the main thread against a second thread of the same process.

Why `erniegen serve` decodes on the main thread: PyTorch's OpenMP pool belongs to the thread that first ran a
parallel operation, and a second thread gets a pool of its own; with more OpenMP threads than cores, libgomp
stops spinning between operations and every one pays a wake-up.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/thread_decode.py --model runs/qg-teacher/best \
        --input ../shared/data/squad_qg_sent/dev.jsonl --output results/thread_decode.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import erniegen  # noqa: E402
from erniegen.allocator import keep_freed_memory  # noqa: E402
from erniegen.bench import write_results  # noqa: E402
from erniegen.data import read_examples  # noqa: E402
from erniegen.decoding import generate_text  # noqa: E402


def timings(model, sources: list[str], options: dict, warmup: int) -> list[float]:
    out = []
    for s in sources:
        t0 = time.perf_counter()
        generate_text(model, [s], None, 1, **options)
        out.append((time.perf_counter() - t0) * 1000)
    return out[warmup:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--samples", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--precisions", default="fp32,int8")
    p.add_argument("--rounds", type=int, default=3, help="main, thread, main, thread, ... alternated")
    args = p.parse_args()
    keep_freed_memory()  # as the command line does
    sources = [e.source for e in read_examples(args.input, require_target=False)][:args.samples + args.warmup]
    rows = []
    for precision in args.precisions.split(","):
        model = erniegen.load(args.model, precision=precision)
        for decoding, options in (("greedy", {"num_beams": 1}), ("beam 5", {"num_beams": 5})):
            medians: dict[str, list[float]] = {"main": [], "thread": []}
            for _ in range(args.rounds):
                medians["main"].append(statistics.median(timings(model, sources, options, args.warmup)))
                box: list[list[float]] = []
                t = threading.Thread(target=lambda: box.append(timings(model, sources, options, args.warmup)))
                t.start()
                t.join()
                medians["thread"].append(statistics.median(box[0]))
            row = {"precision": precision, "decoding": decoding,
                   "main_ms": round(statistics.median(medians["main"]), 1),
                   "thread_ms": round(statistics.median(medians["thread"]), 1)}
            row["thread_over_main"] = round(row["thread_ms"] / row["main_ms"], 2)
            rows.append(row)
            print(row, flush=True)
    write_results(args.output, rows, model=args.model, samples=args.samples, rounds=args.rounds)


if __name__ == "__main__":
    main()
