"""`ScheduleLR`: the torch scheduler that applies a pure `lr_at(step)` to an optimizer.

The only module of `schedules` that imports torch: config validation and `cpt schedule`
need the pure functions alone.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from continual_pt.schedules import LRFunction, ScheduleConfig, build


class ScheduleLR(LRScheduler):
    """Sets every param group's LR to `lr_at(step)`; its state is the step alone.

    The LR is also set again right before each optimizer step (a step pre-hook): loading
    optimizer state (DeepSpeed's ZeRO checkpoints do it after the scheduler's) restores the
    param groups' LR of the old schedule, and the config of the current run must win.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, lr_at: LRFunction) -> None:
        self.lr_at = lr_at
        super().__init__(optimizer)
        self._hook = optimizer.register_step_pre_hook(lambda *_: self.apply())

    def get_lr(self) -> list[float]:
        return [self.lr_at(self.last_epoch)] * len(self.optimizer.param_groups)

    def apply(self) -> None:
        """Set every param group's LR to lr_at(step) now (done before each optimizer step anyway)."""
        lrs = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        self._last_lr = lrs

    def state_dict(self) -> dict[str, int]:
        """Only the number of optimizer steps taken: never the schedule's parameters."""
        return {"step": self.last_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the step; the LR comes from this scheduler's own `lr_at`."""
        step = state_dict.get("step") if isinstance(state_dict, dict) else None
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"not a ScheduleLR state (expected {{'step': n >= 0}}): {state_dict!r:.200}")
        self.last_epoch = step
        self.apply()

    def __repr__(self) -> str:
        return f"ScheduleLR(step={self.last_epoch}, lr={self.lr_at(self.last_epoch):g})"


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_steps: int) -> ScheduleLR:
    """A `ScheduleLR` applying `build(cfg, total_steps)` to `optimizer`, at step 0."""
    return ScheduleLR(optimizer, build(cfg, total_steps))
