"""Learning-rate schedules: pure functions of the optimizer step, resolved from a `ScheduleConfig`.

`build(cfg, total_steps)` resolves a `ScheduleConfig` once and returns `lr_at(step) -> float`,
where `step` counts the optimizer steps already taken (0-based): `lr_at(k)` is the LR used by
optimizer step k. `ScheduleLR` (in `scheduler.py`, the one module here that needs torch) sets
it on an optimizer and checkpoints only the step, so a new phase's config always wins over
whatever schedule a checkpoint was trained with.

    cpt schedule show --spec 'name=infinite anneal_start=85%' --steps 1000
    cpt schedule plot --config run.yaml --spec 'name=constant max_lr=3e-5 warmup=0' --out lr.png
"""

from __future__ import annotations

import difflib
import functools
import math
from collections.abc import Callable
from typing import Any

from continual_pt.schedules.lengths import Length, ProblemSink, check_length, resolve_length
from continual_pt.schedules.settings import ScheduleConfig

__all__ = ["Length", "ScheduleConfig", "boundaries", "build", "check_config", "curve", "resolve_length",
           "show_steps"]

LRFunction = Callable[[int], float]

# Fields every schedule reads; the others are listed per schedule in PARAMS.
COMMON_PARAMS = ("max_lr", "warmup", "warmup_start_lr")
PARAMS: dict[str, tuple[str, ...]] = {
    "cosine": ("min_lr", "min_lr_ratio", "decay_end"),
    "constant": (),
    "linear": ("min_lr", "min_lr_ratio", "decay_end"),
    "inverse_sqrt": ("min_lr", "min_lr_ratio"),
    "wsd": ("min_lr", "min_lr_ratio", "cooldown", "cooldown_shape"),
    "infinite": ("min_lr", "min_lr_ratio", "cooldown", "cooldown_shape", "const_lr",
                 "anneal_start", "anneal_end", "inv_sqrt_alpha"),
}
COOLDOWN_SHAPES = {"wsd": ("linear", "1-sqrt", "cosine", "exponential"), "infinite": ("cosine", "inverse_sqrt")}
DEFAULT_SHAPE = {"wsd": "1-sqrt", "infinite": "cosine"}
DEFAULT_COOLDOWN = {"wsd": 0.2, "infinite": 0.6}
DEFAULT_MIN_LR_RATIO = 0.1
DEFAULT_INV_SQRT_ALPHA = 10.0


# --------------------------------------------------------------------------- pure functions


def warmup_lr(step: int, *, warmup_steps: int, warmup_start_lr: float, max_lr: float) -> float:
    """Linear ramp from warmup_start_lr at step 0 towards max_lr, reached at step warmup_steps."""
    return warmup_start_lr + (max_lr - warmup_start_lr) * step / warmup_steps


def constant_lr(step: int, *, max_lr: float, warmup_steps: int, warmup_start_lr: float) -> float:
    """Warmup, then max_lr for ever."""
    if step < warmup_steps:
        return warmup_lr(step, warmup_steps=warmup_steps, warmup_start_lr=warmup_start_lr, max_lr=max_lr)
    return max_lr


def _decay_lr(step: int, shape: Callable[[float], float], *, max_lr: float, min_lr: float, warmup_steps: int,
              warmup_start_lr: float, decay_end_step: int) -> float:
    """Warmup, then min_lr + (max_lr - min_lr) * shape(u) for u from 0 to 1 at decay_end_step, then min_lr."""
    if step < warmup_steps:
        return warmup_lr(step, warmup_steps=warmup_steps, warmup_start_lr=warmup_start_lr, max_lr=max_lr)
    if step >= decay_end_step:
        return min_lr
    u = (step - warmup_steps) / (decay_end_step - warmup_steps)
    return min_lr + (max_lr - min_lr) * shape(u)


def cosine_lr(step: int, **kwargs: Any) -> float:
    """Warmup, half a cosine from max_lr down to min_lr at decay_end_step, then min_lr."""
    return _decay_lr(step, lambda u: (1 + math.cos(math.pi * u)) / 2, **kwargs)


def linear_lr(step: int, **kwargs: Any) -> float:
    """Warmup, a straight line from max_lr down to min_lr at decay_end_step, then min_lr."""
    return _decay_lr(step, lambda u: 1 - u, **kwargs)


