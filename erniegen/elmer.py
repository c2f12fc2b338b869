"""ELMER (Li et al., EMNLP 2022): non-autoregressive generation with an off-ramp after every layer.

Layout (nar.py's, with a fixed slot count): the source ``[CLS] X [SEP]`` is encoded once
(:func:`erniegen.passes.encode_source`); T target slots, all [MASK], attend to the source and to
every slot -- slots past a row's end included, as visible slots, since ELMER has no length predictor.
The output is what precedes the first end [SEP] (ELMER §3.1). T is the task's maximum target length:
the longest training target, end included, unless ``--max-target-len`` sets it
(finetune.fit_target_len; a preset's cap, 96 for squad_qg, would spend most of each step on slots
no question reaches).

Off-ramps: after layer l, Pr(y_t | h^l_t) = softmax(W^l_c h^l_t) (§3.2). By default every layer reads
the model's own tied LM head; ``layer_heads: true`` gives each layer but the last its own transform
(dense, LayerNorm, bias) in front of the tied word-embedding matrix -- a full V x H matrix per layer
would add tens of millions of weights to a MiniLM -- while the last layer keeps the model's head, so
the checkpoint stays a valid BERT masked-LM.

Two exits, two methods:

* ``--method elmer``, decoder ``elmer-hard`` (§3.2, hard early exit): at each off-ramp a slot whose
  prediction entropy (in nats) is below δ exits with its argmax; its state is copied unchanged to
  every higher layer, where the active slots still attend to it. Only active slots are computed
  (exited ones give keys/values, not queries), and decoding stops when none is active.
* ``--method elmer-soft``, decoder ``elmer-soft`` (§3.2, soft early exit): every slot runs every
  layer; between layers the argmax token's word embedding is joined to the hidden state and fused,
  W [Embed(ŷ^l_t); h^l_t], into the next layer's input. The output is the last layer's argmax.

Training (§3.3): the loss is the mean over layers of each off-ramp's cross-entropy, labels past a
row's end [SEP] ignored, without label smoothing (LABEL_SMOOTHING, the released code's). The paper
does not say how hard-exit models are trained; here they are trained exactly so, every slot running
every layer with a loss at every off-ramp (what the released code does). That makes every off-ramp a
predictor of the whole target, so its entropy is a meaningful exit signal at every layer whatever δ is
chosen after training; training with exits drawn per token (as LPLM pre-training does) would tie each
layer to the exit pattern of the draw.
``exits: drawn`` trains the other way instead, each slot's loss at one exit layer drawn uniformly
(:func:`drawn_exit_loss`, LPLM's draw), for comparison (benchmarks/elmer_exit_training.py); there,
as in the released code, copied states are detached. ``exits: last`` scores every slot at the last layer
only: no off-ramp below it is trained (they read the shared head, so a sure slot may still exit there), the
control that tells what the early-exit objective costs the last layer; between the two, ``last_weight``
keeps a loss at every off-ramp but gives the last one a chosen share of it (0.5: as much as all the others
together, where the plain mean gives it 1/L). Soft-exit training can follow the released code
in feeding the gold token's embedding instead of the predicted one (``gold_rate`` 0.3 there; 0 by
default here, measured: GOLD_RATE); with ``exits: all`` no state is copied, so there is nothing to detach.
``mask_mode: glat`` adds glancing training (nar.py's GLAT, as NAT and MIST train by default): a no-grad
first pass predicts every slot with the last off-ramp, ⌊f_ratio · d⌋ of the labelled slots (d = that
prediction's Hamming distance from the labels) show their reference token instead of [MASK], and only
the other labelled slots carry a loss. ``glance_end: false`` never shows the end slot (NAT's GLAT has none:
its slots are told the length, where ELMER's must place the end themselves).

What comes from elsewhere: the slot roles and positions of passes.py (ELMER's slots are NAR slots
that all count as real), masks from masks.attention_mask, the layers stepped through
``Network.embed`` / ``run_layer`` / ``Attention.keys_values``. nar.py's NarDecoder is built around a
length head, which ELMER does not have, so the decoders here implement the interface directly.

Layer Permutation LM pre-training (§3.4): :func:`corrupt`, :class:`LplmObjective`, run by
``erniegen pretrain --objective lplm`` (pretrain.py).
"""
from __future__ import annotations

import dataclasses
import math
import random
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .data import TaskPreset
from .losses import smoothed_cross_entropy
from .masks import NAR, PAD, Roles, attention_mask
from .nar import checked_f_ratio, finish_row, glancing_reveal, position_limit
from .network import ModelConfig, Network, _ACTIVATIONS
from .passes import EncodedSource, encode_source, slot_roles, target_positions
from .precision import Linear
from .search import EXIT_THRESHOLD, EXIT_THRESHOLD_KEY, DecodeOptions, Decoder, until_end

