"""A text corpus read as a stream: documents from files or a ``datasets`` name, sharded across
processes, tokenized and split into sequences, with a :class:`StreamState` that resumes exactly at
the next sequence. Pre-training (pretrain_data.py) and the span vocabulary (spans.py) read it alike.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from erniegen.data import DataError, parse_json_line, split_specs

T = TypeVar("T")

_TEXT_SUFFIXES = (".txt", ".text")
_JSONL_SUFFIXES = (".jsonl", ".json")


# ---------------------------------------------------------------------------
# Documents


@dataclass(frozen=True)
class CorpusSpec:
    """Where documents come from: local text/JSONL files, or a ``datasets`` name.

    Files ending in .jsonl or .json are JSON lines with one document per
    object in ``text_field``, as are datasets records; any other file is
    plain text with one document per line, or with ``paragraphs=True``
    blank-line separated paragraphs (lines joined by a space).
    """

    paths: tuple[str, ...] = ()
    dataset: str | None = None  # "name" or "name:config", streamed
    split: str = "train"
    text_field: str = "text"
    paragraphs: bool = False

    @classmethod
    def from_arg(cls, corpus: str, **kw: Any) -> CorpusSpec:
        """A comma-separated list of files, or a datasets ``name[:config]`` or local dataset directory."""
        parts = split_specs(corpus)
        if all(os.path.isfile(os.path.expanduser(p)) for p in parts):
            return cls(paths=tuple(parts), **kw)
        if len(parts) == 1 and (os.path.isdir(os.path.expanduser(corpus)) or not _looks_like_path(corpus)):
            return cls(dataset=corpus, **kw)
        missing = next(p for p in parts if not os.path.isfile(os.path.expanduser(p)))
        raise DataError(missing, "file not found")


def _looks_like_path(spec: str) -> bool:
    return spec.lower().endswith(_TEXT_SUFFIXES + _JSONL_SUFFIXES) or spec.startswith(("/", "./", "../", "~"))


@dataclass(frozen=True)
class Document:
    """One document; ``index`` counts documents across all files (the sharding key)."""

    index: int
    text: str


def iter_documents(spec: CorpusSpec) -> Iterator[Document]:
    """Yield every document of the corpus in order, one at a time.

    Blank lines are separators, never documents; a JSONL record with an
    empty text is a document that yields no tokens.
    """
    if spec.dataset is not None:
        texts = _dataset_texts(spec.dataset, spec.split, spec.text_field)
    else:
        texts = (text for path in spec.paths for text in _file_texts(path, spec))
    for index, text in enumerate(texts):
        yield Document(index, text)


def _file_texts(path: str, spec: CorpusSpec) -> Iterator[str]:
    suffix = os.path.splitext(path)[1].lower()
    lines = _decoded_lines(path)
    if suffix in _JSONL_SUFFIXES:
        yield from _jsonl_texts(path, lines, spec.text_field)
    elif spec.paragraphs:
        yield from _paragraph_texts(lines)
    else:
        yield from (line for _, line in lines if line.strip())


def _decoded_lines(path: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) without the newline; bad UTF-8 names its line."""
    try:
        f = open(os.path.expanduser(path), "rb")
    except OSError as e:
        raise DataError(path, f"cannot read file ({e.strerror or e})") from e
    with f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(path, f"is not valid UTF-8 ({e.reason})", n) from e
            yield n, line.rstrip("\r\n")


def _jsonl_texts(path: str, lines: Iterator[tuple[int, str]], text_field: str) -> Iterator[str]:
    for n, line in lines:
        if line.strip():
            yield _text_of(parse_json_line(path, line, n), text_field, path, n)


def _text_of(row: Any, text_field: str, file: str, line: int) -> str:
    if not isinstance(row, dict):
        raise DataError(file, f"row is a JSON {type(row).__name__}, not an object", line)
    if text_field not in row:
        raise DataError(file, f"is missing (fields present: {', '.join(map(repr, row)) or 'none'})", line, text_field)
    text = row[text_field]
    if not isinstance(text, str):
        raise DataError(file, f"must be a string, got {type(text).__name__}", line, text_field)
    return text


def _paragraph_texts(lines: Iterator[tuple[int, str]]) -> Iterator[str]:
    block: list[str] = []
    for _, line in lines:
        if line.strip():
            block.append(line.strip())
        elif block:
            yield " ".join(block)
            block = []
    if block:
        yield " ".join(block)


def _dataset_texts(dataset: str, split: str, text_field: str) -> Iterator[str]:
    import datasets  # imported lazily: slow to import and only needed for dataset names

    name, _, config = dataset.partition(":")
    where = f"{dataset}[{split}]"
    try:
        rows = datasets.load_dataset(name, config or None, split=split, streaming=True)
    except Exception as e:  # datasets raises many unrelated types for "cannot load"
        raise DataError(
            where, f"could not be loaded as a file or a Hugging Face dataset ({type(e).__name__}: {e})"
        ) from e
    for i, row in enumerate(rows, start=1):
        yield _text_of(row, text_field, where, i)


# ---------------------------------------------------------------------------
# Token sequences


