"""Preparing a checkpoint that was never trained to generate: the [ATTN] row, a missing LM head, and an
encoder that has forgotten which word sits where.

Sentence encoders such as all-MiniLM-L6-v2 ship without a masked-LM head, so fine-tuning starts
from a random transform (dense + LayerNorm) in front of the tied output layer, and ERNIE-GEN's
[ATTN] placeholder is an ``[unused0]`` row that no pre-training ever touched. Both make the first
hundreds of fine-tuning steps spend themselves on learning what "predict the token here" means.

Three fixes, applied by the fine-tuning recipe before training:

* :func:`init_attn_embedding` starts the [ATTN] row as a copy of the [MASK] row, the embedding the
  checkpoint's own pre-training used for exactly that question;
* :func:`warm_up_head` trains only the head's transform and bias with the masked-LM objective over
  the task's own text (sources and targets), the encoder frozen and run without gradients, so the
  head learns to read this encoder's states before the encoder itself starts to move;
* :func:`adapt_to_task` then runs the same masked-LM objective with the whole model training
  (task-adaptive pre-training, Gururangan et al. 2020, "Don't Stop Pretraining"): a sentence encoder's
  upper layers were retrained to pool meaning, and 8.7k question pairs alone are too few to teach them
  token prediction again.
"""
from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .batch import pad
from .losses import log_softmax_at
from .network import Network
from .passes import encode_context
from .train import epoch_batches, last_checkpoint, load_checkpoint_file, lr_factor, now, resolve_precision

# Masked-LM warm-up defaults: BERT's 15% masking; 300 steps of 32 texts is ~1.1 passes over
# squad_qg_sent (8,699 sources + 8,699 questions); its time per CPU is in BENCHMARKS.md section 2.
HEAD_WARMUP_STEPS = 300
HEAD_WARMUP_LR = 1e-3
MASK_PROB = 0.15
# Task-adaptive pre-training: BERT's pre-training lr; the step count is the task preset's (adapt_steps).
ADAPT_LR = 1e-4
# An unfinished preparation's state, in the run's output folder. At 448-token sources the two phases take
# 40-50 min here, so they save every SAVE_EVERY_S seconds and at --max-time, and a resume goes on from there.
PREPARATION = "preparation.pt"
SAVE_EVERY_S = 300.0
PHASES = ("head warm-up", "task adaptation")


@dataclass
class Resumable:
    """Where a preparation keeps its state and when it must stop: ``deadline`` is a ``train.now()`` reading;
    ``write`` is False on every rank but 0 (all ranks run the same steps, one file holds them)."""

    path: Path
    deadline: float | None = None
    write: bool = True
    every: float = SAVE_EVERY_S


class PreparationStopped(Exception):
    """The deadline passed during a preparation phase; its state is saved for a resume."""

    def __init__(self, phase: str, step: int, steps: int, path: Path):
        super().__init__(f"stopped at the time limit during {phase} after step {step} of {steps}; "
                         f"its state is saved in {path}")
        self.phase, self.step, self.steps, self.path = phase, step, steps, path

    def summary(self) -> dict[str, Any]:
        """What a training command returns for it (``cli._report`` prints it and exits EXIT_STOPPED)."""
        return {"stopped": "max_time", "preparing": self.phase, "step": self.step, "steps": self.steps,
                "state": str(self.path)}


def resumes_preparation(output: str | os.PathLike, resume: bool) -> bool:
    """Whether this run goes on with a preparation stopped in ``output`` (its training then starts at step 0);
    a fresh run over one is refused, as over a checkpoint."""
    path = Path(output, PREPARATION)
    if path.is_file() and not resume:
        raise ValueError(f"{path} holds the state of a run stopped while preparing its checkpoint: pass "
                         "--resume (resume=True) to go on, or choose another output directory")
    return resume and path.is_file() and last_checkpoint(output) is None


