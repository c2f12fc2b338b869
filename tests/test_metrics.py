"""Tests for erniegen.metrics against hand-computed values."""

from __future__ import annotations

import shutil

import pytest

from erniegen import metrics
from erniegen.metrics import compute_metrics, distinct_n, qg_scores, rouge_scores, split_sentences, tokenize

QUESTION = "What is the capital city of the U.S. in 1,000 words?"


def test_rouge_of_identical_texts_is_100() -> None:
    text = "The council approved the plan. Work starts in May!"
    scores = rouge_scores([text, "one more"], [text, "one more"])
    assert scores["rouge1"] == pytest.approx(100.0)
    assert scores["rouge2"] == pytest.approx(100.0)
    assert scores["rougeL"] == pytest.approx(100.0)


def test_rouge_hand_computed_pair() -> None:
    # pred: the dog ran home (4 tokens); ref: the dog walked to school (5; "walked" stems to "walk").
    # ROUGE-1: 2 shared unigrams, P=2/4, R=2/5 -> F = 2PR/(P+R) = 4/9.
    # ROUGE-2: only "the dog" shared, P=1/3, R=1/4 -> F = 2/7.  LCS = "the dog" -> 4/9.
    scores = rouge_scores(["the dog ran home"], ["the dog walked to school"])
    assert scores["rouge1"] == pytest.approx(400 / 9)
    assert scores["rouge2"] == pytest.approx(200 / 7)
    assert scores["rougeL"] == pytest.approx(400 / 9)


def test_rouge_l_is_summary_level_over_sentences() -> None:
    # Same sentences, swapped: sentence-level LCS unions cover everything, so rougeLsum is 100
    # (a flat LCS would find only 2 of 4 tokens). Bigrams: 2 of 3 shared -> 2/3.
    scores = rouge_scores(["Dogs bark. Cats sleep."], ["Cats sleep. Dogs bark."])
    assert scores["rougeL"] == pytest.approx(100.0)
    assert scores["rouge2"] == pytest.approx(200 / 3)


def test_rouge_is_a_mean_over_examples() -> None:
    scores = rouge_scores(["a b c d", "the dog ran home"], ["a b c d", "the dog walked to school"])
    assert scores["rouge1"] == pytest.approx((100 + 400 / 9) / 2)


def test_sentence_split_rule() -> None:
    assert split_sentences(" Hi there. How are you?\nFine!  ok ") == ["Hi there.", "How are you?", "Fine!", "ok"]
    assert split_sentences("3.5 million in the U.S. today") == ["3.5 million in the U.S.", "today"]


def test_tokenize_lowercases_and_splits_punctuation() -> None:
    assert tokenize(QUESTION) == "what is the capital city of the u.s. in 1,000 words ?".split()
    assert tokenize("Who didn't come?") == ["who", "didn't", "come", "?"]


def test_distinct_hand_example() -> None:
    preds = ["the cat sat", "The cat ran"]
    # unigrams: the cat sat the cat ran -> 4 distinct of 6; bigrams: the-cat x2, cat-sat, cat-ran -> 3 of 4.
    assert distinct_n(preds, 1) == pytest.approx(400 / 6)
    assert distinct_n(preds, 2) == pytest.approx(75.0)
    assert distinct_n(["single"], 2) == 0.0
    scores = rouge_scores(preds, preds)
    assert (scores["distinct1"], scores["distinct2"]) == (pytest.approx(400 / 6), pytest.approx(75.0))


def test_qg_identical_is_100_after_lowercasing_and_tokenizing() -> None:
    refs = ["what is the capital city of the u.s. in 1,000 words ?", "who wrote the book on rivers ?"]
    scores = qg_scores([QUESTION, "Who wrote the book on rivers?"], refs, meteor=False)
    assert scores["bleu4"] == pytest.approx(100.0)
    assert scores["rougeL"] == pytest.approx(100.0)
    assert "meteor" not in scores


def test_qg_references_are_grouped_by_source() -> None:
    ref_a = "what river runs through the old town ?"
    ref_b = "which river flows past the old town center ?"
    sources = ["passage one [SEP] river", "passage one [SEP] river"]
    for pred in (ref_a, ref_b):
        grouped = qg_scores([pred, pred], [ref_a, ref_b], sources, meteor=False)
        assert grouped["bleu4"] == pytest.approx(100.0)
        assert grouped["rougeL"] == pytest.approx(100.0)
    # Without sources each example is scored alone, so the prediction misses the other reference.
    alone = qg_scores([ref_a, ref_a], [ref_a, ref_b], meteor=False)
    assert alone["bleu4"] < 90.0
    # ROUGE-L: 100 for the first; LCS "river the old town ?" = 5 of 8 / 9 tokens, beta 1.2, for the second.
    p, r = 5 / 8, 5 / 9
    second = (1 + 1.2**2) * p * r / (r + 1.2**2 * p)
    assert alone["rougeL"] == pytest.approx(100 * (1 + second) / 2)


def test_errors_on_bad_lengths_and_metric() -> None:
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        rouge_scores(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no predictions to score"):
        qg_scores([], [], meteor=False)
    with pytest.raises(ValueError, match="1 predictions but 2 sources"):
        qg_scores(["a"], ["a"], ["s", "t"], meteor=False)
    with pytest.raises(ValueError, match="unknown metric 'bleu'; use 'qg' or 'rouge'"):
        compute_metrics("bleu", ["a"], ["a"])
    with pytest.raises(ValueError, match="n must be at least 1"):
        distinct_n(["a"], 0)


def test_compute_metrics_rouge_dispatch() -> None:
    scores = compute_metrics("rouge", ["the dog ran home"], ["the dog walked to school"], sources=["ignored"])
    assert set(scores) == {"rouge1", "rouge2", "rougeL", "distinct1", "distinct2"}
    assert scores["rouge1"] == pytest.approx(400 / 9)


def test_meteor_without_java_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="METEOR needs Java"):
        qg_scores(["a"], ["a"])


