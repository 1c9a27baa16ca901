"""Schedules made visible without training: sample curves, the steps worth showing and the LR table
that `cpt schedule show` prints."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from continual_pt.schedules.settings import ScheduleConfig
from continual_pt.schedules.specs import boundaries, build

# (label, schedule, total steps) of each schedule shown side by side.
Shown = tuple[str, ScheduleConfig, int]


def show_steps(cfg: ScheduleConfig, total_steps: int) -> list[int]:
    """Each phase boundary, the middle of each phase and the last step taken."""
    marks = [step for step, _ in boundaries(cfg, total_steps)]
    middles = [(a + b) // 2 for a, b in zip(marks, marks[1:], strict=False)]
    return sorted(set(marks + middles + [max(total_steps - 1, 0)]))


def curve(cfg: ScheduleConfig, total_steps: int, max_points: int = 5000) -> tuple[list[int], list[float]]:
    """(steps, lrs) from 0 to total_steps, at most ~max_points evenly spaced plus both sides of every corner."""
    fn = build(cfg, total_steps)
    stride = max(1, total_steps // max_points)
    corners = {c for step, _ in boundaries(cfg, total_steps) for c in (step - 1, step) if 0 <= c <= total_steps}
    steps = sorted(set(range(0, total_steps + 1, stride)) | corners)
    return steps, [fn(step) for step in steps]


def lr_table(schedules: Sequence[Shown], steps: Iterable[int] | None = None) -> list[str]:
    """Lines of a table of each schedule's LR at `steps` (default: every `show_steps`), naming the phases.

    With several schedules the columns are numbered and each phase name says whose it is.
    """
    fns = [build(cfg, total) for _, cfg, total in schedules]
    if steps is None:
        steps = {s for _, cfg, total in schedules for s in show_steps(cfg, total)}
    rows = sorted(set(steps))
    single = len(schedules) == 1
    notes: dict[int, dict[str, list[str]]] = {}  # step -> phase name -> numbers of the schedules
    for i, (_, cfg, total) in enumerate(schedules):
        for step, name in boundaries(cfg, total):
            notes.setdefault(step, {}).setdefault(name, []).append(str(i + 1))
    labels = [label if single else f"[{i + 1}] {label}" for i, (label, _, _) in enumerate(schedules)]
    widths = [max(len(label), 12) for label in labels]
    step_width = max(len("step"), *(len(str(s)) for s in rows))
    lines = ["  ".join([f"{'step':>{step_width}}"] + [f"{lb:<{w}}" for lb, w in zip(labels, widths, strict=True)]
                       + ["phase"]).rstrip()]
    for step in rows:
        cells = [f"{fn(step):<{w}.6g}" for fn, w in zip(fns, widths, strict=True)]
        phases = [name if single else f"{name} [{','.join(nums)}]" for name, nums in notes.get(step, {}).items()]
        lines.append("  ".join([f"{step:>{step_width}}"] + cells + ["; ".join(phases)]).rstrip())
    return lines
