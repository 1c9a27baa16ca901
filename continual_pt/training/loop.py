"""The step loop: forward/backward/step on the DeepSpeed engine, evaluation, logging, checkpoints, signals.

`Trainer.train()` reads as the story of a run; set-up lives in `session.py` (data, model,
optimizer, schedule, DeepSpeed, how the run starts), the loop's decisions in `policy.py`, the
gradient norm's measurement in `grad_norm.py`.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any

import torch

from continual_pt.checkpoint.checkpointer import rng_state
from continual_pt.config import RunConfig
from continual_pt.config.load import load_source
from continual_pt.evaluation.scoring import ScoringStopped
from continual_pt.layout import EXIT_FAILED, EXIT_OK, EXIT_RESUMABLE, STOP
from continual_pt.options import ConfigSource
from continual_pt.runtime import distributed
from continual_pt.runtime.host_copy import HostCopy
from continual_pt.training import stop as stops
from continual_pt.training.grad_norm import GradNorm
from continual_pt.training.policy import Cadence, Deadline, agree_on_stop
from continual_pt.training.prefetch import batches_for
from continual_pt.training.session import RunFinished, Session, open_session
from continual_pt.training.state import NonFiniteLoss, TrainState
from continual_pt.training.stop import StopRequest

# How many generations up a rank's launcher sits: torchrun starts ranks itself; the deepspeed
# runner starts one `deepspeed.launcher.launch` per node, which starts the ranks.
LAUNCHER_DEPTH = {"torchrun": 1, "deepspeed": 2}


class Trainer:
    """Runs one phase on a prepared `Session` (engine, data, logger, checkpointer)."""

    def __init__(self, cfg: RunConfig, session: Session, stop: StopRequest | None = None):
        self.cfg = cfg
        self.session = session
        self.state: TrainState = dataclasses.replace(session.start)
        self.cadence = Cadence.of(cfg)
        self.stop = stop or StopRequest()
        # The training batches, read ahead of the step where the sampler allows; the data position
        # a checkpoint records is the one the step consumed.
        self.batches = batches_for(session.sampler, session.device)
        self.grad_norm = GradNorm(session.engine, session.constants.zero_stage, cfg.train.precision)
        self.started = time.monotonic()
        self.deadline = Deadline(cfg.train, self.started)
        self.last_saved_step = self.state.step if session.resumed else -1
        # Resumed at max_steps: a stop cut the final eval short (else the run was finished), so make it.
        self.resumed_at_end = session.resumed and self.state.step >= cfg.train.max_steps
        self._window_start = (self.started, self.state.tokens_seen)
        self._agreed_signum = 0

    # ------------------------------------------------------------------ the story

    def train(self) -> int:
        """Train to max_steps; returns the process exit status."""
        owned = self.stop.install()
        if self.session.env.is_main:
            self.stop.watch(self.cfg.run_dir / STOP)
        if self.session.env.launcher in LAUNCHER_DEPTH:
            self.stop.watch_launcher(LAUNCHER_DEPTH[self.session.env.launcher])
        try:
            self.batches.start()
            return self._run()
        finally:
            self.batches.close()
            if owned:
                self.stop.uninstall()
            self.session.logger.close()

    def _run(self) -> int:
        if self.stopped_during_setup():
            return EXIT_RESUMABLE
        if self.cadence.eval_before_training(self.state.step, self.session.resumed) and not self.evaluate():
            return self.exit_unsaved("during the eval before training")
        while self.state.step < self.cfg.train.max_steps:
            loss = self.train_step()
            self.state.advance(self.session.constants.tokens_per_step)
            stop_reason = self.agree_on_stop()
            if stop_reason or self.cadence.acts_after(self.state.step):
                self.grad_norm.settle()   # the step boundary: nothing logs, evaluates or saves a non-finite step
            self.log_step(loss)
            if self.cadence.eval_after(self.state.step) and not self.evaluate():
                stop_reason = stop_reason or self.signal_reason()
            if stop_reason:
                return self.save_and_exit(stop_reason)
            if self.cadence.save_after(self.state.step):
                self.save()
        if (self.cadence.final_eval(self.state.step) or self.resumed_at_end) and not self.evaluate():
            return self.save_and_exit(f"{self.signal_reason()} during the final eval (dropped; the next start "
                                      "makes it)")
        if self.cadence.final_save(self.state.step, self.last_saved_step):
            self.save()
        return EXIT_OK

    # ------------------------------------------------------------------ one optimizer step

    def train_step(self) -> torch.Tensor:
        """Gradient accumulation over micro-batches, then the engine's optimizer + schedule step.

        Returns this rank's mean micro-batch loss (a float64 scalar tensor, still on the device).
        The host reads two device values per step, neither of which drains the device's queue: the
        loss's finiteness, posted before the last backward pass is queued and read after it (the
        update waits for it), and the gradient norm, read one step later (or at the step boundary
        before any log, eval or save).
        """
        engine = self.session.engine
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.session.device)
        skipping = self.cfg.train.max_nonfinite_skips > 0
        for micro in range(self.cfg.train.grad_accum):
            loss = self.forward_finite() if skipping else self.forward()
            loss_sum += loss.detach().double()
            last = micro == self.cfg.train.grad_accum - 1
            finite = HostCopy(torch.isfinite(loss_sum)) if last and not skipping else None
            engine.backward(loss)
            if finite is not None:
                self.stop_if_nonfinite(finite)
            if last:
                self.grad_norm.update(self.state.step + 1)
            else:
                engine.step()
        return loss_sum / self.cfg.train.grad_accum

    def forward(self) -> torch.Tensor:
        batch = self.batches.next_batch()
        return self.session.engine(batch["input_ids"], batch["labels"])

    def stop_if_nonfinite(self, finite: HostCopy) -> None:
        """One check per optimizer step, before the update: a non-finite loss on any rank stops the run."""
        bad = distributed.all_reduce_max([0.0 if finite.value() else 1.0])[0]
        if bad:
            raise NonFiniteLoss(f"non-finite loss at step {self.state.step + 1} (tokens seen "
                                f"{self.state.tokens_seen}); stopping before the update, without saving: the "
                                "last committed checkpoint is intact (train.max_nonfinite_skips > 0 skips such "
                                "batches instead)")

    def forward_finite(self) -> torch.Tensor:
        """The loss of the next micro-batch whose loss is finite on every rank.

        A non-finite loss is reported; its batch is skipped (replaced by the next one) while
        train.max_nonfinite_skips allows, then the run stops.
        """
        allowed = self.cfg.train.max_nonfinite_skips
        while True:
            loss = self.forward()
            bad = distributed.all_reduce_max([0.0 if torch.isfinite(loss).item() else 1.0])[0]  # before backward
            if not bad:
                return loss
            self.state.nonfinite_skips += 1
            where = f"step {self.state.step + 1} (tokens seen {self.state.tokens_seen})"
            if self.state.nonfinite_skips > allowed:
                raise NonFiniteLoss(f"non-finite loss at {where}; {self.state.nonfinite_skips - 1} batch(es) "
                                    f"skipped before, train.max_nonfinite_skips={allowed}")
            self.session.logger.message(f"non-finite loss at {where}: skipping the batch "
                                      f"({self.state.nonfinite_skips}/{allowed})")

    # ------------------------------------------------------------------ stop, log, eval, save

    def agree_on_stop(self) -> str | None:
        """Signal or time limit on any rank (or stop_after_steps) stops every rank after this step."""
        out_of_time = self.deadline.step_ended(time.monotonic())
        signum, out_of_time = agree_on_stop(self.stop.current(), out_of_time)
        return self.cadence.stop_reason(self.state.step, self.session.start.step, signum, out_of_time)

    def log_step(self, loss: torch.Tensor) -> None:
        """Every log_every steps: the mean loss over ranks, LR, gradient norm, throughput and MFU."""
        if not self.cadence.log_after(self.state.step):
            return
        env, constants = self.session.env, self.session.constants
        mean_loss = distributed.all_reduce_sum([loss.item()])[0] / env.world_size
        now = time.monotonic()
        start_time, start_tokens = self._window_start
        tokens_per_s = (self.state.tokens_seen - start_tokens) / max(now - start_time, 1e-9)
        self._window_start = (now, self.state.tokens_seen)
        record = {"kind": "train", "step": self.state.step, "tokens": self.state.tokens_seen,
                  "lr": constants.lr_at(self.state.step - 1), "loss": mean_loss,
                  "grad_norm": self.grad_norm.of_last_step(), "tokens_per_s": tokens_per_s, "time": time.time()}
        if self.session.device.type == "cuda":   # the allocator's own counter: no device sync
            record["peak_gib"] = torch.cuda.max_memory_allocated(self.session.device) / 2**30
        if constants.peak_flops:
            record["mfu"] = tokens_per_s * constants.flops_per_token / (constants.peak_flops * env.world_size)
        self.session.logger.log(record)
        self.session.logger.progress(self.state.step, {"loss": f"{mean_loss:.4f}", "lr": f"{record['lr']:.2e}",
                                                       "tok/s": f"{tokens_per_s:,.0f}"})

    def evaluate(self) -> bool:
        """Token-weighted loss and perplexity on every named held-out set; False if a stop cut it short.

        An interrupted eval is dropped whole: no set of it is logged.
        """
        started = time.monotonic()
        session = self.session
        try:
            results = session.held_out.score(session.engine, session.env, session.device, stop=self.stop_agreed)
        except ScoringStopped as exc:
            self.session.logger.message(f"step {self.state.step}: eval interrupted by {self.signal_name()} "
                                      f"({exc}); dropped, not logged")
            return False
        for record in eval_records(results, self.state.step, self.state.tokens_seen):
            self.session.logger.log(record)
        summary = ", ".join(f"{n} loss {r['loss']:.4f} ppl {r['ppl']:.2f}" for n, r in results.items())
        self.session.logger.message(f"step {self.state.step}: eval {summary}")
        self._pause_window(started)
        return True

    def stop_agreed(self) -> bool:
        """Whether a stop signal reached any rank (a collective: every rank asks at the same point)."""
        self._agreed_signum = int(distributed.all_reduce_max([float(self.stop.current())])[0])
        return self._agreed_signum > 0

    def signal_name(self) -> str:
        return stops.describe(self._agreed_signum or self.stop.signum)

    def signal_reason(self) -> str:
        return f"received {self.signal_name()}"

    def stopped_during_setup(self) -> bool:
        """A stop signal that came during set-up (on any rank) ends the run before its first step."""
        if not self.stop_agreed():
            return False
        self.exit_unsaved("during set-up")
        return True

    def exit_unsaved(self, when: str) -> int:
        """Stop before any step of this invocation: there is nothing new to save."""
        self.session.logger.message(f"{self.signal_reason()} {when}: nothing new to save (the last committed "
                                  f"checkpoint, if any, is unchanged); exiting with status {EXIT_RESUMABLE} "
                                  "(run again to resume)")
        return EXIT_RESUMABLE

    def save_and_exit(self, reason: str) -> int:
        """Commit this step (unless it is committed already) and exit resumably, saying how long the commit
        took after the signal."""
        saved = "its checkpoint at step {step} is committed already;" if self.last_saved_step == self.state.step \
            else "saved a committed checkpoint at step {step};"
        if self.last_saved_step != self.state.step:
            self.save()
        waited = self.stop.seconds_since()
        after = f" {waited:.1f} s after the signal;" if waited is not None and "saved" in saved else ""
        self.session.logger.message(f"{reason}: {saved.format(step=self.state.step)}{after} "
                                  f"exiting with status {EXIT_RESUMABLE} (run again to resume)")
        return EXIT_RESUMABLE

    def save(self) -> None:
        """A committed checkpoint of this step: engine, loop state, and each rank's data position and RNG."""
        started = time.monotonic()
        session = self.session
        client = {**self.state.state_dict(), "zero_stage": session.constants.zero_stage,
                  "precision": self.cfg.train.precision}
        rank_state = {"sampler": self.batches.state_dict(), "rng": rng_state(),
                      "rank": session.env.rank, "world_size": session.env.world_size}
        ref = session.checkpointer.save(session.engine, self.state.step, client, rank_state, session.files.writers())
        self.last_saved_step = self.state.step
        self.session.logger.message(f"step {self.state.step}: committed {ref.path} "
                                  f"({time.monotonic() - started:.1f} s)")
        self._pause_window(started)

    def _pause_window(self, since: float) -> None:
        """Leave the time spent evaluating or saving since `since` out of the next throughput figure."""
        self._window_start = (self._window_start[0] + time.monotonic() - since, self._window_start[1])


