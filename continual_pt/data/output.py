"""Writing outputs safely: refuse to clobber, write into `<out>.tmp-<pid>`, rename when complete.

A crash leaves only the temporary directory, which readers refuse by its name and because
the manifest is written last; the next run removes it once its process is gone.

`ShardWriter` writes a split's token shards, `DomainWriter` its document index (ends and domain
ids, in the format data/domains.py describes), both streamed: memory does not grow with the corpus.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from continual_pt.data import domains
from continual_pt.errors import UserError
from continual_pt.files import check_writable, fsync_dir

TEMP_RE = re.compile(r"\.tmp-(\d+)$")


def temp_path(out: Path) -> Path:
    """The temporary directory this process writes `out` into."""
    return out.with_name(f"{out.name}.tmp-{os.getpid()}")


SHARED_SUFFIX = ".tmp-tasks"
"""`<out>.tmp-tasks`: the work folder that the elements of a job array share (`cpt prepare --task-index`)."""


def is_temp_dir(path: Path) -> bool:
    """Whether `path` is the temporary directory of an unfinished write."""
    return TEMP_RE.search(path.name) is not None or path.name.endswith(SHARED_SUFFIX)


def alive(pid: int) -> bool:
    """Whether process `pid` exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temp_dirs(out: Path) -> list[tuple[Path, int]]:
    """The temporary directories of writers of `out` (finished or not), newest first, with their pid."""
    if not out.parent.is_dir():
        return []
    found = []
    for path in out.parent.glob(f"{glob_escape(out.name)}.tmp-*"):
        match = TEMP_RE.search(path.name)
        if match and path.name == f"{out.name}.tmp-{match.group(1)}" and path.is_dir():
            found.append((path, int(match.group(1))))
    return sorted(found, key=lambda item: item[0].stat().st_mtime_ns, reverse=True)


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
    for tmp, pid in temp_dirs(out):
        if pid != os.getpid() and alive(pid):
            raise UserError(f"another process (pid {pid}) is writing {out} into {tmp}; wait for it or stop it")


def commit_directory(tmp: Path, out: Path) -> None:
    """Rename a complete temporary directory to `out` (replacing an old `out` only once it is in place)."""
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
    for stale, pid in temp_dirs(out):
        if pid == os.getpid() or not alive(pid):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = temp_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit_directory(tmp, out)


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


def _npy_header(dtype: np.dtype, count: int) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                                               "shape": (count,)})
    return buf.getvalue()


class NpyStream:
    """A 1-d .npy file written in pieces: numpy pads the header so that its size does not depend on
    the length, which is filled in on close."""

    def __init__(self, root: Path, name: str, dtype: np.dtype):
        self.root, self.name, self.dtype = root, name, np.dtype(dtype)
        self.count = 0
        self._file = open(root / name, "wb")
        self._size = len(_npy_header(self.dtype, 0))
        self._file.write(_npy_header(self.dtype, 0))

    def write(self, values: np.ndarray) -> None:
        data = np.ascontiguousarray(values, dtype=self.dtype)
        self._file.write(data.tobytes())
        self.count += len(data)

    def close(self) -> dict[str, Any]:
        """Write the final header; the file's entry for the manifest."""
        header = _npy_header(self.dtype, self.count)
        if len(header) != self._size:
            raise RuntimeError(f"{self.name}: .npy header grew from {self._size} to {len(header)} bytes")
        self._file.seek(0)
        self._file.write(header)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return {"file": self.name, "dtype": self.dtype.name, "sha256": domains.file_sha256(self.root / self.name)}


class DomainTable:
    """Domain names by id: the known ones first, then others as they first appear (in input order, so
    the same input gives the same ids whatever the number of workers)."""

    def __init__(self, field: str, known: tuple[str, ...] = (), unknown: str | None = None):
        self.field, self.unknown = field, unknown
        self.names: list[str] = list(known)
        self._ids = {name: i for i, name in enumerate(self.names)}

    def lookup(self, names: list[str | None]) -> np.ndarray:
        """Ids of a chunk's table of names (None: no domain, under --unknown-domain; without one the
        run fails once every document is counted, so any id does)."""
        ids = np.empty(len(names), dtype=domains.IDS_DTYPE)
        for i, name in enumerate(names):
            key = name if name is not None else (self.unknown or "")
            if key not in self._ids:
                if len(self.names) == domains.MAX_DOMAINS:
                    raise UserError(f"the domain field {self.field!r} has more than {domains.MAX_DOMAINS} distinct "
                                    "values: a domain names one of a few subsets of a corpus; choose another "
                                    "--domain-field")
                self._ids[key] = len(self.names)
                self.names.append(key)
            ids[i] = self._ids[key]
        return ids


class DomainWriter:
    """Per split: document ends, domain ids and per-domain counts, written as the parent receives
    each chunk's documents, in input order (memory does not grow with the corpus)."""

    def __init__(self, root: Path, splits: tuple[str, ...], table: DomainTable):
        self.table = table
        self.ends = {s: NpyStream(root, f"{s}/{domains.ENDS}", domains.ENDS_DTYPE) for s in splits}
        self.ids = {s: NpyStream(root, f"{s}/{domains.IDS}", domains.IDS_DTYPE) for s in splits}
        self.position = dict.fromkeys(splits, 0)
        self.tokens = {s: np.zeros(0, dtype=np.int64) for s in splits}
        self.docs = {s: np.zeros(0, dtype=np.int64) for s in splits}
        self.missing, self.missing_at = 0, None

    def add(self, names: list[str | None], doc_tokens: dict[str, np.ndarray], doc_domains: dict[str, np.ndarray],
            missing: int = 0, missing_at: str | None = None) -> None:
        """One chunk's documents: per split their token counts and indices into `names`."""
        lut = self.table.lookup(names)
        for split, lengths in doc_tokens.items():
            if not len(lengths):
                continue
            ids = lut[doc_domains[split]]
            ends = self.position[split] + np.cumsum(lengths, dtype=np.int64)
            self.ends[split].write(ends)
            self.ids[split].write(ids)
            self.position[split] = int(ends[-1])
            n = len(self.table.names)
            for totals, add in ((self.tokens, np.bincount(ids, weights=lengths, minlength=n).astype(np.int64)),
                                (self.docs, np.bincount(ids, minlength=n))):
                totals[split] = np.pad(totals[split], (0, n - len(totals[split]))) + add
        self.missing += missing
        self.missing_at = self.missing_at or missing_at

    def finish(self) -> dict[str, dict[str, Any]]:
        """Close the files; per split, its manifest entries ("by_domain", "documents")."""
        n = len(self.table.names)
        found = {}
        for split in self.ends:
            tokens, docs = (np.pad(t[split], (0, n - len(t[split]))) for t in (self.tokens, self.docs))
            found[split] = {
                "by_domain": {name: {"num_tokens": int(tokens[i]), "num_docs": int(docs[i])}
                              for i, name in enumerate(self.table.names)},
                "documents": {"ends": self.ends[split].close(), "domains": self.ids[split].close()}}
        return found
