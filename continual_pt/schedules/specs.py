"""One `ScheduleSpec` per learning-rate schedule, gathered in `SCHEDULES`.

Building, validation (checks.py) and the views (inspection.py) read only the spec: adding a
schedule means writing its lr function (functions.py) and one spec below.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from continual_pt.schedules.functions import (
    LRFunction,
    constant_lr,
    cosine_lr,
    infinite_lr,
    inverse_sqrt_lr,
    linear_lr,
    wsd_lr,
)
from continual_pt.schedules.lengths import Length, ProblemSink, resolve_length
from continual_pt.schedules.settings import ScheduleConfig

# Fields every schedule reads (the warmup); each spec lists the others it reads.
COMMON_PARAMS = ("max_lr", "warmup", "warmup_start_lr")
DEFAULT_MIN_LR_RATIO = 0.1
DEFAULT_INV_SQRT_ALPHA = 10.0

Keywords = dict[str, Any]
# Checked lengths in steps by field name; None where unset or invalid.
Steps = dict[str, int | None]
Marks = list[tuple[int, str]]


def _no_phases(kw: Keywords, total_steps: int) -> Marks:
    return []


def _no_conflicts(cfg: ScheduleConfig, p: ProblemSink) -> None:
    return None


def _no_floor(cfg: ScheduleConfig) -> str | None:
    return None


def _no_phase_checks(cfg: ScheduleConfig, p: ProblemSink, total_steps: int, steps: Steps) -> None:
    return None


@dataclass(frozen=True)
class ScheduleSpec:
    """Everything the package knows about one schedule; only `lr` and `resolve` are required."""

    name: str
    lr: Callable[..., float]
    """The pure function of the step, called with the keywords of `keywords()`."""
    resolve: Callable[[ScheduleConfig, int], Keywords]
    """(config with this spec's defaults applied, total steps) -> the keywords `lr` takes besides
    the warmup's (max_lr, warmup_steps, warmup_start_lr)."""
    params: tuple[str, ...] = ()
    """ScheduleConfig fields read besides COMMON_PARAMS; setting any other field is an error."""
    cooldown_shapes: tuple[str, ...] = ()
    """Accepted values of cooldown_shape (empty: the schedule has no cooldown shape)."""
    default_shape: str | None = None
    default_cooldown: Length | None = None
    phases: Callable[[Keywords, int], Marks] = _no_phases
    """Phase boundaries besides start, warmup end and end, from the resolved keywords."""
    conflicts: Callable[[ScheduleConfig, ProblemSink], None] = _no_conflicts
    """Records settings that are valid alone but contradict each other."""
    floor_needed_by: Callable[[ScheduleConfig], str | None] = _no_floor
    """What in this config needs min_lr > 0 (it would drop to 0 at once), or None."""
    check_phases: Callable[[ScheduleConfig, ProblemSink, int, Steps], None] = _no_phase_checks
    """Records phases out of order or beyond the run (steps: checked lengths, cooldown defaulted)."""

    def __post_init__(self) -> None:
        fields = set(ScheduleConfig.__dataclass_fields__) - {"name", *COMMON_PARAMS}
        if not set(self.params) <= fields:
            raise ValueError(f"{self.name}: params {sorted(set(self.params) - fields)} are not ScheduleConfig "
                             f"fields of their own (common: {', '.join(COMMON_PARAMS)})")
        if bool(self.cooldown_shapes) != ("cooldown_shape" in self.params):
            raise ValueError(f"{self.name}: cooldown_shapes go with the cooldown_shape param")
        if self.default_cooldown is not None and "cooldown" not in self.params:
            raise ValueError(f"{self.name}: default_cooldown goes with the cooldown param")
        if self.cooldown_shapes and self.default_shape not in self.cooldown_shapes:
            raise ValueError(f"{self.name}: default_shape {self.default_shape!r} is not in {self.cooldown_shapes}")

    @property
    def reads(self) -> tuple[str, ...]:
        """Every ScheduleConfig field this schedule reads."""
        return COMMON_PARAMS + self.params

    def with_defaults(self, cfg: ScheduleConfig) -> ScheduleConfig:
        """`cfg` with this schedule's default cooldown and cooldown shape filled in where unset."""
        return dataclasses.replace(
            cfg, cooldown_shape=cfg.cooldown_shape or self.default_shape,
            cooldown=cfg.cooldown if cfg.cooldown is not None else self.default_cooldown)

    def keywords(self, cfg: ScheduleConfig, total_steps: int) -> Keywords:
        """Every keyword value of `lr` for a checked config and a run of total_steps steps."""
        cfg = self.with_defaults(cfg)
        return {"max_lr": cfg.max_lr, "warmup_steps": resolve_length(cfg.warmup, total_steps),
                "warmup_start_lr": cfg.warmup_start_lr, **self.resolve(cfg, total_steps)}


def min_lr_of(cfg: ScheduleConfig, default_ratio: float | None = DEFAULT_MIN_LR_RATIO) -> float:
    """The absolute floor: min_lr, else min_lr_ratio x max_lr, else default_ratio x max_lr (None: 0)."""
    if cfg.min_lr is not None:
        return cfg.min_lr
    ratio = cfg.min_lr_ratio if cfg.min_lr_ratio is not None else default_ratio
    return 0.0 if ratio is None else ratio * cfg.max_lr


def const_lr_of(cfg: ScheduleConfig) -> float:
    """infinite: the LR of the constant phase (default halfway between min_lr and max_lr)."""
    return cfg.const_lr if cfg.const_lr is not None else (cfg.max_lr + min_lr_of(cfg)) / 2


# --------------------------------------------------------------------------- cosine, linear


def _resolve_decay(cfg: ScheduleConfig, total_steps: int) -> Keywords:
    return {"min_lr": min_lr_of(cfg), "decay_end_step": resolve_length(cfg.decay_end, total_steps,
                                                                        default=total_steps)}


def _decay_phases(kw: Keywords, total_steps: int) -> Marks:
    return [(kw["decay_end_step"], "decay end")]


def _check_decay_end(cfg: ScheduleConfig, p: ProblemSink, total_steps: int, steps: Steps) -> None:
    warmup, end = steps["warmup"], steps["decay_end"]
    if end is None:
        return
    if end > total_steps:
        p.add("schedule.decay_end", f"{cfg.decay_end!r} = step {end} is beyond the end of the run "
                                    f"({total_steps} steps)")
    elif warmup is not None and warmup > end:
        p.add("schedule.decay_end", f"{cfg.decay_end!r} = step {end} comes before the end of the warmup "
                                    f"(step {warmup})")


_DECAY = dict(resolve=_resolve_decay, params=("min_lr", "min_lr_ratio", "decay_end"), phases=_decay_phases,
              check_phases=_check_decay_end)
COSINE = ScheduleSpec(name="cosine", lr=cosine_lr, **_DECAY)
LINEAR = ScheduleSpec(name="linear", lr=linear_lr, **_DECAY)

# --------------------------------------------------------------------------- constant, inverse_sqrt

def _resolve_constant(cfg: ScheduleConfig, total_steps: int) -> Keywords:
    return {}


CONSTANT = ScheduleSpec(name="constant", lr=constant_lr, resolve=_resolve_constant)


def _resolve_inverse_sqrt(cfg: ScheduleConfig, total_steps: int) -> Keywords:
    # The floor applies only when min_lr or min_lr_ratio is given: the classic schedule has none.
    return {"min_lr": min_lr_of(cfg, None)}


INVERSE_SQRT = ScheduleSpec(name="inverse_sqrt", lr=inverse_sqrt_lr, resolve=_resolve_inverse_sqrt,
                            params=("min_lr", "min_lr_ratio"))

# --------------------------------------------------------------------------- wsd


def _resolve_wsd(cfg: ScheduleConfig, total_steps: int) -> Keywords:
    return {"min_lr": min_lr_of(cfg), "cooldown_steps": resolve_length(cfg.cooldown, total_steps),
            "end_step": total_steps, "shape": cfg.cooldown_shape}


def _wsd_phases(kw: Keywords, total_steps: int) -> Marks:
    return [(total_steps - kw["cooldown_steps"], "cooldown start")]


def _wsd_floor(cfg: ScheduleConfig) -> str | None:
    return "an exponential cooldown" if cfg.cooldown_shape == "exponential" else None


def _check_cooldown(cfg: ScheduleConfig, p: ProblemSink, total_steps: int, steps: Steps) -> None:
    warmup, cooldown = steps["warmup"], steps["cooldown"]
    if warmup is not None and cooldown is not None and warmup + cooldown > total_steps:
        p.add("schedule.cooldown", f"warmup ({warmup} steps) + cooldown ({cooldown} steps) is longer than "
                                   f"the run ({total_steps} steps)")


WSD = ScheduleSpec(
    name="wsd", lr=wsd_lr, resolve=_resolve_wsd, params=("min_lr", "min_lr_ratio", "cooldown", "cooldown_shape"),
    cooldown_shapes=("linear", "1-sqrt", "cosine", "exponential"), default_shape="1-sqrt", default_cooldown=0.2,
    phases=_wsd_phases, floor_needed_by=_wsd_floor, check_phases=_check_cooldown)

# --------------------------------------------------------------------------- infinite


def _resolve_infinite(cfg: ScheduleConfig, total_steps: int) -> Keywords:
    return {"min_lr": min_lr_of(cfg), "const_lr": const_lr_of(cfg),
            "cooldown_steps": resolve_length(cfg.cooldown, total_steps), "shape": cfg.cooldown_shape,
            "alpha": cfg.inv_sqrt_alpha if cfg.inv_sqrt_alpha is not None else DEFAULT_INV_SQRT_ALPHA,
            "anneal_start_step": None if cfg.anneal_start is None else resolve_length(cfg.anneal_start, total_steps),
            "anneal_end_step": resolve_length(cfg.anneal_end, total_steps, default=total_steps)}


def _infinite_phases(kw: Keywords, total_steps: int) -> Marks:
    marks = [(kw["warmup_steps"] + kw["cooldown_steps"], "cooldown end")]
    if kw["anneal_start_step"] is not None:
        marks += [(kw["anneal_start_step"], "anneal start"), (kw["anneal_end_step"], "anneal end")]
    return marks


def _infinite_conflicts(cfg: ScheduleConfig, p: ProblemSink) -> None:
    if cfg.inv_sqrt_alpha is not None and cfg.cooldown_shape != "inverse_sqrt":
        p.add("schedule.inv_sqrt_alpha", "only used with schedule.cooldown_shape=inverse_sqrt; remove it")
    if cfg.anneal_end is not None and cfg.anneal_start is None:
        p.add("schedule.anneal_end", "set without schedule.anneal_start (the annealing never starts)")


def _infinite_floor(cfg: ScheduleConfig) -> str | None:
    return "the exponential annealing" if cfg.anneal_start is not None else None


def _check_infinite_phases(cfg: ScheduleConfig, p: ProblemSink, total_steps: int, steps: Steps) -> None:
    _check_cooldown(cfg, p, total_steps, steps)
    warmup, cooldown, start = steps["warmup"], steps["cooldown"], steps["anneal_start"]
    end = steps["anneal_end"] if cfg.anneal_end is not None else total_steps
    if warmup is None or cooldown is None or start is None or end is None:
        return
    if end > total_steps:
        p.add("schedule.anneal_end", f"{cfg.anneal_end!r} = step {end} is beyond the end of the run "
                                     f"({total_steps} steps)")
    if start < warmup + cooldown:
        p.add("schedule.anneal_start", f"{cfg.anneal_start!r} = step {start} comes before the end of the "
                                       f"cooldown (step {warmup + cooldown} = warmup + cooldown)")
    if start >= end:
        key = "schedule.anneal_end" if cfg.anneal_end is not None else "schedule.anneal_start"
        where = f"schedule.anneal_end = step {end}" if cfg.anneal_end is not None else f"the end of the run ({end})"
        p.add(key, f"the annealing must start (step {start}) before it ends ({where})")


INFINITE = ScheduleSpec(
    name="infinite", lr=infinite_lr, resolve=_resolve_infinite,
    params=("min_lr", "min_lr_ratio", "cooldown", "cooldown_shape", "const_lr", "anneal_start", "anneal_end",
            "inv_sqrt_alpha"),
    cooldown_shapes=("cosine", "inverse_sqrt"), default_shape="cosine", default_cooldown=0.6,
    phases=_infinite_phases, conflicts=_infinite_conflicts, floor_needed_by=_infinite_floor,
    check_phases=_check_infinite_phases)

# --------------------------------------------------------------------------- the registry

SCHEDULES: dict[str, ScheduleSpec] = {spec.name: spec for spec in (COSINE, CONSTANT, LINEAR, INVERSE_SQRT, WSD,
                                                                    INFINITE)}


def build(cfg: ScheduleConfig, total_steps: int) -> LRFunction:
    """`lr_at(step) -> float` for a checked config and a run of total_steps optimizer steps."""
    spec = SCHEDULES[cfg.name]
    return functools.partial(spec.lr, **spec.keywords(cfg, total_steps))


def boundaries(cfg: ScheduleConfig, total_steps: int) -> list[tuple[int, str]]:
    """Steps where the schedule changes phase, from 0 to total_steps, each with its name(s)."""
    spec = SCHEDULES[cfg.name]
    kw = spec.keywords(cfg, total_steps)
    marks = [(0, "start"), (kw["warmup_steps"], "warmup end"), *spec.phases(kw, total_steps), (total_steps, "end")]
    names: dict[int, list[str]] = {}
    for step, name in marks:
        if name != "warmup end" or step > 0:
            names.setdefault(step, []).append(name)
    return [(step, ", ".join(names[step])) for step in sorted(names)]
