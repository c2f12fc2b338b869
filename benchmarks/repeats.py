"""How often outputs stutter, per predictions file: a word said twice in a row (`the the`), and a word broken by a
word piece said twice (`thermodynaynamic` = `the ##rm ##od ##yna ##yna ##mic`, the copy head copying a piece
again), with how many outputs differ from the first file's. The numbers of BENCHMARKS.md section 7.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/repeats.py results/qg-teacher-r-nobrw.jsonl \\
        results/qg-teacher-r.jsonl [--tokenizer runs/qg-teacher-r/best] [--examples 3]

A doubled word: two equal whitespace-separated words of two or more characters starting with a letter. A
repeated piece: a word whose wordpieces (by the model's tokenizer; default: all-MiniLM-L6-v2's) hold the same
piece twice in a row, the piece's letters numbering two or more (what ``search.word_token_mask`` blocks).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def doubled_word(text: str) -> bool:
    words = text.split()
    return any(a == b and len(a) > 1 and a[0].isalpha() for a, b in zip(words, words[1:]))


def repeated_piece(text: str, tokenizer) -> bool:
    for word in text.split():
        pieces = [p.removeprefix("##") for p in tokenizer.tokenize(word)]
        if any(a == b and len(a) > 1 and a[0].isalpha() for a, b in zip(pieces[1:], pieces[2:])):
            return True
    return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("predictions", nargs="+", help="JSONL files with a `prediction` field, the same rows in each")
    ap.add_argument("--tokenizer", help="a model folder or tokenizer (default: all-MiniLM-L6-v2's)")
    ap.add_argument("--examples", type=int, default=3, help="outputs with a broken word to print per file")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from erniegen.spans import default_tokenizer_dir
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or default_tokenizer_dir())
    first = None
    for path in args.predictions:
        preds = [json.loads(line)["prediction"] for line in Path(path).read_text(encoding="utf-8").splitlines()
                 if line.strip()]
        broken = [p for p in preds if repeated_piece(p, tokenizer)]
        changed = "" if first is None else f", {sum(a != b for a, b in zip(first, preds))} differ from the first file's"
        print(f"{path}: {len(preds)} outputs, {sum(map(doubled_word, preds))} with a doubled word, {len(broken)} "
              f"with a repeated word piece{changed}")
        for p in broken[: args.examples]:
            print(f"    {p}")
        first = preds if first is None else first


if __name__ == "__main__":
    main()
