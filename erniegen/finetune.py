"""Fine-tuning recipe: model + task data + a method's objective, handed to the shared training loop.

Read top to bottom: settings are checked, the model and data are built, the objective for the
chosen method is built, dev evaluation is wired for best-checkpoint selection, then ``train`` runs.
Everything that depends on the method (its options, features, objective and dev decoder) comes from
its family's record in :mod:`erniegen.registry`.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from . import registry
from .batch import collate_pairs
from .data import DataError, TaskPreset, encode_examples, evenly_spaced, get_task, marker_id, read_examples
from .decoding import generate_ids, ids_to_text
from .head_warmup import PREPARATION, PreparationStopped, Resumable, prepare_checkpoint, resumes_preparation
from .metrics import compute_metrics, qg_scores
from .model import Transformer
from .network import DEFAULT_MODEL
from .precision import calibrate, save_calibration
from .search import DecodeOptions, options_from_settings
from .train import (BEST, TrainConfig, check_config, check_output_dir, is_main_process, now, setup_distributed,
                    time_left, train)


@dataclass
class FinetuneConfig:
    """Everything ``erniegen finetune`` takes; task presets fill what is left as None."""

    train: str
    output: str
    model: str = DEFAULT_MODEL
    dev: str | None = None
    task: str = "squad_qg"
    method: str = "ernie-gen"  # a --method of erniegen.registry.METHODS
    noise_rate: float | None = None
    noise_ramp: float | None = None  # fraction of the run over which ρ rises from 0 to ρ_f; None: the preset's
    label_smoothing: float | None = None  # None: the method family's (registry.Family), else the preset's
    head_warmup_steps: int | None = None  # masked-LM steps for a missing head; None: HEAD_WARMUP_STEPS if missing
    adapt_steps: int | None = None  # whole-model masked-LM steps; None: the preset's if erniegen never trained it
    max_source_len: int | None = None
    max_target_len: int | None = None
    source_field: str | None = None
    target_field: str | None = None
    eval_samples: int | None = 300  # dev examples decoded at each evaluation, evenly spaced (None = all)
    eval_beams: int = 1  # greedy during training keeps evaluation cheap; final scoring uses the preset
    attention_dropout: float | None = None  # None: the checkpoint's on GPU, 0 on CPU (see resolve_attention_dropout)
    hidden_dropout: float | None = None  # None: the preset's, else the checkpoint's
    freeze_embeddings: bool | None = None  # None: the preset's
    ema_decay: float | None = None  # moving average of the weights; None: the preset's; 0: none
    answer_marker: str | None = None  # token around the answer in the passage; None: the preset's; "none": no marker
    copy: bool | None = None  # copy source words (method_options copy); None: the preset's, for methods that can
    max_train_examples: int | None = None
    skip_empty_rows: bool = False  # leave out (and name) rows with an empty source or target instead of stopping
    trainer: TrainConfig = field(default_factory=lambda: TrainConfig(output_dir=""))
    method_options: dict = field(default_factory=dict)


def resolve_preset(cfg: FinetuneConfig, max_positions: int) -> TaskPreset:
    """The task preset with the method family's and the user's overrides, fitted to the model's position table."""
    preset = get_task(cfg.task)
    over = {k: getattr(cfg, k) for k in ("max_source_len", "max_target_len", "source_field", "target_field",
                                         "noise_rate", "noise_ramp", "hidden_dropout", "freeze_embeddings",
                                         "answer_marker")
            if getattr(cfg, k) is not None}
    preset = dataclasses.replace(preset, **over)
    smoothing = cfg.label_smoothing if cfg.label_smoothing is not None else registry.family(cfg.method).label_smoothing
    if smoothing is not None:
        preset = dataclasses.replace(preset, label_smoothing=smoothing)
    if preset.answer_marker == "none":
        preset = dataclasses.replace(preset, answer_marker=None)
    if preset.max_source_len + preset.max_target_len > max_positions:
        fitted = max_positions - preset.max_target_len
        print(f"note: source {preset.max_source_len} + target {preset.max_target_len} tokens exceed the model's "
              f"{max_positions} positions; sources are cut to {fitted}", file=sys.stderr)
        preset = dataclasses.replace(preset, max_source_len=fitted)
    return preset