# No label smoothing, as the released code trains (a plain cross-entropy): a model fitted to targets smoothed by ε
# predicts with an entropy of at least entropy_floor(ε, V), 1.36 nats for ε = 0.1 over BERT's 30,522 words,
# above every δ the paper tries (0-1), so hard exit could not fire. The soft exit trains the same way.
LABEL_SMOOTHING = 0.0
# Soft exit: the probability of feeding the gold token's embedding instead of the prediction in training. The
# released code feeds it at 0.3; over two seeds each on squad_qg_sent, 0 scored BLEU-4 2.01 ± 0.12 / METEOR 7.84
# against 0.3's 1.31 ± 0.13 / 7.57, with a lower dev loss (5.8 vs 6.4), and ROUGE-L 24.4 against 26.8 (BENCHMARKS.md
# section 1): a model trained on gold inputs is fed only its own predictions at test time.
GOLD_RATE = 0.0
HEADS, FUSION = "elmer_heads", "elmer_fusion"  # extras, saved as erniegen.elmer_heads.* / erniegen.elmer_fusion.*
GATE = "elmer_exit_gate"  # the exit gate, fitted after training and saved beside the weights (ExitGate)
GATE_SOURCES = 2000  # training sources the gate is fitted on (~67k slots a layer at T = 37, a tenth held out)
GATE_L2 = 1e-4  # its weight decay: the states of neighbouring slots are alike, so the fit needs little
IGNORE = -100
SOFT = {"elmer": False, "elmer-soft": True}  # method -> trains the soft-exit fusion layer
EXIT_TRAINING = ("all", "drawn", "last")
ELMER_MASK_MODES = ("all", "glat")


@dataclass
class ElmerConfig:
    """``method_options`` of ``--method elmer|elmer-soft`` (label smoothing comes from the recipe: LABEL_SMOOTHING
    unless ``--label-smoothing`` sets it)."""

    method: str = "elmer"
    layer_heads: bool = False  # one off-ramp transform per layer instead of the shared LM head (§3.2)
    gold_rate: float | None = None  # elmer-soft: probability of the gold embedding in training; None: GOLD_RATE
    # hard exit: all = a loss at every off-ramp for every slot (the released code; module docstring);
    # drawn = each slot's loss at one exit layer drawn uniformly, as LPLM pre-trains (the ablation);
    # last = every slot's loss at the last layer only (the control: no early-exit objective)
    exits: str = "all"
    # exits: all (hard or soft): the share of the loss at the last off-ramp, the rest spread evenly over the
    # others; None: 1/L, the released code's plain mean. Measured: what a last layer given more of the loss
    # keeps of both the early exits and the quality (BENCHMARKS.md section 1)
    last_weight: float | None = None
    mask_mode: str = "all"  # all: every slot [MASK]; glat: glancing training (module docstring)
    f_ratio: float | None = None  # glat: share of the first pass's wrong slots revealed; None: GLAT_F_RATIO
    # glat: whether the end slot may be revealed as any labelled slot is (NAT's GLAT has no end slot: its
    # length is given); false: the end is never shown, so placing it always carries a loss (measured worse:
    # BENCHMARKS.md section 1, "Is it the length?")
    glance_end: bool = True
    label_smoothing: float = 0.1

    def __post_init__(self) -> None:
        if self.method not in SOFT:
            raise ValueError(f"ElmerConfig handles {list(SOFT)}, not {self.method!r}")
        if self.gold_rate is not None and not SOFT[self.method]:
            raise ValueError("gold_rate is only used with --method elmer-soft")
        if SOFT[self.method] and self.gold_rate is None:
            self.gold_rate = GOLD_RATE
        if self.exits not in EXIT_TRAINING:
            raise ValueError(f"exits must be one of {EXIT_TRAINING}, got {self.exits!r}")
        if self.exits != "all" and SOFT[self.method]:
            raise ValueError(f"exits: {self.exits} trains hard exits; --method elmer-soft runs every layer for "
                             f"every slot")
        if self.last_weight is not None and self.exits != "all":
            raise ValueError(f"last_weight weighs the off-ramps of exits: all; exits: {self.exits} has one loss "
                             f"per slot")
        if self.last_weight is not None and not 0.0 < self.last_weight <= 1.0:
            raise ValueError(f"last_weight must be in (0, 1], got {self.last_weight}")
        if self.gold_rate is not None and not 0.0 <= self.gold_rate <= 1.0:
            raise ValueError(f"gold_rate must be in [0, 1], got {self.gold_rate}")
        self.f_ratio = checked_f_ratio(self.mask_mode, self.f_ratio, ELMER_MASK_MODES)
        if not self.glance_end and self.mask_mode != "glat":
            raise ValueError("glance_end is only used with mask_mode: glat")



def entropy_floor(smoothing: float, vocab: int) -> float:
    """The entropy (nats) of a target smoothed by ``smoothing`` over ``vocab`` words as cross_entropy smooths it
    (1 - ε + ε/V on the gold word, ε/V elsewhere): what a model that fits such targets predicts."""
    if smoothing <= 0:
        return 0.0
    gold, other = 1 - smoothing + smoothing / vocab, smoothing / vocab
    return -(gold * math.log(gold) + (vocab - 1) * other * math.log(other))


# ---- off-ramps and fusion ----------------------------------------------------------------------


class OffRamp(nn.Module):
    """A layer's own masked-LM transform; its output matrix is the tied word embeddings."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.act = _ACTIVATIONS[cfg.hidden_act]

    def forward(self, h: torch.Tensor, project: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``project`` is the main head's :meth:`~erniegen.network.LMHead.project` (the tied output layer)."""
        return project(self.norm(self.act(self.dense(h))), self.bias)


