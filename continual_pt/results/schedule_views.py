"""`cpt schedule show` and `cpt schedule plot`: learning-rate schedules as a table or a figure, from run
configs or inline specs, before anything is trained."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from continual_pt.config import ScheduleConfig, load, load_schedule_spec
from continual_pt.errors import UserError
from continual_pt.results.plots import plot_schedules
from continual_pt.schedules import boundaries, build, curve, show_steps


@dataclass
class ScheduleOptions:
    """Which schedules to show, over how many steps."""

    configs: list[str] = field(default_factory=list)
    """Run config YAMLs, one schedule each."""
    specs: list[str] = field(default_factory=list)
    """Inline schedules 'name=wsd max_lr=3e-4 cooldown=0.2' (keys of the schedule section)."""
    steps: int | None = None
    """Run length in optimizer steps (default: each config's train.max_steps; required with specs)."""
    labels: list[str] = field(default_factory=list)
    """Legend label per schedule, in order."""
    overrides: list[str] = field(default_factory=list)
    """Overrides applied to every config."""
    out: str = "schedule.png"
    """PNG to write (plot)."""
    title: str | None = None
    """Figure title (plot)."""
    at: str | None = None
    """Comma-separated steps (show; default: the boundaries of every phase and a few between)."""


def collect(options: ScheduleOptions) -> list[tuple[str, ScheduleConfig, int]]:
    """(label, schedule, total steps) of every --config and --spec, in that order."""
    if not options.configs and not options.specs:
        raise UserError("no schedule given: pass --config run.yaml and/or --spec 'name=cosine max_lr=3e-4'")
    if options.steps is not None and options.steps < 1:
        raise UserError(f"--steps must be >= 1, got {options.steps}")
    if options.overrides and not options.configs:
        raise UserError(f"overrides {' '.join(options.overrides)!r} apply to --config files only; "
                        "write schedule keys into the --spec text")
    if options.specs and options.steps is None:
        raise UserError("--spec needs --steps (the run length in optimizer steps)")
    found = []
    for path in options.configs:
        overrides = list(options.overrides) + ([f"train.max_steps={options.steps}"] if options.steps else [])
        cfg = load(path, overrides)
        found.append((Path(path).name, cfg.schedule, cfg.train.max_steps))
    for text in options.specs:
        found.append((text, load_schedule_spec(text, options.steps), options.steps))
    if len(options.labels) > len(found):
        raise UserError(f"{len(options.labels)} --label for {len(found)} schedule(s)")
    return [(options.labels[i] if i < len(options.labels) else label, cfg, total)
            for i, (label, cfg, total) in enumerate(found)]


def _parse_steps(text: str) -> list[int]:
    try:
        steps = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--at takes comma-separated step numbers, got {text!r}") from None
    if not steps or min(steps) < 0:
        raise UserError(f"--at takes comma-separated step numbers >= 0, got {text!r}")
    return steps


def show(options: ScheduleOptions) -> int:
    """`cpt schedule show`: a table of the LR of every schedule at chosen steps."""
    schedules = collect(options)
    fns = [build(cfg, total) for _, cfg, total in schedules]
    if options.at:
        steps = sorted(set(_parse_steps(options.at)))
    else:
        steps = sorted({s for _, cfg, total in schedules for s in show_steps(cfg, total)})
    notes: dict[int, dict[str, list[str]]] = {}  # step -> phase name -> numbers of the schedules
    for i, (_, cfg, total) in enumerate(schedules):
        for step, name in boundaries(cfg, total):
            notes.setdefault(step, {}).setdefault(name, []).append(str(i + 1))
    labels = [label if len(schedules) == 1 else f"[{i + 1}] {label}" for i, (label, _, _) in enumerate(schedules)]
    widths = [max(len(label), 12) for label in labels]
    step_width = max(len("step"), *(len(str(s)) for s in steps))
    print("  ".join([f"{'step':>{step_width}}"] + [f"{lb:<{w}}" for lb, w in zip(labels, widths, strict=True)]
                    + ["phase"]).rstrip())
    for step in steps:
        cells = [f"{fn(step):<{w}.6g}" for fn, w in zip(fns, widths, strict=True)]
        phases = [name if len(schedules) == 1 else f"{name} [{','.join(nums)}]"
                  for name, nums in notes.get(step, {}).items()]
        print("  ".join([f"{step:>{step_width}}"] + cells + ["; ".join(phases)]).rstrip())
    return 0


def plot(options: ScheduleOptions) -> int:
    """`cpt schedule plot`: LR vs optimizer step of every schedule into one PNG."""
    schedules = collect(options)
    curves = {}
    for label, cfg, total in schedules:
        while label in curves:
            label += "'"
        curves[label] = curve(cfg, total)
    out = plot_schedules(curves, options.out, options.title)
    print(f"wrote {out}")
    return 0
