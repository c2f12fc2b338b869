"""ERNIE-GEN pre-training recipe (Xiao et al., IJCAI 2020, §3): a streamed corpus, handed to the shared loop.

Read top to bottom: settings are checked; the span vocabulary is loaded or built from the corpus;
the model is loaded (a checkpoint without a masked-LM head gets fine-tuning's head warm-up first, over
the corpus's first sequences); each rank streams its own shard of the corpus, where every sequence S becomes
one infilling example (fragments T cut out of S, the rest S' as source, §3.1); the objective runs
the word-by-word and span-by-span flows in parallel on one contextual flow, with loss
``λ·L_word + (1−λ)·L_span`` on noised targets (§3); then :func:`erniegen.train.train` runs.

Example layout: source ``[CLS] S' [SEP]``, target ``T [SEP]``. ``T``'s spans come from the
t-test span vocabulary (each fragment segmented on its own) and the end ``[SEP]`` is a span of
its own, so the span flow never has to predict it together with the last fragment's tokens.

``objective: lplm`` (``--objective lplm``) pre-trains for ELMER instead (Li et al., 2022, §3.4):
each sequence X becomes source ``[CLS] corrupt(X) [SEP]`` (sentence shuffling, then text infilling)
and target ``X [SEP]`` over T fixed slots, every slot predicted at an exit layer drawn uniformly
from 1..L (:class:`erniegen.elmer.LplmObjective`). It reads the same corpus stream, with sequences of
at most ``(max_len - 3) // 2`` tokens so that source and slots share the ``max_len`` positions, and
resumes exactly in the same way; it needs no span vocabulary.

Batch size in tokens (the paper's batch is 24,576 tokens): one optimizer step reads
``batch_size × grad_accum × processes`` sequences of at most ``max_len`` tokens, e.g.
8 × 6 × 1 × 512 = 24,576 (the defaults, one process) or 8 × 3 × 2 × 512 under two processes.
Sequences never mix documents, so documents shorter than ``max_len`` make a step's real token
count smaller; the log's ``tokens_per_s`` counts the tokens actually processed.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .batch import collate_pairs
from .corpus import CorpusSpec, SequenceStream, StreamState
from .elmer import LABEL_SMOOTHING, LPLM_EXITS, LplmObjective, lplm_features
from .ernie_gen import ErnieGenConfig, ErnieGenObjective, pretrain_word_weight, replacement_vocab
from .head_warmup import PREPARATION, PreparationStopped, Resumable, prepare_checkpoint, resumes_preparation
from .model import Transformer
from .network import Layer
from .pretrain_data import FragmentConfig, iter_pretrain_examples
from .registry import ERNIE_GEN
from .spans import SpanVocab, build_span_vocab, punctuation_ids
from .train import (
    TrainConfig,
    check_config,
    check_output_dir,
    is_main_process,
    now,
    setup_distributed,
    time_left,
    train,
)

SPAN_VOCAB_FILE = "span_vocab.tsv"
OBJECTIVES = ("ernie-gen", "lplm")  # ERNIE-GEN's word and span flows | ELMER's Layer Permutation LM
DEFAULT_METHOD = "ernie-gen"
PAPER_BATCH_TOKENS = 24_576


def default_trainer() -> TrainConfig:
    """The paper's pre-training schedule: 4,000 warm-up steps, then linear decay (as in the paper).

    ``lr`` 1e-4 is BERT's pre-training rate (Devlin et al., 2019), a starting point rather than a
    value quoted from ERNIE-GEN. ``batch_size`` 8 × ``grad_accum`` 6 × 512 tokens = 24,576 tokens.
    """
    return TrainConfig(output_dir="", max_steps=None, batch_size=8, grad_accum=6, lr=1e-4,
                       warmup_steps=4000, save_every=1000, log_every=10)


@dataclass
class PretrainConfig:
    """Everything ``erniegen pretrain`` takes; defaults are the paper's pre-training values."""

    model: str
    corpus: str                        # comma-separated text/JSONL files, or a datasets name[:config]
    output: str
    span_vocab: str | None = None      # TSV from `erniegen span-vocab`; None = build from the corpus first
    objective: str = "ernie-gen"       # ernie-gen (the flows below) | lplm (ELMER's, §3.4; no span vocabulary)
    lplm_exits: str = "drawn"          # lplm: exit layers drawn uniformly (paper) | "last" (the control)
    method: str = DEFAULT_METHOD       # of the ERNIE-GEN family: "ernie-gen" (infilling) | "typical" (ablation)
    word_weight: float | None = None   # λ; None = 0.5 for ernie-gen (paper), 1.0 for typical; 1.0 = no span flow
    noise_rate: float = 0.05           # ρ_p, pre-training noise (paper); 0 = the no-noise ablation
    label_smoothing: float | None = None  # None: the objective's, as it fine-tunes (0.1 ERNIE-GEN, 0 LPLM)
    head_warmup_steps: int | None = None  # masked-LM steps for a missing head first; None: HEAD_WARMUP_STEPS if missing
    max_len: int = 512                 # tokens of [CLS] S' [SEP] T [SEP] (BERT's limit)
    fragments: FragmentConfig = field(default_factory=FragmentConfig)  # γ = 0.25, U(1,4) 0.4 / U(4,32) 0.6
    text_field: str = "text"
    paragraphs: bool = False           # text files: blank-line separated documents
    # documents shuffled within windows of this many (per process; 1 = corpus order). Not in the paper,
    # whose data pipeline is unpublished: corpora are stored source by source, and a model fed one
    # source at a time drifts between them. Memory holds one window of text.
    shuffle_window: int = 10_000
    trainer: TrainConfig = field(default_factory=default_trainer)

    @property
    def sequence_len(self) -> int:
        """Longest corpus sequence: all of ``max_len`` is S' + T for ERNIE-GEN; LPLM's source and T slots
        each hold the whole sequence plus its special tokens."""
        return (self.max_len - 3) // 2 if self.objective == "lplm" else self.max_len - 3

    def resolved_word_weight(self) -> float:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective={self.objective!r} must be one of {list(OBJECTIVES)}")
        if self.objective == "lplm" and (self.method != DEFAULT_METHOD or self.word_weight is not None
                                         or self.span_vocab is not None):
            raise ValueError("--method, --word-weight and --span-vocab set ERNIE-GEN's flows; --objective lplm takes "
                             "none of them")
        if self.lplm_exits not in LPLM_EXITS:
            raise ValueError(f"lplm_exits={self.lplm_exits!r} must be one of {list(LPLM_EXITS)}")
        if self.objective != "lplm" and self.lplm_exits != "drawn":
            raise ValueError("--lplm-exits sets where LPLM's slots exit; it needs --objective lplm")
        if self.method not in ERNIE_GEN.methods:
            raise ValueError(f"method={self.method!r} must be one of {list(ERNIE_GEN.methods)}: pre-training "
                             f"trains ERNIE-GEN's flows")
        return pretrain_word_weight(self.method) if self.word_weight is None else self.word_weight


