"""LEAD-N: the source's first N sentences as the summary, the floor every summarizer is read against.

XSum's own paper reports LEAD (ROUGE-1/2/L 16.30 / 1.60 / 11.95 on its test set); this writes the same baseline
for any JSONL file, in `erniegen generate`'s output format, so `erniegen evaluate` scores it like a model:

    .venv/bin/python benchmarks/lead.py --input ../shared/data/xsum/dev.jsonl --output results/xsum-lead1.jsonl
    erniegen evaluate --task xsum --predictions results/xsum-lead1.jsonl
"""
from __future__ import annotations

import argparse

from erniegen.data import get_task, read_examples
from erniegen.metrics import split_sentences
from erniegen.outputs import output_format, write_predictions


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--sentences", type=int, default=1, help="N: how many leading sentences make the summary")
    p.add_argument("--task", default="xsum", help="the preset whose field names the input is read with")
    args = p.parse_args()
    rows = read_examples(args.input, *get_task(args.task).fields(), require_target=False)
    out = [e.row | {"prediction": " ".join(split_sentences(e.source)[: args.sentences])} for e in rows]
    write_predictions(args.output, output_format(args.output), out)
    print(f"wrote {len(out)} LEAD-{args.sentences} summaries to {args.output}")


if __name__ == "__main__":
    main()
