"""Decoding: cache equals recomputation, beam 1 equals greedy, batch equals one-by-one, beam logic."""
import dataclasses
import math
import types

import pytest
import torch

from erniegen.decoding import (DecodeOptions, InfillingStepper, TypicalStepper, beam_search, block_ngrams,
                               generate_ids, gnmt_penalty, greedy_search)
from conftest import copying
from erniegen.ernie_gen import copy_source, encode_context, next_token_log_probs, placeholder_pass
from erniegen.masks import WORD, target_roles
from erniegen.search import (block_repeated_words, block_runs, is_word_token, options_from_settings,
                             word_token_mask)

SOURCES = [[4, 10, 11, 12, 5], [4, 20, 21, 5], [4, 30, 31, 32, 33, 34, 5]]
NO_EOS = DecodeOptions(max_length=8, min_length=8)  # fixed length: random weights would stop anywhere


@pytest.fixture(params=["plain", "copy"])
def model(request, tiny_model):
    """The tiny model as trained without and with copying (a copy head whose attention is far from uniform
    and whose gate is open to both sides)."""
    if request.param == "copy":
        copying(tiny_model, gate_bias=0.0)
    return tiny_model


def _recompute_greedy(model, src, steps, typical=False):
    """Reference decoder without any cache: re-run the whole multi-flow pass every step."""
    src_ids, src_len = torch.tensor([src]), torch.tensor([len(src)])
    out, logps = [], []
    for i in range(steps):
        prefix = torch.tensor([out], dtype=torch.long).view(1, -1)
        plen = torch.tensor([len(out)])
        hidden, kv, roles = encode_context(model, src_ids, src_len, prefix, plen)
        if typical:
            h = hidden[:, len(src) - 1] if i == 0 else hidden[:, -1]
        else:
            q = target_roles(WORD, torch.tensor([1]), 1, offset=i)
            h = placeholder_pass(model, model.attn_id, src_len, q, kv, roles)[:, 0]
        logp = next_token_log_probs(model, h[:, None], copy_source(model, kv, src_ids, src_len))[:, 0]
        logp[:, 5] = float("-inf")  # the end token, banned as min_length does
        logps.append(logp)
        out.append(int(logp.argmax()))
    return out, torch.cat(logps)


@pytest.mark.parametrize("decoder", ["infilling", "typical"])
def test_cached_decoding_equals_full_recomputation(model, decoder):
    typical = decoder == "typical"
    for src in SOURCES:
        expected, _ = _recompute_greedy(model, src, 8, typical)
        got = generate_ids(model, [src], decoder, opts=DecodeOptions(max_length=9, min_length=9,
                                                                          banned_ids=[0]))
        assert got[0][:8] == expected


def test_step_logprobs_equal_one_training_pass(model):
    """Given the tokens it chose, the cached decoder's distributions equal the training flows'."""
    tiny_model = model
    src = SOURCES[0]
    tokens, ref_logp = _recompute_greedy(tiny_model, src, 6)
    stepper = InfillingStepper(tiny_model, torch.tensor([src]), torch.tensor([len(src)]), 8)
    prev = None
    for i, tok in enumerate(tokens):
        logp = stepper.step(prev)
        logp[:, 5] = float("-inf")
        assert torch.allclose(logp, ref_logp[i:i + 1], atol=1e-5)
        prev = torch.tensor([tok])
    # and one multi-flow pass over all of them at once, as training runs it
    src_ids, src_len = torch.tensor([src]), torch.tensor([len(src)])
    t = torch.tensor([tokens])
    _, kv, roles = encode_context(tiny_model, src_ids, src_len, t, torch.tensor([6]))
    h = placeholder_pass(tiny_model, tiny_model.attn_id, src_len, target_roles(WORD, torch.tensor([6]), 6), kv, roles)
    full = next_token_log_probs(tiny_model, h, copy_source(tiny_model, kv, src_ids, src_len))[0]
    full[:, 5] = float("-inf")
    assert torch.allclose(full, ref_logp, atol=1e-5)


@pytest.mark.parametrize("decoder", ["infilling", "typical"])
def test_beam_one_equals_greedy(model, decoder):
    tiny_model = model
    greedy = generate_ids(tiny_model, SOURCES, decoder, opts=DecodeOptions(num_beams=1, max_length=10))
    src_ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(s) for s in SOURCES], batch_first=True)
    src_len = torch.tensor([len(s) for s in SOURCES])
    opts = DecodeOptions(num_beams=1, max_length=10, banned_ids=[0, 1, 3, 4, 6])
    cls = InfillingStepper if decoder == "infilling" else TypicalStepper
    with torch.no_grad():
        g = greedy_search(cls(tiny_model, src_ids, src_len, 10), 3, 5, opts)
        b = beam_search(cls(tiny_model, src_ids, src_len, 10), 3, 5, opts)
    assert g == b
    assert greedy == g


