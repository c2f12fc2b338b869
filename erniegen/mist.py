"""MIST (Jiang et al., AAAI 2022): non-autoregressive generation trained with mixup self-training.

Input layout on the shared Transformer, ``[CLS] X [SEP]`` followed by target slots:

* the source ids (already ``[CLS] X [SEP]``) have the SOURCE role, token type 0 and positions
  ``0 .. len(source)-1``; the source attends only to itself;
* target slot i has the NAR role, token type ``model.target_type_id`` and position ``len(source) + i``;
  slots attend to the source and to every slot. Padding is never visible.

Because the source never attends to the slots, it is encoded once (:func:`encode_source`) and every
pass over the slots (:func:`slot_pass`) runs against its keys/values as ``past`` -- the same numbers as
one joint pass, computed once per source however many lengths or iterations are tried.

Length convention: a target of n ids *including its end [SEP]* (the ids ``collate_pairs`` gives)
has length label n, so the length head scores 0..L_max with L_max = the task's ``max_target_len``
(saved in ``model.settings.extra["max_target_len"]``). At inference a predicted length L means L-1
generated tokens followed by the end [SEP]: the last slot is fixed to [SEP] and [SEP] is banned in
the others, so outputs have exactly L-1 tokens (before ``dedup``). The length head reads the mean of
the source's non-pad final hidden states (sentence encoders such as MiniLM are trained for mean
pooling; their [CLS] state is not), and only the plain source -- never a target -- at test time.

MIST (``method: mist``): each step a no-grad first pass predicts a pseudo target Y_p at all-[MASK]
slots of the true lengths; the model is then also trained on ``[CLS] Y_p [SEP] X [SEP]`` (one
bidirectional SOURCE segment) + slots, so loss = L_NAT + L_MIST + w * L_length. If the pseudo target,
source and slots do not fit the position table, the pseudo target is cut from its end first, and the
source text only when even an empty pseudo target does not fit (:func:`mist_source`).

Static mixing (the paper's ablation): pseudo targets are produced once, by a trained model, and read
from a ``pseudo_ids`` batch field. From the command line, train a model first (``--method nat`` or
``mist``, output DIR), then::

    # static.yaml
    method_options: {mixing: static, pseudo_from: DIR/best}   # or DIR/checkpoint-last

    erniegen finetune --method mist --config static.yaml --train ... --output ...

``finetune`` then calls :func:`add_static_pseudo_targets`, which loads DIR, decodes every training
source once with single-pass NAR (predicted lengths) and stores the ids with the features.

Decoders (registered in :data:`erniegen.decoding.DECODERS`): ``nar`` (single pass), ``mist-iter``
(feed the previous output back as pseudo target, ``opts.iterations`` passes) and ``mask-predict``
(Ghazvininejad et al. 2019, ``opts.iterations`` = T). ``opts.length_beam`` decodes the top-k lengths
side by side and keeps the best average log-probability. ``opts.dedup`` drops consecutive duplicate
tokens afterwards; it changes the text that was scored, so callers report it separately.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .batch import pad
from .data import Features, TaskPreset
from .decoding import DECODERS, DecodeOptions, Decoder, _strip, default_banned_ids, generate_ids, options_from_settings
from .ernie_gen import encode_context, target_positions
from .masks import NAR, SOURCE, Roles, attention_mask, target_roles
from .model import KV, Transformer

MIXINGS = ("dynamic", "none", "static")
MASK_MODES = ("all", "partial")
OPTION_KEYS = ("mixing", "mask_mode", "length_weight", "pseudo_from")


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


def length_head(model: Transformer, max_target_len: int | None = None) -> LengthHead:
    """The model's length head, attached (and restored from the checkpoint) on first use.

    Its size comes from ``max_target_len`` (training) or the value saved with the model. Without
    ``max_target_len`` the model must have been trained with nat/mist, so the head is a trained one.
    """
    saved = model.settings.extra.get("max_target_len")
    n = max_target_len if max_target_len is not None else saved
    if "length" in model.extras:
        head = model.extras["length"]
        if n is not None and head.max_len != n:
            raise ValueError(f"the model's length head covers 0..{head.max_len}, not 0..{n} (max_target_len)")
        return head
    if max_target_len is None and model.settings.method not in ("nat", "mist"):
        raise ValueError(f"this model was trained with method {model.settings.method!r} and has no length head; "
                         f"non-autoregressive decoders need a model fine-tuned with --method nat or mist")
    if n is None:
        raise ValueError("max_target_len is unknown: the length head cannot be sized")
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


def position_limit(model: Transformer) -> int:
    """Positions a row may use (RoBERTa's table starts after its padding offset)."""
    return model.config.max_position_embeddings - model.config.position_offset


# ---- passes ------------------------------------------------------------------------------------


@dataclass
class EncodedSource:
    """A source's per-layer keys/values and key roles: the ``past`` of every slot pass over it."""

    kv: list[KV]
    roles: Roles
    length: torch.Tensor  # (B,) true lengths; slot i sits at position length + i

    def repeat(self, k: int) -> "EncodedSource":
        """Each row k times in a row (one copy per candidate length)."""
        rows = torch.arange(len(self.length), device=self.length.device).repeat_interleave(k)
        return EncodedSource([(a[rows], b[rows]) for a, b in self.kv], self.roles.select(rows), self.length[rows])


def encode_source(model: Transformer, src_ids: torch.Tensor, src_len: torch.Tensor
                  ) -> tuple[EncodedSource, torch.Tensor]:
    """Encode the source segment once; returns its cache and final hidden states (for the length head)."""
    hidden, kv, roles = encode_context(model, src_ids, src_len)
    return EncodedSource(kv, roles, src_len), hidden


def slot_roles(slot_len: torch.Tensor, width: int) -> Roles:
    """NAR roles of right-padded target slots: every slot sees the source and all slots."""
    return target_roles(NAR, slot_len, width)


def slot_pass(model: Transformer, source: EncodedSource, slot_ids: torch.Tensor,
              slot_len: torch.Tensor) -> torch.Tensor:
    """Hidden states (N,W,H) of target slots run against the cached source."""
    width = slot_ids.shape[1]
    roles = slot_roles(slot_len, width)
    # padding slots are invisible and unread; position 0 keeps them inside the table
    pos = target_positions(source.length, width).masked_fill(roles.code != NAR, 0)
    types = torch.full_like(slot_ids, model.target_type_id)
    hidden, _ = model(slot_ids, pos, types, attention_mask(roles, source.roles.cat(roles)), past=source.kv)
    return hidden


def slot_valid(slot_len: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """(N, W) bool: which slots are real (the rest is padding)."""
    width = int(slot_len.max()) if width is None else width
    return torch.arange(width, device=slot_len.device)[None, :] < slot_len[:, None]


def masked_slots(slot_len: torch.Tensor, mask_id: int) -> torch.Tensor:
    """All-[MASK] slot ids; padding slots get id 0 (their PAD role hides them anyway)."""
    return torch.where(slot_valid(slot_len), mask_id, 0)


def predict_slots(model: Transformer, hidden: torch.Tensor, slot_len: torch.Tensor, where: torch.Tensor,
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


def mist_source(pseudo: Sequence[int], source: Sequence[int], room: int, cls_id: int, sep_id: int) -> list[int]:
    """``[CLS] Y_p [SEP] X [SEP]`` from a pseudo target and a ``[CLS] X [SEP]`` source, in ``room`` ids.

    The pseudo target is cut from its end first; X only when even an empty pseudo target does not fit.
    """
    if room < 3:
        raise ValueError(f"no room for a pseudo target and source: {room} positions left")
    x = list(source[1:-1])
    y = list(pseudo)[: max(0, room - 3 - len(x))]
    x = x[: room - 3 - len(y)]
    return [cls_id, *y, sep_id, *x, sep_id]


def mist_batch(model: Transformer, pseudo: Sequence[Sequence[int]], sources: Sequence[Sequence[int]],
               slot_len: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded MIST sources, each fitted so that it and its slots stay inside the position table."""
    tok, limit = model.tokenizer, position_limit(model)
    rows = [mist_source(p, s, limit - n, tok.cls_token_id, tok.sep_token_id)
            for p, s, n in zip(pseudo, sources, slot_len.tolist())]
    ids, lens = pad(rows, model.config.pad_token_id)
    return ids.to(slot_len.device), lens.to(slot_len.device)


def _rows(ids: torch.Tensor, lengths: torch.Tensor, drop_last: int = 0) -> list[list[int]]:
    """Padded rows back to id lists, minus ``drop_last`` trailing ids (the end [SEP] slot)."""
    return [row[: n - drop_last] for row, n in zip(ids.tolist(), lengths.tolist())]


# ---- training ----------------------------------------------------------------------------------


@dataclass
class MistConfig:
    """``method_options`` of ``--method nat|mist`` (label smoothing comes from the task preset)."""

    mixing: str = "dynamic"  # dynamic (MIST) | none (plain NAT) | static (pseudo_ids from a trained model)
    mask_mode: str = "all"  # all: every slot [MASK]; partial: a uniform count of slots, as CMLM trains
    length_weight: float = 0.1
    pseudo_from: str | None = None  # static: the trained model folder that writes the pseudo targets
    label_smoothing: float = 0.1

    def __post_init__(self) -> None:
        if self.mixing not in MIXINGS:
            raise ValueError(f"mixing must be one of {MIXINGS}, got {self.mixing!r}")
        if self.mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {self.mask_mode!r}")
        if self.length_weight < 0:
            raise ValueError(f"length_weight must be >= 0, got {self.length_weight}")
        if self.pseudo_from is not None and self.mixing != "static":
            raise ValueError("pseudo_from is only used with mixing: static")


class MistObjective(nn.Module):
    """``forward(**batch)`` -> named losses of NAT (``mixing: none``) or MIST training.

    Build it with :func:`build_mist_objective`, which attaches the length head first.
    """

    def __init__(self, model: Transformer, cfg: MistConfig):
        super().__init__()
        self.model, self.cfg = model, cfg
        tok = model.tokenizer
        if tok is None:
            raise ValueError("NAT/MIST training needs the model's tokenizer (for [MASK], [CLS] and [SEP])")
        self.mask_id, self.eos = tok.mask_token_id, tok.sep_token_id
        self.banned = default_banned_ids(model)
        self.max_len = length_head(model).max_len  # the head lives on the model, so it is saved with it

    def forward(self, src_ids: torch.Tensor, src_len: torch.Tensor, tgt_ids: torch.Tensor, tgt_len: torch.Tensor,
                pseudo_ids: torch.Tensor | None = None, pseudo_len: torch.Tensor | None = None,
                **ignored) -> dict[str, torch.Tensor]:
        model = self.model
        valid = slot_valid(tgt_len, tgt_ids.shape[1])
        source, hidden = encode_source(model, src_ids, src_len)
        length_logits = model.extras["length"](hidden, source.roles.code == SOURCE)
        loss_length = F.cross_entropy(length_logits.float(), length_labels(tgt_len, self.max_len))
        masked = self._masked(valid)
        slots = torch.where(masked, self.mask_id, tgt_ids)
        loss_nat = self._loss(slot_pass(model, source, slots, tgt_len), masked, tgt_ids)
        loss = loss_nat + self.cfg.length_weight * loss_length
        n_tokens = src_len.sum() + tgt_len.sum()
        out = {"loss_nat": loss_nat.detach(), "loss_length": loss_length.detach()}
        if self.cfg.mixing != "none":
            if self.cfg.mixing == "dynamic":
                pseudo = self.pseudo_targets(source, tgt_len)
                n_tokens = n_tokens + tgt_len.sum()
            elif pseudo_ids is None or pseudo_len is None:
                raise ValueError("mixing: static needs pseudo_ids/pseudo_len in the batch; see "
                                 "erniegen.mist.add_static_pseudo_targets")
            else:
                pseudo = _rows(pseudo_ids, pseudo_len)
            mixed_ids, mixed_len = mist_batch(model, pseudo, _rows(src_ids, src_len), tgt_len)
            mixed, _ = encode_source(model, mixed_ids, mixed_len)
            loss_mist = self._loss(slot_pass(model, mixed, slots, tgt_len), masked, tgt_ids)
            out["loss_mist"] = loss_mist.detach()
            loss = loss + loss_mist
            n_tokens = n_tokens + mixed_len.sum() + tgt_len.sum()
        return out | {"loss": loss, "num_tokens": n_tokens}

    @torch.no_grad()
    def pseudo_targets(self, source: EncodedSource, tgt_len: torch.Tensor) -> list[list[int]]:
        """MIST's first pass: argmax at all-[MASK] slots of the true lengths, end [SEP] dropped.

        Runs without gradients, in the model's current (train/eval) mode.
        """
        hidden = slot_pass(self.model, source, masked_slots(tgt_len, self.mask_id), tgt_len)
        tokens, _ = predict_slots(self.model, hidden, tgt_len, slot_valid(tgt_len), self.eos, self.banned)
        return _rows(tokens, tgt_len, drop_last=1)

    def _masked(self, valid: torch.Tensor) -> torch.Tensor:
        """Slots to predict: all, or (training, ``partial``) a uniform count 1..n of random slots per row."""
        if self.cfg.mask_mode == "all" or not self.training:
            return valid
        n = valid.sum(1)
        count = (torch.rand(n.shape, device=n.device) * n).long() + 1
        scores = torch.rand(valid.shape, device=valid.device).masked_fill(~valid, 2.0)
        rank = scores.argsort(1).argsort(1)
        return rank < count[:, None]

    def _loss(self, hidden: torch.Tensor, where: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.model.logits(hidden[where]).float()
        return F.cross_entropy(logits, labels[where], label_smoothing=self.cfg.label_smoothing)


def build_mist_objective(method: str, model: Transformer, preset: TaskPreset, options: dict) -> MistObjective:
    """The objective of ``--method nat|mist``, checking ``method_options`` (unknown keys are an error).

    ``nat`` = NAT loss + length loss; ``mist`` adds mixup self-training per ``mixing`` (default
    dynamic; ``none`` is the ablation that trains exactly as ``nat``).
    """
    if method not in ("nat", "mist"):
        raise ValueError(f"build_mist_objective handles nat and mist, not {method!r}")
    unknown = sorted(set(options) - set(OPTION_KEYS))
    if unknown:
        raise ValueError(f"unknown {method} method_options {unknown}; valid keys: {list(OPTION_KEYS)}")
    mixing = options.get("mixing", "dynamic" if method == "mist" else "none")
    if method == "nat" and mixing != "none":
        raise ValueError(f"--method nat trains without mixing (got mixing: {mixing}); use --method mist")
    cfg = MistConfig(**(options | {"mixing": mixing, "label_smoothing": preset.label_smoothing}))
    length_head(model, preset.max_target_len)
    return MistObjective(model, cfg)


@dataclass
class MixedFeatures(Features):
    """Features plus the static pseudo target that ``collate_pairs`` turns into ``pseudo_ids``."""

    pseudo_ids: list[int] = field(default_factory=list)


def make_static_pseudo_targets(model: Transformer, features: Sequence, batch_size: int = 32,
                               progress: bool = False) -> list[list[int]]:
    """Single-pass NAR outputs (predicted lengths) of a trained model for each feature's source."""
    sources = [_field(f, "source_ids") for f in features]
    opts = options_from_settings(model, length_beam=1, iterations=1, dedup=False)
    return generate_ids(model, sources, "nar", batch_size=batch_size, opts=opts, progress=progress)


def add_static_pseudo_targets(features: Sequence, options: dict) -> list[Features]:
    """For ``mixing: static``: features with ``pseudo_ids`` from the model at ``pseudo_from``; else unchanged.

    Every process decodes the whole training set (outputs are deterministic, so ranks agree).
    """
    if options.get("mixing") != "static":
        return list(features)
    if not options.get("pseudo_from"):
        raise ValueError("mixing: static needs pseudo_from: DIR, a model trained with --method nat or mist")
    teacher = Transformer.from_pretrained(options["pseudo_from"])
    if torch.cuda.is_available():
        teacher.to(torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))))
    from .train import is_main_process
    # decoding the whole training set takes minutes: show it (on the main process only)
    pseudo = make_static_pseudo_targets(teacher, features, progress=is_main_process())
    return [MixedFeatures(_field(f, "source_ids"), _field(f, "target_ids"), p) for f, p in zip(features, pseudo)]


def _field(item, name: str):
    return item[name] if isinstance(item, dict) else getattr(item, name)


# ---- decoding ----------------------------------------------------------------------------------


def remask_count(n_tokens, t: int, iterations: int):
    """Mask-predict's linear decay: tokens re-masked at iteration t (0-based) of T (ints or tensors)."""
    return n_tokens * (iterations - t) // iterations


def lowest_confidence(scores: torch.Tensor, allowed: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Per row, the ``count[b]`` allowed slots with the lowest scores (ties: leftmost first)."""
    order = scores.masked_fill(~allowed, float("inf")).argsort(dim=1, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device)
                                            .expand_as(order).contiguous())
    return (rank < count[:, None]) & allowed


def average_logprob(scores: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean log-probability of each row's first ``lengths[b]`` slots (end [SEP] included)."""
    return torch.where(slot_valid(lengths, scores.shape[1]), scores, 0.0).sum(1) / lengths


def select_length_beam(tokens: torch.Tensor, scores: torch.Tensor, lengths: torch.Tensor, k: int,
                       eos: int) -> list[list[int]]:
    """Of each source's k consecutive candidates, the one with the best average log-prob (first on ties)."""
    best = average_logprob(scores, lengths).view(-1, k).argmax(1)
    rows = (torch.arange(len(best), device=best.device) * k + best).tolist()
    return [_strip(tokens[r, : int(lengths[r])].tolist(), eos) for r in rows]


def dedup_consecutive(ids: Sequence[int]) -> list[int]:
    """Drop tokens equal to their predecessor (NAR's typical repetition; post-processing only)."""
    return [t for i, t in enumerate(ids) if i == 0 or t != ids[i - 1]]


class NarDecoder(Decoder):
    """Single pass: length head -> all-[MASK] slots -> argmax, over ``opts.length_beam`` lengths.

    Only the source reaches a decoder; lengths come from the length head, never from a reference.
    Lengths are limited to ``[max(1, min_length), max_length]`` (end [SEP] included, as for the
    autoregressive decoders) and to the position table; ``num_beams``, ``length_penalty`` and
    ``no_repeat_ngram_size`` are autoregressive settings and are ignored.
    """

    name = "nar"

    @torch.no_grad()
    def __call__(self, model: Transformer, src_ids: torch.Tensor, src_len: torch.Tensor,
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
        sources = [row for row in _rows(src_ids, src_len) for _ in range(k)]
        tokens, scores = self.refine(model, source.repeat(k), sources, lengths, opts)
        out = select_length_beam(tokens, scores, lengths, k, model.tokenizer.sep_token_id)
        return [dedup_consecutive(x) for x in out] if opts.dedup else out

    def first_pass(self, model: Transformer, source: EncodedSource, lengths: torch.Tensor,
                   opts: DecodeOptions) -> tuple[torch.Tensor, torch.Tensor]:
        slots = masked_slots(lengths, model.tokenizer.mask_token_id)
        hidden = slot_pass(model, source, slots, lengths)
        return predict_slots(model, hidden, lengths, slot_valid(lengths), model.tokenizer.sep_token_id,
                             opts.banned_ids)

    def refine(self, model: Transformer, source: EncodedSource, sources: list[list[int]], lengths: torch.Tensor,
               opts: DecodeOptions) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and their log-probs (N, W) for N = sources x candidate lengths."""
        return self.first_pass(model, source, lengths, opts)


class MistIterDecoder(NarDecoder):
    """MIST iterative decoding: pass j reads ``[CLS] output_{j-1} [SEP] X [SEP]``; ``iterations`` passes."""

    name = "mist-iter"

    def refine(self, model: Transformer, source: EncodedSource, sources: list[list[int]], lengths: torch.Tensor,
               opts: DecodeOptions) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, scores = self.first_pass(model, source, lengths, opts)
        for _ in range(1, opts.iterations):
            mixed_ids, mixed_len = mist_batch(model, _rows(tokens, lengths, drop_last=1), sources, lengths)
            mixed, _ = encode_source(model, mixed_ids, mixed_len)
            tokens, scores = self.first_pass(model, mixed, lengths, opts)
        return tokens, scores


class MaskPredictDecoder(NarDecoder):
    """Mask-predict: iteration t re-masks the L(T-t)/T least confident tokens and re-predicts them.

    L counts the generated tokens (the end [SEP] slot is never re-masked); kept tokens keep the
    log-probs they were predicted with.
    """

    name = "mask-predict"

    def refine(self, model: Transformer, source: EncodedSource, sources: list[list[int]], lengths: torch.Tensor,
               opts: DecodeOptions) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, scores = self.first_pass(model, source, lengths, opts)
        content = slot_valid(lengths - 1, tokens.shape[1])
        for t in range(1, opts.iterations):
            remask = lowest_confidence(scores, content, remask_count(lengths - 1, t, opts.iterations))
            if not bool(remask.any()):
                break
            hidden = slot_pass(model, source, tokens.masked_fill(remask, model.tokenizer.mask_token_id), lengths)
            new_tokens, new_scores = predict_slots(model, hidden, lengths, remask, model.tokenizer.sep_token_id,
                                                   opts.banned_ids)
            tokens = torch.where(remask, new_tokens, tokens)
            scores = torch.where(remask, new_scores, scores)
        return tokens, scores


DECODERS["nar"] = NarDecoder
DECODERS["mist-iter"] = MistIterDecoder
DECODERS["mask-predict"] = MaskPredictDecoder
