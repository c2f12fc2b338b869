"""What a NAR model's slots know of the dev references, teacher-forced: the mean cross-entropy (nats) and the
argmax accuracy of the reference's word pieces at each of ELMER's off-ramps, or at a NAT / MIST model's last layer
with the reference's length given; and where each puts the end (ELMER's first argmax end token, NAT's length head)
against the reference's length.

Why: ELMER trails NAT here by more than half its BLEU-4, and decoding scores mix what the slots know with where the
output ends. ELMER's slots never learn the length, NAT's are told it; this reads the two apart (issue 12).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/slot_loss.py --model runs/qg-elmer-kd-r/best \\
        runs/qg-elmer-kd-r-last/best runs/qg-nat-kd-r/best --input ../shared/data/squad_qg_sent/dev.jsonl \\
        [--output results/slot_loss.json]

Word pieces are the reference's ids before its end token; a reference longer than an ELMER model's T slots is
left out for every model (counted as ``skipped``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from erniegen import load  # noqa: E402
from erniegen.batch import pad  # noqa: E402
from erniegen.bench import write_results  # noqa: E402
from erniegen.decoding import encode_sources, options_from_settings  # noqa: E402
from erniegen.elmer import (FUSION, IGNORE, attach, hard_exit, layer_logits, slot_count, slot_labels,  # noqa: E402
                             soft_exit_layers)
from erniegen.masks import SOURCE  # noqa: E402
from erniegen.nar import length_head, masked_slots, slot_valid  # noqa: E402
from erniegen.network import Network  # noqa: E402
from erniegen.passes import encode_source, slot_pass  # noqa: E402


def references(model: Network, texts: list[str]) -> list[list[int]]:
    """Each reference's word-piece ids and the end [SEP], as fine-tuning encodes targets (untruncated)."""
    sep = model.tokenizer.sep_token_id
    return [model.tokenizer(t, add_special_tokens=False)["input_ids"] + [sep] for t in texts]


@torch.no_grad()
def elmer_layers(model: Network, src: list[list[int]], tgt: list[list[int]]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every off-ramp's log-probs at the labelled slots (n, V) and their labels (n,); every slot runs every layer."""
    ids, lengths = pad(src, model.config.pad_token_id)
    source, _ = encode_source(model, ids, lengths, hidden=False)
    width = slot_count(model)
    t_ids, t_len = pad(tgt, IGNORE)
    labels = slot_labels(t_ids, t_len, width)
    where = labels != IGNORE
    attach(model)
    if FUSION in model.extras:
        logits = [lg[where] for lg in soft_exit_layers(model, source, width)]
    else:
        out = hard_exit(model, source, width, 0.0, options_from_settings(model), active_only=False)
        logits = [layer_logits(model, i, x[where]) for i, x in enumerate(out.states)]
    return [torch.log_softmax(lg.float(), -1) for lg in logits], labels[where]


@torch.no_grad()
def nar_last_layer(model: Network, src: list[list[int]], tgt: list[list[int]]
                   ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Last-layer log-probs (n, V) at the reference's slots, given its length; their labels; and the length head's
    argmax for every row."""
    ids, lengths = pad(src, model.config.pad_token_id)
    source, hidden = encode_source(model, ids, lengths)
    t_ids, t_len = pad(tgt, 0)
    slots = slot_pass(model, source, masked_slots(t_len, model.tokenizer.mask_token_id), t_len)
    valid = slot_valid(t_len)
    predicted_len = length_head(model)(hidden, source.roles.code == SOURCE).argmax(-1)
    return [torch.log_softmax(model.logits(slots[valid]).float(), -1)], t_ids[valid], predicted_len


def is_nar(model: Network) -> bool:
    """A model with a length head (NAT, MIST) rather than ELMER's fixed slots."""
    return model.has_saved_extra("length")


def measure(model: Network, src: list[list[int]], tgt: list[list[int]], batch_size: int) -> dict:
    sep = model.tokenizer.sep_token_id
    nar = is_nar(model)
    word_nll: list[float] = []
    word_hit: list[float] = []
    end_nll = end_hit = words = ends = exact = 0.0
    for start in range(0, len(src), batch_size):
        s, t = src[start:start + batch_size], tgt[start:start + batch_size]
        if nar:
            logps, labels, predicted = nar_last_layer(model, s, t)
            exact += float((predicted == torch.tensor([len(x) for x in t])).sum())
        else:
            logps, labels = elmer_layers(model, s, t)
            last = logps[-1].argmax(-1)
            pos = 0
            for row in t:  # the first argmax end token of each row, at the last layer, against the reference's end
                pred = last[pos:pos + len(row)].tolist()
                exact += sep not in pred[:-1] and pred[-1] == sep
                pos += len(row)
        word = labels != sep
        if not word_nll:
            word_nll, word_hit = [0.0] * len(logps), [0.0] * len(logps)
        for i, logp in enumerate(logps):
            nll = F.nll_loss(logp, labels, reduction="none")
            word_nll[i] += float(nll[word].sum())
            word_hit[i] += float((logp.argmax(-1) == labels)[word].sum())
        if not nar:
            end_nll += float(F.nll_loss(logps[-1][~word], labels[~word], reduction="sum"))
            end_hit += float((logps[-1].argmax(-1) == labels)[~word].sum())
        words += float(word.sum())
        ends += float((~word).sum())
    row = {"method": model.settings.method,
           "word_nll_by_layer" if not nar else "word_nll_last_layer": [round(v / words, 3) for v in word_nll],
           "word_accuracy_by_layer" if not nar else "word_accuracy_last_layer": [round(v / words, 4) for v in word_hit],
           "exact_length": round(exact / len(src), 4)}
    if not nar:
        row |= {"end_nll": round(end_nll / ends, 3), "end_accuracy": round(end_hit / ends, 4)}
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, nargs="+", help="models fine-tuned with --method elmer, elmer-soft, "
                                                              "nat or mist")
    p.add_argument("--input", required=True, help="JSONL with source and target")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--limit", type=int, help="the first N examples only")
    p.add_argument("--output", default="results/slot_loss.json")
    args = p.parse_args()

    rows = [json.loads(line) for line in open(args.input, encoding="utf-8")][: args.limit]
    models = {path: load(path) for path in args.model}
    widths = [slot_count(m) for m in models.values() if not is_nar(m)]
    first = next(iter(models.values()))
    keep = [r for r, t in zip(rows, references(first, [r["target"] for r in rows]))
            if not widths or len(t) <= min(widths)]
    results = []
    for path, model in models.items():
        src = encode_sources(model, [r["source"] for r in keep])
        row = {"model": path} | measure(model, src, references(model, [r["target"] for r in keep]), args.batch_size)
        row["skipped"] = len(rows) - len(keep)
        print(json.dumps(row), flush=True)
        results.append(row)
    write_results(args.output, results, input=args.input, examples=len(keep))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
