"""Downstream tasks in `cpt eval`: EleutherAI's lm-evaluation-harness run through its Python API on the
model and tokenizer `cpt eval` has loaded (no export, no copy of a checkpoint on disk).

    cpt eval runs/rewarm --set pile=data/pile --lm-eval hellaswag,arc_easy --num-fewshot 0

Each name given to --lm-eval (a task, a group or a tag of the harness, or of an --include-path folder
of task YAMLs) is a *request*. A request is evaluated with one `simple_evaluate` call, so every entry of
its results (the task, or a group and its subtasks) is a row of its own in the scores store, beside
the loss rows; its fields are those of lm-eval's own results (metrics and their stderr). A request is
done for a checkpoint when the store has a row of it with the same request version, harness version,
--num-fewshot, --lm-eval-limit and dtype (REQUEST_FIELDS); rows that differ in any of them are other
measurements and are never mixed.

Under several ranks (torchrun, deepspeed, srun, mpirun) the requests are shared out: rank r evaluates
requests r, r + world size, ... on its own copy of the model, and rank 0 stores them all. The harness
itself runs single-process on a model it is handed (it does not split one task's documents over ranks).
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from continual_pt.errors import UserError

INSTALL = "pip install -e '.[lm-eval]' (in a clone) or pip install 'lm-eval==0.4.13'"
REQUEST_FIELDS = ("checkpoint", "request", "request_version", "harness", "num_fewshot", "limit", "dtype")
"""What makes a request one measurement of a checkpoint: done once, never scored twice."""
OFFLINE_HELP = ("make its data available offline: run the task once where the network is reachable (the "
                "datasets cache, HF_DATASETS_CACHE, keeps it), or define the task in a local YAML over local "
                "files (dataset_path: json, dataset_kwargs.data_files) and pass its folder with --include-path")


def request_key(row: dict[str, Any]) -> tuple:
    """The identity of the request that produced (or will produce) a row (see REQUEST_FIELDS)."""
    return tuple(row.get(k) for k in REQUEST_FIELDS)


def harness_version() -> str:
    """`lm-eval <version>` of the installed harness; a UserError saying how to install it when it is not."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError(f"--lm-eval needs lm-evaluation-harness, which is not installed: {INSTALL}") from None
    return f"lm-eval {importlib_metadata.version('lm-eval')}"


def parse_limit(value: str | None) -> int | float | None:
    """--lm-eval-limit: a number of documents per task, or a fraction of them below 1."""
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        raise UserError(f"--lm-eval-limit {value!r}: expected a number of documents (e.g. 100) or a "
                        "fraction below 1 (e.g. 0.1)") from None
    if number <= 0:
        raise UserError(f"--lm-eval-limit must be > 0, got {value}")
    if number < 1:
        return number
    if number != int(number):
        raise UserError(f"--lm-eval-limit {value}: a count of documents must be a whole number")
    return int(number)


def parse_batch_size(value: str) -> int | str:
    """--lm-eval-batch-size: a count, or the harness's `auto` / `auto:N`."""
    if value.startswith("auto"):
        return value
    if not value.isdigit() or int(value) < 1:
        raise UserError(f"--lm-eval-batch-size {value!r}: expected a count >= 1, auto or auto:N")
    return int(value)


@dataclass
class Harness:
    """The requests of one `cpt eval`, checked and their data loaded once, and how they are evaluated."""

    requests: list[str]
    versions: dict[str, Any]
    version: str
    num_fewshot: int | None
    limit: int | float | None
    batch_size: int | str
    manager: Any
    members: dict[str, set[str]]
    """Per request, the tasks and groups it stands for (a group's subtasks, a tag's tasks)."""

    def skeleton(self, request: str) -> dict[str, Any]:
        """The fields every row of `request` carries whatever the checkpoint (REQUEST_FIELDS but two)."""
        return {"request": request, "request_version": self.versions[request], "harness": self.version,
                "num_fewshot": self.num_fewshot, "limit": self.limit}