@pytest.mark.parametrize("beams", [1, 4])
def test_batched_equals_one_by_one(model, beams):
    tiny_model = model
    opts = dict(num_beams=beams, max_length=10, min_length=3, no_repeat_ngram_size=2)
    batched = generate_ids(tiny_model, SOURCES, "infilling", batch_size=3, opts=DecodeOptions(**opts))
    single = [generate_ids(tiny_model, [s], "infilling", opts=DecodeOptions(**opts))[0] for s in SOURCES]
    assert batched == single
    assert any(len(x) > 0 for x in batched)


def test_no_repeat_ngram_and_min_length(tiny_model):
    out = generate_ids(tiny_model, SOURCES, "infilling", opts=DecodeOptions(max_length=12, min_length=12,
                                                                            no_repeat_ngram_size=2))
    for seq in out:
        bigrams = list(zip(seq, seq[1:]))
        assert len(bigrams) == len(set(bigrams))
        assert len(seq) >= 11  # the end token is banned until the 12th token


def test_block_ngrams_by_hand():
    logp = torch.zeros(1, 10)
    block_ngrams(logp, torch.tensor([[1, 2, 3, 1, 2]]), 3)  # "1 2" seen before, followed by 3
    assert logp[0, 3] == float("-inf") and torch.isfinite(logp[0, [0, 1, 2, 4]]).all()


def test_block_runs_by_hand():
    logp = torch.zeros(4, 10)
    block_runs(logp, torch.tensor([[1, 4, 4], [4, 1, 4], [7, 7, 7], [2, 9, 9]]), 2)
    assert (logp == float("-inf")).nonzero().tolist() == [[0, 4], [2, 7], [3, 9]]
    block_runs(logp, torch.tensor([[3, 3, 3]] * 4), 0)  # 0: any run
    assert (logp == float("-inf")).sum() == 3


class RepeatingStepper:
    """A fake model that always prefers the token it just produced (0 = end, never likely)."""

    def __init__(self, n):
        self.src_len = torch.zeros(n, dtype=torch.long)
        self.last = torch.full((n,), 1)

    def expand(self, k):
        self.src_len, self.last = self.src_len.repeat_interleave(k), self.last.repeat_interleave(k)

    def reorder(self, rows):
        self.src_len, self.last = self.src_len[rows], self.last[rows]

    def step(self, prev):
        if prev is not None:
            self.last = prev
        probs = torch.tensor([0.01, 0.2, 0.15, 0.1]).repeat(len(self.last), 1)
        probs[torch.arange(len(self.last)), self.last] = 0.54
        return probs.log()


@pytest.mark.parametrize("search", ["greedy", "beam"])
def test_max_token_run_holds_in_greedy_and_beam(search):
    run = (lambda opts: greedy_search(RepeatingStepper(2), 2, 0, opts)) if search == "greedy" else (
        lambda opts: beam_search(RepeatingStepper(2), 2, 0, dataclasses.replace(opts, num_beams=3)))
    # max_length counts the end token: five words each
    assert run(DecodeOptions(max_length=6, min_length=6)) == [[1] * 5] * 2
    assert run(DecodeOptions(max_length=6, min_length=6, max_token_run=2)) == [[1, 1, 2, 2, 1]] * 2
    assert run(DecodeOptions(max_length=6, min_length=6, max_token_run=1)) == [[1, 2, 1, 2, 1]] * 2


def test_block_repeated_words_by_hand():
    words = torch.zeros(10, dtype=torch.bool)
    words[[4, 7]] = True  # 4 and 7 are words; 9 (say `` ` ``) is not
    logp = torch.zeros(4, 10)
    block_repeated_words(logp, torch.tensor([[1, 4], [4, 1], [9, 9], [2, 7]]), words)
    assert (logp == float("-inf")).nonzero().tolist() == [[0, 4], [3, 7]]
    block_repeated_words(logp, torch.zeros(4, 0, dtype=torch.long), words)  # nothing generated yet
    assert (logp == float("-inf")).sum() == 2


@pytest.mark.parametrize("search", ["greedy", "beam"])
def test_block_repeated_words_holds_in_greedy_and_beam(search):
    run = (lambda opts: greedy_search(RepeatingStepper(2), 2, 0, opts)) if search == "greedy" else (
        lambda opts: beam_search(RepeatingStepper(2), 2, 0, dataclasses.replace(opts, num_beams=3)))
    five = DecodeOptions(max_length=6, min_length=6, block_repeated_words=True)
    words = lambda *ids: torch.tensor([i in ids for i in range(4)])  # noqa: E731
    # 1 is a word, so never twice in a row; 2 is not (punctuation, say), so it may run on
    assert run(dataclasses.replace(five, word_tokens=words(1))) == [[1, 2, 2, 2, 2]] * 2
    assert run(dataclasses.replace(five, word_tokens=words(1, 2, 3))) == [[1, 2, 1, 2, 1]] * 2
    assert run(dataclasses.replace(five, word_tokens=words(1), block_repeated_words=False)) == [[1] * 5] * 2
    with pytest.raises(ValueError, match="word_tokens"):
        run(five)


