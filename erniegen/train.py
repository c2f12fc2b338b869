"""The training loop shared by every erniegen method (ERNIE-GEN, typical, NAT, MIST, pre-training).

A method supplies an ``objective`` module whose ``forward(**batch)`` returns ``{"loss": ...}``
(plus optional ``num_tokens`` and extra scalar losses to log), a list of tokenized examples and a
``collate`` function; :func:`train` does the rest: AdamW with linear warm-up/decay, gradient
accumulation, mixed precision, DDP (or FSDP) under ``torchrun``, periodic evaluation, best/last
checkpoints and exact resume.

Training data is either a list (shuffled each epoch, sharded by index) or a
:class:`ResumableStream` (a corpus too large for memory, e.g. pre-training): every rank reads its
own shard, each optimizer step takes exactly ``grad_accum`` micro-batches from it, a rank whose
shard ends starts its next pass on its own, ``max_steps`` bounds the run, and each rank's stream
position is saved in ``trainer_state.pt`` so a resume continues at the next unseen example.

Batch sizes: every micro-batch holds ``batch_size`` examples on every process, and one optimizer
step sums ``grad_accum`` micro-batches, so an optimizer step sees
``batch_size * grad_accum * world_size`` examples.

Resume, as a caller wires it::

    ckpt = last_checkpoint(cfg.output_dir) if cfg.resume else None
    model = Transformer.from_pretrained(ckpt or base_model)   # weights come from the caller
    train(objective, data, collate, cfg, save_model=model.save_pretrained, ...)

``train`` restores everything else (optimizer, scheduler, grad scaler, step, data position, RNGs,
``extra_state``) from ``output_dir/checkpoint-last`` and skips the micro-batches already consumed,
so the continued run is bit-identical to an uninterrupted one on the same hardware. With
``max_time`` a run that would outlast its wall-clock allowance saves and returns early instead of
being killed (``summary["stopped"]``); the next resume carries on. With ``time_budget`` the run is
instead shaped to end in time: its length (and so its warm-up, decay and noise ramp) is fitted to the
step and evaluation times it measures.

Output directory layout::

    log.jsonl                  one JSON object per log or eval event (rank 0)
    best/                      save_model() output of the best evaluation, plus eval_results.json
    checkpoint-last/           save_model() output + trainer_state.pt + rng_state_{rank}.pt
                               (+ optimizer_{rank}.pt: each rank's optimizer shard under FSDP)
"""
from __future__ import annotations

import gc
import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from erniegen.config import dataclass_to_dict
from erniegen.precision import native_bf16

CHECKPOINT_LAST = "checkpoint-last"
BEST = "best"
TRAINER_STATE = "trainer_state.pt"
LOG_FILE = "log.jsonl"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# Settings that fix the data order; changing one between a run and its resume breaks exactness.
_ORDER_KEYS = ("seed", "batch_size", "grad_accum")
_clock = time.monotonic  # what max_time is measured with (a test steps it by hand)


def now() -> float:
    """A reading of the clock ``max_time`` is measured with, for work done before :func:`train` starts."""
    return _clock()


@dataclass
class TrainConfig:
    """Optimisation, logging and checkpoint settings (the same for every method)."""

    output_dir: str
    epochs: int | None = None           # None: max_steps must be set (fine-tuning fills in the task preset's)
    max_steps: int | None = None        # optimizer steps; overrides epochs when set
    batch_size: int = 32                # examples per micro-batch, per process
    grad_accum: int = 1                 # micro-batches (of batch_size each) summed into one optimizer step
    lr: float | None = None             # peak lr; None: the recipe's (fine-tuning: the task preset's)
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1           # ERNIE-GEN: 10% linear warm-up, then linear decay
    warmup_steps: int | None = None     # overrides warmup_ratio
    clip_norm: float = 1.0              # global gradient-norm clip; 0 disables clipping
    seed: int = 42
    log_every: int = 10
    eval_every: int | None = None       # optimizer steps; None = at the end of every epoch
    save_every: int | None = None       # optimizer steps between resumable checkpoints; None = at each eval
    precision: str = "auto"             # "fp32" | "bf16" | "fp16" | "auto" (bf16 where native: see native_bf16)
    # a key of the evaluate() dict ("loss" = dev loss), or several comma-separated: compared in order,
    # each rounded to BEST_DECIMALS, so a difference below reporting precision is a tie the next key breaks
    metric_for_best: str = "loss"
    greater_is_better: bool = False
    resume: bool = False                # continue checkpoint-last; the caller loads its weights first
    num_workers: int = 0                # DataLoader worker processes for collate (list data only)
    fsdp: bool = False                  # shard weights, gradients and optimizer state (FSDP) instead of DDP
    # Evaluate and keep as best/ an exponential moving average of the weights (Polyak averaging), whose
    # decay ramps in as min(ema_decay, (1 + step) / (10 + step)); None: the raw weights.
    ema_decay: float | None = None
    eval_raw_weights: bool = False      # with ema_decay: also evaluate the raw weights (logged as eval_raw)
    # Wall-time budget in seconds, counted from train()'s start: once an optimizer step ends past it, the
    # run saves checkpoint-last and returns with summary["stopped"] = "max_time" (a later resume goes on).
    # For jobs with a wall-clock limit (batch schedulers, sessions): the work done is never lost.
    max_time: float | None = None
    # Wall-time the run should take, counted like max_time: every FIT_AFTER optimizer steps, and after each
    # evaluation, the number of steps is fitted to it from the measured step and evaluation times, at
    # most the planned epochs/max_steps, and the warm-up and decay follow the fitted length. For "the best
    # model in 20 minutes" (a demo, a fixed slot): unlike max_time the schedule finishes. A resume keeps the
    # length fitted before it.
    time_budget: float | None = None


# time_budget fits the run's length every FIT_AFTER optimizer steps; the first SKIP_STEPS' times are not
# counted (allocator and autotuning warm-up)
FIT_AFTER, SKIP_STEPS = 10, 2


# ---- distributed helpers ------------------------------------------------------------------------


def setup_distributed() -> tuple[int, int, torch.device]:
    """Join the torchrun process group if ``WORLD_SIZE`` > 1; return (rank, world_size, device).

    A plain ``python`` run is rank 0 of 1. The device is ``cuda:LOCAL_RANK`` when CUDA exists.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        # Rank 0 evaluates (e.g. decodes a dev set) while the others wait in a barrier: allow an hour.
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(minutes=60),
                                device_id=device if device.type == "cuda" else None)
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, world, device


def is_main_process() -> bool:
    """True on rank 0 (or when not distributed): the process that logs and writes files."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


# ---- configuration, optimizer, schedule, data order ------------------------------------------------