def inverse_sqrt_lr(step: int, *, max_lr: float, min_lr: float, warmup_steps: int,
                    warmup_start_lr: float) -> float:
    """Warmup, then max_lr * sqrt(warmup_steps / step), never below min_lr (0: no floor)."""
    if step < warmup_steps:
        return warmup_lr(step, warmup_steps=warmup_steps, warmup_start_lr=warmup_start_lr, max_lr=max_lr)
    ref = max(warmup_steps, 1)
    return max(min_lr, max_lr * math.sqrt(ref / max(step, ref)))


def wsd_lr(step: int, *, max_lr: float, min_lr: float, warmup_steps: int, warmup_start_lr: float,
           cooldown_steps: int, end_step: int, shape: str) -> float:
    """Warmup-stable-decay: max_lr until the last cooldown_steps before end_step, then `shape` to min_lr."""
    if step < warmup_steps:
        return warmup_lr(step, warmup_steps=warmup_steps, warmup_start_lr=warmup_start_lr, max_lr=max_lr)
    cooldown_start = end_step - cooldown_steps
    if step < cooldown_start:
        return max_lr
    if step >= end_step:
        return min_lr
    s = (step - cooldown_start) / cooldown_steps
    if shape == "exponential":
        return max_lr * (min_lr / max_lr) ** s
    factor = {"linear": 1 - s, "1-sqrt": 1 - math.sqrt(s), "cosine": (1 + math.cos(math.pi * s)) / 2}[shape]
    return min_lr + (max_lr - min_lr) * factor


def infinite_lr(step: int, *, max_lr: float, min_lr: float, const_lr: float, warmup_steps: int,
                warmup_start_lr: float, cooldown_steps: int, shape: str, alpha: float,
                anneal_start_step: int | None, anneal_end_step: int) -> float:
    """Ibrahim et al. (2024): warmup, cooldown to const_lr, constant, optional exponential annealing."""
    if step < warmup_steps:
        return warmup_lr(step, warmup_steps=warmup_steps, warmup_start_lr=warmup_start_lr, max_lr=max_lr)
    if step < warmup_steps + cooldown_steps:
        u = (step - warmup_steps) / cooldown_steps
        if shape == "cosine":
            return const_lr + (max_lr - const_lr) / 2 * (1 + math.cos(math.pi * u))

        def h(x: float) -> float:
            return 1 / math.sqrt(1 + alpha * x) - 1

        return max_lr + (const_lr - max_lr) * h(u) / h(1)
    if anneal_start_step is None or step < anneal_start_step:
        return const_lr
    if step >= anneal_end_step:
        return min_lr
    exponent = (step - anneal_start_step) / (anneal_end_step - anneal_start_step)
    return max(min_lr, const_lr * (min_lr / const_lr) ** exponent)


# --------------------------------------------------------------------------- from a config


def min_lr_of(cfg: ScheduleConfig, default_ratio: float | None = DEFAULT_MIN_LR_RATIO) -> float:
    """The absolute floor: min_lr, else min_lr_ratio x max_lr, else default_ratio x max_lr (None: 0)."""
    if cfg.min_lr is not None:
        return cfg.min_lr
    ratio = cfg.min_lr_ratio if cfg.min_lr_ratio is not None else default_ratio
    return 0.0 if ratio is None else ratio * cfg.max_lr


def const_lr_of(cfg: ScheduleConfig) -> float:
    """infinite: the LR of the constant phase (default halfway between min_lr and max_lr)."""
    return cfg.const_lr if cfg.const_lr is not None else (cfg.max_lr + min_lr_of(cfg)) / 2


def _common(cfg: ScheduleConfig, total_steps: int) -> dict[str, Any]:
    return {"max_lr": cfg.max_lr, "warmup_steps": resolve_length(cfg.warmup, total_steps),
            "warmup_start_lr": cfg.warmup_start_lr}


def _build_decay(fn: Callable[..., float], cfg: ScheduleConfig, total_steps: int) -> functools.partial:
    return functools.partial(fn, **_common(cfg, total_steps), min_lr=min_lr_of(cfg),
                             decay_end_step=resolve_length(cfg.decay_end, total_steps, default=total_steps))