def run_phase(source: ConfigSource) -> int:
    """`cpt train`: resolve the config, then train under whichever launcher started us."""
    return run(load_source(source))


def run(cfg: RunConfig) -> int:
    """Set up under whichever launcher started us, train, and return the exit status."""
    stop = stops.process_request()
    try:
        env = distributed.init()
        return _run_session(cfg, env, stop)
    finally:
        stop.uninstall(process=True)


def _run_session(cfg: RunConfig, env: distributed.DistEnv, stop: StopRequest) -> int:
    """Open the session (or learn that the run is finished), train, answer a pending stop request."""
    try:
        session = open_session(cfg, env)
    except RunFinished as done:
        if env.is_main:
            print(f"{cfg.name}: {done}", file=sys.stderr)
            stops.answer(cfg.run_dir, None, EXIT_OK)
        return EXIT_OK
    try:
        trainer = Trainer(cfg, session, stop)
        status = trainer.train()
        if env.is_main:   # a clean exit answers a pending STOP request (cpt launch waits for it)
            stops.answer(cfg.run_dir, trainer.state.step, status)
        return status
    except NonFiniteLoss as exc:
        session.logger.message(f"error: {exc}")
        return EXIT_FAILED
    finally:
        session.release()


def eval_records(results: dict[str, dict[str, Any]], step: int, tokens_seen: int) -> list[dict[str, Any]]:
    """The metrics records of one in-loop eval: one per set (with its macro mean when scored by domain),
    then one per domain of each set scored by domain (its `domain` field set)."""
    records = []
    for name, res in results.items():
        base = {"kind": "eval", "set": name, "step": step, "tokens": tokens_seen}
        total = {**base, "loss": res["loss"], "ppl": res["ppl"], "eval_tokens": res["tokens"],
                 "eval_windows": res["windows"], "selection": res["selection"]}
        if "macro_loss" in res:
            total["macro_loss"] = res["macro_loss"]
        records.append(total)
        records += [{**base, "domain": domain, "loss": r["loss"], "ppl": r["ppl"], "eval_tokens": r["tokens"],
                     "selection": res["selection"]} for domain, r in res.get("domains", {}).items()]
    return records