def check_config(cfg: TrainConfig, has_evaluate: bool) -> None:
    """Reject settings that cannot work; recipes call it before any model or data is touched.

    A value that is wrong is named before a length that is missing (recipes fill that one in)."""
    positive = {"batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "log_every": cfg.log_every}
    if cfg.max_steps is None and cfg.epochs is not None:
        positive["epochs"] = cfg.epochs
    for name in ("max_steps", "eval_every", "save_every"):
        if getattr(cfg, name) is not None:
            positive[name] = getattr(cfg, name)
    for name, value in positive.items():
        if value < 1:
            raise ValueError(f"{name}={value} must be >= 1")
    if cfg.lr is None:
        raise ValueError("lr is not set")
    if not 0 < cfg.lr < math.inf:
        raise ValueError(f"lr={cfg.lr} must be > 0")
    if not 0 <= cfg.seed < 2**32:   # numpy's seed range
        raise ValueError(f"seed={cfg.seed} must be in [0, 2**32)")
    for name in ("weight_decay", "clip_norm", "num_workers"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"{name}={getattr(cfg, name)} must be >= 0")
    if cfg.warmup_steps is not None and cfg.warmup_steps < 0:
        raise ValueError(f"warmup_steps={cfg.warmup_steps} must be >= 0")
    if not 0 <= cfg.warmup_ratio <= 1:
        raise ValueError(f"warmup_ratio={cfg.warmup_ratio} must be in [0, 1]")
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"precision={cfg.precision!r} must be one of {PRECISIONS}")
    if cfg.precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("precision='fp16' needs CUDA, and there is no CUDA device; use 'bf16' or 'fp32'")
    if not has_evaluate and cfg.metric_for_best != "loss":
        raise ValueError(f"metric_for_best={cfg.metric_for_best!r} needs an evaluate() function, "
                         "but none was given (no dev set?)")
    if not cfg.output_dir:
        raise ValueError("output_dir must be set")
    if cfg.max_steps is None and cfg.epochs is None:
        raise ValueError("neither epochs nor max_steps is set: the run has no length")
    if cfg.ema_decay is not None and not 0 < cfg.ema_decay < 1:
        raise ValueError(f"ema_decay={cfg.ema_decay} must be in (0, 1)")
    if cfg.ema_decay is not None and cfg.fsdp:
        raise ValueError("ema_decay with fsdp=True is not supported: each rank holds only a shard of the weights")
    if cfg.eval_raw_weights and cfg.ema_decay is None:
        raise ValueError("eval_raw_weights compares the raw weights with their moving average: set ema_decay")
    for name in ("max_time", "time_budget"):
        value = getattr(cfg, name)
        if value is not None and not 0 <= value < math.inf:
            raise ValueError(f"{name}={value} must be a number of seconds >= 0")


def parse_duration(text: str) -> float:
    """Seconds in ``[[[DD:]HH:]MM:]SS`` (PyTorch Lightning's ``max_time`` format: ``00:02:30:00`` or
    ``2:30:00``); a ValueError that quotes ``text`` otherwise."""
    parts = text.strip().split(":")
    try:
        values = [float(x) for x in parts]
    except ValueError:
        values = []
    if not 1 <= len(values) <= 4 or any(not 0 <= v < math.inf for v in values):
        raise ValueError(f"{text!r} is not a duration: use [[[DD:]HH:]MM:]SS, e.g. 1:50:00 for 1 h 50 min")
    return sum(v * u for v, u in zip(reversed(values), (1, 60, 3600, 86400)))


def time_left(cfg: TrainConfig, since: float) -> TrainConfig:
    """``cfg`` with ``max_time`` and ``time_budget`` reduced by the wall time since ``since`` (a :func:`now`
    reading): recipes that work before train() (loading, tokenizing, a head warm-up) pass their own start,
    so that both count the whole command."""
    spent = _clock() - since
    return replace(cfg, **{name: max(0.0, getattr(cfg, name) - spent) for name in ("max_time", "time_budget")
                           if getattr(cfg, name) is not None})


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The autocast dtype for ``precision`` on ``device`` (float32 = no autocast)."""
    bf16_ok = device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported())
    if precision == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        if not bf16_ok:
            raise ValueError(f"precision='bf16' is not supported on device {device}; use 'fp16' or 'fp32'")
        return torch.bfloat16
    if precision == "fp16":
        if device.type != "cuda":
            raise ValueError(f"precision='fp16' needs CUDA (device is {device}); use 'bf16' or 'fp32'")
        return torch.float16
    raise ValueError(f"precision={precision!r} must be one of {PRECISIONS}")


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW that decays matrices only: biases and LayerNorm weights (ndim < 2) are not decayed."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    # fused: one kernel per step over all tensors (CPU and CUDA); 1-10% of a step here (BENCHMARKS.md section 2)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, fused=True)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Multiplier of the base lr for the optimizer step taken after ``step`` earlier steps.

    Optimizer step s = step + 1 (1-based) uses lr * s / warmup while s <= warmup, then
    lr * (total - s + 1) / (total - warmup): no step runs at lr 0, and the lr reaches 0 after the last.
    """
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def epoch_batches(num_examples: int, epoch: int, seed: int, batch_size: int, rank: int = 0,
                  world: int = 1, lengths: Sequence[int] | None = None) -> list[list[int]]:
    """Example indices of this rank's micro-batches for ``epoch``.

    One permutation per epoch (seeded by ``seed + epoch``, identical on all ranks); its tail is cut
    so every rank gets the same count, and rank r takes every world-th index from position r.
    With ``lengths``, each window of 50 batches is sorted by length before it is cut into batches
    and the batches are then shuffled: similar lengths share a batch, so little compute goes to padding.
    """
    gen = torch.Generator().manual_seed(seed + epoch)
    perm = torch.randperm(num_examples, generator=gen).tolist()
    per_rank = num_examples // world
    mine = perm[: per_rank * world][rank::world]
    if lengths is None:
        return [mine[i: i + batch_size] for i in range(0, per_rank, batch_size)]
    window = 50 * batch_size
    batches = []
    for w in range(0, per_rank, window):
        chunk = sorted(mine[w: w + window], key=lambda i: -lengths[i])
        batches += [chunk[i: i + batch_size] for i in range(0, len(chunk), batch_size)]
    order = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in order]


# ---- data loading -------------------------------------------------------------------------------


