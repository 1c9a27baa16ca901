"""A grid file and the runs it stands for.

    sweep: rewarm-small              # the sweep's name; its directory is sweeps/<sweep> (or `out`)
    base: ../quickstart/rewarm.yaml  # the run config every run starts from (relative to this file)
    vars: {DATA: data/quickstart}    # ${DATA} in any value; the environment or --var overrides
    set: {train.max_steps: 300}      # dotted keys set for every run
    grid:                            # one block of axes, crossed; or `grids:` a list of blocks
      set: {schedule.warmup: 0.01}   #   keys set for this block's runs only
      axes:
        schedule.max_lr: [1.5e-4, 3e-4, 6e-4]
        checkpoint.init: {s143k: runs/pythia@step143000, s27k: runs/pythia@step27000}  # label: value
      zip:                           #   axes that move together (equal lengths), crossed with the rest
        - {data.train.old.weight: [0.0, 0.05], data.train.new.weight: [1.0, 0.95]}
    runs:                            # named extra runs (baselines), not crossed
      constant: {schedule.name: constant, schedule.max_lr: 3.0e-5}
    labels: {schedule.max_lr: lr}    # how a key is spelled in run names (default: a short suffix)

A run's name spells the value of every axis key of the grid (`lr0.0003_warmup0.01`), so the same
grid gives the same names, adding a value to an axis renames nothing, and a point several blocks
share (the centre of one-axis sweeps) is one run. Every problem of the grid is gathered and
reported at once, each naming the grid file and where in it, before anything is written.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from continual_pt.config import RunConfig
from continual_pt.config.load import dump, load
from continual_pt.config.typed import ConfigError, to_dict
from continual_pt.errors import Problems, UserError
from continual_pt.layout import SWEEP_PLAN

GRID_KEYS = ("sweep", "base", "out", "vars", "set", "grid", "grids", "runs", "labels")
BLOCK_KEYS = ("set", "axes", "zip")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class Axis:
    key: str
    values: tuple[tuple[str, Any], ...]   # (label, value), in the grid's order


@dataclass(frozen=True)
class Block:
    fixed: dict[str, Any]
    groups: tuple[tuple[Axis, ...], ...]  # each group: one axis, or several that move together


@dataclass
class PlannedRun:
    name: str
    settings: dict[str, Any]   # dotted key -> value, set over the base config
    varying: dict[str, Any]    # every axis key of the grid -> this run's value
    config: RunConfig


@dataclass
class Sweep:
    name: str
    grid_path: Path
    directory: Path
    base: Path | None
    axis_keys: list[str]
    runs: list[PlannedRun]
    common_keys: list[str] = dataclasses.field(default_factory=list)   # set for every run alike


def load_sweep(grid_path: str | Path, variables: dict[str, str] | None = None) -> Sweep:
    """Read, expand and validate a grid file; raises UserError listing every problem."""
    path = Path(grid_path)
    p = Problems("sweep grid", default_origin=str(path))
    raw = _read(path, p)
    declared = raw.get("vars") if isinstance(raw.get("vars"), dict) else {}
    raw = _substitute(raw, _variables(raw.get("vars"), variables or {}, p), set(declared), p)
    base = _base_path(raw.get("base"), path, p)
    name = str(raw.get("sweep") or path.stem)
    directory = Path(raw["out"]) if raw.get("out") else Path("sweeps") / name
    blocks = _blocks(raw, p)
    extra = _mapping(raw.get("runs"), "runs", p)
    if base is not None and not base.is_file():
        p.raise_if_any()   # every run would fail on the missing base: say it once
    axis_keys = list(dict.fromkeys(a.key for b in blocks for g in b.groups for a in g))
    # A run's name spells each axis once: of axes that move together, the first stands for the group.
    named = [k for k in axis_keys if not any(a.key == k for b in blocks for g in b.groups for a in g[1:])]
    labels = _key_labels(named, axis_keys, _mapping(raw.get("labels"), "labels", p))
    common = _mapping(raw.get("set"), "set", p)
    runs: dict[str, PlannedRun] = {}
    for where, settings, own_name in _points(blocks, common, extra, p):
        run = _plan(where, settings, own_name, base, directory, axis_keys, labels, blocks, p)
        if run is not None:
            _add_unique(runs, run, where, p)
    if not runs and not p:
        p.add("grid", "no runs: give `grid`/`grids` with axes, or `runs`")
    p.raise_if_any()
    return Sweep(name, path, directory, base, axis_keys, list(runs.values()), list(common))


# --------------------------------------------------------------------------- reading


def _grid_of(plan: Path) -> str | None:
    """The grid file a sweep directory's plan says it was expanded from, if it says."""
    try:
        grid = json.loads(plan.read_text(encoding="utf-8")).get("grid")
    except (OSError, ValueError, AttributeError):
        return None
    return grid if isinstance(grid, str) else None


