"""ERNIE-GEN's training objective (Xiao et al., IJCAI 2020, §3) and the typical-generation baseline.

Multi-flow attention, as three calls of the shared Transformer:

1. contextual flow over ``[S ; T']`` (source bidirectional, noised target causal) -> per-layer K/V;
2. word-by-word flow: one [ATTN] per target position i, at i's position id, attending to S, t'<i
   (the contextual K/V passed as ``past``) and itself;
3. span-by-span flow (when ``span_weight > 0``): one [ATTN] per target position, attending to S,
   t'<b (b = its span's start) and itself. Flows 2 and 3 share one call: they never see each other.

Only the placeholders' hidden states reach the vocabulary projection, so the softmax runs on the
predicted positions alone. ``typical`` replaces flows 2-3 by teacher forcing from the previous token
of the contextual flow (UniLM-style), for the paper's Table 8 comparison.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .masks import CONTEXT, SPAN, WORD, Roles, attention_mask, source_roles, target_roles
from .model import Transformer


@dataclass
class ErnieGenConfig:
    """Defaults are the paper's fine-tuning settings (§4.1, released configs)."""

    method: str = "ernie-gen"  # "ernie-gen" (infilling) | "typical" (previous-token teacher forcing)
    noise_rate: float = 0.7  # ρ_f: SQuAD QG / CNN-DM 0.7, Gigaword 0.5, dialogue 0.0
    word_weight: float = 1.0  # λ: 1.0 for fine-tuning, 0.5 for pre-training (span flow on)
    label_smoothing: float = 0.1
    # Fraction of the run over which ρ rises linearly from 0 to noise_rate (0: ρ_f from the first step).
    # Not in the paper, whose models start from checkpoints that already predict well.
    noise_ramp: float = 0.0

    def __post_init__(self) -> None:
        if self.method not in ("ernie-gen", "typical"):
            raise ValueError(f"method must be 'ernie-gen' or 'typical', got {self.method!r}")
        if not 0.0 <= self.noise_rate < 1.0:
            raise ValueError(f"noise_rate must be in [0, 1), got {self.noise_rate}")
        if not 0.0 <= self.word_weight <= 1.0:
            raise ValueError(f"word_weight (λ) must be in [0, 1], got {self.word_weight}")
        if not 0.0 <= self.noise_ramp <= 1.0:
            raise ValueError(f"noise_ramp must be in [0, 1], got {self.noise_ramp}")
        if self.method == "typical" and self.word_weight != 1.0:
            raise ValueError("the typical baseline has no span flow: word_weight must be 1.0")


