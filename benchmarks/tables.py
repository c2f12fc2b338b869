"""Print BENCHMARKS.md tables from the result files the benchmark scripts write.

    python3 benchmarks/tables.py results/qg_quality.jsonl [results/decode_speed.json]
    python3 benchmarks/tables.py --seeds results/qg_recipe.jsonl default=qg-n02,qg-s1 e12=qg-e12 \
        "α 3=qg-n02,qg-s1:--length-penalty 3.0"

``--seeds`` gives, per setting, the mean ± sample standard deviation over its runs (one per seed) of each
run's latest full-dev score with its default decoding (`qg_recipe.sh score NAME`), or with the decoding
after ``:`` (the flags given to `qg_recipe.sh score NAME FLAGS`), and the runs' values. A run may also be a
``benchmarks/campaign.txt`` decode entry, by its name: ``default=qg-e6-run2,qg-s1-run2,qg-s2``.
"""
from __future__ import annotations

import json
import statistics
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


def seeds(path: str, settings: list[str]) -> None:
    latest = {}  # label -> row, and campaign entry name -> row (a campaign decode entry is found by its name)
    for line in open(path, encoding="utf-8"):
        r = json.loads(line)
        latest[r["label"]] = r
        if "name" in r:
            latest[r["name"]] = r
    print("| setting | seeds | BLEU-4 | METEOR | ROUGE-L | BLEU-4 per run |")
    print("|---|---:|---:|---:|---:|---|")
    for setting in settings:
        name, _, listed = setting.partition("=")
        listed, _, decoding = listed.partition(":")
        decoding = decoding or "default decoding"
        runs = listed.split(",")
        keys = [f"{run} {decoding}" if f"{run} {decoding}" in latest else run for run in runs]
        missing = [run for run, key in zip(runs, keys) if key not in latest]
        if missing:
            raise SystemExit(f"{path}: no '{decoding}' score for {', '.join(missing)} (run qg_recipe.sh score)")
        rows = [latest[key] for key in keys]
        cells = []
        for key in ("bleu4", "meteor", "rougeL"):
            values = [r[key] for r in rows]
            spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else " (one seed)"
            cells.append(f"{statistics.mean(values):.2f}{spread}")
        per_run = ", ".join(f"{run} {r['bleu4']:.2f}" for run, r in zip(runs, rows))
        print(f"| {name} | {len(rows)} | " + " | ".join(cells) + f" | {per_run} |")


if __name__ == "__main__":
    if sys.argv[1] == "--seeds":
        seeds(sys.argv[2], sys.argv[3:])
        sys.exit()
    quality(sys.argv[1])
    if len(sys.argv) > 2:
        print()
        speed(sys.argv[2])
