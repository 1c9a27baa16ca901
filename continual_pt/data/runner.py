"""Running `cpt prepare`'s tasks on this machine: the parent reads each task's chunks in order, a pool
of `--workers` processes parses and tokenizes them, and the parent writes each task's shards and, once
they are complete, its completion record (data/tasks.py).

Chunks flow through the pool across task boundaries (no pause between tasks), at most 2 x workers of
them in flight, so memory does not depend on the size of the corpus. A task whose input is bad (a
broken record, a truncated file) fails alone, recorded with the file and line; the others go on.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from tqdm import tqdm

from continual_pt.data import encode, output, sources, tasks
from continual_pt.data.options import PrepareOptions
from continual_pt.errors import UserError

Item = tuple[tasks.Task, str, Any]
"""(task, kind, value): kind "start", "chunk" (a Chunk; "encoded" once tokenized), "end" or "error" (a message)."""


@dataclass
class Run:
    """What one run of tasks did."""

    done: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    tokens: int = 0
    nbytes: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class Job:
    """What every task of a run shares."""

    work: Path
    srcs: list
    plan: dict[str, Any]
    tokenizer: tuple
    """init_worker's arguments: tokenizer json, eos id, dtype, val fraction, text field, domain field."""
    dtype: str
    options: PrepareOptions
    domain_field: str | None
    known_domains: tuple[str, ...]


def _items(job: Job, todo: list[tasks.Task], failed: dict[int, str]) -> Iterator[Item]:
    """Every task's chunks in order between its start and end; a reading error ends the task's chunks."""
    for task in todo:
        yield task, "start", None
        try:
            for chunk in tasks.task_chunks(task, job.srcs, job.options.text_field, sources.CHUNK_BYTES,
                                           job.domain_field):
                if task.index in failed:
                    break
                yield task, "chunk", chunk
        except UserError as exc:
            yield task, "error", str(exc)
            continue
        yield task, "end", None


def _result(task: tasks.Task, kind: str, value: Any) -> Item:
    if kind != "chunk":
        return task, kind, value
    try:
        return task, "encoded", value.result() if isinstance(value, Future) else encode.encode_chunk(value)
    except UserError as exc:
        return task, "error", str(exc)


def _in_order(items: Iterator[Item], workers: int, init_args: tuple) -> Iterator[Item]:
    """The items with each chunk tokenized, in input order, at most 2 x workers chunks in flight."""
    if workers == 1:
        encode.init_worker(*init_args, parent_pid=None)
        yield from (_result(*item) for item in items)
        return
    # spawn: the parent may hold threads (tqdm, torch) that make fork unsafe. An executor rather
    # than multiprocessing.Pool: a worker killed by the OOM killer fails the run instead of hanging it.
    executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=partial(encode.init_worker, parent_pid=os.getpid()),
                                   initargs=init_args)
    try:
        pending: deque = deque()
        for task, kind, value in items:
            pending.append((task, kind, executor.submit(encode.encode_chunk, value) if kind == "chunk" else value))
            if len(pending) >= 2 * workers:
                yield _result(*pending.popleft())
        while pending:
            yield _result(*pending.popleft())
    except BrokenProcessPool:
        raise UserError("a tokenizer process died (out of memory?); run again with fewer --workers") from None
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def _table(job: Job) -> output.DomainTable | None:
    if job.domain_field is None:
        return None
    return output.DomainTable(job.domain_field, job.known_domains, job.options.unknown_domain)


def _step(job: Job, run: Run, writer: tasks.TaskWriter | None, item: Item) -> tasks.TaskWriter | None:
    """One item of the stream; returns the open task's writer."""
    task, kind, value = item
    if kind == "start":
        return tasks.TaskWriter(job.work, task, job.dtype, job.options.shard_tokens, _table(job))
    if kind == "error":
        raise UserError(value)
    if kind == "encoded":
        writer.add(value)
        run.nbytes += value.nbytes
        return writer
    record = writer.finish(job.plan["tasks"][task.index]["inputs"])
    run.done.append(task.index)
    run.tokens += sum(record["tokens"].values())
    tasks.kill_point(f"task-{len(run.done)}")
    return None


def run_tasks(job: Job, todo: list[tasks.Task], workers: int) -> Run:
    """Do `todo` (in order) with `workers` processes; each done task leaves its completion record."""
    run = Run()
    writer = None
    start = time.perf_counter()
    with tqdm(desc="tokenizing", unit="tok", unit_scale=True, disable=job.options.quiet, smoothing=0.1) as bar:
        for item in _in_order(_items(job, todo, run.failed), workers, job.tokenizer):
            task, kind, value = item
            if task.index in run.failed:
                continue
            try:
                writer = _step(job, run, writer, item)
            except UserError as exc:
                run.failed[task.index] = str(exc)
                tasks.record_failure(job.work, task, job.srcs, str(exc))
                writer = None
            if kind == "encoded":
                bar.update(sum(len(t) for t in value.tokens.values()))
                bar.set_postfix_str(f"{run.nbytes / 1e6:.0f} MB, task {task.index + 1}/{len(job.plan['tasks'])}",
                                    refresh=False)
    run.seconds = time.perf_counter() - start
    return run
