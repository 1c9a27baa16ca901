"""The merge of `cpt prepare`'s tasks: every task's tokens, in task order, into the dataset's shards,
and their document indexes into the dataset's (domain ids renumbered in order of first appearance).

The result is the bytes one pass over the whole corpus writes: the same shards (each of
--shard-tokens tokens but the last), the same document index and domain ids. The merge reads only
the tasks' files, never the inputs; it starts over (removing what it had written) when a stopped
run is resumed, and refuses to run while a task is not done, naming it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from continual_pt.data import domains, encode, output, tasks
from continual_pt.errors import UserError

SPLITS = tasks.SPLITS
BLOCK = 1 << 22
"""Tokens (or documents) read at a time: the merge's memory does not grow with the corpus."""


@dataclass
class Totals:
    tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    docs: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    skipped: dict[str, int] = field(default_factory=dict)
    nbytes: int = 0
    seconds: float = 0.0
    index: output.DomainWriter | None = None
    """With domains: the document index written, its missing-domain count and the domain table."""
    by_split: dict[str, dict[str, Any]] = field(default_factory=dict)
    """With domains: each split's manifest entries ("by_domain", "documents")."""


def check_done(task_list: list[tasks.Task], records: dict[int, Any], failed: dict[int, Any], sources: list) -> None:
    """Refuse to merge while a task is not done: name the failed ones (with their error) and the missing."""
    problems = [f"task {i} ({r['input']}) failed: {r['error']}" for i, r in sorted(failed.items())]
    missing = [t for t in task_list if t.index not in records and t.index not in failed]
    problems += [f"task {t.index} ({t.describe(sources)}) is not done" for t in missing[:5]]
    if len(missing) > 5:
        problems.append(f"and {len(missing) - 5} more task(s) not done")
    if problems:
        raise UserError("cannot merge the tasks: " + "; ".join(problems))


def _copy_shard(path: Path, writer: output.ShardWriter, num_tokens: int) -> None:
    dtype = writer.dtype.newbyteorder("<")
    copied = 0
    with open(path, "rb") as f:
        while block := f.read(BLOCK * dtype.itemsize):
            tokens = np.frombuffer(block, dtype=dtype)
            writer.write(tokens)
            copied += len(tokens)
    if copied != num_tokens:
        raise UserError(f"{path}: {copied} tokens where its task recorded {num_tokens} (the file was changed after "
                        "its task was done)")


def _merge_index(root: Path, record: dict[str, Any], index: output.DomainWriter) -> None:
    """A task's document index into the dataset's: lengths from its ends, its domain ids through the table."""
    names = record["domains"]["names"]
    for split in SPLITS:
        ends = np.load(root / split / domains.ENDS, mmap_mode="r")
        ids = np.load(root / split / domains.IDS, mmap_mode="r")
        for start in range(0, len(ends), BLOCK):
            piece = np.asarray(ends[start:start + BLOCK], dtype=np.int64)
            lengths = np.diff(piece, prepend=np.int64(ends[start - 1]) if start else np.int64(0))
            index.add(names, {split: lengths}, {split: np.asarray(ids[start:start + BLOCK])})
    index.add(names, {}, {}, record["domains"]["missing"], record["domains"]["missing_at"])


def merge_tasks(work: Path, task_list: list[tasks.Task], records: dict[int, Any], dtype: str, shard_tokens: int,
                table: output.DomainTable | None) -> tuple[dict[str, list], Totals]:
    """Write the dataset's shards (and document index) in `work` from the done tasks; (shards, totals)."""
    for split in SPLITS:
        shutil.rmtree(work / split, ignore_errors=True)
    writers = {s: output.ShardWriter(work, s, encode.DTYPES[dtype], shard_tokens) for s in SPLITS}
    totals = Totals(index=output.DomainWriter(work, SPLITS, table) if table is not None else None)
    for task in task_list:
        record, root = records[task.index], tasks.tasks_dir(work) / task.name
        for split in SPLITS:
            try:
                for shard in record["shards"][split]:
                    _copy_shard(root / shard["file"], writers[split], shard["num_tokens"])
            except (UserError, OSError) as exc:
                (tasks.tasks_dir(work) / f"{task.name}{tasks.DONE}").unlink(missing_ok=True)
                raise UserError(f"{exc}: task {task.index} is no longer counted as done; run the same command again "
                                "to do it again") from None
            totals.tokens[split] += record["tokens"][split]
            totals.docs[split] += record["docs"][split]
        if totals.index is not None:
            _merge_index(root, record, totals.index)
        for key, n in record["skipped"].items():
            totals.skipped[key] = totals.skipped.get(key, 0) + n
        totals.nbytes += record["nbytes"]
        if task.index == len(task_list) // 2:
            tasks.kill_point("merge")
    if totals.index is not None:
        totals.by_split = totals.index.finish()
    return {s: w.finish() for s, w in writers.items()}, totals