def pretrain_features(example: dict, cls_id: int, sep_id: int) -> dict[str, list[int]]:
    """A ``build_pretrain_example`` dict as model input: ``[CLS] S' [SEP]`` -> ``T [SEP]``.

    The end ``[SEP]`` starts a span of its own (offset ``len(T)``).
    """
    target = example["target_ids"]
    return {"source_ids": [cls_id, *example["source_ids"], sep_id],
            "target_ids": [*target, sep_id],
            "span_starts": [*example["span_starts"], len(target)]}


def pass_seed(seed: int, epoch: int) -> int:
    """Fragment seed of one pass over the corpus, so a second pass cuts different fragments."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


class PretrainStream:
    """Micro-batches of pre-training features from one rank's corpus shard (a ``ResumableStream``).

    Nothing but the current document batch is held in memory. ``state_dict()`` is the
    :class:`StreamState` just past the last yielded micro-batch, so a resumed run reads on from
    the next sequence; fragments are seeded by (seed, pass, sequence position), so a resumed run
    sees the same examples as an uninterrupted one.
    """

    def __init__(self, spec: CorpusSpec, tokenizer, span_vocab: SpanVocab, batch_size: int, max_len: int,
                 seed: int, fragments: FragmentConfig | None = None, shuffle_window: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.spec, self.tokenizer, self.span_vocab = spec, tokenizer, span_vocab
        self.batch_size, self.max_len, self.seed = batch_size, max_len, seed
        self.fragments = fragments or FragmentConfig()
        self.shuffle_window = shuffle_window
        self.cls_id, self.sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
        self._epoch = 0
        self._position: StreamState | None = None   # None = the start of the pass

    def batches(self, epoch: int, rank: int, world: int) -> Iterator[list[dict]]:
        start = self._position if epoch == self._epoch else None
        self._epoch, self._position = epoch, start
        seed = pass_seed(self.seed, epoch)     # each pass: its own document order and fragments
        stream = SequenceStream(self.spec, self.tokenizer, max_len=self.max_len, rank=rank, world_size=world,
                                state=start, shuffle_window=self.shuffle_window, seed=seed)
        batch: list[dict] = []
        for features in self.examples(stream, seed):
            batch.append(features)
            if len(batch) == self.batch_size:
                self._position = stream.state
                yield batch
                batch = []
        if batch:   # the end of the shard: a smaller last micro-batch rather than dropped sequences
            self._position = stream.state
            yield batch

    def examples(self, stream: SequenceStream, seed: int) -> Iterator[dict[str, list[int]]]:
        """Model features of each sequence of ``stream``, seeded by ``seed`` and the sequence's position."""
        for example in iter_pretrain_examples(stream, self.span_vocab, self.fragments, seed):
            yield pretrain_features(example, self.cls_id, self.sep_id)

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "stream": None if self._position is None else self._position.to_dict()}

    def load_state_dict(self, state: dict) -> None:
        self._epoch = state["epoch"]
        self._position = None if state["stream"] is None else StreamState.from_dict(state["stream"])


