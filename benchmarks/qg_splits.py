"""BLEU-4 / ROUGE-L of prediction files on the dev pairs that training-time evaluations select on (the
first 300) and on the rest (held out from every choice), plus the length of the predictions against the
references, nqg convention (issue 10; BENCHMARKS.md section 1).

    .venv/bin/python benchmarks/qg_splits.py results/qg-n02.jsonl results/qg-v3.jsonl
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from erniegen.metrics import qg_scores, tokenize  # noqa: E402

SELECTION = 300  # finetune's --eval-samples default: best/ is chosen on these


def main() -> None:
    for path in sys.argv[1:]:
        rows = [json.loads(line) for line in open(path, encoding="utf-8")]
        parts = {"first 300": rows[:SELECTION], "rest": rows[SELECTION:], "all": rows}
        cells = []
        for name, part in parts.items():
            s = qg_scores([r["prediction"] for r in part], [r["target"] for r in part], [r["source"] for r in part],
                          meteor=False)
            ratio = (sum(len(tokenize(r["prediction"])) for r in part)
                     / sum(len(tokenize(r["target"])) for r in part))
            cells.append(f"{name}: BLEU-4 {s['bleu4']:.2f} ROUGE-L {s['rougeL']:.2f} length {ratio:.3f}")
        print(f"{Path(path).name} | " + " | ".join(cells))


if __name__ == "__main__":
    main()
