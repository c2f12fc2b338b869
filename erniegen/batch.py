"""Padding token-id lists into the batch tensors every objective and decoder takes."""
from __future__ import annotations

from collections.abc import Sequence

import torch


def pad(seqs: Sequence[Sequence[int]], value: int = 0, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to ``(B, width)``; returns the ids and the true lengths."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    width = max(int(lengths.max()) if len(seqs) else 0, width or 0)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    return out, lengths


def collate_pairs(items: Sequence, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Features with ``source_ids``/``target_ids`` (optional ``span_starts``, ``pseudo_ids``) to tensors.

    ``span_starts`` per example lists the target offsets where spans begin; it becomes, for every
    target position, the start of the span holding it (what the span-by-span flow attends up to).
    """
    src, src_len = pad([_get(x, "source_ids") for x in items], pad_id)
    tgt, tgt_len = pad([_get(x, "target_ids") for x in items], pad_id)
    batch = {"src_ids": src, "src_len": src_len, "tgt_ids": tgt, "tgt_len": tgt_len}
    starts = [_get(x, "span_starts") for x in items]
    if all(s is not None for s in starts):
        batch["span_start"] = span_start_per_token(starts, tgt.shape[1])
    pseudo = [_get(x, "pseudo_ids") for x in items]
    if all(p is not None for p in pseudo):  # MIST static mixing
        batch["pseudo_ids"], batch["pseudo_len"] = pad(pseudo, pad_id)
    return batch


def span_start_per_token(starts: Sequence[Sequence[int]], width: int) -> torch.Tensor:
    """``[[0, 2]]`` with width 4 -> ``[[0, 0, 2, 2]]``: each position's span start."""
    out = torch.zeros(len(starts), width, dtype=torch.long)
    for i, s in enumerate(starts):
        bounds = list(s) + [width]
        for a, b in zip(bounds[:-1], bounds[1:]):
            out[i, a:b] = a
    return out


def _get(item, name: str):
    return item.get(name) if isinstance(item, dict) else getattr(item, name, None)
