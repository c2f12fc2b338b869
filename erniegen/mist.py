"""MIST (Jiang et al., AAAI 2022): non-autoregressive generation trained with mixup self-training.

NAT (``method: nat``) and MIST share the layout, length prediction, slot masking and single-pass
decoder of nar.py; this module holds what is MIST's own.

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

Decoders (the family's, listed in :mod:`erniegen.registry`): ``nar`` (single pass, nar.py),
``mist-iter`` (feed the previous output back as pseudo target, ``opts.iterations`` passes) and
``mask-predict`` (Ghazvininejad et al. 2019, ``opts.iterations`` = T). ``opts.length_beam`` decodes the top-k lengths
side by side and keeps the best average log-probability. ``opts.dedup`` drops consecutive duplicate
tokens afterwards; it changes the text that was scored, so callers report it separately.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .batch import pad
from .data import Features, TaskPreset
from .nar import (NarDecoder, NarObjective, NarOptions, first_pass, length_head, masked_slots, position_limit,
                  predict_slots, rows_of, slot_valid)
from .network import Network
from .passes import EncodedSource, encode_source, slot_pass
from .search import DecodeOptions, Decoder, decode_in_batches, in_input_order, options_from_settings
# names older code imports from here
from .nar import candidate_lengths, dedup_consecutive, select_length_beam  # noqa: F401
from .passes import slot_roles  # noqa: F401

MIXINGS = ("dynamic", "none", "static")


# ---- MIST input --------------------------------------------------------------------------------


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


def mist_batch(model: Network, pseudo: Sequence[Sequence[int]], sources: Sequence[Sequence[int]],
               slot_len: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded MIST sources, each fitted so that it and its slots stay inside the position table."""
    tok, limit = model.tokenizer, position_limit(model)
    rows = [mist_source(p, s, limit - n, tok.cls_token_id, tok.sep_token_id)
            for p, s, n in zip(pseudo, sources, slot_len.tolist())]
    ids, lens = pad(rows, model.config.pad_token_id)
    return ids.to(slot_len.device), lens.to(slot_len.device)


# ---- training ----------------------------------------------------------------------------------


@dataclass
class MistConfig(NarOptions):
    """``method_options`` of ``--method nat|mist``: the NAR ones (nar.py) and MIST's mixing."""

    # glancing training by default: the MIST paper trains every encoder-based NAR model with it, NAT included
    mask_mode: str = "glat"
    mixing: str = "dynamic"  # dynamic (MIST) | none (plain NAT) | static (pseudo_ids from a trained model)
    pseudo_from: str | None = None  # static: the trained model folder that writes the pseudo targets

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mixing not in MIXINGS:
            raise ValueError(f"mixing must be one of {MIXINGS}, got {self.mixing!r}")
        if self.pseudo_from is not None and self.mixing != "static":
            raise ValueError("pseudo_from is only used with mixing: static")


OPTION_KEYS = tuple(f for f in MistConfig.__dataclass_fields__ if f != "label_smoothing")


class MistObjective(NarObjective):
    """``forward(**batch)`` -> named losses of NAT (``mixing: none``) or MIST training.

    Build it with :func:`build_mist_objective`, which attaches the length head first. Under
    ``mask_mode: glat`` the glancing first pass is also MIST's pseudo-target pass: one no-grad pass
    serves both.
    """

    cfg: MistConfig

    def forward(self, src_ids: torch.Tensor, src_len: torch.Tensor, tgt_ids: torch.Tensor, tgt_len: torch.Tensor,
                pseudo_ids: torch.Tensor | None = None, pseudo_len: torch.Tensor | None = None,
                **ignored) -> dict[str, torch.Tensor]:
        model = self.model
        valid = slot_valid(tgt_len, tgt_ids.shape[1])
        source, hidden = encode_source(model, src_ids, src_len)
        loss_length = self.length_loss(hidden, source, tgt_len)
        n_tokens = src_len.sum() + tgt_len.sum()
        predicted = None  # the first pass's ids, when glancing or dynamic mixing needs them
        if self.glancing:
            predicted = self.first_pass(source, tgt_len)
            n_tokens = n_tokens + tgt_len.sum()
        masked = self._masked(valid, tgt_ids, predicted)
        slots = torch.where(masked, self.mask_id, tgt_ids)
        loss_nat = self._loss(slot_pass(model, source, slots, tgt_len), masked, tgt_ids)
        loss = loss_nat + self.cfg.length_weight * loss_length
        out = {"loss_nat": loss_nat.detach(), "loss_length": loss_length.detach()}
        if self.cfg.mixing != "none":
            if self.cfg.mixing == "dynamic":
                if predicted is None:
                    predicted = self.first_pass(source, tgt_len)
                    n_tokens = n_tokens + tgt_len.sum()
                pseudo = rows_of(predicted, tgt_len, drop_last=1)
            elif pseudo_ids is None or pseudo_len is None:
                raise ValueError("mixing: static needs pseudo_ids/pseudo_len in the batch; see "
                                 "erniegen.mist.add_static_pseudo_targets")
            else:
                pseudo = rows_of(pseudo_ids, pseudo_len)
            mixed_ids, mixed_len = mist_batch(model, pseudo, rows_of(src_ids, src_len), tgt_len)
            mixed, _ = encode_source(model, mixed_ids, mixed_len, hidden=False)
            loss_mist = self._loss(slot_pass(model, mixed, slots, tgt_len), masked, tgt_ids)
            out["loss_mist"] = loss_mist.detach()
            loss = loss + loss_mist
            n_tokens = n_tokens + mixed_len.sum() + tgt_len.sum()
        return out | {"loss": loss, "num_tokens": n_tokens}

    def pseudo_targets(self, source: EncodedSource, tgt_len: torch.Tensor) -> list[list[int]]:
        """MIST's first pass: argmax at all-[MASK] slots of the true lengths, end [SEP] dropped.

        Runs without gradients, in the model's current (train/eval) mode.
        """
        return rows_of(self.first_pass(source, tgt_len), tgt_len, drop_last=1)


