"""How much of ELMER's quality is lost where it ends: the same full-depth pass scored twice, once with the
output cut at the model's own first end token (ELMER's decoding at δ = 0, or the soft exit's), once at the
reference's length with the end token banned (the "oracle length" the released ELMER code decodes with,
which no user has). Beside them, how far the model's own lengths fall from the references'.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/elmer_length.py --model runs/qg-elmer-last/best \\
        [runs/qg-elmer-soft-g0/best ...] --input ../shared/data/squad_qg_sent/dev.jsonl \\
        [--output results/elmer_length.json]

Scores are BLEU-4 / METEOR / ROUGE-L in the nqg convention, as the campaign scores; lengths count word
pieces before the end token. A diagnostic, not a decoder: it reads the references.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from erniegen import load  # noqa: E402
from erniegen.batch import pad  # noqa: E402
from erniegen.bench import write_results  # noqa: E402
from erniegen.decoding import encode_sources, ids_to_text, options_from_settings  # noqa: E402
from erniegen.elmer import (FUSION, attach, hard_exit, layer_logits, outputs, pick, slot_count,  # noqa: E402
                             soft_exit_layers)
from erniegen.metrics import qg_scores  # noqa: E402
from erniegen.network import Network  # noqa: E402
from erniegen.passes import encode_source  # noqa: E402
from erniegen.search import DecodeOptions, default_banned_ids  # noqa: E402


@torch.no_grad()
def last_layer_logp(model: Network, src: list[list[int]]) -> torch.Tensor:
    """(N,T,V) log-probs of every slot at the last layer, every slot run through every layer."""
    ids, lengths = pad(src, model.config.pad_token_id)
    source, _ = encode_source(model, ids, lengths, hidden=False)
    width = slot_count(model)
    attach(model)
    if FUSION in model.extras:
        *_, logits = soft_exit_layers(model, source, width)
    else:
        out = hard_exit(model, source, width, 0.0, options_from_settings(model), active_only=False)
        logits = layer_logits(model, len(model.layers) - 1, out.states[-1])
    return torch.log_softmax(logits.float(), -1)


def decode_both(model: Network, src: list[list[int]], ref_len: list[int], opts: DecodeOptions,
                batch_size: int = 32) -> tuple[list[list[int]], list[list[int]]]:
    """Own-length and oracle-length outputs for every source, in order: the first is what ``elmer-hard`` at
    δ = 0 (or ``elmer-soft``) decodes with ``opts``; the second never holds the end token or a banned id."""
    eos, width = model.tokenizer.sep_token_id, slot_count(model)
    own: list[list[int]] = []
    oracle: list[list[int]] = []
    for start in range(0, len(src), batch_size):
        logp = last_layer_logp(model, src[start:start + batch_size])
        n = logp.shape[0]
        slot = torch.arange(width).repeat(n)
        own += outputs(pick(logp.flatten(0, 1), slot, eos, opts).view(n, width), eos, opts)
        banned = logp.clone()
        banned[..., [eos, *opts.banned_ids]] = float("-inf")
        tokens = banned.argmax(-1).tolist()
        oracle += [row[: min(k, width - 1)] for row, k in zip(tokens, ref_len[start:start + n])]
    return own, oracle


def read_dev(path: str, limit: int | None) -> tuple[list[str], list[str]]:
    """The sources and references of a JSONL file's first ``limit`` rows (all if None)."""
    rows = [json.loads(line) for line in open(path, encoding="utf-8")][:limit]
    return [r["source"] for r in rows], [r["target"] for r in rows]


def prepared(path: str, sources: list[str], references: list[str], **options
             ) -> tuple[Network, list[list[int]], list[list[int]], DecodeOptions]:
    """A model, the sources and references as its tokenizer makes them, and its decoding options (the
    banned ids decoding bans; ``options`` over the model's settings)."""
    model = load(path)
    tgt = [model.tokenizer(t, add_special_tokens=False)["input_ids"] for t in references]
    return (model, encode_sources(model, sources), tgt,
            options_from_settings(model, banned_ids=default_banned_ids(model), **options))


def length_stats(own: list[list[int]], ref_len: list[int]) -> dict:
    diff = [len(o) - r for o, r in zip(own, ref_len)]
    return {"mean_len": round(statistics.mean(len(o) for o in own), 2),
            "mean_ref_len": round(statistics.mean(ref_len), 2),
            "mean_abs_len_error": round(statistics.mean(abs(d) for d in diff), 2),
            "exact_len": round(sum(d == 0 for d in diff) / len(diff), 4),
            "shorter": round(sum(d < 0 for d in diff) / len(diff), 4),
            "longer": round(sum(d > 0 for d in diff) / len(diff), 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, nargs="+", help="models fine-tuned with --method elmer or elmer-soft")
    p.add_argument("--input", required=True, help="JSONL with source and target")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--limit", type=int, help="the first N examples only")
    p.add_argument("--output", default="results/elmer_length.json")
    args = p.parse_args()

    sources, references = read_dev(args.input, args.limit)
    results = []
    for path in args.model:
        model, src, tgt, opts = prepared(path, sources, references, dedup=False)
        ref_len = [len(t) for t in tgt]
        own, oracle = decode_both(model, src, ref_len, opts, args.batch_size)
        for lengths, out in (("own", own), ("oracle", oracle)):
            scores = qg_scores(ids_to_text(model, out), references, sources)
            row = {"model": path, "length": lengths} | {k: round(v, 2) for k, v in scores.items()}
            if lengths == "own":
                row |= length_stats(own, ref_len)
            print(json.dumps(row), flush=True)
            results.append(row)
    write_results(args.output, results, input=args.input, examples=len(sources))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
