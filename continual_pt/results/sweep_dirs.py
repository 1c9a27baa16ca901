"""A sweep directory (one holding the `sweep.json` plan that `cpt sweep` writes) as its run dirs.

`cpt plot` and `cpt report` take one wherever they take run directories. Its runs come sorted by
their axis values, the grid's first axis first, so the runs that share a value sit together;
each keeps its values (`varying`) for the report's axis columns. The plan is read here as plain
JSON: {"sweep": name, "axes": [dotted keys], "runs": [{"name", "run_dir", "varying", ...}]}.
A run dir is looked for at `<sweep dir>/runs/<name>` first (where `cpt sweep` puts it, wherever
the sweep directory has been moved or was named from), else at the recorded `run_dir`.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from continual_pt.errors import UserError
from continual_pt.layout import METRICS, SCORES, SWEEP_PLAN


@dataclass(frozen=True)
class Member:
    """One run of a sweep directory, or a run directory given on its own (no sweep, no values)."""

    path: Path
    varying: dict[str, Any] = field(default_factory=dict)
    sweep: str | None = None


def is_sweep_dir(path: str | Path) -> bool:
    return (Path(path) / SWEEP_PLAN).is_file()


def _plan(directory: Path) -> dict[str, Any]:
    path = directory / SWEEP_PLAN
    try:
        plan = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read the sweep plan: {exc}") from None
    runs = plan.get("runs") if isinstance(plan, dict) else None
    if not isinstance(runs, list) or not all(isinstance(r, dict) and isinstance(r.get("name"), str)
                                             for r in runs):
        raise UserError(f"{path}: not a sweep plan (expected \"runs\": a list of runs with a \"name\" each)")
    return plan


def value_key(value: Any) -> tuple:
    """An order over axis values of any type: none first, then numbers, then text, then the rest."""
    if value is None:
        return (0,)
    if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
        return (1, float(value))
    if isinstance(value, str):
        return (2, value)
    return (3, json.dumps(value, sort_keys=True, default=str))


def _run_dir(directory: Path, record: dict[str, Any]) -> Path:
    here = directory / "runs" / record["name"]
    recorded = record.get("run_dir")
    return here if here.is_dir() or not isinstance(recorded, str) else Path(recorded)


def has_results(run_dir: Path) -> bool:
    return (run_dir / METRICS).is_file() or (run_dir / SCORES).is_file()


def sweep_members(directory: str | Path) -> list[Member]:
    """The runs of a sweep directory that have results, sorted by their axis values; the runs
    without results yet are named on stderr (UserError when none has any)."""
    directory = Path(directory)
    plan = _plan(directory)
    name = str(plan.get("sweep") or directory.name)
    axes = [k for k in plan.get("axes") or [] if isinstance(k, str)]
    members, waiting = [], []
    for record in plan["runs"]:
        run_dir = _run_dir(directory, record)
        varying = record.get("varying") if isinstance(record.get("varying"), dict) else {}
        if has_results(run_dir):
            members.append(Member(run_dir, {k: varying.get(k) for k in axes} or dict(varying), name))
        else:
            waiting.append(record["name"])
    if not members:
        raise UserError(f"{directory}: no run of sweep {name} has results yet (no {METRICS}, no "
                        f"{SCORES}); train them first (cpt sweep --local or --submit)")
    if waiting:
        print(f"note: sweep {name}: {len(waiting)} run(s) without results yet left out: {', '.join(waiting)}",
              file=sys.stderr)
    return sorted(members, key=lambda m: tuple(value_key(v) for v in m.varying.values()))


def expand(paths: list[str]) -> list[Member]:
    """Run directories as given, each sweep directory among them replaced by its runs."""
    out: list[Member] = []
    for path in paths:
        out += sweep_members(path) if is_sweep_dir(path) else [Member(Path(path))]
    return out
