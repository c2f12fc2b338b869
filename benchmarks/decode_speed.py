"""Decoding latency (batch 1) and throughput (batch 32) of every decoder, side by side in one run.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/decode_speed.py --ar-model runs/qg-ernie-gen/best \
        [--nar-model runs/qg-mist/best] --input ../shared/data/squad_qg/dev.jsonl --output results/decode_speed.json

Autoregressive decoders and the Hugging Face baseline (a GPT-2 of the same depth and width with random
weights, ``generate()`` with its key/value cache) produce exactly ``--length`` tokens from the same
prompts; NAR decoders produce the length their length head predicts (reported as tokens/sample).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from erniegen import load  # noqa: E402
from erniegen.bench import bench_decoder, bench_hf_baseline, hf_gpt2_like, write_results  # noqa: E402
from erniegen.data import read_examples  # noqa: E402
from erniegen.decoding import DecodeOptions, default_banned_ids, encode_sources  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ar-model", required=True)
    p.add_argument("--nar-model")
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--length", type=int, default=16, help="tokens every AR decoder generates")
    p.add_argument("--samples-b1", type=int, default=40)
    p.add_argument("--batches-b32", type=int, default=3)
    p.add_argument("--no-baseline", action="store_true")
    args = p.parse_args()
    torch.manual_seed(0)

    ar = load(args.ar_model)
    texts = [e.source for e in read_examples(args.input, require_target=False)]
    need = max(args.samples_b1 + 2, 32 * (args.batches_b32 + 2))
    sources = encode_sources(ar, texts[:need])
    fixed = dict(max_length=args.length, min_length=args.length, banned_ids=default_banned_ids(ar))
    ar_configs = [("infilling greedy", "infilling", DecodeOptions(num_beams=1, **fixed)),
                  ("infilling beam 5", "infilling", DecodeOptions(num_beams=5, length_penalty=1.0, **fixed))]
    nar_configs = []
    nar = None
    if args.nar_model:
        nar = load(args.nar_model)
        nar_opts = dict(max_length=ar.settings.max_decode_len, banned_ids=default_banned_ids(nar))
        nar_configs = [("NAR single pass", "nar", DecodeOptions(**nar_opts)),
                       ("MIST iterative k=3", "mist-iter", DecodeOptions(iterations=3, **nar_opts)),
                       ("Mask-Predict k=3", "mask-predict", DecodeOptions(iterations=3, **nar_opts))]
    baseline = None if args.no_baseline else hf_gpt2_like(ar)
    rows = []
    for batch, n in ((1, args.samples_b1), (32, 32 * args.batches_b32)):
        timed = sources[:n + batch * 2]
        for label, dec, opts in ar_configs:
            rows.append({"label": label} | bench_decoder(ar, timed, dec, opts, batch, warmup=2))
            print(json.dumps(rows[-1]), flush=True)
            if baseline is not None:
                rows.append({"label": f"HF GPT-2 generate, {label.split(' ', 1)[1]}"}
                            | bench_hf_baseline(baseline, timed, opts, batch, warmup=2))
                print(json.dumps(rows[-1]), flush=True)
        for label, dec, opts in nar_configs:
            rows.append({"label": label} | bench_decoder(nar, timed, dec, opts, batch, warmup=2))
            print(json.dumps(rows[-1]), flush=True)
    for batch in (1, 32):
        ref = next(r for r in rows if r["label"] == "infilling beam 5" and r["batch_size"] == batch)
        for r in rows:
            if r["batch_size"] == batch:
                r["speedup_vs_infilling_beam5"] = round(r["samples_per_s"] / ref["samples_per_s"], 2)
    write_results(args.output, rows, threads=torch.get_num_threads(), ar_model=args.ar_model,
                  nar_model=args.nar_model, length=args.length)
    print("\n| decoder | batch | median ms/sample | p90 ms/sample | samples/s | tokens/s | speed-up vs beam 5 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['label']} | {r['batch_size']} | {r['median_ms_per_sample']} | {r['p90_ms_per_sample']} | "
              f"{r['samples_per_s']} | {r['generated_tokens_per_s']} | {r['speedup_vs_infilling_beam5']}x |")


if __name__ == "__main__":
    main()