def _build_constant(cfg: ScheduleConfig, total_steps: int) -> functools.partial:
    return functools.partial(constant_lr, **_common(cfg, total_steps))


def _build_inverse_sqrt(cfg: ScheduleConfig, total_steps: int) -> functools.partial:
    # The floor applies only when min_lr or min_lr_ratio is given: the classic schedule has none.
    return functools.partial(inverse_sqrt_lr, **_common(cfg, total_steps), min_lr=min_lr_of(cfg, None))


def _cooldown_steps(cfg: ScheduleConfig, total_steps: int) -> int:
    default = resolve_length(DEFAULT_COOLDOWN[cfg.name], total_steps)
    return resolve_length(cfg.cooldown, total_steps, default=default)


def _build_wsd(cfg: ScheduleConfig, total_steps: int) -> functools.partial:
    return functools.partial(wsd_lr, **_common(cfg, total_steps), min_lr=min_lr_of(cfg),
                             cooldown_steps=_cooldown_steps(cfg, total_steps), end_step=total_steps,
                             shape=cfg.cooldown_shape or DEFAULT_SHAPE["wsd"])


def _build_infinite(cfg: ScheduleConfig, total_steps: int) -> functools.partial:
    anneal_start = None if cfg.anneal_start is None else resolve_length(cfg.anneal_start, total_steps)
    return functools.partial(
        infinite_lr, **_common(cfg, total_steps), min_lr=min_lr_of(cfg), const_lr=const_lr_of(cfg),
        cooldown_steps=_cooldown_steps(cfg, total_steps), shape=cfg.cooldown_shape or DEFAULT_SHAPE["infinite"],
        alpha=cfg.inv_sqrt_alpha if cfg.inv_sqrt_alpha is not None else DEFAULT_INV_SQRT_ALPHA,
        anneal_start_step=anneal_start,
        anneal_end_step=resolve_length(cfg.anneal_end, total_steps, default=total_steps))


BUILDERS: dict[str, Callable[[ScheduleConfig, int], functools.partial]] = {
    "cosine": functools.partial(_build_decay, cosine_lr),
    "constant": _build_constant,
    "linear": functools.partial(_build_decay, linear_lr),
    "inverse_sqrt": _build_inverse_sqrt,
    "wsd": _build_wsd,
    "infinite": _build_infinite,
}


def build(cfg: ScheduleConfig, total_steps: int) -> functools.partial:
    """`lr_at(step) -> float` for a checked config and a run of total_steps optimizer steps."""
    return BUILDERS[cfg.name](cfg, total_steps)


def boundaries(cfg: ScheduleConfig, total_steps: int) -> list[tuple[int, str]]:
    """Steps where the schedule changes phase, from 0 to total_steps, each with its name(s)."""
    kw = build(cfg, total_steps).keywords
    marks: list[tuple[int, str]] = [(0, "start"), (kw["warmup_steps"], "warmup end")]
    if "decay_end_step" in kw:
        marks.append((kw["decay_end_step"], "decay end"))
    if cfg.name == "wsd":
        marks.append((total_steps - kw["cooldown_steps"], "cooldown start"))
    if cfg.name == "infinite":
        marks.append((kw["warmup_steps"] + kw["cooldown_steps"], "cooldown end"))
        if kw["anneal_start_step"] is not None:
            marks += [(kw["anneal_start_step"], "anneal start"), (kw["anneal_end_step"], "anneal end")]
    marks.append((total_steps, "end"))
    names: dict[int, list[str]] = {}
    for step, name in marks:
        if name != "warmup end" or step > 0:
            names.setdefault(step, []).append(name)
    return [(step, ", ".join(names[step])) for step in sorted(names)]


# --------------------------------------------------------------------------- validation