class ExitGate(nn.Module):
    """A cheaper exit test for the hard exit: for each layer below the last, a logistic regression on a slot's
    hidden state for "this off-ramp's prediction is already the last layer's" (the early-exit classifier of
    CALM, Schuster et al. 2022, fitted to ELMER's off-ramps). It costs H multiply-adds a slot where the entropy
    rule's off-ramp costs H x V (a 30,522-word projection, about 6.6 layers of this model), so only a slot that
    leaves is projected, once. Not in the ELMER paper; fitted to a trained model by :func:`fit_exit_gate`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(cfg.num_hidden_layers - 1, cfg.hidden_size))
        self.bias = nn.Parameter(torch.zeros(cfg.num_hidden_layers - 1))

    def forward(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """The probability (...,) that off-ramp ``layer`` (0-based, below the last) already predicts the last's."""
        return torch.sigmoid(hidden.float() @ self.weight[layer].float() + self.bias[layer].float())


def attach(model: Network, layer_heads: bool = False, soft: bool = False, training: bool = False) -> None:
    """Attach the per-layer heads and the fusion layer that training asks for or the checkpoint holds, and
    the exit gate it holds, unless for ``training``: a gate fitted to the weights training will change is
    dropped (fit it again on the trained model).

    Fresh per-layer heads start as copies of the shared head, and a fresh fusion layer passes the
    hidden state through (W = [0 I]), so training starts from the pre-trained network's own
    predictions and layer inputs instead of inputs a random fusion would scale down.
    """
    cfg = model.config
    if layer_heads or model.has_saved_extra(HEADS):
        fresh = HEADS not in model.extras and not model.has_saved_extra(HEADS)
        heads = model.add_extra(HEADS, nn.ModuleList(OffRamp(cfg) for _ in range(cfg.num_hidden_layers - 1)))
        if fresh:
            for head in heads:
                head.load_state_dict({k: v for k, v in model.head.state_dict().items() if k != "word.weight"})
    if training and model.drop_extra(GATE):
        print("note: the exit gate of this checkpoint was fitted to its weights, which training changes; "
              "dropped (fit one again with `erniegen exit-gate` after training)", file=sys.stderr)
    elif model.has_saved_extra(GATE):
        model.add_extra(GATE, ExitGate(cfg))
    if soft or model.has_saved_extra(FUSION):
        fresh = FUSION not in model.extras and not model.has_saved_extra(FUSION)
        fusion = model.add_extra(FUSION, Linear(2 * cfg.hidden_size, cfg.hidden_size))
        if fresh:
            with torch.no_grad():
                fusion.weight.zero_()
                fusion.weight[:, cfg.hidden_size:] = torch.eye(cfg.hidden_size)


def layer_logits(model: Network, layer: int, hidden: torch.Tensor) -> torch.Tensor:
    """Off-ramp ``layer`` (0-based): vocabulary scores of ``hidden`` (..., H)."""
    if HEADS in model.extras and layer < len(model.layers) - 1:
        return model.extras[HEADS][layer](hidden, model.head.project)
    return model.logits(hidden)


