"""launch/slurm/*.sbatch on a real one-node SLURM cluster (tests/slurm_cluster.py): jobs that finish,
are preempted and requeue themselves, fail without requeueing, score checkpoints as an array and
train two ranks under srun; each compared with the same run started directly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests import train_support as ts
from tests.helpers import REPO
from tests.slurm_cluster import slurm  # noqa: F401  (the session fixture)

TRAIN = REPO / "launch" / "slurm" / "train.sbatch"
EVAL = REPO / "launch" / "slurm" / "eval.sbatch"
STEPS = 300   # long enough (about 10 ms a step) for signals to land mid-run, well after a start


def test_launch_scripts_lint():
    """Every launch script parses (bash -n) and passes shellcheck."""
    scripts = sorted(REPO.glob("launch/**/*.sh")) + sorted(REPO.glob("launch/**/*.sbatch"))
    assert TRAIN in scripts and EVAL in scripts
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
                 tasks: int = 1) -> tuple[str, Path]:
    """train.sbatch as a user submits it, its header's GPU layout overridden for this CPU node."""
    log = tmp_path / f"{name}.log"
    options = [f"--output={log}", "--nodes=1", f"--ntasks-per-node={tasks}", "--gpus-per-node=0",
               "--cpus-per-task=1", "--time=30"]
    return slurm.submit(TRAIN, options, list(overrides), env=job_env(cfg, name), cwd=tmp_path), log


def last_step(run_dir: Path) -> int:
    records = ts.train_records(run_dir) if (run_dir / "metrics.jsonl").exists() else []
    return records[-1]["step"] if records else 0


def wait_running_past(slurm, job: str, log: Path, run_dir: Path, step: int, restarts: int,
                      timeout: float = 180) -> None:
    """Wait until start number `restarts` of the job has logged a step above `step`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        record = slurm.job(job)
        if record["JobState"] in slurm_final_states():
            raise AssertionError(slurm.report(job, f"job ended before step {step}", log))
        if int(record["Restarts"]) == restarts and record["JobState"] == "RUNNING" and last_step(run_dir) > step:
            return
        time.sleep(0.05)
    raise AssertionError(slurm.report(job, f"no step above {step} on restart {restarts} in {timeout} s", log))


def slurm_final_states() -> set[str]:
    from tests.slurm_cluster import FINAL_STATES

    return FINAL_STATES


@pytest.fixture(scope="module")
def long_run(world, tmp_path_factory):
    """A 300-step config (checkpoints every 100 steps) and the run it gives when started directly."""
    root = tmp_path_factory.mktemp("slurm_runs")
    cfg = ts.write_config(root / "run.yaml", world, root / "runs",
                          train={"max_steps": STEPS, "micro_batch_size": 2, "grad_accum": 2, "precision": "fp32",
                                 "ds_config": "zero0", "log_every": 1},
                          eval={"sets": {}}, checkpoint={"every_steps": 100, "keep_last": 10})
    previous = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        ts.train(cfg, ["name=direct"])
    finally:
        os.environ.pop("OMP_NUM_THREADS") if previous is None else os.environ.update(OMP_NUM_THREADS=previous)
    return cfg, root / "runs" / "direct"


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