@runtime_checkable
class ResumableStream(Protocol):
    """Training data read as a stream, for corpora that do not fit in memory.

    ``batches(epoch, rank, world)`` yields rank ``rank``'s micro-batches (lists of examples for
    ``collate``) of pass ``epoch`` over its shard, lazily: right after a micro-batch is yielded,
    ``state_dict()`` must describe the position just past it, so that after
    ``load_state_dict(that state)`` the same ``batches(epoch, ...)`` call continues with the next
    micro-batch. A call for another epoch starts that pass from its beginning. States are plain
    dicts of ints/strings (they are saved with ``torch.save`` and read with ``weights_only=True``).
    """

    def batches(self, epoch: int, rank: int, world: int) -> Iterator[list]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@contextmanager
def _rng_scope(seed: int | None = None, device: torch.device | None = None) -> Iterator[None]:
    """Run a block on its own RNG stream (optionally seeded) and put the training RNGs back after.

    Evaluation, saving and collation then never shift the dropout/noise stream of training, which
    keeps resumed runs bit-identical.
    """
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        if seed is not None:
            torch.default_generator.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class _EpochBatches(torch.utils.data.Dataset):
    """One epoch's micro-batches from ``start`` on; item j is (micro-batch index, examples)."""

    def __init__(self, data: Sequence, batches: list[list[int]], start: int):
        self.data, self.batches, self.start = data, batches, start

    def __len__(self) -> int:
        return len(self.batches) - self.start

    def __getitem__(self, j: int) -> tuple[int, list]:
        b = self.start + j
        return b, [self.data[i] for i in self.batches[b]]


class _SeededCollate:
    """Call ``collate`` with RNGs seeded by (seed, rank, epoch, micro-batch index).

    Random masking/noise done in ``collate`` then depends only on the batch's position, not on
    ``num_workers`` or on where a resumed run started.
    """

    def __init__(self, collate: Callable[[list], dict], seed: int, rank: int, epoch: int):
        self.collate, self.key = collate, (seed, rank, epoch)

    def __call__(self, item: tuple[int, list]) -> dict:
        b, examples = item
        seed = int(np.random.SeedSequence([*self.key, b]).generate_state(1)[0])
        with _rng_scope(seed):
            return self.collate(examples)


def _list_micro_batches(data: Sequence, collate: Callable[[list], dict], cfg: TrainConfig, rank: int, world: int,
                        device: torch.device, lengths: Sequence[int] | None, epoch: int,
                        micro_start: int) -> Iterator[tuple[int, int, int, dict]]:
    """(epoch, micro-batch index, micro-batches in the epoch, batch), epoch after epoch, from a list."""
    while True:
        batches = epoch_batches(len(data), epoch, cfg.seed, cfg.batch_size, rank, world, lengths)
        # our own generator keeps DataLoader from drawing on the global RNG (exact resume)
        loader = torch.utils.data.DataLoader(
            _EpochBatches(data, batches, micro_start), batch_size=None,
            collate_fn=_SeededCollate(collate, cfg.seed, rank, epoch), num_workers=cfg.num_workers,
            generator=torch.Generator().manual_seed(cfg.seed + epoch), pin_memory=device.type == "cuda")
        for micro, batch in enumerate(loader, start=micro_start):
            yield epoch, micro, len(batches), batch
        epoch, micro_start = epoch + 1, 0


def _stream_micro_batches(data: ResumableStream, collate: Callable[[list], dict], seed: int, rank: int,
                          world: int, epoch: int, micro: int) -> Iterator[tuple[int, int, None, dict]]:
    """(pass, micro-batch index, None, batch) from this rank's stream, forever: a pass that ends starts the next.

    ``micro`` counts this rank's micro-batches over the whole run (it seeds collate), so resuming at
    step s continues at micro-batch s * grad_accum. Ranks may start new passes at different times.
    """
    seeded = _SeededCollate(collate, seed, rank, 0)
    empty_passes = 0
    while True:
        n = 0
        for examples in data.batches(epoch, rank, world):
            if not examples:
                raise ValueError(f"rank {rank}: the stream yielded an empty micro-batch in pass {epoch}")
            n += 1
            yield epoch, micro, None, seeded((micro, examples))
            micro += 1
        # a resumed pass may already be at its end; two empty passes in a row mean an empty shard
        empty_passes = empty_passes + 1 if n == 0 else 0
        if empty_passes == 2:
            raise ValueError(f"rank {rank} of {world}: the stream's shard yields no examples (pass {epoch} is "
                             "empty); the corpus needs at least one usable document per process")
        epoch += 1


def _count_tokens(out: dict, batch: dict) -> torch.Tensor | int:
    """Tokens processed by one micro-batch, for tokens/s."""
    if "num_tokens" in out:
        return out["num_tokens"]
    if isinstance(batch.get("input_ids"), torch.Tensor):
        return batch["input_ids"].numel()
    return sum(v.numel() for v in batch.values()
               if isinstance(v, torch.Tensor) and v.dim() == 2 and v.dtype == torch.long)


BEST_DECIMALS = 4


def selection_score(metrics: dict[str, float], keys: str) -> list[float]:
    """The values ``metric_for_best`` compares, in order: lists compare lexicographically."""
    missing = [k for k in keys.split(",") if k not in metrics]
    if missing:
        raise ValueError(f"metric_for_best={keys!r}: {missing} not among the evaluate() results {sorted(metrics)}")
    return [round(metrics[k], BEST_DECIMALS) for k in keys.split(",")]


def _count_examples(batch: dict) -> int:
    """Examples in one micro-batch: the leading size of its tensors, for examples/s."""
    return next((v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0), 0)


# ---- FSDP ---------------------------------------------------------------------------------------


def _wrap_fsdp(raw: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
               units: tuple[type[torch.nn.Module], ...]) -> torch.nn.Module:
    """Shard ``raw`` with FullyShardedDataParallel, each module of a class in ``units`` its own unit.

    Rank 0's weights are broadcast first (DDP does the same; FSDP's own ``sync_module_states``
    needs CUDA). ``use_orig_params`` keeps the Parameter objects, so the optimizer already built
    on them (with its decay groups by original shape) drives the shards.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    for t in [*raw.parameters(), *raw.buffers()]:
        dist.broadcast(t.data, src=0)
    model = FullyShardedDataParallel(raw, device_id=device, use_orig_params=True,
                                     auto_wrap_policy=ModuleWrapPolicy(set(units)) if units else None)
    wrapped = {id(p) for p in model.parameters()}
    if not {id(p) for g in optimizer.param_groups for p in g["params"]} <= wrapped:
        raise RuntimeError("FSDP replaced parameters the optimizer holds; this torch version is not supported")
    return model


@contextmanager
def _full_weights_on_rank0(model: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """Gather the full weights on rank 0 (read-only) for saving; a collective, so every rank enters."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    with FullyShardedDataParallel.summon_full_params(model, writeback=False, rank0_only=True,
                                                     offload_to_cpu=device.type == "cuda"):
        yield


# ---- checkpoints --------------------------------------------------------------------------------