def check_config(cfg: ScheduleConfig, p: ProblemSink, total_steps: int) -> None:
    """Record in `p` every problem of `cfg` for a run of total_steps steps (keys `schedule.<field>`).

    Never raises: `ScheduleConfig.check` gathers these with the other sections' problems.
    """
    known = cfg.name in PARAMS
    if not known:
        close = difflib.get_close_matches(str(cfg.name), list(PARAMS), n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        p.add("schedule.name", f"unknown schedule {cfg.name!r}; {hint}accepted: {', '.join(PARAMS)}")
    lrs_ok = _check_lrs(cfg, p, known)
    steps = {name: check_length(p, f"schedule.{name}", getattr(cfg, name), total_steps)
             for name in ("warmup", "decay_end", "cooldown", "anneal_start", "anneal_end")}
    if steps["warmup"] is not None and steps["warmup"] > total_steps:
        p.add("schedule.warmup", f"{cfg.warmup!r} = {steps['warmup']} steps is longer than the run "
                                 f"({total_steps} steps)")
    if cfg.warmup_start_lr != 0 and steps["warmup"] == 0:
        p.add("schedule.warmup_start_lr", "has no effect without a warmup (schedule.warmup is 0)")
    if not known:
        return
    _check_unused(cfg, p)
    if cfg.name in COOLDOWN_SHAPES and cfg.cooldown_shape is not None \
            and cfg.cooldown_shape not in COOLDOWN_SHAPES[cfg.name]:
        accepted = COOLDOWN_SHAPES[cfg.name]
        close = difflib.get_close_matches(str(cfg.cooldown_shape), accepted, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        p.add("schedule.cooldown_shape", f"unknown shape {cfg.cooldown_shape!r} for {cfg.name}; "
                                         f"{hint}accepted: {', '.join(accepted)}")
    if lrs_ok and min_lr_of(cfg) == 0 and (
            (cfg.name == "wsd" and cfg.cooldown_shape == "exponential")
            or (cfg.name == "infinite" and cfg.anneal_start is not None)):
        key = "schedule.min_lr_ratio" if cfg.min_lr is None else "schedule.min_lr"
        what = "an exponential cooldown" if cfg.name == "wsd" else "the exponential annealing"
        p.add(key, f"{what} needs min_lr > 0 (it would drop to 0 at once)")
    _check_phases(cfg, p, total_steps, steps)


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


def _check_unused(cfg: ScheduleConfig, p: ProblemSink) -> None:
    used = COMMON_PARAMS + PARAMS[cfg.name]
    for name in ScheduleConfig.__dataclass_fields__:
        if name != "name" and name not in used and getattr(cfg, name) is not None:
            p.add(f"schedule.{name}", f"not used by the {cfg.name} schedule, which reads "
                                      f"{', '.join(used)}; remove it")
    if cfg.name == "infinite" and cfg.inv_sqrt_alpha is not None and cfg.cooldown_shape != "inverse_sqrt":
        p.add("schedule.inv_sqrt_alpha", "only used with schedule.cooldown_shape=inverse_sqrt; remove it")
    if cfg.name == "infinite" and cfg.anneal_end is not None and cfg.anneal_start is None:
        p.add("schedule.anneal_end", "set without schedule.anneal_start (the annealing never starts)")


def _check_phases(cfg: ScheduleConfig, p: ProblemSink, total_steps: int, steps: dict[str, int | None]) -> None:
    """Phase boundaries in order and inside the run (lengths that failed their own check are skipped)."""
    warmup = steps["warmup"]
    if cfg.name in ("cosine", "linear") and steps["decay_end"] is not None:
        if steps["decay_end"] > total_steps:
            p.add("schedule.decay_end", f"{cfg.decay_end!r} = step {steps['decay_end']} is beyond the end "
                                        f"of the run ({total_steps} steps)")
        elif warmup is not None and warmup > steps["decay_end"]:
            p.add("schedule.decay_end", f"{cfg.decay_end!r} = step {steps['decay_end']} comes before the "
                                        f"end of the warmup (step {warmup})")
    if cfg.name not in ("wsd", "infinite") or warmup is None:
        return
    cooldown = steps["cooldown"] if cfg.cooldown is not None else _cooldown_steps(cfg, total_steps)
    if cooldown is None:
        return
    if warmup + cooldown > total_steps:
        p.add("schedule.cooldown", f"warmup ({warmup} steps) + cooldown ({cooldown} steps) is longer than "
                                   f"the run ({total_steps} steps)")
    if cfg.name != "infinite" or cfg.anneal_start is None or steps["anneal_start"] is None:
        return
    start = steps["anneal_start"]
    end = steps["anneal_end"] if cfg.anneal_end is not None else total_steps
    if end is None:
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


# --------------------------------------------------------------------------- inspection


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