def resolve_method_options(cfg: FinetuneConfig) -> dict:
    """``method_options`` with copying settled: ``--copy/--no-copy`` (``cfg.copy``) or the YAML's ``copy``,
    else the task preset's for a method whose options have ``copy`` (a preset that copies leaves the NAR
    methods, which cannot, as they are)."""
    options = dict(cfg.method_options)
    can_copy = "copy" in registry.option_keys(cfg.method)
    if cfg.copy is not None:
        flag = "--copy" if cfg.copy else "--no-copy"
        if not can_copy:
            raise ValueError(f"{flag}: --method {cfg.method} cannot copy source words "
                             f"(the methods that can: {', '.join(registry.methods_with_option('copy'))})")
        if options.setdefault("copy", cfg.copy) != cfg.copy:
            raise ValueError(f"{flag} contradicts method_options copy: {options['copy']}")
    elif can_copy:
        options.setdefault("copy", get_task(cfg.task).copy)
    return options


def fit_target_len(preset: TaskPreset, feats: Sequence) -> TaskPreset:
    """The preset with ``max_target_len`` lowered to the longest target of ``feats`` (end [SEP] included).

    A method that decodes a fixed number of slots (ELMER: T = the task's longest target) computes every
    slot at every layer: squad_qg's cap of 96 against sentence-level questions of at most 39 tokens
    made most of each training step and of each decode work on slots no target ever reaches.
    """
    longest = max(len(f.target_ids) for f in feats)
    if longest >= preset.max_target_len:
        return preset
    if is_main_process():
        print(f"note: {longest} target slots (the longest training target, end included) instead of the task's "
              f"cap of {preset.max_target_len}; --max-target-len sets them", file=sys.stderr)
    return dataclasses.replace(preset, max_target_len=longest)


def load_pairs(path: str, preset: TaskPreset, tokenizer, limit: int | None = None, spread: bool = False,
               skip_empty: bool = False):
    """Read and encode ``path``, one file or dataset spec or several comma-separated (read in turn and
    concatenated, as ``pretrain --corpus`` reads its parts: a related task's pairs beside the task's own);
    with ``limit``, the first ``limit`` rows, or with ``spread`` ``limit`` rows evenly spaced over them: dev
    files are often grouped by article (squad_qg_sent's first 300 dev pairs come from 2 of its 4 articles),
    and a checkpoint chosen on a subset should be chosen on the whole mix. ``skip_empty`` leaves out rows
    with an empty source or target, named in a note."""
    skipped: list[DataError] | None = [] if skip_empty else None
    examples = read_examples(path, *preset.fields(), skipped=skipped)
    if skipped and is_main_process():
        shown = "; ".join(str(e) for e in skipped[:3]) + ("; …" if len(skipped) > 3 else "")
        print(f"note: {path}: skipped {len(skipped)} row(s) with an empty field ({shown})", file=sys.stderr)
    if limit is not None and spread and limit < len(examples):
        examples = evenly_spaced(examples, limit)
    elif limit is not None:
        examples = examples[:limit]
    feats, stats = encode_examples(examples, tokenizer, preset.max_source_len, preset.max_target_len,
                                   marker_id(tokenizer, preset.answer_marker))
    if is_main_process():
        print(f"{path}: {len(examples)} examples; {stats.summary()}", file=sys.stderr)
    return examples, feats


def dev_loss(objective: torch.nn.Module, feats, collate: Callable[[list], dict], batch_size: int = 32) -> float:
    """Teacher-forced dev loss, example-weighted: the objective in eval mode, so without target noise
    or dropout (label smoothing as in training). The caller keeps the training RNG apart."""
    was_training = objective.training
    objective.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(feats), batch_size):
            chunk = feats[i:i + batch_size]
            total += float(objective(**collate(chunk))["loss"]) * len(chunk)
            count += len(chunk)
    objective.train(was_training)
    return total / max(count, 1)


def dev_evaluator(model: Transformer, preset: TaskPreset, examples, feats, decoder: str,
                  opts: DecodeOptions, objective: torch.nn.Module | None = None,
                  collate: Callable[[list], dict] | None = None) -> Callable[[], dict[str, float]]:
    """Decode the dev set and score it with the task's metric (used to pick the best checkpoint);
    with ``objective`` and ``collate``, also the clean teacher-forced dev loss (``dev_loss``)."""

    def evaluate() -> dict[str, float]:
        was_training = model.training
        ids = generate_ids(model, [f.source_ids for f in feats], decoder, batch_size=32, opts=opts)
        model.train(was_training)
        preds = ids_to_text(model, ids)
        refs, srcs = [e.target for e in examples], [e.source for e in examples]
        if preset.metric == "qg":  # METEOR's Java start-up is not worth paying at every evaluation
            scores = qg_scores(preds, refs, srcs, meteor=False)
        else:
            scores = compute_metrics(preset.metric, preds, refs, srcs)
        if objective is not None and collate is not None:
            scores["dev_loss"] = dev_loss(objective, feats, collate)
        return scores

    return evaluate


