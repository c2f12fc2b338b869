"""Generation by decoder name, over token ids or strings: what ``Transformer.generate``, the command
line and fine-tuning's evaluation call.

Decoders are looked up by name in :mod:`erniegen.registry` (``infilling``, ``typical``, ``nar``,
``mist-iter``, ``mask-predict``, ``elmer-hard``, ``elmer-soft``); a model's default is the one of the
method saved with it. The decoders themselves and the searches live with their methods and in search.py.
"""
from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence

from .network import Network
from .runtimes import check_runtime, runtime_of
from .registry import decoder as decoder_named
from .registry import default_decoder
from .search import DecodeOptions, Decoder, decode_in_batches, in_input_order, options_from_settings
# names older code imports from here
from .ernie_gen import InfillingStepper, TypicalStepper  # noqa: F401
from .passes import KVCache  # noqa: F401
from .registry import DECODERS  # noqa: F401
from .search import beam_search, block_ngrams, default_banned_ids, gnmt_penalty, greedy_search  # noqa: F401


def decode_batches(model: Network, sources: Sequence[Sequence[int]], decoder: str | Decoder = "infilling",
                   batch_size: int = 32, opts: DecodeOptions | None = None, progress: bool = False,
                   skip: Collection[int] = ()) -> Iterator[tuple[list[int], list[list[int]]]]:
    """:func:`erniegen.search.decode_in_batches` with the decoder given by name or as a :class:`Decoder`;
    a decoder the model's runtime cannot run is refused."""
    if isinstance(decoder, str):
        decoder = decoder_named(decoder)
    check_runtime(runtime_of(model), model.precision, decoder.name)
    yield from decode_in_batches(model, sources, decoder, batch_size, opts, progress, skip)


def generate_ids(model: Network, sources: Sequence[Sequence[int]], decoder: str | Decoder = "infilling",
                 batch_size: int = 32, opts: DecodeOptions | None = None,
                 progress: bool = False) -> list[list[int]]:
    """Decode token-id sources in length-sorted batches; results come back in input order."""
    return in_input_order(decode_batches(model, sources, decoder, batch_size, opts, progress), len(sources))


def encode_sources(model: Network, sources: Sequence[str]) -> list[list[int]]:
    """Tokenize raw sources as training did ([CLS] source [SEP], longest segment truncated)."""
    from .data import Example, encode_examples, marker_id
    examples = [Example(source=s, target=None, row={}, where=f"input:{i + 1}") for i, s in enumerate(sources)]
    feats, stats = encode_examples(examples, model.tokenizer, model.settings.max_source_len, 2,
                                   marker_id(model.tokenizer, model.settings.answer_marker))
    if stats.source_truncated:
        import sys
        print(stats.summary(), file=sys.stderr)
    return [f.source_ids for f in feats]


def ids_to_text(model: Network, ids: Sequence[Sequence[int]]) -> list[str]:
    """Generated ids as text, the one detokenization every caller scores: without the tokenizer's
    clean-up, "rhine's" comes out as "rhine ' s" and loses BLEU against the references."""
    return [model.tokenizer.decode(x, skip_special_tokens=True, clean_up_tokenization_spaces=True).strip()
            for x in ids]


def iter_generate_text(model: Network, sources: Sequence[str], decoder: str | None = None,
                       batch_size: int = 32, progress: bool = False, skip: Collection[int] = (),
                       **options) -> Iterator[tuple[list[int], list[str]]]:
    """(input rows, strings) batch by batch (see :func:`decode_batches`), for writers that save as they go."""
    decoder = decoder or default_decoder(model.settings.method)
    opts = options_from_settings(model, **options)
    for rows, ids in decode_batches(model, encode_sources(model, sources), decoder, batch_size, opts, progress,
                                    skip):
        yield rows, ids_to_text(model, ids)


def generate_text(model: Network, sources: Sequence[str], decoder: str | None = None, batch_size: int = 32,
                  progress: bool = False, **options) -> list[str]:
    """Strings in, strings out; the decoder defaults to the one matching the training method."""
    out = [""] * len(sources)
    for rows, texts in iter_generate_text(model, sources, decoder, batch_size, progress, **options):
        for i, text in zip(rows, texts):
            out[i] = text
    return out
