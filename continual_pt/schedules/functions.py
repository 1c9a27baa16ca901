"""Learning-rate schedules as pure functions of the optimizer step.

Each takes the step (0-based count of optimizer steps already taken) and keyword values that a
`ScheduleSpec` resolves once from a config (see specs.py); none reads a config itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

# `lr_at(step) -> float`: what `build` returns and `ScheduleLR` applies.
LRFunction = Callable[[int], float]


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
