"""How often outputs stutter, per predictions file: a word said twice in a row (`the the`), and a word broken by a
word piece said twice (`thermodynaynamic` = `the ##rm ##od ##yna ##yna ##mic`, the copy head copying a piece
again), with how many outputs differ from the first file's. The numbers of BENCHMARKS.md section 7.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/repeats.py results/qg-teacher-r-nobrw.jsonl \\
        results/qg-teacher-r.jsonl [--tokenizer runs/qg-teacher-r/best] [--examples 3] \\
        [--train ../shared/data/squad_qg_sent/train.jsonl]

With ``--train``, also the words that no training row (source or target) and not the row's own source holds:
what a broken word looks like (`firstviulk`, `thermynamic`), and what a rule confining words to the known ones
would forbid. The references (the first file's ``target`` field) are counted the same way: real questions use
such words too (`rankine`, `fusible`), and a rule must not forbid those.

A doubled word: two equal whitespace-separated words of two or more characters starting with a letter. A
repeated piece: a word whose wordpieces (by the model's tokenizer; default: all-MiniLM-L6-v2's) hold the same
piece twice in a row, the piece's letters numbering two or more (what ``search.word_token_mask`` blocks).
"""
from __future__ import annotations

import argparse
import json
import re
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


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def unknown_words(rows: list[dict], field: str, known: set[str]) -> list[list[str]]:
    """Per row, the words of ``row[field]`` that neither ``known`` nor the row's source holds."""
    return [[w for w in words(r[field]) if w not in known and w not in source]
            for r, source in ((r, set(words(r["source"]))) for r in rows)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("predictions", nargs="+", help="JSONL files with a `prediction` field, the same rows in each")
    ap.add_argument("--tokenizer", help="a model folder or tokenizer (default: all-MiniLM-L6-v2's)")
    ap.add_argument("--examples", type=int, default=3, help="outputs with a broken word to print per file")
    ap.add_argument("--train", help="JSONL training pairs (source, target): count the words they do not hold")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from erniegen.spans import default_tokenizer_dir
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or default_tokenizer_dir())
    known: set[str] = set()
    if args.train:
        for line in Path(args.train).read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                known.update(words(row["source"]), words(row["target"]))
    first = None
    for path in args.predictions:
        rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
        preds = [r["prediction"] for r in rows]
        broken = [p for p in preds if repeated_piece(p, tokenizer)]
        changed = "" if first is None else f", {sum(a != b for a, b in zip(first, preds))} differ from the first file's"
        print(f"{path}: {len(preds)} outputs, {sum(map(doubled_word, preds))} with a doubled word, {len(broken)} "
              f"with a repeated word piece{changed}")
        for p in broken[: args.examples]:
            print(f"    {p}")
        fields = ((["target"] if first is None else []) + ["prediction"]) if args.train else []
        for field in fields:
            unknown = unknown_words(rows, field, known)
            n_words = sum(len(words(r[field])) for r in rows)
            print(f"    {'references' if field == 'target' else 'outputs'}: {sum(map(bool, unknown))} of {len(rows)} "
                  f"with a word neither the training rows nor the source hold ({sum(map(len, unknown))} of {n_words} "
                  f"words), e.g. {[u for u in unknown if u][: args.examples]}")
        first = preds if first is None else first


if __name__ == "__main__":
    main()