def fuse(model: Network, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Soft exit: the next layer's input W [Embed(ŷ); h] from the predicted ids and the hidden states."""
    return model.extras[FUSION](torch.cat([model.embeddings.word(ids), hidden], -1))


# ---- slots -------------------------------------------------------------------------------------


def slot_count(model: Network) -> int:
    """T, the slots of every row: the ``max_target_len`` the model was fine-tuned with."""
    n = model.settings.extra.get("max_target_len")
    if n is None:
        raise ValueError("this model has no max_target_len in its settings; ELMER decoders need a model "
                         "fine-tuned with --method elmer or elmer-soft")
    return int(n)


@dataclass
class Slots:
    """T all-[MASK] target slots of each row against an encoded source."""

    x: torch.Tensor  # (N,T,H) the input of layer 0
    roles: Roles  # NAR for every slot
    mask: torch.Tensor  # (N,T,S+T): the source's real tokens and every slot


def make_slots(model: Network, source: EncodedSource, width: int, ids: torch.Tensor | None = None) -> Slots:
    """Every slot is a visible NAR slot: ELMER has no length, so a row has no padding slots. Their input
    ids are [MASK] unless given (glancing training reveals some reference tokens)."""
    n = len(source.length)
    if int(source.length.max()) + width > position_limit(model):
        raise ValueError(f"a source of {int(source.length.max())} tokens leaves no room for {width} target "
                         f"slots in {position_limit(model)} positions")
    roles = slot_roles(torch.full((n,), width, device=source.length.device), width)
    if ids is None:
        ids = torch.full((n, width), model.tokenizer.mask_token_id, device=source.length.device)
    x = model.embed(ids, target_positions(source.length, width), torch.full_like(ids, model.target_type_id))
    return Slots(x, roles, attention_mask(roles, source.roles.cat(roles)))


def full_pass(model: Network, source: EncodedSource, width: int, ids: torch.Tensor | None = None) -> torch.Tensor:
    """(N,T,H) the slots' last-layer states, every slot through every layer (no exit); ``ids`` as make_slots."""
    slots = make_slots(model, source, width, ids)
    x = slots.x
    for layer in range(len(model.layers)):
        x, _ = model.run_layer(layer, x, slots.mask, source.kv[layer])
    return x


def pick(scores: torch.Tensor, slot: torch.Tensor, eos: int, opts: DecodeOptions) -> torch.Tensor:
    """Argmax ids of scores (M,V), logits or log-probs alike, at slot indices ``slot`` (M,): banned ids never,
    the end token not before ``opts.min_length`` (which counts the end token, as the autoregressive decoders do).
    Only the rows whose plain argmax is refused are masked and searched again: a masked copy of all M x V
    scores costs about as much as a log-softmax, a sixth of the projection that made them."""
    ids = scores.argmax(-1)
    refused = (ids == eos) & (slot + 1 < opts.min_length)
    if opts.banned_ids:
        refused |= torch.isin(ids, torch.tensor(list(opts.banned_ids), device=ids.device))
    if bool(refused.any()):
        again = scores[refused].clone()
        if opts.banned_ids:
            again[:, list(opts.banned_ids)] = float("-inf")
        again[:, eos] = torch.where(slot[refused] + 1 < opts.min_length, float("-inf"), again[:, eos])
        ids[refused] = again.argmax(-1)
    return ids


def outputs(tokens: torch.Tensor, eos: int, opts: DecodeOptions) -> list[list[int]]:
    """What precedes each row's first end token, at most ``max_length - 1`` ids (the end token counts);
    with ``opts.dedup`` consecutive repeats dropped first (the released ELMER code scores so), else with
    ``block_repeated_words`` repeated words (:func:`erniegen.nar.finish_row`)."""
    return [finish_row(until_end(row, eos), opts)[: opts.max_length - 1] for row in tokens.tolist()]


# ---- hard exit ---------------------------------------------------------------------------------


@dataclass
class HardExit:
    """A hard-exit pass: each slot's id, the layer (1-based) it exited at, and every layer's states."""

    tokens: torch.Tensor  # (N,T)
    exit_layer: torch.Tensor  # (N,T)
    states: list[torch.Tensor]  # L x (N,T,H): after layer l, exited slots hold their copied state


def hard_exit(model: Network, source: EncodedSource, width: int, threshold: float, opts: DecodeOptions,
              active_only: bool = True) -> HardExit:
    """Run T slots with hard early exit at entropy threshold ``threshold`` (nats), or by the exit gate
    when ``opts.exit_gate`` is set (:class:`ExitGate`; the threshold is then unused).

    ``active_only`` computes each layer for the active slots only, with the exited ones' keys/values
    as ``past`` (while every slot is active, the plain pass: packing them would compute their keys and
    values twice); ``False`` computes every slot and keeps the exited ones' old states, the plain
    reference the fast path is tested against.
    """
    slots, eos = make_slots(model, source, width), model.tokenizer.sep_token_id
    n, t, _ = slots.x.shape
    x, n_layers = slots.x, len(model.layers)
    active = torch.ones(n, t, dtype=torch.bool, device=x.device)
    tokens = torch.zeros(n, t, dtype=torch.long, device=x.device)
    exit_layer = torch.zeros_like(tokens)
    states: list[torch.Tensor] = []
    for layer in range(n_layers):
        if active_only and not bool(active.all()):
            x = _active_layer(model, layer, x, active, slots.roles, source)
        else:
            out, _ = model.run_layer(layer, x, slots.mask, source.kv[layer])
            x = torch.where(active[:, :, None], out, x)
        states.append(x)
        if layer < n_layers - 1 and opts.exit_gate is None and threshold <= 0:
            continue  # no entropy is below 0: skip the off-ramp (a vocabulary projection) nothing can leave by
        rows, cols = active.nonzero(as_tuple=True)
        hidden, logp = x[rows, cols], None
        if layer < n_layers - 1:
            if opts.exit_gate is not None:
                leaving = model.extras[GATE](layer, hidden) >= opts.exit_gate
            else:
                logp = torch.log_softmax(layer_logits(model, layer, hidden).float(), -1)
                leaving = -(logp.exp() * logp).sum(-1) < threshold
                logp = logp[leaving]
            rows, cols, hidden = rows[leaving], cols[leaving], hidden[leaving]
            if not len(rows):
                continue
        # the gate's way and the last layer: only the slots that leave are projected, and their argmax needs no
        # log-softmax
        scores = layer_logits(model, layer, hidden) if logp is None else logp
        tokens[rows, cols] = pick(scores, cols, eos, opts)
        exit_layer[rows, cols] = layer + 1
        active[rows, cols] = False
        if not bool(active.any()):
            break
    states += [x] * (n_layers - len(states))  # layers never run: every slot's state is copied up
    return HardExit(tokens, exit_layer, states)


def _active_layer(model: Network, layer: int, x: torch.Tensor, active: torch.Tensor, roles: Roles,
                  source: EncodedSource) -> torch.Tensor:
    """Layer ``layer`` for the active slots only, packed to the left of each row; exited slots offer
    the keys/values of their copied states as past, after the source's."""
    n, t, h = x.shape
    take = torch.sort(active.long(), dim=1, descending=True, stable=True).indices[:, : int(active.sum(1).max())]
    live = active.gather(1, take)
    gather = take[:, :, None].expand(-1, -1, h)
    queries = x.gather(1, gather)
    k, v = model.layers[layer].attn.keys_values(x)
    past = (torch.cat([source.kv[layer][0], k], 2), torch.cat([source.kv[layer][1], v], 2))
    exited = Roles(torch.where(active, PAD, NAR), torch.where(active, -1, roles.index))
    new = Roles(torch.where(live, NAR, PAD), torch.where(live, roles.index.gather(1, take), -1))
    mask = attention_mask(new, source.roles.cat(exited).cat(new))
    out, _ = model.run_layer(layer, queries, mask, past)
    return x.scatter(1, gather, torch.where(live[:, :, None], out, queries))


class HardExitDecoder(Decoder):
    """``elmer-hard``: T = the model's ``max_target_len`` slots with hard early exit at
    ``opts.exit_threshold`` (the model's default: search.EXIT_THRESHOLD, the paper's δ = 0.5, or 0 if it was
    trained with ``exits: last``, see build_objective). Only sources reach it; no reference length exists to read."""

    name = "elmer-hard"

    def __init__(self, record_exits: bool = False):
        # exit layer (1-based) -> how many output slots left there, over every batch decoded since
        self.exit_counts: Counter[int] | None = Counter() if record_exits else None

    @torch.no_grad()
    def __call__(self, model: Network, src_ids: torch.Tensor, src_len: torch.Tensor,
                 opts: DecodeOptions) -> list[list[int]]:
        check_soft(model, soft=False)
        if opts.exit_gate is not None and GATE not in model.extras:
            raise ValueError("exit_gate needs the model's exit gate, and this model has none: fit one with "
                             "`erniegen exit-gate --model MODEL --input TRAIN.jsonl`")
        source, _ = encode_source(model, src_ids, src_len, hidden=False)
        eos = model.tokenizer.sep_token_id
        out = hard_exit(model, source, slot_count(model), opts.exit_threshold, opts)
        if self.exit_counts is not None:
            self.exit_counts.update(out.exit_layer[output_slots(out.tokens, eos)].tolist())
        return outputs(out.tokens, eos, opts)


def output_slots(tokens: torch.Tensor, eos: int) -> torch.Tensor:
    """(N,T) bool: the slots an output is made of, each row's up to and including its first end token.
    The slots after it are computed too, but what they predict is thrown away: exit shares count these."""
    ends = (tokens == eos).long()
    return ends.cumsum(1) - ends == 0


def exit_shares(counts: Counter[int], n_layers: int) -> list[float]:
    """The share of slots exiting at each layer 1..L (ELMER's Figure 2) from :class:`HardExitDecoder` counts."""
    total = sum(counts.values())
    return [counts.get(layer, 0) / total if total else 0.0 for layer in range(1, n_layers + 1)]


# ---- the exit gate -----------------------------------------------------------------------------


@torch.no_grad()
def gate_examples(model: Network, src_ids: torch.Tensor, src_len: torch.Tensor,
                  opts: DecodeOptions) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each layer below the last, every slot's state after it (M,H) and whether its off-ramp's pick is the
    last layer's (M,): what the exit gate learns from. Every slot runs every layer (no early exit)."""
    source, _ = encode_source(model, src_ids, src_len, hidden=False)
    width, eos = slot_count(model), model.tokenizer.sep_token_id
    out = hard_exit(model, source, width, 0.0, dataclasses.replace(opts, exit_gate=None), active_only=False)
    slot = torch.arange(width, device=src_ids.device).repeat(len(src_len))
    final = out.tokens.flatten()
    examples = []
    for layer, x in enumerate(out.states[:-1]):
        hidden = x.flatten(0, 1)
        examples.append((hidden.float(), pick(layer_logits(model, layer, hidden), slot, eos, opts) == final))
    return examples


def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float = GATE_L2, steps: int = 200
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights (H,) and bias () of an L2-regularised logistic regression of ``y`` (M,) bool on ``x`` (M,H),
    by L-BFGS from the base rate."""
    rate = y.float().mean().clamp(1e-4, 1 - 1e-4)
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.log(rate / (1 - rate)).detach().requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ w + b, y.float()) + l2 * w.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def fit_exit_gate(model: Network, sources: Sequence[Sequence[int]], batch_size: int = 32,
                  held_out: float = 0.1, progress: bool = False) -> list[dict[str, float]]:
    """Fit the model's :class:`ExitGate` to token-id ``sources`` (training sources: the dev set stays for
    choosing and scoring), after the model's own decoding settings. The last ``held_out`` share of them only
    measures the fit: per layer, the share of slots whose prediction is already the last layer's, and at gate
    0.5 and 0.9 the share that would leave and how many of those agree."""
    from .batch import pad
    from .search import options_from_settings
    if not sources:
        raise ValueError("fitting an exit gate needs at least one source")
    check_soft(model, soft=False)
    model.eval()
    opts, n_fit = options_from_settings(model), len(sources) - int(len(sources) * held_out)
    data: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for part, chosen in {"fit": sources[:n_fit], "held_out": sources[n_fit:]}.items():
        chosen = sorted(chosen, key=len)  # batches of like lengths pad little
        starts = range(0, len(chosen), batch_size)
        if progress:
            from tqdm.auto import tqdm
            starts = tqdm(starts, desc=f"exit gate ({part} sources)", unit="batch")
        per_layer: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in model.layers[:-1]]
        for i in starts:
            src, src_len = pad(chosen[i:i + batch_size], model.config.pad_token_id)
            for layer, pair in enumerate(gate_examples(model, src.to(model.device), src_len.to(model.device), opts)):
                per_layer[layer].append(pair)
        data[part] = [(torch.cat([x for x, _ in p]), torch.cat([y for _, y in p])) for p in per_layer] if chosen else []
    stats = []
    gate = model.add_extra(GATE, ExitGate(model.config))
    for layer, (x, y) in enumerate(data["fit"]):
        w, b = fit_logistic(x, y)
        with torch.no_grad():
            gate.weight[layer], gate.bias[layer] = w, b
        row = {"layer": layer + 1, "agree": y.float().mean().item()}
        if data["held_out"]:
            hx, hy = data["held_out"][layer]
            p = gate(layer, hx)
            row["held_out_agree"] = hy.float().mean().item()
            for level in (0.5, 0.9):
                leaving = p >= level
                row[f"leave@{level}"] = leaving.float().mean().item()
                row[f"agree_when_leaving@{level}"] = hy[leaving].float().mean().item() if leaving.any() else 1.0
        stats.append(row)
    return stats


# ---- soft exit ---------------------------------------------------------------------------------


def soft_exit_layers(model: Network, source: EncodedSource, width: int, gold: torch.Tensor | None = None,
                     gold_rate: float = 0.0, slot_ids: torch.Tensor | None = None,
                     scored: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
    """Each layer's off-ramp logits of a soft-exit pass: (N,T,V), or (n,V) for the slots the boolean (N,T)
    ``scored`` selects. Between layers the argmax of every slot (or, with probability ``gold_rate``, the
    ``gold`` id where it is not IGNORE) is fused into the next input.

    Training passes ``scored`` (its labelled slots): the other slots need only their argmax, so their
    scores are computed without a graph; the off-ramps over 30,522 words are most of a soft-exit step.
    """
    slots = make_slots(model, source, width, slot_ids)
    x, n_layers = slots.x, len(model.layers)
    for layer in range(n_layers):
        x, _ = model.run_layer(layer, x, slots.mask, source.kv[layer])
        logits = layer_logits(model, layer, x if scored is None else x[scored])
        yield logits
        if layer == n_layers - 1:
            break
        if scored is None:
            ids = logits.detach().argmax(-1)
        else:
            ids = torch.empty(scored.shape, dtype=torch.long, device=x.device)
            ids[scored] = logits.detach().argmax(-1)
            with torch.no_grad():
                ids[~scored] = layer_logits(model, layer, x[~scored]).argmax(-1)
        if gold is not None and gold_rate > 0:
            swap = (torch.rand(ids.shape, device=ids.device) < gold_rate) & (gold != IGNORE)
            ids = torch.where(swap, gold, ids)
        x = fuse(model, x, ids)


class SoftExitDecoder(Decoder):
    """``elmer-soft``: every slot runs every layer with fused predictions; the last layer's argmax."""

    name = "elmer-soft"

    @torch.no_grad()
    def __call__(self, model: Network, src_ids: torch.Tensor, src_len: torch.Tensor,
                 opts: DecodeOptions) -> list[list[int]]:
        check_soft(model, soft=True)
        source, _ = encode_source(model, src_ids, src_len, hidden=False)
        width, eos = slot_count(model), model.tokenizer.sep_token_id
        *_, logits = soft_exit_layers(model, source, width)
        slot = torch.arange(width, device=logits.device).repeat(len(src_len))
        tokens = pick(logits.flatten(0, 1), slot, eos, opts)
        return outputs(tokens.view(-1, width), eos, opts)


