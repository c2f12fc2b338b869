"""Decoding strategies, kept apart from the model behind one small interface.

A :class:`Decoder` turns a padded batch of source ids into lists of generated ids. Autoregressive
decoders split into a *stepper* (how one token's distribution is computed: ERNIE-GEN infilling, or
typical previous-token feeding) and a *search* (greedy or beam) that only sees log-probabilities, so
both searches serve both steppers. Non-autoregressive decoders register in :data:`DECODERS` too.

Infilling step (ERNIE-GEN §3.3): the source is encoded once into a key/value cache; step i feeds
``[t_{i-1}, [ATTN]_i]``, reads the next-token distribution at [ATTN], appends only t_{i-1}'s keys and
values to the cache and drops the placeholder's.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .ernie_gen import encode_context, target_positions
from .masks import CONTEXT, PAD, WORD, Roles, attention_mask
from .model import PastSlot, Transformer


@dataclass
class DecodeOptions:
    """Search settings; defaults come from the task preset saved with the model."""

    num_beams: int = 1
    max_length: int = 64  # generated tokens, the end token included
    min_length: int = 1  # the end token is banned before this many tokens
    length_penalty: float = 1.0  # GNMT: score / ((5 + len) / 6) ** alpha (ERNIE-GEN, UniLM)
    no_repeat_ngram_size: int = 0
    banned_ids: list[int] = field(default_factory=list)
    # Non-autoregressive decoders
    iterations: int = 1
    length_beam: int = 1
    dedup: bool = False

    def __post_init__(self) -> None:
        for name in ("num_beams", "iterations", "length_beam"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_length < 1 or not 0 <= self.min_length <= self.max_length:
            raise ValueError(f"need 0 <= min_length <= max_length and max_length >= 1, got {self.min_length} and "
                             f"{self.max_length}")
        if self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}")
        if not math.isfinite(self.length_penalty):
            raise ValueError(f"length_penalty must be a finite number, got {self.length_penalty}")


class KVCache:
    """Preallocated per-layer keys/values plus the roles of the cached tokens.

    A step's tokens are written in place after the committed ones (:class:`PastSlot`); ``commit``
    keeps the first of them (the real token) and the next step overwrites the rest (placeholders).
    """

    def __init__(self, kv: list[tuple[torch.Tensor, torch.Tensor]], roles: Roles, capacity: int):
        b, h, t, d = kv[0][0].shape
        self.length = t
        self.k = [kv[0][0].new_zeros(b, h, capacity, d) for _ in kv]
        self.v = [kv[0][0].new_zeros(b, h, capacity, d) for _ in kv]
        for buf_k, buf_v, (k, v) in zip(self.k, self.v, kv):
            buf_k[:, :, :t], buf_v[:, :, :t] = k, v
        code = torch.full((b, capacity), PAD, dtype=torch.long, device=roles.code.device)
        index = torch.full_like(code, -1)
        code[:, :t], index[:, :t] = roles.code, roles.index
        self.roles = Roles(code, index)

    def past(self, new_tokens: int) -> tuple[list[PastSlot], Roles]:
        """Slots that will take ``new_tokens`` more keys, and the roles of the committed ones."""
        n = self.length
        if n + new_tokens > self.k[0].shape[2]:
            raise RuntimeError(f"KV cache full: {n} + {new_tokens} > capacity {self.k[0].shape[2]}")
        return ([PastSlot(k, v, n) for k, v in zip(self.k, self.v)],
                Roles(self.roles.code[:, :n], self.roles.index[:, :n]))

    def commit(self, roles: Roles, keep: int) -> None:
        """Keep the first ``keep`` tokens of the last step (already written by the layers)."""
        n = self.length
        self.roles.code[:, n:n + keep] = roles.code[:, :keep]
        self.roles.index[:, n:n + keep] = roles.index[:, :keep]
        self.length = n + keep

    def reorder(self, rows: torch.Tensor) -> None:
        self.k = [k.index_select(0, rows) for k in self.k]
        self.v = [v.index_select(0, rows) for v in self.v]
        self.roles = self.roles.select(rows)


class InfillingStepper:
    """ERNIE-GEN's infilling decoding over a key/value cache."""

    def __init__(self, model: Transformer, src_ids: torch.Tensor, src_len: torch.Tensor, max_length: int):
        self.model, self.src_len = model, src_len
        self.attn_id = model.attn_id
        _, kv, roles = encode_context(model, src_ids, src_len)
        self.cache = KVCache(kv, roles, src_ids.shape[1] + max_length + 1)  # +1: the step's placeholder
        self.step_no = 0

    def expand(self, k: int) -> None:
        self.src_len = self.src_len.repeat_interleave(k)
        self.cache.reorder(torch.arange(len(self.cache.k[0]), device=self.src_len.device).repeat_interleave(k))

    def reorder(self, rows: torch.Tensor) -> None:
        self.cache.reorder(rows)
        self.src_len = self.src_len[rows]

    def step(self, prev: torch.Tensor | None) -> torch.Tensor:
        """Log-probabilities (N, V) of target token ``step_no`` given the previous one."""
        i, n, dev = self.step_no, len(self.src_len), self.src_len.device
        tokens = [torch.full((n, 1), self.attn_id, device=dev)]
        code = [torch.full((n, 1), WORD, device=dev)]
        index = [torch.full((n, 1), i, device=dev)]
        if prev is not None:
            tokens.insert(0, prev[:, None])
            code.insert(0, torch.full((n, 1), CONTEXT, device=dev))
            index.insert(0, torch.full((n, 1), i - 1, device=dev))
        ids, new = torch.cat(tokens, 1), Roles(torch.cat(code, 1), torch.cat(index, 1))
        past, past_roles = self.cache.past(ids.shape[1])
        pos = self.src_len[:, None] + new.index
        types = torch.full_like(ids, self.model.target_type_id)
        hidden, _ = self.model(ids, pos, types, attention_mask(new, past_roles.cat(new)), past=past)
        if prev is not None:
            self.cache.commit(new, keep=1)
        self.step_no += 1
        return torch.log_softmax(self.model.logits(hidden[:, -1]).float(), -1)


