"""Typed configuration from YAML: conversion into dataclasses, dotted overrides, gathered problems.

The generic half of the run config (see sections.py for the sections): values are converted by
each field's type hint, every problem is collected with the file (or "command line") and dotted
key it came from, and all of them are raised at once as one `ConfigError`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from collections.abc import Callable
from typing import Any, Union

import yaml

from continual_pt import errors
from continual_pt.errors import InvalidInput
from continual_pt.schedules.lengths import Length


class ConfigError(InvalidInput, ValueError):
    """All problems found in one config, one per line, each naming the file and key."""

    def __init__(self, problems: list[str], what: str = "configuration"):
        super().__init__(problems, what)


class Problems(errors.Problems):
    """A config's problems: one per dotted key, each naming where its value came from."""

    def __init__(self, origins: dict[str, str] | None = None, default_origin: str = "defaults"):
        super().__init__("configuration", origins, default_origin, one_per_key=True, error=ConfigError)


def parse_duration(value: str | int | float) -> float:
    """Seconds from "HH:MM:SS", "MM:SS", "D-HH:MM:SS" (SLURM) or a number of seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"must not be negative, got {value}")
        return float(value)
    text = str(value).strip()
    days = 0
    if "-" in text:
        head, text = text.split("-", 1)
        if not head.isdigit():
            raise ValueError(f"expected HH:MM:SS, D-HH:MM:SS or seconds, got {value!r}")
        days = int(head)
    parts = text.split(":")
    try:
        numbers = [float(x) for x in parts]
    except ValueError:
        raise ValueError(f"expected HH:MM:SS, D-HH:MM:SS or seconds, got {value!r}") from None
    if len(numbers) > 3 or any(n < 0 for n in numbers):
        raise ValueError(f"expected HH:MM:SS, D-HH:MM:SS or seconds, got {value!r}")
    seconds = 0.0
    for n in numbers:
        seconds = seconds * 60 + n
    return days * 86400 + seconds


def _type_name(tp: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    if tp in names:
        return names[tp]
    if tp is Length:
        return "steps (int), a fraction (float) or 'N%'"
    origin = typing.get_origin(tp)
    if origin in (list, dict):
        return "a list" if origin is list else "a mapping"
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return str(tp)


def _mismatch(value: Any, tp: Any, key: str, p: Problems) -> None:
    p.add(key, f"expected {_type_name(tp)}, got {value!r}")
    return None


def _as_bool(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


def _as_int(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _as_float(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads 6e-4 as a string
        except ValueError:
            pass
    return None


def _as_str(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


def _as_length(value: Any) -> int | float | str | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return float(value) if "." in value or "e" in value.lower() else int(value)
        except ValueError:
            if value.strip().endswith("%"):
                return value.strip()
    return None


# Each returns the converted value, or None when `value` cannot become that type.
_SCALARS: dict[Any, Callable[[Any], Any]] = {bool: _as_bool, int: _as_int, float: _as_float, str: _as_str}


def _convert_union(value: Any, tp: Any, key: str, p: Problems) -> Any:
    args = typing.get_args(tp)
    inner = [a for a in args if a is not type(None)]
    if value is None:
        if type(None) in args:
            return None
    elif tp is Length or set(inner) == set(typing.get_args(Length)):
        length = _as_length(value)
        if length is not None:
            return length
    elif len(inner) == 1:
        return _convert(value, inner[0], key, p)
    elif isinstance(value, (dict, list)) and any(typing.get_origin(a) is type(value) for a in inner):
        # e.g. dict[str, float] | list[str]: the member of the value's kind
        return _convert(value, next(a for a in inner if typing.get_origin(a) is type(value)), key, p)
    elif all(a in _SCALARS for a in inner):   # e.g. str | bool: the first member the value fits
        for a in inner:
            converted = _SCALARS[a](value)
            if converted is not None:
                return converted
    return _mismatch(value, tp, key, p)


def _convert_list(value: Any, tp: Any, key: str, p: Problems) -> list[Any] | None:
    (item_tp,) = typing.get_args(tp)
    if not isinstance(value, list):
        return _mismatch(value, tp, key, p)
    return [_convert(v, item_tp, f"{key}[{i}]", p) for i, v in enumerate(value)]


def _convert_dict(value: Any, tp: Any, key: str, p: Problems) -> dict[str, Any] | None:
    _, item_tp = typing.get_args(tp)
    if not isinstance(value, dict):
        return _mismatch(value, tp, key, p)
    out = {}
    for k, v in value.items():
        if dataclasses.is_dataclass(item_tp) and isinstance(v, str):
            v = {"path": v}  # shorthand: a named dataset given by its path
        out[str(k)] = _convert(v, item_tp, f"{key}.{k}", p)
    return out


def _convert(value: Any, tp: Any, key: str, p: Problems) -> Any:
    """Convert a raw YAML value to `tp`, recording a problem (and returning None) if impossible."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return _convert_union(value, tp, key, p)
    if dataclasses.is_dataclass(tp):
        return build_section(tp, value, key, p)
    if origin is list:
        return _convert_list(value, tp, key, p)
    if origin is dict:
        return _convert_dict(value, tp, key, p)
    scalar = _SCALARS.get(tp)
    converted = None if scalar is None else scalar(value)
    return _mismatch(value, tp, key, p) if converted is None else converted


def build_section(cls: type, raw: Any, prefix: str, p: Problems) -> Any:
    """An instance of dataclass `cls` from raw YAML data, recording every problem under `prefix`."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        p.add(prefix or "(top level)", f"expected a mapping, got {raw!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if not _internal(f)]
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else f"; accepted: {', '.join(names)}"
            p.add(dotted, f"unknown key{hint}")
            continue
        converted = _convert(value, hints[key], dotted, p)
        if converted is not None or value is None:
            kwargs[key] = converted
    return cls(**kwargs)


def _internal(f: dataclasses.Field) -> bool:
    # Bookkeeping of the loader (e.g. where a value came from): never read from YAML nor dumped.
    return bool(f.metadata.get("internal"))


def to_dict(cfg: Any) -> Any:
    """Plain-data view of a config (what `dump` writes), without the loader's bookkeeping fields, nor a
    field marked `omit_unset` that is None (one added later: older saved configs lack it)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if not _internal(f)
                and not (f.metadata.get("omit_unset") and getattr(cfg, f.name) is None)}
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return type(cfg)(to_dict(v) for v in cfg)
    return copy.deepcopy(cfg)


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b.c=value` -> ("a.b.c", parsed YAML value)."""
    if "=" not in text:
        raise ValueError(f"override {text!r} is not of the form key=value (e.g. train.max_steps=100)")
    key, _, value = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ValueError(f"override {text!r} has an empty key")
    if not value.strip():
        return key, None
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError as exc:
        problem = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"override {text!r}: the value is not valid YAML ({problem}); quote it for the "
                         "shell, e.g. 'model.config={hidden_size: 64}'") from None


def set_dotted(raw: dict, key: str, value: Any) -> str | None:
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            return f"cannot set {key}: {'.'.join(parts[: i + 1])} is not a mapping"
        node = child
    node[parts[-1]] = value
    return None


def walk_keys(raw: Any, prefix: str = ""):
    if isinstance(raw, dict):
        for k, v in raw.items():
            dotted = f"{prefix}.{k}" if prefix else str(k)
            yield dotted
            yield from walk_keys(v, dotted)
