"""What every encoder-based non-autoregressive method shares (NAT, MIST, later ELMER): slots, length
prediction, slot masking for training (all / partial / GLAT), and the single-pass decoder.

Input layout on the shared network, ``[CLS] X [SEP]`` followed by target slots:

* the source ids (already ``[CLS] X [SEP]``) have the SOURCE role, token type 0 and positions
  ``0 .. len(source)-1``; the source attends only to itself;
* target slot i has the NAR role, token type ``model.target_type_id`` and position ``len(source) + i``;
  slots attend to the source and to every slot. Padding is never visible.

Because the source never attends to the slots, it is encoded once (:func:`erniegen.passes.encode_source`)
and every pass over the slots (:func:`erniegen.passes.slot_pass`) runs against its keys/values as
``past`` -- the same numbers as one joint pass, computed once per source however many lengths or
iterations are tried.

Length convention: a target of n ids *including its end [SEP]* (the ids ``collate_pairs`` gives)
has length label n, so the length head scores 0..L_max with L_max = the task's ``max_target_len``
(saved in ``model.settings.extra["max_target_len"]``). At inference a predicted length L means L-1
generated tokens followed by the end [SEP]: the last slot is fixed to [SEP] and [SEP] is banned in
the others, so outputs have exactly L-1 tokens (before ``dedup``). The length head reads the mean of
the source's non-pad final hidden states (sentence encoders such as MiniLM are trained for mean
pooling; their [CLS] state is not), and only the plain source -- never a target -- at test time.

Slot masking in training (``mask_mode``): ``all`` puts [MASK] in every slot; ``partial`` masks a
uniform count of slots, as CMLM trains; ``glat`` is glancing training (Qian et al., 2021), which
MIST trains with: a first pass without gradients predicts every slot, then ⌊f_ratio · d⌋ reference
tokens are revealed at slots drawn uniformly, d being the Hamming distance between that prediction
and the reference, and the loss falls on the slots left masked.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .losses import smoothed_cross_entropy
from .masks import SOURCE
from .network import Network
from .passes import EncodedSource, encode_source, slot_pass
from .search import DecodeOptions, Decoder, default_banned_ids, until_end

MASK_MODES = ("all", "partial", "glat")
GLAT_F_RATIO = 0.5  # the share of the first pass's wrong tokens that GLAT reveals (MIST's setting)


# ---- length prediction -------------------------------------------------------------------------


class LengthHead(nn.Module):
    """Classifies the target length 0..max_len from the mean of the source's hidden states."""

    def __init__(self, hidden_size: int, max_len: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, max_len + 1)

    @property
    def max_len(self) -> int:
        return self.proj.out_features - 1

    def forward(self, hidden: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``hidden`` (B,T,H), ``valid`` (B,T) bool -> length logits (B, max_len+1)."""
        w = valid.to(hidden.dtype)[:, :, None]
        return self.proj((hidden * w).sum(1) / w.sum(1).clamp_min(1.0))


def length_head(model: Network, max_target_len: int | None = None) -> LengthHead:
    """The model's length head, attached (and restored from the checkpoint) on first use.

    Its size comes from ``max_target_len`` (training) or the value saved with the model. Without
    ``max_target_len`` the checkpoint must hold a trained head: decoding with a fresh one would
    read lengths off random weights.
    """
    saved = model.settings.extra.get("max_target_len")
    n = max_target_len if max_target_len is not None else saved
    if "length" in model.extras:
        head = model.extras["length"]
        if n is not None and head.max_len != n:
            raise ValueError(f"the model's length head covers 0..{head.max_len}, not 0..{n} (max_target_len)")
        return head
    if max_target_len is None and not model.has_saved_extra("length"):
        raise ValueError(f"this model was trained with method {model.settings.method!r} and has no length head; "
                         f"non-autoregressive decoders need a model fine-tuned with a non-autoregressive "
                         f"--method, such as nat or mist")
    if n is None:
        raise ValueError("max_target_len is unknown: the length head cannot be sized")
    bias = model.saved_extra("length").get("proj.bias")
    if bias is not None and bias.numel() != int(n) + 1:
        raise ValueError(f"this checkpoint's length head covers target lengths 0..{bias.numel() - 1}: fine-tune it "
                         f"with --max-target-len {bias.numel() - 1}, or start from a checkpoint without a length head")
    model.settings.extra = model.settings.extra | {"max_target_len": int(n)}
    return model.add_extra("length", LengthHead(model.config.hidden_size, int(n)))


def length_labels(tgt_len: torch.Tensor, max_len: int) -> torch.Tensor:
    """Length class of each target: its id count, end [SEP] included."""
    if int(tgt_len.max()) > max_len:
        raise ValueError(f"a target has {int(tgt_len.max())} ids (end [SEP] included) but the length head "
                         f"covers 0..{max_len}; raise max_target_len")
    return tgt_len


def candidate_lengths(logits: torch.Tensor, k: int, lo: int, hi: torch.Tensor) -> torch.Tensor:
    """The k best lengths in ``[lo, hi[b]]`` per row, best first, (B, k).

    Rows with fewer than k allowed lengths repeat their best one (an exact tie never wins).
    """
    n = torch.arange(logits.shape[1], device=logits.device)[None, :]
    scores = logits.float().masked_fill((n < lo) | (n > hi[:, None]), float("-inf"))
    top, idx = scores.topk(min(k, logits.shape[1]), dim=1)
    return torch.where(torch.isfinite(top), idx, idx[:, :1])


def position_limit(model: Network) -> int:
    """Positions a row may use (RoBERTa's table starts after its padding offset)."""
    return model.config.max_position_embeddings - model.config.position_offset


# ---- slots -------------------------------------------------------------------------------------


def slot_valid(slot_len: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """(N, W) bool: which slots are real (the rest is padding)."""
    width = int(slot_len.max()) if width is None else width
    return torch.arange(width, device=slot_len.device)[None, :] < slot_len[:, None]


def masked_slots(slot_len: torch.Tensor, mask_id: int) -> torch.Tensor:
    """All-[MASK] slot ids; padding slots get id 0 (their PAD role hides them anyway)."""
    return torch.where(slot_valid(slot_len), mask_id, 0)


def predict_slots(model: Network, hidden: torch.Tensor, slot_len: torch.Tensor, where: torch.Tensor,
                  eos: int, banned: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Argmax ids and their log-probs at the slots ``where`` (zeros elsewhere), both (N,W).

    Only those slots are projected to the vocabulary. The last slot of a row is its end [SEP]; the
    others may be neither [SEP] nor a banned id.
    """
    n, w = where.shape
    last = (torch.arange(w, device=hidden.device)[None, :] == (slot_len - 1)[:, None])[where]
    logp = torch.log_softmax(model.logits(hidden[where]).float(), -1)
    if banned:
        logp[:, list(banned)] = float("-inf")
    end_lp = logp[:, eos].clone()
    logp[:, eos] = float("-inf")
    best_lp, best = logp.max(-1)
    tokens = torch.zeros(n, w, dtype=torch.long, device=hidden.device)
    scores = torch.zeros(n, w, device=hidden.device)
    tokens[where] = torch.where(last, eos, best)
    scores[where] = torch.where(last, end_lp, best_lp)
    return tokens, scores


def first_pass(model: Network, source: EncodedSource, lengths: torch.Tensor,
               banned: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every slot [MASK], every slot predicted: ids and log-probs (N,W) of one pass over the slots."""
    hidden = slot_pass(model, source, masked_slots(lengths, model.tokenizer.mask_token_id), lengths)
    return predict_slots(model, hidden, lengths, slot_valid(lengths), model.tokenizer.sep_token_id, banned)


def rows_of(ids: torch.Tensor, lengths: torch.Tensor, drop_last: int = 0) -> list[list[int]]:
    """Padded rows back to id lists, minus ``drop_last`` trailing ids (the end [SEP] slot)."""
    return [row[: n - drop_last] for row, n in zip(ids.tolist(), lengths.tolist())]


def random_slots(valid: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """(N,W) bool: per row, ``count[n]`` of its valid slots, drawn uniformly without replacement."""
    scores = torch.rand(valid.shape, device=valid.device).masked_fill(~valid, 2.0)
    rank = scores.argsort(1).argsort(1)
    return rank < count[:, None]


def glancing_reveal(predicted: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
                    f_ratio: float, among: torch.Tensor | None = None) -> torch.Tensor:
    """GLAT: the slots that show their reference token, ⌊f_ratio · d⌋ per row drawn uniformly among
    the valid slots (or only ``among`` them, at most all of those), d = the Hamming distance between
    ``predicted`` and ``target`` on the valid slots."""
    distance = ((predicted != target) & valid).sum(1)
    among = valid if among is None else among & valid
    return random_slots(among, torch.minimum((distance.double() * f_ratio).floor().long(), among.sum(1)))


# ---- training ----------------------------------------------------------------------------------


def checked_f_ratio(mask_mode: str, f_ratio: float | None, modes: Sequence[str]) -> float | None:
    """Check a method's ``mask_mode`` against the ``modes`` it offers and its GLAT ``f_ratio``; returns the
    ratio to use (GLAT_F_RATIO when glat is asked for without one)."""
    if mask_mode not in modes:
        raise ValueError(f"mask_mode must be one of {tuple(modes)}, got {mask_mode!r}")
    if f_ratio is not None and mask_mode != "glat":
        raise ValueError("f_ratio is only used with mask_mode: glat")
    if mask_mode == "glat" and f_ratio is None:
        f_ratio = GLAT_F_RATIO
    if f_ratio is not None and not 0.0 <= f_ratio <= 1.0:
        raise ValueError(f"f_ratio must be in [0, 1], got {f_ratio}")
    return f_ratio


@dataclass
class NarOptions:
    """``method_options`` every NAR method takes (label smoothing comes from the task preset)."""

    mask_mode: str = "all"  # all: every slot [MASK]; partial: a uniform count, as CMLM; glat: glancing (nat, mist)
    f_ratio: float | None = None  # glat: share of the first pass's wrong tokens revealed; None: GLAT_F_RATIO
    length_weight: float = 0.1
    label_smoothing: float = 0.1

    def __post_init__(self) -> None:
        self.f_ratio = checked_f_ratio(self.mask_mode, self.f_ratio, MASK_MODES)
        if self.length_weight < 0:
            raise ValueError(f"length_weight must be >= 0, got {self.length_weight}")


class NarObjective(nn.Module):
    """The parts of a NAR objective that do not depend on the method: the length loss, which slots
    are masked (``mask_mode``), the glancing first pass and the loss on the masked slots."""

    def __init__(self, model: Network, cfg: NarOptions):
        super().__init__()
        self.model, self.cfg = model, cfg
        tok = model.tokenizer
        if tok is None:
            raise ValueError("NAR training needs the model's tokenizer (for [MASK], [CLS] and [SEP])")
        self.mask_id, self.eos = tok.mask_token_id, tok.sep_token_id
        self.banned = default_banned_ids(model)
        self.max_len = length_head(model).max_len  # the head lives on the model, so it is saved with it

    def length_loss(self, hidden: torch.Tensor, source: EncodedSource, tgt_len: torch.Tensor) -> torch.Tensor:
        logits = self.model.extras["length"](hidden, source.roles.code == SOURCE)
        return F.cross_entropy(logits.float(), length_labels(tgt_len, self.max_len))

    @property
    def glancing(self) -> bool:
        """GLAT runs in training only: evaluation predicts every slot."""
        return self.cfg.mask_mode == "glat" and self.training

    @torch.no_grad()
    def first_pass(self, source: EncodedSource, tgt_len: torch.Tensor) -> torch.Tensor:
        """Argmax ids (N,W) at all-[MASK] slots of the true lengths, end [SEP] last.

        Runs without gradients, in the model's current (train/eval) mode.
        """
        return first_pass(self.model, source, tgt_len, self.banned)[0]

    def _masked(self, valid: torch.Tensor, target: torch.Tensor | None = None,
                predicted: torch.Tensor | None = None) -> torch.Tensor:
        """Slots to predict: all (and always in evaluation); ``partial``: a uniform count 1..n of random
        slots per row; ``glat``: those not revealed given the first pass's ``predicted`` ids."""
        if self.cfg.mask_mode == "all" or not self.training:
            return valid
        if self.cfg.mask_mode == "glat":
            return valid & ~glancing_reveal(predicted, target, valid, self.cfg.f_ratio)
        n = valid.sum(1)
        return random_slots(valid, (torch.rand(n.shape, device=n.device) * n).long() + 1)

    def _loss(self, hidden: torch.Tensor, where: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return smoothed_cross_entropy(self.model.logits(hidden[where]), labels[where], self.cfg.label_smoothing)


# ---- decoding ----------------------------------------------------------------------------------


def average_logprob(scores: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean log-probability of each row's first ``lengths[b]`` slots (end [SEP] included)."""
    return torch.where(slot_valid(lengths, scores.shape[1]), scores, 0.0).sum(1) / lengths


def select_length_beam(tokens: torch.Tensor, scores: torch.Tensor, lengths: torch.Tensor, k: int,
                       eos: int) -> list[list[int]]:
    """Of each source's k consecutive candidates, the one with the best average log-prob (first on ties)."""
    best = average_logprob(scores, lengths).view(-1, k).argmax(1)
    rows = (torch.arange(len(best), device=best.device) * k + best).tolist()
    return [until_end(tokens[r, : int(lengths[r])].tolist(), eos) for r in rows]


def dedup_consecutive(ids: Sequence[int]) -> list[int]:
    """Drop tokens equal to their predecessor (NAR's typical repetition; post-processing only)."""
    return [t for i, t in enumerate(ids) if i == 0 or t != ids[i - 1]]


def drop_repeated_words(ids: Sequence[int], words: torch.Tensor) -> list[int]:
    """Drop a token equal to its predecessor where ``words`` (the (V,) mask of
    :func:`erniegen.search.word_token_mask`) marks it: a word said twice in a row is said once.

    Slots predicted at once say a word twice in a row far more often than a left-to-right search (320 of 682
    one-pass questions of qg-nat-kd-r), mostly where the length head gave a question more slots than its words.
    Dropping the second beat giving it the slot's second-best word (BENCHMARKS.md section 7).
    """
    out: list[int] = []
    for t in ids:
        if not (out and t == out[-1] and bool(words[t])):
            out.append(t)
    return out


def finish_row(ids: Sequence[int], opts: DecodeOptions) -> list[int]:
    """A NAR output row as returned: consecutive repeats dropped with ``dedup``, else repeated words with
    ``block_repeated_words``."""
    if opts.dedup:
        return dedup_consecutive(ids)
    words = opts.repeat_blocked
    return list(ids) if words is None else drop_repeated_words(ids, words)


class NarDecoder(Decoder):
    """Single pass: length head -> all-[MASK] slots -> argmax, over ``opts.length_beam`` lengths.

    Only the source reaches a decoder; lengths come from the length head, never from a reference.
    Lengths are limited to ``[max(1, min_length), max_length]`` (end [SEP] included, as for the
    autoregressive decoders) and to the position table; ``num_beams``, ``length_penalty``,
    ``no_repeat_ngram_size`` and ``max_token_run`` are autoregressive settings and are ignored;
    ``dedup`` and ``block_repeated_words`` act on the chosen output (:func:`finish_row`). Iterative decoders
    override :meth:`refine`.
    """

    name = "nar"

    @torch.no_grad()
    def __call__(self, model: Network, src_ids: torch.Tensor, src_len: torch.Tensor,
                 opts: DecodeOptions) -> list[list[int]]:
        source, hidden = encode_source(model, src_ids, src_len)
        head = length_head(model)
        hi = (position_limit(model) - src_len).clamp(max=min(opts.max_length, head.max_len))
        lo = max(1, opts.min_length)
        if bool((hi < lo).any()):
            raise ValueError(f"a source of {int(src_len.max())} tokens leaves no room for {lo} target slots "
                             f"in {position_limit(model)} positions")
        lengths = candidate_lengths(head(hidden, source.roles.code == SOURCE), opts.length_beam, lo, hi)
        k = lengths.shape[1]
        lengths = lengths.flatten()
        sources = [row for row in rows_of(src_ids, src_len) for _ in range(k)]
        tokens, scores = self.refine(model, source.repeat(k), sources, lengths, opts)
        out = select_length_beam(tokens, scores, lengths, k, model.tokenizer.sep_token_id)
        return [finish_row(x, opts) for x in out]

    def refine(self, model: Network, source: EncodedSource, sources: list[list[int]], lengths: torch.Tensor,
               opts: DecodeOptions) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and their log-probs (N, W) for N = sources x candidate lengths."""
        return first_pass(model, source, lengths, opts.banned_ids)