def _read(path: Path, p: Problems) -> dict[str, Any]:
    if path.is_dir():
        plan = path / SWEEP_PLAN
        written_from = _grid_of(plan) if plan.is_file() else None
        raise UserError(f"{path} is a directory, not a grid file" + (
            f": a sweep directory, expanded from the grid {written_from} (pass --grid {written_from})"
            if written_from else " (pass the grid's YAML file, e.g. configs/sweeps/small.yaml)"))
    if not path.is_file():
        raise UserError(f"{path}: grid file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: the top level must be a mapping (sweep, base, set, grid, runs, ...)")
    for key in raw:
        if key not in GRID_KEYS:
            p.add(str(key), f"unknown key; accepted: {', '.join(GRID_KEYS)}")
    if "grid" in raw and "grids" in raw:
        p.add("grid", "give either `grid` (one block) or `grids` (a list of blocks), not both")
    return raw


def _variables(declared: Any, given: dict[str, str], p: Problems) -> dict[str, str]:
    """Each declared variable's value: --var, else the environment, else the grid's default."""
    if declared is None:
        declared = {}
    if not isinstance(declared, dict):
        p.add("vars", "must be a mapping NAME: default (null: must be set)")
        return {}
    values = {}
    for name, default in declared.items():
        value = given.get(name, os.environ.get(name, default))
        if value is None:
            p.add(f"vars.{name}", f"not set: export {name}=... or pass --var {name}=...")
        else:
            values[name] = str(value)
    for name in given:
        if name not in declared:
            p.add(f"--var {name}", f"not a variable of this grid (declared: {', '.join(declared) or 'none'})")
    return values


def _substitute(node: Any, values: dict[str, str], declared: set[str], p: Problems) -> Any:
    if isinstance(node, dict):
        return {k: _substitute(v, values, declared, p) if k != "vars" else v for k, v in node.items()}
    if isinstance(node, list):
        return [_substitute(v, values, declared, p) for v in node]
    if isinstance(node, str):
        def value_of(match: re.Match) -> str:
            if match.group(1) not in values:
                if match.group(1) not in declared:   # a declared one left unset is reported once, above
                    p.add(f"${{{match.group(1)}}}", "an undeclared variable (declare it under `vars`)")
                return match.group(0)
            return values[match.group(1)]
        return _VAR.sub(value_of, node)
    return node


def _base_path(base: Any, grid_path: Path, p: Problems) -> Path | None:
    if base is None:
        return None
    path = Path(str(base))
    path = path if path.is_absolute() else grid_path.parent / path
    if not path.is_file():
        p.add("base", f"run config {path} not found")
    return path


def _mapping(node: Any, where: str, p: Problems) -> dict[str, Any]:
    if node is None:
        return {}
    if not isinstance(node, dict):
        p.add(where, f"must be a mapping, got {type(node).__name__}")
        return {}
    return {str(k): v for k, v in node.items()}


def _axis(key: str, spec: Any, where: str, p: Problems) -> Axis | None:
    if isinstance(spec, dict):
        values = tuple((str(label), value) for label, value in spec.items())
    elif isinstance(spec, list):
        values = tuple((label_of(value), value) for value in spec)
    else:
        p.add(f"{where}.{key}", "must be a list of values or a mapping label: value")
        return None
    if not values:
        p.add(f"{where}.{key}", "empty axis: give at least one value")
        return None
    labels = [label for label, _ in values]
    if len(set(labels)) < len(labels):
        p.add(f"{where}.{key}", f"two values with the same label in {labels}")
    return Axis(key, values)