class LplmStream(PretrainStream):
    """LPLM examples of the same stream: each sequence corrupted with its own seeded generator, so a
    resumed run sees the same examples as an uninterrupted one."""

    def examples(self, stream: SequenceStream, seed: int) -> Iterator[dict[str, list[int]]]:
        for ids in stream:
            state = stream.state
            yield lplm_features(ids, self.tokenizer, random.Random(f"{seed}:{state.doc_index}:{state.seq_offset}"))


def build_objective(model: Transformer, cfg: PretrainConfig) -> ErnieGenObjective | LplmObjective:
    """ERNIE-GEN's multi-flow objective with the pre-training λ and ρ_p (or an ablation of them), or LPLM's."""
    if cfg.objective == "lplm":
        smoothing = LABEL_SMOOTHING if cfg.label_smoothing is None else cfg.label_smoothing
        return LplmObjective(model, cfg.sequence_len + 1, smoothing, exits=cfg.lplm_exits)
    ecfg = ErnieGenConfig(method=cfg.method, noise_rate=cfg.noise_rate, word_weight=cfg.resolved_word_weight())
    if cfg.label_smoothing is not None:
        ecfg = dataclasses.replace(ecfg, label_smoothing=cfg.label_smoothing)
    repl = replacement_vocab(model.tokenizer, model.config.vocab_size, [model.attn_id])
    return ErnieGenObjective(model, ecfg, model.attn_id, repl)