def test_word_tokens_are_words_and_pieces_of_two_or_more_letters_and_one_letter_pieces(tiny_model):
    vocab = tiny_model.tokenizer.get_vocab()
    mask = word_token_mask(tiny_model)
    assert mask.shape == (tiny_model.config.vocab_size,) and mask is word_token_mask(tiny_model)  # made once
    ids = set(mask.nonzero().flatten().tolist())
    assert {vocab[w] for w in ("the", "steam", "an", "oxygen", "##ing", "##ed", "##s")} <= ids
    # single-character words (a CJK character is one), punctuation and special tokens are not
    assert not ids & {vocab[t] for t in ("a", "s", "?", ",", "'", "[CLS]", "[SEP]", "[unused0]")}
    assert [t for t in ("a", "##a", "##ab", "ab", "##謝", "謝", "謝謝", "##_", "_", "##1", "12", "", "##")
            if is_word_token(t)] == ["##a", "##ab", "ab", "謝謝"]


def test_block_repeated_words_mends_a_word_broken_by_a_repeated_piece(tmp_path):
    """`thermodynaynamic` (the ``make demo`` model's, BENCHMARKS.md) is `the ##rm ##od ##yna ##yna ##mic`."""
    from transformers import BertTokenizerFast
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cycle",
                                                   "##rm", "##od", "##yna", "##mic"]) + "\n")
    tok = BertTokenizerFast.from_pretrained(str(tmp_path))
    model = types.SimpleNamespace(tokenizer=tok, config=types.SimpleNamespace(vocab_size=len(tok)))
    assert tok.tokenize("thermodynamic thermodynaynamic") == ["the", "##rm", "##od", "##yna", "##mic",
                                                              "the", "##rm", "##od", "##yna", "##yna", "##mic"]
    logp = torch.zeros(1, len(tok))
    block_repeated_words(logp, torch.tensor([tok.convert_tokens_to_ids(["the", "##rm", "##od", "##yna"])]),
                         word_token_mask(model))
    assert (logp == float("-inf")).nonzero()[:, 1].tolist() == [tok.convert_tokens_to_ids("##yna")]


def test_options_from_settings_read_block_repeated_words(tiny_model):
    assert options_from_settings(tiny_model).block_repeated_words is False
    tiny_model.settings = dataclasses.replace(tiny_model.settings, block_repeated_words=True)
    opts = options_from_settings(tiny_model)
    assert opts.block_repeated_words and opts.word_tokens is word_token_mask(tiny_model)
    assert options_from_settings(tiny_model, block_repeated_words=False).block_repeated_words is False
    # end to end on the tiny model, its head biased toward "steam": unblocked, it says "steam steam …"
    vocab = tiny_model.tokenizer.get_vocab()
    with torch.no_grad():
        tiny_model.head.bias[vocab["steam"]] = 50.0
    twelve = dataclasses.replace(opts, max_length=12, min_length=12)
    for beams in (1, 3):
        free = generate_ids(tiny_model, SOURCES, "infilling",
                            opts=dataclasses.replace(twelve, num_beams=beams, block_repeated_words=False))
        assert free == [[vocab["steam"]] * 11] * len(SOURCES)
        out = generate_ids(tiny_model, SOURCES, "infilling", opts=dataclasses.replace(twelve, num_beams=beams))
        assert all(seq[::2] == [vocab["steam"]] * 6 for seq in out)  # every other word, and only there
        assert all(t != vocab["steam"] for seq in out for t in seq[1::2])


def test_decoding_without_options_reads_the_saved_settings(tiny_model):
    """A caller of the library who passes no options gets what ``erniegen generate`` gives: the saved settings."""
    vocab = tiny_model.tokenizer.get_vocab()
    with torch.no_grad():
        tiny_model.head.bias[vocab["steam"]] = 50.0
    assert generate_ids(tiny_model, SOURCES[:1]) == [[vocab["steam"]] * 63]  # defaults: 64 tokens, no rule
    tiny_model.settings = dataclasses.replace(tiny_model.settings, max_decode_len=5, block_repeated_words=True)
    out = generate_ids(tiny_model, SOURCES)
    assert out == generate_ids(tiny_model, SOURCES, opts=options_from_settings(tiny_model))
    assert all(len(seq) <= 4 and seq[0] == vocab["steam"] and vocab["steam"] not in seq[1:2] for seq in out)


