"""Downstream-task results in `cpt report` and `cpt plot`: the lm-evaluation-harness rows that
`cpt eval --lm-eval` appends to a run's scores.jsonl beside its loss rows.

A row is a task row iff it has a "task" field (loss rows never have one, and a task row is never read
as a loss row). It holds one task (or group) at one checkpoint: `metrics` (name -> value), `stderr`
(the same names; null where the harness has none) and `higher_is_better`. Rows are one measurement
only when they agree on CONFIG_FIELDS (what was asked for, which harness and task version, how many
few-shot examples, how many documents, which dtype). Within a run each task has one series: the
configuration measured at the most checkpoints, ties going to the larger limit (no limit counts as
the largest), then to the configuration written last, as the loss curves take one series per set.

`cpt report` shows a run's task metrics at its last task checkpoint: the highest step of any of its
task series. A column is one (task, configuration, metric): runs whose series differ in
configuration get separate columns, so no column mixes two measurements, and its head says the
few-shot count the task used and the limit. The gain against a baseline (its own last task
checkpoint, same column) is positive where the run is better by the row's higher_is_better.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from continual_pt.errors import UserError

CONFIG_FIELDS = ("request", "request_version", "harness", "task_version", "num_fewshot", "limit", "dtype")
"""What, besides the task and the checkpoint, makes two task rows the same measurement."""
LIMIT = CONFIG_FIELDS.index("limit")


def is_task_row(row: dict[str, Any]) -> bool:
    """Whether a scores.jsonl row is a downstream-task row (not a held-out loss)."""
    return "task" in row


def _number(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def _hashable(value: Any) -> Any:
    return value if value is None or isinstance(value, (str, int, float, bool)) else json.dumps(value, sort_keys=True)


@dataclass(frozen=True)
class TaskPoint:
    """One task at one checkpoint."""

    step: int
    tokens: int
    metrics: dict[str, Any]
    stderr: dict[str, Any]
    higher_is_better: dict[str, Any]
    n_shot: Any

    def value(self, metric: str) -> float | None:
        return _number(self.metrics.get(metric))

    def error(self, metric: str) -> float | None:
        return _number(self.stderr.get(metric))


@dataclass(frozen=True)
class TaskSeries:
    """A run's points of one task in one configuration (CONFIG_FIELDS values), ordered by step."""

    task: str
    config: tuple
    points: list[TaskPoint]

    def at(self, step: int | None) -> TaskPoint | None:
        return next((p for p in self.points if p.step == step), None)

    def metrics(self) -> list[str]:
        return list(dict.fromkeys(m for p in self.points for m in p.metrics))

    def label(self) -> str:
        """The few-shot count the task used and the limit, e.g. '0-shot' or '5-shot, limit 100'."""
        shots = sorted({str(p.n_shot) for p in self.points if p.n_shot is not None})
        fewshot, limit = self.config[CONFIG_FIELDS.index("num_fewshot")], self.config[LIMIT]
        text = f"{'/'.join(shots)}-shot" if shots else ("default shots" if fewshot is None else f"{fewshot}-shot")
        return text if limit is None else f"{text}, limit {limit}"

    def better(self, metric: str) -> bool | None:
        """Whether a higher value of `metric` is better, as its last row says (None: not said)."""
        value = self.points[-1].higher_is_better.get(metric) if self.points else None
        return value if isinstance(value, bool) else None


def _point(row: dict[str, Any]) -> TaskPoint:
    def mapping(name: str) -> dict[str, Any]:
        return row[name] if isinstance(row.get(name), dict) else {}

    tokens = row.get("tokens_seen")
    return TaskPoint(int(row["step"]), int(tokens) if isinstance(tokens, int) else 0, mapping("metrics"),
                     mapping("stderr"), mapping("higher_is_better"), row.get("n_shot"))


def _rank(config: tuple, members: list[tuple[int, dict[str, Any]]]) -> tuple:
    """Most checkpoints first, then the larger limit (none: all documents, the largest), then written last."""
    limit = config[LIMIT]
    size = math.inf if limit is None else (_number(limit) if _number(limit) is not None else -math.inf)
    return len({r["step"] for _, r in members}), size, members[-1][0]


