"""Saving and loading a run's checkpoints under the commit protocol, and pruning them.

Each save writes DeepSpeed's files, one `rank<r>.pt` per rank (sampler position and RNG states),
the model's config and tokenizer, and last of all the commit marker listing every file with its
size; `latest` is replaced atomically only after the marker exists, so a kill at any moment of a
save leaves the previous committed checkpoint in charge.

The marker records each file's size and xxh3_64 checksum; every rank hashes the files it wrote
itself (still in its own page cache, and in parallel across nodes), rank 0 the shared ones.
A tag is never written into while it carries a marker: re-saving a committed step first moves
the old tag aside (one rename) and deletes it only after the new one is committed.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import time
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
        e.g. the model config and tokenizer needed for export.
        """
        path = self.root / tag_for(step)
        self._check_space(engine, path)
        retired = self._retire(path) if self.rank == 0 else None
        distributed.barrier()
        problem = None
        try:
            self._write(engine, path, client_state, rank_state, extras)
            reports = commit.gather_reports(commit.report(path, self.rank))   # every rank's files, durable
            if self.rank == 0:
                try:
                    self._commit(path, step, client_state, retired, reports)
                except UserError as exc:
                    problem = exc
                    self._undo(path, retired)
        except Exception as exc:
            disk = integrity.disk_problem(exc)
            if disk is None:
                raise
            raise UserError(self._abandon(path, retired, disk)) from None
        if distributed.all_reduce_max([float(problem is not None)])[0]:   # every rank learns the outcome
            raise problem or UserError(f"checkpoint {path} was not committed: rank 0 refused it (see its error)")
        return CheckpointRef(path)

    def _write(self, engine, path: Path, client_state: dict[str, Any], rank_state: dict[str, Any],
               extras: dict[str, Any]) -> None:
        engine.save_checkpoint(str(self.root), tag=path.name, client_state=client_state, save_latest=False)
        rank_file = path / RANK_FILE.format(rank=self.rank)
        with atomic_output(rank_file) as tmp:
            torch.save(rank_state, tmp)
        if self.rank == 0:
            for name, write in extras.items():
                write(path / name)

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

    def _abandon(self, path: Path, retired: Path | None, problem: str) -> str:
        """After a full disk or quota: remove the partial save, put back what it replaced; the message."""
        if self.rank == 0:
            self._undo(path, retired)
        previous = newest_committed(self.root)
        kept = f"the committed {previous.path} is intact" if previous else "there is no earlier committed checkpoint"
        free = integrity.megabytes(integrity.free_bytes(self.root))
        room = "free some space" if problem == integrity.NO_SPACE else "free some space or raise the quota"
        return (f"{problem} while saving checkpoint {path}: {free} free on {self.root}; the partial save was "
                f"removed and {kept}; {room} (or move out_dir) and run again")

    def _commit(self, path: Path, step: int, client_state: dict[str, Any], retired: Path | None,
                reports: list[dict[str, Any]]) -> None:
        """Rank 0: the marker (every rank's reported files, checked here, and rank 0's), then `latest`."""
        fsync_tree(path)
        files = commit.assemble(path, reports, client_state.get("zero_stage"))
        meta = {"format_version": FORMAT_VERSION, "step": step, "world_size": self.world_size,
                "time": time.time(), "files": files,
                **{k: client_state[k] for k in ("tokens_seen", "zero_stage", "precision") if k in client_state}}
        atomic_write_text(path / MARKER, json.dumps(meta, indent=1))
        atomic_write_text(self.root / LATEST, path.name)
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

