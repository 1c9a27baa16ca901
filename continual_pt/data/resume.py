"""Resuming `cpt prepare`: a stopped run's temporary directory is taken over by a rerun that would
write the same thing, refused (naming what changed) when its kept tasks would not fit, and reported
by `cpt prepare --status OUT`.

A rerun compares the stopped run's plan (data/tasks.py) with its own: the options that decide what is
written (all but --workers, --quiet, --overwrite), the tokenizer's hash, the shard dtype, the task
layout, and the inputs (path, size, mtime) of every task that was done. A task not done may have its
input changed (a truncated file fetched again): it is done afresh.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from continual_pt.data import output, tasks
from continual_pt.data.options import PrepareOptions
from continual_pt.errors import UserError

MANIFEST = "manifest.json"


def plan_record(options: PrepareOptions, tokenizer_sha256: str, dtype: str, task_list: list[tasks.Task],
                sources: list) -> dict[str, Any]:
    """What a run writes, as its tasks/plan.json records it (JSON types, so that it compares as read back)."""
    args = {k: v for k, v in asdict(options).items() if k not in tasks.UNCOMPARED}
    record = {"args": args, "tokenizer_sha256": tokenizer_sha256, "dtype": dtype,
              "tasks": [{"input": t.describe(sources), "split": t.split, "inputs": t.inputs(sources)}
                        for t in task_list]}
    return json.loads(json.dumps(record))


def _flag(key: str) -> str:
    return "--source" if key == "sources" else f"--{key.replace('_', '-')}"


def _input_change(old: Any, new: Any) -> str:
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for a, b in zip(old, new, strict=True):
            for key in ("size", "mtime_ns"):
                if a.get(key) != b.get(key):
                    return f"{b.get('path')}: {key} {a.get(key)} then, {b.get(key)} now"
    return "its fingerprint differs"


def changes(old: dict[str, Any], new: dict[str, Any], done: set[int]) -> list[str]:
    """What differs between a stopped run's plan and this one's, as far as its done tasks care."""
    found = [f"{_flag(k)}: {old['args'].get(k)!r} then, {new['args'].get(k)!r} now"
             for k in sorted(set(old["args"]) | set(new["args"])) if old["args"].get(k) != new["args"].get(k)]
    if old["tokenizer_sha256"] != new["tokenizer_sha256"]:
        found.append(f"the tokenizer: sha256 {old['tokenizer_sha256'][:12]}... then, "
                     f"{new['tokenizer_sha256'][:12]}... now")
    if old["dtype"] != new["dtype"]:
        found.append(f"the shard dtype: {old['dtype']} then, {new['dtype']} now")
    before, now = old["tasks"], new["tasks"]
    if len(before) != len(now):
        found.append(f"the inputs: {len(before)} task(s) then, {len(now)} now")
    for i, (a, b) in enumerate(zip(before, now)):
        if (a["input"], a["split"]) != (b["input"], b["split"]):
            found.append(f"task {i}: {a['input']} then, {b['input']} now")
        elif i in done and a["inputs"] != b["inputs"]:
            found.append(f"the input of done task {i} changed ({_input_change(a['inputs'], b['inputs'])})")
    return found


def _stopped_run(out: Path) -> Path | None:
    """The newest temporary directory of a run that is gone and left a plan; older leftovers are removed."""
    keep = None
    for path, pid in output.temp_dirs(out):
        if pid != os.getpid() and output.alive(pid):
            continue
        if keep is None and (tasks.tasks_dir(path) / tasks.PLAN).is_file():
            keep = path
        else:
            shutil.rmtree(path, ignore_errors=True)
    return keep


def open_work(out: Path, plan: dict[str, Any], task_list: list[tasks.Task], overwrite: bool) -> tuple[Path, int]:
    """This run's temporary directory, with its plan written: a stopped run's, taken over when its done
    tasks fit this run, else a new one; and how many tasks are already done."""
    work = output.temp_path(out)
    stopped = _stopped_run(out)
    done: dict[int, Any] = {}
    if stopped is not None:
        done = tasks.done_records(stopped, len(task_list))
        merged = (stopped / MANIFEST).is_file()   # stopped while removing the tasks' files: all were done
        kept = set(range(len(task_list))) if merged else set(done)
        found = changes(tasks.read_json(tasks.tasks_dir(stopped) / tasks.PLAN), plan, kept)
        if found and kept and not overwrite:
            raise UserError(f"{stopped} holds {len(kept)} done task(s) of `cpt prepare {out}` with other arguments or "
                            f"inputs: {'; '.join(found[:6])}{' and more' if len(found) > 6 else ''}; run the same "
                            "command as before to finish it, or pass --overwrite to start again")
        if found or not kept:
            shutil.rmtree(stopped)
            stopped, done = None, {}
    if stopped is not None:
        try:
            os.rename(stopped, work)
        except FileNotFoundError:
            raise UserError(f"another process took over {stopped} as this one started; wait for it or stop it") from None
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        tasks.tasks_dir(work).mkdir(parents=True)
    tasks.clear_unfinished(work, task_list, done)
    tasks.write_json(tasks.tasks_dir(work) / tasks.PLAN, plan)
    return work, len(done)


def remove_tasks(work: Path, task_list: list[tasks.Task]) -> None:
    """Once the merged dataset and its manifest are written: the tasks' files, the plan last."""
    root = tasks.tasks_dir(work)
    for task in task_list:
        shutil.rmtree(root / task.name, ignore_errors=True)
        for suffix in (tasks.DONE, tasks.FAILED):
            (root / f"{task.name}{suffix}").unlink(missing_ok=True)
    tasks.kill_point("cleanup")
    shutil.rmtree(root, ignore_errors=True)   # the plan, last: a run stopped before this finds the merged dataset and commits it