@contextmanager
def _quiet(name: str):
    """The harness's warnings that say nothing to our users (it is handed a model instance on purpose)."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextmanager
def _single_process():
    """LOCAL_RANK 0 for the harness while it evaluates this rank's own requests on this rank's own model:
    it returns its results only where LOCAL_RANK is 0 (it takes any other for a tensor-parallel peer)."""
    before = os.environ.get("LOCAL_RANK")
    os.environ["LOCAL_RANK"] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("LOCAL_RANK", None)
        else:
            os.environ["LOCAL_RANK"] = before


def _task_names(specs: list[str]) -> list[str]:
    names = [n.strip() for spec in specs for n in spec.split(",")]
    if any(not n for n in names):
        raise UserError(f"--lm-eval {','.join(specs)!r}: an empty task name; give names separated by commas, "
                        "e.g. --lm-eval hellaswag,arc_easy")
    return list(dict.fromkeys(names))


def _manager(include_paths: list[str], local: bool = False):
    """The harness's task index over its own tasks and the --include-path folders, or (`local`) over the
    folders alone: indexing lm-eval's thousands of built-in YAMLs takes seconds."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_paths) or None, include_defaults=not local)


class DataUnavailable(UserError):
    """A task's data cannot be had (the hub unreachable, a data file missing)."""


