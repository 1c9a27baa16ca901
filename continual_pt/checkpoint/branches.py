"""The checkpoints folder at the start of a run: our leftovers removed, and a resume from an older
checkpoint turned into a branch, the newer checkpoints moved aside (never deleted).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import torch.distributed as dist

from continual_pt.checkpoint.checkpointer import RETIRED
from continual_pt.checkpoint.refs import (
    CheckpointRef,
    is_committed,
    list_committed,
    list_tags,
    newest_committed,
)
from continual_pt.files import atomic_write_text, fsync_dir
from continual_pt.layout import BRANCHES, LATEST
from continual_pt.runtime import distributed


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def open_root(root: Path, resume: CheckpointRef | None = None) -> None:
    """At the start of a run, on every rank (rank 0 acts, the others wait): remove our partial saves
    and retired copies; when resuming an older checkpoint of this run, branch (`branch_aside`)."""
    if _is_main():
        tidy(root)
        if resume is not None:
            branch_aside(root, resume)
    distributed.barrier()


def tidy(root: Path) -> None:
    """Remove uncommitted tags and retired copies (ours, left by a kill or a full disk: they only
    take space) and point `latest` at the newest committed tag if it names anything else."""
    root = Path(root)
    if not root.is_dir():
        return
    for path in list_tags(root):
        if not is_committed(path):
            shutil.rmtree(path, ignore_errors=True)
    for path in root.glob(f"{RETIRED}*"):
        shutil.rmtree(path, ignore_errors=True)
    newest, latest = newest_committed(root), root / LATEST
    if newest and not (latest.is_file() and is_committed(root / latest.read_text().strip())):
        atomic_write_text(latest, newest.tag)


def branch_aside(root: Path, ref: CheckpointRef) -> Path | None:
    """Resuming `ref` while this run has newer committed checkpoints branches the run: the newer ones
    move to `branches/after-step<N>-<time>/` (kept whole, never resumed automatically), so `resume:
    auto` and keep-last pruning see only the live branch. Returns that folder, or None."""
    root = Path(root)
    if not root.is_dir() or ref.root.resolve() != root.resolve():
        return None
    newer = [r for r in list_committed(root) if r.step > ref.step]
    if not newer:
        return None
    base = root / BRANCHES / f"after-step{ref.step}-{time.strftime('%Y%m%d-%H%M%S')}"
    aside, n = base, 1
    while aside.exists():
        aside, n = base.with_name(f"{base.name}-{n}"), n + 1
    aside.mkdir(parents=True)
    atomic_write_text(root / LATEST, ref.tag)   # first, so that `latest` never names a moved tag
    for r in newer:
        os.rename(r.path, aside / r.tag)
    fsync_dir(aside)
    fsync_dir(root)
    print(f"checkpoint.resume: {ref.path} is older than this run's newest committed checkpoint, so the run "
          f"branches at step {ref.step}: moved {', '.join(r.tag for r in newer)} aside to {aside} (kept, never "
          f"resumed automatically; move a tag back into {root} to continue that branch)", file=sys.stderr, flush=True)
    return aside