class TypicalStepper(InfillingStepper):
    """Previous-token decoding for the typical-generation baseline: t_i read off t_{i-1}'s state."""

    def __init__(self, model: Transformer, src_ids: torch.Tensor, src_len: torch.Tensor, max_length: int):
        self.model, self.src_len = model, src_len
        hidden, kv, roles = encode_context(model, src_ids, src_len)
        self.first = hidden[torch.arange(len(src_len)), src_len - 1]  # the source's [SEP]
        self.cache = KVCache(kv, roles, src_ids.shape[1] + max_length + 1)  # +1: the step's placeholder
        self.step_no = 0

    def expand(self, k: int) -> None:
        super().expand(k)
        self.first = self.first.repeat_interleave(k, 0)

    def step(self, prev: torch.Tensor | None) -> torch.Tensor:
        i, n, dev = self.step_no, len(self.src_len), self.src_len.device
        if prev is None:
            h = self.first
        else:
            new = Roles(torch.full((n, 1), CONTEXT, device=dev), torch.full((n, 1), i - 1, device=dev))
            past, past_roles = self.cache.past(1)
            pos = target_positions(self.src_len, 1) + i - 1
            types = torch.full((n, 1), self.model.target_type_id, device=dev)
            hidden, _ = self.model(prev[:, None], pos, types, attention_mask(new, past_roles.cat(new)), past=past)
            self.cache.commit(new, keep=1)
            h = hidden[:, -1]
        self.step_no += 1
        return torch.log_softmax(self.model.logits(h).float(), -1)


def block_ngrams(logp: torch.Tensor, tokens: torch.Tensor, n: int) -> None:
    """Ban (in place, -inf) every token that would repeat an n-gram already in ``tokens`` (N, t)."""
    if n <= 0 or tokens.shape[1] < n:
        return
    windows = tokens.unfold(1, n, 1)  # (N, t-n+1, n)
    last = tokens[:, -(n - 1):] if n > 1 else tokens[:, :0]
    hit = (windows[:, :, : n - 1] == last[:, None, :]).all(-1)  # (N, t-n+1)
    rows, cols = hit.nonzero(as_tuple=True)
    logp[rows, windows[rows, cols, n - 1]] = float("-inf")


