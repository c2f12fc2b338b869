"""ERNIE-GEN (Xiao et al., IJCAI 2020) and the typical-generation baseline: objective and decoding.

Multi-flow attention, as three calls of the shared Network:

1. contextual flow over ``[S ; T']`` (source bidirectional, noised target causal) -> per-layer K/V;
2. word-by-word flow: one [ATTN] per target position i, at i's position id, attending to S, t'<i
   (the contextual K/V passed as ``past``) and itself;
3. span-by-span flow (when ``span_weight > 0``): one [ATTN] per target position, attending to S,
   t'<b (b = its span's start) and itself. Flows 2 and 3 share one call: they never see each other.

Only the placeholders' hidden states reach the vocabulary projection, so the softmax runs on the
predicted positions alone. ``typical`` replaces flows 2-3 by teacher forcing from the previous token
of the contextual flow (UniLM-style), for the paper's Table 8 comparison.

Infilling decoding (§3.3): the source is encoded once into a key/value cache; step i feeds
``[t_{i-1}, [ATTN]_i]``, reads the next-token distribution at [ATTN], appends only t_{i-1}'s keys and
values to the cache and drops the placeholder's. Both steppers run under the shared greedy and beam
searches of search.py.

Copying (``method_options: copy: true``, not in the paper): a pointer-generator (See et al. 2017) over
the source. The predicting state h attends with one extra query, W_q h, over the source tokens' keys of
the last layer (already computed by the contextual flow and held in the decoding cache), and a gate
g = σ(w·h + b) mixes the vocabulary distribution with that attention scattered onto the source's ids:
p(w) = g·softmax(logits)_w + (1 - g)·Σ_{i: x_i = w} a_i. Training (:func:`copy_loss_terms`: the target's
log-probability and the vocabulary mean) and both decoders (:func:`copy_mixture`, the whole distribution through
:func:`next_token_log_probs`) build it from the same parts, so they compute one distribution.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import math

import torch
import torch.nn.functional as F
from torch import nn

from .data import TaskPreset
from .losses import log_softmax_at, smoothed_cross_entropy, smoothed_nll
from .masks import CONTEXT, SPAN, WORD, Roles, attention_mask, target_roles
from .network import KV, Network, PastSlot
from .passes import KVCache, encode_context, placeholder_pass, target_positions
from .precision import Linear
from .search import AutoregressiveDecoder, Decoder


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
    copy: bool = False  # a pointer-generator over the source (module docstring); the model keeps it

    def __post_init__(self) -> None:
        if self.method not in ("ernie-gen", "typical"):
            raise ValueError(f"method must be 'ernie-gen' or 'typical', got {self.method!r}")
        if not 0.0 <= self.noise_rate < 1.0:
            raise ValueError(f"noise_rate must be in [0, 1), got {self.noise_rate}")
        if not 0.0 <= self.word_weight <= 1.0:
            raise ValueError(f"word_weight (λ) must be in [0, 1], got {self.word_weight}")
        if not 0.0 <= self.noise_ramp <= 1.0:
            raise ValueError(f"noise_ramp must be in [0, 1], got {self.noise_ramp}")
        if not isinstance(self.copy, bool):
            raise ValueError(f"copy must be true or false, got {self.copy!r}")
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


COPY = "copy"  # the model extra holding the copy head; settings.extra["copy"] says the model uses it
# A fresh gate starts at g = σ(2) ≈ 0.88: close to the vocabulary distribution the model had before.
COPY_GATE_BIAS = 2.0


class CopyHead(nn.Module):
    """The copy query W_q and the gate (w, b) of the pointer-generator (module docstring)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.query = Linear(hidden, hidden)
        self.gate = Linear(hidden, 1)


@dataclass
class CopySource:
    """What a copy attends to, per row: the source tokens' last-layer keys (heads side by side), ids, validity."""

    keys: torch.Tensor   # (B, S, H)
    ids: torch.Tensor    # (B, S)
    valid: torch.Tensor  # (B, S) bool

    def rows(self, rows: torch.Tensor) -> "CopySource":
        return CopySource(self.keys[rows], self.ids[rows], self.valid[rows])


