"""launch/slurm/*.sbatch on a real one-node SLURM cluster (tests/slurm_cluster.py): jobs that finish,
are preempted and requeue themselves, fail without requeueing and train two ranks under srun; each
compared with the same run started directly (eval arrays: tests/test_eval_array.py)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests import train_support as ts
from tests.helpers import REPO
from tests.slurm_cluster import FINAL_STATES

TRAIN = REPO / "launch" / "slurm" / "train.sbatch"
EVAL = REPO / "launch" / "slurm" / "eval.sbatch"
STEPS = 300   # long enough (about 10 ms a step) for signals to land mid-run, well after a start


def test_launch_scripts_lint():
    """Every shell script of the repository (launch/, configs/, CI) parses (bash -n) and passes shellcheck."""
    scripts = sorted(p for folder in ("launch", "configs", "benchmarks", "tests", ".ci") for p in
                     (REPO / folder).rglob("*") if p.suffix in (".sh", ".sbatch") or p == REPO / ".ci" / "run")
    assert TRAIN in scripts and EVAL in scripts and REPO / "configs" / "quickstart" / "run.sh" in scripts
    for script in scripts:
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script}: {proc.stderr}"
    if shutil.which("shellcheck") is None:
        if os.environ.get("CPT_REQUIRE_SLURM") == "1":
            pytest.fail("shellcheck is not installed (apt-get install shellcheck) and CPT_REQUIRE_SLURM=1")
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    proc = subprocess.run(["shellcheck", "--shell=bash", *map(str, scripts)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def job_env(cfg: Path, name: str) -> dict[str, str]:
    return {"CONFIG": str(cfg), "NAME": name, "PYTHON": sys.executable, "PYTHONPATH": str(REPO),
            "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def submit_train(slurm, tmp_path: Path, cfg: Path, name: str, overrides: list[str] = (),
                 tasks: int = 1, env: dict[str, str] | None = None) -> tuple[str, Path]:
    """train.sbatch as a user submits it, its header's GPU layout overridden for this CPU node."""
    log = tmp_path / f"{name}.log"
    options = [f"--output={log}", "--nodes=1", f"--ntasks-per-node={tasks}", "--gpus-per-node=0",
               "--cpus-per-task=1", "--time=30"]
    return slurm.submit(TRAIN, options, list(overrides), env={**job_env(cfg, name), **(env or {})},
                        cwd=tmp_path), log


def last_step(run_dir: Path) -> int:
    records = ts.train_records(run_dir) if (run_dir / "metrics.jsonl").exists() else []
    return records[-1]["step"] if records else 0


