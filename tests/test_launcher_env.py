"""Which launcher started a rank, and where its rendezvous is, from the environment alone."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from continual_pt.runtime import distributed
from continual_pt.runtime.distributed import first_host, slurm_port
from tests.helpers import REPO, free_port

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK", "DS_ACCELERATOR",
               "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_STEP_ID",
               "SLURM_LOCALID", "SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST",
               "SLURM_STEP_RESV_PORTS")


@pytest.fixture
def launched(monkeypatch, tmp_path):
    """Set a launcher's variables on a clean slate; no scontrol on PATH; MPI discovery replaced by a marker."""
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(distributed, "_mpi_env", lambda: "mpi")

    def set_vars(**values):
        for name, value in values.items():
            monkeypatch.setenv(name, str(value))
        return distributed.detect()
    return set_vars


SRUN = dict(SLURM_NTASKS=2, SLURM_PROCID=1, SLURM_LOCALID=1, SLURM_STEP_ID=0, SLURM_JOB_ID=4242,
            SLURM_STEP_NODELIST="gpu[001-004]")


@pytest.mark.parametrize("pmi", [{}, {"PMI_SIZE": 2}, {"PMIX_SIZE": 2}], ids=["plain", "pmi2", "pmix"])
def test_srun_tasks_are_srun_ranks_even_with_pmi_variables(launched, pmi):
    env = launched(**SRUN, **pmi)
    assert (env.launcher, env.rank, env.local_rank, env.world_size) == ("srun", 1, 1, 2)
    assert env.master_addr == "gpu001"              # from the node list, without scontrol
    assert env.master_port == slurm_port({"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0"})


def test_an_mpi_launcher_inside_an_allocation_is_mpi(launched):
    assert launched(**SRUN, PMI_SIZE=8) == "mpi"                    # hydra's ranks, not srun's tasks
    assert launched(OMPI_COMM_WORLD_SIZE=2, **SRUN) == "mpi"        # Open MPI's mpirun, started by srun
    assert launched(PMI_SIZE=2) == "mpi"                            # MPICH's mpirun outside SLURM


def test_torch_style_variables_come_first(launched):
    env = launched(**SRUN, RANK=0, WORLD_SIZE=2, MASTER_ADDR="10.0.0.1", MASTER_PORT=1234)
    assert (env.launcher, env.rank, env.master_addr, env.master_port) == ("torchrun", 0, "10.0.0.1", 1234)


@pytest.mark.parametrize("nodelist, host", [
    ("gpu[001-004]", "gpu001"), ("gpu[007-010,12],cpu1", "gpu007"), ("node-[07,09]", "node-07"),
    ("a1,b2", "a1"), ("single", "single"), ("rack[1-2]-node[01-04]", "rack1-node01"), ("n[5]", "n5"),
])
def test_the_first_host_of_a_node_list(nodelist, host):
    assert first_host(nodelist) == host


def test_two_steps_of_one_job_get_different_ports_and_reserved_ports_win():
    ports = {slurm_port({"SLURM_JOB_ID": "77", "SLURM_STEP_ID": str(step)}) for step in range(4)}
    assert len(ports) == 4 and all(1024 < p < 65536 for p in ports)
    assert slurm_port({"SLURM_JOB_ID": "77", "SLURM_STEP_RESV_PORTS": "12011-12015"}) == 12011
    assert slurm_port({"SLURM_JOB_ID": "77", "SLURM_STEP_RESV_PORTS": "12020"}) == 12020


# A rank that has joined a process group ends without the interpreter's teardown (a gloo worker
# releasing its last collective's tensors then aborted the process after its last commit), and a
# Ctrl-C that reaches it while its exit functions run is ignored (it printed a KeyboardInterrupt).
ENDED = ("import atexit, os, sys, torch, torch.distributed as dist\n"
         "from continual_pt.cli import ended, main\n"
         "sys.stdout.write(f'without a group ended(3) returns {ended(3)}; ')\n"
         "os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=sys.argv[1], RANK='0', WORLD_SIZE='1')\n"
         "dist.init_process_group('gloo')\n"
         "dist.all_reduce(torch.ones(2))\n"
         "atexit.register(lambda: print(' exit functions ran', flush=True))\n"
         "atexit.register(lambda: os.kill(os.getpid(), __import__('signal').SIGINT))\n"   # a late Ctrl-C
         "status = main(['schedule', 'show', '--spec', 'name=constant max_lr=1e-3', '--steps', '4'])\n"
         "sys.stdout.write(f'main returned {status}; buffered')\n"   # main in a process of the caller's returns
         "ended(75)\n"
         "print('never reached')\n")


def test_a_rank_ends_with_its_status_after_its_exit_functions_and_with_its_output_flushed():
    proc = subprocess.run([sys.executable, "-c", ENDED, str(free_port())], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 75, proc.stderr[-3000:]
    # (DeepSpeed's import may print a line of its own in between)
    assert proc.stdout.startswith("without a group ended(3) returns 3; "), proc.stdout
    assert "main returned 0; buffered" in proc.stdout and proc.stdout.endswith(" exit functions ran\n"), proc.stdout
    assert "KeyboardInterrupt" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