def _constrain(logp: torch.Tensor, tokens: torch.Tensor, step: int, eos: int, opts: DecodeOptions) -> torch.Tensor:
    if opts.banned_ids:
        logp[:, opts.banned_ids] = float("-inf")
    if step + 1 < opts.min_length:
        logp[:, eos] = float("-inf")
    block_ngrams(logp, tokens, opts.no_repeat_ngram_size)
    return logp


def gnmt_penalty(length: int, alpha: float) -> float:
    """Wu et al. (2016) length penalty, as ERNIE-GEN and UniLM use it."""
    return ((5.0 + length) / 6.0) ** alpha


def greedy_search(stepper, n: int, eos: int, opts: DecodeOptions) -> list[list[int]]:
    dev = stepper.src_len.device
    tokens = torch.zeros(n, 0, dtype=torch.long, device=dev)
    done = torch.zeros(n, dtype=torch.bool, device=dev)
    prev = None
    for step in range(opts.max_length):
        logp = _constrain(stepper.step(prev), tokens, step, eos, opts)
        if step == opts.max_length - 1:
            logp[:, :] = torch.where(torch.arange(logp.shape[1], device=dev) == eos, 0.0, float("-inf"))
        nxt = torch.where(done, eos, logp.argmax(-1))
        tokens = torch.cat([tokens, nxt[:, None]], 1)
        done |= nxt == eos
        if bool(done.all()):
            break
        prev = nxt
    return [_strip(row, eos) for row in tokens.tolist()]


def beam_search(stepper, n: int, eos: int, opts: DecodeOptions) -> list[list[int]]:
    """Batched beam search; a batch item stops once it holds ``num_beams`` finished hypotheses."""
    k, dev = opts.num_beams, stepper.src_len.device
    stepper.expand(k)
    scores = torch.full((n, k), float("-inf"), device=dev)
    scores[:, 0] = 0.0
    tokens = torch.zeros(n * k, 0, dtype=torch.long, device=dev)
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(n)]
    active = [True] * n
    prev = None
    for step in range(opts.max_length):
        logp = _constrain(stepper.step(prev), tokens, step, eos, opts)
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


def _strip(row: list[int], eos: int) -> list[int]:
    return row[: row.index(eos)] if eos in row else row


class Decoder:
    """Interface: ``decoder(model, src_ids, src_len, opts) -> list of token-id lists``."""

    name = "base"

    def __call__(self, model: Transformer, src_ids: torch.Tensor, src_len: torch.Tensor,
                 opts: DecodeOptions) -> list[list[int]]:
        raise NotImplementedError


class AutoregressiveDecoder(Decoder):
    def __init__(self, stepper_cls: type[InfillingStepper], name: str):
        self.stepper_cls, self.name = stepper_cls, name

    def __call__(self, model, src_ids, src_len, opts):
        eos = model.tokenizer.sep_token_id
        stepper = self.stepper_cls(model, src_ids, src_len, opts.max_length)
        search = greedy_search if opts.num_beams == 1 else beam_search
        return search(stepper, len(src_len), eos, opts)


DECODERS: dict[str, Callable[[], Decoder]] = {
    "infilling": lambda: AutoregressiveDecoder(InfillingStepper, "infilling"),
    "typical": lambda: AutoregressiveDecoder(TypicalStepper, "typical"),
}


def default_banned_ids(model: Transformer) -> list[int]:
    """Tokens a generator must never emit: padding, [CLS], [MASK], [UNK], the [ATTN] slot."""
    tok = model.tokenizer
    ids = {tok.pad_token_id, tok.cls_token_id, tok.mask_token_id, tok.unk_token_id,
           tok.convert_tokens_to_ids(model.settings.attn_token)}
    return sorted(i for i in ids if i is not None and i != tok.sep_token_id)


