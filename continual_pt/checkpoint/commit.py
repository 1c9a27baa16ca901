"""The parts of the commit protocol that must hold when ranks sit on different nodes.

A rank's page cache is its own node's: a file one rank wrote is durable only once that rank has
fsynced it, and rank 0 may see it (over a shared filesystem) before it is. So each rank fsyncs the
files it wrote and their folder, hashes them while they are still in its cache, and sends the list to
rank 0 over the process group (not through the filesystem). Rank 0 commits only when every rank's
report is in, every rank reported its rank file (and, under ZeRO, its shards), and each reported file
is there, at its reported size, as rank 0 sees it; the marker then lists every expected file.

A rank whose write fails (a node's disk full, its quota reached) must not leave the others waiting for
its report: every rank's outcome is shared with every rank before anyone waits on another, so every
rank ends with the same message naming the ranks that failed and the problem.

Decisions that every rank must share (how a run starts, from which checkpoint) are made once, on
rank 0, and broadcast: ranks reading markers each on their own could disagree. And before anything
relies on the run dir being shared, every rank proves it sees rank 0's files there.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch.distributed as dist

from continual_pt.checkpoint import integrity
from continual_pt.errors import UserError
from continual_pt.files import atomic_write_text, fsync_dir
from continual_pt.layout import RANK_FILE

T = TypeVar("T")


def _world() -> tuple[int, int]:
    """(rank, world size) of the process group, (0, 1) without one."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def owned_by(name: str, rank: int) -> bool:
    """Whether rank `rank` wrote a checkpoint file (DeepSpeed's per-rank ZeRO files, our rank file)."""
    return (name.startswith((f"zero_pp_rank_{rank}_", f"bf16_zero_pp_rank_{rank}_"))
            or name == RANK_FILE.format(rank=rank))


def report(tag_dir: Path, rank: int) -> dict[str, dict[str, Any]]:
    """This rank's files of a save, each fsynced (and then their folder) and recorded (size, checksum)."""
    table = {}
    for path in sorted(Path(tag_dir).iterdir()):
        if path.is_file() and owned_by(path.name, rank):
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            table[path.name] = integrity.entry(path)
    fsync_dir(tag_dir)
    return table


def failure(rank: int, name: str, exc: Exception, root: Path) -> dict[str, Any]:
    """What a rank tells the others of its failed write of `name` (a file or folder of the save)."""
    return {"rank": rank, "host": socket.gethostname(), "name": name, "problem": integrity.disk_problem(exc),
            "error": f"{type(exc).__name__}: {exc}", "free": integrity.free_bytes(root)}