@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR 1.5 needs java on PATH")
def test_qg_meteor_identical_and_java_is_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    started = []

    class RecordingMeteor(metrics.Meteor):
        def __init__(self) -> None:
            super().__init__()
            started.append(self)

    monkeypatch.setattr(metrics, "Meteor", RecordingMeteor)
    refs = ["what river runs through the old town ?", "who wrote the book on rivers ?"]
    scores = compute_metrics("qg", list(refs), refs, sources=["s1", "s2"])
    assert scores["meteor"] > 90.0
    assert scores["bleu4"] == pytest.approx(100.0)
    assert set(scores) == {"bleu4", "meteor", "rougeL", "distinct1", "distinct2"}
    [scorer] = started
    assert scorer.meteor_p.poll() is not None  # the JVM has exited


# ---- paired bootstrap -----------------------------------------------------------------------------------------


def _texts(seed: int, n: int) -> tuple[list[str], list[str], list[str]]:
    """Predictions, references and sources where some sources repeat (nqg groups), words from a small set."""
    import random
    rng = random.Random(seed)
    words = "what who when is was the a of river city king built named first in".split()
    sent = lambda k: " ".join(rng.choice(words) for _ in range(k)) + " ?"  # noqa: E731
    sources = [f"source {i // 2 if i < 20 else i}" for i in range(n)]  # rows 0-19 in pairs: ten groups of two
    return [sent(rng.randint(1, 9)) for _ in range(n)], [sent(rng.randint(3, 9)) for _ in range(n)], sources


def test_item_statistics_give_back_the_scorers_corpus_scores() -> None:
    """Summed per-item counts reproduce pycocoevalcap's corpus BLEU-4 (grouped items, closest reference length,
    brevity penalty) and its ROUGE-L; per-example ROUGE reproduces rouge_scores."""
    import numpy as np
    preds, refs, sources = _texts(0, 60)
    everything = np.arange(50)[None, :]  # 60 rows in 50 nqg items
    stats = metrics.item_statistics("qg", preds, refs, sources)
    assert len(stats["bleu4"]) == 50
    got = {k: float(v[0]) for k, v in metrics.scores_of(stats, everything).items()}
    want = qg_scores(preds, refs, sources, meteor=False)
    assert got == pytest.approx({"bleu4": want["bleu4"], "rougeL": want["rougeL"]}, rel=1e-12, abs=1e-12)
    short = [p.split()[0] for p in preds]  # brevity penalty applies
    got = metrics.scores_of(metrics.item_statistics("qg", short, refs, sources), everything)["bleu4"][0]
    assert got == pytest.approx(qg_scores(short, refs, sources, meteor=False)["bleu4"], rel=1e-12, abs=1e-12)
    stats = metrics.item_statistics("rouge", preds, refs)
    got = {k: float(v[0]) for k, v in metrics.scores_of(stats, np.arange(60)[None, :]).items()}
    want = rouge_scores(preds, refs)
    assert got == pytest.approx({k: want[k] for k in ("rouge1", "rouge2", "rougeL")}, rel=1e-12)


def test_paired_bootstrap_of_a_file_against_itself_and_against_the_references() -> None:
    preds, refs, sources = _texts(1, 40)
    same = metrics.paired_bootstrap("qg", preds, preds, refs, sources, resamples=200)
    for c in same.values():
        assert c["delta"] == c["low"] == c["high"] == 0.0 and c["not_better"] == 1.0
    perfect = metrics.paired_bootstrap("qg", preds, refs, refs, None, resamples=200)
    assert perfect["bleu4"]["candidate"] == pytest.approx(100.0) and perfect["rougeL"]["candidate"] == pytest.approx(100.0)
    for c in perfect.values():
        assert 0 < c["low"] <= c["delta"] <= c["high"] and c["not_better"] == 0.0
    again = metrics.paired_bootstrap("qg", preds, refs, refs, None, resamples=200)
    other = metrics.paired_bootstrap("qg", preds, refs, refs, None, resamples=200, seed=1)
    assert again == perfect and other["bleu4"]["low"] != perfect["bleu4"]["low"]
    assert other["bleu4"]["delta"] == perfect["bleu4"]["delta"]  # the full-sample difference does not resample


def test_paired_bootstrap_draws_the_same_items_for_both_files() -> None:
    """Pairing: one resample (seed 0) scores both files on the same drawn items, so the difference equals the one
    computed by hand from numpy's draw."""
    import numpy as np
    preds, refs, _ = _texts(2, 30)
    other = preds[:15] + refs[15:]
    out = metrics.paired_bootstrap("rouge", preds, other, refs, resamples=1, seed=0)
    rows = np.random.default_rng(0).integers(0, 30, size=(1, 30))
    a, b = metrics.item_statistics("rouge", preds, refs), metrics.item_statistics("rouge", other, refs)
    delta = 100 * (b["rougeL"][rows].mean() - a["rougeL"][rows].mean())
    assert out["rougeL"]["low"] == pytest.approx(delta) and out["rougeL"]["high"] == pytest.approx(delta)
    with pytest.raises(ValueError, match="3 baseline predictions but 2 candidate"):
        metrics.paired_bootstrap("qg", preds[:3], preds[:2], refs[:3])
    with pytest.raises(ValueError, match="resamples must be >= 1"):
        metrics.paired_bootstrap("qg", preds, preds, refs, resamples=0)
