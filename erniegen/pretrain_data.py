"""Streaming pre-training corpus and ERNIE-GEN multi-granularity target fragments.

The corpus is read as a stream of documents (never held in memory),
sharded across processes, tokenized and split into sequences; the stream's
:class:`StreamState` resumes exactly at the next sequence. Each sequence S
then becomes one pre-training example (Xiao et al., ERNIE-GEN, IJCAI 2020,
§3.1): fragments are cut out of S into a target T, the rest S' is the
source, and T is segmented into spans for the span-by-span flow.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from erniegen.data import DataError, parse_json_line
from erniegen.spans import SpanVocab

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
        parts = [p for p in corpus.split(",") if p]
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


# ---------------------------------------------------------------------------
# Multi-granularity target fragments


@dataclass(frozen=True)
class FragmentConfig:
    """Target-fragment sampling of ERNIE-GEN §3.1 (Xiao et al., IJCAI 2020).

    Per sequence, one length distribution is drawn: ``(probability, low,
    high)`` means fragment lengths uniform on the integers ``[low, high]``;
    the paper uses U(1,4) with probability 0.4 and U(4,32) with 0.6, and
    ``gamma = 0.25`` of the sequence's tokens go to the target.
    """

    gamma: float = 0.25
    distributions: tuple[tuple[float, int, int], ...] = ((0.4, 1, 4), (0.6, 4, 32))

    def __post_init__(self) -> None:
        # gamma <= 0.5 guarantees room for a one-token gap between every two fragments.
        if not 0 < self.gamma <= 0.5:
            raise ValueError(f"FragmentConfig.gamma must be in (0, 0.5], got {self.gamma}")
        if not self.distributions or abs(sum(p for p, _, _ in self.distributions) - 1) > 1e-9:
            raise ValueError(f"FragmentConfig.distributions probabilities must sum to 1: {self.distributions}")
        for p, low, high in self.distributions:
            if p < 0 or not 1 <= low <= high:
                raise ValueError(
                    f"FragmentConfig.distributions entry {(p, low, high)} needs p >= 0 and 1 <= low <= high"
                )


@dataclass(frozen=True)
class Fragments:
    """A sequence S split into source S' (fragments removed) and target T (fragments in order)."""

    source_ids: list[int]
    target_ids: list[int]
    fragment_starts: list[int]  # positions in S, increasing
    fragment_lengths: list[int]
    distribution: int  # index into FragmentConfig.distributions


def target_size(n: int, gamma: float) -> int:
    """Target tokens for a sequence of n tokens: gamma * n rounded half up, within [1, n - 1]."""
    return min(max(1, math.floor(gamma * n + 0.5)), n - 1)


def sample_fragments(token_ids: Sequence[int], config: FragmentConfig, rng: random.Random) -> Fragments:
    """Cut random non-overlapping fragments out of S into the target, ERNIE-GEN §3.1.

    Lengths are drawn from the sequence's distribution until the target
    holds ``target_size(|S|, gamma)`` tokens; the last fragment is cut to
    land exactly there (so T is within half a token of gamma*|S|). The
    fragments are then placed uniformly at random among all placements
    that leave at least one source token between two fragments, so each
    fragment is a maximal removed run. Fragments are removed from S'
    without a placeholder, as in the paper.
    """
    n = len(token_ids)
    if n < 2:
        raise ValueError(f"a sequence needs at least 2 tokens to split into source and target, got {n}")
    u, choice = rng.random(), len(config.distributions) - 1
    for i, (p, _, _) in enumerate(config.distributions):
        if u < p:
            choice = i
            break
        u -= p
    _, low, high = config.distributions[choice]
    k = target_size(n, config.gamma)
    lengths: list[int] = []
    spent = 0
    while spent < k:
        length = min(rng.randint(low, high), k - spent)
        lengths.append(length)
        spent += length
    # Place m blocks among the free tokens left after reserving one gap token between neighbours.
    m = len(lengths)
    free = n - k - (m - 1)
    slots = sorted(rng.sample(range(free + m), m))
    starts, before = [], 0
    for slot, length in zip(slots, lengths):
        starts.append(slot + before)
        before += length
    source: list[int] = []
    target: list[int] = []
    prev = 0
    for start, length in zip(starts, lengths):
        source.extend(token_ids[prev:start])
        target.extend(token_ids[start : start + length])
        prev = start + length
    source.extend(token_ids[prev:])
    return Fragments(source, target, starts, lengths, choice)


def build_pretrain_example(
    token_ids: Sequence[int], span_vocab: SpanVocab, config: FragmentConfig, rng: random.Random
) -> dict[str, list[int]]:
    """One ERNIE-GEN pre-training example from a sequence S.

    Returns ``source_ids`` (S'), ``target_ids`` (T, without an end token),
    ``span_starts`` (offsets into T of the span-flow spans) and
    ``fragment_lengths``. Each fragment is segmented on its own, so no span
    crosses a fragment boundary (tokens of two fragments were not adjacent in S).
    """
    frags = sample_fragments(token_ids, config, rng)
    span_starts: list[int] = []
    offset = 0
    for length in frags.fragment_lengths:
        piece = frags.target_ids[offset : offset + length]
        span_starts.extend(offset + s for s in span_vocab.segment(piece))
        offset += length
    return {
        "source_ids": frags.source_ids,
        "target_ids": frags.target_ids,
        "span_starts": span_starts,
        "fragment_lengths": frags.fragment_lengths,
    }


def iter_pretrain_examples(
    stream: SequenceStream, span_vocab: SpanVocab, config: FragmentConfig, seed: int
) -> Iterator[dict[str, list[int]]]:
    """Pre-training examples of a stream; a resumed stream reproduces the same examples.

    Each sequence gets its own generator seeded by ``seed`` and the
    sequence's position, so fragments do not depend on where a run resumed.
    """
    for ids in stream:
        state = stream.state
        rng = random.Random(f"{seed}:{state.doc_index}:{state.seq_offset}")
        yield build_pretrain_example(ids, span_vocab, config, rng)