class _PhaseState:
    """A preparation's saved state: which phase, how many of its steps, and all they changed (weights,
    optimizer moments, the masking and dropout generators, the losses so far)."""

    def __init__(self, where: Resumable, fingerprint: dict[str, Any]):
        self.where, self.fingerprint = where, fingerprint
        self.saved_at = now()
        self.loaded: dict[str, Any] | None = None
        if where.write:  # a save cut short by a kill leaves its temporary file; the state before it is whole
            for leftover in where.path.parent.glob(f"{where.path.name}.tmp-*"):
                leftover.unlink(missing_ok=True)
        if where.path.is_file():
            state = load_checkpoint_file(where.path)
            if state["fingerprint"] != fingerprint:
                changed = {k: (state["fingerprint"].get(k), v) for k, v in fingerprint.items()
                           if state["fingerprint"].get(k) != v}
                raise ValueError(f"{where.path}: cannot resume this preparation exactly, settings changed (saved, "
                                 f"now): {changed}; run with the first settings, or delete the file to start over")
            self.loaded = state

    def resume_point(self, phase: int) -> dict[str, Any] | None:
        """The saved state if it lies in ``phase`` (None: start the phase afresh)."""
        return self.loaded if self.loaded is not None and self.loaded["phase"] == phase else None

    def due(self) -> bool:
        return now() - self.saved_at >= self.where.every

    def out_of_time(self) -> bool:
        """Past the deadline? Every rank takes rank 0's answer, so all stop after the same step."""
        if self.where.deadline is None:
            return False
        flag = torch.tensor([float(now() >= self.where.deadline)])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast(flag, src=0)
        return bool(flag.item())

    def save(self, model: Network, phase: int, step: int, **inner: Any) -> None:
        self.saved_at = now()
        if not self.where.write:
            return
        state = {"fingerprint": self.fingerprint, "phase": phase, "step": step, "model": model.state_dict(), **inner}
        tmp = self.where.path.with_name(f"{self.where.path.name}.tmp-{os.getpid()}")
        torch.save(state, tmp)
        os.replace(tmp, self.where.path)  # a kill mid-write leaves the last whole state


def head_parameters(model: Network) -> list[torch.nn.Parameter]:
    """The LM head's own parameters: its transform and output bias, not the tied word embeddings."""
    return [model.head.dense.weight, model.head.dense.bias, model.head.norm.weight, model.head.norm.bias,
            model.head.bias]


def init_attn_embedding(model: Network) -> bool:
    """Copy the [MASK] embedding into the [ATTN] row when [ATTN] is a reserved ``[unused*]`` slot.

    Returns whether the row was written. Called only for checkpoints erniegen never trained: an
    erniegen checkpoint's [ATTN] row is already trained.
    """
    tok = model.tokenizer
    attn_id = model.attn_id
    if tok is None or tok.mask_token_id is None or attn_id == tok.mask_token_id:
        return False
    if not tok.convert_ids_to_tokens(attn_id).startswith("[unused"):
        return False
    with torch.no_grad():
        model.embeddings.word.weight[attn_id] = model.embeddings.word.weight[tok.mask_token_id]
    return True


def prepare_checkpoint(model: Network, texts: Callable[[], Sequence[Sequence[int]]], head_steps: int | None,
                       adapt_steps: int = 0, *, seed: int = 0, progress: bool = True,
                       resumable: Resumable | None = None) -> bool:
    """Get a checkpoint erniegen never trained ready for fine-tuning or pre-training: [ATTN] from [MASK],
    ``head_steps`` masked-LM steps of the head (None: HEAD_WARMUP_STEPS when the checkpoint had no head, else
    none), then ``adapt_steps`` of the whole model (:func:`adapt_to_task`, any checkpoint). Returns whether
    any step ran.

    ``texts`` (token ids with [CLS]/[SEP]) is called only when a step runs: it may read a corpus. Every
    process runs this identically (same texts, same seed), so distributed training starts from equal weights.
    With ``resumable`` the state is saved now and then and at the deadline (then :class:`PreparationStopped`
    is raised), and a saved state is resumed exactly: the weights are those of an uninterrupted run.
    """
    fresh = not model.trained_by_erniegen
    if fresh and init_attn_embedding(model) and progress:
        print(f"note: [ATTN] ({model.settings.attn_token}) starts as a copy of the [MASK] embedding", file=sys.stderr)
    if head_steps is None or not fresh:
        head_steps = HEAD_WARMUP_STEPS if fresh and model.head_was_missing else 0
    if head_steps == 0 and adapt_steps == 0:
        return False
    corpus = texts()
    state = None
    if resumable is not None:
        fingerprint = {"head_steps": head_steps, "adapt_steps": adapt_steps, "seed": seed, "texts": len(corpus),
                       "tokens": sum(map(len, corpus))}
        state = _PhaseState(resumable, fingerprint)
        if state.loaded is not None:
            model.load_state_dict(state.loaded["model"])
            if progress:
                print(f"resuming the preparation from {resumable.path}: {PHASES[state.loaded['phase']]}, "
                      f"step {state.loaded['step']}", file=sys.stderr)
    first = 0 if state is None or state.loaded is None else state.loaded["phase"]
    if first <= 0:
        warm_up_head(model, corpus, head_steps, seed=seed, progress=progress, state=state)
    if first <= 1:
        adapt_to_task(model, corpus, adapt_steps, seed=seed + 1, progress=progress, state=state)
    return True