@torch.no_grad()
def decode_batches(model: Transformer, sources: Sequence[Sequence[int]], decoder: str | Decoder = "infilling",
                   batch_size: int = 32, opts: DecodeOptions | None = None, progress: bool = False,
                   skip: Collection[int] = ()) -> Iterator[tuple[list[int], list[list[int]]]]:
    """Decode token-id sources in length-sorted batches, yielding (input rows, ids) as each batch ends.

    The batches depend only on the source lengths and ``batch_size``; a batch whose rows are all in
    ``skip`` (finished by an interrupted run) is left out, so every other batch is decoded exactly as
    in an uninterrupted run.
    """
    from .batch import pad
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(decoder, str):
        if decoder not in DECODERS:
            from . import mist  # noqa: F401  (registers nar, mist-iter, mask-predict on import)
        if decoder not in DECODERS:
            raise ValueError(f"unknown decoder {decoder!r}; choose from {sorted(DECODERS)}")
        decoder = DECODERS[decoder]()
    opts = opts or DecodeOptions()
    if not opts.banned_ids:
        opts.banned_ids = default_banned_ids(model)
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


def generate_ids(model: Transformer, sources: Sequence[Sequence[int]], decoder: str | Decoder = "infilling",
                 batch_size: int = 32, opts: DecodeOptions | None = None,
                 progress: bool = False) -> list[list[int]]:
    """Decode token-id sources in length-sorted batches; results come back in input order."""
    out: list[list[int]] = [[] for _ in sources]
    for rows, ids in decode_batches(model, sources, decoder, batch_size, opts, progress):
        for i, x in zip(rows, ids):
            out[i] = x
    return out


METHOD_DECODERS = {"ernie-gen": "infilling", "typical": "typical", "nat": "nar", "mist": "nar"}


def options_from_settings(model: Transformer, **overrides) -> DecodeOptions:
    """Decoding options: the model's saved task defaults, then the caller's overrides."""
    s = model.settings
    base = {"num_beams": s.num_beams, "max_length": s.max_decode_len, "min_length": s.min_decode_len,
            "length_penalty": s.length_penalty, "no_repeat_ngram_size": s.no_repeat_ngram_size}
    unknown = set(overrides) - {f for f in DecodeOptions.__dataclass_fields__}
    if unknown:
        raise TypeError(f"unknown decoding options {sorted(unknown)}; known: {sorted(DecodeOptions.__dataclass_fields__)}")
    return DecodeOptions(**(base | {k: v for k, v in overrides.items() if v is not None}))


def encode_sources(model: Transformer, sources: Sequence[str]) -> list[list[int]]:
    """Tokenize raw sources as training did ([CLS] source [SEP], longest segment truncated)."""
    from .data import Example, encode_examples
    examples = [Example(source=s, target=None, row={}, where=f"input:{i + 1}") for i, s in enumerate(sources)]
    feats, stats = encode_examples(examples, model.tokenizer, model.settings.max_source_len, 2)
    if stats.source_truncated:
        import sys
        print(stats.summary(), file=sys.stderr)
    return [f.source_ids for f in feats]


def ids_to_text(model: Transformer, ids: Sequence[Sequence[int]]) -> list[str]:
    """Generated ids as text, the one detokenization every caller scores: without the tokenizer's
    clean-up, "rhine's" comes out as "rhine ' s" and loses BLEU against the references."""
    return [model.tokenizer.decode(x, skip_special_tokens=True, clean_up_tokenization_spaces=True).strip()
            for x in ids]


def iter_generate_text(model: Transformer, sources: Sequence[str], decoder: str | None = None,
                       batch_size: int = 32, progress: bool = False, skip: Collection[int] = (),
                       **options) -> Iterator[tuple[list[int], list[str]]]:
    """(input rows, strings) batch by batch (see :func:`decode_batches`), for writers that save as they go."""
    decoder = decoder or METHOD_DECODERS.get(model.settings.method, "infilling")
    opts = options_from_settings(model, **options)
    for rows, ids in decode_batches(model, encode_sources(model, sources), decoder, batch_size, opts, progress,
                                    skip):
        yield rows, ids_to_text(model, ids)


def generate_text(model: Transformer, sources: Sequence[str], decoder: str | None = None, batch_size: int = 32,
                  progress: bool = False, **options) -> list[str]:
    """Strings in, strings out; the decoder defaults to the one matching the training method."""
    out = [""] * len(sources)
    for rows, texts in iter_generate_text(model, sources, decoder, batch_size, progress, **options):
        for i, text in zip(rows, texts):
            out[i] = text
    return out
