"""Process-group set-up under every launcher: deepspeed, torchrun, srun, mpirun (mpi4py), or none.

Each launcher announces ranks differently; `detect()` reads whichever is present and
`init()` turns it into the environment torch.distributed expects, then starts DeepSpeed's
communication backend (nccl on GPUs, gloo on the CPU), building the ops it needs first under a
lock that a killed start cannot leave behind (see `runtime.ops`).

Ranks agree on host values (a stop flag, a non-finite loss, a failed save) over a gloo group of
their own beside nccl: a flag then travels between CPUs and never queues behind the GPU's work, so
agreeing on it is no device sync in the step.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn, TypeVar

import deepspeed
import torch
import torch.distributed as dist

from continual_pt.errors import UserError
from continual_pt.runtime import ops, shm_buffers

_HOST_GROUP: dist.ProcessGroup | None = None   # gloo beside nccl; None: the default group (already gloo)


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    launcher: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _int_env(*names: str) -> int | None:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return int(value)
    return None


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list, read without scontrol: "gpu[007-010,12],cpu1" -> "gpu007"."""
    host, depth, chosen = [], 0, False
    for ch in nodelist.strip():
        if ch == "," and depth == 0:
            break
        if ch == "[":
            depth, chosen = depth + 1, False
        elif ch == "]":
            depth -= 1
        elif depth == 0:
            host.append(ch)
        elif not chosen and ch not in ",-":
            host.append(ch)          # the digits of the first range's start (zero padding kept)
        elif not chosen:
            chosen = True            # the range or list goes on past its first value
    return "".join(host)


def _slurm_master() -> str:
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "")
    if not nodelist:
        return "127.0.0.1"
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()
        return out[0] if out else first_host(nodelist)
    except (OSError, subprocess.SubprocessError):
        return first_host(nodelist)   # no scontrol on this node


def slurm_port(env: dict[str, str] | None = None) -> int:
    """A rendezvous port every task of one job step agrees on without talking.

    The step's reserved ports when SLURM hands them out (MpiParams=ports=...), otherwise one derived
    from the job and step ids, so two steps of one job running at once do not collide.
    """
    env = os.environ if env is None else env
    reserved = env.get("SLURM_STEP_RESV_PORTS", "")
    if reserved:
        return int(reserved.split(",")[0].split("-")[0])
    job = int(env.get("SLURM_JOB_ID") or 0)
    step = int(env.get("SLURM_STEP_ID") or 0) % 1000
    return 20000 + (job * 1000 + step) % 40000


def _mpi_env() -> DistEnv:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    local_rank = local.Get_rank()
    local.Free()
    if rank == 0:
        addr = os.environ.get("MASTER_ADDR") or socket.gethostbyname(socket.gethostname())
        port = int(os.environ.get("MASTER_PORT") or _free_port())
    else:
        addr, port = None, None
    addr, port = comm.bcast((addr, port), root=0)
    return DistEnv(rank, local_rank, size, addr, port, "mpirun")


def detect() -> DistEnv:
    """Read the launcher's environment (the first of: torch-style vars, MPI, SLURM, none)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = "deepspeed" if "CROSS_RANK" in env or "DS_ACCELERATOR" in env else "torchrun"
        return DistEnv(int(env["RANK"]), _int_env("LOCAL_RANK") or 0, int(env["WORLD_SIZE"]),
                       env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", "29500")), launcher)
    if _int_env("OMPI_COMM_WORLD_SIZE") is not None:
        return _mpi_env()
    ntasks = _int_env("SLURM_NTASKS")
    pmi_size = _int_env("PMI_SIZE", "PMIX_SIZE")
    # srun --mpi=pmi2|pmix sets PMI sizes too: one task per rank is still srun's (no mpi4py needed);
    # another count means an MPI launcher started inside the allocation.
    if ntasks is not None and "SLURM_PROCID" in env and "SLURM_STEP_ID" in env and pmi_size in (None, ntasks):
        return DistEnv(int(env["SLURM_PROCID"]), _int_env("SLURM_LOCALID") or 0, ntasks,
                       env.get("MASTER_ADDR") or _slurm_master(),
                       int(env.get("MASTER_PORT") or slurm_port()), "srun")
    if pmi_size is not None:
        return _mpi_env()
    return DistEnv(0, 0, 1, "127.0.0.1", int(env.get("MASTER_PORT") or _free_port()), "none")


def device_for(local_rank: int) -> torch.device:
    """This rank's accelerator (its local GPU) or the CPU."""
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init(env: DistEnv | None = None) -> DistEnv:
    """Start the process group for this launcher (idempotent)."""
    env = env or detect()
    ops.use_environment_root()   # before anything DeepSpeed builds, in every rank alike
    os.environ.update(RANK=str(env.rank), LOCAL_RANK=str(env.local_rank), WORLD_SIZE=str(env.world_size),
                      MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port))
    if not dist.is_initialized():
        device_for(env.local_rank)
        ops.prepare()
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
        shm_buffers.release_after_start(env.rank, env.world_size)   # or /dev/shm fills up, run by run
        if backend != "gloo" and env.world_size > 1:
            global _HOST_GROUP
            _HOST_GROUP = dist.new_group(backend="gloo")   # every rank calls it, in the same order
    return env


def end_process(status: int) -> NoReturn:
    """End a process that ran collectives, its work done: exit functions run and the standard streams
    are flushed as on any exit, but the interpreter is not torn down.

    A process group's worker threads outlive its destruction while DeepSpeed still holds it, and
    release the tensors of the collective they ran last only after the caller has its result. A
    release during the interpreter's teardown cannot take the GIL there, and the thread's forced exit
    aborts the process ("terminate called without an active exception", SIGABRT): about one 2-rank
    run in 25 died so after committing its last checkpoint, and its job looked failed.

    Its status decided, the process ignores the stop signals from here on: a Ctrl-C sent to the whole
    process group, or forwarded by a launcher, as the run ends by itself would otherwise raise
    KeyboardInterrupt inside an exit function and print its traceback (SIGKILL still ends it)."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        try:
            signal.signal(signum, signal.SIG_IGN)
        except ValueError:   # not the main thread: it cannot change handlers
            break
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    atexit._run_exitfuncs()
    mpi = sys.modules.get("mpi4py.MPI")   # under mpirun: a rank that ends without MPI_Finalize is "abnormal"
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):   # a closed or broken stream: nothing more can reach it
            pass
    os._exit(status)


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _all_reduce(values: list[float], op_name: str) -> list[float]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)   # host memory, host group: no wait for the device
    dist.all_reduce(t, op=getattr(dist.ReduceOp, op_name), group=_HOST_GROUP)
    return t.tolist()


def all_reduce_max(values: list[float]) -> list[float]:
    """Element-wise max over ranks of host values (e.g. agreeing on a stop request)."""
    return _all_reduce(values, "MAX")


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum over ranks of host values, in float64 (token-weighted losses)."""
    return _all_reduce(values, "SUM")


T = TypeVar("T")


def on_main_rank(is_main: bool, action: Callable[[], T], elsewhere: str) -> T | None:
    """Run `action` on rank 0 only; every rank learns whether it failed, so none waits on the others.
    Rank 0 raises its own UserError, the other ranks one saying `elsewhere`; `action`'s result on rank
    0, None on the others."""
    problem, result = None, None
    if is_main:
        try:
            result = action()
        except UserError as exc:
            problem = exc
    failed = all_reduce_max([1.0 if problem else 0.0])[0]
    if problem is not None:
        raise problem
    if failed:
        raise UserError(elsewhere)
    return result