def prepare_untrained_checkpoint(model: Transformer, cfg: FinetuneConfig, preset: TaskPreset, train_feats,
                                 seed: int, resumable: Resumable | None = None) -> bool:
    """head_warmup.prepare_checkpoint over the training sources and questions, with the task preset's
    adaptation steps for a checkpoint erniegen never trained. An explicit ``adapt_steps`` applies to any checkpoint.
    Returns whether any step ran."""
    fresh = not model.trained_by_erniegen
    adapt_steps = cfg.adapt_steps if cfg.adapt_steps is not None else preset.adapt_steps if fresh else 0

    def texts() -> list[list[int]]:
        return [f.source_ids for f in train_feats] + [[model.tokenizer.cls_token_id, *f.target_ids]
                                                       for f in train_feats]

    return prepare_checkpoint(model, texts, cfg.head_warmup_steps, adapt_steps, seed=seed,
                              progress=is_main_process(), resumable=resumable)


def note_recipe_epochs(preset: TaskPreset, pairs: int, tcfg: TrainConfig) -> None:
    """Say so when the preset's epochs were measured on far fewer pairs than this run has: xsum's 20 epochs
    suit its 899 measured pairs, and on the full 204k they would be ~127k steps."""
    if preset.recipe_pairs is None or pairs <= 4 * preset.recipe_pairs:
        return
    steps = tcfg.epochs * math.ceil(pairs / (tcfg.batch_size * tcfg.grad_accum))
    print(f"note: the {preset.name} preset's {tcfg.epochs} epochs were measured on {preset.recipe_pairs:,} training "
          f"pairs; over these {pairs:,} they are about {steps:,} optimizer steps (one process): pass --epochs or "
          "--max-steps to train for less", file=sys.stderr)


def resolve_attention_dropout(model: Transformer, requested: float | None) -> None:
    """On CPU, attention-probability dropout forces PyTorch's unfused attention, which keeps every
    (B, heads, T, T) probability matrix for backward: measured here it doubled step time and memory
    for all-MiniLM-L6-v2 at 250-token sources. So unless asked for, CPU runs train without it
    (hidden-state dropout stays); GPU runs keep the checkpoint's value, as fused kernels support it.
    """
    if requested is None:
        if torch.cuda.is_available():
            return
        requested = 0.0
        if model.config.attention_probs_dropout_prob and is_main_process():
            print(f"note: training on CPU without attention-probability dropout (checkpoint: "
                  f"{model.config.attention_probs_dropout_prob}); pass --attention-dropout to keep it",
                  file=sys.stderr)
    if not 0.0 <= requested < 1.0:
        raise ValueError(f"attention dropout must be in [0, 1), got {requested}")
    model.set_attention_dropout(requested)


