"""Does a glancing-trained ELMER lean on revealed neighbours? Session 40 left this hypothesis for why GLAT costs
ELMER BLEU-4 (BENCHMARKS.md section 1, "Is it the length?"): glancing training shows some slots their reference
token, so the model learns to read its neighbours' tokens, which single-pass decoding never gives it.

Per model, three last-layer passes over the dev set (every slot through every layer, as ``elmer-hard`` at δ = 0):

* ``none``: every slot [MASK], the model's own output (what it decodes);
* ``gold``: a share of the reference's labelled slots (end token included) shows its reference token, drawn at
  random as GLAT draws them; the others are predicted. A diagnostic that reads the references: the slot
  accuracy on the hidden slots, beside the same slots' accuracy in ``none``, says how much revealed neighbours
  help the rest;
* ``own``: the same share of the ``none`` output's slots (up to its end token) shows the model's own, most
  confident tokens; the others are predicted again. A second pass any decoder could make (Mask-Predict's idea,
  Ghazvininejad et al. 2019): scored like a decoder.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/elmer_glance.py --model runs/qg-elmer-kd-r-last/best \\
        runs/qg-elmer-kd-r-last-glat/best --input ../shared/data/squad_qg_sent/dev.jsonl \\
        [--shares 0.3 0.5] [--output results/elmer_glance.json]

Scores are BLEU-4 / METEOR / ROUGE-L in the nqg convention; accuracy is per labelled slot, position by position.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from elmer_length import prepared, read_dev  # noqa: E402
from erniegen.batch import pad  # noqa: E402
from erniegen.bench import write_results  # noqa: E402
from erniegen.decoding import ids_to_text  # noqa: E402
from erniegen.elmer import (IGNORE, attach, full_pass, layer_logits, outputs, pick, slot_count,  # noqa: E402
                             slot_labels)
from erniegen.metrics import qg_scores  # noqa: E402
from erniegen.nar import random_slots  # noqa: E402
from erniegen.network import Network  # noqa: E402
from erniegen.passes import EncodedSource, encode_source  # noqa: E402
from erniegen.search import DecodeOptions  # noqa: E402


@torch.no_grad()
def last_layer_logp(model: Network, source: EncodedSource, width: int, ids: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """(N,T,V) last-layer log-probs, the slots' input ids [MASK] unless given."""
    states = full_pass(model, source, width, ids)
    return torch.log_softmax(layer_logits(model, len(model.layers) - 1, states).float(), -1)


def choose(logp: torch.Tensor, eos: int, opts: DecodeOptions) -> torch.Tensor:
    """(N,T) ids as the decoder picks them (banned ids never, the end token not too early)."""
    n, t, _ = logp.shape
    return pick(logp.flatten(0, 1), torch.arange(t, device=logp.device).repeat(n), eos, opts).view(n, t)


def through_end(tokens: torch.Tensor, eos: int) -> torch.Tensor:
    """(N,T) bool: each row's slots up to and including its first end token (all, if it has none)."""
    is_end = (tokens == eos).long()
    return (is_end.cumsum(1) - is_end) == 0


def run(model: Network, src: list[list[int]], tgt: list[list[int]], shares: list[float], opts: DecodeOptions,
        batch_size: int, seed: int) -> dict[str, dict]:
    """Outputs and hidden-slot accuracies of every pass, over all rows."""
    eos, width, mask_id = model.tokenizer.sep_token_id, slot_count(model), model.tokenizer.mask_token_id
    attach(model)
    gen = torch.Generator().manual_seed(seed)
    passes = ["none"] + [f"{kind}-{r:g}" for r in shares for kind in ("gold", "own")]
    out: dict[str, dict] = {p: {"ids": [], "hit": 0, "hit_none": 0, "hidden": 0} for p in passes}
    for start in range(0, len(src), batch_size):
        ids, lengths = pad(src[start:start + batch_size], model.config.pad_token_id)
        source, _ = encode_source(model, ids, lengths, hidden=False)
        rows = [t[: width - 1] + [eos] for t in tgt[start:start + batch_size]]
        gold_ids, gold_len = pad(rows, model.config.pad_token_id)
        labels = slot_labels(gold_ids, gold_len, width)
        labelled = labels != IGNORE
        logp = last_layer_logp(model, source, width)
        first = choose(logp, eos, opts)
        out["none"]["ids"] += outputs(first, eos, opts)
        for r in shares:
            torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
            shown = random_slots(labelled, (labelled.sum(1).double() * r).floor().long())
            confident = logp.max(-1).values.masked_fill(~through_end(first, eos), float("-inf"))
            count = (through_end(first, eos).sum(1).double() * r).floor().long()
            mine = confident.argsort(1, descending=True).argsort(1) < count[:, None]
            for kind, reveal, fill in (("gold", shown, labels), ("own", mine, first)):
                slot_ids = torch.where(reveal, fill, mask_id)
                again = choose(last_layer_logp(model, source, width, slot_ids), eos, opts)
                tokens = torch.where(reveal, fill, again)
                row = out[f"{kind}-{r:g}"]
                row["ids"] += outputs(tokens, eos, opts)
                hidden = labelled & ~reveal
                row["hit"] += int((again == labels)[hidden].sum())
                row["hit_none"] += int((first == labels)[hidden].sum())
                row["hidden"] += int(hidden.sum())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, nargs="+", help="models fine-tuned with --method elmer")
    p.add_argument("--input", required=True, help="JSONL with source and target")
    p.add_argument("--shares", type=float, nargs="+", default=[0.3, 0.5], help="shares of slots revealed")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--limit", type=int, help="the first N examples only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="results/elmer_glance.json")
    args = p.parse_args()

    sources, references = read_dev(args.input, args.limit)
    results = []
    for path in args.model:
        model, src, tgt, opts = prepared(path, sources, references)
        for name, row in run(model, src, tgt, args.shares, opts, args.batch_size, args.seed).items():
            scores = qg_scores(ids_to_text(model, row["ids"]), references, sources)
            result = {"model": path, "reveal": name} | {k: round(v, 2) for k, v in scores.items()}
            if row["hidden"]:
                result |= {"hidden_slots": row["hidden"],
                           "hidden_accuracy": round(row["hit"] / row["hidden"], 4),
                           "hidden_accuracy_unrevealed_pass": round(row["hit_none"] / row["hidden"], 4)}
            print(json.dumps(result), flush=True)
            results.append(result)
    write_results(args.output, results, input=args.input, examples=len(sources), seed=args.seed)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
