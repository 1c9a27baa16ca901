"""Figures, drawn with matplotlib's Agg canvas (no display, no pyplot global state)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def plot_schedules(curves: dict[str, tuple[Sequence[int], Sequence[float]]], out_path: str | Path,
                   title: str | None = None) -> Path:
    """Draw one labelled line of learning rate vs optimizer step per schedule into a PNG."""
    from matplotlib.figure import Figure

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
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=120)
    tmp.replace(out_path)
    return out_path
