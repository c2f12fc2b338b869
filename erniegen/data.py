"""Reading examples, task presets and tokenization with counted truncation.

Bad input fails early with a :class:`DataError` that names the file, the
1-based line and the field, so a user can fix a 100k-line file without
guessing. Truncation is never silent: :func:`encode_examples` returns
:class:`TruncationStats` for callers to print.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")
_ENCODE_CHUNK = 1000


class DataError(ValueError):
    """Bad input data, located as ``file:line: field 'x' problem``."""

    def __init__(self, file: str, problem: str, line: int | None = None, field: str | None = None):
        self.file = file
        self.line = line
        self.field = field
        where = file if line is None else f"{file}:{line}"
        what = problem if field is None else f"field '{field}' {problem}"
        super().__init__(f"{where}: {what}")


class EmptyField(DataError):
    """A required field that is present but empty or null: the one row problem a reader may skip."""


@dataclass
class Example:
    """One source/target pair; ``row`` is kept so predictions can be written back next to it."""

    source: str
    target: str | None
    row: dict
    where: str


# ---------------------------------------------------------------------------
# Reading


Fields = str | tuple[str, ...]  # a field's name, or names in order of preference (the first a row has is read)


T = TypeVar("T")


def evenly_spaced(items: Sequence[T], n: int) -> list[T]:
    """``n`` of ``items`` spread evenly over them (all if there are no more): files are often grouped by topic."""
    return [items[i * len(items) // n] for i in range(n)] if n < len(items) else list(items)


def split_specs(specs: str) -> list[str]:
    """The parts of a comma-separated list of files or dataset specs (the form every data flag takes)."""
    return [p for p in specs.split(",") if p]


def read_examples(
    spec: str,
    source_field: Fields = "source",
    target_field: Fields = "target",
    require_target: bool = True,
    split: str = "train",
    skipped: list[DataError] | None = None,
) -> list[Example]:
    """Read examples from a JSONL/JSON-lines, CSV or TSV file, or a ``datasets`` name, or several of them
    comma-separated (read in turn into one list: every data flag takes that form).

    With a ``skipped`` list, a row whose source or required target is empty or null is left out and its
    error appended there instead of raised: real corpora have a few (XSum has empty documents), and a
    user who asked to skip them should lose those rows, not the run. Other bad rows still raise.

    ``spec`` is a file path when such a file exists or when it looks like one
    (known suffix, or starts with ``/``, ``./``, ``../`` or ``~``); otherwise it
    is a Hugging Face dataset name, optionally ``name:config``, whose ``split``
    is loaded. With ``require_target=False`` a missing or blank target becomes
    ``None`` (inference input). A source without rows is an error.
    """
    return [e for part in split_specs(spec)
            for e in _read_one(part, source_field, target_field, require_target, split, skipped)]


def _read_one(spec: str, source_field: Fields, target_field: Fields, require_target: bool, split: str,
              skipped: list[DataError] | None) -> list[Example]:
    path = os.path.expanduser(spec)
    if os.path.isfile(path):
        rows = _read_file_rows(spec, path)
    elif _looks_like_path(spec):
        raise DataError(spec, "file not found")
    else:
        rows = _read_dataset_rows(spec, split)
    examples = []
    for row, file, line in rows:
        try:
            examples.append(_to_example(row, file, line, source_field, target_field, require_target))
        except EmptyField as e:
            if skipped is None:
                raise
            skipped.append(e)
    if not examples:  # nothing to train on, generate from or score: never a silent empty result
        raise DataError(spec if os.path.isfile(path) else f"{spec}[{split}]", "holds no rows")
    return examples


def _looks_like_path(spec: str) -> bool:
    return spec.lower().endswith(_FILE_SUFFIXES) or spec.startswith(("/", "./", "../", "~"))


def _read_file_rows(spec: str, path: str) -> Iterator[tuple[Any, str, int]]:
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in _FILE_SUFFIXES:
        raise DataError(spec, f"unsupported file type '{suffix}'; use .jsonl, .json (JSON lines), .csv or .tsv")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DataError(spec, f"cannot read file ({e.strerror or e})") from e
    try:
        # Decoding the whole file at once lets a bad byte be located on its exact line.
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(spec, f"is not valid UTF-8 ({e.reason})", data.count(b"\n", 0, e.start) + 1) from e
    if suffix in (".jsonl", ".json"):
        return _jsonl_rows(spec, text)
    return _csv_rows(spec, text, "TSV" if suffix == ".tsv" else "CSV")


def parse_json_line(file: str, line: str, line_no: int) -> Any:
    """One JSON Lines record, or a DataError naming the file and line."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(
            file, f"malformed JSON ({e.msg} at column {e.colno}); expected one JSON object per line", line_no
        ) from e


