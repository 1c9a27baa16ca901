"""The step loop: forward/backward/step on the DeepSpeed engine, evaluation, logging, checkpoints, signals.

`Trainer.train()` reads as the story of a run; set-up lives in `engine.py` (model, optimizer,
schedule, DeepSpeed) and `checkpoint.py` (how the run starts and saves).
"""

from __future__ import annotations

import math
import signal
import time
from typing import Any

import torch

from continual_pt.components import distributed
from continual_pt.components.checkpoint import Checkpointer, rng_state
from continual_pt.config import RunConfig, parse_duration
from continual_pt.config.load import ConfigSource
from continual_pt.training.session import Session, open_session

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_RESUMABLE = 75  # stopped early (signal or time limit) with a committed checkpoint: run again to resume
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class NonFiniteLoss(RuntimeError):
    """The loss stayed non-finite beyond train.max_nonfinite_skips."""


class StopRequest:
    """Remembers a stop signal; the loop acts on it at the next step boundary."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    """Runs one phase on a prepared `Session` (engine, data, logger, checkpointer)."""

    def __init__(self, cfg: RunConfig, session: Session):
        self.cfg = cfg
        self.s = session
        self.step = session.start_step
        self.tokens_seen = session.start_tokens
        self.nonfinite_skips = session.nonfinite_skips
        self.stop = StopRequest()
        self.started = time.monotonic()
        limit = cfg.train.time_limit
        margin = parse_duration(cfg.train.time_limit_margin)
        self.deadline = self.started + parse_duration(limit) - margin if limit else math.inf
        self.checkpointer = Checkpointer(session.run_dir / "checkpoints", cfg.checkpoint.keep_last,
                                         session.env.rank, session.env.world_size)
        self.last_saved_step = self.step if session.resumed else -1
        self._window_start = (time.monotonic(), self.tokens_seen)
        self._slowest_step = 0.0

    # ------------------------------------------------------------------ the story

    def train(self) -> int:
        """Train to max_steps; returns the process exit status."""
        self.stop.install()
        try:
            if self.cfg.eval.at_start and self.step == 0 and not self.s.resumed:
                self.evaluate()
            while self.step < self.cfg.train.max_steps:
                loss = self.train_step()
                self.step += 1
                self.tokens_seen += self.s.tokens_per_step
                stop_reason = self.agree_on_stop()
                self.log_step(loss)
                if self.due(self.cfg.eval.every_steps):
                    self.evaluate()
                if stop_reason:
                    self.save()
                    self.s.logger.message(f"{stop_reason}: saved a committed checkpoint at step {self.step}; "
                                          f"exiting with status {EXIT_RESUMABLE} (run again to resume)")
                    return EXIT_RESUMABLE
                if self.due(self.cfg.checkpoint.every_steps):
                    self.save()
            if self.cfg.eval.sets and not self.due(self.cfg.eval.every_steps) and self.step > 0:
                self.evaluate()
            if self.last_saved_step != self.step:
                self.save()
            return EXIT_OK
        finally:
            self.stop.uninstall()
            self.s.logger.close()

    def due(self, every: int) -> bool:
        return every > 0 and self.step % every == 0

    # ------------------------------------------------------------------ one optimizer step

    def train_step(self) -> float:
        """Gradient accumulation over micro-batches, then the engine's optimizer + schedule step."""
        engine = self.s.engine
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.s.device)
        skipping = self.cfg.train.max_nonfinite_skips > 0
        for micro in range(self.cfg.train.grad_accum):
            loss = self.forward_finite() if skipping else self.forward()
            engine.backward(loss)
            if micro == self.cfg.train.grad_accum - 1 and not skipping:
                self.stop_if_nonfinite(loss_sum + loss.detach().double())
            engine.step()
            loss_sum += loss.detach().double()
        grad_norm = engine.get_global_grad_norm()
        if grad_norm is not None and not math.isfinite(float(grad_norm)):
            raise NonFiniteLoss(f"step {self.step}: gradient norm is {float(grad_norm)}; the weights are no "
                                "longer usable, stopping without saving (resume from the last checkpoint)")
        self._grad_norm = None if grad_norm is None else float(grad_norm)
        return loss_sum / self.cfg.train.grad_accum

    def forward(self) -> torch.Tensor:
        batch = self.s.sampler.next_batch()
        return self.s.engine(batch["input_ids"].to(self.s.device), batch["labels"].to(self.s.device))

    def stop_if_nonfinite(self, loss_sum: torch.Tensor) -> None:
        """One check per optimizer step, before the update: a non-finite loss on any rank stops the run."""
        bad = distributed.all_reduce_max([0.0 if torch.isfinite(loss_sum).item() else 1.0], self.s.device)[0]
        if bad:
            raise NonFiniteLoss(f"non-finite loss at step {self.step + 1} (tokens seen {self.tokens_seen}); "
                                "stopping before the update, without saving: the last committed checkpoint "
                                "is intact (train.max_nonfinite_skips > 0 skips such batches instead)")

    def forward_finite(self) -> torch.Tensor:
        """The loss of the next micro-batch whose loss is finite on every rank.

        A non-finite loss is reported; its batch is skipped (replaced by the next one) while
        train.max_nonfinite_skips allows, then the run stops.
        """
        while True:
            loss = self.forward()
            bad = distributed.all_reduce_max([0.0 if torch.isfinite(loss).item() else 1.0], self.s.device)[0]
            if not bad:
                return loss
            self.nonfinite_skips += 1
            where = f"step {self.step + 1} (tokens seen {self.tokens_seen})"
            if self.nonfinite_skips > self.cfg.train.max_nonfinite_skips:
                raise NonFiniteLoss(f"non-finite loss at {where}; {self.nonfinite_skips - 1} batch(es) skipped "
                                    f"before, train.max_nonfinite_skips={self.cfg.train.max_nonfinite_skips}")
            self.s.logger.message(f"non-finite loss at {where}: skipping the batch "
                                  f"({self.nonfinite_skips}/{self.cfg.train.max_nonfinite_skips})")

    # ------------------------------------------------------------------ stop, log, eval, save

    def agree_on_stop(self) -> str | None:
        """Signal or time limit on any rank stops every rank after this step."""
        now = time.monotonic()
        step_time = now - getattr(self, "_last_step_end", self.started)
        self._last_step_end = now
        self._slowest_step = max(self._slowest_step, step_time)
        out_of_time = now + self._slowest_step >= self.deadline
        flags = distributed.all_reduce_max([float(self.stop.signum), float(out_of_time)], self.s.device)
        if flags[0]:
            return f"received {signal.Signals(int(flags[0])).name}"
        if flags[1]:
            return "time limit reached"
        limit = self.cfg.train.stop_after_steps
        if limit and self.step - self.s.start_step >= limit and self.step < self.cfg.train.max_steps:
            return f"train.stop_after_steps={limit} reached"
        return None

    def log_step(self, loss: torch.Tensor) -> None:
        every = self.cfg.train.log_every
        if self.step % every and self.step != self.cfg.train.max_steps:
            return
        mean_loss = distributed.all_reduce_sum([loss.item()], self.s.device)[0] / self.s.env.world_size
        now = time.monotonic()
        start_time, start_tokens = self._window_start
        tokens_per_s = (self.tokens_seen - start_tokens) / max(now - start_time, 1e-9)
        self._window_start = (now, self.tokens_seen)
        record = {"kind": "train", "step": self.step, "tokens": self.tokens_seen,
                  "lr": self.s.lr_used(self.step - 1), "loss": mean_loss, "grad_norm": self._grad_norm,
                  "tokens_per_s": tokens_per_s, "time": time.time()}
        if self.s.peak_flops:
            record["mfu"] = tokens_per_s * self.s.flops_per_token / (self.s.peak_flops * self.s.env.world_size)
        self.s.logger.log(record)
        self.s.logger.progress(self.step, {"loss": f"{mean_loss:.4f}", "lr": f"{record['lr']:.2e}",
                                           "tok/s": f"{tokens_per_s:,.0f}"})

    def evaluate(self) -> dict[str, dict[str, float]]:
        """Token-weighted loss and perplexity on every named held-out set."""
        if not self.s.eval_sets:
            return {}
        started = time.monotonic()
        results = self.s.evaluate()
        for name, res in results.items():
            self.s.logger.log({"kind": "eval", "set": name, "step": self.step, "tokens": self.tokens_seen,
                               "loss": res["loss"], "ppl": res["ppl"], "eval_tokens": res["tokens"]})
        summary = ", ".join(f"{n} loss {r['loss']:.4f} ppl {r['ppl']:.2f}" for n, r in results.items())
        self.s.logger.message(f"step {self.step}: eval {summary}")
        self._window_start = (self._window_start[0] + time.monotonic() - started, self._window_start[1])
        return results

    def save(self) -> None:
        started = time.monotonic()
        client = {"step": self.step, "tokens_seen": self.tokens_seen, "nonfinite_skips": self.nonfinite_skips,
                  "zero_stage": self.s.zero_stage, "precision": self.cfg.train.precision}
        rank_state = {"sampler": self.s.sampler.state_dict(), "rng": rng_state(),
                      "rank": self.s.env.rank, "world_size": self.s.env.world_size}
        ref = self.checkpointer.save(self.s.engine, self.step, client, rank_state, self.s.checkpoint_extras())
        self.last_saved_step = self.step
        self.s.logger.message(f"step {self.step}: committed {ref.path} ({time.monotonic() - started:.1f} s)")
        self._window_start = (self._window_start[0] + time.monotonic() - started, self._window_start[1])


def run_phase(source: ConfigSource) -> int:
    """`cpt train`: resolve the config, then train under whichever launcher started us."""
    return run(source.load())


def run(cfg: RunConfig) -> int:
    """Set up under whichever launcher started us, train, and return the exit status."""
    env = distributed.init()
    session = open_session(cfg, env)
    try:
        return Trainer(cfg, session).train()
    except NonFiniteLoss as exc:
        session.logger.message(f"error: {exc}")
        return EXIT_FAILED
