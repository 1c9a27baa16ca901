"""`cpt sweep --submit`: each run as a SLURM training job with its eval array chained.

Per run: `sbatch train.sbatch` (CONFIG, OUT_DIR and NAME from the sweep, PYTHON this interpreter
unless PYTHON is set), then, if the run has held-out sets, `sbatch --array=0-<N-1>
--dependency=afterok:<train job> --kill-on-invalid-dep=yes eval.sbatch <run dir> --set ...`,
N the committed checkpoints the run will have at its end (max_steps / every_steps, capped by
keep_last, plus the keep_every ones). A train job that stops and requeues itself keeps its id, so
the array still waits for it; one that fails cancels the array.

The job ids go to `<sweep dir>/jobs.json` (written atomically after each run, under a lock, so
two submits at once cannot both submit a run). A run is submitted again only when it is not
finished and none of its recorded jobs is live (pending, running, requeued: anything `squeue`
does not show in a final state); a stale eval array that can never start is cancelled first.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from continual_pt.config import RunConfig
from continual_pt.errors import UserError
from continual_pt.files import atomic_write_text
from continual_pt.sweep.grid import PlannedRun, Sweep
from continual_pt.sweep.runs import run_state

JOBS_FILE = "jobs.json"
SCRIPTS = ("train.sbatch", "eval.sbatch")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED", "SPECIAL_EXIT", "REVOKED"}
NEVER = "DependencyNeverSatisfied"

LAUNCHER_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")


@dataclass(frozen=True)
class Task:
    """One job, or one task of an array, as squeue shows it."""

    id: str       # 123, or 123_4 for an array task
    state: str    # PENDING, RUNNING, COMPLETED, FAILED, ...
    reason: str   # Dependency, BeginTime, None, NonZeroExitCode, DependencyNeverSatisfied, ...

    @property
    def live(self) -> bool:
        return self.state not in FINAL_STATES and self.reason != NEVER


# --------------------------------------------------------------------------- the queue


def slurm_here() -> bool:
    """Whether SLURM's client commands are installed here."""
    return shutil.which("squeue") is not None


