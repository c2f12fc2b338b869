"""Per-token role codes and the one function that turns them into attention masks.

Every training flow (ERNIE-GEN contextual / word-by-word / span-by-span, typical teacher forcing,
non-autoregressive slots) and every decoder describes its tokens with a :class:`Roles` record and
calls :func:`attention_mask`. Masks are boolean, ``True`` = may attend (the convention of
``torch.nn.functional.scaled_dot_product_attention``).

Shape glossary: B batch, Q query tokens, K key tokens (cached past + new).

Visibility rules (key k visible to query q):

============  ==========================================================================
query role    may attend to
============  ==========================================================================
SOURCE        every SOURCE key of its row (bidirectional source)
CONTEXT t_i   SOURCE, CONTEXT t_j with j <= i (target sees the target up to itself)
WORD [A]_i    SOURCE, CONTEXT t_j with j < i, and itself (ERNIE-GEN word-by-word flow)
SPAN [A]_i    SOURCE, CONTEXT t_j with j < b (b = start of i's span), and itself
NAR y_i       SOURCE and every NAR key (all target slots see each other)
PAD           SOURCE (its output is never used; this only keeps softmax rows non-empty)
============  ==========================================================================

PAD keys are never visible, so padding is masked identically in training and batched decoding.
"Itself" is the key with the same role and the same index, which works whether the query's own
key arrives in the same call (training) or not at all (placeholders are never cached).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

PAD, SOURCE, CONTEXT, WORD, SPAN, NAR = 0, 1, 2, 3, 4, 5
ROLE_NAMES = {PAD: "pad", SOURCE: "source", CONTEXT: "context", WORD: "word", SPAN: "span", NAR: "nar"}


@dataclass
class Roles:
    """Role code, target index and span start of each token, all ``(B, T)`` long tensors.

    ``index`` is the target position i (0-based) for CONTEXT/WORD/SPAN/NAR tokens and -1 otherwise.
    ``span_start`` is the first target index of the token's span (SPAN tokens); for other roles it
    is ignored and may be anything.
    """

    code: torch.Tensor
    index: torch.Tensor
    span_start: torch.Tensor | None = None

    def cat(self, other: "Roles") -> "Roles":
        """Concatenate along the token axis (past keys, then new ones)."""
        return Roles(
            torch.cat([self.code, other.code], 1),
            torch.cat([self.index, other.index], 1),
            torch.cat([self._starts(), other._starts()], 1),
        )

    def select(self, rows: torch.Tensor) -> "Roles":
        """Pick batch rows (beam search reorders its hypotheses with this)."""
        return Roles(self.code[rows], self.index[rows], self._starts()[rows])

    def _starts(self) -> torch.Tensor:
        return self.index if self.span_start is None else self.span_start


def attention_mask(query: Roles, key: Roles) -> torch.Tensor:
    """Boolean ``(B, Q, K)`` mask, True where query token may attend to key token."""
    qc, qi = query.code[:, :, None], query.index[:, :, None]
    kc, ki = key.code[:, None, :], key.index[:, None, :]
    key_src = kc == SOURCE
    key_ctx = kc == CONTEXT
    # Highest CONTEXT index (exclusive) each query may see.
    q_start = query._starts()[:, :, None]
    limit = torch.where(qc == CONTEXT, qi + 1, torch.where(qc == SPAN, q_start, qi))
    sees_ctx = (qc == CONTEXT) | (qc == WORD) | (qc == SPAN)
    itself = ((qc == WORD) | (qc == SPAN)) & (kc == qc) & (ki == qi)
    mask = key_src & ((qc == SOURCE) | sees_ctx | (qc == NAR) | (qc == PAD))
    mask = mask | (sees_ctx & key_ctx & (ki < limit)) | itself
    mask = mask | ((qc == NAR) & (kc == NAR))
    return mask


def source_roles(lengths: torch.Tensor, width: int) -> Roles:
    """Roles of right-padded sources: SOURCE for the first ``lengths[b]`` tokens, PAD after."""
    pos = torch.arange(width, device=lengths.device)[None, :]
    code = torch.where(pos < lengths[:, None], SOURCE, PAD)
    return Roles(code, torch.full_like(code, -1))


def target_roles(role: int, lengths: torch.Tensor, width: int, offset: torch.Tensor | int = 0,
                 span_start: torch.Tensor | None = None) -> Roles:
    """Roles of right-padded target-side tokens of one kind, indices ``offset .. offset+width-1``."""
    pos = torch.arange(width, device=lengths.device)[None, :]
    index = pos + (offset[:, None] if isinstance(offset, torch.Tensor) else offset)
    code = torch.where(pos < lengths[:, None], role, PAD)
    index = torch.where(code == PAD, -1, index)
    return Roles(code, index, span_start)