class ScriptedStepper:
    """A fake model whose next-token log-probs depend on the prefix, to check beam search by hand.

    Vocabulary: 0 = end, 1 = 'a', 2 = 'b'. Greedy takes 'a' (0.6) then has only weak options;
    'b' (0.4) is followed by a sure end, so beam search must find 'b <end>'.
    """

    def __init__(self, n):
        self.src_len = torch.zeros(n, dtype=torch.long)
        self.prefixes = [[] for _ in range(n)]

    def expand(self, k):
        self.src_len = self.src_len.repeat_interleave(k)
        self.prefixes = [list(p) for p in self.prefixes for _ in range(k)]

    def reorder(self, rows):
        self.prefixes = [list(self.prefixes[r]) for r in rows.tolist()]
        self.src_len = self.src_len[rows]

    def step(self, prev):
        if prev is not None:
            for p, t in zip(self.prefixes, prev.tolist()):
                p.append(t)
        table = {(): [0.0, 0.6, 0.4], (1,): [0.3, 0.35, 0.35], (2,): [1.0, 0.0, 0.0]}
        rows = [table.get(tuple(p), [1.0, 0.0, 0.0]) for p in self.prefixes]
        return torch.tensor(rows).clamp_min(1e-9).log()


def test_beam_search_by_hand():
    opts = DecodeOptions(num_beams=2, max_length=4, length_penalty=0.0)
    assert beam_search(ScriptedStepper(1), 1, 0, opts) == [[2]]  # 0.4 * 1.0 beats 0.6 * 0.35
    # greedy: a (0.6), then a/b tie at 0.35 -> a; then end.
    assert greedy_search(ScriptedStepper(1), 1, 0, DecodeOptions(max_length=4)) == [[1, 1]]


def test_gnmt_length_penalty_changes_the_winner():
    assert gnmt_penalty(1, 1.0) == 1.0 and math.isclose(gnmt_penalty(7, 1.0), 2.0)
    # 'a a <end>' (3 tokens, log 0.6*0.35*1) vs 'b <end>' (2 tokens, log 0.4): alpha large favours long
    long = math.log(0.6 * 0.35) / gnmt_penalty(3, 5.0)
    short = math.log(0.4) / gnmt_penalty(2, 5.0)
    assert long > short
    out = beam_search(ScriptedStepper(1), 1, 0, DecodeOptions(num_beams=2, max_length=4, length_penalty=5.0))
    assert len(out[0]) == 2


def test_kv_cache_writes_in_place_commits_only_kept_tokens_and_refuses_overflow():
    from erniegen.decoding import KVCache
    from erniegen.masks import CONTEXT, source_roles
    k = torch.arange(2 * 1 * 3 * 2, dtype=torch.float).view(2, 1, 3, 2)
    cache = KVCache([(k, k + 100)], source_roles(torch.tensor([3, 2]), 3), capacity=5)
    slots, roles = cache.past(2)
    assert cache.length == 3 and roles.code.shape == (2, 3)
    new = torch.full((2, 1, 2, 2), -1.0)
    keys, values = slots[0].extend(new, new)
    assert keys.shape == (2, 1, 5, 2) and torch.equal(keys[:, :, :3], k) and torch.equal(values[:, :, 3:], new)
    step = target_roles(CONTEXT, torch.tensor([2, 2]), 2)
    cache.commit(step, keep=1)  # the second new token (a placeholder) is dropped
    assert cache.length == 4 and cache.roles.code[:, 3].tolist() == [CONTEXT, CONTEXT]
    assert cache.roles.code[:, 4].tolist() == [0, 0]
    with pytest.raises(RuntimeError, match="KV cache full"):
        cache.past(2)
    cache.reorder(torch.tensor([1, 1]))
    assert torch.equal(cache.k[0][0], cache.k[0][1]) and cache.roles.code[0].tolist() == cache.roles.code[1].tolist()


@pytest.mark.parametrize("decoder", ["infilling", "typical"])
def test_step_mask_equals_the_mask_built_over_the_whole_cache(tiny_model, monkeypatch, decoder):
    """A step builds only its own tokens' block of the mask; the rest must be what attention_mask gives."""
    from erniegen.masks import attention_mask
    from erniegen.passes import KVCache
    step_mask, calls = KVCache.step_mask, []

    def checked(cache, new, own=None):
        got = step_mask(cache, new, own)
        _, committed = cache.past(0)
        assert torch.equal(got, attention_mask(new, committed.cat(new)))
        calls.append(1)
        return got

    monkeypatch.setattr(KVCache, "step_mask", checked)
    for beams in (1, 2):  # a padded batch, and beams reordering the cache
        generate_ids(tiny_model, SOURCES, decoder, opts=DecodeOptions(num_beams=beams, max_length=6, min_length=6))
    assert len(calls) >= 8
