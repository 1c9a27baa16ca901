"""Loading a run config: defaults < YAML file < dotted command-line overrides, validated at once."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

from continual_pt.config.sections import RunConfig
from continual_pt.config.typed import (
    ConfigError,
    Problems,
    build_section,
    parse_override,
    set_dotted,
    to_dict,
    walk_keys,
)
from continual_pt.files import atomic_write_text
from continual_pt.layout import EXIT_OK
from continual_pt.options import ConfigSource
from continual_pt.schedules import ScheduleConfig, check_config


def print_resolved(source: ConfigSource) -> int:
    """`cpt config`: print the resolved, validated config as YAML."""
    sys.stdout.write(dump(load_source(source)))
    return EXIT_OK


# --------------------------------------------------------------------------- conversion


def dump(cfg: RunConfig, path: str | Path | None = None) -> str:
    """YAML text of a resolved config; written to `path` atomically if given."""
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)
    if path is not None:
        atomic_write_text(path, text)
    return text


# --------------------------------------------------------------------------- loading


def load_source(source: ConfigSource) -> RunConfig:
    """The resolved, validated config a command's --config and overrides name."""
    return load(source.config, source.overrides)


def _parsed(texts: Iterable[str], origin: str, p: Problems) -> Iterator[tuple[str, Any]]:
    """(dotted key, YAML value) of each `key=value`; one that does not parse is a problem of `origin`."""
    for text in texts:
        try:
            yield parse_override(text)
        except ValueError as exc:
            p.items.append(f"{origin}: {exc}")


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
         origin: str = "command line") -> RunConfig:
    """Resolve defaults < YAML file < overrides into a validated `RunConfig`.

    Raises `ConfigError` listing every problem, each with its file (or `origin`, where the
    overrides came from) and key.
    """
    origins: dict[str, str] = {}
    raw: dict[str, Any] = {}
    early = Problems(origins)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError([f"{path}: config file not found"])
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError([f"{path}: not valid YAML: {exc}"]) from None
        if loaded is None or loaded == {}:
            early.items.append(f"{path}: the file is empty (a run needs at least data.train, train.max_steps "
                               "and a model: see configs/)")
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError([f"{path}: the top level must be a mapping of sections, got {type(loaded).__name__}"])
        raw = loaded
        for key in walk_keys(raw):
            origins[key] = str(path)
    for key, value in _parsed(overrides, origin, early):
        origins[key] = origin
        for sub in walk_keys(value, key):
            origins[sub] = origin
        error = set_dotted(raw, key, value)
        if error:
            early.items.append(f"{origin}: {error}")
    # A key the file leaves unset is the file's problem, not the defaults'.
    p = Problems(origins, default_origin=f"{path} (not set there)" if path is not None else "defaults")
    p.items.extend(early.items)
    return _validated(raw, p)


def _validated(raw: dict[str, Any], p: Problems) -> RunConfig:
    cfg = build_section(RunConfig, raw, "", p)
    cfg.check(p)
    p.raise_if_any()
    # model.config is checked against the model's config class where the model is built.
    cfg.model.origins = {key: p.origin(f"model.config.{key}") for key in cfg.model.config}
    # Dataset paths are checked where the datasets are opened.
    for name, src in cfg.data.train.items():
        src.origin = p.origin(f"data.train.{name}.path")
        src.origins = _domain_origins(p, f"data.train.{name}.domains", src.domains)
    for name, spec in cfg.eval.sets.items():
        spec.origin = p.origin(f"eval.sets.{name}.path")
    return cfg


def _domain_origins(p: Problems, key: str, domains: dict[str, float] | list[str] | None) -> dict[str, str]:
    """Where a source's `domains` and each of its entries came from (domains are checked against the
    dataset where it is opened). Entries all set on the command line name it, not the source's file."""
    if domains is None:
        return {}
    entries = {f"{key}.{d}": p.origin(f"{key}.{d}") for d in domains} if isinstance(domains, dict) else {}
    return {key: p.origins.get(key) or next(iter(entries.values()), p.origin(key)), **entries}


def from_dict(raw: dict[str, Any], origin: str = "config") -> RunConfig:
    """A validated `RunConfig` from plain data (e.g. a run's saved config.yaml)."""
    return _validated(raw, Problems(default_origin=origin))


def load_schedule_spec(text: str, total_steps: int) -> ScheduleConfig:
    """A checked ScheduleConfig from 'name=wsd max_lr=3e-4 cooldown=20%' (keys of `schedule`)."""
    origin = f"--spec {text!r}"
    p = Problems(default_origin=origin)
    raw: dict[str, Any] = {}
    try:
        tokens = shlex.split(text)
    except ValueError as exc:
        raise ConfigError([f"{origin}: {exc}"]) from None
    for key, value in _parsed(tokens, origin, p):
        raw[key.removeprefix("schedule.")] = value
    cfg = build_section(ScheduleConfig, raw, "schedule", p)
    check_config(cfg, p, total_steps)
    p.raise_if_any()
    return cfg
