"""Decoding's building blocks, shared by every method: options, the decoder interface, the searches.

A :class:`Decoder` turns a padded batch of source ids into lists of generated ids. Autoregressive
decoders split into a *stepper* (how one token's distribution is computed: ERNIE-GEN infilling, or
typical previous-token feeding, both in ernie_gen.py) and a *search* (greedy or beam) that only sees
log-probabilities, so both searches serve every stepper. Non-autoregressive decoders (nar.py and
the methods' own modules) implement the interface directly. :func:`decode_in_batches` runs any
decoder over many sources; decoders are looked up by name in :mod:`erniegen.registry`.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .batch import pad
from .network import Network


# ELMER's hard-exit entropy threshold δ (nats): the paper tries {0, 0.25, 0.5, 0.75, 1.0} and picks
# 0.5 on validation (Li et al., 2022, §4)
EXIT_THRESHOLD = 0.5
EXIT_THRESHOLD_KEY = "exit_threshold"  # settings.extra: a model's own default δ (elmer.build_objective)


@dataclass
class DecodeOptions:
    """Search settings; defaults come from the task preset saved with the model."""

    num_beams: int = 1
    max_length: int = 64  # generated tokens, the end token included
    min_length: int = 1  # the end token is banned before this many tokens
    length_penalty: float = 1.0  # GNMT: score / ((5 + len) / 6) ** alpha (ERNIE-GEN, UniLM)
    no_repeat_ngram_size: int = 0
    # the longest run of one token an output may hold (0: any): 2 stops `##od ##od ##od`, which no
    # squad_qg question has outside punctuation (4 of 8,699 references, all "...", "____")
    max_token_run: int = 0
    # no word said twice in a row (`when did there there a …`), which max_token_run 2 allows and a run of
    # punctuation (`` ` ` `` is how SQuAD's quotes tokenize) must not be caught by, nor a word piece twice in a
    # row (`thermodynaynamic`, `##yna ##yna`: the copy head copying a piece again): see word_token_mask
    block_repeated_words: bool = False
    banned_ids: list[int] = field(default_factory=list)
    word_tokens: torch.Tensor | None = None  # (V,) bool: what block_repeated_words blocks (word_token_mask)
    # Non-autoregressive decoders
    iterations: int = 1
    length_beam: int = 1
    dedup: bool = False
    exit_threshold: float = EXIT_THRESHOLD  # ELMER hard exit: a slot exits once its entropy is below this
    # ELMER hard exit by the model's fitted exit gate instead of the entropy rule (elmer.ExitGate): a slot exits
    # once the gate's probability that its prediction is already the last layer's is at least this
    exit_gate: float | None = None

    # what a user sets (generate's flags, serve's request fields); banned_ids and word_tokens are the library's own
    USER_SET = ("num_beams", "max_length", "min_length", "length_penalty", "no_repeat_ngram_size", "max_token_run",
                "block_repeated_words", "iterations", "length_beam", "dedup", "exit_threshold", "exit_gate")

    def __post_init__(self) -> None:
        for name in ("num_beams", "iterations", "length_beam"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_length < 1 or not 0 <= self.min_length <= self.max_length:
            raise ValueError(f"need 0 <= min_length <= max_length and max_length >= 1, got {self.min_length} and "
                             f"{self.max_length}")
        for name in ("no_repeat_ngram_size", "max_token_run"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.exit_threshold >= 0:
            raise ValueError(f"exit_threshold must be >= 0, got {self.exit_threshold}")
        if self.exit_gate is not None and not 0 < self.exit_gate <= 1:
            raise ValueError(f"exit_gate must be in (0, 1], got {self.exit_gate}")
        if not math.isfinite(self.length_penalty):
            raise ValueError(f"length_penalty must be a finite number, got {self.length_penalty}")

    @property
    def repeat_blocked(self) -> torch.Tensor | None:
        """The (V,) tokens no output may hold twice in a row, or None when block_repeated_words is off."""
        if not self.block_repeated_words:
            return None
        if self.word_tokens is None:
            raise ValueError("block_repeated_words needs word_tokens (erniegen.search.word_token_mask)")
        return self.word_tokens


class Stepper(Protocol):
    """What a search needs of an autoregressive method: one step's log-probabilities, and its
    per-hypothesis state copied (``expand``: each row k times) or reordered (beam search)."""

    src_len: torch.Tensor

    def step(self, prev: torch.Tensor | None) -> torch.Tensor: ...

    def expand(self, k: int) -> None: ...

    def reorder(self, rows: torch.Tensor) -> None: ...


def block_ngrams(logp: torch.Tensor, tokens: torch.Tensor, n: int) -> None:
    """Ban (in place, -inf) every token that would repeat an n-gram already in ``tokens`` (N, t)."""
    if n <= 0 or tokens.shape[1] < n:
        return
    windows = tokens.unfold(1, n, 1)  # (N, t-n+1, n)
    last = tokens[:, -(n - 1):] if n > 1 else tokens[:, :0]
    hit = (windows[:, :, : n - 1] == last[:, None, :]).all(-1)  # (N, t-n+1)
    rows, cols = hit.nonzero(as_tuple=True)
    logp[rows, windows[rows, cols, n - 1]] = float("-inf")


def block_runs(logp: torch.Tensor, tokens: torch.Tensor, n: int) -> None:
    """Ban (in place, -inf) the token that would make a run of more than ``n`` identical tokens in ``tokens``."""
    if n <= 0 or tokens.shape[1] < n:
        return
    last = tokens[:, -n:]
    rows = (last == last[:, :1]).all(-1).nonzero(as_tuple=True)[0]
    logp[rows, last[rows, 0]] = float("-inf")


def block_repeated_words(logp: torch.Tensor, tokens: torch.Tensor, words: torch.Tensor) -> None:
    """Ban (in place, -inf) the last token of ``tokens`` where ``words`` (V,) bool marks it a word token: a
    word right after itself says it twice (or starts a longer word with it); a word piece right after itself
    spells a word that is not one (`##yna ##yna`)."""
    if tokens.shape[1] == 0:
        return
    last = tokens[:, -1]
    rows = words[last].nonzero(as_tuple=True)[0]
    logp[rows, last[rows]] = float("-inf")


class Constraints:
    """What ``opts`` forbids at a step; its id lists become tensors once per search, not at every step."""

    def __init__(self, opts: DecodeOptions, eos: int, device: torch.device):
        self.opts, self.eos = opts, eos
        self.banned = torch.tensor(opts.banned_ids, dtype=torch.long, device=device)
        words = opts.repeat_blocked
        self.words = None if words is None else words.to(device)

    def __call__(self, logp: torch.Tensor, tokens: torch.Tensor, step: int) -> torch.Tensor:
        """``logp`` with banned ids, a too-early end and the repeats the options forbid at -inf."""
        opts = self.opts
        if len(self.banned):
            logp.index_fill_(1, self.banned, float("-inf"))
        if step + 1 < opts.min_length:
            logp[:, self.eos] = float("-inf")
        block_ngrams(logp, tokens, opts.no_repeat_ngram_size)
        block_runs(logp, tokens, opts.max_token_run)
        if self.words is not None:
            block_repeated_words(logp, tokens, self.words)
        return logp


def gnmt_penalty(length: int, alpha: float) -> float:
    """Wu et al. (2016) length penalty, as ERNIE-GEN and UniLM use it."""
    return ((5.0 + length) / 6.0) ** alpha


def greedy_search(stepper: Stepper, n: int, eos: int, opts: DecodeOptions) -> list[list[int]]:
    dev = stepper.src_len.device
    constrain = Constraints(opts, eos, dev)
    tokens = torch.full((n, opts.max_length), eos, dtype=torch.long, device=dev)
    done = torch.zeros(n, dtype=torch.bool, device=dev)
    prev = None
    for step in range(opts.max_length - 1):  # the last position is the end token, already in ``tokens``
        logp = constrain(stepper.step(prev), tokens[:, :step], step)
        nxt = logp.argmax(-1).masked_fill_(done, eos)
        tokens[:, step] = nxt
        done |= nxt == eos
        if bool(done.all()):
            break
        prev = nxt
    return [until_end(row, eos) for row in tokens.tolist()]


def beam_search(stepper: Stepper, n: int, eos: int, opts: DecodeOptions) -> list[list[int]]:
    """Batched beam search; a batch item stops once it holds ``num_beams`` finished hypotheses."""
    k, dev = opts.num_beams, stepper.src_len.device
    constrain = Constraints(opts, eos, dev)
    stepper.expand(k)
    scores = torch.full((n, k), float("-inf"), device=dev)
    scores[:, 0] = 0.0
    tokens = torch.zeros(n * k, 0, dtype=torch.long, device=dev)
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(n)]
    active = [True] * n
    prev = None
    for step in range(opts.max_length):
        logp = constrain(stepper.step(prev), tokens, step)
        if step == opts.max_length - 1:  # out of room: every live beam must end here
            logp = torch.where(torch.arange(logp.shape[1], device=dev) == eos, logp[:, eos:eos + 1], float("-inf"))
        v = logp.shape[1]
        cand = (scores[:, :, None] + logp.view(n, k, v)).view(n, k * v)
        top, idx = cand.topk(2 * k, dim=1)
        top_l, idx_l = top.tolist(), idx.tolist()
        rows, next_tok, next_score = [], [], []
        for b in range(n):
            beams_b: list[tuple[int, int, float]] = []
            if active[b]:
                for s, j in zip(top_l[b], idx_l[b]):
                    if s == float("-inf"):
                        break
                    beam, tok = divmod(j, v)
                    if tok == eos:
                        seq = tokens[b * k + beam].tolist()
                        finished[b].append((s / gnmt_penalty(len(seq) + 1, opts.length_penalty), seq))
                    else:
                        beams_b.append((beam, tok, s))
                    if len(beams_b) == k:
                        break
                if len(finished[b]) >= k:
                    active[b] = False
            while len(beams_b) < k:  # finished or exhausted rows keep dummy beams that never win
                beams_b.append((0, eos, float("-inf")))
            for beam, tok, s in beams_b:
                rows.append(b * k + beam)
                next_tok.append(tok)
                next_score.append(s)
        if not any(active):
            break
        rows_t = torch.tensor(rows, device=dev)
        prev = torch.tensor(next_tok, device=dev)
        scores = torch.tensor(next_score, device=dev).view(n, k)
        tokens = torch.cat([tokens[rows_t], prev[:, None]], 1)
        stepper.reorder(rows_t)
    return [max(f, key=lambda x: x[0])[1] if f else [] for f in finished]


def until_end(row: list[int], eos: int) -> list[int]:
    """The ids before the first end token."""
    return row[: row.index(eos)] if eos in row else row


class Decoder:
    """Interface: ``decoder(model, src_ids, src_len, opts) -> list of token-id lists``."""

    name = "base"

    def __call__(self, model: Network, src_ids: torch.Tensor, src_len: torch.Tensor,
                 opts: DecodeOptions) -> list[list[int]]:
        raise NotImplementedError


class AutoregressiveDecoder(Decoder):
    """A stepper (built per batch) driven by greedy search, or beam search when ``num_beams`` > 1."""

    def __init__(self, stepper_cls: Callable[[Network, torch.Tensor, torch.Tensor, int], Stepper], name: str):
        self.stepper_cls, self.name = stepper_cls, name

    def __call__(self, model: Network, src_ids: torch.Tensor, src_len: torch.Tensor,
                 opts: DecodeOptions) -> list[list[int]]:
        eos = model.tokenizer.sep_token_id
        stepper = self.stepper_cls(model, src_ids, src_len, opts.max_length)
        search = greedy_search if opts.num_beams == 1 else beam_search
        return search(stepper, len(src_len), eos, opts)


def default_banned_ids(model: Network) -> list[int]:
    """Tokens a generator must never emit: padding, [CLS], [MASK], [UNK], the [ATTN] slot, the answer marker."""
    tok = model.tokenizer
    ids = {tok.pad_token_id, tok.cls_token_id, tok.mask_token_id, tok.unk_token_id,
           tok.convert_tokens_to_ids(model.settings.attn_token)}
    if model.settings.answer_marker is not None:
        ids.add(tok.convert_tokens_to_ids(model.settings.answer_marker))
    return sorted(i for i in ids if i is not None and i != tok.sep_token_id)


def word_token_mask(model: Network) -> torch.Tensor:
    """(V,) bool, the tokens block_repeated_words blocks right after themselves: words and ``##`` word pieces
    whose letters (the piece's after ``##``) number two or more and begin with a letter, and ``##`` pieces of one
    ASCII letter (`planet ##s ##s ##s`, an ELMER output); so not punctuation (`_____` is said), digits,
    ``[special]`` tokens or single-character words, as a CJK character is one token and may well come twice (谢谢).
    A piece twice in a row is rare in real words: in 3 of 18,599 training targets (squad_qg_sent's, XSum's,
    squad_qg_sentence's first 9,000: `cytotoxins`, `alibaba`), a one-letter piece in none of 27,298 (the three and
    squad_qg's). Made once per tokenizer: reading a fast tokenizer's vocabulary takes ~0.2 s."""
    return _word_tokens(model.tokenizer, model.config.vocab_size)


def is_word_token(token: str) -> bool:
    """Whether ``block_repeated_words`` keeps ``token`` from following itself (:func:`word_token_mask`)."""
    letters = token.removeprefix("##")
    if len(letters) == 1:
        return token.startswith("##") and letters.isascii() and letters.isalpha()
    return bool(letters) and letters[0].isalpha()


@functools.lru_cache(maxsize=8)
def _word_tokens(tokenizer, vocab_size: int) -> torch.Tensor:
    ids = [i for t, i in tokenizer.get_vocab().items() if i < vocab_size and is_word_token(t)]
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    mask[torch.tensor(ids, dtype=torch.long)] = True
    return mask


def options_from_settings(model: Network, **overrides) -> DecodeOptions:
    """Decoding options: the model's saved task defaults, then the caller's overrides."""
    s = model.settings
    base = {"num_beams": s.num_beams, "max_length": s.max_decode_len, "min_length": s.min_decode_len,
            "length_penalty": s.length_penalty, "no_repeat_ngram_size": s.no_repeat_ngram_size,
            "max_token_run": s.max_token_run, "block_repeated_words": s.block_repeated_words,
            "exit_threshold": s.extra.get(EXIT_THRESHOLD_KEY, EXIT_THRESHOLD)}
    unknown = set(overrides) - {f for f in DecodeOptions.__dataclass_fields__}
    if unknown:
        raise TypeError(f"unknown decoding options {sorted(unknown)}; known: {sorted(DecodeOptions.__dataclass_fields__)}")
    return with_model_parts(model, DecodeOptions(**(base | {k: v for k, v in overrides.items() if v is not None})))


def with_model_parts(model: Network, opts: DecodeOptions) -> DecodeOptions:
    """``opts`` with the fields that come from the model's vocabulary (banned ids, the word mask) filled where unset."""
    if not opts.banned_ids:
        opts.banned_ids = default_banned_ids(model)
    if opts.block_repeated_words and opts.word_tokens is None:
        opts.word_tokens = word_token_mask(model)
    return opts


@torch.no_grad()
def decode_in_batches(model: Network, sources: Sequence[Sequence[int]], decoder: Decoder, batch_size: int = 32,
                      opts: DecodeOptions | None = None, progress: bool = False,
                      skip: Collection[int] = ()) -> Iterator[tuple[list[int], list[list[int]]]]:
    """Decode token-id sources in length-sorted batches, yielding (input rows, ids) as each batch ends.

    The batches depend only on the source lengths and ``batch_size``; a batch whose rows are all in
    ``skip`` (finished by an interrupted run) is left out, so every other batch is decoded exactly as
    in an uninterrupted run. Without ``opts`` the model's saved settings apply (:func:`options_from_settings`),
    as they do for ``erniegen generate``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    opts = options_from_settings(model) if opts is None else with_model_parts(model, opts)
    model.eval()
    order = sorted(range(len(sources)), key=lambda i: -len(sources[i]))
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    chunks = [c for c in chunks if not all(i in skip for i in c)]
    if progress:
        from tqdm.auto import tqdm
        chunks = tqdm(chunks, desc=f"generate ({decoder.name})", unit="batch")
    for chunk in chunks:
        src, src_len = pad([sources[i] for i in chunk], model.config.pad_token_id)
        yield chunk, decoder(model, src.to(model.device), src_len.to(model.device), opts)


def in_input_order(batches: Iterator[tuple[list[int], list[list[int]]]], n: int) -> list[list[int]]:
    """The ids of :func:`decode_in_batches`' batches put back in the order of its ``n`` sources."""
    out: list[list[int]] = [[] for _ in range(n)]
    for rows, ids in batches:
        for i, x in zip(rows, ids):
            out[i] = x
    return out
