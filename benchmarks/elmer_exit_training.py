"""How to train a hard-exit ELMER model, on a toy task: a loss at every off-ramp (``exits: all``, the
default) against one loss per slot at an exit layer drawn uniformly, as LPLM draws it (``exits: drawn``).

    .venv/bin/python benchmarks/elmer_exit_training.py [--steps 600] [--output results/elmer_exit_training.json]

A tiny random 4-layer model learns to reverse 3-6 random words (T = 8 slots) with each objective, then
decodes held-out sources with ``elmer-hard`` at the paper's thresholds δ ∈ {0, 0.25, 0.5, 0.75, 1}:
exact match and the mean exit layer of the slots (the share of layer computations a slot needs). A
toy measurement of the trade-off's shape only; real tasks and checkpoints are BENCHMARKS.md's.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from erniegen.batch import collate_pairs, pad  # noqa: E402
from erniegen.bench import write_results  # noqa: E402
from erniegen.data import get_task  # noqa: E402
from erniegen.elmer import build_objective, hard_exit, slot_count  # noqa: E402
from erniegen.model import ModelConfig, Transformer  # noqa: E402
from erniegen.passes import encode_source  # noqa: E402
from erniegen.search import DecodeOptions, default_banned_ids, until_end  # noqa: E402

SPECIAL = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [f"w{i}" for i in range(40)]
THRESHOLDS = (0.0, 0.25, 0.5, 0.75, 1.0)
T = 8


def tokenizer():
    from transformers import BertTokenizerFast
    d = Path(tempfile.mkdtemp())
    (d / "vocab.txt").write_text("\n".join(SPECIAL + WORDS) + "\n")
    return BertTokenizerFast.from_pretrained(str(d))


def reversal(tok, n: int, seed: int) -> list[dict]:
    rng, ids = random.Random(seed), tok.convert_tokens_to_ids(WORDS)
    out = []
    for _ in range(n):
        words = [rng.choice(ids) for _ in range(rng.randint(3, 6))]
        out.append({"source_ids": [tok.cls_token_id, *words, tok.sep_token_id],
                    "target_ids": [*reversed(words), tok.sep_token_id]})
    return out


def train(tok, exits: str, steps: int, seed: int) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=len(SPECIAL) + len(WORDS), hidden_size=64, num_hidden_layers=4,
                                    num_attention_heads=4, intermediate_size=128, max_position_embeddings=32,
                                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    model.tokenizer = tok
    preset = dataclasses.replace(get_task("default"), max_target_len=T, label_smoothing=0.0)
    objective = build_objective("elmer", model, preset, {"exits": exits}).train()
    optimizer = torch.optim.AdamW(objective.parameters(), lr=1e-3)
    for step in range(steps):
        loss = objective(**collate_pairs(reversal(tok, 64, seed=step)))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def evaluate(model: Transformer, pairs: list[dict], threshold: float) -> dict:
    src, src_len = pad([p["source_ids"] for p in pairs], 0)
    source, _ = encode_source(model, src, src_len, hidden=False)
    opts = DecodeOptions(max_length=T, banned_ids=default_banned_ids(model))
    out = hard_exit(model, source, slot_count(model), threshold, opts)
    eos = model.tokenizer.sep_token_id
    hits = [until_end(row, eos) == p["target_ids"][:-1] for row, p in zip(out.tokens.tolist(), pairs)]
    return {"threshold": threshold, "exact_match": round(sum(hits) / len(hits), 3),
            "mean_exit_layer": round(out.exit_layer.float().mean().item(), 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output")
    args = p.parse_args()
    tok = tokenizer()
    held_out = reversal(tok, 256, seed=10_000)
    rows = []
    for exits in ("all", "drawn"):
        model = train(tok, exits, args.steps, args.seed)
        for threshold in THRESHOLDS:
            rows.append({"exits": exits} | evaluate(model, held_out, threshold))
            print(json.dumps(rows[-1]), flush=True)
    if args.output:
        write_results(args.output, rows, steps=args.steps, seed=args.seed, layers=4, slots=T)


if __name__ == "__main__":
    main()