def task_series(rows: list[dict[str, Any]]) -> dict[str, TaskSeries]:
    """Task name -> the one series of it a run's scores rows give (see the module docstring)."""
    groups: dict[str, dict[tuple, list[tuple[int, dict[str, Any]]]]] = {}
    for index, r in enumerate(rows):
        if not is_task_row(r) or r.get("kind") != "checkpoint" or not isinstance(r.get("step"), int):
            continue
        config = tuple(_hashable(r.get(k)) for k in CONFIG_FIELDS)
        groups.setdefault(str(r["task"]), {}).setdefault(config, []).append((index, r))
    series = {}
    for task, configs in sorted(groups.items()):
        config, members = max(configs.items(), key=lambda item: _rank(*item))
        by_step = {r["step"]: r for _, r in members}   # a later row of a step replaces an earlier one
        series[task] = TaskSeries(task, config, [_point(by_step[s]) for s in sorted(by_step)])
    return series


def last_step(tasks: dict[str, TaskSeries]) -> int | None:
    """A run's last task checkpoint: the highest step of any of its task series."""
    return max((s.points[-1].step for s in tasks.values() if s.points), default=None)


# --------------------------------------------------------------------------- cpt report's columns


@dataclass(frozen=True)
class TaskColumn:
    """One column of the table: a metric of a task in one configuration."""

    task: str
    config: tuple
    metric: str
    label: str

    @property
    def head(self) -> str:
        return f"{self.task} {self.metric} ({self.label})"

    def point(self, tasks: dict[str, TaskSeries]) -> TaskPoint | None:
        """The run's point of this column at its last task checkpoint (None: not measured there)."""
        series = tasks.get(self.task)
        return series.at(last_step(tasks)) if series is not None and series.config == self.config else None


def _keeps(metric: str, wanted: Sequence[str]) -> bool:
    return not wanted or metric in wanted or metric.split(",", 1)[0] in wanted


def _disambiguated(columns: list[TaskColumn]) -> list[TaskColumn]:
    """Columns whose heads would read alike (same task, metric, shots and limit, another configuration)
    name the fields in which their configurations differ."""
    out = []
    for c in columns:
        twins = [o.config for o in columns if o.head == c.head]
        differ = [i for i, name in enumerate(CONFIG_FIELDS) if len({cfg[i] for cfg in twins}) > 1]
        extra = "; ".join(f"{CONFIG_FIELDS[i]}={c.config[i]}" for i in differ)
        out.append(TaskColumn(c.task, c.config, c.metric, f"{c.label}; {extra}" if extra else c.label))
    return out


def task_columns(tasks_of_runs: Sequence[dict[str, TaskSeries]], wanted: Sequence[str] = ()) -> list[TaskColumn]:
    """The task columns of these runs (every metric of every task, or only the `wanted` metric names;
    a name without a filter, e.g. exact_match, also keeps its filtered variants); UserError for a
    wanted name that no task row has."""
    found: dict[tuple[str, tuple, str], str] = {}
    for task in sorted({t for tasks in tasks_of_runs for t in tasks}):
        for tasks in tasks_of_runs:
            series = tasks.get(task)
            for metric in series.metrics() if series else ():
                found.setdefault((task, series.config, metric), series.label())
    missing = [w for w in wanted if not any(_keeps(metric, [w]) for _, _, metric in found)]
    if missing:
        known = sorted({metric for _, _, metric in found})
        raise UserError(f"--task-metric {', '.join(missing)}: no task row of these runs has that metric; "
                        f"known: {', '.join(known) or 'none (no cpt eval --lm-eval rows in their scores)'}")
    return _disambiguated([TaskColumn(t, c, m, label) for (t, c, m), label in found.items() if _keeps(m, wanted)])


def _value_cell(point: TaskPoint | None, metric: str) -> str:
    value = point.value(metric) if point else None
    if value is None:
        return "n/a"
    error = point.error(metric)
    return f"{value:.4f}" if error is None else f"{value:.4f} ± {error:.4f}"


def gain(column: TaskColumn, tasks: dict[str, TaskSeries], base: dict[str, TaskSeries]) -> float | None:
    """The run's value minus the baseline's (each at its last task checkpoint), negated where lower is
    better, so that positive is better; None where either is missing or the rows do not say which way."""
    point, base_point = column.point(tasks), column.point(base)
    value, base_value = point and point.value(column.metric), base_point and base_point.value(column.metric)
    better = tasks[column.task].better(column.metric) if point else None
    if value is None or base_value is None or better is None:
        return None
    return value - base_value if better else base_value - value