def status(out: Path) -> list[str]:
    """`cpt prepare --status OUT`: the state of a prepare writing OUT, or of the dataset it wrote."""
    shared = out.with_name(f"{out.name}{output.SHARED_SUFFIX}")
    found: list[tuple[Path, int | None]] = [*output.temp_dirs(out), *([(shared, None)] if shared.is_dir() else [])]
    if not found:
        if (out / MANIFEST).is_file():
            manifest = tasks.read_json(out / MANIFEST)
            splits = manifest["splits"]
            return [f"{out}: complete: {len(manifest.get('tasks', []))} task(s) done, "
                    f"{sum(s['num_tokens'] for s in splits.values()):,} tokens, "
                    f"{sum(s['num_docs'] for s in splits.values()):,} documents"]
        return [f"{out}: no prepared dataset and no prepare in progress"]
    return [line for work, pid in found for line in _work_status(work, pid)]


def _work_status(work: Path, pid: int | None) -> list[str]:
    """The state of one work folder: a process's (`pid`), or the shared one of a job array (None)."""
    plan_path = tasks.tasks_dir(work) / tasks.PLAN
    alive = pid is None or output.alive(pid)
    state = f"running (pid {pid})" if pid is not None and alive else "stopped (run the same command again to resume)"
    if pid is None:
        shares = tasks.read_json(plan_path).get("shares") if plan_path.is_file() else None
        state = f"spread over {shares or '?'} element(s) (--task-count), then --merge"
    if not plan_path.is_file():
        return [f"{work}: {state}: starting or finishing, no tasks recorded"]
    count = len(tasks.read_json(plan_path)["tasks"])
    done, failed = tasks.done_records(work, count), tasks.failed_records(work, count)
    rest = count - len(done) - len(failed)
    tokens = sum(sum(r["tokens"].values()) for r in done.values())
    lines = [f"{work}: {state}: {count} task(s): {len(done)} done, {len(failed)} failed, "
             f"{rest} {'running or to do' if alive else 'absent'}; {tokens:,} tokens so far"
             + ("; merging" if (work / MANIFEST).is_file() or (work / "train").is_dir() else "")]
    lines += [f"  failed: task {i} ({r['input']}): {r['error']}" for i, r in sorted(failed.items())]
    return lines