def load_or_build_span_vocab(cfg: PretrainConfig, spec: CorpusSpec, tokenizer, rank: int, world: int) -> SpanVocab:
    """The span vocabulary: ``cfg.span_vocab``, else OUTPUT/span_vocab.tsv built from the corpus by rank 0.

    A resumed run reuses the file its first run built. The build streams the corpus exactly as
    training reads it (same tokenizer and ``max_len``), keeping the paper's top 200k bigrams and 50k
    trigrams by t-test, punctuation excluded.
    """
    if cfg.span_vocab is not None:
        return SpanVocab.load(cfg.span_vocab)
    path = Path(cfg.output) / SPAN_VOCAB_FILE
    if not (cfg.trainer.resume and path.is_file()) and rank == 0:
        print(f"no --span-vocab given: building one from {cfg.corpus} (streamed) into {path}", file=sys.stderr)
        vocab = build_span_vocab(SequenceStream(spec, tokenizer, max_len=cfg.max_len),
                                 skip_ids=punctuation_ids(tokenizer))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        vocab.save(str(tmp), tokenizer)
        os.replace(tmp, path)
        print(f"span vocabulary: {len(vocab.bigrams)} bigrams, {len(vocab.trigrams)} trigrams from "
              f"{vocab.stats['n_tokens']} tokens; saved to {path}", file=sys.stderr)
    if world > 1:
        dist.barrier()
    return SpanVocab.load(str(path))


# The head warm-up of a checkpoint without a masked-LM head reads the corpus's first sequences of at most
# HEAD_WARMUP_LEN tokens, up to HEAD_WARMUP_TEXTS of them: the frozen encoder's states over short windows
# teach the head what it needs at a fraction of the cost of full-length ones.
HEAD_WARMUP_LEN = 128
HEAD_WARMUP_TEXTS = 4096


def head_warmup_texts(spec: CorpusSpec, tokenizer, max_len: int = HEAD_WARMUP_LEN) -> list[list[int]]:
    """``[CLS] x [SEP]`` for the corpus's first HEAD_WARMUP_TEXTS sequences, alike in every process."""
    stream = SequenceStream(spec, tokenizer, max_len=max_len, num_special_tokens=2)
    return [[tokenizer.cls_token_id, *ids, tokenizer.sep_token_id]
            for ids in itertools.islice(stream, HEAD_WARMUP_TEXTS)]


def fit_warmup(trainer: TrainConfig) -> TrainConfig:
    """Clamp the warm-up to the run's length (a run shorter than 4,000 steps is a smoke test or a benchmark)."""
    if trainer.max_steps is None:
        raise ValueError("max_steps (--max-steps) is required: a streamed corpus has no epochs to count")
    if trainer.warmup_steps is not None and trainer.warmup_steps > trainer.max_steps:
        if is_main_process():
            print(f"note: warm-up of {trainer.warmup_steps} steps is longer than the run's {trainer.max_steps} "
                  f"steps; clamped to {trainer.max_steps} (the lr rises over the whole run and never decays)",
                  file=sys.stderr)
        return dataclasses.replace(trainer, warmup_steps=trainer.max_steps)
    return trainer


