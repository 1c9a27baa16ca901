"""`cpt schedule show` and `cpt schedule plot`: learning-rate schedules as a table or a figure, from run
configs or inline specs, before anything is trained."""

from __future__ import annotations

from pathlib import Path

from continual_pt.config import ScheduleConfig, load, load_schedule_spec
from continual_pt.errors import UserError
from continual_pt.layout import EXIT_OK
from continual_pt.results.options import ScheduleOptions, SchedulePlotOptions, ScheduleShowOptions
from continual_pt.results.plots import plot_schedules
from continual_pt.schedules import curve, lr_table


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


def show(options: ScheduleShowOptions) -> int:
    """`cpt schedule show`: a table of the LR of every schedule at chosen steps."""
    schedules = collect(options)
    for line in lr_table(schedules, _parse_steps(options.at) if options.at else None):
        print(line)
    return EXIT_OK


def plot(options: SchedulePlotOptions) -> int:
    """`cpt schedule plot`: LR vs optimizer step of every schedule into one PNG."""
    schedules = collect(options)
    curves = {}
    for label, cfg, total in schedules:
        while label in curves:
            label += "'"
        curves[label] = curve(cfg, total)
    out = plot_schedules(curves, options.out, options.title)
    print(f"wrote {out}")
    return EXIT_OK