def finetune(cfg: FinetuneConfig) -> dict:
    """Fine-tune ``cfg.model`` on ``cfg.train``; the best model lands in OUTPUT/best. Under torchrun the
    process group is joined first: the preparation before training stops at rank 0's deadline on every rank."""
    owns_group = not (dist.is_available() and dist.is_initialized())
    setup_distributed()
    try:
        return _finetune(cfg)
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _finetune(cfg: FinetuneConfig) -> dict:
    t_start = now()  # trainer.max_time counts the loading and warm-ups too
    family = registry.family(cfg.method)
    cfg = dataclasses.replace(cfg, method_options=resolve_method_options(cfg))
    registry.check_options(cfg.method, cfg.method_options)
    recipe = get_task(cfg.task)  # the preset's lr and epochs where the trainer leaves them unset
    tcfg = dataclasses.replace(cfg.trainer, output_dir=cfg.output,
                               lr=recipe.lr if cfg.trainer.lr is None else cfg.trainer.lr,
                               epochs=recipe.epochs if cfg.trainer.epochs is None else cfg.trainer.epochs,
                               ema_decay=(recipe.ema_decay if cfg.ema_decay is None else cfg.ema_decay) or None)
    check_config(tcfg, has_evaluate=False)  # before the model loads and the data is tokenized
    if resumes_preparation(cfg.output, tcfg.resume):  # then training starts at step 0
        tcfg = dataclasses.replace(tcfg, resume=False)
    resume_from = check_output_dir(cfg.output, tcfg.resume)
    if not family.uses_noise and (cfg.noise_rate is not None or cfg.noise_ramp is not None) and is_main_process():
        print(f"note: --method {cfg.method} trains without target noise; the noise settings are ignored",
              file=sys.stderr)
    torch.manual_seed(tcfg.seed)  # parameters a checkpoint lacks (e.g. a masked-LM head) start from the seed
    model = Transformer.from_pretrained(resume_from or cfg.model)
    preset = resolve_preset(cfg, model.config.max_position_embeddings - model.config.position_offset)
    resolve_attention_dropout(model, cfg.attention_dropout)
    if preset.hidden_dropout is not None:
        model.set_hidden_dropout(preset.hidden_dropout)
    if preset.freeze_embeddings:
        # the word table is also the output layer: frozen, words that no training question uses keep
        # the scores the checkpoint gives them, so a dev sentence's own words stay within reach
        model.embeddings.word.weight.requires_grad_(False)
    model.settings = dataclasses.replace(
        model.settings, method=cfg.method, task=preset.name, max_source_len=preset.max_source_len,
        max_decode_len=preset.max_decode_len, min_decode_len=max(preset.min_decode_len, 1),
        num_beams=preset.num_beams, length_penalty=preset.length_penalty,
        no_repeat_ngram_size=preset.no_repeat_ngram_size, max_token_run=preset.max_token_run,
        block_repeated_words=preset.block_repeated_words, answer_marker=preset.answer_marker)

    train_examples, train_feats = load_pairs(cfg.train, preset, model.tokenizer, cfg.max_train_examples,
                                             skip_empty=cfg.skip_empty_rows)
    if family.fixed_slots and cfg.max_target_len is None:
        preset = fit_target_len(preset, train_feats)
    model.settings.extra = model.settings.extra | {"max_target_len": preset.max_target_len}
    train_feats = family.prepare_features(cfg.method, train_feats, cfg.method_options)
    if cfg.trainer.epochs is None and tcfg.max_steps is None and is_main_process():
        note_recipe_epochs(preset, len(train_feats), tcfg)
    prepared, preparation = False, Path(cfg.output, PREPARATION)
    if not tcfg.resume:
        deadline = None if tcfg.max_time is None else t_start + tcfg.max_time
        try:
            prepared = prepare_untrained_checkpoint(model, cfg, preset, train_feats, tcfg.seed,
                                                    Resumable(preparation, deadline, write=is_main_process()))
        except PreparationStopped as stop:
            return stop.summary()
    objective = family.build_objective(cfg.method, model, preset, cfg.method_options)
    pad_id = model.config.pad_token_id
    collate = lambda items: collate_pairs(items, pad_id)  # noqa: E731
    evaluate = None
    if cfg.dev:
        dev_examples, dev_feats = load_pairs(cfg.dev, preset, model.tokenizer, cfg.eval_samples, spread=True,
                                             skip_empty=cfg.skip_empty_rows)
        # the dev loss runs the training objective, which needs what the method adds to features (static pseudo targets)
        dev_feats = family.prepare_features(cfg.method, dev_feats, cfg.method_options)
        # the decoding the model will keep (its settings, above), at the evaluation's beam width
        opts = options_from_settings(model, num_beams=cfg.eval_beams)
        evaluate = dev_evaluator(model, preset, dev_examples, dev_feats, registry.default_decoder(cfg.method), opts,
                                 objective, collate)
        # at a small budget BLEU-4 is ~1e-9 everywhere: ROUGE-L then breaks the tie (train.selection_score)
        tcfg = dataclasses.replace(tcfg, metric_for_best="bleu4,rougeL" if preset.metric == "qg" else "rougeL",
                                   greater_is_better=True)
    lengths = [len(f.source_ids) + len(f.target_ids) for f in train_feats]
    summary = train(objective, train_feats, collate, time_left(tcfg, t_start), evaluate=evaluate,
                    save_model=model.save_pretrained, lengths=lengths, save_first=prepared)
    if is_main_process():
        preparation.unlink(missing_ok=True)  # checkpoint-last holds the prepared weights from step 0 on
    best = Path(cfg.output, BEST)
    if is_main_process() and (best / "model.safetensors").is_file():
        write_int8_calibration(str(best), [e.source for e in train_examples])
    return summary


CALIBRATION_SOURCES = 64  # what gave BENCHMARKS.md section 3's smoothed int8 (full-dev BLEU-4 loss 0.16)


def write_int8_calibration(folder: str, sources: Sequence[str], n: int = CALIBRATION_SOURCES) -> Path:
    """Record the saved model's activation maxima on ``n`` of ``sources`` (evenly spaced) for int8 smoothing
    (:mod:`erniegen.precision`) into ``folder``; says what it did and what it cost."""
    t0 = time.monotonic()
    picked = evenly_spaced(sources, n)
    model = Transformer.from_pretrained(folder).eval()
    file = save_calibration(folder, calibrate(model, picked), len(picked))
    print(f"int8 calibration: activation maxima over {len(picked)} training sources written to {file} "
          f"({time.monotonic() - t0:.0f} s)", file=sys.stderr)
    return file
