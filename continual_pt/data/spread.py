"""`cpt prepare` spread over the elements of a job array (launch/slurm/prepare.sbatch) or any set of
processes: element I of N (`--task-index I --task-count N`) does the tasks numbered I modulo N
(data/tasks.py) in the work folder `<out>.tmp-tasks` that every element shares, writing only its own
tasks' files and completion records (one file per task: two elements never write the same file);
`cpt prepare --merge`, chained after the array, writes the dataset once every task is done and
refuses, naming the tasks and the elements to run again, while one is missing or failed.

The first element to start writes the plan (tasks/plan.json, with N); every other element, a
resubmitted one and the merge check that theirs is the same and refuse, naming what differs. An
element stopped, cancelled or killed keeps the tasks it finished: run it again (same I and N) and it
does only the rest. The merged dataset is the one a single `cpt prepare` of the same inputs writes.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from continual_pt.data import merge, output, resume, tasks
from continual_pt.data.options import PrepareOptions
from continual_pt.errors import UserError

SHARES = "shares"
"""The plan's record of N, the number of elements the tasks are spread over."""


def shared_work(out: Path) -> Path:
    """The work folder that the elements writing `out` share."""
    return out.with_name(f"{out.name}{output.SHARED_SUFFIX}")


def _from_env(value: int | None, variable: str, flag: str) -> int:
    if value is not None:
        return value
    text = os.environ.get(variable)
    if not text:
        raise UserError(f"{flag} is needed (or ${variable}, which a SLURM job array sets)")
    try:
        return int(text)
    except ValueError:
        raise UserError(f"${variable}={text!r}: expected an integer (or pass {flag})") from None


def share(options: PrepareOptions) -> tuple[int, int] | None:
    """(I, N) of an element of a spread prepare, or None for a whole prepare in one process."""
    if options.task_index is None and options.task_count is None:
        return None
    index = _from_env(options.task_index, "SLURM_ARRAY_TASK_ID", "--task-index")
    count = _from_env(options.task_count, "SLURM_ARRAY_TASK_COUNT", "--task-count")
    if count < 1 or not 0 <= index < count:
        raise UserError(f"--task-index {index} --task-count {count}: the index must lie in 0..count-1 "
                        "(an array of N elements runs --task-count N; a resubmitted element gives the same N)")
    return index, count


def mine(task_list: list[tasks.Task], index: int, count: int) -> list[tasks.Task]:
    """The tasks of element `index` of `count`."""
    return [t for t in task_list if t.index % count == index]


def _claim_plan(root: Path, plan: dict[str, Any]) -> dict[str, Any] | None:
    """Write the plan unless another element has: then its plan (the first to link it wins)."""
    path = root / tasks.PLAN
    tmp = root / f"{tasks.PLAN}.{os.getpid()}.tmp"
    tasks.write_json(tmp, plan)
    try:
        os.link(tmp, path)
        return None
    except FileExistsError:
        return tasks.read_json(path)
    finally:
        tmp.unlink(missing_ok=True)


def _differences(work: Path, old: dict[str, Any], new: dict[str, Any], count: int) -> list[str]:
    """What differs between the shared plan and an element's, as far as done tasks and the layout care."""
    done = tasks.done_records(work, count)
    found = resume.changes(old, new, set(done))
    found += [f"the input of done task {i} changed since it was done" for i, record in sorted(done.items())
              if i < len(new["tasks"]) and record["inputs"] != new["tasks"][i]["inputs"]]
    return found


def _refuse(work: Path, found: list[str]) -> None:
    if found:
        raise UserError(f"{work} holds the tasks of a spread `cpt prepare` with other arguments or inputs: "
                        f"{'; '.join(found[:6])}{' and more' if len(found) > 6 else ''}; give every element and the "
                        f"merge the same arguments, or remove {work} to start again")


def open_shared(out: Path, plan: dict[str, Any], count: int, task_list: list[tasks.Task]) -> Path:
    """The shared work folder with the plan in it, checked against this element's."""
    work = shared_work(out)
    if (work / resume.MANIFEST).is_file():
        raise UserError(f"{work} holds the merged dataset of a finished array: run the merge "
                        f"(`cpt prepare ... --merge`) again to put it in place as {out}")
    root = tasks.tasks_dir(work)
    root.mkdir(parents=True, exist_ok=True)
    old = _claim_plan(root, {**plan, SHARES: count})
    if old is not None:
        _refuse(work, _differences(work, old, plan, len(task_list)))
        if old.get(SHARES) != count:
            raise UserError(f"{work}: its tasks are spread over {old.get(SHARES)} elements, this one says "
                            f"--task-count {count}: pass --task-count {old.get(SHARES)} (prepare.sbatch: "
                            f"TASKS={old.get(SHARES)} sbatch --array=I ...)")
    return work


def clear(work: Path, todo: list[tasks.Task]) -> None:
    """Before an element runs: the partial files and failure records of its tasks not done."""
    root = tasks.tasks_dir(work)
    for task in todo:
        shutil.rmtree(root / task.name, ignore_errors=True)
        for name in (f"{task.name}{tasks.FAILED}", f"{task.name}{tasks.DONE}.tmp"):
            (root / name).unlink(missing_ok=True)


def kept(work: Path, own: list[tasks.Task]) -> str:
    """What a stopped element keeps, in a few words."""
    records = tasks.done_records(work, max((t.index for t in own), default=-1) + 1)
    done = [i for i in records if i in {t.index for t in own}]
    tokens = sum(sum(records[i]["tokens"].values()) for i in done)
    return f"{len(done)} of this element's {len(own)} task(s) ({tokens:,} tokens) in {work}"


def elements(indices: list[int], count: int) -> str:
    """The array elements that do these tasks, as sbatch --array takes them."""
    return ",".join(str(i) for i in sorted({i % count for i in indices}))


def check_mergeable(work: Path, plan: dict[str, Any], task_list: list[tasks.Task], sources: list) -> None:
    """Refuse the merge unless the work folder holds every task of this plan, done."""
    if (work / resume.MANIFEST).is_file():
        return   # a merge stopped after writing the dataset: it only has to be put in place
    if not (tasks.tasks_dir(work) / tasks.PLAN).is_file():
        raise UserError(f"{work}: no tasks to merge; run the job array first (cpt prepare ... --task-index I "
                        "--task-count N, or launch/slurm/prepare.sbatch)")
    old = tasks.read_json(tasks.tasks_dir(work) / tasks.PLAN)
    _refuse(work, _differences(work, old, plan, len(task_list)))
    records, failed = tasks.done_records(work, len(task_list)), tasks.failed_records(work, len(task_list))
    try:
        merge.check_done(task_list, records, failed, sources)
    except UserError as exc:
        count = old.get(SHARES) or 1
        rerun = elements([t.index for t in task_list if t.index not in records], count)
        raise UserError(f"{exc}; {len(records)} of {len(task_list)} task(s) are done: run array element(s) {rerun} "
                        f"again (--task-count {count}; prepare.sbatch: TASKS={count} sbatch --array={rerun} ...), "
                        "then the merge") from None