def last_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """Path of the resumable checkpoint in ``output_dir`` (load the model from it), or None.

    If a run was killed between the two renames of a checkpoint swap, the previous checkpoint
    (``checkpoint-last.old-*``) is returned; :func:`train` renames it back on start.
    """
    out = Path(output_dir)
    final = out / CHECKPOINT_LAST
    if (final / TRAINER_STATE).is_file():
        return str(final)
    if out.is_dir() and not final.exists():
        for old in sorted(out.glob(CHECKPOINT_LAST + ".old-*")):
            if (old / TRAINER_STATE).is_file():
                return str(old)
    return None


def check_output_dir(output_dir: str | os.PathLike, resume: bool) -> str | None:
    """Whether ``output_dir`` can take this run, decided before any model or data is loaded.

    Returns the checkpoint to resume from (None for a fresh run). A fresh run needs a folder free of
    other runs: a checkpoint is refused (resume it instead), and so are the leftovers of a run killed
    before its first save (a log, half-written checkpoints): that run cannot be resumed, and the new
    run would append its log to the old one. The folder is created and must take files.
    """
    out = Path(output_dir)
    ckpt = last_checkpoint(out)
    if resume and ckpt is None:
        raise ValueError(f"resume: {out} holds no {CHECKPOINT_LAST}/{TRAINER_STATE} to resume from")
    if not resume:
        if ckpt is not None or (out / BEST).exists():
            raise ValueError(f"output_dir {out} already holds a checkpoint; pass --resume (resume=True) to "
                             "continue that run, or choose another output directory")
        leftovers = sorted(p.name for p in [out / LOG_FILE, out / CHECKPOINT_LAST, *out.glob(CHECKPOINT_LAST + ".*"),
                                            *out.glob(BEST + ".*")] if p.exists())
        if leftovers:
            raise ValueError(f"output_dir {out} holds {', '.join(leftovers)} of an earlier run that saved no "
                             "checkpoint, so there is nothing to resume, and a new run would mix its log with "
                             "that run's: delete them or choose another output directory")
    from .outputs import ensure_writable_dir
    ensure_writable_dir(out, "output_dir")
    return ckpt


def load_checkpoint_file(path: str | os.PathLike) -> Any:
    """``torch.load`` of a checkpoint file (tensors and plain values only), naming it when it is damaged."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a missing, truncated or foreign file: zip, unpickling or EOF errors
        reason = str(e).split("\n")[0].split(". ")[0]  # the first sentence
        raise ValueError(f"{path}: cannot be read, the checkpoint is damaged or incomplete ({type(e).__name__}: "
                         f"{reason})") from None


def _recover_interrupted_saves(output_dir: Path) -> None:
    """Delete half-written ``*.tmp-*`` folders; put back a checkpoint moved aside by a killed swap."""
    for name in (CHECKPOINT_LAST, BEST):
        for tmp in output_dir.glob(name + ".tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)
        final = output_dir / name
        for old in sorted(output_dir.glob(name + ".old-*")):
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(old, final)


def _atomic_write_dir(final: Path, write: Callable[[str], None]) -> None:
    """Let ``write`` fill a fresh temporary folder, then swap it in for ``final``.

    A kill during ``write`` leaves only a ``.tmp-*`` folder; a kill between the renames leaves the
    previous version as ``.old-*``. Both are repaired by :func:`_recover_interrupted_saves`.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
    try:
        write(str(tmp))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = final.with_name(final.name + ".old-" + tmp.name.rsplit("-", 1)[1])
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)


def _get_rng_state(device: torch.device) -> dict[str, Any]:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "python": random.getstate(),
            # as a tensor so trainer files load with torch.load(weights_only=True)
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


def _param_checksum(model: torch.nn.Module) -> float:
    return sum(float(p.detach().double().sum()) for p in model.parameters())


def _append_jsonl(path: Path, event: dict) -> None:
    """One ``write`` of one line in append mode, so a reader never sees a partial object."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(event) + "\n")


def _truncate_log(path: Path, step: int) -> None:
    """Drop events logged after the checkpoint we resume from; the resumed run logs them again."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line + "\n")
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(keep), encoding="utf-8")
    os.replace(tmp, path)


# ---- the loop -----------------------------------------------------------------------------------


def train(objective: torch.nn.Module, train_data: Sequence | ResumableStream,
          collate: Callable[[list], dict[str, torch.Tensor]], cfg: TrainConfig, *,
          evaluate: Callable[[], dict[str, float]] | None = None, save_model: Callable[[str], None],
          extra_state: dict | None = None, lengths: Sequence[int] | None = None,
          fsdp_units: tuple[type[torch.nn.Module], ...] = (), save_first: bool = False) -> dict:
    """Train ``objective`` on ``train_data``; write checkpoints and logs to ``cfg.output_dir``.

    ``train_data`` is a list of examples or a :class:`ResumableStream` (then ``cfg.max_steps`` is
    required). ``lengths`` (tokens per example of a list), when given, groups similar lengths into
    batches. With ``cfg.fsdp`` every module of a class in ``fsdp_units`` (e.g. a Transformer
    layer) becomes its own FSDP unit, so only one unit's full weights exist at a time.

    ``objective(**collate(examples))`` must return a dict of scalar tensors with ``"loss"`` and the
    same keys on every call; ``num_tokens`` (if present) feeds tokens/s, every other key is logged as
    an average. ``evaluate()`` runs on rank 0 in eval mode without gradients and returns metrics
    (``metric_for_best`` picks ``best/``). ``save_model(dir)`` writes the model into ``dir``.
    ``extra_state`` is a dict of plain values/tensors saved with each checkpoint and updated in place
    from it on resume. With ``cfg.resume`` the caller must already have loaded the weights from
    :func:`last_checkpoint`. Under torchrun the process group is created (and destroyed) here unless
    the caller already created it. ``save_first`` saves checkpoint-last before the first step of a fresh run:
    weights that took long to prepare are then never lost to a kill. Returns a summary (rank 0 holds the best
    metric).
    """
    check_config(cfg, evaluate is not None)
    _check_data_and_sharding(cfg, train_data, lengths, evaluate is not None)
    owns_group = not (dist.is_available() and dist.is_initialized())
    rank, world, device = setup_distributed()
    run = None
    try:
        run = _Run(objective, train_data, collate, cfg, evaluate, save_model, extra_state, rank, world, device,
                   lengths, fsdp_units)
        if cfg.resume:
            run.resume()
        elif save_first:
            with _full_weights_on_rank0(run.model, device) if cfg.fsdp else nullcontext():
                run.save(epoch=0, micro=-1)  # resumes at epoch 0, micro-batch 0
        summary = run.run()
        _barrier(world)        # every rank done with the group before any rank tears it down
        return summary
    finally:
        # Tear the group down while the interpreter is whole: a torchrun rank sometimes aborted at exit
        # ("terminate called without an active exception") when this was left to interpreter shutdown.
        run = None
        gc.collect()
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _check_data_and_sharding(cfg: TrainConfig, train_data: Any, lengths: Sequence[int] | None,
                             has_evaluate: bool) -> None:
    """Settings that a stream or FSDP cannot honour."""
    if isinstance(train_data, ResumableStream):
        if cfg.max_steps is None:
            raise ValueError(f"a streamed train_data ({type(train_data).__name__}) has no length to count epochs "
                             "in: set max_steps")
        if lengths is not None:
            raise ValueError("lengths (length-grouped batches) needs list data; a stream forms its own batches")
        if cfg.num_workers:
            raise ValueError(f"num_workers={cfg.num_workers}: a stream is read in the training process; use 0")
    if cfg.fsdp and has_evaluate:
        raise ValueError("fsdp=True cannot run evaluate(): it runs on rank 0 alone, and an FSDP forward needs "
                         "every rank; train without a dev set or without fsdp")


