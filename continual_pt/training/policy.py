"""The loop's decisions: when to log, evaluate, save and stop, from the config and the run's state.

Nothing here touches the engine, so every cadence can be checked without one; `Trainer.train()`
asks these questions at each step boundary and does what they answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from continual_pt.config import RunConfig, TrainConfig, parse_duration
from continual_pt.runtime import distributed
from continual_pt.training.stop import describe


def due(step: int, every: int) -> bool:
    """Whether a cadence of `every` steps (0: never) falls on `step`."""
    return every > 0 and step % every == 0


@dataclass(frozen=True)
class Cadence:
    """When the loop logs, evaluates and saves, and after how many steps it stops on its own."""

    max_steps: int
    log_every: int
    has_eval_sets: bool
    eval_at_start: bool
    eval_every: int
    save_every: int
    stop_after_steps: int | None

    @classmethod
    def of(cls, cfg: RunConfig) -> Cadence:
        """The cadence a run config asks for."""
        return cls(max_steps=cfg.train.max_steps, log_every=cfg.train.log_every,
                   has_eval_sets=bool(cfg.eval.sets), eval_at_start=cfg.eval.at_start,
                   eval_every=cfg.eval.every_steps, save_every=cfg.checkpoint.every_steps,
                   stop_after_steps=cfg.train.stop_after_steps)

    def log_after(self, step: int) -> bool:
        """A metric line every log_every steps, and always after the last step."""
        return due(step, self.log_every) or step == self.max_steps

    def acts_after(self, step: int) -> bool:
        """Whether anything logs, evaluates or saves after `step` (the last step always does)."""
        return self.log_after(step) or self.eval_after(step) or self.save_after(step) or step == self.max_steps

    def eval_before_training(self, step: int, resumed: bool) -> bool:
        """The start point of forgetting curves: only for a phase that starts at step 0."""
        return self.has_eval_sets and self.eval_at_start and step == 0 and not resumed

    def eval_after(self, step: int) -> bool:
        return self.has_eval_sets and due(step, self.eval_every)

    def save_after(self, step: int) -> bool:
        return due(step, self.save_every)

    def final_eval(self, step: int) -> bool:
        """After the loop, unless the last step just evaluated (or no step was ever taken)."""
        return self.has_eval_sets and step > 0 and not due(step, self.eval_every)

    def final_save(self, step: int, last_saved_step: int) -> bool:
        """After the loop, unless this very step is already saved."""
        return last_saved_step != step

    def stop_reason(self, step: int, start_step: int, signum: int, out_of_time: bool) -> str | None:
        """Why to save and exit resumably after `step`, given the flags every rank agreed on."""
        if signum:
            return f"received {describe(signum)}"
        if out_of_time:
            return "time limit reached"
        limit = self.stop_after_steps
        if limit and step - start_step >= limit and step < self.max_steps:
            return f"train.stop_after_steps={limit} reached"
        return None


def agree_on_stop(signum: int, out_of_time: bool) -> tuple[int, bool]:
    """A stop signal or time limit seen on any rank, as every rank sees it (so all stop together)."""
    flags = distributed.all_reduce_max([float(signum), float(out_of_time)])
    return int(flags[0]), bool(flags[1])


class Deadline:
    """The time limit less its margin, and whether one more step as slow as the slowest would cross it."""

    def __init__(self, cfg: TrainConfig, started: float):
        limit = cfg.time_limit
        self.at = started + parse_duration(limit) - parse_duration(cfg.time_limit_margin) if limit else math.inf
        self.last_step_end = started
        self.slowest_step = 0.0

    def step_ended(self, now: float) -> bool:
        """Record a step that ended at `now` (its time includes any eval or save before it)."""
        self.slowest_step = max(self.slowest_step, now - self.last_step_end)
        self.last_step_end = now
        return now + self.slowest_step >= self.at
