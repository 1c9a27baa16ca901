"""Validation of a `ScheduleConfig` against its `ScheduleSpec`: every problem is recorded, none raised."""

from __future__ import annotations

import difflib
import math

from continual_pt.schedules.lengths import ProblemSink, check_length, resolve_length
from continual_pt.schedules.settings import ScheduleConfig
from continual_pt.schedules.specs import SCHEDULES, ScheduleSpec, Steps, min_lr_of

LENGTHS = ("warmup", "decay_end", "cooldown", "anneal_start", "anneal_end")


def check_config(cfg: ScheduleConfig, p: ProblemSink, total_steps: int) -> None:
    """Record in `p` every problem of `cfg` for a run of total_steps steps (keys `schedule.<field>`).

    Never raises: `ScheduleConfig.check` gathers these with the other sections' problems.
    """
    spec = SCHEDULES.get(cfg.name) if isinstance(cfg.name, str) else None
    if spec is None:
        _suggest(p, "schedule.name", f"unknown schedule {cfg.name!r}", cfg.name, list(SCHEDULES))
    lrs_ok = _check_lrs(cfg, p, spec is not None)
    steps: Steps = {name: check_length(p, f"schedule.{name}", getattr(cfg, name), total_steps) for name in LENGTHS}
    if steps["warmup"] is not None and steps["warmup"] > total_steps:
        p.add("schedule.warmup", f"{cfg.warmup!r} = {steps['warmup']} steps is longer than the run "
                                 f"({total_steps} steps)")
    if cfg.warmup_start_lr != 0 and steps["warmup"] == 0:
        p.add("schedule.warmup_start_lr", "has no effect without a warmup (schedule.warmup is 0)")
    if spec is None:
        return
    _check_unused(spec, cfg, p)
    spec.conflicts(cfg, p)
    if spec.cooldown_shapes and cfg.cooldown_shape is not None and cfg.cooldown_shape not in spec.cooldown_shapes:
        _suggest(p, "schedule.cooldown_shape", f"unknown shape {cfg.cooldown_shape!r} for {spec.name}",
                 cfg.cooldown_shape, list(spec.cooldown_shapes))
    what = spec.floor_needed_by(cfg)
    if lrs_ok and what is not None and min_lr_of(cfg) == 0:
        key = "schedule.min_lr_ratio" if cfg.min_lr is None else "schedule.min_lr"
        p.add(key, f"{what} needs min_lr > 0 (it would drop to 0 at once)")
    if cfg.cooldown is None and spec.default_cooldown is not None:
        steps["cooldown"] = resolve_length(spec.default_cooldown, total_steps)
    spec.check_phases(cfg, p, total_steps, steps)


def _suggest(p: ProblemSink, key: str, problem: str, given: object, accepted: list[str]) -> None:
    """Record `problem` with the closest accepted value as a hint, and every accepted one."""
    close = difflib.get_close_matches(str(given), accepted, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}? " if close else ""
    p.add(key, f"{problem}; {hint}accepted: {', '.join(accepted)}")


def _check_lrs(cfg: ScheduleConfig, p: ProblemSink, known: bool) -> bool:
    """Problems of the LR values; True when they are consistent enough to derive min_lr from."""
    if not cfg.max_lr > 0 or math.isinf(cfg.max_lr):
        p.add("schedule.max_lr", f"must be a positive number, got {cfg.max_lr!r}")
        return False
    ok = True
    if not 0 <= cfg.warmup_start_lr <= cfg.max_lr:
        p.add("schedule.warmup_start_lr", f"must lie in [0, max_lr={cfg.max_lr:g}], got {cfg.warmup_start_lr!r}")
    if cfg.min_lr is not None and cfg.min_lr_ratio is not None:
        p.add("schedule.min_lr_ratio", "given together with schedule.min_lr; give one of them")
        ok = False
    if cfg.min_lr is not None and not 0 <= cfg.min_lr <= cfg.max_lr:
        p.add("schedule.min_lr", f"must lie in [0, max_lr={cfg.max_lr:g}], got {cfg.min_lr!r}")
        ok = False
    if cfg.min_lr_ratio is not None and not 0 <= cfg.min_lr_ratio <= 1:
        p.add("schedule.min_lr_ratio", f"must lie in [0, 1], got {cfg.min_lr_ratio!r}")
        ok = False
    if known and ok and cfg.const_lr is not None and not min_lr_of(cfg) <= cfg.const_lr <= cfg.max_lr:
        p.add("schedule.const_lr", f"must lie in [min_lr={min_lr_of(cfg):g}, max_lr={cfg.max_lr:g}], "
                                   f"got {cfg.const_lr!r}")
    if cfg.inv_sqrt_alpha is not None and not cfg.inv_sqrt_alpha > 0:
        p.add("schedule.inv_sqrt_alpha", f"must be > 0, got {cfg.inv_sqrt_alpha!r}")
    return ok


def _check_unused(spec: ScheduleSpec, cfg: ScheduleConfig, p: ProblemSink) -> None:
    used = spec.reads
    for name in ScheduleConfig.__dataclass_fields__:
        if name != "name" and name not in used and getattr(cfg, name) is not None:
            p.add(f"schedule.{name}", f"not used by the {spec.name} schedule, which reads "
                                      f"{', '.join(used)}; remove it")
