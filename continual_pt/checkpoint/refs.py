"""Finding checkpoints: which folders of a run are committed and intact, and what a path names.

A checkpoint is `checkpoints/global_step<N>/` (see `continual_pt.layout`). It is committed once
its marker lists every file with its size and xxh3 checksum (written last by `Checkpointer.save`);
loaders trust committed, intact folders only, whatever `latest` says.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from continual_pt.checkpoint import commit, integrity
from continual_pt.errors import UserError
from continual_pt.layout import CHECKPOINTS, LATEST, MARKER, is_committed, list_tags, step_of, tag_for


@dataclass(frozen=True)
class CheckpointRef:
    """A committed checkpoint folder."""

    path: Path

    @property
    def root(self) -> Path:
        return self.path.parent

    @property
    def tag(self) -> str:
        return self.path.name

    @property
    def step(self) -> int:
        return step_of(self.tag)

    def meta(self) -> dict[str, Any]:
        return json.loads((self.path / MARKER).read_text())


def verify(tag_dir: Path, *, hint: bool = True, checksums: bool = True) -> CheckpointRef:
    """A committed checkpoint whose files all match the marker's sizes and checksums, else UserError
    (with `hint`, naming the newest intact checkpoint before it). `checksums=False` checks sizes
    only: for listing many checkpoints, of which a job then loads one."""
    tag_dir = Path(tag_dir)
    if not tag_dir.is_dir():
        raise UserError(f"checkpoint {tag_dir} does not exist")
    if step_of(tag_dir.name) is None:
        raise UserError(f"{tag_dir} is not a checkpoint folder (expected a name like {tag_for(1000)})")
    if not is_committed(tag_dir):
        raise UserError(f"checkpoint {tag_dir} is partial: it has no {MARKER} (the save was interrupted); "
                        "use an earlier committed checkpoint" + (_intact_hint(tag_dir) if hint else ""))
    try:
        meta = json.loads((tag_dir / MARKER).read_text())
        files = meta["files"]
    except (json.JSONDecodeError, KeyError) as exc:
        raise UserError(f"{tag_dir / MARKER}: unreadable commit marker ({exc})"
                        + (_intact_hint(tag_dir) if hint else "")) from None
    missing = commit.expected_missing(files, meta.get("world_size", 1), meta.get("zero_stage")) \
        if meta.get("format_version", 0) >= 3 else []
    if missing:
        raise UserError(f"checkpoint {tag_dir} is partial: its commit marker lists no {', '.join(missing)} for a "
                        f"save by {meta.get('world_size')} ranks" + (_intact_hint(tag_dir) if hint else ""))
    for name, recorded in files.items():
        wrong = integrity.problem(tag_dir, name, recorded, checksums)
        if wrong:
            raise UserError(f"checkpoint {tag_dir} {wrong}" + (_intact_hint(tag_dir) if hint else ""))
    return CheckpointRef(tag_dir)


def _intact_hint(tag_dir: Path) -> str:
    """Where to resume from instead of a broken checkpoint: the newest older one that verifies."""
    for ref in reversed(list_committed(tag_dir.parent)):
        if ref.step < step_of(tag_dir.name):
            try:
                verify(ref.path, hint=False)
            except UserError:
                continue
            return f"; the newest intact checkpoint is {ref.path}: resume from it with checkpoint.resume={ref.path}"
    return f"; no older intact checkpoint under {tag_dir.parent}"


def removed(tag_dir: Path) -> bool:
    """Whether a checkpoint listed as committed has since lost its marker or a file it lists: its run
    pruned it (keep_last), which removes the folder file by file."""
    try:
        files = json.loads((Path(tag_dir) / MARKER).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return True
    return any(not (Path(tag_dir) / name).exists() for name in files)


def list_committed(root: Path) -> list[CheckpointRef]:
    """Committed checkpoints under a checkpoints/ folder, oldest first."""
    return [CheckpointRef(p) for p in list_tags(root) if is_committed(p)]


def newest_committed(root: Path) -> CheckpointRef | None:
    """The newest committed checkpoint (not whatever `latest` says: loaders trust markers)."""
    refs = list_committed(root)
    return refs[-1] if refs else None


def resolve(path: str | Path, *, what: str = "checkpoint") -> CheckpointRef:
    """A run dir, its checkpoints/ dir or a tag dir -> the checkpoint it names (verified)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{what}: {path} does not exist")
    if step_of(path.name) is not None:
        return verify(path)
    root = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path
    ref = newest_committed(root)
    if ref is None:
        raise UserError(f"{what}: no committed checkpoint under {root}")
    return verify(ref.path)


def is_ours(path: str | Path) -> bool:
    """Whether a path is one of our run, checkpoints or checkpoint folders (else: Hugging Face)."""
    path = Path(path)
    return path.is_dir() and ((path / CHECKPOINTS).is_dir() or (path / MARKER).is_file()
                              or step_of(path.name) is not None or (path / LATEST).is_file())

