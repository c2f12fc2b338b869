"""Where one ELMER hard-exit batch spends its time, and so what early exit can save (issue 12).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/elmer_parts.py --model runs/qg-elmer/best \\
        --input ../shared/data/squad_qg_sent/dev.jsonl [--batch-size 32] [--repeats 7] \\
        [--output results/elmer_parts.json]

One batch of dev sources of the median length (``erniegen generate`` batches by length): the source pass, one slot
layer over every slot, the same layer over 50% and 10% of the slots as the exit path runs it (the others'
keys and values as past), the vocabulary projection of every slot, the argmax of its scores, and the whole
pass with no early exit (δ = 0). Medians of ``--repeats`` after one warm-up, milliseconds, this machine only.
A slot that exits at layer 1 saves at most five slot layers; the source pass and one projection a slot stay.
Run it on an idle machine.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from erniegen import load  # noqa: E402
from erniegen.batch import pad  # noqa: E402
from erniegen.bench import write_results  # noqa: E402
from erniegen.decoding import encode_sources, options_from_settings  # noqa: E402
from erniegen.elmer import _active_layer, hard_exit, layer_logits, make_slots, pick, slot_count  # noqa: E402
from erniegen.passes import encode_source  # noqa: E402
from inference_precision import median_ms  # noqa: E402


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a model fine-tuned with --method elmer")
    p.add_argument("--input", required=True, help="JSONL with a source field")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--output", default="results/elmer_parts.json")
    args = p.parse_args()

    model = load(args.model)
    sources = encode_sources(model, [json.loads(line)["source"] for line in open(args.input, encoding="utf-8")])
    ranked = sorted(sources, key=len)
    middle = max(0, len(ranked) // 2 - args.batch_size // 2)
    batch = ranked[middle: middle + args.batch_size]
    src, src_len = pad(batch, model.config.pad_token_id)
    width, opts = slot_count(model), options_from_settings(model, exit_threshold=0.0, exit_gate=None)
    source, _ = encode_source(model, src, src_len, hidden=False)
    slots = make_slots(model, source, width)
    x, last = slots.x, len(model.layers) - 1
    hidden = x.flatten(0, 1)
    scores = layer_logits(model, last, hidden)
    slot = torch.arange(width).repeat(len(batch))
    generator = torch.Generator().manual_seed(0)
    parts = {
        "source pass": lambda: encode_source(model, src, src_len, hidden=False),
        "slot layer, every slot": lambda: model.run_layer(last, x, slots.mask, source.kv[last]),
        "projection, every slot": lambda: layer_logits(model, last, hidden),
        "argmax of the scores": lambda: pick(scores, slot, model.tokenizer.sep_token_id, opts),
        "whole pass, no early exit": lambda: hard_exit(model, source, width, 0.0, opts),
    }
    for share in (0.5, 0.1):
        active = torch.rand(x.shape[:2], generator=generator) < share
        parts[f"slot layer, {share:.0%} of the slots"] = \
            lambda active=active: _active_layer(model, last, x, active, slots.roles, source)
    row = {"sources": len(batch), "source_tokens": int(src.shape[1]), "slots": width,
           "ms": {name: round(median_ms(f, args.repeats, warmup=1), 1) for name, f in parts.items()}}
    print(json.dumps(row, indent=1))
    write_results(args.output, [row], model=args.model, input=args.input, threads=torch.get_num_threads())


if __name__ == "__main__":
    main()
