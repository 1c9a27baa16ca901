"""Nothing lost, nothing silent: the run-dir lock, Ctrl-C, stops during an eval or during set-up,
checks at resume, eval sets too short for a window, and the gradient norm under ZeRO 0 fp32."""

from __future__ import annotations

import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from continual_pt import config
from continual_pt.checkpoint import refs
from continual_pt.data.dataset import PreparedDataset
from continual_pt.errors import UserError
from continual_pt.runtime.distributed import DistEnv
from continual_pt.training.session import RunFinished, Start, check_resume, open_session
from tests import train_support as ts

STRAIGHT = {"max_steps": 6, "micro_batch_size": 2, "grad_accum": 2, "precision": "fp32", "ds_config": "zero0",
            "log_every": 1}
NOTHING_TO_SAVE = "nothing new to save (the last committed checkpoint, if any, is unchanged); exiting with status 75"


def start(cfg_path: Path, overrides: list[str], name: str) -> subprocess.Popen:
    """`python -m continual_pt.train` in the background, its stderr piped."""
    return subprocess.Popen(ts.train_command(cfg_path, [f"name={name}", *overrides]), env=ts.env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def snapshot(run_dir: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(run_dir)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def straight(world, tmp_path_factory) -> tuple[Path, Path]:
    """(config, run dir) of a 6-step ZeRO 0 fp32 run without eval sets, trained once."""
    root = tmp_path_factory.mktemp("straight")
    cfg = ts.write_config(root / "run.yaml", world, root / "runs", train=STRAIGHT, eval={"sets": {}})
    ts.train(cfg, ["name=straight"])
    return cfg, root / "runs" / "straight"


# --------------------------------------------------------------------------- grad_norm


@pytest.mark.slow
def test_grad_norm_is_a_finite_number_under_zero0_fp32(straight):
    records = ts.train_records(straight[1])
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for r in records:
        assert isinstance(r["grad_norm"], float) and math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0, r


# --------------------------------------------------------------------------- resume checks


def resume_case(straight, overrides: list[str], zero_stage: int = 0) -> None:
    cfg = config.load(straight[0], ["name=straight", *overrides])
    check_resume(cfg, Start("resume", refs.resolve(straight[1])), zero_stage)


@pytest.mark.slow
def test_resume_refuses_a_changed_precision_zero_stage_or_model_config_naming_both_values(straight):
    tag = straight[1] / "checkpoints" / "global_step6"
    with pytest.raises(UserError, match=re.escape(f"checkpoint {tag} was saved with train.precision fp32, this "
                                                  "run asks for bf16; resume with fp32")):
        resume_case(straight, ["train.precision=bf16"])
    with pytest.raises(UserError, match=re.escape("saved with ZeRO stage (train.ds_config) 0, this run asks for 2")):
        resume_case(straight, ["train.ds_config=zero2"], zero_stage=2)
    with pytest.raises(UserError, match=re.escape(f"model.config differs from the one checkpoint {tag} was trained "
                                                  "with (hidden_size: 32 saved, 64 now)")):
        resume_case(straight, ["model.config.hidden_size=64"])
    resume_case(straight, ["train.max_steps=8"])   # a longer run continues


@pytest.mark.slow
def test_a_checkpoint_beyond_max_steps_is_an_error_and_one_at_max_steps_is_finished(straight):
    with pytest.raises(UserError, match=re.escape("is at step 6, beyond train.max_steps=4")):
        resume_case(straight, ["train.max_steps=4"])
    with pytest.raises(RunFinished, match=re.escape("is at train.max_steps=6, nothing to do")):
        resume_case(straight, [])
    before = snapshot(straight[1])
    proc = ts.train(straight[0], ["name=straight"], expect=0)
    assert "straight: finished: checkpoint" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    after = snapshot(straight[1])
    # Only the lock file names its newest holder; nothing else is written.
    assert {k: v for k, v in after.items() if k != "run.lock"} == {k: v for k, v in before.items() if k != "run.lock"}


# --------------------------------------------------------------------------- short eval sets


def test_an_eval_set_shorter_than_one_window_is_refused_at_start(world, tmp_path):
    prose_val = PreparedDataset(world["prose"], split="val").num_tokens
    cfg_path = ts.write_config(tmp_path / "run.yaml", world, tmp_path / "runs", name="short")
    cfg = config.load(cfg_path, [f"data.seq_len={prose_val}"])
    with pytest.raises(UserError) as err:
        open_session(cfg, DistEnv(0, 0, 1, "127.0.0.1", 0, "none"))
    assert str(err.value) == (f"eval.sets.prose ({world['prose']}, split val) has {prose_val} tokens, fewer than "
                              f"one window of data.seq_len + 1 = {prose_val + 1}; lower data.seq_len or use a "
                              "larger set")
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- the run-dir lock


@pytest.mark.slow
def test_a_second_start_on_a_running_run_dir_is_refused_naming_the_holder(world, tmp_path):
    cfg = ts.write_config(tmp_path / "run.yaml", world, tmp_path / "runs",
                          train={**STRAIGHT, "max_steps": 100000}, eval={"sets": {}})
    run_dir = tmp_path / "runs" / "locked"
    first = start(cfg, [], "locked")
    try:
        ts.wait_for_step(run_dir, 1, first, timeout=600)
        second = ts.train(cfg, ["name=locked"], expect=2)
        assert "Traceback" not in second.stderr, second.stderr[-3000:]
        assert f"cpt train: error: run dir {run_dir} is in use: pid {first.pid} on host " in second.stderr
        assert f"holds {run_dir / 'run.lock'}; wait for that run to end" in second.stderr
        assert not (run_dir / "config.prev1.yaml").exists()
        assert first.poll() is None
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 75, err[-3000:]
    newest = refs.resolve(run_dir)
    refs.verify(newest.path)
    assert [r["step"] for r in ts.train_records(run_dir)] == list(range(1, newest.step + 1))


# --------------------------------------------------------------------------- Ctrl-C, early signals


@pytest.mark.slow
def test_a_first_sigint_saves_and_exits_75_without_a_traceback(world, tmp_path):
    cfg = ts.write_config(tmp_path / "run.yaml", world, tmp_path / "runs",
                          train={**STRAIGHT, "max_steps": 100000}, eval={"sets": {}})
    run_dir = tmp_path / "runs" / "ctrl-c"
    proc = start(cfg, [], "ctrl-c")
    try:
        ts.wait_for_step(run_dir, 2, proc, timeout=600)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 75, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    step = refs.resolve(run_dir).step
    assert f"received SIGINT: saved a committed checkpoint at step {step}; " in err


def read_until(proc: subprocess.Popen, text: str, seen: list[str]) -> None:
    """Read the process's stderr line by line until a line holds `text` (fails if it ends first)."""
    for line in iter(proc.stderr.readline, ""):
        seen.append(line)
        if text in line:
            return
    raise AssertionError(f"no line with {text!r}:\n" + "".join(seen)[-3000:])


@pytest.mark.slow
def test_a_second_sigint_aborts_at_once(world, tmp_path):
    cfg = ts.write_config(tmp_path / "run.yaml", world, tmp_path / "runs", eval={"sets": {}})
    proc = start(cfg, [], "twice")
    seen: list[str] = []
    try:
        # DeepSpeed says this as it is imported: set-up (the engine, the data) has seconds to go
        read_until(proc, "Setting accelerator to CPU", seen)
        proc.send_signal(signal.SIGINT)
        read_until(proc, "cpt train: SIGINT: stopping at the next safe point", seen)
        proc.send_signal(signal.SIGINT)
        err = "".join(seen) + proc.stderr.read()
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGINT, err[-3000:]
    assert "cpt train: second SIGINT: aborting at once, without saving" in err
    assert "Traceback" not in err, err[-3000:]


# The first Ctrl-C came while the run trained, it saved and returned: a second one while the process ends
# (its teardown, what the caller does next) still aborts at once, saying so, not a KeyboardInterrupt.
AFTER_THE_RUN = ("import os, signal\n"
                 "from continual_pt.training import loop, stop\n"
                 "stop.process_request()   # as `cpt train` does first\n"
                 "def session(cfg, env, request):\n"
                 "    os.kill(os.getpid(), signal.SIGINT)   # the first Ctrl-C, during the run\n"
                 "    return 75\n"
                 "loop._run_session, loop.distributed.init = session, lambda: None\n"
                 "print('run returned', loop.run(None), flush=True)\n"
                 "os.kill(os.getpid(), signal.SIGINT)   # the second, as the process ends\n"
                 "print('never reached', flush=True)\n")


def test_a_second_sigint_after_the_run_returned_still_aborts_at_once_and_says_so():
    proc = subprocess.run([sys.executable, "-c", AFTER_THE_RUN], capture_output=True, text=True, timeout=120,
                          env=ts.env())
    assert proc.returncode == -signal.SIGINT, proc.stderr[-3000:]
    assert proc.stdout.endswith("run returned 75\n"), proc.stdout   # (after DeepSpeed's own import line)
    assert proc.stderr.endswith("cpt train: second SIGINT: aborting at once, without saving (the last committed "
                                "checkpoint is intact)\n"), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "KeyboardInterrupt" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow
def test_a_sigterm_during_set_up_exits_75_once_set_up_ends(world, tmp_path):
    cfg = ts.write_config(tmp_path / "run.yaml", world, tmp_path / "runs", eval={"sets": {}})
    proc = start(cfg, [], "early")
    time.sleep(2.0)                       # importing torch and DeepSpeed
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 75, err[-3000:]
    assert f"received SIGTERM during set-up: {NOTHING_TO_SAVE}" in err
    run_dir = tmp_path / "runs" / "early"
    assert refs.list_tags(run_dir / "checkpoints") == []
    assert ts.train_records(run_dir) == []


# --------------------------------------------------------------------------- a stop during an eval


@pytest.mark.slow
def test_a_final_eval_cut_short_is_made_by_the_next_start(world, tmp_path):
    """SIGTERM during the eval of the last step: the run commits and exits 75; the next start makes that eval
    (it said 'finished' and never made it, so reports showed an earlier loss as the final one)."""
    long_eval = {"sets": {"code": {"path": str(world["code"]), "split": "train"},
                          "prose": {"path": str(world["prose"]), "split": "train"}},
                 "tokens": 10**9, "micro_batch_size": 1, "every_steps": 4, "at_start": False}
    cfg = ts.write_config(tmp_path / "run.yaml", world, tmp_path / "runs", train={**STRAIGHT, "max_steps": 4},
                          eval=long_eval)
    run_dir = tmp_path / "runs" / "final"
    proc = start(cfg, [], "final")
    try:
        ts.wait_for_step(run_dir, 4, proc, timeout=600)   # the step-4 record comes just before its eval starts
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 75, err[-3000:]
    assert "step 4: eval interrupted by SIGTERM" in err and refs.resolve(run_dir).step == 4, err[-3000:]
    assert ts.train_records(run_dir, "eval") == []
    again = subprocess.run(ts.train_command(cfg, ["name=final", "eval.tokens=64"]), env=ts.env(),
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "finished" not in again.stderr, again.stderr[-3000:]
    assert sorted((r["set"], r["step"], r["eval_tokens"]) for r in ts.train_records(run_dir, "eval")) == \
        [("code", 4, 64), ("prose", 4, 64)]
    assert [r["step"] for r in ts.train_records(run_dir)] == [1, 2, 3, 4]   # no step trained twice
    assert refs.resolve(run_dir).step == 4 and len(refs.list_tags(run_dir / "checkpoints")) == 1
    cfg_done = config.load(cfg, ["name=final", "eval.tokens=64"])
    with pytest.raises(RunFinished):
        check_resume(cfg_done, Start("resume", refs.resolve(run_dir)), 0)


@pytest.mark.slow
def test_a_sigterm_during_a_long_eval_commits_within_seconds_and_resumes_to_the_same_numbers(world, tmp_path,
                                                                                           straight):
    long_eval = {"sets": {"code": {"path": str(world["code"]), "split": "train"},
                          "prose": {"path": str(world["prose"]), "split": "train"}},
                 "tokens": 10**9, "micro_batch_size": 1, "every_steps": 4, "at_start": False}
    cfg = ts.write_config(tmp_path / "run.yaml", world, tmp_path / "runs", train=STRAIGHT, eval=long_eval)
    run_dir = tmp_path / "runs" / "cut"
    proc = start(cfg, [], "cut")
    try:
        ts.wait_for_step(run_dir, 4, proc, timeout=600)   # the step-4 record comes just before its eval starts
        time.sleep(0.5)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
        exited = time.monotonic() - sent
    finally:
        proc.kill()
    assert proc.returncode == 75, err[-3000:]
    assert "step 4: eval interrupted by SIGTERM (stopped after " in err, err[-3000:]
    committed = re.search(r"received SIGTERM: saved a committed checkpoint at step 4; (\d+\.\d) s after the signal",
                          err)
    assert committed, err[-3000:]
    print(f"signal -> committed checkpoint {committed.group(1)} s; signal -> exit {exited:.1f} s")
    assert float(committed.group(1)) < 5.0
    assert ts.train_records(run_dir, "eval") == []
    assert refs.resolve(run_dir).step == 4
    ts.train(cfg, ["name=cut", "eval.tokens=64"])
    ra, rb = ts.train_records(straight[1]), ts.train_records(run_dir)
    assert [r["step"] for r in rb] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb]
    assert [r["grad_norm"] for r in ra] == [r["grad_norm"] for r in rb]
