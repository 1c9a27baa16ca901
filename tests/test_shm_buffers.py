"""DeepSpeed's shared-memory all-reduce buffers leave nothing in /dev/shm, however a 2-rank job ends.

Each rank of a one-machine CPU job maps a ~69 MB `/dev/shm/deepspeed_allreduce_buffer_*` per rank;
DeepSpeed never removes them, so before `runtime.shm_buffers` every run left them behind. The
checks look only at the names of this test's own job (its port), never at other jobs' buffers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from continual_pt.runtime import shm_buffers
from tests import train_support as ts
from tests.helpers import free_port

pytestmark = pytest.mark.slow

ADDR = "127.0.0.1"   # the deepspeed runner's MASTER_ADDR for a one-machine job


def job(world, tmp_path: Path, name: str, max_steps: int) -> tuple[list[str], dict[str, str], int]:
    """A 2-rank `deepspeed` job on a port of its own: the command, its environment, the port."""
    cfg = ts.write_config(tmp_path / "run.yaml", world, tmp_path / "runs",
                          train={"max_steps": max_steps, "micro_batch_size": 2, "grad_accum": 1,
                                 "precision": "fp32", "ds_config": "zero1", "log_every": 1},
                          schedule={"name": "cosine", "max_lr": 3.0e-3, "warmup": 1}, eval={"sets": {}})
    port = free_port()
    e = ts.env()
    e["PATH"] = str(Path(sys.executable).parent) + os.pathsep + e.get("PATH", "")
    e["OMP_NUM_THREADS"] = "1"
    command = ["deepspeed", "--num_gpus", "2", "--master_port", str(port), "--module", "continual_pt.train",
               "--config", str(cfg), f"name={name}"]
    return command, e, port


def linked(port: int) -> list[str]:
    return [p.name for p in shm_buffers.job_buffers(ADDR, port)]


def forget(port: int) -> None:
    """Remove what a failed check left (this test's own job only, which has ended)."""
    for path in shm_buffers.job_buffers(ADDR, port):
        path.unlink(missing_ok=True)


def rank_pids(name: str) -> list[int]:
    """The pids of the job's ranks (python processes whose arguments hold `name={name}` and a rank)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0") if proc.name.isdigit() else []
        except OSError:
            continue
        if f"name={name}".encode() in args and any(a.startswith(b"--local_rank=") for a in args):
            found.append(int(proc.name))
    return sorted(found)


def mapped_buffers(pid: int) -> set[str]:
    """The /dev/shm all-reduce buffers `pid` maps, as the kernel shows them (' (deleted)' once unlinked)."""
    lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return {line.split(None, 5)[5] for line in lines
            if len(line.split(None, 5)) == 6 and shm_buffers.PREFIX in line.split(None, 5)[5]}


def test_a_clean_2_rank_run_leaves_no_buffer(world, tmp_path):
    command, e, port = job(world, tmp_path, "clean", max_steps=2)
    try:
        done = subprocess.run(command, env=e, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-4000:]
        assert linked(port) == []
    finally:
        forget(port)


def test_buffers_are_unlinked_while_mapped_so_a_killed_rank_leaves_none(world, tmp_path):
    """While the job trains, every rank maps both ranks' buffers, already unlinked; SIGKILL one rank
    (no exit path of its own runs), let the runner end the other, and nothing is left."""
    command, e, port = job(world, tmp_path, "killed", max_steps=1000)
    proc = subprocess.Popen(command, env=e, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        ts.wait_for_step(tmp_path / "runs" / "killed", 2, proc)
        pids = rank_pids("killed")
        assert len(pids) == 2, pids
        expected = {f"{shm_buffers.SHM_DIR / shm_buffers.buffer_name(ADDR, port, r)} (deleted)" for r in (0, 1)}
        assert [mapped_buffers(pid) for pid in pids] == [expected, expected]
        assert linked(port) == []
        os.kill(pids[1], signal.SIGKILL)
        proc.wait(timeout=120)
        assert proc.returncode != 0
        deadline = time.time() + 60
        while rank_pids("killed") and time.time() < deadline:
            time.sleep(0.2)
        assert rank_pids("killed") == []
        assert linked(port) == []
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)   # the runner and any rank still in its session
        except ProcessLookupError:
            pass
        proc.wait()
        forget(port)
