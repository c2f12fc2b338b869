"""Print BENCHMARKS.md tables from the result files the benchmark scripts write.

    python3 benchmarks/tables.py results/qg_quality.jsonl [results/decode_speed.json]
"""
from __future__ import annotations

import json
import sys


def quality(path: str) -> None:
    rows = {}
    for line in open(path, encoding="utf-8"):
        r = json.loads(line)
        rows[r["label"]] = r  # the last run of a label wins
    print("| run | BLEU-4 | METEOR | ROUGE-L | Distinct-1 | Distinct-2 |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, r in sorted(rows.items()):
        print(f"| {label} | {r['bleu4']:.2f} | {r['meteor']:.2f} | {r['rougeL']:.2f} | "
              f"{r['distinct1']:.2f} | {r['distinct2']:.2f} |")


def speed(path: str) -> None:
    data = json.load(open(path, encoding="utf-8"))
    print(f"<!-- {json.dumps(data['meta'])} -->")
    print("| decoder | batch | median ms/sample | p90 ms/sample | samples/s | generated tokens/s | vs infilling beam 5 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in data["rows"]:
        print(f"| {r['label']} | {r['batch_size']} | {r['median_ms_per_sample']:.1f} | {r['p90_ms_per_sample']:.1f} | "
              f"{r['samples_per_s']:.2f} | {r['generated_tokens_per_s']:.0f} | {r['speedup_vs_infilling_beam5']:.2f}x |")


if __name__ == "__main__":
    quality(sys.argv[1])
    if len(sys.argv) > 2:
        print()
        speed(sys.argv[2])
