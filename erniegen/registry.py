"""The method families, one record each: what the command line, fine-tuning and decoding read.

A method is a ``--method`` value (``ernie-gen``, ``typical``, ``nat``, ``mist``, ``elmer``,
``elmer-soft``); methods that share an objective, options and decoders form a family, described once
by a :class:`Family` record. Every caller asks this module instead of branching on method names:

* the command line takes its ``--method`` and ``--decoder`` choices from :data:`METHODS` and
  :data:`DECODERS`;
* fine-tuning checks ``method_options`` (:func:`check_options`), prepares the training features,
  builds the objective and picks the dev decoder through :func:`family`;
* decoding looks decoders up by name (:func:`decoder`) and a model's default decoder by the method
  saved with it (:func:`default_decoder`).

A new family is one module (objective, options dataclass, decoders) plus one record in
:data:`FAMILIES`.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields

from torch import nn

from . import elmer, ernie_gen, mist
from .data import TaskPreset
from .network import Network
from .search import Decoder


def _unchanged(method: str, features: Sequence, options: dict) -> list:
    return list(features)


@dataclass(frozen=True)
class Family:
    """One method family."""

    name: str  # as its paper spells it, for messages
    methods: Mapping[str, str]  # each --method value of the family -> the decoder it generates with by default
    options: type  # the dataclass behind ``method_options``; its fields not in RECIPE_FIELDS are the valid keys
    build_objective: Callable[[str, Network, TaskPreset, dict], nn.Module]  # (method, model, preset, options)
    decoders: Mapping[str, Callable[[], Decoder]]  # name -> a fresh decoder
    uses_noise: bool  # the task's target noise (--noise-rate, --noise-ramp) applies to its training
    about: Mapping[str, str]  # each --method value -> a few words for the command line's help
    # (method, training features, options) -> the features training reads, e.g. with MIST's static pseudo targets
    prepare_features: Callable[[str, Sequence, dict], list] = _unchanged
    # decodes max_target_len slots whatever the source (no length predictor): unless the user sets
    # --max-target-len, fine-tuning fits it to the longest training target instead of the preset's cap
    fixed_slots: bool = False
    # the family's label smoothing, over the task preset's (None: the preset's); --label-smoothing overrides both
    label_smoothing: float | None = None


# Fields of an options dataclass that the recipe fills from the task preset and the command line.
RECIPE_FIELDS = ("method", "noise_rate", "noise_ramp", "label_smoothing")

ERNIE_GEN = Family(
    name="ERNIE-GEN", methods={"ernie-gen": "infilling", "typical": "typical"}, options=ernie_gen.ErnieGenConfig,
    build_objective=ernie_gen.build_objective, decoders=ernie_gen.DECODERS, uses_noise=True,
    about={"ernie-gen": "infilling generation with target noise (the default)",
           "typical": "previous-token teacher forcing, ERNIE-GEN's baseline"})
MIST = Family(
    name="MIST", methods={"nat": "nar", "mist": "nar"}, options=mist.MistConfig,
    build_objective=mist.build_mist_objective, decoders=mist.DECODERS, uses_noise=False,
    about={"nat": "non-autoregressive, one pass over predicted-length slots",
           "mist": "NAT plus MIST's mixed source and pseudo target"},
    prepare_features=mist.prepare_features)
ELMER = Family(
    name="ELMER", methods={"elmer": "elmer-hard", "elmer-soft": "elmer-soft"}, options=elmer.ElmerConfig,
    build_objective=elmer.build_objective, decoders=elmer.DECODERS, uses_noise=False, fixed_slots=True,
    label_smoothing=elmer.LABEL_SMOOTHING,
    about={"elmer": "non-autoregressive with entropy-threshold early exit",
           "elmer-soft": "ELMER's soft exit, every layer's prediction fed on"})
FAMILIES: tuple[Family, ...] = (ERNIE_GEN, MIST, ELMER)


def _index(pairs: list[tuple[str, object]], what: str) -> dict:
    """A name -> value table; families may share a name only for the same thing (e.g. one decoder)."""
    table: dict = {}
    for name, value in pairs:
        if table.get(name, value) is not value:
            raise ValueError(f"{what} {name!r} is registered twice, for different things")
        table[name] = value
    return table


METHODS: dict[str, Family] = _index([(m, f) for f in FAMILIES for m in f.methods], "method")
DECODERS: dict[str, Callable[[], Decoder]] = _index(
    [(name, make) for f in FAMILIES for name, make in f.decoders.items()], "decoder")


def method_help(methods: Sequence[str] = tuple(METHODS)) -> str:
    """``--method``'s help: each method with its few words."""
    return "; ".join(f"{m}: {METHODS[m].about[m]}" for m in methods)


def family(method: str) -> Family:
    """The family of ``--method`` value ``method``."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    return METHODS[method]


def default_decoder(method: str) -> str:
    """The decoder a model trained with ``method`` generates with unless told otherwise."""
    return family(method).methods[method]


def decoder(name: str) -> Decoder:
    """A fresh decoder by name."""
    if name not in DECODERS:
        raise ValueError(f"unknown decoder {name!r}; choose from {sorted(DECODERS)}")
    return DECODERS[name]()


def option_keys(method: str) -> list[str]:
    """The keys ``method_options`` may hold for ``method``."""
    return [f.name for f in fields(family(method).options) if f.name not in RECIPE_FIELDS]


def methods_with_option(key: str) -> list[str]:
    """The ``--method`` values whose ``method_options`` take ``key``."""
    return [m for m in METHODS if key in option_keys(m)]


def check_options(method: str, options: dict) -> None:
    """Refuse unknown ``method_options`` keys, and values the options dataclass refuses, before any model
    or data is loaded."""
    unknown = sorted(set(options) - set(option_keys(method)))
    if unknown:
        raise ValueError(f"unknown {method} method_options {unknown}; valid keys: {option_keys(method)}")
    options_type = family(method).options
    given = options | ({"method": method} if "method" in {f.name for f in fields(options_type)} else {})
    try:
        options_type(**given)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{method} method_options {options}: {e}") from None
