"""The step loop's decisions in-process: when it evaluates, saves and stops, on fake engine and data."""

from __future__ import annotations

import math
import signal
from pathlib import Path

import pytest
import torch

from continual_pt import config, layout
from continual_pt.checkpoint import refs
from continual_pt.evaluation.scoring import ScoringStopped
from continual_pt.runtime import distributed
from continual_pt.runtime.distributed import DistEnv
from continual_pt.training.loop import EXIT_OK, EXIT_RESUMABLE, NonFiniteLoss, Trainer
from continual_pt.training.policy import Cadence, Deadline, agree_on_stop
from continual_pt.training.session import CheckpointFiles, PhaseConstants, Session
from continual_pt.training.state import TrainState
from continual_pt.training.stop import StopRequest

TOKENS_PER_STEP = 64
CLIENT_KEYS = ["step", "tokens_seen", "nonfinite_skips", "zero_stage", "precision"]


class FakeEngine:
    """Answers a loss of 2.0 for every micro-batch, NaN for the batch numbers in `nan_batches`."""

    def __init__(self, nan_batches: tuple[int, ...] = ()):
        self.nan_batches = nan_batches
        self.optimizer_steps = 0

    def __call__(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return torch.tensor(math.nan if int(input_ids[0, 0]) in self.nan_batches else 2.0)

    def backward(self, loss: torch.Tensor) -> None:
        pass

    def step(self) -> None:
        self.optimizer_steps += 1

    def get_global_grad_norm(self) -> float:
        return 0.5

    def eval(self) -> None:
        pass

    def train(self) -> None:
        pass


class FakeSampler:
    """Numbered batches: batch n holds n in every position."""

    def __init__(self) -> None:
        self.drawn = 0

    def next_batch(self) -> dict[str, torch.Tensor]:
        self.drawn += 1
        ids = torch.full((1, 4), self.drawn, dtype=torch.long)
        return {"input_ids": ids, "labels": ids}

    def state_dict(self) -> dict[str, int]:
        return {"drawn": self.drawn}


class FakeLogger:
    """Puts ('log', step) and ('eval', step) on the shared event list; keeps messages."""

    def __init__(self, events: list[tuple[str, int]]):
        self.events = events
        self.records: list[dict] = []
        self.messages: list[str] = []
        self.closed = False

    def log(self, record: dict) -> None:
        self.records.append(record)
        self.events.append(("log" if record["kind"] == "train" else "eval", record["step"]))

    def message(self, text: str) -> None:
        self.messages.append(text)

    def progress(self, step: int, postfix: dict) -> None:
        pass

    def close(self) -> None:
        self.closed = True


class FakeHeldOut:
    def score(self, engine: FakeEngine, env: DistEnv, device: torch.device,
              stop=None) -> dict[str, dict[str, float]]:
        return {"held": {"loss": 1.0, "ppl": math.e, "tokens": 32, "windows": 2, "selection": "spread"}}


class FakeCheckpointer:
    """Puts ('save', step) on the shared event list and keeps each client state."""

    def __init__(self, events: list[tuple[str, int]]):
        self.events = events
        self.clients: list[dict] = []

    def save(self, engine, step, client_state, rank_state, extras) -> refs.CheckpointRef:
        self.events.append(("save", step))
        self.clients.append(client_state)
        assert set(extras) == {"model", "tokenizer", "run"}
        return refs.CheckpointRef(Path("checkpoints") / layout.tag_for(step))


def make_cfg(max_steps: int, *, eval_every: int = 0, save_every: int = 0, log_every: int = 5,
             with_eval_sets: bool = True, **train) -> config.RunConfig:
    cfg = config.RunConfig()
    cfg.train.max_steps = max_steps
    cfg.train.log_every = log_every
    cfg.train.grad_accum = 2
    cfg.train.precision = "fp32"
    for key, value in train.items():
        setattr(cfg.train, key, value)
    cfg.eval.every_steps = eval_every
    cfg.eval.sets = {"held": config.EvalSetConfig(path="unused")} if with_eval_sets else {}
    cfg.checkpoint.every_steps = save_every
    return cfg


class Run:
    """A Trainer on fakes; `events` lists ('log'|'eval'|'save', step) in the order they happened."""

    def __init__(self, cfg: config.RunConfig, start: TrainState | None = None, engine: FakeEngine | None = None,
                 sampler: FakeSampler | None = None, held_out: FakeHeldOut | None = None,
                 stop: StopRequest | None = None):
        self.events: list[tuple[str, int]] = []
        self.logger = FakeLogger(self.events)
        self.checkpointer = FakeCheckpointer(self.events)
        constants = PhaseConstants(lr_at=lambda step: 0.01 * step, tokens_per_step=TOKENS_PER_STEP,
                                   flops_per_token=6.0, peak_flops=None, zero_stage=2)
        session = Session(env=DistEnv(0, 0, 1, "127.0.0.1", 0, "none"), device=torch.device("cpu"),
                          engine=engine or FakeEngine(), sampler=sampler or FakeSampler(),
                          held_out=held_out or FakeHeldOut(), logger=self.logger, checkpointer=self.checkpointer,
                          constants=constants, files=CheckpointFiles(None, "", {}),
                          start=start or TrainState(), resumed=start is not None)
        self.trainer = Trainer(cfg, session, stop)

    def train(self) -> int:
        return self.trainer.train()

    def steps(self, kind: str) -> list[int]:
        return [step for k, step in self.events if k == kind]


# --------------------------------------------------------------------------- cadences of a whole run


def test_eval_at_start_every_n_and_at_the_end_unless_just_done():
    run = Run(make_cfg(14, eval_every=6))
    assert run.train() == EXIT_OK
    assert run.steps("eval") == [0, 6, 12, 14]
    assert run.steps("log") == [5, 10, 14]
    assert run.steps("save") == [14]
    assert run.logger.closed

    run = Run(make_cfg(12, eval_every=6))
    assert run.train() == EXIT_OK
    assert run.steps("eval") == [0, 6, 12]


def test_eval_at_start_can_be_turned_off_and_no_sets_means_no_eval():
    cfg = make_cfg(12, eval_every=6)
    cfg.eval.at_start = False
    run = Run(cfg)
    run.train()
    assert run.steps("eval") == [6, 12]

    run = Run(make_cfg(12, eval_every=6, with_eval_sets=False))
    run.train()
    assert run.steps("eval") == []


def test_save_every_n_and_at_the_end_unless_just_saved():
    run = Run(make_cfg(14, save_every=4))
    assert run.train() == EXIT_OK
    assert run.steps("save") == [4, 8, 12, 14]

    run = Run(make_cfg(12, save_every=4))
    assert run.train() == EXIT_OK
    assert run.steps("save") == [4, 8, 12]


def test_the_checkpoint_holds_the_loop_state_under_the_keys_old_checkpoints_use():
    run = Run(make_cfg(6, save_every=3))
    run.train()
    assert [list(c) for c in run.checkpointer.clients] == [CLIENT_KEYS, CLIENT_KEYS]
    assert run.checkpointer.clients[-1] == {"step": 6, "tokens_seen": 6 * TOKENS_PER_STEP, "nonfinite_skips": 0,
                                            "zero_stage": 2, "precision": "fp32"}


def test_a_resumed_run_does_not_evaluate_at_its_start_and_continues_its_state():
    start = TrainState(step=6, tokens_seen=6 * TOKENS_PER_STEP, nonfinite_skips=1)
    run = Run(make_cfg(12, eval_every=4, save_every=5), start)
    assert run.train() == EXIT_OK
    assert run.steps("eval") == [8, 12]
    assert run.steps("save") == [10, 12]
    assert run.steps("log") == [10, 12]
    assert run.checkpointer.clients[-1] == {"step": 12, "tokens_seen": 12 * TOKENS_PER_STEP, "nonfinite_skips": 1,
                                            "zero_stage": 2, "precision": "fp32"}
    assert start == TrainState(6, 6 * TOKENS_PER_STEP, 1)  # the session's start point is left as it was


def test_a_run_resumed_at_its_last_step_evaluates_once_and_does_not_save_again():
    run = Run(make_cfg(12, eval_every=5), TrainState(step=12, tokens_seen=12 * TOKENS_PER_STEP))
    assert run.train() == EXIT_OK
    assert run.events == [("eval", 12)]


# --------------------------------------------------------------------------- stopping early


def test_stop_after_steps_saves_and_exits_resumably():
    run = Run(make_cfg(12, eval_every=4, save_every=3, stop_after_steps=4))
    assert run.train() == EXIT_RESUMABLE
    assert run.events == [("eval", 0), ("save", 3), ("eval", 4), ("save", 4)]
    assert run.logger.messages[-1] == ("train.stop_after_steps=4 reached: saved a committed checkpoint at step 4; "
                                       "exiting with status 75 (run again to resume)")


def test_stop_after_steps_counts_the_steps_of_this_invocation():
    run = Run(make_cfg(12, stop_after_steps=4), TrainState(step=6, tokens_seen=6 * TOKENS_PER_STEP))
    assert run.train() == EXIT_RESUMABLE
    assert run.steps("save") == [10]
    # Reaching max_steps is no early stop: the run ends normally.
    run = Run(make_cfg(12, stop_after_steps=2), TrainState(step=10, tokens_seen=10 * TOKENS_PER_STEP))
    assert run.train() == EXIT_OK
    assert run.steps("save") == [12]


def peer_flags(monkeypatch, flags_by_step: dict[int, list[float]], trainer: Trainer) -> None:
    """Fake a second rank: at the given steps it reports [signum, out_of_time] to the stop vote."""
    real = distributed.all_reduce_max

    def all_reduce_max(values: list[float]) -> list[float]:
        if len(values) != 2:  # the non-finite-loss vote
            return real(values)
        peer = flags_by_step.get(trainer.state.step, [0.0, 0.0])
        return [max(a, b) for a, b in zip(values, peer)]

    monkeypatch.setattr(distributed, "all_reduce_max", all_reduce_max)


def test_a_signal_on_another_rank_stops_this_one_after_the_same_step(monkeypatch):
    run = Run(make_cfg(12, eval_every=5, save_every=4))
    peer_flags(monkeypatch, {5: [float(signal.SIGTERM), 0.0]}, run.trainer)
    assert run.train() == EXIT_RESUMABLE
    assert run.events == [("eval", 0), ("save", 4), ("log", 5), ("eval", 5), ("save", 5)]
    assert run.logger.messages[-1].startswith("received SIGTERM: saved a committed checkpoint at step 5;")


def test_the_time_limit_on_another_rank_stops_this_one(monkeypatch):
    run = Run(make_cfg(12, with_eval_sets=False))
    peer_flags(monkeypatch, {3: [0.0, 1.0]}, run.trainer)
    assert run.train() == EXIT_RESUMABLE
    assert run.events == [("save", 3)]
    assert run.logger.messages[-1].startswith("time limit reached: saved a committed checkpoint at step 3;")


def test_a_signal_to_this_process_stops_at_the_next_step_boundary():
    class SignallingSampler(FakeSampler):
        def next_batch(self) -> dict[str, torch.Tensor]:
            if self.drawn == 2 * 3 + 1:  # during step 4 (two micro-batches a step)
                signal.raise_signal(signal.SIGUSR1)
            return super().next_batch()

    run = Run(make_cfg(12, with_eval_sets=False), sampler=SignallingSampler())
    previous = signal.getsignal(signal.SIGUSR1)
    assert run.train() == EXIT_RESUMABLE
    assert run.steps("save") == [4]
    assert run.logger.messages[-1].startswith("received SIGUSR1:")
    assert signal.getsignal(signal.SIGUSR1) is previous


def test_a_first_sigint_stops_like_sigterm_after_the_step_and_saves():
    class InterruptingSampler(FakeSampler):
        def next_batch(self) -> dict[str, torch.Tensor]:
            if self.drawn == 2 * 2 + 1:  # during step 3
                signal.raise_signal(signal.SIGINT)
            return super().next_batch()

    run = Run(make_cfg(12, with_eval_sets=False), sampler=InterruptingSampler())
    previous = signal.getsignal(signal.SIGINT)
    assert run.train() == EXIT_RESUMABLE
    assert run.steps("save") == [3]
    assert run.logger.messages[-1].startswith("received SIGINT: saved a committed checkpoint at step 3; ")
    assert run.logger.messages[-1].endswith(" s after the signal; exiting with status 75 (run again to resume)")
    assert signal.getsignal(signal.SIGINT) is previous


class InterruptedHeldOut(FakeHeldOut):
    """Scores in ten batches, asking `stop` before each; a SIGTERM arrives during batch 3 of the eval at `at`."""

    def __init__(self, trainer_state: list, at: int):
        self.trainer_state, self.at = trainer_state, at
        self.batches = 0

    def score(self, engine, env, device, stop=None):
        for batch in range(10):
            if stop():
                raise ScoringStopped(f"stopped after {batch} of 10 batches")
            self.batches += 1
            if batch == 3 and self.trainer_state[0].state.step == self.at:
                signal.raise_signal(signal.SIGTERM)
        return super().score(engine, env, device)


def test_a_stop_during_an_eval_drops_it_and_saves_before_any_further_step():
    holder: list = []
    held_out = InterruptedHeldOut(holder, at=4)
    run = Run(make_cfg(12, eval_every=2, save_every=3), held_out=held_out)
    holder.append(run.trainer)
    assert run.train() == EXIT_RESUMABLE
    assert run.events == [("eval", 0), ("eval", 2), ("save", 3), ("save", 4)]
    assert held_out.batches == 10 + 10 + 4        # two whole evals, then 4 batches of the interrupted one
    assert run.logger.messages[-3] == "step 4: eval interrupted by SIGTERM (stopped after 4 of 10 batches); " \
                                      "dropped, not logged"
    assert run.logger.messages[-1].startswith("received SIGTERM: saved a committed checkpoint at step 4; ")


def test_a_stop_during_the_eval_before_training_exits_with_nothing_to_save():
    holder: list = []
    run = Run(make_cfg(12, eval_every=2), held_out=InterruptedHeldOut(holder, at=0))
    holder.append(run.trainer)
    assert run.train() == EXIT_RESUMABLE
    assert run.events == []
    assert run.logger.messages[-1] == ("received SIGTERM during the eval before training: nothing new to save (the "
                                       "last committed checkpoint, if any, is unchanged); exiting with status 75 "
                                       "(run again to resume)")


def test_a_stop_during_the_final_eval_saves_and_says_the_eval_is_dropped():
    holder: list = []
    run = Run(make_cfg(5, eval_every=4), held_out=InterruptedHeldOut(holder, at=5))
    holder.append(run.trainer)
    assert run.train() == EXIT_RESUMABLE
    assert run.events == [("eval", 0), ("eval", 4), ("log", 5), ("save", 5)]
    assert run.logger.messages[-1].startswith("received SIGTERM during the final eval (dropped; the next start "
                                              "makes it): saved a committed checkpoint at step 5;")


@pytest.mark.parametrize("eval_every", [4, 5])   # the last step's eval in the loop, or after it
def test_a_start_resumed_at_the_last_step_makes_the_final_eval_only(eval_every):
    """A start at max_steps happens only when a stop cut the final eval short (else the run is finished)."""
    run = Run(make_cfg(5, eval_every=eval_every), start=TrainState(step=5, tokens_seen=5 * TOKENS_PER_STEP))
    assert run.train() == EXIT_OK
    assert run.events == [("eval", 5)]              # no step, no save: the checkpoint at step 5 is committed
    holder: list = []
    run = Run(make_cfg(5, eval_every=eval_every), start=TrainState(step=5, tokens_seen=5 * TOKENS_PER_STEP),
              held_out=InterruptedHeldOut(holder, at=5))
    holder.append(run.trainer)
    assert run.train() == EXIT_RESUMABLE            # cut short again: nothing saved over the commit
    assert run.events == []
    assert run.logger.messages[-1] == ("received SIGTERM during the final eval (dropped; the next start makes it): "
                                       "its checkpoint at step 5 is committed already; exiting with status 75 "
                                       "(run again to resume)")


def test_a_signal_during_set_up_exits_before_the_first_step_with_nothing_to_save():
    stop = StopRequest()
    assert stop.install()
    try:
        signal.raise_signal(signal.SIGTERM)       # while the session was being built
        run = Run(make_cfg(12, eval_every=2), stop=stop)
        assert run.train() == EXIT_RESUMABLE
        assert stop.installed                    # the request belongs to its owner, who gives it back
    finally:
        stop.uninstall()
    assert run.events == []
    assert run.logger.messages == ["received SIGTERM during set-up: nothing new to save (the last committed "
                                   "checkpoint, if any, is unchanged); exiting with status 75 (run again to resume)"]


def test_a_time_limit_already_spent_stops_after_the_first_step():
    run = Run(make_cfg(12, with_eval_sets=False, time_limit="00:00:00", time_limit_margin="0"))
    assert run.train() == EXIT_RESUMABLE
    assert run.events == [("save", 1)]


def test_stop_votes_are_reduced_over_ranks(monkeypatch):
    assert agree_on_stop(0, False) == (0, False)          # world size 1: this rank's own flags
    assert agree_on_stop(int(signal.SIGUSR1), True) == (int(signal.SIGUSR1), True)
    seen = []

    def all_reduce_max(values: list[float]) -> list[float]:
        seen.append(values)
        return [float(signal.SIGTERM), 1.0]                    # what another rank contributed

    monkeypatch.setattr(distributed, "all_reduce_max", all_reduce_max)
    assert agree_on_stop(0, False) == (int(signal.SIGTERM), True)
    assert seen == [[0.0, 0.0]]


# --------------------------------------------------------------------------- the pieces on their own


def test_cadence_answers_step_by_step():
    cadence = Cadence.of(make_cfg(20, eval_every=6, save_every=5, log_every=4, stop_after_steps=3))
    steps = range(21)
    assert [s for s in steps if cadence.eval_after(s)] == [0, 6, 12, 18]
    assert [s for s in steps if cadence.save_after(s)] == [0, 5, 10, 15, 20]
    assert [s for s in steps if cadence.log_after(s)] == [0, 4, 8, 12, 16, 20]
    assert [s for s in steps if cadence.final_eval(s)] == [s for s in range(1, 21) if s % 6]
    assert cadence.eval_before_training(0, resumed=False) and not cadence.eval_before_training(0, resumed=True)
    assert not cadence.eval_before_training(5, resumed=False)
    assert cadence.final_save(20, last_saved_step=15) and not cadence.final_save(20, last_saved_step=20)
    assert [s for s in steps if cadence.stop_reason(s, 2, 0, False)] == list(range(5, 20))
    assert cadence.stop_reason(1, 0, int(signal.SIGTERM), True) == "received SIGTERM"
    assert cadence.stop_reason(1, 0, 0, True) == "time limit reached"


def test_deadline_keeps_room_for_one_more_step_as_slow_as_the_slowest():
    cfg = make_cfg(10, time_limit="100", time_limit_margin="10")
    deadline = Deadline(cfg.train, started=1000.0)
    assert deadline.at == 1090.0
    assert [deadline.step_ended(t) for t in (1030.0, 1050.0, 1059.0, 1061.0)] == [False, False, False, True]
    assert deadline.slowest_step == 30.0
    assert Deadline(make_cfg(10).train, started=0.0).at == math.inf


def test_train_state_round_trips_through_the_client_state():
    state = TrainState(step=7, tokens_seen=448, nonfinite_skips=2)
    assert state.state_dict() == {"step": 7, "tokens_seen": 448, "nonfinite_skips": 2}
    restored = TrainState()
    restored.load_state_dict({**state.state_dict(), "zero_stage": 1, "precision": "bf16"})
    assert restored == state
    older = TrainState(nonfinite_skips=5)
    older.load_state_dict({"step": 3, "tokens_seen": 192})  # written before skips were counted
    assert older == TrainState(3, 192, 0)


def test_skipped_nonfinite_batches_are_counted_into_the_checkpoint():
    run = Run(make_cfg(4, with_eval_sets=False, max_nonfinite_skips=2), engine=FakeEngine(nan_batches=(3,)))
    assert run.train() == EXIT_OK
    assert run.checkpointer.clients == [{"step": 4, "tokens_seen": 4 * TOKENS_PER_STEP, "nonfinite_skips": 1,
                                         "zero_stage": 2, "precision": "fp32"}]
    assert run.logger.messages[0] == "non-finite loss at step 2 (tokens seen 64): skipping the batch (1/2)"


def test_a_nonfinite_loss_without_skips_stops_before_the_update():
    engine = FakeEngine(nan_batches=(4,))
    run = Run(make_cfg(4, with_eval_sets=False), engine=engine)
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss at step 2 \(tokens seen 64\)"):
        run.train()
    assert engine.optimizer_steps == 3  # step 2's last micro-batch never reached the engine's step
    assert run.steps("save") == []