def _jsonl_rows(spec: str, text: str) -> Iterator[tuple[Any, str, int]]:
    for line_no, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            yield parse_json_line(spec, line, line_no), spec, line_no


def _csv_rows(spec: str, text: str, kind: str) -> Iterator[tuple[Any, str, int]]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if kind == "TSV" else ",")
    try:
        header = next(reader, None)
        if not header:
            raise DataError(spec, "no header row (the first line must name the columns)", 1)
        for values in reader:
            if not any(v.strip() for v in values):
                continue
            if len(values) > len(header):
                raise DataError(spec, f"has {len(values)} columns but the header has {len(header)}", reader.line_num)
            # Short rows leave trailing columns out, so they surface as missing fields.
            yield dict(zip(header, values)), spec, reader.line_num
    except csv.Error as e:
        raise DataError(spec, f"malformed {kind} ({e})", reader.line_num) from e


def _read_dataset_rows(spec: str, split: str) -> Iterator[tuple[Any, str, int]]:
    import datasets  # imported lazily: slow to import and only needed for hub names

    name, _, config = spec.partition(":")
    try:
        loaded = datasets.load_dataset(name, config or None)
    except Exception as e:  # datasets raises many unrelated types for "cannot load"
        raise DataError(
            spec,
            f"not a file, and the Hugging Face dataset could not be loaded ({type(e).__name__}: {e}); "
            "pass a local JSONL path instead (one object per line with source and target fields)",
        ) from e
    if split not in loaded:
        raise DataError(spec, f"has no split '{split}' (splits: {', '.join(sorted(loaded))})")
    file = f"{spec}[{split}]"
    return ((row, file, i) for i, row in enumerate(loaded[split], start=1))


def _to_example(
    row: Any, file: str, line: int, source_field: Fields, target_field: Fields, require_target: bool
) -> Example:
    if not isinstance(row, dict):
        raise DataError(file, f"row is a JSON {type(row).__name__}, not an object; expected one object per line", line)
    source = _field(row, source_field, file, line, required=True)
    target = _field(row, target_field, file, line, required=require_target)
    return Example(source=source, target=target, row=row, where=f"{file}:{line}")


def _field(row: dict, names: Fields, file: str, line: int, required: bool) -> str | None:
    names = (names,) if isinstance(names, str) else names
    name = next((n for n in names if n in row), names[0])
    value = row.get(name)
    if value is None:
        if required and name in row:
            raise EmptyField(file, "is null", line, name)
        if required:
            present = ", ".join(map(repr, row)) or "none"
            raise DataError(file, f"is missing (fields present: {present})", line, name)
        return None
    if not isinstance(value, str):
        raise DataError(file, f"must be a string, got {type(value).__name__}", line, name)
    if not value.strip():
        if required:
            raise EmptyField(file, "is empty", line, name)
        return None
    return value


# ---------------------------------------------------------------------------
# Task presets