def check_soft(model: Network, soft: bool) -> None:
    """A soft-exit model's layers expect fused inputs, a hard-exit model's plain ones: refuse to mix."""
    attach(model)
    if soft and FUSION not in model.extras:
        raise ValueError("elmer-soft needs a model fine-tuned with --method elmer-soft (it has no fusion layer)")
    if not soft and FUSION in model.extras:
        raise ValueError("this model was fine-tuned with --method elmer-soft; decode it with --decoder elmer-soft")


# ---- training ----------------------------------------------------------------------------------


def slot_labels(tgt_ids: torch.Tensor, tgt_len: torch.Tensor, width: int) -> torch.Tensor:
    """(N,T) labels: the target ids, end [SEP] included, then IGNORE."""
    if int(tgt_len.max()) > width:
        raise ValueError(f"a target has {int(tgt_len.max())} ids (end [SEP] included) but ELMER has {width} "
                         f"slots; raise max_target_len")
    labels = torch.full((len(tgt_len), width), IGNORE, dtype=torch.long, device=tgt_ids.device)
    w = min(width, tgt_ids.shape[1])
    valid = torch.arange(w, device=tgt_ids.device)[None, :] < tgt_len[:, None]
    labels[:, :w] = torch.where(valid, tgt_ids[:, :w], IGNORE)
    return labels


