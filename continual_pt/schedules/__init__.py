"""Learning-rate schedules: pure functions of the optimizer step, resolved from a `ScheduleConfig`.

`build(cfg, total_steps)` resolves a `ScheduleConfig` once and returns `lr_at(step) -> float`,
where `step` counts the optimizer steps already taken (0-based): `lr_at(k)` is the LR used by
optimizer step k. `ScheduleLR` (in `scheduler.py`, the one module here that needs torch) sets
it on an optimizer and checkpoints only the step, so a new phase's config always wins over
whatever schedule a checkpoint was trained with.

Each schedule is one `ScheduleSpec` in `SCHEDULES` (specs.py) around a pure function of
functions.py; checks.py validates a config against its spec, inspection.py tabulates and samples it.

    cpt schedule show --spec 'name=infinite anneal_start=85%' --steps 1000
    cpt schedule plot --config run.yaml --spec 'name=constant max_lr=3e-5 warmup=0' --out lr.png
"""

from __future__ import annotations

from continual_pt.schedules.checks import check_config
from continual_pt.schedules.functions import (
    LRFunction,
    constant_lr,
    cosine_lr,
    infinite_lr,
    inverse_sqrt_lr,
    linear_lr,
    warmup_lr,
    wsd_lr,
)
from continual_pt.schedules.inspection import curve, lr_table, show_steps
from continual_pt.schedules.lengths import Length, resolve_length
from continual_pt.schedules.settings import ScheduleConfig
from continual_pt.schedules.specs import SCHEDULES, ScheduleSpec, boundaries, build

__all__ = ["SCHEDULES", "LRFunction", "Length", "ScheduleConfig", "ScheduleSpec", "boundaries", "build",
           "check_config", "constant_lr", "cosine_lr", "curve", "infinite_lr", "inverse_sqrt_lr", "linear_lr",
           "lr_table", "resolve_length", "show_steps", "warmup_lr", "wsd_lr"]
