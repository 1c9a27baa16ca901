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
NO_SPACE = "no space left on device"
OVER_QUOTA = "disk quota exceeded"
FULL_OR_QUOTA = "disk full or quota exceeded"
# How torch's zip writer (torch.save) reports a write the disk refused, without the errno: a large
# file as "[enforce fail at inline_container.cc:672] . unexpected pos 640 vs 534", a small one as
# "basic_ios::clear: iostream error", some versions as "PytorchStreamWriter failed writing file ...".
_TORCH_WRITE_FAILURES = ("unexpected pos", "PytorchStreamWriter failed writing file", "basic_ios::clear")


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


def disk_problem(exc: BaseException) -> str | None:
    """What a failed write says of the disk, or None when it is not a disk problem: NO_SPACE (ENOSPC),
    OVER_QUOTA (EDQUOT), or FULL_OR_QUOTA for torch's zip writer, which names no errno: a quota can
    refuse a write while the disk has space left. An error that only quotes the OS's words (the
    shutil.Error of copytree, a tokenizer's "(os error 28)") counts too, and so does one caused by such."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        code, text = getattr(exc, "errno", None), str(exc)
        if code == errno.ENOSPC or os.strerror(errno.ENOSPC) in text:
            return NO_SPACE
        if code == errno.EDQUOT or os.strerror(errno.EDQUOT) in text:
            return OVER_QUOTA
        if isinstance(exc, RuntimeError) and any(s in text for s in _TORCH_WRITE_FAILURES):
            return FULL_OR_QUOTA
        exc = exc.__cause__ or exc.__context__
    return None