# Where LPLM's slots exit: "drawn" = uniformly over 1..L (ELMER §3.4); "last" = every slot at the last layer,
# the control that tells what the drawn exits add to any masked-LM-style pre-training (which also trains the
# masked-LM head all-MiniLM-L6-v2 lacks)
LPLM_EXITS: tuple[str, ...] = ("drawn", "last")


def draw_exit_layers(shape: tuple[int, ...], n_layers: int, device: torch.device | None = None) -> torch.Tensor:
    """LPLM: each target token's exit layer, uniform over 1..L."""
    return torch.randint(1, n_layers + 1, shape, device=device)


def drawn_exit_loss(model: Network, source: EncodedSource, labels: torch.Tensor,
                    label_smoothing: float, slot_ids: torch.Tensor | None = None, exits: str = "drawn"
                    ) -> torch.Tensor:
    """Each slot runs up to an exit layer drawn uniformly (:func:`draw_exit_layers`; ``exits="last"``: the
    last layer), is predicted by that layer's off-ramp and is copied unchanged above it; the mean
    cross-entropy of the labelled slots.

    As in the released code, copied states are detached: a slot's prediction trains the layers up to
    its exit, not the layers above through the keys/values it offers there.
    """
    n = len(model.layers)
    exits = (draw_exit_layers(labels.shape, n, labels.device) if exits == "drawn"
             else torch.full(labels.shape, n, device=labels.device))
    slots = make_slots(model, source, labels.shape[1], slot_ids)
    x, logits, gold = slots.x, [], []
    for layer in range(n):
        out, _ = model.run_layer(layer, x, slots.mask, source.kv[layer])
        x = torch.where((exits > layer)[:, :, None], out, x.detach())
        here = (exits == layer + 1) & (labels != IGNORE)
        logits.append(layer_logits(model, layer, x[here]))
        gold.append(labels[here])
    return smoothed_cross_entropy(torch.cat(logits), torch.cat(gold), label_smoothing)