def build_mist_objective(method: str, model: Network, preset: TaskPreset, options: dict) -> MistObjective:
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


def make_static_pseudo_targets(model: Network, features: Sequence, batch_size: int = 32,
                               progress: bool = False) -> list[list[int]]:
    """Single-pass NAR outputs (predicted lengths) of a trained model for each feature's source, as predicted (no
    repeats dropped, so the length head's lengths)."""
    sources = [_field(f, "source_ids") for f in features]
    opts = options_from_settings(model, length_beam=1, iterations=1, dedup=False, block_repeated_words=False)
    return in_input_order(decode_in_batches(model, sources, NarDecoder(), batch_size, opts, progress), len(sources))


def add_static_pseudo_targets(features: Sequence, options: dict) -> list[Features]:
    """For ``mixing: static``: features with ``pseudo_ids`` from the model at ``pseudo_from``; else unchanged.

    Every process decodes the whole training set (outputs are deterministic, so ranks agree).
    """
    if options.get("mixing") != "static":
        return list(features)
    if not options.get("pseudo_from"):
        raise ValueError("mixing: static needs pseudo_from: DIR, a model trained with --method nat or mist")
    teacher = Network.from_pretrained(options["pseudo_from"])
    if torch.cuda.is_available():
        teacher.to(torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))))
    from .train import is_main_process
    # decoding the whole training set takes minutes: show it (on the main process only)
    pseudo = make_static_pseudo_targets(teacher, features, progress=is_main_process())
    return [MixedFeatures(_field(f, "source_ids"), _field(f, "target_ids"), p) for f, p in zip(features, pseudo)]


def prepare_features(method: str, features: Sequence, options: dict) -> list:
    """The training (and dev) features of ``--method``: MIST's get static pseudo targets under ``mixing: static``."""
    return add_static_pseudo_targets(features, options) if method == "mist" else list(features)


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


class MistIterDecoder(NarDecoder):
    """MIST iterative decoding: pass j reads ``[CLS] output_{j-1} [SEP] X [SEP]``; ``iterations`` passes."""

    name = "mist-iter"

    def refine(self, model: Network, source: EncodedSource, sources: list[list[int]], lengths: torch.Tensor,
               opts: DecodeOptions) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, scores = first_pass(model, source, lengths, opts.banned_ids)
        for _ in range(1, opts.iterations):
            mixed_ids, mixed_len = mist_batch(model, rows_of(tokens, lengths, drop_last=1), sources, lengths)
            mixed, _ = encode_source(model, mixed_ids, mixed_len, hidden=False)
            tokens, scores = first_pass(model, mixed, lengths, opts.banned_ids)
        return tokens, scores


class MaskPredictDecoder(NarDecoder):
    """Mask-predict: iteration 0 predicts every slot; iteration t re-masks the L(T-t)/T least confident
    tokens and re-predicts them.

    L counts the generated tokens (the end [SEP] slot is never re-masked); kept tokens keep the
    log-probs they were predicted with.
    """

    name = "mask-predict"

    def refine(self, model: Network, source: EncodedSource, sources: list[list[int]], lengths: torch.Tensor,
               opts: DecodeOptions) -> tuple[torch.Tensor, torch.Tensor]:
        mask_id, eos = model.tokenizer.mask_token_id, model.tokenizer.sep_token_id
        tokens = masked_slots(lengths, mask_id)
        scores = torch.zeros(tokens.shape, device=tokens.device)
        remask = slot_valid(lengths)
        content = slot_valid(lengths - 1, tokens.shape[1])
        for t in range(opts.iterations):
            if t > 0:
                remask = lowest_confidence(scores, content, remask_count(lengths - 1, t, opts.iterations))
                if not bool(remask.any()):
                    break
            hidden = slot_pass(model, source, tokens.masked_fill(remask, mask_id), lengths)
            new_tokens, new_scores = predict_slots(model, hidden, lengths, remask, eos, opts.banned_ids)
            tokens = torch.where(remask, new_tokens, tokens)
            scores = torch.where(remask, new_scores, scores)
        return tokens, scores


DECODERS: dict[str, Callable[[], Decoder]] = {"nar": NarDecoder, "mist-iter": MistIterDecoder,
                                             "mask-predict": MaskPredictDecoder}