def mask_tokens(ids: torch.Tensor, valid: torch.Tensor, mask_id: int, prob: float,
                generator: torch.Generator) -> torch.Tensor:
    """Which valid positions to mask: each with probability ``prob``, at least one per row."""
    pick = (torch.rand(ids.shape, generator=generator) < prob) & valid
    # rows where nothing was drawn mask their first valid token (after [CLS]) so every row teaches
    first = valid.long().argmax(1)
    empty = ~pick.any(1)
    pick[empty, first[empty]] = True
    return pick


def warm_up_head(model: Network, texts: Sequence[Sequence[int]], steps: int, *, batch_size: int = 32,
                 lr: float = HEAD_WARMUP_LR, seed: int = 0, progress: bool = True,
                 state: _PhaseState | None = None) -> dict[str, float]:
    """Train the head's transform and bias for ``steps`` masked-LM steps over ``texts`` (token ids
    with [CLS]/[SEP]); everything else is frozen. Returns the first and last losses and the time."""
    return masked_lm_steps(model, texts, steps, head_parameters(model), lr=lr, batch_size=batch_size,
                           seed=seed, progress=progress, phase=0, state=state)


def adapt_to_task(model: Network, texts: Sequence[Sequence[int]], steps: int, *, batch_size: int = 32,
                  lr: float = ADAPT_LR, seed: int = 0, progress: bool = True,
                  state: _PhaseState | None = None) -> dict[str, float]:
    """Task-adaptive pre-training (Gururangan et al. 2020): masked-LM steps over the task's own text that
    train every trainable parameter, encoder included (a frozen word table stays frozen), with a linear
    warm-up over the first tenth and a linear decay to 0."""
    params = [p for p in model.parameters() if p.requires_grad]
    return masked_lm_steps(model, texts, steps, params, lr=lr, batch_size=batch_size, seed=seed,
                           progress=progress, phase=1, schedule=True, state=state)


def masked_lm_batches(lengths: Sequence[int], batch_size: int, seed: int) -> Iterator[list[int]]:
    """Text indices of each masked-LM step, pass after pass over the texts, length-bucketed as fine-tuning's
    batches are (``epoch_batches``): the task's texts mix ~46-token sources with ~14-token questions, and
    drawn at random a batch of squad_qg_sent's is 30% real tokens and 70% padding (bucketed: 93%)."""
    for epoch in range(sys.maxsize):
        yield from epoch_batches(len(lengths), epoch, seed, batch_size, lengths=lengths)


