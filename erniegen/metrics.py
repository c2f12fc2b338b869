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

import numpy as np

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.bleu.bleu_scorer import cook_refs, cook_test
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
    items = _rouge_items(predictions, references)
    return {**{k: 100.0 * float(v.mean()) for k, v in items.items()}, **_distinct(predictions)}


def _rouge_items(predictions: Sequence[str], references: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-example ROUGE-1/2/Lsum F1 (0-1), whose means are :func:`rouge_scores`'."""
    _check(predictions, references)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeLsum"], use_stemmer=True)
    rows = [scorer.score("\n".join(split_sentences(ref)), "\n".join(split_sentences(pred)))
            for pred, ref in zip(predictions, references)]
    return {key: np.array([r[name].fmeasure for r in rows])
            for key, name in (("rouge1", "rouge1"), ("rouge2", "rouge2"), ("rougeL", "rougeLsum"))}


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
    gts, res = _qg_items(predictions, references, sources)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge_l, _ = Rouge().compute_score(gts, res)
    result = {"bleu4": 100.0 * bleu[3], "rougeL": 100.0 * float(rouge_l)}
    if meteor:
        result["meteor"] = 100.0 * _meteor(gts, res)
    return {**result, **_distinct(predictions)}


def _qg_items(predictions: Sequence[str], references: Sequence[str],
              sources: Sequence[str] | None) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """The nqg convention's scoring items (see :func:`qg_scores`): group -> tokenized references, -> hypothesis."""
    _check(predictions, references, sources)
    keys = sources if sources is not None else range(len(predictions))
    group_of: dict[object, int] = {}
    gts: dict[int, list[str]] = {}
    res: dict[int, list[str]] = {}
    for key, pred, ref in zip(keys, predictions, references):
        gid = group_of.setdefault(key, len(group_of))
        gts.setdefault(gid, []).append(" ".join(tokenize(ref)))
        res[gid] = [" ".join(tokenize(pred))]
    return gts, res


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


# ---- paired bootstrap: is one predictions file better than another on the same references? --------------------


def item_statistics(metric: str, predictions: Sequence[str], references: Sequence[str],
                    sources: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Per scoring item, what the corpus score is a function of the sums (or means) of, so that a resample of
    items is scored without running the scorers again: ``qg``: BLEU-4's counts (nqg's items, pycocoevalcap's
    closest reference length) and ROUGE-L; ``rouge``: ROUGE-1/2/Lsum. METEOR is left out: its corpus score
    comes from statistics aggregated inside its Java process, not from per-item numbers."""
    if metric == "rouge":
        return _rouge_items(predictions, references)
    if metric != "qg":
        raise ValueError(f"unknown metric '{metric}'; use 'qg' or 'rouge'")
    gts, res = _qg_items(predictions, references, sources)
    counts = []
    for gid in gts:
        cooked = cook_test(res[gid][0], cook_refs(gts[gid]))
        testlen = cooked["testlen"]
        reflen = min((abs(n - testlen), n) for n in cooked["reflen"])[1]
        counts.append([testlen, reflen, *cooked["guess"], *cooked["correct"]])
    _, rouge_l = Rouge().compute_score(gts, res)
    return {"bleu4": np.array(counts, dtype=np.float64), "rougeL": np.asarray(rouge_l, dtype=np.float64)}


def scores_of(stats: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    """Corpus scores x100 of resamples: ``rows`` (R, N) item indices -> each key's R scores. BLEU-4 is
    pycocoevalcap's formula on the summed counts (its 1e-15 / 1e-9 guards included); the others are means."""
    out = {}
    for key, values in stats.items():
        if key != "bleu4":
            out[key] = 100.0 * values[rows].mean(axis=-1)
            continue
        total = values[rows].sum(axis=-2)               # (R, 10): testlen, reflen, guess 1-4, correct 1-4
        precision = (total[..., 6:10] + 1e-15) / (total[..., 2:6] + 1e-9)
        bleu = np.prod(precision, axis=-1) ** 0.25
        ratio = (total[..., 0] + 1e-15) / (total[..., 1] + 1e-9)
        out[key] = 100.0 * np.where(ratio < 1, bleu * np.exp(1 - 1 / np.minimum(ratio, 1)), bleu)
    return out


def paired_bootstrap(metric: str, baseline: Sequence[str], candidate: Sequence[str], references: Sequence[str],
                     sources: Sequence[str] | None = None, resamples: int = 1000,
                     seed: int = 0) -> dict[str, dict[str, float]]:
    """Candidate minus baseline on the same items, with a 95% interval from ``resamples`` paired resamples
    (Koehn 2004: both files scored on the same drawn items), and the share of resamples where the candidate is
    not better. Scoring items are the metric's (for ``qg``, groups of equal sources); with ``qg`` the two
    files must group alike, i.e. hold the same sources in the same order."""
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    if len(baseline) != len(candidate):
        raise ValueError(f"{len(baseline)} baseline predictions but {len(candidate)} candidate predictions")
    a = item_statistics(metric, baseline, references, sources)
    b = item_statistics(metric, candidate, references, sources)
    n = len(next(iter(a.values())))
    rows = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    everything = np.arange(n)[None, :]
    full_a, full_b = scores_of(a, everything), scores_of(b, everything)
    drawn_a, drawn_b = scores_of(a, rows), scores_of(b, rows)
    result = {}
    for key in a:
        delta = drawn_b[key] - drawn_a[key]
        low, high = np.percentile(delta, [2.5, 97.5])
        result[key] = {"baseline": float(full_a[key][0]), "candidate": float(full_b[key][0]),
                       "delta": float(full_b[key][0] - full_a[key][0]), "low": float(low), "high": float(high),
                       "not_better": float(np.mean(delta <= 0))}
    return result