def wait_until(slurm, job: str, log: Path, what: str, done, timeout: float = 180) -> None:
    """Poll until `done(record)` holds for the job's record; fail with the logs if it ends first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        record = slurm.job(job)
        if done(record):
            return
        if record["JobState"] in FINAL_STATES:
            raise AssertionError(slurm.report(job, f"job ended before {what}", log))
        time.sleep(0.05)
    raise AssertionError(slurm.report(job, f"not {what} after {timeout} s", log))


def running_past(run_dir: Path, step: int, restarts: int):
    """Start number `restarts` of the job is running and has logged a step above `step`."""
    return lambda r: (r["JobState"], r["Restarts"]) == ("RUNNING", str(restarts)) and last_step(run_dir) > step


@pytest.fixture(scope="module")
def long_run(world, tmp_path_factory):
    """A 300-step config (checkpoints every 100 steps) and the run it gives when started directly."""
    root = tmp_path_factory.mktemp("slurm_runs")
    cfg = ts.write_config(root / "run.yaml", world, root / "runs",
                          train={"max_steps": STEPS, "micro_batch_size": 2, "grad_accum": 2, "precision": "fp32",
                                 "ds_config": "zero0", "log_every": 1},
                          eval={"sets": {}}, checkpoint={"every_steps": 100, "keep_last": 10})
    train_one_thread(cfg, ["name=direct"])
    return cfg, root / "runs" / "direct"


def train_one_thread(cfg: Path, overrides: list[str], world_size: int = 1) -> None:
    """ts.train with OMP_NUM_THREADS=1, as the jobs run (the thread count changes float sums)."""
    previous = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        ts.train(cfg, overrides, world_size)
    finally:
        os.environ.pop("OMP_NUM_THREADS") if previous is None else os.environ.update(OMP_NUM_THREADS=previous)


def assert_same_run(reference: Path, run_dir: Path, steps: int) -> None:
    ra, rb = ts.train_records(reference), ts.train_records(run_dir)
    assert [r["step"] for r in rb] == list(range(1, steps + 1))
    for key in ("loss", "lr", "tokens", "grad_norm"):
        assert [r[key] for r in ra] == [r[key] for r in rb], key
    wa, wb = ts.final_weights(reference), ts.final_weights(run_dir)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def start_lines(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if "train.sbatch job" in line and ": start on " in line]


def starts(log: Path) -> list[str]:
    """The log of each start of the job, in order."""
    text, lines = log.read_text(), start_lines(log)
    cuts = [text.index(line) for line in lines] + [len(text)]
    return [text[a:b] for a, b in zip(cuts, cuts[1:])]


@pytest.mark.slow
def test_training_job_runs_to_completion_like_a_direct_run(slurm, long_run, tmp_path):
    cfg, reference = long_run
    job, log = submit_train(slurm, tmp_path, cfg, "batch")
    slurm.wait(job, timeout=240, log=log)
    record = slurm.job(job)
    assert (record["JobState"], record["Restarts"], record["ExitCode"]) == ("COMPLETED", "0", "0:0"), \
        slurm.report(job, "not completed at the first start", log)
    lines = start_lines(log)
    assert len(lines) == 1 and f"start on {slurm.node}, restart 0," in lines[0], log.read_text()
    assert "run finished" in log.read_text()
    assert_same_run(reference, Path(cfg.parent) / "runs" / "batch", STEPS)


def committed_steps(run_dir: Path) -> list[int]:
    from continual_pt.checkpoint import refs

    return [r.step for r in refs.list_committed(run_dir / "checkpoints")]


@pytest.mark.slow
def test_preempted_job_requeues_itself_and_ends_bitwise_like_an_uninterrupted_run(slurm, long_run, tmp_path):
    """Stopped twice mid-run: by the time-limit signal and by `scontrol requeue`.

    The time-limit signal is sent as `scancel --signal=USR1 <job>`, exactly what slurmctld sends for
    `--signal=USR1@T` (the step form: every rank of the running steps, not the batch shell). The real
    `--time` + `--signal` is not used: --time is at least a minute, slurmctld sends the signal on its
    periodic time-limit check (measured on 22.05: 4-11 s into a one-minute job with USR1@50, up to a
    minute early), and a requeued job's clock restarts, so every start would be signalled again at a
    moment no test controls.
    """
    cfg, reference = long_run
    run_dir = cfg.parent / "runs" / "preempted"
    job, log = submit_train(slurm, tmp_path, cfg, "preempted")
    wait_until(slurm, job, log, "past step 20", running_past(run_dir, 20, restarts=0))
    slurm.run("scancel", "--signal=USR1", job)
    wait_until(slurm, job, log, "requeued", lambda r: r["Restarts"] == "1")
    first_stop = committed_steps(run_dir)[-1]   # the next start saves nothing before it is past it
    wait_until(slurm, job, log, "resumed", running_past(run_dir, first_stop + 20, restarts=1))
    slurm.run("scontrol", "requeue", job)
    slurm.wait(job, timeout=240, log=log)
    text = log.read_text()
    record = slurm.job(job)
    assert (record["JobState"], record["Restarts"], record["ExitCode"]) == ("COMPLETED", "2", "0:0"), \
        slurm.report(job, "not completed after two restarts", log)
    lines = start_lines(log)
    assert [line.split(", restart ")[1].split(",")[0] for line in lines] == ["0", "1", "2"], text
    assert all(f"start on {slurm.node}," in line for line in lines), text
    assert "received SIGUSR1" in text and "received SIGTERM" in text, text
    stops = [s for s in committed_steps(run_dir) if s % 100]
    assert len(stops) == 2 and 20 < stops[0] == first_stop < stops[1] < STEPS, (stops, text)
    # Each stop says once what happened and what comes next, and SLURM's requeue notice is called expected.
    by_itself, from_outside = starts(log)[:2]
    said = by_itself.find(f"stopped with a committed checkpoint: requeueing the job; it will resume from step "
                          f"{first_stop} (restart 1)")
    expected = by_itself.find("that SLURM may print next is expected: it ends this start of the job for the requeue")
    notice = by_itself.find("DUE TO JOB REQUEUE ***")   # SLURM's, when it is printed before this start ends
    assert 0 <= said < expected and (notice == -1 or expected < notice), by_itself
    assert "DUE TO JOB REQUEUE ***" in from_outside, from_outside
    assert (f"the job is being requeued by SLURM (its line 'CANCELLED ... DUE TO JOB REQUEUE' is this requeue, "
            f"expected); it will resume from step {stops[1]} (restart 2)") in from_outside, from_outside
    for wrong in ("resubmit", "scancel", "time limit", "not requeued"):
        assert wrong not in text, (wrong, text)
    times = [r["time"] for r in ts.train_records(run_dir)]
    gaps = [i + 1 for i in range(len(times) - 1) if times[i + 1] - times[i] > 5]
    assert gaps == stops, (gaps, stops)   # steps after each stop come from a new start, seconds later
    assert_same_run(reference, run_dir, STEPS)


@pytest.mark.slow
def test_a_config_error_fails_the_job_without_requeue(slurm, long_run, tmp_path):
    cfg, _ = long_run
    job, log = submit_train(slurm, tmp_path, cfg, "bad", ["train.no_such_key=1"])
    slurm.wait(job, timeout=120, log=log)
    record = slurm.job(job)
    assert (record["JobState"], record["Restarts"], record["ExitCode"]) == ("FAILED", "0", "2:0"), \
        slurm.report(job, "not a plain failure", log)
    text = log.read_text()
    assert "error: invalid configuration" in text and "train.no_such_key: unknown key" in text, text
    assert "run failed (status 2): not requeued" in text, text
    assert len(start_lines(log)) == 1, text


@pytest.mark.slow
def test_a_stop_past_the_requeue_cap_is_not_requeued(slurm, long_run, tmp_path):
    cfg, _ = long_run
    run_dir = cfg.parent / "runs" / "capped"
    job, log = submit_train(slurm, tmp_path, cfg, "capped", env={"MAX_REQUEUES": "0"})
    wait_until(slurm, job, log, "past step 20", running_past(run_dir, 20, restarts=0))
    slurm.run("scancel", "--signal=USR1", job)
    slurm.wait(job, timeout=120, log=log)
    record = slurm.job(job)
    assert (record["JobState"], record["Restarts"], record["ExitCode"]) == ("FAILED", "0", "75:0"), \
        slurm.report(job, "not stopped for good", log)
    text = log.read_text()
    assert "after 0 restart(s), the most MAX_REQUEUES allows: not requeued; resubmit to resume" in text, text
    # The signal's own save is the last checkpoint, wherever the run had got to (a loaded machine can
    # pass the step-100 save between the poll that saw step 20 and the signal).
    saved = re.findall(r"received SIGUSR1: saved a committed checkpoint at step (\d+)", text)
    assert len(saved) == 1 and 20 < int(saved[0]) == committed_steps(run_dir)[-1] < STEPS, text
    assert f"resubmit to resume from step {saved[0]}" in text and len(start_lines(log)) == 1, text


@pytest.mark.slow
def test_two_srun_ranks_train_like_the_deepspeed_launcher(slurm, world, tmp_path):
    cfg = ts.write_config(tmp_path / "run.yaml", world, tmp_path / "runs", eval={"sets": {}})
    train_one_thread(cfg, ["name=deepspeed"], world_size=2)
    job, log = submit_train(slurm, tmp_path, cfg, "srun", tasks=2)
    slurm.wait(job, timeout=240, log=log)
    record = slurm.job(job)
    assert (record["JobState"], record["ExitCode"], record["NumTasks"]) == ("COMPLETED", "0:0", "2"), \
        slurm.report(job, "the 2-task job did not complete", log)
    assert "world size 2 (srun)" in log.read_text(), log.read_text()
    assert_same_run(tmp_path / "runs" / "deepspeed", tmp_path / "runs" / "srun", 12)
