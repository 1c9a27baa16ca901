"""The options of `cpt plot`, `cpt report` and `cpt schedule plot/show` (see `continual_pt.options`)."""

from __future__ import annotations

from dataclasses import dataclass

from continual_pt.layout import SWEEP_PLAN
from continual_pt.options import option

SOURCES = ("auto", "metrics", "scores")
"""Where a run's losses are read from: in-loop evaluations (metrics), `cpt eval` scores (scores), or per
set, scores when the run has any and metrics otherwise (auto)."""
RUNS_HELP = f"run directories, or sweep directories (with {SWEEP_PLAN}) standing for all their runs"


@dataclass(kw_only=True)
class PlotOptions:
    """`cpt plot`: which runs, which sets, where to."""

    runs: list[str] = option(help=RUNS_HELP, positional=True, nargs="+")
    out: str = option(help="output path without suffix (writes OUT.png and OUT.svg)", flags=("--out", "-o"))
    sets: str | None = option(None, help="comma-separated set names, one panel each (default: all)")
    source: str = option("auto", help="in-loop evaluations (metrics), cpt eval scores (scores) or, per set, "
                         "scores when the run has any and metrics otherwise (auto)", choices=SOURCES)
    title: str | None = option(None, help="figure title")
    log_x: bool = option(False, help="logarithmic tokens axis")
    by_domain: bool = option(False, help="a panel per domain of each set instead of one per set (sets scored by "
                             "domain: eval.by_domain, cpt eval --by-domain)")
    tasks: list[str] = option([], help="also a panel of a downstream task's metric vs tokens, a line per run "
                              "(cpt eval --lm-eval scores; without :METRIC, a panel per metric of the task); "
                              "repeatable", flags=("--task",), metavar="TASK[:METRIC]")


@dataclass(kw_only=True)
class ReportOptions:
    """`cpt report`: which runs, which sets are upstream and downstream, against which baseline."""

    runs: list[str] = option(help=RUNS_HELP, positional=True, nargs="+")
    upstream: str | None = option(None, help="name of the upstream (old data) set, e.g. pile")
    downstream: str | None = option(None, help="name of the downstream (new data) set, e.g. slimpajama")
    baseline: str | None = option(None, help="run directory to compare with (e.g. the constant-LR run), or the "
                                  "name of a run of a sweep directory given")
    source: str = option("auto", help="as for cpt plot", choices=SOURCES)
    out: str | None = option(None, help="markdown file to write (default: print)", flags=("--out", "-o"))
    by_domain: bool = option(False, help="also a table per set of each domain's final loss and its forgetting "
                             "(upstream) or gain (downstream), for sets scored by domain")
    task_metrics: list[str] = option([], help="keep only this metric in the downstream-task columns (cpt eval "
                                     "--lm-eval scores; default: every metric of every task), e.g. acc_norm; a "
                                     "name without a filter also keeps its filtered variants (exact_match keeps "
                                     "exact_match,strict-match); repeatable", flags=("--task-metric",),
                                     metavar="NAME")


@dataclass(kw_only=True)
class ScheduleOptions:
    """Which schedules to show, over how many steps."""

    configs: list[str] = option([], help="run config YAML; repeat for several schedules", flags=("--config", "-c"))
    specs: list[str] = option([], help="inline schedule 'name=wsd max_lr=3e-4 cooldown=0.2 ...' (schedule.* keys); "
                              "repeatable", flags=("--spec",))
    steps: int | None = option(None, help="run length in optimizer steps (default: train.max_steps)")
    labels: list[str] = option([], help="legend label per schedule, in order", flags=("--label",))
    overrides: list[str] = option([], help="overrides applied to every --config", positional=True, nargs="*",
                                  metavar="key=value")


@dataclass(kw_only=True)
class SchedulePlotOptions(ScheduleOptions):
    """`cpt schedule plot`: the schedules drawn into one PNG."""

    out: str = option("schedule.png", help="PNG to write", flags=("--out", "-o"))
    title: str | None = option(None, help="figure title")


@dataclass(kw_only=True)
class ScheduleShowOptions(ScheduleOptions):
    """`cpt schedule show`: the schedules' LR at chosen steps."""

    at: str | None = option(None, help="comma-separated steps (default: boundaries of every phase and a few "
                            "between)")
