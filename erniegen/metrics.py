"""Generation metrics computed with the reference packages, so numbers compare with papers.

* ``rouge``: ``rouge-score`` (Google's re-implementation of ROUGE-1.5.5) with
  the Porter stemmer; ROUGE-L is the summary-level ``rougeLsum``.
* ``qg``: BLEU-4, METEOR 1.5 and ROUGE-L from ``pycocoevalcap``, as in the
  nqg evaluation of Du et al. (2017) used by ERNIE-GEN, UniLM and others.

All scores are percentages (0-100).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Sequence

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from rouge_score import rouge_scorer

# A sentence ends at . ! or ? followed by whitespace; newlines always end one.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\s*\n\s*")
# Abbreviations ("u.s."), numbers ("3.5", "1,000"), words (keeping inner
# apostrophes: "don't", "n't") or single punctuation marks.
_TOKEN = re.compile(r"(?:[^\W\d_]\.){2,}|\d+(?:[.,]\d+)+|\w+(?:'\w+)*|[^\w\s]")


def split_sentences(text: str) -> list[str]:
    """Split text into sentences for ``rougeLsum`` (no nltk data is downloaded)."""
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


def tokenize(text: str) -> list[str]:
    """Lowercase word/punctuation tokens, approximating the lowercased, tokenized nqg data."""
    return _TOKEN.findall(text.lower())


def _check(predictions: Sequence[str], references: Sequence[str], sources: Sequence[str] | None = None) -> None:
    if not predictions:
        raise ValueError("no predictions to score")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if sources is not None and len(sources) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions but {len(sources)} sources")


def distinct_n(predictions: Sequence[str], n: int) -> float:
    """Distinct n-grams / all n-grams over the whole corpus, x100 (0 when there are none)."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    seen: set[tuple[str, ...]] = set()
    total = 0
    for text in predictions:
        tokens = tokenize(text)
        grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
        seen.update(grams)
        total += len(grams)
    return 100.0 * len(seen) / total if total else 0.0


def _distinct(predictions: Sequence[str]) -> dict[str, float]:
    return {"distinct1": distinct_n(predictions, 1), "distinct2": distinct_n(predictions, 2)}


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 x100 over examples, plus distinct-1/2.

    ROUGE-L is ``rougeLsum``: both texts are split with :func:`split_sentences`
    and joined by newlines, as the CNN/DM and XSum papers report it.
    """
    _check(predictions, references)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeLsum"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for pred, ref in zip(predictions, references):
        scores = scorer.score("\n".join(split_sentences(ref)), "\n".join(split_sentences(pred)))
        totals["rouge1"] += scores["rouge1"].fmeasure
        totals["rouge2"] += scores["rouge2"].fmeasure
        totals["rougeL"] += scores["rougeLsum"].fmeasure
    result = {k: 100.0 * v / len(predictions) for k, v in totals.items()}
    return {**result, **_distinct(predictions)}


def qg_scores(
    predictions: Sequence[str],
    references: Sequence[str],
    sources: Sequence[str] | None = None,
    meteor: bool = True,
) -> dict[str, float]:
    """BLEU-4, METEOR and ROUGE-L x100 in the nqg (Du et al. 2017) convention, plus distinct-1/2.

    Convention (nqg ``qgevalcap/eval.py``): examples are grouped by their exact
    source text; each group is one scoring item whose references are all the
    group's targets and whose single hypothesis is the group's prediction (the
    last one, as nqg overwrites; with deterministic decoding they are equal).
    Without ``sources`` every example is its own group. Texts are lowercased
    and tokenized with :func:`tokenize`, then scored with pycocoevalcap's
    corpus-level ``Bleu(4)``, ``Meteor()`` (METEOR 1.5, runs Java) and
    ``Rouge()`` (ROUGE-L, beta 1.2, mean over groups). ``meteor=False`` skips
    the Java start-up (seconds) for quick validation; the key is then absent.
    Distinct-n is over all predictions.
    """
    _check(predictions, references, sources)
    keys = sources if sources is not None else range(len(predictions))
    group_of: dict[object, int] = {}
    gts: dict[int, list[str]] = {}
    res: dict[int, list[str]] = {}
    for key, pred, ref in zip(keys, predictions, references):
        gid = group_of.setdefault(key, len(group_of))
        gts.setdefault(gid, []).append(" ".join(tokenize(ref)))
        res[gid] = [" ".join(tokenize(pred))]

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge_l, _ = Rouge().compute_score(gts, res)
    result = {"bleu4": 100.0 * bleu[3], "rougeL": 100.0 * float(rouge_l)}
    if meteor:
        result["meteor"] = 100.0 * _meteor(gts, res)
    return {**result, **_distinct(predictions)}


def _meteor(gts: dict[int, list[str]], res: dict[int, list[str]]) -> float:
    """Run pycocoevalcap's METEOR 1.5 and always stop its Java process."""
    if shutil.which("java") is None:
        raise RuntimeError("METEOR needs Java, but 'java' is not on PATH; install a JRE or pass meteor=False")
    scorer = Meteor()
    try:
        score, _ = scorer.compute_score(gts, res)
    except (ValueError, OSError) as e:  # the JVM died: an empty line instead of a number, or a broken pipe
        proc = scorer.meteor_p
        err = proc.stderr.read(2000).decode(errors="replace") if proc.poll() is not None else ""
        raise RuntimeError(f"METEOR (Java) failed: {err.strip() or e}") from e
    finally:
        # Meteor keeps the JVM open until garbage collection; stop it now. A failed
        # compute_score leaves its lock held, which would hang Meteor.__del__.
        if scorer.lock.locked():
            scorer.lock.release()
        scorer.meteor_p.stdin.close()
        scorer.meteor_p.kill()
        scorer.meteor_p.wait()
    return float(score)


def compute_metrics(
    metric: str,
    predictions: Sequence[str],
    references: Sequence[str],
    sources: Sequence[str] | None = None,
) -> dict[str, float]:
    """Score with a task's metric: ``"qg"`` (needs ``sources`` for grouping) or ``"rouge"``."""
    if metric == "qg":
        return qg_scores(predictions, references, sources)
    if metric == "rouge":
        return rouge_scores(predictions, references)
    raise ValueError(f"unknown metric '{metric}'; use 'qg' or 'rouge'")