@dataclass(frozen=True)
class TaskPreset:
    """Lengths, noise and decoding settings for one task; override with ``dataclasses.replace``."""

    name: str
    source_field: str
    target_field: str
    max_source_len: int
    max_target_len: int  # training target length, including the end [SEP]
    max_decode_len: int
    min_decode_len: int
    noise_rate: float
    num_beams: int
    length_penalty: float
    no_repeat_ngram_size: int
    label_smoothing: float
    metric: str  # "qg" or "rouge"
    citation: str
    # The fine-tuning recipe (what `erniegen finetune` uses when the flag is not given): measured on
    # this project's machines, see BENCHMARKS.md section 1 and `recipe_note`.
    lr: float = 1e-4
    epochs: int = 3
    noise_ramp: float = 0.0
    hidden_dropout: float | None = None  # None: the checkpoint's
    freeze_embeddings: bool = False      # keep the (tied) word embeddings as the checkpoint has them
    adapt_steps: int = 0                 # whole-model masked-LM steps before fine-tuning (head_warmup.adapt_to_task)
    ema_decay: float | None = None       # evaluate a moving average of the weights (TrainConfig.ema_decay)
    answer_marker: str | None = None     # vocabulary token put around the answer in the passage (mark_answer)
    copy: bool = False                   # copy source words (ERNIE-GEN's method_options copy) where the method can
    max_token_run: int = 0               # decoding: no token more than this many times in a row (0: any)
    block_repeated_words: bool = False   # decoding: no word or word piece twice in a row (search.DecodeOptions)
    recipe_pairs: int | None = None      # training pairs the recipe's epochs were measured on
    recipe_note: str = ""

    def fields(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The source and target field names to read: the preset's, then the generic ``source``/``target``,
        so a local file in the generic layout reads under any preset (xsum's are the Hub dataset's)."""
        return tuple(dict.fromkeys((self.source_field, "source"))), tuple(dict.fromkeys((self.target_field, "target")))


# The training recipe measured on squad_qg_sent (BENCHMARKS.md section 1) and carried unchanged to XSum (section 5)
# and to the default preset (section 6); each preset adds its epochs (and its noise rate, 0.2 in all three, beside
# the paper's value in the citation).
MEASURED_RECIPE: dict[str, Any] = dict(lr=4e-4, freeze_embeddings=True, adapt_steps=600, ema_decay=0.998, copy=True)

TASKS: dict[str, TaskPreset] = {
    "squad_qg": TaskPreset(
        name="squad_qg",
        source_field="source",
        target_field="target",
        max_source_len=512,
        max_target_len=96,
        max_decode_len=48,
        min_decode_len=0,
        noise_rate=0.2,
        num_beams=5,
        length_penalty=2.0,
        no_repeat_ngram_size=3,
        label_smoothing=0.1,
        metric="qg",
        citation=(
            "ERNIE-GEN released SQuAD QG config (PaddlePaddle/ERNIE ernie-gen/configs/*/squad-qg_conf): "
            "max_src_len 512, max_tgt_len 96, max_dec_len 48, noise_prob 0.7, beam_size 5, "
            "length_penalty 1.0, label_smooth 0.1. Source is 'passage [SEP] answer'; scored with "
            "BLEU-4/METEOR/ROUGE-L in the nqg (Du et al. 2017) convention."
        ),
        **MEASURED_RECIPE,
        epochs=6,
        max_token_run=2,
        block_repeated_words=True,
        recipe_pairs=8699,
        recipe_note=(
            "Measured on squad_qg_sent with all-MiniLM-L6-v2 (BENCHMARKS.md section 1): lr 4e-4 as in the "
            "best earlier probe (not yet isolated against other rates); "
            "target noise rho_f = 0.7 (the paper's), from the first step or ramped in over 30% of the run, "
            "trailed rho_f = 0 on dev loss, BLEU-4 and ROUGE-L at every evaluation of short runs; over the "
            "full 10-epoch recipe rho_f = 0.2 beat 0 and 0.3 (full-dev BLEU-4 11.95 / 11.54 / 11.33, one seed "
            "each; on the 382 dev pairs no evaluation selects on, 11.23 / 11.18 / 11.00), so the default is "
            "0.2 (--noise-rate 0.7 gives the paper's setting); "
            "trigram blocking kept BLEU-4 and raised ROUGE-L and Distinct in beam search; freezing the tied "
            "word embeddings raised greedy BLEU-4 after 3 epochs from 6.1 to 8.1 and lowered the dev loss "
            "(4.70 to 4.54): 8.7k training questions over-fit the output layer; GNMT length penalty 2.0 "
            "instead of the paper's 1.0 (beam 5 wrote questions 11% shorter than the references: full-dev "
            "BLEU-4 10.03 -> 10.73); 600 steps of task-adaptive masked-LM training of the whole model "
            "(dev loss after 3 epochs 4.54 -> 4.47) and a moving average of the weights (decay 0.998, "
            "about two epochs) against the over-fitting that sets in after epoch 6. Not in the recipe: answer "
            "markers (--answer-marker, one seed below the defaults' range) and length penalty 3.0 (+0.26 BLEU-4 "
            "paired over four models, chosen on dev; --length-penalty 3.0 at generate). Copying source words "
            "(a pointer-generator, --copy): greedy dev BLEU-4 after epochs 1-4 7.5 / 10.4 / 10.7 / 11.0 against "
            "3.3 / 6.3 / 7.5 / 8.8 without, clean dev loss 4.08 against 4.49 after epoch 3, full-dev BLEU-4 "
            "13.07 against 10.65 (one seed each). 6 epochs, not 10: with copying, greedy dev BLEU-4 peaked after "
            "epoch 6 of 10 and the clean dev loss rose from epoch 5; 6 epochs (the lr decay ending there) scored "
            "full-dev BLEU-4 12.73 / METEOR 20.21 / ROUGE-L 43.40 against 13.07 / 20.28 / 43.58 for 10, one seed "
            "each (a gap below the seeds' spread), in 60% of the training steps. No token more than twice in a "
            "row (max_token_run 2; 4 of 8,699 training questions break it, all runs of punctuation): on the "
            "180-step demo model beam-5 BLEU-4 8.50 -> 8.80 on 100 dev pairs (`ideal ##rm ##od ##od ##od ##mic` "
            "gone), on qg-e6 one question of 682 changed (12.73 either way). No word twice in a row "
            "(block_repeated_words; `the carnot efficiency efficiency`, 9 of qg-teacher's 682 questions, 20 of "
            "8,699 training questions, all slips): full-dev BLEU-4 12.41 -> 12.53, ROUGE-L 42.99 -> 43.17 "
            "(one model, 26 questions changed; BENCHMARKS.md section 7)."
        ),
    ),
    "xsum": TaskPreset(
        name="xsum",
        source_field="document",
        target_field="summary",
        max_source_len=512,
        max_target_len=64,
        max_decode_len=64,
        min_decode_len=10,
        noise_rate=0.2,
        num_beams=5,
        length_penalty=1.0,
        no_repeat_ngram_size=3,
        label_smoothing=0.1,
        metric="rouge",
        citation=(
            "XSum is not in ERNIE-GEN. Lengths follow common BART/MIST practice for BERT-size encoders "
            "(source 512, target 64, decode up to 64, min 10, no-repeat trigram); label smoothing 0.1 follows "
            "ERNIE-GEN's summarization configs (their noise 0.5 is --noise-rate 0.5). Fields match the Hugging "
            "Face 'EdinburghNLP/xsum' dataset (document, summary); local source/target files read too."
        ),
        **MEASURED_RECIPE,
        epochs=20,
        block_repeated_words=True,
        recipe_pairs=899,
        recipe_note=(
            "squad_qg's measured recipe, carried over and measured on XSum (BENCHMARKS.md, 'Summarization'): "
            "899 training pairs of XSum's validation split with all-MiniLM-L6-v2 and sources cut to 96 tokens, "
            "the preset as it stood (lr 1e-4, 3 epochs, noise 0.5, nothing else) wrote one sentence for every "
            "document (Distinct-1 2.8; ROUGE-1/2/L 17.05 / 1.93 / 14.97), the recipe (lr 4e-4, frozen word "
            "table, 600 task-adaptation steps, moving average 0.998, copying, noise 0.2, 20 epochs = 580 "
            "steps) 24.40 / 4.53 / 18.99 over three seeds (+-0.43 / 0.18 / 0.29); no token more than twice in a "
            "row changed ROUGE-L by +0.05 on average, so max_token_run stays off. 20 epochs is for a small set: "
            "with the full 204k pairs pass --epochs (1-3) or --max-steps. The runs above used --max-source-len 96; "
            "the preset's own sources (448 tokens after the target's 64) scored 26.55 / 5.79 / 20.28 with one "
            "seed in 3.4x the time, so 512 stays (all-MiniLM-L6-v2's positions past 128 look untrained, yet "
            "serve). No word twice in a row (block_repeated_words): 14-23 of each model's 100 summaries said a "
            "word twice (`a police police has been arrested`), none after; ROUGE-1/2/L moved by +0.06 / +0.15 / "
            "-0.08 on average over the four models (BENCHMARKS.md section 7)."
        ),
    ),
    "default": TaskPreset(
        name="default",
        source_field="source",
        target_field="target",
        max_source_len=512,
        max_target_len=64,
        max_decode_len=64,
        min_decode_len=0,
        noise_rate=0.2,
        num_beams=5,
        length_penalty=1.0,
        no_repeat_ngram_size=3,
        label_smoothing=0.1,
        metric="rouge",
        citation=(
            "Generic starting point, not a published setting: BERT's 512-token source limit and label smoothing "
            "0.1 as in ERNIE-GEN's summarization configs (their noise 0.5 is --noise-rate 0.5)."
        ),
        **MEASURED_RECIPE,
        epochs=6,
        max_token_run=2,
        block_repeated_words=True,
        recipe_pairs=10875,
        recipe_note=(
            "The recipe measured on squad_qg and XSum, measured under this preset on a third task "
            "(BENCHMARKS.md section 6): squad_qg_sentence (answer-unaware question generation, 10,875 training "
            "pairs, 1,000 dev pairs held out of its train file) with all-MiniLM-L6-v2, two seeds each. The preset "
            "as it stood (lr 1e-4, 3 epochs, noise 0.5, nothing else) wrote nearly the same question for every "
            "sentence (Distinct-1 2.2; ROUGE-1/2/Lsum 23.17 / 5.75 / 21.81; BLEU-4 4.91 in the nqg convention), "
            "the recipe (lr 4e-4, frozen word table, 600 task-adaptation steps, moving average 0.998, copying, "
            "noise 0.2, 6 epochs) 33.85 / 13.19 / 31.21 (Distinct-1 14.0; BLEU-4 10.92). Decoding: beam 5, length "
            "penalty 1.0; no token more than twice in a row changed ROUGE by 0.01 at most, and with trigram "
            "blocking added (as in the other presets) ROUGE-Lsum rose by 0.14 and 0.16 on the two models "
            "(BLEU-4 +0.01), so the preset decodes with both; and with no word twice in a row "
            "(block_repeated_words; 13 and 2 doubled words gone) ROUGE-Lsum moved by +0.08 and -0.16."
        ),
    ),
}


def get_task(name: str) -> TaskPreset:
    """Look up a preset by name, listing the known ones when it is unknown."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task '{name}'; known tasks: {', '.join(sorted(TASKS))}") from None


