"""Writing outputs safely: refuse to clobber, write into `<out>.tmp-<pid>`, rename when complete.

A crash leaves only the temporary directory, which readers refuse by its name and because
the manifest is written last; the next run removes it once its process is gone.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from continual_pt.errors import UserError
from continual_pt.files import check_writable, fsync_dir

TEMP_RE = re.compile(r"\.tmp-(\d+)$")


def temp_path(out: Path) -> Path:
    """The temporary directory this process writes `out` into."""
    return out.with_name(f"{out.name}.tmp-{os.getpid()}")


def is_temp_dir(path: Path) -> bool:
    """Whether `path` is the temporary directory of an unfinished write."""
    return TEMP_RE.search(path.name) is not None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _temp_dirs(out: Path) -> list[tuple[Path, int]]:
    if not out.parent.is_dir():
        return []
    found = []
    for path in out.parent.glob(f"{glob_escape(out.name)}.tmp-*"):
        match = TEMP_RE.search(path.name)
        if match and path.name == f"{out.name}.tmp-{match.group(1)}":
            found.append((path, int(match.group(1))))
    return found


def glob_escape(name: str) -> str:
    """`name` with glob wildcards escaped."""
    return re.sub(r"([*?\[])", r"[\1]", name)


@dataclass(frozen=True)
class OutputKind:
    """What one writer produces, so that only its own output is ever replaced."""

    what: str
    """For messages: "a prepared dataset"."""
    marker: str
    """File written last: its presence marks the output complete."""
    own: re.Pattern[str]
    """Matches every path the writer creates, relative, folders with a trailing "/"."""


def foreign_entries(root: Path, own: re.Pattern[str], rel: str = "") -> list[str]:
    """Paths under `root` that the writer described by `own` would not create (not descending into them)."""
    found = []
    for entry in sorted(os.scandir(root / rel), key=lambda e: e.name):
        is_dir = entry.is_dir(follow_symlinks=False)
        name = f"{rel}{entry.name}{'/' if is_dir else ''}"
        if entry.is_symlink() or not own.fullmatch(name):
            found.append(name)
        elif is_dir:
            found.extend(foreign_entries(root, own, name))
    return found


def _listing(names: list[str], limit: int = 8) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _check_existing(out: Path, overwrite: bool, kind: OutputKind) -> None:
    complete = (out / kind.marker).is_file()
    foreign = foreign_entries(out, kind.own)
    # --overwrite replaces a directory wholesale: anything the writer did not create would be lost.
    if foreign and complete:
        raise UserError(f"{out} is {kind.what} but also holds entries it did not write ({_listing(foreign)}); "
                        "refusing to replace it: move them away or choose another --out")
    if foreign:
        raise UserError(f"{out} exists, is not empty and is not {kind.what} (it holds {_listing(foreign)}); "
                        "refusing to replace it: choose another --out")
    if complete and not overwrite:
        raise UserError(f"{out} is already {kind.what}; pass --overwrite to replace it "
                        "(the old one is kept until the new one is complete)")
    if not complete and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} holds the output of an interrupted run (no {kind.marker}), not yet {kind.what}; "
                        "pass --overwrite to replace it")


def check_destination(out: Path, overwrite: bool, kind: OutputKind) -> None:
    """Raise if writing `out` would replace what it must not; call before writing anything.

    Only the writer's own output, complete or interrupted, is ever replaced, and only with `overwrite`."""
    if (out.exists() or out.is_symlink()) and not out.is_dir():
        raise UserError(f"{out} exists and is not a directory; choose another --out")
    check_writable(out, "--out", replaced=True)   # made beside it, renamed over it
    if out.exists() or out.is_symlink():
        _check_existing(out, overwrite, kind)
    for tmp, pid in _temp_dirs(out):
        if pid != os.getpid() and _alive(pid):
            raise UserError(f"another process (pid {pid}) is writing {out} into {tmp}; wait for it or stop it")


def _commit(tmp: Path, out: Path) -> None:
    fsync_dir(tmp)
    if out.exists():
        # Keep the old output until the new one is in place: a crash in between loses neither.
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old)
    else:
        os.rename(tmp, out)
    fsync_dir(out.parent)


@contextmanager
def atomic_directory(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory that becomes `out` only if the block completes."""
    for stale, pid in _temp_dirs(out):
        if pid == os.getpid() or not _alive(pid):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = temp_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _commit(tmp, out)


class ShardWriter:
    """Appends tokens of one split to shard files of at most `shard_tokens` tokens, hashing as it goes."""

    def __init__(self, root: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.root = root
        self.split = split
        self.dtype = np.dtype(dtype)
        self.shard_tokens = shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.num_tokens = 0
        self._file = None
        self._hash = None
        self._in_shard = 0
        (root / split).mkdir(parents=True, exist_ok=True)

    def _open(self) -> None:
        name = f"{self.split}/{len(self.shards):06d}.bin"
        self._file = open(self.root / name, "wb")
        self._hash = hashlib.sha256()
        self._in_shard = 0
        self.shards.append({"file": name, "num_tokens": 0, "sha256": None})

    def _close(self) -> None:
        if self._file is None:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self.shards[-1].update(num_tokens=self._in_shard, sha256=self._hash.hexdigest())
        self._file = None

    def write(self, tokens: np.ndarray) -> None:
        """Append tokens (already of this writer's dtype)."""
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype.newbyteorder("<"))
        while len(tokens):
            if self._file is None or self._in_shard == self.shard_tokens:
                self._close()
                self._open()
            take = min(len(tokens), self.shard_tokens - self._in_shard)
            data = tokens[:take].tobytes()
            self._file.write(data)
            self._hash.update(data)
            self._in_shard += take
            self.num_tokens += take
            tokens = tokens[take:]

    def finish(self) -> list[dict[str, Any]]:
        """Close the last shard; the shard list for the manifest."""
        self._close()
        return self.shards