def masked_lm_steps(model: Network, texts: Sequence[Sequence[int]], steps: int, params: list[torch.nn.Parameter],
                    *, lr: float, batch_size: int, seed: int, progress: bool, phase: int,
                    schedule: bool = False, state: _PhaseState | None = None) -> dict[str, float]:
    """``steps`` masked-LM steps over ``texts`` that train ``params`` alone; the rest stays frozen.

    Runs on its own random streams (``seed``), so the caller's random state is left as it was. With ``state``
    it starts where a saved state of this phase left off, saves now and then, and at the deadline saves and
    raises :class:`PreparationStopped`; its end is saved as the next phase's start.
    """
    name = PHASES[phase]
    if steps <= 0 or not texts:
        return {}
    tok = model.tokenizer
    mask_id, pad_id = tok.mask_token_id, model.config.pad_token_id
    trained = {id(p) for p in params}
    frozen = [p for p in model.parameters() if id(p) not in trained and p.requires_grad]
    dtype = resolve_precision("auto", model.device)  # the precision fine-tuning will use by default
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, steps // 10)  # fine-tuning's schedule: linear warm-up over a tenth, linear decay to 0
    was_training = model.training
    model.train()  # dropout on, as in fine-tuning
    losses: list[float] = []
    t0 = time.time()
    batches = masked_lm_batches([len(t) for t in texts], batch_size, seed)
    saved = state.resume_point(phase) if state is not None else None
    start = 0 if saved is None else saved["step"]
    if start:
        optimizer.load_state_dict(saved["optimizer"])
        gen.set_state(saved["mask_rng"])
        losses, t0 = list(saved["losses"]), t0 - saved["seconds"]
        for _ in range(start):  # the batches are drawn from the seed alone: skip those already taken
            next(batches)
    # every masked token weighs the same in every step, as in batches drawn at random: a bucketed batch of
    # questions holds a third of the masked tokens of a batch of sources, and a per-batch mean would weigh
    # each of its tokens three times as much. So the sum over a batch is divided by the mean count instead.
    per_batch = max(1.0, MASK_PROB * min(batch_size, len(texts)) * sum(len(t) - 2 for t in texts) / len(texts))
    try:
        for p in frozen:
            p.requires_grad_(False)
        with torch.random.fork_rng(devices=[]):  # dropout's draws leave the caller's stream alone
            torch.manual_seed(seed)
            if start:
                torch.set_rng_state(saved["dropout_rng"])
            for step in tqdm(range(start, steps), desc=name, disable=not progress, dynamic_ncols=True,
                             initial=start, total=steps):
                ids, lengths = pad([texts[i] for i in next(batches)], pad_id)
                inner = torch.arange(ids.shape[1])[None, :]
                valid = (inner > 0) & (inner < lengths[:, None] - 1)  # never [CLS] or the final [SEP]
                where = mask_tokens(ids, valid, mask_id, MASK_PROB, gen)
                if schedule:
                    for group in optimizer.param_groups:
                        group["lr"] = lr * lr_factor(step, warm, steps)
                with torch.autocast(model.device.type, dtype=dtype, enabled=dtype != torch.float32):
                    # a frozen encoder builds no graph: none of its parameters asks for a gradient
                    hidden, _, _ = encode_context(model, ids.masked_fill(where, mask_id), lengths)
                    token_losses = -log_softmax_at(model.logits(hidden[where]), ids[where][:, None])[0][:, 0]
                optimizer.zero_grad(set_to_none=True)
                (token_losses.sum() / per_batch).backward()
                optimizer.step()
                losses.append(float(token_losses.detach().mean()))
                if state is not None and step + 1 < steps:
                    late = state.out_of_time()
                    if late or state.due():
                        state.save(model, phase, step + 1, optimizer=optimizer.state_dict(),
                                   mask_rng=gen.get_state(), dropout_rng=torch.get_rng_state(), losses=losses,
                                   seconds=time.time() - t0)
                    if late:
                        raise PreparationStopped(name, step + 1, steps, state.where.path)
            if state is not None:
                state.save(model, phase + 1, 0)  # the next phase starts from these weights
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
    head = max(1, math.ceil(len(losses) * 0.1))  # average the first and last tenths: single steps are noisy
    summary = {"steps": steps, "loss_first": sum(losses[:head]) / head, "loss_last": sum(losses[-head:]) / head,
               "seconds": time.time() - t0}
    if progress:
        print(f"{name}: {steps} masked-LM steps over {len(texts)} texts in {summary['seconds']:.0f} s, "
              f"loss {summary['loss_first']:.2f} -> {summary['loss_last']:.2f}", file=sys.stderr)
    return summary

