"""Files that are never seen half-written: write a hidden temporary beside the target, flush it
to disk, rename it over the target, flush the directory. Also JSON lines: without NaN, appended
on a line boundary, read back past a torn line. And the check, before any work, that an output
can be written at all.

A reader sees the old content or the new, never a mix: `os.replace` is atomic within one
filesystem, which is why the temporary lives in the target's directory. Its name carries the
process id, a per-process counter and a random token, so concurrent writers (other processes,
other threads, other hosts on a shared filesystem where process ids repeat) never share one.
"""

from __future__ import annotations

import errno
import itertools
import json
import math
import os
import secrets
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from continual_pt.errors import UserError

_calls = itertools.count()
ENVIRONMENT_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT)
"""What the file system, not the program, refused: a read-only mount, permissions, a full disk or quota."""


def temp_path_for(path: str | Path) -> Path:
    """A fresh hidden temporary path beside `path`, unique per process and per call."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{next(_calls)}-{secrets.token_hex(4)}.tmp")


def fsync_dir(path: str | Path) -> None:
    """Flush a directory's entries (a rename inside it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_tree(path: str | Path) -> None:
    """Flush a file, or every file and folder under a directory, to disk."""
    path = Path(path)
    if not path.is_dir():
        _fsync_file(path)
        return
    for entry in sorted(path.rglob("*")):
        if entry.is_file():
            _fsync_file(entry)
    for folder in sorted((p for p in path.rglob("*") if p.is_dir()), reverse=True):
        fsync_dir(folder)
    fsync_dir(path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write (a file, or a folder the writer creates) that replaces `path`
    only when the block completes; if it raises, the temporary is removed and `path` is untouched.

    A folder may replace only a missing or empty folder (the rename rule of POSIX).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    try:
        yield tmp
        fsync_tree(tmp)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Replace `path` with `data`, atomically and durably."""
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    """Replace `path` with `text`, atomically and durably."""
    atomic_write_bytes(path, text.encode(encoding))


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float (JSON has no NaN or infinity) as None, at any depth."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def json_line(record: dict[str, Any]) -> str:
    """One strict JSON line (newline included) of a record, non-finite floats as null."""
    return json.dumps(json_safe(record), allow_nan=False) + "\n"


def open_append(path: str | Path) -> int:
    """An O_APPEND descriptor of `path` (created if missing) whose next write starts a line: a last
    line torn by a writer killed mid-write is ended first, so that it cannot swallow the next row."""
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            os.write(fd, b"\n")
    except BaseException:
        os.close(fd)
        raise
    return fd


# (file, line number, text) of every unreadable line already reported by this process.
_reported: set[tuple[str, int, str]] = set()


def parse_json_line(line: str) -> dict[str, Any] | None:
    """The JSON object of one line, or None when the line is not one (e.g. torn mid-write)."""
    try:
        value = json.loads(line)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def read_json_lines(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file in order (none if it is missing). A line that is not
    one is skipped with a warning, given once per process however often the file is read."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = parse_json_line(line)
            if record is not None:
                records.append(record)
                continue
            seen = (str(path.resolve()), number, line.rstrip("\r\n"))  # once ended, still the same line
            if seen not in _reported:
                _reported.add(seen)
                print(f"warning: {path}:{number}: unreadable row skipped (a line torn by a writer that "
                      "was killed mid-write?)", file=sys.stderr)
    return records


def _reason(exc: OSError) -> str:
    """An OSError's reason in a message's words: "read-only file system", "permission denied"."""
    text = os.strerror(exc.errno) if exc.errno else str(exc)
    return text[:1].lower() + text[1:]


def _try_writing(path: Path, file: bool) -> str | None:
    """Why `path` cannot be written, or None: a file is opened for appending (nothing is written), a
    folder gets a hidden file created and removed. These are the operations the command will do, so
    every cause (a read-only mount, permissions, ACLs, an immutable folder, no inode left) answers as
    it would then."""
    try:
        if file:
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
        else:
            probe = temp_path_for(path / "write-check")
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            os.unlink(probe)
    except OSError as exc:
        return _reason(exc)
    return None


def _kind_problem(path: Path, file: bool) -> str | None:
    """What is wrong with the type of an existing `path` for the output it should be."""
    if not file:
        return None if path.is_dir() else "not a directory"
    if path.is_dir():
        return "is a directory"
    return None if path.is_file() else "not a regular file"


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def unwritable(path: str | Path, *, file: bool = False, replaced: bool = False) -> tuple[Path, str] | None:
    """Where and why `path` cannot be written (see `check_writable`), or None when it can."""
    path = Path(path)
    try:
        if path.exists():
            problem = _kind_problem(path, file) or _try_writing(path, file)
            if problem or not (file or replaced):
                return (path, problem) if problem else None
        folder = _nearest_existing(path.parent)
    except OSError as exc:   # a parent that cannot be searched (stat: permission denied)
        return Path(exc.filename) if exc.filename else path, _reason(exc)
    if not folder.is_dir():
        return folder, "not a directory"
    problem = _try_writing(folder, file=False)
    return (folder, problem) if problem else None


def environment_fault(exc: BaseException) -> str | None:
    """`<path>: <reason>` for an OSError of the environment (ENVIRONMENT_ERRNOS) that names its file,
    e.g. a disk remounted read-only mid-run; None for any other error, which stays a bug to report."""
    if isinstance(exc, OSError) and exc.errno in ENVIRONMENT_ERRNOS and exc.filename is not None:
        return f"{os.fsdecode(exc.filename)}: {_reason(exc)}"
    return None


def check_writable(path: str | Path, what: str, *, file: bool = False, replaced: bool = False) -> None:
    """Raise a UserError naming `what` (the option or key: "--out", "out_dir") and `path` when the
    command could not write `path`; call it before any work, so that a read-only file system or a
    folder without write permission is said at once rather than after the work, as a traceback.

    `path` is a folder the command writes into (created with its parents if missing); with `file`, a
    file it creates, appends to or replaces; with `replaced`, a folder made beside it and renamed
    over it. A file, or a replaced folder, is written through the folder holding it too. A missing
    path is written through its nearest existing parent, which must be a writable folder."""
    found = unwritable(path, file=file, replaced=replaced)
    if found is not None:
        where, reason = found
        at = "" if where == Path(path) else f" {where}"
        raise UserError(f"{what} {path}: cannot write{at}: {reason}")