class ElmerObjective(nn.Module):
    """``forward(**batch)`` -> the mean over layers of each off-ramp's cross-entropy (``exits: all``; weighted
    toward the last one by ``last_weight``), or
    each slot's loss at an exit layer drawn as LPLM draws it (``exits: drawn``) or at the last layer
    (``exits: last``), hard exit only."""

    def __init__(self, model: Network, cfg: ElmerConfig, width: int):
        super().__init__()
        if model.tokenizer is None:
            raise ValueError("ELMER training needs the model's tokenizer (for [MASK] and [SEP])")
        self.model, self.cfg, self.width = model, cfg, width
        self.soft = SOFT[cfg.method]
        attach(model, cfg.layer_heads, self.soft, training=True)

    def forward(self, src_ids: torch.Tensor, src_len: torch.Tensor, tgt_ids: torch.Tensor, tgt_len: torch.Tensor,
                **ignored) -> dict[str, torch.Tensor]:
        source, _ = encode_source(self.model, src_ids, src_len, hidden=False)
        gold = slot_labels(tgt_ids, tgt_len, self.width)
        n_tokens = src_len.sum() + len(src_len) * self.width
        slot_ids, labels = None, gold
        if self.cfg.mask_mode == "glat" and self.training:
            among = None
            if not self.cfg.glance_end:
                among = torch.arange(self.width, device=gold.device)[None, :] != (tgt_len - 1)[:, None]
            revealed = glancing_reveal(self.first_pass(source), gold, gold != IGNORE, self.cfg.f_ratio, among)
            slot_ids = torch.where(revealed, gold, self.model.tokenizer.mask_token_id)
            labels = gold.masked_fill(revealed, IGNORE)  # a revealed slot shows its answer: no loss there
            n_tokens = n_tokens + len(src_len) * self.width  # the first pass's slots (the source is encoded once)
        where = labels != IGNORE
        if self.cfg.exits != "all":
            return {"loss": drawn_exit_loss(self.model, source, labels, self.cfg.label_smoothing, slot_ids,
                                            self.cfg.exits),
                    "num_tokens": n_tokens}
        if self.soft:
            gold_rate = self.cfg.gold_rate if self.training else 0.0
            logits = list(soft_exit_layers(self.model, source, self.width, gold, gold_rate, slot_ids, where))
        else:
            logits = list(self._layer_logits(source, where, slot_ids))
        losses = torch.stack([smoothed_cross_entropy(lg, labels[where], self.cfg.label_smoothing) for lg in logits])
        return {"loss": self.weighted(losses), "loss_first": losses[0].detach(),
                "loss_last": losses[-1].detach(), "num_tokens": n_tokens}

    def weighted(self, losses: torch.Tensor) -> torch.Tensor:
        """The mean of the off-ramps' losses, or ``last_weight`` of it at the last one and the rest spread evenly."""
        w = self.cfg.last_weight
        if w is None or len(losses) == 1:
            return losses.mean()
        return w * losses[-1] + (1 - w) * losses[:-1].mean()

    @torch.no_grad()
    def first_pass(self, source: EncodedSource) -> torch.Tensor:
        """GLAT's first pass: every slot [MASK], the argmax (N,T) of the last off-ramp, in the current mode."""
        if self.soft:
            *_, logits = soft_exit_layers(self.model, source, self.width)
            return logits.argmax(-1)
        last = len(self.model.layers) - 1
        return layer_logits(self.model, last, full_pass(self.model, source, self.width)).argmax(-1)

    def _layer_logits(self, source: EncodedSource, where: torch.Tensor,
                      slot_ids: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
        """Hard-exit training: every slot runs every layer; each off-ramp scores the labelled slots."""
        model = self.model
        slots = make_slots(model, source, self.width, slot_ids)
        x = slots.x
        for layer in range(len(model.layers)):
            x, _ = model.run_layer(layer, x, slots.mask, source.kv[layer])
            yield layer_logits(model, layer, x[where])


def build_objective(method: str, model: Network, preset: TaskPreset, options: dict) -> ElmerObjective:
    """The objective of ``--method elmer|elmer-soft``; T = the preset's ``max_target_len`` (fitted to the
    training targets by fine-tuning)."""
    cfg = ElmerConfig(**(options | {"method": method, "label_smoothing": preset.label_smoothing}))
    floor = entropy_floor(cfg.label_smoothing, model.config.vocab_size)
    if not SOFT[method] and floor >= EXIT_THRESHOLD:
        print(f"warning: label smoothing {cfg.label_smoothing} keeps the off-ramps' entropy above ~{floor:.2f} nats, "
              f"over the default exit threshold δ = {EXIT_THRESHOLD}: few slots will exit before the last layer "
              f"(ELMER trains with {LABEL_SMOOTHING})", file=sys.stderr)
    model.settings.extra = model.settings.extra | {"max_target_len": int(preset.max_target_len)}
    if cfg.exits == "last":  # no off-ramp below the last was trained: decode with the plain pass unless told
        model.settings.extra = model.settings.extra | {EXIT_THRESHOLD_KEY: 0.0}
    return ElmerObjective(model, cfg, int(preset.max_target_len))


# ---- Layer Permutation LM pre-training (§3.4) --------------------------------------------------

INFILL_RATE = 0.15  # text infilling masks this share of the tokens (BART's setting, which LPLM corrupts with)
SPAN_LAMBDA = 3.0  # λ of the Poisson span lengths (BART, LPLM)
SENTENCE_ENDS = (".", "?", "!")  # tokens that end a sentence, for sentence shuffling


@dataclass
class Corruption:
    """LPLM's noisy input: the shuffled sentences, the infilling spans on them and the result."""

    shuffled: list[int]  # the sequence after sentence shuffling
    spans: list[tuple[int, int]]  # (start, length) in ``shuffled``, left to right, never touching
    source: list[int]  # ``shuffled`` with each span replaced by one [MASK]


def split_sentences(ids: Sequence[int], end_ids: set[int]) -> list[list[int]]:
    """Sentences of a token sequence, each ending after a sentence-final token (the tail is one too)."""
    sentences, current = [], []
    for t in ids:
        current.append(t)
        if t in end_ids:
            sentences.append(current)
            current = []
    return sentences + ([current] if current else [])


def poisson(rng: random.Random, lam: float) -> int:
    """A Poisson(λ) draw (Knuth's product of uniforms; fine for small λ)."""
    limit, k, p = math.exp(-lam), 0, rng.random()
    while p > limit:
        k, p = k + 1, p * rng.random()
    return k


def corrupt(ids: Sequence[int], end_ids: set[int], mask_id: int, rng: random.Random, rate: float = INFILL_RATE,
            lam: float = SPAN_LAMBDA) -> Corruption:
    """Sentence shuffling, then text infilling (§3.4, after BART): spans of Poisson(λ) length cover
    round(rate · n) tokens and each becomes one [MASK].

    Zero-length draws are drawn again (BART's zero-length spans insert a [MASK]; here every [MASK]
    stands for at least one token), the last span is cut to the budget, and a span that would overlap
    or touch an earlier one is drawn again, so spans and [MASK]s stay one to one. Placement gives up
    after 100 failed draws in a row, leaving a short sequence with fewer masked tokens.
    """
    sentences = split_sentences(ids, end_ids)
    rng.shuffle(sentences)
    shuffled = [t for s in sentences for t in s]
    n, left, taken, failures = len(shuffled), round(rate * len(shuffled)), [False] * (len(shuffled) + 2), 0
    spans: list[tuple[int, int]] = []
    while left > 0 and failures < 100:
        length = 0
        while length == 0:
            length = poisson(rng, lam)
        length = min(length, left, n)
        start = rng.randrange(n - length + 1)
        if any(taken[start:start + length + 2]):  # taken is offset by one: neighbours included
            failures += 1
            continue
        failures = 0
        taken[start + 1:start + length + 1] = [True] * length
        spans.append((start, length))
        left -= length
    spans.sort()
    source, at = [], 0
    for start, length in spans:
        source += [*shuffled[at:start], mask_id]
        at = start + length
    return Corruption(shuffled, spans, source + shuffled[at:])


def lplm_features(ids: Sequence[int], tokenizer, rng: random.Random) -> dict[str, list[int]]:
    """One LPLM example: source ``[CLS] corrupted [SEP]``, target the original ``ids [SEP]``."""
    ends = {i for i in tokenizer.convert_tokens_to_ids(list(SENTENCE_ENDS)) if i != tokenizer.unk_token_id}
    noisy = corrupt(ids, ends, tokenizer.mask_token_id, rng)
    return {"source_ids": [tokenizer.cls_token_id, *noisy.source, tokenizer.sep_token_id],
            "target_ids": [*ids, tokenizer.sep_token_id]}


class LplmObjective(nn.Module):
    """Layer Permutation LM: each slot runs up to its drawn exit layer, is predicted by that layer's
    off-ramp and is copied unchanged above it; the loss is the mean over labelled slots.

    See :func:`drawn_exit_loss`.
    """

    def __init__(self, model: Network, width: int, label_smoothing: float = 0.1, layer_heads: bool = False,
                 exits: str = "drawn"):
        super().__init__()
        if model.tokenizer is None:
            raise ValueError("LPLM training needs the model's tokenizer (for [MASK] and [SEP])")
        if exits not in LPLM_EXITS:
            raise ValueError(f"LPLM exits={exits!r} must be one of {list(LPLM_EXITS)}")
        self.model, self.width, self.label_smoothing, self.exits = model, width, label_smoothing, exits
        attach(model, layer_heads, training=True)

    def forward(self, src_ids: torch.Tensor, src_len: torch.Tensor, tgt_ids: torch.Tensor, tgt_len: torch.Tensor,
                **ignored) -> dict[str, torch.Tensor]:
        source, _ = encode_source(self.model, src_ids, src_len, hidden=False)
        labels = slot_labels(tgt_ids, tgt_len, self.width)
        loss = drawn_exit_loss(self.model, source, labels, self.label_smoothing, exits=self.exits)
        return {"loss": loss, "num_tokens": src_len.sum() + len(src_len) * self.width}


DECODERS: dict[str, Callable[[], Decoder]] = {"elmer-hard": HardExitDecoder, "elmer-soft": SoftExitDecoder}