def _load_data(manager, name: str) -> set[str]:
    """Build the task(s) of one request now, so that missing data fails before any checkpoint is scored;
    the names of its tasks and groups (the entries of its results)."""
    try:
        built = manager.load([name])
        return {name, *built["tasks"], *built.get("groups", {})}
    except (ConnectionError, OSError, TimeoutError) as exc:
        text = (str(exc).strip() or repr(exc)).splitlines()[0]
        raise DataUnavailable(f"lm-eval task {name}: its data could not be loaded ({type(exc).__name__}: "
                              f"{text}); {OFFLINE_HELP}") from None
    except Exception as exc:   # noqa: BLE001  (a task YAML of the user's that the harness cannot build)
        raise UserError(f"lm-eval task {name} could not be built: {type(exc).__name__}: "
                        f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from None


def _checked_manager(include_paths: list[str], names: list[str]):
    """A task index that knows every requested name, with each request's data loaded once (the index of
    the --include-path folders alone when it suffices)."""
    for folder in include_paths:
        if not Path(folder).is_dir():
            raise UserError(f"--include-path {folder}: not a folder (it should hold lm-eval task YAML files)")
    if include_paths:
        local = _manager(include_paths, local=True)
        if all(n in local.task_index for n in names):
            try:
                return local, {name: _load_data(local, name) for name in names}
            except DataUnavailable:
                raise
            except UserError:
                pass   # a local task built on lm-eval's own ones: index both
    manager = _manager(include_paths)
    unknown = [n for n in names if n not in manager.task_index]
    if unknown:
        where = " or in --include-path " + ", ".join(include_paths) if include_paths else \
            " (a task of your own: --include-path DIR with its YAML)"
        raise UserError(f"--lm-eval: unknown task(s) {', '.join(unknown)}: not in lm-eval's tasks{where}; "
                        "`lm_eval ls tasks` lists them")
    return manager, {name: _load_data(manager, name) for name in names}


def open_harness(specs: list[str], include_paths: list[str], num_fewshot: int | None, limit: str | None,
                 batch_size: str) -> Harness | None:
    """The checked requests of --lm-eval (None without it): installed, known by name, data loadable."""
    if not specs:
        return None
    version = harness_version()
    if num_fewshot is not None and num_fewshot < 0:
        raise UserError(f"--num-fewshot must be >= 0, got {num_fewshot}")
    count, size, names = parse_limit(limit), parse_batch_size(batch_size), _task_names(specs)
    manager, members = _checked_manager(include_paths, names)
    versions = {n: ((manager.task_index[n].cfg or {}).get("metadata") or {}).get("version") for n in names}
    return Harness(names, versions, version, num_fewshot, count, size, manager, members)


# --------------------------------------------------------------------------- evaluation


def _metrics(entry: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metric -> value, metric -> stderr) of one results entry; the filter `none` is dropped from names."""
    values: dict[str, Any] = {}
    errors: dict[str, Any] = {}
    for key, value in entry.items():
        metric, comma, kind = key.partition(",")
        if not comma:
            continue   # alias, name, sample_len
        value = None if value == "N/A" else value
        base, is_stderr = (metric[:-len("_stderr")], True) if metric.endswith("_stderr") else (metric, False)
        name = base if kind == "none" else f"{base},{kind}"
        (errors if is_stderr else values)[name] = value
    return values, {k: errors.get(k) for k in values}


def _rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The store rows (without the checkpoint's and request's fields) of `simple_evaluate` results."""
    rows = []
    for task, entry in results["results"].items():
        values, errors = _metrics(entry)
        samples = (results.get("n-samples") or {}).get(task, {})
        rows.append({"task": task, "task_version": results.get("versions", {}).get(task),
                     "n_shot": results.get("n-shot", {}).get(task), "samples": samples.get("effective"),
                     "metrics": values, "stderr": errors,
                     "higher_is_better": results.get("higher_is_better", {}).get(task, {})})
    return rows


def _disjoint(harness: Harness, requests: list[str]) -> list[list[str]]:
    """The requests in as few batches as can be evaluated together: the harness refuses a task named by
    two requests of one call (a task and a group holding it)."""
    batches: list[tuple[list[str], set[str]]] = []
    for request in requests:
        for names, covered in batches:
            if not covered & harness.members[request]:
                names.append(request)
                covered |= harness.members[request]
                break
        else:
            batches.append(([request], set(harness.members[request])))
    return [names for names, _ in batches]


def evaluate(harness: Harness, model, tokenizer, requests: list[str], world_size: int) -> list[dict[str, Any]]:
    """Rows of `requests` for a loaded model (the checkpoint's fields are added by the caller): one
    `simple_evaluate` over them all as the harness's CLI runs (or one per batch of requests that share no
    task), each entry of its results a row of every request that stands for it."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    with _quiet("lm_eval.models.huggingface"):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=harness.batch_size)
    rows = []
    for batch in _disjoint(harness, requests):
        started = time.monotonic()
        try:
            with _single_process():
                results = lm_eval.simple_evaluate(model=lm, tasks=batch, num_fewshot=harness.num_fewshot,
                                                  limit=harness.limit, task_manager=harness.manager,
                                                  log_samples=False)
        except AssertionError as exc:   # how the harness refuses a document the model cannot take
            raise UserError(f"lm-eval task(s) {', '.join(batch)} cannot run on this model (context "
                            f"{lm.max_length} tokens): the harness stopped at `{_failed_check(exc)}`; a task "
                            "whose answers are longer than the model's context cannot be scored") from None
        extra = {"world_size": world_size, "seconds": round(time.monotonic() - started, 3),
                 "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        rows += [{**harness.skeleton(request), **row, **extra}
                 for request in batch for row in _rows(results) if row["task"] in harness.members[request]]
    return sorted(rows, key=lambda row: requests.index(row["request"]))


def _failed_check(exc: AssertionError) -> str:
    """The source line of the failed assertion (the harness's asserts carry no message)."""
    frames = traceback.extract_tb(exc.__traceback__)
    return str(exc) or (frames[-1].line if frames else "an assertion")


def describe(row: dict[str, Any]) -> str:
    """One line of a task row's metrics, as the harness prints them (4 decimals, ± stderr)."""
    parts = []
    for name, value in row["metrics"].items():
        err = row["stderr"].get(name)
        shown = "nan" if value is None else f"{value:.4f}"
        parts.append(f"{name} {shown}" + (f" ± {err:.4f}" if isinstance(err, (int, float)) else ""))
    return f"{row['task']} ({row['n_shot']}-shot, {row['samples']} docs): {', '.join(parts)}"
