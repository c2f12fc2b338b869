"""ERNIE-GEN multi-granularity target fragments: pre-training examples from a corpus stream.

Each sequence S of the stream (corpus.py) becomes one pre-training example (Xiao et al., ERNIE-GEN,
IJCAI 2020, §3.1): fragments are cut out of S into a target T, the rest S' is the source, and T is
segmented into spans for the span-by-span flow.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from erniegen.corpus import SequenceStream
from erniegen.spans import SpanVocab
# names older code imports from here
from erniegen.corpus import CorpusSpec, StreamState, iter_documents, split_evenly  # noqa: F401


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
