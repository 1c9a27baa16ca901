"""The signal contract under every launcher: a stop signal to the job saves a committed checkpoint
on every rank, the job exits 75, and running it again resumes to the numbers of a run never stopped.

The launchers themselves do not keep this contract (the `deepspeed` runner dies on SIGTERM and leaves
its ranks training, torchrun reports a rank's 75 as 1, mpirun ends before its ranks have committed),
so the job is `cpt launch -- <launcher>` (launch/mpi.sh for mpirun), and the signals go to it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from continual_pt import layout
from continual_pt.checkpoint import refs
from tests import train_support as ts
from tests.helpers import REPO, free_port

pytestmark = pytest.mark.slow

MAX_STEPS = 100   # room for a stop's latency (a fraction of a second) at ~30 ms a step


def launcher_env() -> dict[str, str]:
    e = ts.env()
    e["PATH"] = str(Path(sys.executable).parent) + os.pathsep + e.get("PATH", "")
    e["OMP_NUM_THREADS"] = "1"
    return e


def job_command(launcher: str, cfg: Path, name: str) -> list[str]:
    """The command a user runs for a 2-rank job under `launcher`."""
    train = ["--config", str(cfg), f"name={name}"]
    cpt = [sys.executable, "-m", "continual_pt.cli", "launch", "--"]
    if launcher == "deepspeed":
        return [*cpt, "deepspeed", "--num_gpus", "2", "--master_port", str(free_port()),
                "--module", "continual_pt.train", *train]
    if launcher == "torchrun":
        return [*cpt, "torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()),
                "-m", "continual_pt.train", *train]
    if launcher == "mpirun":
        return ["bash", str(REPO / "launch" / "mpi.sh"), f"name={name}"]
    raise ValueError(launcher)


def mpi_env(cfg: Path) -> dict[str, str]:
    e = launcher_env()
    e.update(CONFIG=str(cfg), NP="2", PYTHON=sys.executable,
             MPIRUN_ARGS="--allow-run-as-root --oversubscribe")
    return e


def stop_job(launcher: str, cfg: Path, run_dir: Path, sig: signal.Signals, after_step: int) -> int:
    """Start the job, signal it past `after_step`, expect 75 and a checkpoint at the last step trained."""
    e = mpi_env(cfg) if launcher == "mpirun" else launcher_env()
    proc = subprocess.Popen(job_command(launcher, cfg, run_dir.name), env=e, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    ts.wait_for_step(run_dir, after_step, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 75, f"exit {proc.returncode}\n{out[-3000:]}\n{err[-5000:]}"
    assert "received a stop request" in err and "exit status 75" in err, err[-3000:]
    ref = refs.newest_committed(run_dir / "checkpoints")
    trained = ts.train_records(run_dir)[-1]["step"]
    assert ref.step == trained, f"checkpoint at {ref.step}, last step trained {trained}"
    assert after_step <= ref.step < MAX_STEPS
    assert not (run_dir / layout.STOP).exists() and not (run_dir / layout.STOP_DONE).exists()
    return ref.step


@pytest.fixture(scope="module")
def straight(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("launchers")
    cfg = ts.write_config(root / "run.yaml", world, root / "runs",
                          train={"max_steps": MAX_STEPS, "micro_batch_size": 2, "grad_accum": 2,
                                 "precision": "fp32", "ds_config": "zero1", "log_every": 1},
                          eval={"sets": {}})
    # The same environment as the jobs (one thread per rank): CPU matmuls round by thread count.
    # Trained in the background, alongside the first test's jobs; `.result()` waits for it.
    pool = ThreadPoolExecutor(max_workers=1)
    done = pool.submit(subprocess.run, ts.train_command(cfg, ["name=straight"], 2, "deepspeed"), env=launcher_env(),
                       capture_output=True, text=True, timeout=300)
    pool.shutdown(wait=False)
    yield cfg, root / "runs", done
    done.exception()   # not left training past the module, whatever failed


def straight_records(done: Future, runs: Path) -> tuple[list[dict], dict]:
    """The uninterrupted run's train records and final weights, once it has finished."""
    assert done.result().returncode == 0, done.result().stderr[-4000:]
    return ts.train_records(runs / "straight"), ts.final_weights(runs / "straight")


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun", "mpirun"])
def test_sigterm_then_sigusr1_to_the_job_commit_exit_75_and_resume_exactly(straight, launcher):
    cfg, runs, straight_done = straight
    run_dir = runs / launcher
    first = stop_job(launcher, cfg, run_dir, signal.SIGTERM, after_step=3)
    second = stop_job(launcher, cfg, run_dir, signal.SIGUSR1, after_step=first + 3)
    assert first < second
    e = mpi_env(cfg) if launcher == "mpirun" else launcher_env()
    done = subprocess.run(job_command(launcher, cfg, launcher), env=e, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    (ra, wa), rb = straight_records(straight_done, runs), ts.train_records(run_dir)
    assert [r["step"] for r in rb] == list(range(1, MAX_STEPS + 1))
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb]
    assert [r["lr"] for r in ra] == [r["lr"] for r in rb]
    wb = ts.final_weights(run_dir)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def processes_running(needle: str) -> list[int]:
    """Pids whose command line holds `needle`."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and needle.encode() in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.mark.parametrize("launcher, sig", [("deepspeed", signal.SIGTERM), ("torchrun", signal.SIGUSR1)])
def test_ranks_whose_bare_launcher_dies_save_and_exit_instead_of_training_on(straight, launcher, sig):
    """Without cpt launch: the deepspeed runner dies on SIGTERM, torchrun on SIGUSR1, at once. Their
    ranks notice within a second, commit the step they reached and exit (no orphans train on)."""
    cfg, runs, _ = straight
    name = f"bare-{launcher}"
    run_dir = runs / name
    command = job_command(launcher, cfg, name)[5:]          # without `cpt launch --`
    proc = subprocess.Popen(command, env=launcher_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    ts.wait_for_step(run_dir, 3, proc)
    proc.send_signal(sig)
    proc.wait(timeout=30)
    assert proc.returncode == -sig                           # the launcher itself just dies
    deadline = time.time() + 120
    while processes_running(f"name={name}") and time.time() < deadline:
        time.sleep(0.2)
    assert not processes_running(f"name={name}"), "ranks still running after their launcher died"
    ref = refs.newest_committed(run_dir / "checkpoints")
    assert ref is not None and ref.step == ts.train_records(run_dir)[-1]["step"] < MAX_STEPS
    err = proc.stderr.read()                                 # the ranks wrote to the launcher's stderr
    assert "received the launcher's exit" in err and "saved a committed checkpoint" in err, err[-3000:]