@dataclass(frozen=True)
class StreamState:
    """Where a :class:`SequenceStream` stands: resume at document ``doc_index``, sequence ``seq_offset``.

    ``doc_index`` is the global document index (shard-independent);
    ``seq_offset`` counts the sequences of that document already yielded.
    """

    doc_index: int = 0
    seq_offset: int = 0
    rank: int = 0
    world_size: int = 1

    def to_dict(self) -> dict[str, int]:
        """Plain dict for a JSON checkpoint."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, int]) -> StreamState:
        return cls(**d)


def split_evenly(n: int, budget: int) -> list[tuple[int, int]]:
    """(start, end) of ``ceil(n / budget)`` near-equal chunks, so no tiny tail sequence is made."""
    if n <= 0:
        return []
    m = math.ceil(n / budget)
    q, r = divmod(n, m)
    bounds, start = [], 0
    for i in range(m):
        end = start + q + (1 if i < r else 0)
        bounds.append((start, end))
        start = end
    return bounds


def _chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of ``size`` items, the last one shorter (``itertools.batched`` needs 3.12)."""
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class SequenceStream:
    """Token-id sequences of one shard of a corpus, read lazily and resumable exactly.

    Rank ``r`` of ``world_size`` takes documents ``i`` with ``i % world_size == r``.
    Each document is tokenized without special tokens and, when longer than
    ``max_len - num_special_tokens``, split into near-equal consecutive
    sequences (sequences never mix documents); documents shorter than
    ``min_len`` tokens are skipped. The default ``num_special_tokens=3``
    leaves room for ``[CLS] S' [SEP] T [SEP]``, since S' and T together
    are exactly one sequence.

    With ``shuffle_window`` W > 1, the shard is read W documents at a time
    and each window is yielded in an order seeded by ``seed`` and the
    window's first document, so a corpus stored domain by domain (as most
    are) is not learned domain by domain; memory holds one window of text.

    After each yielded sequence, :attr:`state` is the position just past
    it: ``SequenceStream(..., state=saved)`` continues with the next
    sequence (the window's order is drawn again, so the state need not hold
    it). Resuming skips earlier documents by reading them, untokenized.
    """

    def __init__(
        self,
        spec: CorpusSpec,
        tokenizer: Any,
        max_len: int = 512,
        num_special_tokens: int = 3,
        rank: int = 0,
        world_size: int = 1,
        min_len: int = 2,
        batch_size: int = 64,
        state: StreamState | None = None,
        shuffle_window: int = 1,
        seed: int = 0,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if max_len - num_special_tokens < 1:
            raise ValueError(f"max_len={max_len} leaves no room for tokens after {num_special_tokens} special tokens")
        if shuffle_window < 1:
            raise ValueError(f"shuffle_window={shuffle_window} must be >= 1 (1 = corpus order)")
        self.resuming = state is not None and state != StreamState(rank=state.rank, world_size=state.world_size)
        state = state or StreamState(rank=rank, world_size=world_size)
        if (state.rank, state.world_size) != (rank, world_size):
            raise ValueError(
                f"resume state was saved by rank {state.rank} of {state.world_size}, not rank {rank} of {world_size}"
            )
        self.spec = spec
        self.tokenizer = tokenizer
        self.budget = max_len - num_special_tokens
        self.rank, self.world_size = rank, world_size
        self.min_len = min_len
        self.batch_size = batch_size
        self.shuffle_window, self.seed = shuffle_window, seed
        self.start = state
        self.state = state

    def _window_order(self, window: list[Document]) -> list[Document]:
        if self.shuffle_window == 1:
            return window
        order = list(window)
        random.Random(f"{self.seed}:{window[0].index}").shuffle(order)
        return order

    def _windows(self) -> Iterator[list[Document]]:
        shard = (doc for doc in iter_documents(self.spec) if doc.index % self.world_size == self.rank)
        return _chunks(shard, self.shuffle_window)

    def _shard_documents(self) -> Iterator[Document]:
        """This shard's documents from the start state on, window by window."""
        waiting = self.resuming   # still before the start document
        for window in self._windows():
            if waiting and window[-1].index < self.start.doc_index:
                continue
            order = self._window_order(window)
            if waiting:
                found = [k for k, d in enumerate(order) if d.index == self.start.doc_index]
                if not found:
                    break
                order, waiting = order[found[0]:], False
            yield from order
        if waiting:
            corpus = self.spec.dataset or ",".join(self.spec.paths)
            raise ValueError(f"resume state points at document {self.start.doc_index}, which shard {self.rank} of "
                             f"{self.world_size} of {corpus} does not have: has the corpus changed?")

    def _shard_batches(self) -> Iterator[list[Document]]:
        return _chunks(self._shard_documents(), self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        """Yield sequences from the start state; each call starts over from it."""
        self.state = self.start
        for docs in self._shard_batches():
            encoded = self.tokenizer(
                [d.text for d in docs],
                add_special_tokens=False,
                return_attention_mask=False,
                return_token_type_ids=False,
                verbose=False,  # long documents are split below, not truncated
            )["input_ids"]
            for doc, ids in zip(docs, encoded):
                if len(ids) < self.min_len:
                    continue
                chunks = split_evenly(len(ids), self.budget)
                skip = self.start.seq_offset if doc.index == self.start.doc_index else 0
                for k in range(skip, len(chunks)):
                    start, end = chunks[k]
                    self.state = StreamState(doc.index, k + 1, self.rank, self.world_size)
                    yield ids[start:end]