def share_failures(mine: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Every rank's failure (see `failure`), on every rank, in rank order; [] when every rank wrote its files."""
    rank, world_size = _world()
    if world_size == 1:
        return [mine] if mine else []
    outcomes: list[Any] = [None] * world_size
    dist.all_gather_object(outcomes, mine)
    return [f for f in outcomes if f]


def failures_message(tag_dir: Path, failed: list[dict[str, Any]], kept: str) -> str:
    """What every rank says of a save that ranks failed to write, the partial save removed, `kept` left."""
    problems = {f["problem"] for f in failed}
    who = "; ".join(f"rank {f['rank']} on {f['host']} could not write {f['name']} ({_detail(f)})" for f in failed)
    if None in problems:
        return f"checkpoint {tag_dir} was not committed: {who}; the partial save was removed and {kept}"
    headline = problems.pop() if len(problems) == 1 else integrity.FULL_OR_QUOTA
    room = "free some space" if headline == integrity.NO_SPACE else "free some space or raise the quota"
    return (f"{headline} while saving checkpoint {tag_dir}: {who}; the partial save was removed and {kept}; "
            f"{room} (or move out_dir) and run again")


def _detail(failed: dict[str, Any]) -> str:
    """A disk problem's room left as the failed rank saw it, or another error's own words."""
    return f"{integrity.megabytes(failed['free'])} free there" if failed["problem"] else failed["error"]


def gather_reports(table: dict[str, dict[str, Any]]) -> list[dict[str, dict[str, Any]]]:
    """Every rank's report, in rank order, on rank 0 (the others get an empty list)."""
    rank, world_size = _world()
    if world_size == 1:
        return [table]
    reports = [None] * world_size if rank == 0 else None
    dist.gather_object(table, reports, dst=0)
    return reports or []


def expected_missing(names: set[str] | list[str], world_size: int, zero_stage: int | None) -> list[str]:
    """The files a save by `world_size` ranks under `zero_stage` must have that `names` lacks: every
    rank's rank file, and under ZeRO every rank's optimizer shard (under ZeRO 3 its model shard too)."""
    names = set(names)
    missing = [RANK_FILE.format(rank=r) for r in range(world_size) if RANK_FILE.format(rank=r) not in names]
    kinds = ("optim_states",) if zero_stage in (1, 2) else ("optim_states", "model_states") if zero_stage == 3 else ()
    for r in range(world_size):
        for kind in kinds:
            if not any(owned_by(n, r) and n.endswith(f"_{kind}.pt") for n in names):
                missing.append(f"zero_pp_rank_{r}_mp_rank_00_{kind}.pt")
    return missing


def assemble(tag_dir: Path, reports: list[dict[str, dict[str, Any]]],
             zero_stage: int | None) -> dict[str, dict[str, Any]]:
    """Rank 0: the marker's file list from every rank's report and the shared files rank 0 wrote, or
    UserError (nothing committed) when a rank's file is missing or different as rank 0 sees it."""
    tag_dir = Path(tag_dir)
    files: dict[str, dict[str, Any]] = {}
    for rank, table in enumerate(reports):
        for name, recorded in sorted(table.items()):
            wrong = integrity.problem(tag_dir, name, recorded, checksums=False)
            if wrong:
                raise UserError(f"checkpoint {tag_dir} was not committed: rank {rank} wrote {name} "
                                f"({recorded['size']} bytes), but as rank 0 sees the folder it {wrong}; every "
                                "rank must save to one filesystem that all nodes share (checkpoint kept: the "
                                "previous committed one)")
            files[name] = recorded
    missing = expected_missing(files, len(reports), zero_stage)
    if missing:
        raise UserError(f"checkpoint {tag_dir} was not committed: no rank reported {', '.join(missing)} for a "
                        f"save by {len(reports)} ranks (checkpoint kept: the previous committed one)")
    for name in integrity.listed_files(tag_dir):
        if name not in files:
            files[name] = integrity.entry(tag_dir / name)
    return dict(sorted(files.items()))


def decided_on_rank0(decide: Callable[[], T]) -> T:
    """`decide()` run on rank 0 alone and its result (or its UserError) given to every rank; another
    error is raised on rank 0 as it was, and on the others as a RuntimeError, not left waiting."""
    rank, world_size = _world()
    if world_size == 1:
        return decide()
    payload: list[Any] = [None]
    failed = None
    if rank == 0:
        try:
            payload = [("ok", decide())]
        except UserError as exc:
            payload = [("error", str(exc))]
        except Exception as exc:   # rank 0's own traceback tells it; the others must not wait for it
            payload, failed = [("failed", f"{type(exc).__name__}: {exc}")], exc
    dist.broadcast_object_list(payload, src=0)
    kind, value = payload[0]
    if failed is not None:
        raise failed
    if kind == "error":
        raise UserError(value)
    if kind == "failed":
        raise RuntimeError(f"rank 0 failed ({value}); see its error")
    return value


def check_shared_dir(run_dir: Path) -> None:
    """On every rank: rank 0 writes a file into the run dir and every rank must read it back, else
    UserError naming the ranks (with host and resolved path) that do not see rank 0's run dir."""
    rank, world_size = _world()
    if world_size == 1:
        return
    token = [secrets.token_hex(8) if rank == 0 else None]
    dist.broadcast_object_list(token, src=0)
    probe = Path(run_dir) / f".shared-check-{token[0]}"
    if rank == 0:
        atomic_write_text(probe, token[0])
    dist.barrier()
    try:
        seen = probe.read_text() == token[0]
    except OSError:
        seen = False
    views: list[Any] = [None] * world_size
    dist.all_gather_object(views, (seen, str(Path(run_dir).resolve()), socket.gethostname()))
    if rank == 0:
        probe.unlink(missing_ok=True)
    blind = [f"rank {r} on {host} ({path})" for r, (ok, path, host) in enumerate(views) if not ok]
    if blind:
        raise UserError(f"the run dir is not shared by every rank: rank 0 on {views[0][2]} wrote a file into "
                        f"{views[0][1]}, which {', '.join(blind)} cannot read. out_dir must be on a filesystem "
                        "that every node mounts at the same path (not a node-local one such as /tmp or a "
                        "relative path resolved in different working directories)")
