"""DeepSpeed's shared-memory all-reduce buffers, unlinked as soon as every rank has mapped them.

On the CPU, `deepspeed.init_distributed` starts DeepSpeed's shared-memory all-reduce (the
ShareMemCommBuilder op) when every rank runs on one machine (its launcher sets LOCAL_SIZE to the
world size). Each rank then creates `/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_
<MASTER_PORT>_<rank>` (about 69 MB), maps it, and waits until it has mapped every peer's. DeepSpeed
never unlinks them, so every run, however it ends, left one file per rank in /dev/shm, until a
full /dev/shm failed later runs (bus errors, or no buffer at all).

An unlinked tmpfs file stays valid while it is mapped, and its memory goes back when the last
process unmaps it, by exiting or dying in any way. So once every rank has returned from the
start (a barrier), each rank unlinks its own buffer: nothing is left behind by a clean exit, a
stop request, an exception or a SIGKILL. Only this rank's own name of this job is ever removed,
never another job's buffer.
"""

from __future__ import annotations

import os
from pathlib import Path

import deepspeed.comm.comm as ds_comm
import torch.distributed as dist

SHM_DIR = Path("/dev/shm")      # where glibc's shm_open keeps its objects on Linux
PREFIX = "deepspeed_allreduce_buffer"


def buffer_name(addr: str, port: int | str, rank: int, uid: int | None = None) -> str:
    """The name DeepSpeed gives rank `rank`'s buffer (shm_initialize in csrc/cpu/comm/shm.cpp)."""
    uid = os.getuid() if uid is None else uid
    return f"{PREFIX}_{uid}_{addr}_{port}_{rank}"


def job_buffers(addr: str, port: int | str, uid: int | None = None) -> list[Path]:
    """The buffers of the job at `addr`:`port` that are still linked in /dev/shm, one per rank."""
    prefix = buffer_name(addr, port, 0, uid)[:-1]          # up to and including the last "_"
    return sorted(p for p in SHM_DIR.glob(f"{prefix}*") if p.name[len(prefix):].isdigit())


def deepspeed_uses_shm() -> bool:
    """Whether DeepSpeed loaded its shared-memory all-reduce in this process (the same on every rank)."""
    backend = ds_comm.cdb
    return backend is not None and getattr(backend, "shm_comm_op", None) is not None


def release_after_start(rank: int, world_size: int) -> Path | None:
    """Call on every rank right after `deepspeed.init_distributed`: wait until every rank has
    mapped every buffer, then unlink this rank's own. Returns the path unlinked, if there was one."""
    if not deepspeed_uses_shm():
        return None
    if world_size > 1:
        dist.barrier()    # every rank is past shm_initialize: it has mapped every peer's buffer
    # The name DeepSpeed read from this process's environment inside init_distributed.
    path = SHM_DIR / buffer_name(os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""), rank)
    try:
        path.unlink()
    except FileNotFoundError:
        return None       # ranks spread over machines: DeepSpeed created no buffer
    return path