class _Run:
    """One call of :func:`train`: the state a run carries from step to step, and its named steps.

    In the order :meth:`run` takes them: ``__init__`` (sizes, schedule, output folder, seeds,
    optimizer, DDP/FSDP), :meth:`resume`, then per micro-batch :meth:`forward_backward` and, on the
    last micro-batch of an optimizer step, :meth:`optimizer_step`, :meth:`log`, :meth:`evaluate` and
    :meth:`save`; :meth:`summary` at the end. Every step runs in the same order as an uninterrupted
    run's, which keeps resumed runs bit-identical.
    """

    def __init__(self, objective: torch.nn.Module, train_data: Sequence | ResumableStream,
                 collate: Callable[[list], dict], cfg: TrainConfig, evaluate: Callable[[], dict[str, float]] | None,
                 save_model: Callable[[str], None], extra_state: dict | None, rank: int, world: int,
                 device: torch.device, lengths: Sequence[int] | None,
                 fsdp_units: tuple[type[torch.nn.Module], ...]):
        self.t_begin = time.time()
        self.t_start = _clock()       # max_time counts from here
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.data, self.collate, self.lengths = train_data, collate, lengths
        self.evaluate_fn, self.save_model, self.extra_state = evaluate, save_model, extra_state
        self.main = rank == 0
        self.out_dir = Path(cfg.output_dir)
        self.dtype = resolve_precision(cfg.precision, device)
        if self.main and cfg.precision == "auto" and device.type == "cpu" and self.dtype == torch.float32:
            print("note: training in fp32: this CPU has no native bf16 (AVX512-BF16 or AMX), with which `auto` trains "
                  "in bf16, ~2.6x faster a step (BENCHMARKS.md section 2)", file=sys.stderr)
        self.streaming = isinstance(train_data, ResumableStream)
        if cfg.fsdp and world < 2:
            raise ValueError(f"fsdp=True shards the model over processes, but world_size={world}: launch with "
                             "torchrun --nproc_per_node=N (N >= 2), or drop fsdp")
        self.num_examples = None if self.streaming else len(train_data)  # a stream's size is unknown
        if not self.streaming:
            if len(train_data) < world:
                raise ValueError(f"{len(train_data)} training examples cannot be shared by world_size={world} "
                                 "processes")
            self.micro_per_epoch = math.ceil(len(train_data) // world / cfg.batch_size)
        self.steps_per_epoch = None if self.streaming else math.ceil(self.micro_per_epoch / cfg.grad_accum)
        self.total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * self.steps_per_epoch
        self.planned_steps = self.total_steps     # time_budget fits total_steps within it
        self.warmup = self.warmup_for(self.total_steps)
        if self.warmup > self.total_steps:
            raise ValueError(f"warmup_steps={self.warmup} exceeds the {self.total_steps} optimizer steps of the run")

        # -- output directory: refuse to mix runs, then repair interrupted saves
        check_output_dir(self.out_dir, cfg.resume)
        _barrier(world)
        if self.main:
            _recover_interrupted_saves(self.out_dir)
        _barrier(world)

        # -- model, optimizer, schedule
        torch.manual_seed(cfg.seed + rank)
        random.seed(cfg.seed + rank)
        np.random.seed(cfg.seed + rank)
        self.raw = objective.to(device).train()
        self.optimizer = make_optimizer(self.raw, cfg.lr, cfg.weight_decay)
        # reads the run's length when it is called: time_budget may fit it after the first steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           lambda s: lr_factor(s, self.warmup, self.total_steps))
        if cfg.fsdp:
            self.loaded_checksum = _param_checksum(self.raw)  # before sharding: the weights the caller loaded
            self.model = _wrap_fsdp(self.raw, self.optimizer, device, fsdp_units)
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
            self.scaler = ShardedGradScaler(device.type, enabled=self.dtype == torch.float16)
        else:
            self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
            # Objectives may leave some parameters unused (heads of other methods), hence find_unused_parameters.
            self.model = (DistributedDataParallel(self.raw, device_ids=[device.index] if device.type == "cuda" else None,
                                                  find_unused_parameters=True) if world > 1 else self.raw)

        # -- where the run stands (resume moves it on)
        self.step, self.epoch, self.micro_start = 0, 0, 0
        self.stream_epoch = 0                   # streams: this rank's pass over its shard
        self.best_metric: float | None = None      # the first key's value at the best step
        self.best_score: list[float] | None = None  # the compared values (every key, rounded)
        self.best_step: int | None = None
        self.sums: dict[str, torch.Tensor] = {}   # per-key sums of the current log window (rank-local)
        self.counts: dict[str, int] = {}
        self.run_counts = torch.zeros(2, dtype=torch.float64, device=device)      # [tokens, examples]
        self.window_counts = torch.zeros(2, dtype=torch.float64, device=device)
        self.last_log: dict[str, Any] = {}
        self.stopped: str | None = None           # why the run ended before total_steps ("max_time")
        # the moving average of every trained parameter (frozen ones never change), in fp32
        self.trained = [p for p in self.raw.parameters() if p.requires_grad]
        self.ema = [p.detach().float().clone() for p in self.trained] if cfg.ema_decay is not None else None
        # time_budget: this call's step times (evaluations and saves left out), the last evaluation's time
        # (with its save), whether total_steps is fitted, and whether it may be (again)
        self.step_times: list[float] = []
        self.eval_s = 0.0
        self.fitted = False
        self.refits = cfg.time_budget is not None
        self.shown_steps = self.total_steps   # the length last printed (a fit 5% away from it is printed)

    def warmup_for(self, total: int) -> int:
        """Warm-up steps of a run of ``total`` steps: warmup_steps, else warmup_ratio of it."""
        # rounded half up, not ceil: 0.1 * 30 is 3.0000000000000004 in floating point
        cfg = self.cfg
        return cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_ratio * total + 0.5)

    def resume(self) -> None:
        """Restore optimizer, schedule, scaler, position, best so far, RNGs and log window from checkpoint-last."""
        cfg, rank, device = self.cfg, self.rank, self.device
        ckpt = last_checkpoint(self.out_dir)
        state = load_checkpoint_file(Path(ckpt) / TRAINER_STATE)
        saved = state["config"] | {"world_size": state["world_size"], "num_examples": state["num_examples"]}
        now = {k: getattr(cfg, k) for k in _ORDER_KEYS} | {"world_size": self.world,
                                                           "num_examples": self.num_examples}
        changed = {k: (saved[k], now[k]) for k in now if saved[k] != now[k]}
        if changed:
            raise ValueError(f"cannot resume {ckpt} exactly: settings changed (saved, now): {changed}")
        if cfg.fsdp != (state["optimizer"] is None):
            raise ValueError(f"cannot resume {ckpt}: it was saved with fsdp={not cfg.fsdp}, now fsdp={cfg.fsdp}")
        if cfg.fsdp:                   # each rank restores its own optimizer shard
            self.optimizer.load_state_dict(load_checkpoint_file(Path(ckpt) / f"optimizer_{rank}.pt"))
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("fitted"):  # the schedule goes on with the length fitted before the resume
            self.total_steps, self.warmup, self.fitted, self.refits = state["total_steps"], state["warmup"], True, False
        self.scaler.load_state_dict(state["scaler"])
        if (state.get("ema") is None) != (self.ema is None):
            raise ValueError(f"cannot resume {ckpt} exactly: it was saved with ema_decay="
                             f"{state['config'].get('ema_decay')}, now ema_decay={cfg.ema_decay}")
        if self.ema is not None:
            for mine, saved_avg in zip(self.ema, state["ema"], strict=True):
                mine.copy_(saved_avg)
        self.step, self.epoch, self.micro_start = state["global_step"], state["epoch"], state["micro_step"]
        self.best_metric, self.best_score, self.best_step = state["best_metric"], state["best_score"], state["best_step"]
        if self.streaming:
            self.stream_epoch = state["streams"][rank]["epoch"]
            self.data.load_state_dict(state["streams"][rank]["data"])
            self.micro_start = self.step * cfg.grad_accum      # every step took exactly grad_accum micro-batches
        elif self.micro_start >= self.micro_per_epoch:
            self.epoch, self.micro_start = self.epoch + 1, 0
        if self.extra_state is not None:
            self.extra_state.clear()
            self.extra_state.update(state["extra_state"] or {})
        rank_state = load_checkpoint_file(Path(ckpt) / f"rng_state_{rank}.pt")
        _set_rng_state(rank_state["rng"], device)
        self.sums = {k: torch.tensor(v, dtype=torch.float64, device=device) for k, v in rank_state["log_sums"].items()}
        self.counts = dict(rank_state["log_counts"])
        checksum = self.loaded_checksum if cfg.fsdp else _param_checksum(self.raw)
        if not math.isclose(checksum, state["param_checksum"], rel_tol=1e-9, abs_tol=1e-9):
            warnings.warn(f"the objective's weights differ from those saved in {ckpt}: load the model from "
                          "last_checkpoint(output_dir) before train(resume=True), or the resume is not exact")
        if self.main:
            _truncate_log(self.out_dir / LOG_FILE, self.step)
            where = (f"stream pass {self.stream_epoch}, {self.data.state_dict()}" if self.streaming
                     else f"epoch {self.epoch}, micro-batch {self.micro_start}")
            tqdm.write(f"resumed from {ckpt} at step {self.step} ({where})")

    def run(self) -> dict:
        """The loop: micro-batches until ``total_steps`` optimizer steps are done; returns the summary."""
        cfg = self.cfg
        self.pbar = tqdm(total=self.total_steps, initial=self.step, desc="train", dynamic_ncols=True,
                         disable=not self.main)
        paused = 0.0                       # seconds spent evaluating and saving, excluded from tokens/s
        self.window_start = time.time()
        self.t_mark = _clock() if self.refits else 0.0   # where the next step's time starts (time_budget)
        t_train = time.time()
        if self.streaming:
            micro_batches = _stream_micro_batches(self.data, self.collate, cfg.seed, self.rank, self.world,
                                                  self.stream_epoch, self.micro_start)
        else:
            micro_batches = _list_micro_batches(self.data, self.collate, cfg, self.rank, self.world, self.device,
                                                self.lengths, self.epoch, self.micro_start)
        # n_micro: micro-batches in this epoch; None for a stream, whose groups are always grad_accum long
        for epoch, micro, n_micro, batch in (micro_batches if self.step < self.total_steps else ()):
            group_start = micro - micro % cfg.grad_accum
            group_size = cfg.grad_accum if n_micro is None else min(cfg.grad_accum, n_micro - group_start)
            sync_now = micro == group_start + group_size - 1
            self.forward_backward(batch, group_size, sync_now)
            if not sync_now:
                continue
            lr, grad_norm = self.optimizer_step()
            if self.refits:
                self.time_step()
            done = self.step >= self.total_steps
            if self.step % cfg.log_every == 0 or done:
                epoch_pos = epoch if n_micro is None else round(epoch + (micro + 1) / n_micro, 4)
                self.log(epoch_pos, lr, grad_norm)
            epoch_end = n_micro is not None and micro + 1 == n_micro
            do_eval = done or (epoch_end if cfg.eval_every is None else self.step % cfg.eval_every == 0)
            stop = not done and self.out_of_time()
            do_save = done or stop or (do_eval if cfg.save_every is None else self.step % cfg.save_every == 0)
            t_pause, t_paused = time.time(), _clock() if self.refits else 0.0
            if do_eval and self.main and self.evaluate_fn is not None:
                self.evaluate()
            # FSDP: rank 0 sees the full weights while it saves (every rank takes part in gathering them)
            with _full_weights_on_rank0(self.model, self.device) if cfg.fsdp and do_save else nullcontext():
                if done and self.evaluate_fn is None:
                    self.keep_last_as_best()
                if do_eval:
                    _barrier(self.world)
                if do_save:
                    self.save(epoch, micro)
            paused += time.time() - t_pause
            if self.refits and (do_eval or do_save):
                self.t_mark = _clock()
                if do_eval and self.evaluate_fn is not None:
                    self.eval_s = self.t_mark - t_paused
                    if len(self.step_times) >= FIT_AFTER and not (done or stop):
                        self.fit_to_time(least=self.step + 1)  # this step's turn to end the run is past
            if stop:
                self.stopped = "max_time"
                if self.main:
                    _append_jsonl(self.out_dir / LOG_FILE, {"step": self.step, "stopped": self.stopped})
                    tqdm.write(f"stopped at the time limit ({cfg.max_time:.0f} s) after step {self.step} of "
                               f"{self.total_steps}; resume to go on")
            if done or stop:
                break
        micro_batches.close()
        self.pbar.close()
        return self.summary(time.time() - t_train - paused)

    def time_step(self) -> None:
        """time_budget: note the step's wall time; every FIT_AFTER timed steps, fit the run's length again (a
        batch's time varies with its length: ten steps alone were 20% off the run's mean in `make demo`)."""
        t = _clock()
        self.step_times.append(t - self.t_mark)
        self.t_mark = t
        if len(self.step_times) % FIT_AFTER == 0:
            self.fit_to_time(least=self.step)

    def fit_to_time(self, least: int) -> None:
        """Set total_steps (at most the planned length) so the run ends within time_budget at the mean time of
        the last 100 steps, the evaluations still to come costing the last one's time each. Rank 0 decides."""
        cfg = self.cfg
        # recent enough to follow a drift; never 0, which a coarse clock could read for a tiny model's step
        step_s = max(statistics.fmean(self.step_times[SKIP_STEPS:][-100:]), 1e-6)
        left = cfg.time_budget - (_clock() - self.t_start)
        # the longest run whose steps and evaluations fit in what is left (the cost grows with the length)
        lo, hi = self.step, self.step + max(0, math.floor(left / step_s))
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if (mid - self.step) * step_s + self.evaluations_until(mid) * self.eval_s <= left:
                lo = mid
            else:
                hi = mid - 1
        total = min(self.planned_steps, max(least, lo))
        fit = torch.tensor([total, min(total, self.warmup_for(total))], device=self.device)
        if self.world > 1:
            dist.broadcast(fit, src=0)
        if self.fitted and (int(fit[0]), int(fit[1])) == (self.total_steps, self.warmup):
            return
        self.total_steps, self.warmup = (int(v) for v in fit)
        self.fitted = True
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):  # the next step's lr
            group["lr"] = base * lr_factor(self.step, self.warmup, self.total_steps)
        self.pbar.total = self.total_steps
        self.pbar.refresh()
        if self.main:
            _append_jsonl(self.out_dir / LOG_FILE, {"step": self.step, "fitted_steps": self.total_steps,
                                                    "step_s": round(step_s, 4), "eval_s": round(self.eval_s, 2)})
            if abs(self.total_steps - self.shown_steps) >= 0.05 * self.shown_steps:  # the log holds every fit
                self.shown_steps = self.total_steps
                evaluations = f" and {self.eval_s:.0f} s an evaluation" if self.eval_s else ""
                tqdm.write(f"time budget: {self.total_steps} steps (of at most {self.planned_steps}) at "
                           f"{step_s:.2f} s a step{evaluations}")

    def evaluations_until(self, total: int) -> int:
        """How many evaluations a run of ``total`` steps still holds after this step (its last step's included)."""
        if self.evaluate_fn is None or total <= self.step:
            return 0
        every = self.cfg.eval_every or self.steps_per_epoch
        if every is None:
            return 1
        return total // every - self.step // every + (total % every != 0)

    def out_of_time(self) -> bool:
        """Past ``max_time``? Every rank takes rank 0's answer, so all stop after the same step."""
        if self.cfg.max_time is None:
            return False
        flag = torch.tensor([float(_clock() - self.t_start >= self.cfg.max_time)], device=self.device)
        if self.world > 1:
            dist.broadcast(flag, src=0)
        return bool(flag.item())

    def forward_backward(self, batch: dict, group_size: int, sync_now: bool) -> None:
        """One micro-batch: forward and backward; DDP syncs gradients on the group's last one only.
        Its losses and token/example counts join the log window."""
        cfg, device = self.cfg, self.device
        batch = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        if hasattr(self.raw, "set_progress"):  # objectives with a schedule (e.g. ERNIE-GEN's noise ramp)
            self.raw.set_progress(self.step, self.total_steps)
        # FSDP reduce-scatters every micro-batch (its no_sync would keep full-size gradients)
        with nullcontext() if sync_now or self.world == 1 or cfg.fsdp else self.model.no_sync():
            with torch.autocast(device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
                out = self.model(**batch)
            if not isinstance(out, dict) or "loss" not in out:
                raise ValueError(f"the objective must return a dict with a 'loss' key, got "
                                 f"{sorted(out) if isinstance(out, dict) else type(out).__name__}")
            self.scaler.scale(out["loss"] / group_size).backward()
        for k, v in out.items():
            if k != "num_tokens" and isinstance(v, torch.Tensor) and v.numel() == 1:
                self.sums[k] = self.sums.get(k, 0.0) + v.detach().double()
                self.counts[k] = self.counts.get(k, 0) + 1
        counted = torch.tensor([float(_count_tokens(out, batch)), _count_examples(batch)], dtype=torch.float64,
                               device=device)
        self.window_counts += counted
        self.run_counts += counted

    def optimizer_step(self) -> tuple[float, torch.Tensor]:
        """Clip, step the optimizer and the schedule; returns the lr used and the gradient norm."""
        self.scaler.unscale_(self.optimizer)
        if self.cfg.fsdp:              # the norm over all ranks' shards
            grad_norm = self.model.clip_grad_norm_(self.cfg.clip_norm or math.inf)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.raw.parameters(), self.cfg.clip_norm or math.inf)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.ema is not None:
            decay = min(self.cfg.ema_decay, self.step / (self.step + 9))  # (1 + n) / (10 + n), n = step - 1
            with torch.no_grad():
                torch._foreach_lerp_(self.ema, [p.detach().float() for p in self.trained], 1.0 - decay)
        self.pbar.update(1)
        return lr, grad_norm

    @contextmanager
    def averaged_weights(self) -> Iterator[None]:
        """The moving average in place of the trained weights (a no-op without EMA); restored on exit."""
        if self.ema is None:
            yield
            return
        with torch.no_grad():
            raw = [p.detach().clone() for p in self.trained]
            for p, avg in zip(self.trained, self.ema):
                p.copy_(avg)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, r in zip(self.trained, raw):
                    p.copy_(r)

    def log(self, epoch_pos: float, lr: float, grad_norm: torch.Tensor) -> None:
        """Average the log window over micro-batches and ranks; rank 0 appends it to log.jsonl."""
        device = self.device
        keys = sorted(self.sums)
        packed = torch.stack([self.sums[k] for k in keys]
                             + [torch.tensor(float(self.counts[k]), dtype=torch.float64, device=device)
                                for k in keys] + list(self.window_counts))
        if self.world > 1:
            dist.all_reduce(packed)
        avg = {k: float(packed[i] / packed[len(keys) + i]) for i, k in enumerate(keys)}
        elapsed = max(time.time() - self.window_start, 1e-9)
        tok_s, ex_s = float(packed[-2]) / elapsed, float(packed[-1]) / elapsed
        self.last_log = {"step": self.step, "epoch": epoch_pos, **avg, "lr": lr, "grad_norm": float(grad_norm),
                         "tokens_per_s": round(tok_s, 1), "examples_per_s": round(ex_s, 2)}
        if self.main:
            _append_jsonl(self.out_dir / LOG_FILE, self.last_log)
            self.pbar.set_postfix(loss=f"{avg['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}", ex_s=f"{ex_s:.1f}")
        self.sums, self.counts = {}, {}
        self.window_counts = torch.zeros(2, dtype=torch.float64, device=device)
        self.window_start = time.time()

    def evaluate(self) -> None:
        """Rank 0: run ``evaluate()`` in eval mode on its own RNG stream; a better score replaces best/."""
        cfg, step, device = self.cfg, self.step, self.device
        self.raw.eval()
        event: dict[str, Any] = {"step": step}
        if cfg.eval_raw_weights:
            with _rng_scope(device=device), torch.no_grad():
                event["eval_raw"] = {k: float(v) for k, v in self.evaluate_fn().items()}
            tqdm.write(f"step {step} eval (raw weights): "
                       + ", ".join(f"{k}={v:.4g}" for k, v in event["eval_raw"].items()))
        with self.averaged_weights():
            with _rng_scope(device=device), torch.no_grad():
                metrics = {k: float(v) for k, v in self.evaluate_fn().items()}
            self._evaluated(metrics, event)
        self.raw.train()

    def _evaluated(self, metrics: dict[str, float], event: dict[str, Any]) -> None:
        """Log ``metrics`` (of the weights in place now) and keep them as best/ when they beat the best so far."""
        cfg, step, device = self.cfg, self.step, self.device
        score = selection_score(metrics, cfg.metric_for_best)
        _append_jsonl(self.out_dir / LOG_FILE, {**event, "eval": metrics})
        tqdm.write(f"step {step} eval{' (moving average)' if self.ema is not None else ''}: "
                   + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        value = metrics[cfg.metric_for_best.split(",")[0]]
        best = self.best_score
        if best is None or (score > best if cfg.greater_is_better else score < best):
            self.best_metric, self.best_score, self.best_step = value, score, step

            def write_best(d: str) -> None:
                self.save_model(d)
                Path(d, "eval_results.json").write_text(json.dumps({"step": step, **metrics}, indent=2))
            with _rng_scope(device=device):
                _atomic_write_dir(self.out_dir / BEST, write_best)
            tqdm.write(f"saved {self.out_dir / BEST} (step {step}, {cfg.metric_for_best}={score})")

    def keep_last_as_best(self) -> None:
        """Without ``evaluate()``, the model after the last step is the best one."""
        if self.main:
            with _rng_scope(device=self.device), self.averaged_weights():
                _atomic_write_dir(self.out_dir / BEST, self.save_model)
            tqdm.write(f"saved {self.out_dir / BEST} (last model, step {self.step}; no evaluate())")
        self.best_step = self.step

    def save(self, epoch: int, micro: int) -> None:
        """The resumable checkpoint: model + trainer state (rank 0) + every rank's RNG and log window."""
        cfg, rank, world, step = self.cfg, self.rank, self.world, self.step
        rank_state = {"rng": _get_rng_state(self.device), "log_counts": self.counts,
                      "log_sums": {k: float(v) for k, v in self.sums.items()}}
        if self.streaming:          # the position just past this rank's last consumed example
            rank_state["stream"] = {"epoch": epoch, "data": self.data.state_dict()}
        rank_states: list[Any] = [rank_state] * world
        if world > 1:
            dist.all_gather_object(rank_states, rank_state)
        if cfg.fsdp:           # each rank stages its optimizer shard; rank 0 moves them in
            shard_dir = self.out_dir / f"{CHECKPOINT_LAST}.tmp-shards-{step}"
            shard_dir.mkdir(parents=True, exist_ok=True)
            torch.save(self.optimizer.state_dict(), shard_dir / f"optimizer_{rank}.pt")
            _barrier(world)
        if self.main:
            streams = [s.pop("stream") for s in rank_states] if self.streaming else None
            trainer_state = {
                "optimizer": None if cfg.fsdp else self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "global_step": step, "epoch": epoch,
                "micro_step": micro + 1, "best_metric": self.best_metric, "best_score": self.best_score,
                "best_step": self.best_step,
                "extra_state": self.extra_state, "world_size": world, "num_examples": self.num_examples,
                "streams": streams,
                "param_checksum": _param_checksum(self.raw), "config": dataclass_to_dict(cfg),
                "ema": self.ema, "total_steps": self.total_steps, "warmup": self.warmup, "fitted": self.fitted}

            def write_last(d: str) -> None:
                self.save_model(d)
                torch.save(trainer_state, Path(d) / TRAINER_STATE)
                for r, s in enumerate(rank_states):
                    torch.save(s, Path(d) / f"rng_state_{r}.pt")
                if cfg.fsdp:
                    for r in range(world):
                        os.replace(shard_dir / f"optimizer_{r}.pt", Path(d) / f"optimizer_{r}.pt")
            with _rng_scope(device=self.device):
                _atomic_write_dir(self.out_dir / CHECKPOINT_LAST, write_last)
            if cfg.fsdp:
                shard_dir.rmdir()
            tqdm.write(f"saved {self.out_dir / CHECKPOINT_LAST} (step {step})")
        _barrier(world)

    def summary(self, train_time: float) -> dict:
        """What :func:`train` returns; tokens/s and examples/s over every rank, pauses excluded."""
        if self.world > 1:
            dist.all_reduce(self.run_counts)
        return {"global_step": self.step, "epoch": self.last_log.get("epoch"), "train_loss": self.last_log.get("loss"),
                "best_metric": self.best_metric, "best_step": self.best_step,
                "metric_for_best": self.cfg.metric_for_best,
                "train_tokens_per_s": float(self.run_counts[0]) / max(train_time, 1e-9),
                "train_examples_per_s": float(self.run_counts[1]) / max(train_time, 1e-9),
                "wall_time_s": time.time() - self.t_begin, "total_steps": self.total_steps,
                "stopped": self.stopped}
