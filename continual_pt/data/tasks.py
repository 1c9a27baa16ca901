"""Units of work of `cpt prepare`: its inputs split into tasks, each writing its own shards and a
completion record, so that a stopped prepare keeps every task it finished.

The split is deterministic: one task per input file (a run of consecutive .txt files, which are read
grouped into chunks, is one task; a corpus layout's file is one task of its split), and one task per
source that is not a list of files (a saved dataset, the built-in sources), but a hub dataset
(hf:NAME), which makes a task of each of its own files, streaming that file alone. A task reads the
same chunks the whole corpus would give it, so the merge of the tasks' tokens, in task order, is the
stream one pass over the corpus writes. While a prepare runs, its temporary directory holds:

    tasks/plan.json           the arguments, the tokenizer's hash and every task's inputs (written first)
    tasks/<task>/             a task's own shards and document index, while and after it runs
    tasks/<task>.done.json    written (temp name, fsync, rename) once the task's files are complete
    tasks/<task>.failed.json  the error of a task whose input is bad

Any subset of the tasks can be done on its own (data/runner.py `run_tasks`: a rerun does those without
a completion record; task i of N could be one element of a job array), each task writing only its own
files; data/merge.py merges them once all are done.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from continual_pt.data import encode, output
from continual_pt.data.dataset import TASKS_DIR
from continual_pt.data.encode import Chunk
from continual_pt.data.formats import FileSource, file_format, file_info
from continual_pt.data.layouts import LayoutSource
from continual_pt.data.sources import HubSource
from continual_pt.files import fsync_dir

PLAN = "plan.json"
DONE = ".done.json"
FAILED = ".failed.json"
SPLITS = ("train", "val")
UNCOMPARED = ("workers", "quiet", "overwrite", "status", "task_index", "task_count", "merge")
"""Options a rerun may change: how the work is done, not what it writes."""
KILL_AT = "CPT_PREPARE_KILL_AT"
"""For tests only: `<point>[:<signal>]` sends the signal (default SIGKILL, as a node failure) to this process
when it reaches the point: `task-<k>` (after this run's k-th completion record), `merge` (halfway through
the merge) or `cleanup` (after the manifest, the tasks' files removed but the plan)."""


def kill_point(name: str) -> None:
    """Signal this process here if CPT_PREPARE_KILL_AT names this point (the tests of resuming)."""
    point, _, signame = os.environ.get(KILL_AT, "").partition(":")
    if point == name:
        os.kill(os.getpid(), signal.Signals[signame or "SIGKILL"])


@dataclass(frozen=True)
class Task:
    """One unit of work: some files of one source (all of it when `files` is empty)."""

    index: int
    source: int
    files: tuple[Path, ...] = ()
    split: str | None = None
    """A corpus layout's split of these files; None: by hash."""
    part: int | None = None
    """A hub dataset's file (sources.HubSource.parts), read alone."""

    @property
    def name(self) -> str:
        return f"{self.index:06d}"

    def describe(self, sources: list) -> str:
        """The task for messages: its file(s), or its source."""
        if self.part is not None:
            return sources[self.source].parts()[self.part]
        if not self.files:
            return sources[self.source].spec
        more = f" and {len(self.files) - 1} more file(s)" if len(self.files) > 1 else ""
        return f"{self.files[0]}{more}"

    def inputs(self, sources: list) -> Any:
        """What identifies the task's input (paths, sizes, mtimes), compared on a rerun."""
        if self.part is not None:
            parts = sources[self.source].parts()
            return {"file": parts[self.part], "part": self.part, "of": len(parts)}
        if not self.files:
            return sources[self.source].fingerprint()
        return [file_info(p) for p in self.files]


def _file_tasks(source: int, files: list[Path], split: str | None, start: int) -> list[Task]:
    tasks: list[Task] = []
    texts: list[Path] = []
    for path in files:
        if file_format(path) == ".txt":
            texts.append(path)
            continue
        if texts:
            tasks.append(Task(start + len(tasks), source, tuple(texts), split))
            texts = []
        tasks.append(Task(start + len(tasks), source, (path,), split))
    if texts:
        tasks.append(Task(start + len(tasks), source, tuple(texts), split))
    return tasks


def split_tasks(sources: list) -> list[Task]:
    """The tasks of a prepare's resolved sources, in the order their tokens are written."""
    tasks: list[Task] = []
    for i, source in enumerate(sources):
        if isinstance(source, LayoutSource):
            for split, paths in source.files.items():
                tasks += _file_tasks(i, paths, split, len(tasks))
        elif isinstance(source, FileSource):
            tasks += _file_tasks(i, source.files, None, len(tasks))
        elif isinstance(source, HubSource) and len(source.parts()) > 1:
            tasks += [Task(len(tasks) + k, i, part=k) for k in range(len(source.parts()))]
        else:
            tasks.append(Task(len(tasks), i))
    return tasks


def task_chunks(task: Task, sources: list, text_field: str, chunk_bytes: int,
                domain_field: str | None) -> Iterator[Chunk]:
    """The chunks of one task: those a pass over its whole source gives for its files."""
    source = sources[task.source]
    if task.part is not None:
        yield from source.chunks(text_field, chunk_bytes, domain_field, part=task.part)
        return
    if not task.files:
        yield from source.chunks(text_field, chunk_bytes, domain_field)
        return
    for chunk in FileSource(source.spec, list(task.files)).chunks(text_field, chunk_bytes, domain_field):
        yield chunk if task.split is None else replace(chunk, split=task.split)


# --------------------------------------------------------------------------- records

def tasks_dir(work: Path) -> Path:
    return work / TASKS_DIR


def write_json(path: Path, data: Any) -> None:
    """Write `path` whole or not at all: a temporary name, fsync, rename, fsync of the folder."""
    tmp = path.with_name(f"{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _records(work: Path, count: int, suffix: str) -> dict[int, dict[str, Any]]:
    """The records named `<task><suffix>` in `work`, by task index: one listing of the folder, then only
    the files there are read (tens of thousands of tasks on a parallel file system)."""
    root = tasks_dir(work)
    try:
        names = set(os.listdir(root))
    except FileNotFoundError:
        return {}
    return {i: read_json(root / f"{i:06d}{suffix}") for i in range(count) if f"{i:06d}{suffix}" in names}


def done_records(work: Path, count: int) -> dict[int, dict[str, Any]]:
    """The completion records in `work`, by task index."""
    return _records(work, count, DONE)


def failed_records(work: Path, count: int) -> dict[int, dict[str, Any]]:
    return _records(work, count, FAILED)


def record_failure(work: Path, task: Task, sources: list, message: str) -> None:
    """Mark a task failed (its partial files removed): the merge refuses to run until a rerun does it."""
    shutil.rmtree(tasks_dir(work) / task.name, ignore_errors=True)
    write_json(tasks_dir(work) / f"{task.name}{FAILED}",
               {"task": task.index, "input": task.describe(sources), "error": message})


def clear_unfinished(work: Path, tasks: list[Task], done: dict[int, Any]) -> None:
    """Before a run: remove the partial files and failure records of every task not done."""
    root = tasks_dir(work)
    for task in tasks:
        if task.index not in done:
            shutil.rmtree(root / task.name, ignore_errors=True)
            (root / f"{task.name}{FAILED}").unlink(missing_ok=True)
    for stale in root.glob(f"*{DONE}.tmp"):
        stale.unlink()


class TaskWriter:
    """One task's shards (and document index, with domains), then its completion record."""

    def __init__(self, work: Path, task: Task, dtype: str, shard_tokens: int, table: output.DomainTable | None):
        self.work, self.task = work, task
        self.root = tasks_dir(work) / task.name
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True)
        self.shards = {s: output.ShardWriter(self.root, s, encode.DTYPES[dtype], shard_tokens) for s in SPLITS}
        self.index = output.DomainWriter(self.root, SPLITS, table) if table is not None else None
        self.tokens, self.docs = dict.fromkeys(SPLITS, 0), dict.fromkeys(SPLITS, 0)
        self.skipped: dict[str, int] = {}
        self.nbytes = 0

    def add(self, enc: encode.Encoded) -> None:
        """One encoded chunk of the task, in order."""
        for split in SPLITS:
            self.shards[split].write(enc.tokens[split])
            self.tokens[split] += len(enc.tokens[split])
            self.docs[split] += enc.docs[split]
        if self.index is not None:
            self.index.add(enc.domain_names, enc.doc_tokens, enc.doc_domains, enc.missing_domain, enc.missing_at)
        for key, n in enc.skipped.items():
            self.skipped[key] = self.skipped.get(key, 0) + n
        self.nbytes += enc.nbytes

    def finish(self, inputs: Any) -> dict[str, Any]:
        """Close the files, flush them, then write the completion record; returns it."""
        record: dict[str, Any] = {"task": self.task.index, "inputs": inputs, "tokens": self.tokens,
                                  "docs": self.docs, "skipped": self.skipped, "nbytes": self.nbytes,
                                  "shards": {s: w.finish() for s, w in self.shards.items()}, "domains": None}
        if self.index is not None:
            record["domains"] = {"names": self.index.table.names, "missing": self.index.missing,
                                 "missing_at": self.index.missing_at}
            self.index.finish()
        for split in SPLITS:
            fsync_dir(self.root / split)
        fsync_dir(self.root)
        write_json(tasks_dir(self.work) / f"{self.task.name}{DONE}", record)
        return record