def _note(column: TaskColumn) -> str:
    cfg = dict(zip(CONFIG_FIELDS, column.config))
    fewshot = "not given (each task's own)" if cfg["num_fewshot"] is None else cfg["num_fewshot"]
    documents = "all documents" if cfg["limit"] is None else f"limit {cfg['limit']}"
    return (f"- {column.task} ({column.label}): {cfg['harness'] or 'harness not recorded'}, task version "
            f"{cfg['task_version']}, asked for as {cfg['request']} (version {cfg['request_version']}), "
            f"num_fewshot {fewshot}, {documents}, {cfg['dtype']}")


def table_parts(runs: Sequence[Any], baseline: Any | None,
                wanted: Sequence[str] = ()) -> tuple[list[str], list[list[str]], list[str]]:
    """`cpt report`'s task part for runs (objects with .name and .tasks): the head cells, each run's cells
    and the note lines below the table; all empty when no run has task rows (and nothing is wanted)."""
    columns = task_columns([run.tasks for run in runs], wanted)
    if not columns:
        return [], [[] for _ in runs], []
    heads = [c.head.replace("|", "\\|") for c in columns]
    head = ["tasks at step", *heads, *((f"gain vs {baseline.name} (Δ {h})" for h in heads) if baseline is not None else ())]
    rows = []
    for run in runs:
        step = last_step(run.tasks)
        cells = ["n/a" if step is None else str(step), *(_value_cell(c.point(run.tasks), c.metric) for c in columns)]
        if baseline is not None:
            cells += [_signed(gain(c, run.tasks, baseline.tasks)) for c in columns]
        rows.append(cells)
    notes = ["Tasks (cpt eval --lm-eval): each run's metrics at its last checkpoint with task scores (tasks at "
             "step), value ± stderr; a column holds one configuration:"]
    notes += list(dict.fromkeys(_note(c) for c in columns))
    if baseline is not None:
        notes.append(f"Gain vs {baseline.name}: the run's value minus {baseline.name}'s at its last task checkpoint, "
                     "sign turned where lower is better, so positive is better (n/a where the rows do not say)")
    return head, rows, notes


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.4f}"


# --------------------------------------------------------------------------- cpt plot's panels


def plot_panels(runs: Sequence[Any], specs: Sequence[str]) -> list[tuple[str, str]]:
    """(task, metric) per panel from --task TASK[:METRIC] values (no metric: each of the task's metrics);
    UserError naming what these runs have for a task or metric they have no rows of."""
    known = sorted({t for run in runs for t in run.tasks})
    panels: list[tuple[str, str]] = []
    for spec in specs:
        task, _, metric = (spec, "", "") if spec in known or ":" not in spec else spec.rpartition(":")
        if task not in known:
            raise UserError(f"--task {spec}: no run has task rows of {task!r}; known tasks: "
                            f"{', '.join(known) or 'none (no cpt eval --lm-eval rows in their scores)'}")
        metrics = list(dict.fromkeys(m for run in runs if task in run.tasks for m in run.tasks[task].metrics()))
        if metric and metric not in metrics:
            raise UserError(f"--task {spec}: {task} has no metric {metric!r}; its metrics: {', '.join(metrics)}")
        panels += [(task, m) for m in ([metric] if metric else metrics)]
    return list(dict.fromkeys(panels))


def task_curve(series: TaskSeries | None, metric: str) -> tuple[list[int], list[float]]:
    """(tokens seen, value) of the points of a series that have `metric`."""
    points = [(p.tokens, p.value(metric)) for p in series.points] if series else []
    kept = [(t, v) for t, v in points if v is not None]
    return [t for t, _ in kept], [v for _, v in kept]


def panel_text(runs: Sequence[Any], task: str, metric: str) -> tuple[str, str]:
    """A task panel's title (with the shots and limit of the runs' series) and its y label."""
    series = [run.tasks[task] for run in runs if task in run.tasks and task_curve(run.tasks[task], metric)[0]]
    labels = list(dict.fromkeys(s.label() for s in series))
    title = f"{task}: {metric}" + (f" ({'; '.join(labels)})" if labels else " (no data)")
    better = {s.better(metric) for s in series} - {None}
    way = {True: " (higher is better)", False: " (lower is better)"}.get(better.pop()) if len(better) == 1 else ""
    return title, metric + way
