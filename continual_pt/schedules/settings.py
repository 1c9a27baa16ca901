"""The `schedule` section of a run config: which schedule and its parameters (see specs.py)."""

from __future__ import annotations

from dataclasses import dataclass

from continual_pt.schedules.lengths import Length


@dataclass
class ScheduleConfig:
    """Learning-rate schedule, a pure function of the optimizer step (see specs.py).

    Lengths are steps (int), fractions of the run (float in [0, 1]) or "N%".
    Parameters that a schedule does not use must stay unset.
    """

    name: str = "cosine"
    """A key of `SCHEDULES`: cosine, constant, linear, inverse_sqrt, wsd or infinite."""
    max_lr: float = 3e-4
    min_lr: float | None = None
    """Floor of the decay, absolute. Give this or min_lr_ratio."""
    min_lr_ratio: float | None = None
    """Floor of the decay as a fraction of max_lr (default 0.1 when min_lr is unset)."""
    warmup: Length = 0.01
    """Linear warmup length."""
    warmup_start_lr: float = 0.0
    """LR at step 0, the start of the warmup."""
    decay_end: Length | None = None
    """cosine, linear: step at which the decay reaches min_lr, counted from step 0; the LR
    stays at min_lr after it (default: the end of the run)."""
    cooldown: Length | None = None
    """wsd: length of the final cooldown (default 20%). infinite: length of the cooldown that
    follows the warmup (default 60%)."""
    cooldown_shape: str | None = None
    """wsd: linear, 1-sqrt, cosine, exponential (default 1-sqrt).
    infinite: cosine, inverse_sqrt (default cosine)."""
    const_lr: float | None = None
    """infinite: LR of the constant phase (default (max_lr + min_lr) / 2)."""
    anneal_start: Length | None = None
    """infinite: step at which the exponential annealing to min_lr begins (default: never)."""
    anneal_end: Length | None = None
    """infinite: step at which the annealing reaches min_lr (default: the end of the run)."""
    inv_sqrt_alpha: float | None = None
    """infinite inverse_sqrt cooldown: the constant a of h(x) = 1/sqrt(1 + a x) - 1 (default 10)."""