def pretrain(cfg: PretrainConfig) -> dict:
    """Pre-train ``cfg.model`` with ERNIE-GEN on ``cfg.corpus``; the model lands in OUTPUT/best.

    OUTPUT/best (the model after the last step) and OUTPUT/checkpoint-last (the latest resumable
    checkpoint) are Hugging Face model folders that ``erniegen finetune --model`` loads directly.
    """
    t_start = now()  # trainer.max_time counts the span vocabulary build and loading too
    word_weight = cfg.resolved_word_weight()
    tcfg = fit_warmup(dataclasses.replace(cfg.trainer, output_dir=cfg.output))
    check_config(tcfg, has_evaluate=False)  # before the span vocabulary build and the model load
    if cfg.max_len < 4 or cfg.sequence_len < 1:
        raise ValueError(f"max_len={cfg.max_len} leaves no room for [CLS] S' [SEP] T [SEP]"
                         + (" (LPLM: [CLS] X' [SEP] and X [SEP])" if cfg.objective == "lplm" else ""))
    owns_group = not (dist.is_available() and dist.is_initialized())
    rank, world, _ = setup_distributed()     # the span-vocabulary build needs the group's barrier
    try:
        # checked here too, before a span vocabulary build could overwrite another run's file
        if resumes_preparation(cfg.output, tcfg.resume):  # then training starts at step 0
            tcfg = dataclasses.replace(tcfg, resume=False)
        resume_from = check_output_dir(cfg.output, tcfg.resume)
        torch.manual_seed(tcfg.seed)  # parameters a checkpoint lacks (e.g. a masked-LM head) start from the seed
        model = Transformer.from_pretrained(resume_from or cfg.model)
        positions = model.config.max_position_embeddings - model.config.position_offset
        if cfg.max_len > positions:
            raise ValueError(f"max_len={cfg.max_len} exceeds the {positions} positions of {cfg.model}")
        spec = CorpusSpec.from_arg(cfg.corpus, text_field=cfg.text_field, paragraphs=cfg.paragraphs)
        # a checkpoint erniegen never trained (all-MiniLM-L6-v2: no masked-LM head) gets fine-tuning's preparation:
        # without it the first hundreds of steps teach a random head to read the encoder (head_warmup.py)
        preparation = Path(cfg.output, PREPARATION)
        deadline = None if tcfg.max_time is None else t_start + tcfg.max_time
        try:
            prepared = prepare_checkpoint(
                model, lambda: head_warmup_texts(spec, model.tokenizer, min(HEAD_WARMUP_LEN, cfg.max_len)),
                cfg.head_warmup_steps, seed=tcfg.seed, progress=is_main_process(),
                resumable=Resumable(preparation, deadline, write=rank == 0))
        except PreparationStopped as stop:
            return stop.summary()
        if cfg.objective == "lplm":
            model.settings = dataclasses.replace(
                model.settings, method="elmer", extra=model.settings.extra | {
                    "max_target_len": cfg.sequence_len + 1, "pretrain": {"objective": "lplm", "max_len": cfg.max_len}})
            data = LplmStream(spec, model.tokenizer, None, tcfg.batch_size, cfg.sequence_len + 3, tcfg.seed,
                              shuffle_window=cfg.shuffle_window)
        else:
            span_vocab = load_or_build_span_vocab(cfg, spec, model.tokenizer, rank, world)
            model.settings = dataclasses.replace(
                model.settings, method=cfg.method,
                extra=model.settings.extra | {"pretrain": {"word_weight": word_weight, "noise_rate": cfg.noise_rate,
                                                           "max_len": cfg.max_len, "method": cfg.method}})
            data = PretrainStream(spec, model.tokenizer, span_vocab, tcfg.batch_size, cfg.max_len, tcfg.seed,
                                  cfg.fragments, cfg.shuffle_window)
        objective = build_objective(model, cfg)
        if cfg.objective == "lplm" and rank == 0:
            print(f"pre-training: LPLM; {world} process(es); step = {tcfg.batch_size}×{tcfg.grad_accum}×{world} "
                  f"sequences of <= {cfg.sequence_len} tokens", file=sys.stderr)
        elif rank == 0:
            nominal = tcfg.batch_size * tcfg.grad_accum * world * cfg.max_len
            print(f"pre-training: λ={word_weight}, ρ_p={cfg.noise_rate}, method={cfg.method}; {world} process(es); "
                  f"step = {tcfg.batch_size}×{tcfg.grad_accum}×{world} sequences of <= {cfg.max_len} tokens "
                  f"(<= {nominal} tokens; the paper used {PAPER_BATCH_TOKENS})", file=sys.stderr)
        pad_id = model.config.pad_token_id
        summary = train(objective, data, lambda items: collate_pairs(items, pad_id), time_left(tcfg, t_start),
                        save_model=model.save_pretrained, fsdp_units=(Layer,), save_first=prepared)
        if rank == 0:
            preparation.unlink(missing_ok=True)  # checkpoint-last holds the prepared weights from step 0 on
        return summary | {"model_dir": str(Path(cfg.output) / "best")}
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()