def query_jobs(ids: list[str]) -> dict[str, list[Task]]:
    """Job id -> its tasks (one for a plain job), for the ids SLURM still knows; others are absent."""
    ids = sorted({i for i in ids if i}, key=lambda i: (len(i), i))
    if not ids:
        return {}
    try:
        proc = subprocess.run(["squeue", "--noheader", "--array", "--states=all", "--format=%F|%i|%T|%r",
                               f"--jobs={','.join(ids)}"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UserError(f"squeue failed: {exc}") from None
    if proc.returncode != 0:
        if "Invalid job id" in proc.stderr:   # every id is gone from slurmctld's memory
            return {}
        raise UserError(f"squeue failed (exit {proc.returncode}): {proc.stderr.strip()}")
    out: dict[str, list[Task]] = {}
    for line in proc.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 4 and parts[0] in ids:
            out.setdefault(parts[0], []).append(Task(parts[1], parts[2], parts[3]))
    return out


def live(tasks: list[Task]) -> bool:
    return any(t.live for t in tasks)


def describe(job: str, tasks: list[Task]) -> str:
    """`123 RUNNING`, `124 3 PENDING (Dependency)`, `125 2 COMPLETED, 1 FAILED`, `126 (gone from squeue)`."""
    if not tasks:
        return f"{job} (gone from squeue)"
    counts: dict[tuple[str, str], int] = {}
    for t in tasks:
        key = (t.state, t.reason if t.state == "PENDING" else "")
        counts[key] = counts.get(key, 0) + 1
    parts = [(f"{n} " if len(tasks) > 1 else "") + state + (f" ({reason})" if reason else "")
             for (state, reason), n in counts.items()]
    return f"{job} " + ", ".join(parts)


# --------------------------------------------------------------------------- jobs.json


def jobs_path(sweep: Sweep) -> Path:
    return sweep.directory / JOBS_FILE


def read_jobs(sweep: Sweep) -> dict[str, list[dict[str, Any]]]:
    """Run name -> its submissions, oldest first ({train, eval, eval_tasks, time})."""
    path = jobs_path(sweep)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read the sweep's job record: {exc}") from None
    runs = record.get("runs") if isinstance(record, dict) else None
    if not isinstance(runs, dict):
        raise UserError(f"{path}: not a job record (no `runs` mapping)")
    return runs


def write_jobs(sweep: Sweep, runs: dict[str, list[dict[str, Any]]]) -> None:
    atomic_write_text(jobs_path(sweep), json.dumps({"sweep": sweep.name, "runs": runs}, indent=1) + "\n")


def recorded_ids(runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    return [str(e[k]) for entries in runs.values() for e in entries for k in ("train", "eval") if e.get(k)]


@contextmanager
def _locked(sweep: Sweep) -> Iterator[None]:
    sweep.directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(sweep.directory / (JOBS_FILE + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another `cpt sweep --submit` of {sweep.directory} is running; "
                            "wait for it to finish") from None
        yield
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- what a run needs


def find_scripts(folder: str | None) -> tuple[Path, Path]:
    """train.sbatch and eval.sbatch: in `folder` if given, else launch/slurm/ of the clone this package
    runs from, else launch/slurm/ under the current directory."""
    if folder:
        candidates = [Path(folder)]
    else:
        candidates = [Path(__file__).resolve().parents[2] / "launch" / "slurm",
                      Path.cwd() / "launch" / "slurm"]
    for candidate in candidates:
        if all((candidate / s).is_file() for s in SCRIPTS):
            return candidate / SCRIPTS[0], candidate / SCRIPTS[1]
    where = ", ".join(str(c) for c in candidates)
    hint = ("" if folder else "; an installed package has no launch/ folder: copy launch/slurm/ of the "
            "repository, edit its #SBATCH lines for your cluster and pass --scripts DIR")
    raise UserError(f"no {' and '.join(SCRIPTS)} in {where}{hint}")


def checkpoint_count(cfg: RunConfig) -> int:
    """Committed checkpoints the run holds at its end, the ones an eval array scores (one task each)."""
    steps, every = cfg.train.max_steps, cfg.checkpoint.every_steps
    saved = list(range(every, steps + 1, every)) if every else []
    if not saved or saved[-1] != steps:
        saved.append(steps)
    keep_every = cfg.checkpoint.keep_every
    kept = set(saved[-cfg.checkpoint.keep_last:]) | {s for s in saved if keep_every and s % keep_every == 0}
    return len(kept)


def eval_arguments(cfg: RunConfig) -> list[str]:
    """`cpt eval` options scoring the run's eval.sets with its budget (the run dir comes first)."""
    args = [str(Path(cfg.run_dir).resolve())]
    for name, spec in cfg.eval.sets.items():
        args += ["--set", f"{name}={spec.path}:{spec.split}"]
    if cfg.eval.tokens is not None:
        args += ["--tokens", str(cfg.eval.tokens)]
    return args


def split_args(values: list[str] | None) -> list[str]:
    """Pass-through sbatch options: each value split as a shell would (`--partition=gpu --account=x`)."""
    out: list[str] = []
    for value in values or []:
        try:
            out += shlex.split(value)
        except ValueError as exc:
            raise UserError(f"sbatch options {value!r}: {exc}") from None
    return out


def sbatch(args: list[str], env: dict[str, str]) -> str:
    """`sbatch --parsable ARGS`: the job id."""
    try:
        proc = subprocess.run(["sbatch", "--parsable", *args], env=env, capture_output=True, text=True,
                              timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UserError(f"sbatch failed: {exc}") from None
    job = proc.stdout.strip().split(";")[0]
    if proc.returncode != 0 or not job.isdigit():
        raise UserError(f"sbatch {shlex.join(args)} failed (exit {proc.returncode}): "
                        f"{(proc.stderr or proc.stdout).strip()}")
    return job


# --------------------------------------------------------------------------- submitting


@dataclass
class Submitter:
    """Everything a run's submission needs besides the run."""

    sweep: Sweep
    train_script: Path
    eval_script: Path
    train_options: list[str]
    eval_options: list[str]

    def submit(self, run: PlannedRun, entries: list[dict[str, Any]], save: Callable[[], None]) -> dict[str, Any]:
        """Submit the run's training job, add its entry to `entries` and `save` them (so a failed eval
        submission cannot lose the training job's id), then its eval array; the entry."""
        directory = self.sweep.directory.resolve()
        logs = directory / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        cfg = run.config
        # sbatch exports this environment to the job: a launcher's variables left in it (a rendezvous port
        # in use here) must not reach the job's ranks, which take theirs from the allocation.
        inherited = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
        env = {**inherited, "CONFIG": str(directory / "configs" / f"{run.name}.yaml"),
               "OUT_DIR": str(Path(cfg.out_dir).resolve()), "NAME": run.name,
               "PYTHON": os.environ.get("PYTHON", sys.executable)}
        train = sbatch([f"--job-name=cpt-train-{run.name}", f"--output={logs}/%x-%j.log", *self.train_options,
                        str(self.train_script)], env)
        entry: dict[str, Any] = {"train": train, "eval": None, "eval_tasks": 0,
                                 "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        entries.append(entry)
        save()
        if cfg.eval.sets:
            tasks = checkpoint_count(cfg)
            try:
                entry["eval"] = sbatch([f"--job-name=cpt-eval-{run.name}", f"--output={logs}/%x-%A_%a.log",
                                        f"--array=0-{tasks - 1}", f"--dependency=afterok:{train}",
                                        "--kill-on-invalid-dep=yes", *self.eval_options, str(self.eval_script),
                                        *eval_arguments(cfg)], env)
            except UserError as exc:
                raise UserError(f"{run.name}: training job {train} is submitted (and recorded) but its eval "
                                f"array is not: {exc}") from None
            entry["eval_tasks"] = tasks
            save()
        return entry


def blocker(run: PlannedRun, entries: list[dict[str, Any]], queue: dict[str, list[Task]]) -> str | None:
    """Why the run is not submitted (finished, or a live job), else None."""
    state = run_state(run.config)
    if state.state == "finished":
        return f"finished at step {state.step}"
    if entries:
        last = entries[-1]
        for kind in ("train", "eval"):
            job = str(last.get(kind) or "")
            if job and live(queue.get(job, [])):
                return f"{kind} job {describe(job, queue[job])}"
    return None


def stale_arrays(entries: list[dict[str, Any]], queue: dict[str, list[Task]]) -> list[str]:
    """Eval arrays of earlier submissions left pending for a dependency that can never be met."""
    return [str(e["eval"]) for e in entries if e.get("eval")
            and any(t.reason == NEVER and t.state == "PENDING" for t in queue.get(str(e["eval"]), []))]


def submit_sweep(sweep: Sweep, opts: Any) -> int:
    """Submit each run that is neither finished nor queued; print and record the job ids."""
    train_script, eval_script = find_scripts(opts.scripts)
    if shutil.which("sbatch") is None or not slurm_here():
        raise UserError("cpt sweep --submit needs SLURM's sbatch and squeue on PATH (run it on a login node)")
    common = split_args(opts.sbatch_args)
    submitter = Submitter(sweep, train_script, eval_script,
                          common + split_args(opts.train_sbatch_args),
                          common + split_args(opts.eval_sbatch_args))
    submitted = 0
    with _locked(sweep):
        runs = read_jobs(sweep)
        queue = query_jobs(recorded_ids(runs))
        for run in sweep.runs:
            entries = runs.setdefault(run.name, [])
            why = blocker(run, entries, queue)
            if why:
                print(f"{run.name}: not submitted: {why}")
                continue
            stale = stale_arrays(entries, queue)
            if stale:
                subprocess.run(["scancel", *stale], capture_output=True, timeout=120)
            entry = submitter.submit(run, entries, lambda: write_jobs(sweep, {k: v for k, v in runs.items() if v}))
            submitted += 1
            chained = (f", eval array {entry['eval']} ({entry['eval_tasks']} task(s), after {entry['train']})"
                       if entry["eval"] else ", no eval array (the run has no eval.sets)")
            print(f"{run.name}: submitted train job {entry['train']}{chained}")
    print(f"submitted {submitted} of {len(sweep.runs)} run(s); job ids in {jobs_path(sweep)}")
    return 0