# ---------------------------------------------------------------------------
# Tokenization


@dataclass
class Features:
    """Token ids: ``[CLS] source [SEP]`` and ``target [SEP]`` (None at inference)."""

    source_ids: list[int]
    target_ids: list[int] | None


@dataclass
class TruncationStats:
    """How much truncation cost, so it can be reported rather than hidden."""

    max_source_len: int
    max_target_len: int
    n: int = 0
    n_targets: int = 0
    source_truncated: int = 0
    target_truncated: int = 0
    source_tokens: int = 0  # before truncation, special tokens included
    target_tokens: int = 0
    source_tokens_dropped: int = 0
    target_tokens_dropped: int = 0
    answer_windows: int = 0  # truncated sources whose first segment kept a window around the last segment
    answers_marked: int | None = None  # sources whose answer was found and marked; None: no marker asked for

    def summary(self) -> str:
        """One human line, e.g. for the training log."""
        marked = "" if self.answers_marked is None else f"marked the answer in {self.answers_marked}/{self.n} sources; "
        src = marked + (
            f"truncated {self.source_truncated}/{self.n} sources "
            f"({_percent(self.source_tokens_dropped, self.source_tokens)} of source tokens"
            + (f"; {self.answer_windows} kept the passage around the answer)" if self.answer_windows else ")")
        )
        if not self.n_targets:
            return f"{src} to {self.max_source_len} tokens"
        return (
            f"{src} and {self.target_truncated}/{self.n_targets} targets "
            f"({_percent(self.target_tokens_dropped, self.target_tokens)} of target tokens) "
            f"to {self.max_source_len}/{self.max_target_len} tokens"
        )