def copy_head(model: Network, create: bool = False) -> CopyHead | None:
    """The model's copy head (restored from its checkpoint on first use); None for a model without copying.
    ``create``: attach one (training with ``copy: true``), a fresh one with its gate at COPY_GATE_BIAS."""
    if COPY in model.extras:
        return model.extras[COPY]
    if not (create or model.settings.extra.get(COPY)):
        return None
    fresh = COPY not in model.extras and not model.has_saved_extra(COPY)
    head = model.add_extra(COPY, CopyHead(model.config.hidden_size))
    if fresh:
        with torch.no_grad():
            head.gate.bias.fill_(COPY_GATE_BIAS)
    return head


def copy_source(model: Network, kv: list[KV], src_ids: torch.Tensor, src_len: torch.Tensor) -> CopySource | None:
    """The source part of the contextual flow's last-layer keys, for a model that copies (else None). Special
    tokens ([CLS], [SEP], markers) are never copied."""
    if copy_head(model) is None:
        return None
    b, ls = src_ids.shape
    keys = kv[-1][0][:, :, :ls].transpose(1, 2).reshape(b, ls, -1)
    valid = torch.arange(ls, device=src_ids.device)[None, :] < src_len[:, None]
    # words only: a copied [SEP] would be an end token, and beam search collects every cheap end it sees
    special = [model.config.pad_token_id, model.attn_id, *(model.tokenizer.all_special_ids if model.tokenizer else [])]
    if model.settings.answer_marker is not None:
        special.append(model.tokenizer.convert_tokens_to_ids(model.settings.answer_marker))
    return CopySource(keys, src_ids, valid & ~torch.isin(src_ids, torch.tensor(special, device=src_ids.device)))


@dataclass
class Mixture:
    """The pointer-generator's distribution in sparse form. Only the source's words differ from the vocabulary
    distribution shifted by log g, so the (N, V) work is one log-softmax and one shift, where the dense
    mixture took a dozen (N, V) passes forward and back (a quarter of a training step with copying).

    log p(w) = logp_w + shift, plus ``lift`` at the source positions holding w."""

    logp: torch.Tensor   # (..., V) fp32 log-softmax of the vocabulary logits
    shift: torch.Tensor  # (..., 1) log g; 0 for a row with no word to copy
    ids: torch.Tensor    # (..., S) the source's ids
    # (..., S) each position's share (1 / occurrences of its word) of log(1 + (1-g)·p_copy(w) / (g·p_vocab(w))),
    # w its word; 0 at positions never copied
    lift: torch.Tensor

    def full(self) -> torch.Tensor:
        """The (..., V) log-probabilities."""
        return (self.logp + self.shift).scatter_add_(-1, self.ids, self.lift)


@dataclass
class _CopyParts:
    """What the mixture adds to the vocabulary's log-softmax, before that log-softmax is read."""

    logits: torch.Tensor  # (N, V) the vocabulary logits, in the model's product precision
    ids: torch.Tensor     # (N, S) the source's ids
    log_g: torch.Tensor   # (N, 1) fp32 log of the gate
    shift: torch.Tensor   # (N, 1) log g; 0 for a row with no word to copy
    log_copy: torch.Tensor  # (N, S) log((1-g)·p_copy) of each position's word
    share: torch.Tensor   # (N, S) 1 / occurrences of the position's word; 0 where never copied

    def lift(self, logp_at_ids: torch.Tensor) -> torch.Tensor:
        """Each position's share of log(1 + (1-g)·p_copy(w) / (g·p_vocab(w))), given log p_vocab at ``ids``."""
        vocab = self.log_g + logp_at_ids
        return (torch.logaddexp(vocab, self.log_copy) - vocab) * self.share


def _copy_parts(model: Network, h: torch.Tensor, source: CopySource, select: torch.Tensor | None) -> _CopyParts:
    """Everything of the mixture but the vocabulary's log-softmax, which decoding and the loss read differently."""
    head = copy_head(model)
    query, gate = head.query(h), head.gate(h)          # in the precision of the model's own products
    logits = model.logits(h if select is None else h[select])
    # the mixture in fp32 even under bf16 autocast (whose CPU softmax would stay bf16)
    with torch.autocast(h.device.type, enabled=False):
        scores = query.float() @ source.keys.float().transpose(1, 2) / math.sqrt(h.shape[-1])  # (B, T, S)
        # a source with no word to copy (only special tokens) keeps the vocabulary distribution; its scores
        # stay finite so that no NaN reaches a gradient
        copies = source.valid.any(-1)
        attn = torch.softmax(scores.masked_fill(~(source.valid | ~copies[:, None])[:, None, :], float("-inf")), -1)
        # a word's copy probability, at each position holding it: attention summed over its occurrences
        same = ((source.ids[:, :, None] == source.ids[:, None, :]) & source.valid[:, None, :]).float()
        p_word = attn @ same                                                         # (B, T, S)
        # 0 at positions never copied (special tokens, padding, rows with nothing to copy)
        share = (source.valid & copies[:, None]) / same.sum(-1).clamp_min(1)       # (B, S)
        t = h.shape[1]
        ids, share = source.ids[:, None, :].expand(-1, t, -1), share[:, None, :].expand(-1, t, -1)
        gate, copies = gate.float(), copies[:, None, None].expand(-1, t, 1)
        if select is not None:
            p_word, ids, share, gate, copies = (x[select] for x in (p_word, ids, share, gate, copies))
        log_g = F.logsigmoid(gate)
        # log p_copy clamped: a word whose attention underflows would give log 0, NaN gradients
        log_copy = F.logsigmoid(-gate) + p_word.clamp_min(1e-30).log()
        return _CopyParts(logits, ids, log_g, torch.where(copies, log_g, 0.0), log_copy, share)


