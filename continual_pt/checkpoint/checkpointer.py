"""Saving and loading a run's checkpoints under the commit protocol, and pruning them.

Each save writes DeepSpeed's files, one `rank<r>.pt` per rank (sampler position and RNG states),
the model's config and tokenizer, and last of all the commit marker listing every file with its
size; `latest` is replaced atomically only after the marker exists, so a kill at any moment of a
save leaves the previous committed checkpoint in charge.

The marker records each file's size and xxh3_64 checksum; every rank hashes the files it wrote
itself (still in its own page cache, and in parallel across nodes), rank 0 the shared ones.
A tag is never written into while it carries a marker: re-saving a committed step first moves
the old tag aside (one rename) and deletes it only after the new one is committed.
A rank that cannot write its files (its node's disk full, its quota reached) tells every rank before
any waits on it: every rank ends with the same message, nothing committed, the previous checkpoint kept.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from continual_pt.checkpoint import commit, elastic, integrity
from continual_pt.checkpoint.refs import (
    CheckpointRef,
    is_committed,
    list_committed,
    list_tags,
    newest_committed,
)
from continual_pt.errors import UserError
from continual_pt.files import atomic_output, atomic_write_text, fsync_dir, fsync_tree
from continual_pt.layout import LATEST, MARKER, RANK_FILE, step_of, tag_for
from continual_pt.runtime import distributed

FORMAT_VERSION = 3  # 3: every rank's files checked present, 2: each file as {"size", "xxh3_64"}, 1: its size
RETIRED = ".retired-"


class Checkpointer:
    """Saves and loads DeepSpeed checkpoints of one run under the commit protocol."""

    def __init__(self, root: Path, keep_last: int, rank: int, world_size: int, keep_every: int = 0):
        self.root = Path(root)
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.rank = rank
        self.world_size = world_size

    def save(self, engine, step: int, client_state: dict[str, Any], rank_state: dict[str, Any],
             extras: dict[str, Any]) -> CheckpointRef:
        """Save on every rank; rank 0 commits once every rank's files are complete.

        `extras` maps a folder name in the checkpoint to a callable writing it (rank 0 only),
        e.g. the model config and tokenizer needed for export. A rank that cannot write its files
        (a full disk, a quota) ends the save on every rank alike, nothing committed: UserError.
        """
        path = self.root / tag_for(step)
        self._check_space(engine, path)
        retired = self._retire(path) if self.rank == 0 else None
        distributed.barrier()
        table, mine = self._write(engine, path, client_state, rank_state, extras)
        failed = commit.share_failures(mine and commit.failure(self.rank, mine[0], mine[1], self.root))
        if failed:   # every rank knows, so none waits for a report that will not come
            message = commit.decided_on_rank0(lambda: self._abandon(path, retired, failed))
            if mine and integrity.disk_problem(mine[1]) is None:
                raise mine[1]
            if any(f["problem"] is None for f in failed):
                raise RuntimeError(message)
            raise UserError(message)
        reports = commit.gather_reports(table)   # every rank's files, durable
        commit.decided_on_rank0(lambda: self._commit(path, step, client_state, retired, reports))
        return CheckpointRef(path)

    def _write(self, engine, path: Path, client_state: dict[str, Any], rank_state: dict[str, Any],
               extras: dict[str, Any]) -> tuple[dict[str, Any], tuple[str, Exception] | None]:
        """This rank's files of the save, written and reported (see `commit.report`): (the report, None),
        or ({}, (what it was writing, the error)) when a write failed; the rank then goes on to tell the
        others, whatever the error (DeepSpeed's own collectives are reached despite a disk problem)."""
        name = path.name
        try:
            with _past_disk_problems(engine) as failed:
                engine.save_checkpoint(str(self.root), tag=path.name, client_state=client_state, save_latest=False)
            if failed:
                return {}, failed[0]
            name = RANK_FILE.format(rank=self.rank)
            with atomic_output(path / name) as tmp:
                torch.save(rank_state, tmp)
            for name, write in extras.items() if self.rank == 0 else ():
                write(path / name)
            name = path.name
            return commit.report(path, self.rank), None
        except Exception as exc:   # noqa: BLE001  (shared with every rank, then raised: see `save`)
            return {}, (name, exc)

    def _check_space(self, engine, path: Path) -> None:
        """Refuse, on every rank alike, a save that would not fit: a full disk mid-save costs the save."""
        previous = newest_committed(self.root)
        try:
            need = integrity.recorded_size(previous.meta()["files"]) if previous else 0
        except (OSError, json.JSONDecodeError, KeyError):
            need = 0
        free = integrity.free_bytes(self.root)
        if distributed.all_reduce_max([float(need > free)])[0]:
            raise UserError(f"no space left on device: checkpoint {path} needs about "
                            f"{integrity.megabytes(need)} (the size of {previous.tag}) and {self.root} has "
                            f"{integrity.megabytes(free)} free; free some space (or move out_dir) and run again "
                            f"(the committed {previous.path} is untouched)")

    def _retire(self, path: Path) -> Path | None:
        """Clear the way for a save of `path`: drop a partial tag, rename a committed one aside."""
        self.root.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            return None
        if not is_committed(path):
            shutil.rmtree(path)  # a stale partial save of this same step
            return None
        retired = self.root / f"{RETIRED}{path.name}-{secrets.token_hex(4)}"
        os.rename(path, retired)
        fsync_dir(self.root)
        return retired

    def _undo(self, path: Path, retired: Path | None) -> None:
        """Rank 0, after a save that cannot commit: remove it, put back the committed tag it replaced."""
        shutil.rmtree(path, ignore_errors=True)
        if retired is not None:
            os.rename(retired, path)

    def _abandon(self, path: Path, retired: Path | None, failed: list[dict[str, Any]]) -> str:
        """Rank 0, after ranks could not write their files: remove the partial save, put back what it
        replaced; the message every rank shows."""
        self._undo(path, retired)
        previous = newest_committed(self.root)
        kept = f"the committed {previous.path} is intact" if previous else "there is no earlier committed checkpoint"
        return commit.failures_message(path, failed, kept)

    def _commit(self, path: Path, step: int, client_state: dict[str, Any], retired: Path | None,
                reports: list[dict[str, Any]]) -> None:
        """Rank 0: the marker (every rank's reported files, checked here, and rank 0's), then `latest`;
        a save that cannot commit (a rank's file missing, a full disk) is undone: UserError."""
        try:
            fsync_tree(path)
            files = commit.assemble(path, reports, client_state.get("zero_stage"))
            meta = {"format_version": FORMAT_VERSION, "step": step, "world_size": self.world_size,
                    "time": time.time(), "files": files,
                    **{k: client_state[k] for k in ("tokens_seen", "zero_stage", "precision") if k in client_state}}
            atomic_write_text(path / MARKER, json.dumps(meta, indent=1))
            atomic_write_text(self.root / LATEST, path.name)
        except UserError:
            self._undo(path, retired)
            raise
        except Exception as exc:
            if integrity.disk_problem(exc) is None:
                raise
            failed = [commit.failure(self.rank, path.name, exc, self.root)]
            raise UserError(self._abandon(path, retired, failed)) from None
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)
        self.prune()

    def prune(self) -> None:
        """Keep the newest `keep_last` committed checkpoints and every `keep_every`-th step's; drop
        partial ones older than the newest."""
        committed = list_committed(self.root)
        keep = {r.step for r in committed[-self.keep_last:]}
        keep |= {r.step for r in committed if self.keep_every and r.step % self.keep_every == 0}
        for ref in committed:
            if ref.step not in keep:
                shutil.rmtree(ref.path, ignore_errors=True)
        elastic.prune(self.root, {tag_for(step) for step in keep})
        if committed:
            newest = committed[-1].step
            for p in list_tags(self.root):
                if step_of(p.name) < newest and not is_committed(p):
                    shutil.rmtree(p, ignore_errors=True)

    def load(self, engine, ref: CheckpointRef, *, load_optimizer: bool = True, load_schedule: bool = True,
             universal: Path | None = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Restore the engine from a committed checkpoint, or from its `universal` conversion (an engine
        configured to load universal checkpoints); returns (client state, this rank's state)."""
        meta = ref.meta()
        saved_world = meta.get("world_size", self.world_size)
        if load_optimizer and saved_world != self.world_size and meta.get("zero_stage", 0) > 0 and not universal:
            raise UserError(f"checkpoint {ref.path} was written by {saved_world} ranks with ZeRO stage "
                            f"{meta['zero_stage']}; this run has {self.world_size} ranks. Resume with "
                            f"{saved_world} ranks, or start a new phase from its weights (checkpoint.init)")
        source = Path(universal).parent if universal else ref.root
        _, client_state = engine.load_checkpoint(str(source), tag=ref.tag,
                                                 load_optimizer_states=load_optimizer,
                                                 load_lr_scheduler_states=load_schedule)
        if client_state is None:
            raise UserError(f"DeepSpeed could not load checkpoint {ref.path}")
        if hasattr(engine.lr_scheduler, "apply"):
            # Loaded optimizer state carries the old schedule's LR; this run's schedule wins.
            engine.lr_scheduler.apply()
        rank_file = ref.path / RANK_FILE.format(rank=self.rank)
        if not rank_file.is_file():
            rank_file = ref.path / RANK_FILE.format(rank=0)
        rank_state = torch.load(rank_file, map_location="cpu", weights_only=False)
        return client_state, rank_state


@contextlib.contextmanager
def _past_disk_problems(engine) -> Iterator[list[tuple[str, Exception]]]:
    """While DeepSpeed saves: a write of its checkpoint engine that the disk refuses is recorded (the
    file's name, the error) in the list yielded, not raised, and this rank's later writes are skipped,
    so that the rank still reaches DeepSpeed's barriers, where every other rank waits for it."""
    failed: list[tuple[str, Exception]] = []
    writer = getattr(engine, "checkpoint_engine", None)
    if writer is None:
        yield failed
        return
    save = writer.save

    def guarded(state_dict, path):
        if failed:
            return None
        try:
            return save(state_dict, path)
        except Exception as exc:
            if integrity.disk_problem(exc) is None:
                raise
            failed.append((Path(path).name, exc))
            return None

    writer.save = guarded
    try:
        yield failed
    finally:
        writer.save = save


# --------------------------------------------------------------------------- RNG state


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

