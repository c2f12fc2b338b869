"""The passes every method runs over a source encoded once, and the caches that hold it.

A source never attends to what follows it, so it is run through the network once and its per-layer
keys/values become the ``past`` of every later call:

* :func:`encode_context`: the contextual flow over the source (and optionally a target prefix);
* :func:`placeholder_pass`: ERNIE-GEN's [ATTN] placeholders against that past (training flows);
* :class:`KVCache`: the past of autoregressive decoding, growing by one committed token a step;
* :func:`encode_source` / :func:`slot_pass`: non-autoregressive target slots against a fixed past,
  one call per length, iteration or refinement however many are tried.

Masks come from :func:`erniegen.masks.attention_mask`, positions from :func:`target_positions`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .masks import CONTEXT, NAR, PAD, Roles, attention_mask, source_roles, target_roles
from .network import KV, Network, PastSlot


def target_positions(src_len: torch.Tensor, width: int) -> torch.Tensor:
    """Target token i sits at position ``len(source) + i`` of its own row (padding-independent)."""
    return src_len[:, None] + torch.arange(width, device=src_len.device)[None, :]


def encode_context(model: Network, src_ids: torch.Tensor, src_len: torch.Tensor,
                   tgt_in: torch.Tensor | None = None, tgt_len: torch.Tensor | None = None, hidden: bool = True):
    """Run the source (and optionally a target prefix) through the contextual flow.

    Returns hidden states (None with ``hidden=False``: see ``Network.forward``), per-layer K/V and the key
    roles, ready to be ``past`` of later calls.
    """
    b, ls = src_ids.shape
    roles = source_roles(src_len, ls)
    ids, pos = src_ids, torch.arange(ls, device=src_ids.device).expand(b, ls)
    types = torch.zeros_like(src_ids)
    if tgt_in is not None:
        lt = tgt_in.shape[1]
        roles = roles.cat(target_roles(CONTEXT, tgt_len, lt))
        ids = torch.cat([ids, tgt_in], 1)
        pos = torch.cat([pos, target_positions(src_len, lt)], 1)
        types = torch.cat([types, torch.full_like(tgt_in, model.target_type_id)], 1)
    out, kv = model(ids, pos, types, attention_mask(roles, roles), hidden=hidden)
    return out, kv, roles


def placeholder_pass(model: Network, attn_id: int, src_len: torch.Tensor, query: Roles,
                     past_kv, past_roles: Roles) -> torch.Tensor:
    """Hidden states of [ATTN] placeholders described by ``query`` roles, against a past."""
    b, t = query.code.shape
    ids = torch.full((b, t), attn_id, dtype=torch.long, device=src_len.device)
    pos = src_len[:, None] + query.index.clamp(min=0)
    types = torch.full_like(ids, model.target_type_id)
    mask = attention_mask(query, past_roles.cat(query))
    hidden, _ = model(ids, pos, types, mask, past=past_kv)
    return hidden


class KVCache:
    """Preallocated per-layer keys/values plus the roles of the cached tokens.

    A step's tokens are written in place after the committed ones (:class:`PastSlot`); ``commit``
    keeps the first of them (the real token) and the next step overwrites the rest (placeholders).
    """

    def __init__(self, kv: list[KV], roles: Roles, capacity: int):
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
        self.visible = code != PAD  # which cached keys every step's tokens see (kept current by commit)

    def past(self, new_tokens: int) -> tuple[list[PastSlot], Roles]:
        """Slots that will take ``new_tokens`` more keys, and the roles of the committed ones."""
        n = self.length
        if n + new_tokens > self.k[0].shape[2]:
            raise RuntimeError(f"KV cache full: {n} + {new_tokens} > capacity {self.k[0].shape[2]}")
        return ([PastSlot(k, v, n) for k, v in zip(self.k, self.v)],
                Roles(self.roles.code[:, :n], self.roles.index[:, :n]))

    def step_mask(self, new: Roles, own: torch.Tensor | None = None, whole: bool = False) -> torch.Tensor:
        """The (B, T, n+T) mask of an autoregressive step's tokens ``new`` against the n committed keys and
        themselves, equal to ``attention_mask(new, committed.cat(new))``.

        Every committed key but padding (the source, the target tokens before the step) is visible to
        every query of a step, so only the new tokens' own T x T block needs the role arithmetic: a step
        never rebuilds the mask over the whole cache. ``own`` is that block when the caller already has it
        (a stepper's is the same at every step). ``whole``: (B, T, capacity+T), against every slot of the
        buffers, the ones not committed hidden, for a runtime that takes the buffers as they are
        (erniegen.onnx_runtime).
        """
        b, t = new.code.shape
        own = attention_mask(new, new) if own is None else own.expand(b, t, t)
        keys = self.visible if whole else self.visible[:, :self.length]
        return torch.cat([keys[:, None].expand(b, t, -1), own], 2)

    def commit(self, roles: Roles, keep: int) -> None:
        """Keep the first ``keep`` tokens of the last step (already written by the layers)."""
        n = self.length
        self.roles.code[:, n:n + keep] = roles.code[:, :keep]
        self.roles.index[:, n:n + keep] = roles.index[:, :keep]
        self.visible[:, n:n + keep] = roles.code[:, :keep] != PAD
        self.length = n + keep

    def reorder(self, rows: torch.Tensor) -> None:
        self.k = [k.index_select(0, rows) for k in self.k]
        self.v = [v.index_select(0, rows) for v in self.v]
        self.roles = self.roles.select(rows)
        self.visible = self.visible[rows]


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


def encode_source(model: Network, src_ids: torch.Tensor, src_len: torch.Tensor, hidden: bool = True
                  ) -> tuple[EncodedSource, torch.Tensor | None]:
    """Encode the source segment once; returns its cache and final hidden states (for a length head).

    ``hidden=False`` when only the cache is read: the last layer then computes its keys and values alone
    (``Network.forward``), and None stands for the hidden states.
    """
    out, kv, roles = encode_context(model, src_ids, src_len, hidden=hidden)
    return EncodedSource(kv, roles, src_len), out


def slot_roles(slot_len: torch.Tensor, width: int) -> Roles:
    """NAR roles of right-padded target slots: every slot sees the source and all slots."""
    return target_roles(NAR, slot_len, width)


def slot_pass(model: Network, source: EncodedSource, slot_ids: torch.Tensor,
              slot_len: torch.Tensor) -> torch.Tensor:
    """Hidden states (N,W,H) of target slots run against the cached source."""
    width = slot_ids.shape[1]
    roles = slot_roles(slot_len, width)
    # padding slots are invisible and unread; position 0 keeps them inside the table
    pos = target_positions(source.length, width).masked_fill(roles.code != NAR, 0)
    types = torch.full_like(slot_ids, model.target_type_id)
    hidden, _ = model(slot_ids, pos, types, attention_mask(roles, source.roles.cat(roles)), past=source.kv)
    return hidden