def copy_mixture(model: Network, h: torch.Tensor, source: CopySource,
                 select: torch.Tensor | None = None) -> Mixture:
    """The pointer-generator at the (B, T, H) predicting states ``h`` (with ``select`` (B, T) bool, at the
    selected ones only): p(w) = g·softmax(logits)_w + (1-g)·Σ_{i: x_i = w} a_i."""
    parts = _copy_parts(model, h, source, select)
    with torch.autocast(h.device.type, enabled=False):
        logp = torch.log_softmax(parts.logits.float(), -1)
        return Mixture(logp, parts.shift, parts.ids, parts.lift(logp.gather(-1, parts.ids)))


def copy_loss_terms(model: Network, h: torch.Tensor, source: CopySource, select: torch.Tensor,
                    target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) and the mean of log p over the vocabulary, (N,) each, of :func:`copy_mixture`'s
    distribution at the selected states: what the label-smoothed loss reads, without the (N, V) distribution
    (:func:`erniegen.losses.log_softmax_at`)."""
    parts = _copy_parts(model, h, source, select)
    with torch.autocast(h.device.type, enabled=False):
        picked, mean = log_softmax_at(parts.logits, torch.cat([target[:, None], parts.ids], -1))
        lift = parts.lift(picked[:, 1:])
        at = picked[:, 0] + parts.shift[:, 0] + torch.where(parts.ids == target[:, None], lift, 0.0).sum(-1)
        return at, mean + parts.shift[:, 0] + lift.sum(-1) / parts.logits.shape[-1]


def next_token_log_probs(model: Network, h: torch.Tensor, source: CopySource | None,
                         select: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 log-probabilities of the next token at the (B, T, H) predicting states ``h``; with ``select``
    (B, T) bool, at the selected states only, (N, V). With a ``source``, the pointer-generator mixture."""
    if source is None:
        return torch.log_softmax(model.logits(h if select is None else h[select]).float(), -1)
    return copy_mixture(model, h, source, select).full()