def _blocks(raw: dict[str, Any], p: Problems) -> list[Block]:
    specs = raw.get("grids", [raw["grid"]] if raw.get("grid") is not None else [])
    if not isinstance(specs, list):
        p.add("grids", "must be a list of blocks (each with set, axes, zip)")
        return []
    blocks = []
    for i, spec in enumerate(specs):
        where = "grid" if "grid" in raw else f"grids[{i}]"
        spec = _mapping(spec, where, p)
        for key in spec:
            if key not in BLOCK_KEYS:
                p.add(f"{where}.{key}", f"unknown key; accepted: {', '.join(BLOCK_KEYS)}")
        groups = [(axis,) for key, values in _mapping(spec.get("axes"), f"{where}.axes", p).items()
                  if (axis := _axis(key, values, f"{where}.axes", p))]
        zips = spec.get("zip") or []
        for j, group in enumerate(zips if isinstance(zips, list) else [zips]):
            zwhere = f"{where}.zip[{j}]"
            axes = tuple(a for key, values in _mapping(group, zwhere, p).items()
                         if (a := _axis(key, values, zwhere, p)))
            if len({len(a.values) for a in axes}) > 1:
                p.add(zwhere, "axes that move together need as many values each: "
                      + ", ".join(f"{a.key} has {len(a.values)}" for a in axes))
            elif axes:
                groups.append(axes)
        keys = [a.key for g in groups for a in g]
        for key in sorted({k for k in keys if keys.count(k) > 1}):
            p.add(where, f"{key} is an axis twice")
        blocks.append(Block(_mapping(spec.get("set"), f"{where}.set", p), tuple(groups)))
    return blocks


# --------------------------------------------------------------------------- expanding


def _points(blocks: list[Block], common: dict[str, Any], extra: dict[str, Any], p: Problems):
    """(where, settings, own name or None) of every run: each block's cross product, then `runs`."""
    for b, block in enumerate(blocks):
        for combo in itertools.product(*(range(len(g[0].values)) for g in block.groups)):
            settings = {**common, **block.fixed}
            point = []
            for group, index in zip(block.groups, combo):
                for axis in group:
                    settings[axis.key] = axis.values[index][1]
                    point.append(f"{axis.key}={axis.values[index][0]}")
            yield f"{f'grids[{b}]' if len(blocks) > 1 else 'grid'} ({', '.join(point)})", settings, None
    for name, own in extra.items():
        own = _mapping(own, f"runs.{name}", p)
        yield f"runs.{name}", {**common, **own}, name


def _plan(where: str, settings: dict[str, Any], own_name: str | None, base: Path | None, directory: Path,
          axis_keys: list[str], labels: dict[str, str], blocks: list[Block], p: Problems):
    overrides = [f"{key}={yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()}"
                 .removesuffix("\n...") for key, value in settings.items()]
    overrides += [f"out_dir={directory / 'runs'}", "name=planned"]
    try:
        cfg = load(base, overrides, origin=f"{p.default_origin}: {where}")
    except ConfigError as exc:
        p.extend(problem if problem.startswith(f"{p.default_origin}: ") else f"{p.default_origin}: {where}: {problem}"
                 for problem in exc.problems)
        return None
    flat = to_dict(cfg)
    varying = {key: _dotted(flat, key) for key in axis_keys}
    name = own_name or "_".join(f"{labels[k]}{_label_in(k, varying[k], blocks)}" for k in labels) or "base"
    if not re.fullmatch(r"[A-Za-z0-9._=+-]+", name):
        p.add(where, f"run name {name!r} has characters other than letters, digits and ._=+-")
        return None
    return PlannedRun(name, settings, varying, dataclasses.replace(cfg, name=name))


def _add_unique(runs: dict[str, PlannedRun], run: PlannedRun, where: str, p: Problems) -> None:
    seen = runs.get(run.name)
    if seen is None:
        runs[run.name] = run
    elif dump(seen.config) != dump(run.config):
        p.add(where, f"two different runs are both named {run.name!r}: give the extra run another name "
              "or label the axis values apart")


def _dotted(flat: dict[str, Any], key: str) -> Any:
    node: Any = flat
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _label_in(key: str, value: Any, blocks: list[Block]) -> str:
    """The label an axis gives `value` of `key`, else the value spelled out."""
    for block in blocks:
        for group in block.groups:
            for axis in group:
                if axis.key == key:
                    for label, v in axis.values:
                        if v == value:
                            return label
    return label_of(value)


def _key_labels(named: list[str], keys: list[str], given: dict[str, Any]) -> dict[str, str]:
    """How each named axis key is spelled in names: as `labels` says, else its shortest suffix that no
    other axis key ends with."""
    out = {}
    for key in named:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if sum(k == suffix or k.endswith("." + suffix) for k in keys) == 1:
                break
        out[key] = str(given.get(key, suffix))
    return out


def label_of(value: Any) -> str:
    """A value as it appears in a run name: 0.0003, 1000, true, pythia-410m-step143000."""
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", str(value)).strip("-") or "empty"