def _percent(part: int, whole: int) -> str:
    return f"{100.0 * part / whole if whole else 0.0:.1f}%"


def encode_examples(
    examples: Sequence[Example],
    tokenizer: Any,
    max_source_len: int,
    max_target_len: int,
    answer_marker: int | None = None,
) -> tuple[list[Features], TruncationStats]:
    """Tokenize examples into ids, truncating to the limits and counting what was cut.

    With ``answer_marker`` (a token id), the answer's first occurrence in the passage of a
    ``passage [SEP] ... [SEP] answer`` source is put between two markers first (:func:`mark_answer`).

    A too-long source loses tokens from its longest ``[SEP]``-separated segments
    first (so the answer after ``passage [SEP]`` survives): from the end, except
    that a first segment holding the last one (the passage holding its answer)
    keeps a window centred on it; a too-long target loses tokens from its end but
    keeps the final ``[SEP]``, which is the end-of-sequence token the decoder
    learns to predict.
    """
    if max_source_len < 3:
        raise ValueError(f"max_source_len must be at least 3 ([CLS], one token, [SEP]), got {max_source_len}")
    if max_target_len < 2:
        raise ValueError(f"max_target_len must be at least 2 (one token and [SEP]), got {max_target_len}")
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    if cls_id is None or sep_id is None:
        raise ValueError(f"{type(tokenizer).__name__} has no cls/sep token; a BERT-style tokenizer is needed")

    stats = TruncationStats(max_source_len=max_source_len, max_target_len=max_target_len, n=len(examples),
                            answers_marked=None if answer_marker is None else 0)
    features: list[Features] = []
    for start in range(0, len(examples), _ENCODE_CHUNK):
        chunk = examples[start : start + _ENCODE_CHUNK]
        sources = _tokenize(tokenizer, [ex.source for ex in chunk])
        with_target = [ex.target is not None for ex in chunk]
        targets = iter(_tokenize(tokenizer, [ex.target for ex in chunk if ex.target is not None]))
        for ex, src, has_target in zip(chunk, sources, with_target):
            if answer_marker is not None:
                marked = mark_answer(src, sep_id, answer_marker)
                stats.answers_marked += marked is not src
                src = marked
            source_ids = _truncate_source(src, max_source_len - 2, sep_id, ex.where, stats)
            target_ids = None
            if has_target:
                tgt = next(targets)
                if sep_id in tgt:
                    file, _, line = ex.where.rpartition(":")
                    raise DataError(
                        file, f"contains {tokenizer.sep_token}, which marks the end of a target", int(line), "target"
                    )
                target_ids = _truncate_target(tgt, max_target_len - 1, stats) + [sep_id]
            features.append(Features(source_ids=[cls_id, *source_ids, sep_id], target_ids=target_ids))
    return features, stats


