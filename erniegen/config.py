"""Dataclass configs from YAML: one flat mapping per dataclass, unknown keys are an error.

Typos in a config file must fail loudly instead of silently training with a default, so every key
is checked against the dataclass fields.
"""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def config_from_dict(raw: dict[str, Any], cls: type[T], *, source: str = "config") -> T:
    """Build ``cls`` from a mapping, naming unknown keys and coercing YAML's ``5e-5`` strings.

    PyYAML (YAML 1.1) reads ``5e-5`` without a dot as a string, so string values of float fields
    are converted; anything else is passed through unchanged.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: expected a mapping of {cls.__name__} fields, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ValueError(f"{source}: unknown {cls.__name__} key(s) {unknown}; valid keys: {sorted(known)}")
    values = {}
    for key, value in raw.items():
        if isinstance(value, str) and float in typing.get_args(hints[key]) + (hints[key],):
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"{source}: {key}={value!r} is not a number") from None
        values[key] = value
    return cls(**values)


def load_config_yaml(path: str | Path, cls: type[T]) -> T:
    """Read a YAML mapping from ``path`` into dataclass ``cls`` (an empty file gives the defaults)."""
    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f)
    return config_from_dict({} if raw is None else raw, cls, source=str(path))


def dataclass_to_dict(obj: Any) -> dict[str, Any]:
    """Plain dict of a dataclass instance, ready for ``yaml.safe_dump`` or ``json.dumps``."""
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        raise TypeError(f"expected a dataclass instance, got {type(obj).__name__}")
    return dataclasses.asdict(obj)
