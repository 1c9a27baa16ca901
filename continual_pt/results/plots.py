"""Figures, drawn with matplotlib's Agg canvas (no display, no pyplot global state)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import EngFormatter

from continual_pt.errors import UserError
from continual_pt.files import atomic_output
from continual_pt.layout import EXIT_OK
from continual_pt.results.options import PlotOptions
from continual_pt.results.report import RunCurves, domains_of, load_runs
from continual_pt.results.tasks import panel_text, plot_panels, task_curve


def plot_schedules(curves: dict[str, tuple[Sequence[int], Sequence[float]]], out_path: str | Path,
                   title: str | None = None) -> Path:
    """Draw one labelled line of learning rate vs optimizer step per schedule into a PNG."""
    # The legend goes below the axes, where long labels cover no curve; the figure grows to hold it.
    fig = Figure(figsize=(8, 4.5 + 0.22 * len(curves)), layout="constrained")
    ax = fig.add_subplot()
    for label, (steps, lrs) in curves.items():
        ax.plot(steps, lrs, label=label, linewidth=1.6)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_ylim(bottom=0)
    ax.set_xlim(left=0)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", fontsize="small")
    ax.set_title(title or "learning-rate schedules")
    out_path = Path(out_path)
    with atomic_output(out_path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return out_path


def _out_paths(out: str | Path) -> tuple[Path, Path]:
    """OUT -> (OUT.png, OUT.svg); a .png or .svg suffix on OUT is dropped first."""
    out = Path(out)
    if out.suffix.lower() in (".png", ".svg"):
        out = out.with_suffix("")
    return out.with_name(out.name + ".png"), out.with_name(out.name + ".svg")


SOURCE_LABELS = {"metrics": "in-loop eval", "scores": "cpt eval"}


def _save(fig, path: Path, fmt: str) -> None:
    # SVG text stays text (editable, searchable) instead of glyph outlines.
    with matplotlib.rc_context({"svg.fonttype": "none"}), atomic_output(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=120)


def draw_runs(runs: Sequence[RunCurves], sets: Sequence[str], title: str | None = None, log_x: bool = False,
              tasks: Sequence[tuple[str, str]] = ()):
    """A Figure of validation loss vs tokens, one panel per set and one line per run, a panel per
    (task, metric) of `tasks` (downstream-task scores vs tokens), and a panel of the LR vs tokens."""
    panels = len(sets) + len(tasks) + 1
    cols = panels if panels <= 3 else math.ceil(panels / 2)
    rows = math.ceil(panels / cols)
    fig = Figure(figsize=(4.6 * cols, 3.8 * rows + 0.3 + 0.25 * math.ceil(len(runs) / 3)), layout="constrained")
    axes = [fig.add_subplot(rows, cols, 1)]
    # One tokens axis for every panel, so a moment of the run lines up across them.
    axes += [fig.add_subplot(rows, cols, i + 1, sharex=axes[0]) for i in range(1, panels)]
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for ax, name in zip(axes, sets):
        for run, color in zip(runs, colors):
            points = run.evals.get(name, [])
            if points:
                ax.plot([p.tokens for p in points], [p.loss for p in points], color=color, marker="o",
                        markersize=3, linewidth=1.6, label=run.name)
        where = sorted({SOURCE_LABELS[run.sources[name]] for run in runs if name in run.sources})
        ax.set_title(f"{name}: held-out loss" + (f" ({', '.join(where)})" if where else " (no data)"))
        ax.set_ylabel("validation loss (nats/token)")
    for ax, (task, metric) in zip(axes[len(sets):], tasks):
        for run, color in zip(runs, colors):
            tokens, values = task_curve(run.tasks.get(task), metric)
            if tokens:
                ax.plot(tokens, values, color=color, marker="o", markersize=3, linewidth=1.6, label=run.name)
        heading, ylabel = panel_text(runs, task, metric)
        ax.set_title(heading)
        ax.set_ylabel(ylabel)
    lr_ax = axes[len(sets) + len(tasks)]
    for run, color in zip(runs, colors):
        if run.lr:
            lr_ax.plot([t for t, _ in run.lr], [v for _, v in run.lr], color=color, linewidth=1.6, label=run.name)
    lr_ax.set_title("learning-rate schedule")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_ylim(bottom=0)
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    for ax in axes:
        ax.set_xlabel("tokens seen in the run")
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        if log_x:
            ax.set_xscale("symlog", linthresh=1.0)
        ax.grid(alpha=0.3)
    # One legend for all panels (a run has the same colour everywhere), below them.
    handles = [Line2D([], [], color=c, linewidth=1.6, marker="o", markersize=3, label=r.name)
               for r, c in zip(runs, colors)]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(3, len(runs)), title="run")
    if title:
        fig.suptitle(title)
    return fig


def plot_runs(runs: Sequence[RunCurves], sets: Sequence[str], out: str | Path, title: str | None = None,
              log_x: bool = False, tasks: Sequence[tuple[str, str]] = ()) -> list[Path]:
    """`draw_runs` written as OUT.png and OUT.svg."""
    fig = draw_runs(runs, sets, title, log_x, tasks)
    png, svg = _out_paths(out)
    _save(fig, png, "png")
    _save(fig, svg, "svg")
    return [png, svg]


def run_plot(options: PlotOptions) -> int:
    """`cpt plot`: the figure of a set of runs."""
    runs = load_runs(options.runs, options.source)
    known = list(dict.fromkeys(name for run in runs for name in run.evals if "/" not in name))
    sets = [s.strip() for s in options.sets.split(",") if s.strip()] if options.sets else known
    unknown = [s for s in sets if s not in known and s.split("/", 1)[0] not in known]
    if unknown or not sets:
        raise UserError(f"--sets: {', '.join(unknown) or 'nothing'} not evaluated in these runs; "
                        f"known sets: {', '.join(known) or 'none (no eval records, no scores)'}")
    if options.by_domain:
        panels = [f"{name}/{d}" for name in sets for d in domains_of(runs, name)]
        if not panels:
            raise UserError(f"--by-domain: none of {', '.join(sets)} was scored by domain in these runs "
                            "(eval.by_domain: true, or cpt eval --by-domain)")
        sets = panels
    tasks = plot_panels(runs, options.tasks)
    for path in plot_runs(runs, sets, options.out, options.title, options.log_x, tasks):
        print(f"wrote {path}")
    return EXIT_OK