def mark_answer(ids: list[int], sep_id: int, marker: int) -> list[int]:
    """``passage [SEP] answer`` ids with the answer's first occurrence in the passage between two
    ``marker`` tokens; ``ids`` itself when there is no ``[SEP]`` or the passage does not hold the answer.

    Highlighting the answer in its context (Chan & Fan 2019, BERT-HLSQG) saves the model from having
    to find which of the passage's words the question should be about."""
    if sep_id not in ids:
        return ids
    first = ids.index(sep_id)
    last = len(ids) - 1 - ids[::-1].index(sep_id)
    passage, answer = ids[:first], ids[last + 1:]
    at = _find(passage, answer)
    if at is None:
        return ids
    end = at + len(answer)
    return [*passage[:at], marker, *answer, marker, *passage[end:], *ids[first:]]


def marker_id(tokenizer: Any, token: str | None) -> int | None:
    """The id of an answer-marker token, which must be a single vocabulary entry."""
    if token is None:
        return None
    i = tokenizer.convert_tokens_to_ids(token)
    if i is None or i == tokenizer.unk_token_id:
        raise ValueError(f"answer marker {token!r} is not in the tokenizer's vocabulary; use a single token "
                         f"such as '[unused1]'")
    return i


def _find(seq: list[int], sub: list[int]) -> int | None:
    m = len(sub)
    if not m:
        return None
    return next((i for i in range(len(seq) - m + 1) if seq[i:i + m] == sub), None)