class ErnieGenObjective(nn.Module):
    """``forward(**batch)`` -> named losses; wraps the model so DDP sees a single forward."""

    def __init__(self, model: Network, cfg: ErnieGenConfig, attn_id: int, replacements: torch.Tensor):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.attn_id = attn_id
        self.register_buffer("replacements", replacements, persistent=False)
        self.current_noise = cfg.noise_rate if cfg.noise_ramp == 0 else 0.0
        if cfg.copy:
            copy_head(model, create=True)
        model.settings.extra[COPY] = cfg.copy  # saved with the model: its decoders copy as it was trained to

    def set_progress(self, step: int, total_steps: int) -> None:
        """Called by the training loop before each step: ρ of the noise ramp at ``step`` (0-based)."""
        self.current_noise = noise_at(self.cfg.noise_rate, self.cfg.noise_ramp, step, total_steps)

    def forward(self, src_ids: torch.Tensor, src_len: torch.Tensor, tgt_ids: torch.Tensor,
                tgt_len: torch.Tensor, span_start: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        lt = tgt_ids.shape[1]
        valid = torch.arange(lt, device=tgt_ids.device)[None, :] < tgt_len[:, None]
        rate = self.current_noise if self.training else 0.0
        tgt_in = noise_ids(tgt_ids, valid, rate, self.replacements)
        # the infilling flows read the contextual flow's keys/values only; the typical baseline its states
        hidden, kv, roles = encode_context(self.model, src_ids, src_len, tgt_in, tgt_len,
                                           hidden=self.cfg.method == "typical")
        source = copy_source(self.model, kv, src_ids, src_len)
        n_tokens = int(src_len.sum() + tgt_len.sum())
        if self.cfg.method == "typical":
            # t_0 is predicted from the source's last token ([SEP]), t_i from t_{i-1}.
            ls = src_ids.shape[1]
            prev = torch.cat([(src_len - 1)[:, None], ls + torch.arange(lt - 1, device=tgt_ids.device)[None, :]
                              .expand(len(src_len), -1)], 1)
            h = hidden.gather(1, prev[:, :, None].expand(-1, -1, hidden.shape[-1]))
            loss = self._loss(h, valid, tgt_ids, source)
            return {"loss": loss, "loss_word": loss.detach(), "num_tokens": torch.tensor(n_tokens)}

        query = target_roles(WORD, tgt_len, lt)
        use_span = self.cfg.word_weight < 1.0
        if use_span:
            if span_start is None:
                raise ValueError("word_weight < 1 needs span boundaries (batch['span_start']) for the span flow")
            query = query.cat(target_roles(SPAN, tgt_len, lt, span_start=span_start))
        h = placeholder_pass(self.model, self.attn_id, src_len, query, kv, roles)
        out = {"num_tokens": torch.tensor(n_tokens + int(tgt_len.sum()) * (2 if use_span else 1))}
        loss_word = self._loss(h[:, :lt], valid, tgt_ids, source)
        out["loss_word"] = loss_word.detach()
        loss = loss_word
        if use_span:
            loss_span = self._loss(h[:, lt:], valid, tgt_ids, source)
            out["loss_span"] = loss_span.detach()
            loss = self.cfg.word_weight * loss_word + (1 - self.cfg.word_weight) * loss_span
        out["loss"] = loss
        return out

    def _loss(self, h: torch.Tensor, valid: torch.Tensor, tgt_ids: torch.Tensor,
              source: CopySource | None) -> torch.Tensor:
        """Label-smoothed cross-entropy at the (B, T, H) predicting states ``h`` where ``valid``."""
        if source is None:
            return smoothed_cross_entropy(self.model.logits(h[valid]), tgt_ids[valid], self.cfg.label_smoothing)
        return smoothed_nll(*copy_loss_terms(self.model, h, source, valid, tgt_ids[valid]), self.cfg.label_smoothing)


def build_objective(method: str, model: Network, preset: TaskPreset, options: dict) -> ErnieGenObjective:
    """The objective of ``--method ernie-gen|typical``: noise and label smoothing from the task preset,
    ``method_options`` (e.g. ``word_weight``) on top."""
    cfg = ErnieGenConfig(method=method, noise_rate=preset.noise_rate, label_smoothing=preset.label_smoothing,
                         noise_ramp=preset.noise_ramp, **options)
    repl = replacement_vocab(model.tokenizer, model.config.vocab_size, [model.attn_id])
    return ErnieGenObjective(model, cfg, model.attn_id, repl)


def pretrain_word_weight(method: str) -> float:
    """λ of pre-training: the paper's 0.5 (span flow on); the typical baseline has no span flow."""
    return 0.5 if method == "ernie-gen" else 1.0


# ---- decoding ----------------------------------------------------------------------------------


def step_log_probs(model: Network, ids: torch.Tensor, pos: torch.Tensor, types: torch.Tensor, mask: torch.Tensor,
                   past: list[KV] | list[PastSlot], source: CopySource | None = None
                   ) -> tuple[torch.Tensor, list[KV]]:
    """A decoding step's tokens through the network against ``past``: the (N, V) fp32 log-probabilities of the
    next token, read at the last of them, and every layer's (k, v) of the tokens. What ONNX Runtime runs
    instead when the model carries an export of it (erniegen.onnx_runtime); compiled, with torch.compile
    (erniegen.runtimes)."""
    hidden, kv = model(ids, pos, types, mask, past=past)
    return next_token_log_probs(model, hidden[:, -1:], source)[:, 0], kv


class InfillingStepper:
    """ERNIE-GEN's infilling decoding over a key/value cache.

    The step's network and head run in eager PyTorch, or in the model's step runner when it was loaded with
    another runtime (``model.step_runner``: ONNX Runtime, torch.compile; erniegen.runtimes); the cache and its
    bookkeeping are the same for all.
    """

    def __init__(self, model: Network, src_ids: torch.Tensor, src_len: torch.Tensor, max_length: int):
        self.model, self.src_len = model, src_len
        dev = src_ids.device
        _, kv, roles = encode_context(model, src_ids, src_len)
        self.source = copy_source(model, kv, src_ids, src_len)
        self.cache = KVCache(kv, roles, src_ids.shape[1] + max_length + 1)  # +1: the step's placeholder
        self.step_no = 0
        # a step's tokens are [t_{i-1} (CONTEXT), [ATTN]_i (WORD)], the first step's the placeholder alone:
        # the same roles relative to i at every step, so their ids, roles and own mask block are built once
        self._attn = torch.tensor([[model.attn_id]], device=dev)
        self._types = torch.full((1, 2), model.target_type_id, device=dev)
        both = Roles(torch.tensor([[CONTEXT, WORD]], device=dev), torch.tensor([[-1, 0]], device=dev))
        self._roles = {t: Roles(both.code[:, -t:], both.index[:, -t:]) for t in (1, 2)}  # by token count
        self._own = {t: attention_mask(r, r) for t, r in self._roles.items()}

    def expand(self, k: int) -> None:
        self.reorder(torch.arange(len(self.src_len), device=self.src_len.device).repeat_interleave(k))

    def reorder(self, rows: torch.Tensor) -> None:
        self.cache.reorder(rows)
        self.src_len = self.src_len[rows]
        if self.source is not None:
            self.source = self.source.rows(rows)

    def step(self, prev: torch.Tensor | None) -> torch.Tensor:
        """Log-probabilities (N, V) of target token ``step_no`` given the previous one."""
        i, n = self.step_no, len(self.src_len)
        t = 1 if prev is None else 2
        attn = self._attn.expand(n, 1)
        ids = attn if prev is None else torch.cat([prev[:, None], attn], 1)
        new = Roles(self._roles[t].code.expand(n, t), (self._roles[t].index + i).expand(n, t))
        past, _ = self.cache.past(t)
        pos = self.src_len[:, None] + new.index
        types = self._types[:, :t].expand(n, t)
        runner = self.model.step_runner
        if runner is None:
            logp, _ = step_log_probs(self.model, ids, pos, types, self.cache.step_mask(new, self._own[t]), past,
                                     self.source)
        else:  # the cache's buffers whole, so none is copied and the shapes stay the same from step to step
            logp = runner(ids, pos, types, self.cache.step_mask(new, self._own[t], whole=True), past, self.source)
        if prev is not None:
            self.cache.commit(new, keep=1)
        self.step_no += 1
        return logp


class TypicalStepper(InfillingStepper):
    """Previous-token decoding for the typical-generation baseline: t_i read off t_{i-1}'s state."""

    def __init__(self, model: Network, src_ids: torch.Tensor, src_len: torch.Tensor, max_length: int):
        self.model, self.src_len = model, src_len
        hidden, kv, roles = encode_context(model, src_ids, src_len)
        self.source = copy_source(model, kv, src_ids, src_len)
        self.first = hidden[torch.arange(len(src_len)), src_len - 1]  # the source's [SEP]
        self.cache = KVCache(kv, roles, src_ids.shape[1] + max_length + 1)  # +1: the step's placeholder
        self.step_no = 0

    def reorder(self, rows: torch.Tensor) -> None:
        super().reorder(rows)
        self.first = self.first[rows]

    def step(self, prev: torch.Tensor | None) -> torch.Tensor:
        i, n, dev = self.step_no, len(self.src_len), self.src_len.device
        if prev is None:
            h = self.first
        else:
            new = Roles(torch.full((n, 1), CONTEXT, device=dev), torch.full((n, 1), i - 1, device=dev))
            past, _ = self.cache.past(1)
            pos = target_positions(self.src_len, 1) + i - 1
            types = torch.full((n, 1), self.model.target_type_id, device=dev)
            hidden, _ = self.model(prev[:, None], pos, types, self.cache.step_mask(new), past=past)
            self.cache.commit(new, keep=1)
            h = hidden[:, -1]
        self.step_no += 1
        return next_token_log_probs(self.model, h[:, None], self.source)[:, 0]


DECODERS: dict[str, Callable[[], Decoder]] = {
    "infilling": lambda: AutoregressiveDecoder(InfillingStepper, "infilling"),
    "typical": lambda: AutoregressiveDecoder(TypicalStepper, "typical"),
}
