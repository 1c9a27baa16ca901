"""What the commit marker records of each checkpoint file (size and an xxh3_64 checksum), how a file
is checked against it, and the disk space a save needs.

xxh3_64 is not cryptographic: it detects accidents (a flipped bit, a torn copy, a file rewritten in
place), not tampering, and hashes at memory speed, so checking a checkpoint costs about one read of it.
"""

from __future__ import annotations

import errno
import mmap
import os
import shutil
from pathlib import Path
from typing import Any

import xxhash

CHECKSUM = "xxh3_64"
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# torch reports a failed write as "[enforce fail at inline_container.cc] . unexpected pos", without
# the errno; a disk with less than this left is what made it fail.
_NEARLY_FULL = 16 << 20


def checksum(file: Path) -> str:
    """The xxh3_64 of a file's bytes, as 16 hex digits."""
    with open(file, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return xxhash.xxh3_64().hexdigest()
        # Hashing the mapped file skips the copy into a buffer: about 2.5x the speed of reads.
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return xxhash.xxh3_64(mapped).hexdigest()


def entry(file: Path) -> dict[str, Any]:
    """The marker's record of one file."""
    return {"size": file.stat().st_size, CHECKSUM: checksum(file)}


def listed_files(tag_dir: Path) -> list[str]:
    """Every file of a checkpoint folder, relative, except hidden ones (temporaries, per-rank tables)."""
    return [str(p.relative_to(tag_dir)) for p in sorted(tag_dir.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(tag_dir).parts)]


def problem(tag_dir: Path, name: str, recorded: int | dict[str, Any], checksums: bool = True) -> str | None:
    """What is wrong with one file against its record (a bare size in markers written before
    checksums), or None when it matches; `checksums=False` compares sizes only."""
    file = tag_dir / name
    if not file.is_file():
        return f"is partial: {name} is missing"
    size = recorded if isinstance(recorded, int) else recorded["size"]
    if file.stat().st_size != size:
        return f"is corrupt: {name} has {file.stat().st_size} bytes, the commit marker recorded {size}"
    if checksums and isinstance(recorded, dict) and CHECKSUM in recorded \
            and checksum(file) != recorded[CHECKSUM]:
        return (f"is corrupt: {name} does not match its checksum in the commit marker ({CHECKSUM}); "
                "it changed after the checkpoint was committed")
    return None


def recorded_size(files: dict[str, int | dict[str, Any]]) -> int:
    """The bytes a committed checkpoint takes, from its marker's records."""
    return sum(v if isinstance(v, int) else v["size"] for v in files.values())


def free_bytes(path: Path) -> int:
    """Bytes free to us on the filesystem holding `path` (or its nearest existing parent)."""
    path = Path(path)
    while not path.exists() and path.parent != path:
        path = path.parent
    return shutil.disk_usage(path).free


def megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def is_disk_full(exc: BaseException, path: Path) -> bool:
    """Whether a failed write means the disk (or quota) is full."""
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS:
        return True
    return isinstance(exc, RuntimeError) and "unexpected pos" in str(exc) and free_bytes(path) < _NEARLY_FULL