def _tokenize(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    # verbose=False: over-long inputs are expected here and are truncated and counted below.
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def _truncate_source(ids: list[int], budget: int, sep_id: int, where: str, stats: TruncationStats) -> list[int]:
    stats.source_tokens += len(ids) + 2
    excess = len(ids) - budget
    if excess <= 0:
        return ids
    segments: list[list[int]] = [[]]
    for tok in ids:
        if tok == sep_id:
            segments.append([])
        else:
            segments[-1].append(tok)
    n_seps = len(segments) - 1
    if n_seps >= budget:
        raise ValueError(f"{where}: source has {n_seps} [SEP] separators, too many for max_source_len={budget + 2}")
    keep = _level_lengths([len(s) for s in segments], budget - n_seps)
    stats.source_truncated += 1
    stats.source_tokens_dropped += excess
    start = _window_start(segments[0], segments[-1], keep[0]) if n_seps else None
    stats.answer_windows += start is not None
    out: list[int] = []
    for i, (seg, k) in enumerate(zip(segments, keep)):
        if i:
            out.append(sep_id)
        first = start if i == 0 and start is not None else 0
        out.extend(seg[first:first + k])
    return out


def _window_start(passage: list[int], answer: list[int], keep: int) -> int | None:
    """Where a ``keep``-token window of ``passage`` centred on ``answer``'s first occurrence starts; None
    when it does not occur or the passage is not cut. A question is about its answer's neighbourhood,
    and on a checkpoint whose positions past 128 are untrained, the window is what stays readable."""
    if keep >= len(passage):
        return None
    at = _find(passage, answer)
    if at is None:
        return None
    return max(0, min(at + len(answer) // 2 - keep // 2, len(passage) - keep))


def _level_lengths(lengths: list[int], total: int) -> list[int]:
    """Cut the longest segments down to a common cap so the lengths sum to ``total``.

    Short segments (the answer, in QG) are untouched until the long ones have
    shrunk to their size. The cap is the largest ``c`` with
    ``sum(min(l, c)) <= total``; the remaining tokens go, one each, to the
    earliest segments longer than ``c``.
    """
    lo, hi = 0, max(lengths)
    while lo < hi:  # binary search for the cap
        mid = (lo + hi + 1) // 2
        if sum(min(n, mid) for n in lengths) <= total:
            lo = mid
        else:
            hi = mid - 1
    spare = total - sum(min(n, lo) for n in lengths)
    keep = []
    for n in lengths:
        extra = 1 if n > lo and spare > 0 else 0
        spare -= extra
        keep.append(min(n, lo) + extra)
    return keep


def _truncate_target(ids: list[int], budget: int, stats: TruncationStats) -> list[int]:
    stats.n_targets += 1
    stats.target_tokens += len(ids) + 1
    if len(ids) <= budget:
        return ids
    stats.target_truncated += 1
    stats.target_tokens_dropped += len(ids) - budget
    return ids[:budget]