def noise_ids(ids: torch.Tensor, valid: torch.Tensor, rate: float, replacements: torch.Tensor,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace each valid token by a random vocabulary token with probability ``rate``.

    Bernoulli per token (ERNIE-GEN's fine-tuning reader; its other release draws an exact count).
    """
    if rate <= 0:
        return ids
    hit = (torch.rand(ids.shape, generator=generator, device=ids.device) < rate) & valid
    pick = torch.randint(len(replacements), ids.shape, generator=generator, device=ids.device)
    return torch.where(hit, replacements.to(ids.device)[pick], ids)


def noise_at(rate: float, ramp: float, step: int, total_steps: int) -> float:
    """ρ at optimizer step ``step`` (0-based): ``rate`` from step ``ramp * total_steps`` on, rising
    linearly from 0 before it (step 0 trains without noise)."""
    ramp_steps = ramp * total_steps
    if ramp_steps <= 0 or step >= ramp_steps:
        return rate
    return rate * step / ramp_steps


def replacement_vocab(tokenizer, vocab_size: int, reserved: list[int]) -> torch.Tensor:
    """Ids noise may draw from: the vocabulary minus special and reserved slots."""
    banned = set(tokenizer.all_special_ids if tokenizer is not None else []) | set(reserved)
    if tokenizer is not None:
        vocab = tokenizer.get_vocab()
        banned |= {i for t, i in vocab.items() if t.startswith("[unused")}
    return torch.tensor([i for i in range(vocab_size) if i not in banned], dtype=torch.long)


def target_positions(src_len: torch.Tensor, width: int) -> torch.Tensor:
    """Target token i sits at position ``len(source) + i`` of its own row (padding-independent)."""
    return src_len[:, None] + torch.arange(width, device=src_len.device)[None, :]


def encode_context(model: Transformer, src_ids: torch.Tensor, src_len: torch.Tensor,
                   tgt_in: torch.Tensor | None = None, tgt_len: torch.Tensor | None = None):
    """Run the source (and optionally a target prefix) through the contextual flow.

    Returns hidden states, per-layer K/V and the key roles, ready to be ``past`` of later calls.
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
    hidden, kv = model(ids, pos, types, attention_mask(roles, roles))
    return hidden, kv, roles


def placeholder_pass(model: Transformer, attn_id: int, src_len: torch.Tensor, query: Roles,
                     past_kv, past_roles: Roles) -> torch.Tensor:
    """Hidden states of [ATTN] placeholders described by ``query`` roles, against a past."""
    b, t = query.code.shape
    ids = torch.full((b, t), attn_id, dtype=torch.long, device=src_len.device)
    pos = src_len[:, None] + query.index.clamp(min=0)
    types = torch.full_like(ids, model.target_type_id)
    mask = attention_mask(query, past_roles.cat(query))
    hidden, _ = model(ids, pos, types, mask, past=past_kv)
    return hidden


class ErnieGenObjective(nn.Module):
    """``forward(**batch)`` -> named losses; wraps the model so DDP sees a single forward."""

    def __init__(self, model: Transformer, cfg: ErnieGenConfig, attn_id: int, replacements: torch.Tensor):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.attn_id = attn_id
        self.register_buffer("replacements", replacements, persistent=False)
        self.current_noise = cfg.noise_rate if cfg.noise_ramp == 0 else 0.0

    def set_progress(self, step: int, total_steps: int) -> None:
        """Called by the training loop before each step: ρ of the noise ramp at ``step`` (0-based)."""
        self.current_noise = noise_at(self.cfg.noise_rate, self.cfg.noise_ramp, step, total_steps)

    def forward(self, src_ids: torch.Tensor, src_len: torch.Tensor, tgt_ids: torch.Tensor,
                tgt_len: torch.Tensor, span_start: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        lt = tgt_ids.shape[1]
        valid = torch.arange(lt, device=tgt_ids.device)[None, :] < tgt_len[:, None]
        rate = self.current_noise if self.training else 0.0
        tgt_in = noise_ids(tgt_ids, valid, rate, self.replacements)
        hidden, kv, roles = encode_context(self.model, src_ids, src_len, tgt_in, tgt_len)
        n_tokens = int(src_len.sum() + tgt_len.sum())
        if self.cfg.method == "typical":
            # t_0 is predicted from the source's last token ([SEP]), t_i from t_{i-1}.
            ls = src_ids.shape[1]
            prev = torch.cat([(src_len - 1)[:, None], ls + torch.arange(lt - 1, device=tgt_ids.device)[None, :]
                              .expand(len(src_len), -1)], 1)
            h = hidden.gather(1, prev[:, :, None].expand(-1, -1, hidden.shape[-1]))
            loss = self._loss(h[valid], tgt_ids[valid])
            return {"loss": loss, "loss_word": loss.detach(), "num_tokens": torch.tensor(n_tokens)}

        query = target_roles(WORD, tgt_len, lt)
        use_span = self.cfg.word_weight < 1.0
        if use_span:
            if span_start is None:
                raise ValueError("word_weight < 1 needs span boundaries (batch['span_start']) for the span flow")
            query = query.cat(target_roles(SPAN, tgt_len, lt, span_start=span_start))
        h = placeholder_pass(self.model, self.attn_id, src_len, query, kv, roles)
        out = {"num_tokens": torch.tensor(n_tokens + int(tgt_len.sum()) * (2 if use_span else 1))}
        loss_word = self._loss(h[:, :lt][valid], tgt_ids[valid])
        out["loss_word"] = loss_word.detach()
        loss = loss_word
        if use_span:
            loss_span = self._loss(h[:, lt:][valid], tgt_ids[valid])
            out["loss_span"] = loss_span.detach()
            loss = self.cfg.word_weight * loss_word + (1 - self.cfg.word_weight) * loss_span
        out["loss"] = loss
        return out

    def _loss(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.model.logits(h).float()
        return F.cross_entropy(logits, labels, label_smoothing=self.cfg.label_smoothing)
