"""`cpt sweep --submit`: each run as a SLURM training job with its eval array chained.

Per run: `sbatch train.sbatch` (CONFIG, OUT_DIR and NAME from the sweep, PYTHON this interpreter
unless PYTHON is set), then, if the run has held-out sets (eval.sets) or lm-eval tasks
(eval.lm_eval), `sbatch --array=0-<N-1> --dependency=afterok:<train job> --kill-on-invalid-dep=yes
eval.sbatch <run dir> --set ... --lm-eval ...`.
The array's tasks claim the run's unscored checkpoints one at a time (`cpt eval --claim`) until
none is left, so they score every checkpoint the run kept, the ones its stops wrote included; N,
the checkpoints the run plans to keep (max_steps / every_steps, capped by keep_last, plus the
keep_every ones), is only how many run at once. A train job that stops and requeues itself keeps
its id, so the array still waits for it; one that fails cancels the array.

The job ids go to `<sweep dir>/jobs.json` (written atomically after each run, under a lock, so
two submits at once cannot both submit a run). A run is submitted again only when it is not
finished and none of its recorded jobs is live (pending, running, requeued: anything `squeue`
does not show in a final state); a stale eval array that can never start is cancelled first. A
finished run whose committed checkpoints are not all scored (its array was cancelled or failed)
gets an eval array of its own (a checkpoint lacking a task's row counts as unscored).
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

from continual_pt.errors import UserError
from continual_pt.files import atomic_write_text
from continual_pt.sweep.grid import PlannedRun, Sweep
from continual_pt.sweep.runs import run_state
from continual_pt.sweep.scoring import checkpoint_count, eval_arguments, has_eval_array, scoring_state

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
        env = self._env(run)
        train = sbatch([f"--job-name=cpt-train-{run.name}", f"--output={self._logs()}/%x-%j.log",
                        *self.train_options, str(self.train_script)], env)
        entry: dict[str, Any] = {"train": train, "eval": None, "eval_tasks": 0,
                                 "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        entries.append(entry)
        save()
        if has_eval_array(run.config):
            try:
                self._eval_array(run, entry, checkpoint_count(run.config), env, after=train)
            except UserError as exc:
                raise UserError(f"{run.name}: training job {train} is submitted (and recorded) but its eval "
                                f"array is not: {exc}") from None
            save()
        return entry

    def submit_eval(self, run: PlannedRun, entries: list[dict[str, Any]], save: Callable[[], None],
                    tasks: int) -> dict[str, Any]:
        """An eval array alone, for a finished run whose committed checkpoints are not all scored."""
        entry: dict[str, Any] = {"train": None, "eval": None, "eval_tasks": 0,
                                 "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self._eval_array(run, entry, tasks, self._env(run))
        entries.append(entry)
        save()
        return entry

    def _eval_array(self, run: PlannedRun, entry: dict[str, Any], tasks: int, env: dict[str, str],
                    after: str | None = None) -> None:
        chain = [f"--dependency=afterok:{after}", "--kill-on-invalid-dep=yes"] if after else []
        entry["eval"] = sbatch([f"--job-name=cpt-eval-{run.name}", f"--output={self._logs()}/%x-%A_%a.log",
                                f"--array=0-{tasks - 1}", *chain, *self.eval_options, str(self.eval_script),
                                *eval_arguments(run.config)], env)
        entry["eval_tasks"] = tasks

    def _logs(self) -> Path:
        logs = self.sweep.directory.resolve() / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        return logs

    def _env(self, run: PlannedRun) -> dict[str, str]:
        # sbatch exports this environment to the job: a launcher's variables left in it (a rendezvous port
        # in use here) must not reach the job's ranks, which take theirs from the allocation.
        inherited = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
        return {**inherited, "CONFIG": str(self.sweep.directory.resolve() / "configs" / f"{run.name}.yaml"),
                "OUT_DIR": str(Path(run.config.out_dir).resolve()), "NAME": run.name,
                "PYTHON": os.environ.get("PYTHON", sys.executable)}


def live_job(entries: list[dict[str, Any]], queue: dict[str, list[Task]]) -> str | None:
    """The run's latest submission's job that is still live, described; None if none is."""
    if entries:
        last = entries[-1]
        for kind in ("train", "eval"):
            job = str(last.get(kind) or "")
            if job and live(queue.get(job, [])):
                return f"{kind} job {describe(job, queue[job])}"
    return None


def blocker(run: PlannedRun, entries: list[dict[str, Any]], queue: dict[str, list[Task]]) -> str | None:
    """Why the run is not submitted (finished, or a live job), else None."""
    state = run_state(run.config)
    job = live_job(entries, queue)
    if state.state == "finished":
        return f"finished at step {state.step}" + (f"; {job}" if job else "")
    return job


def unscored_left(run: PlannedRun, entries: list[dict[str, Any]], queue: dict[str, list[Task]]) -> int:
    """Committed checkpoints a finished run with no live job has left unscored (its eval array ended before
    them, failed, or was never submitted): the ones a new eval array must score; 0 otherwise."""
    if run_state(run.config).state != "finished" or live_job(entries, queue):
        return 0
    state = scoring_state(run.config)
    return state[1] if state else 0


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
    submitted = arrays = 0
    with _locked(sweep):
        runs = read_jobs(sweep)
        queue = query_jobs(recorded_ids(runs))
        for run in sweep.runs:
            entries = runs.setdefault(run.name, [])
            save = lambda: write_jobs(sweep, {k: v for k, v in runs.items() if v})   # noqa: E731
            missing = unscored_left(run, entries, queue)
            if missing:
                entry = submitter.submit_eval(run, entries, save, min(missing, checkpoint_count(run.config)))
                print(f"{run.name}: finished with {missing} committed checkpoint(s) unscored: submitted eval array "
                      f"{entry['eval']} ({entry['eval_tasks']} task(s))")
                arrays += 1
                continue
            why = blocker(run, entries, queue)
            if why:
                print(f"{run.name}: not submitted: {why}")
                continue
            stale = stale_arrays(entries, queue)
            if stale:
                subprocess.run(["scancel", *stale], capture_output=True, timeout=120)
            entry = submitter.submit(run, entries, save)
            submitted += 1
            chained = (f", eval array {entry['eval']} ({entry['eval_tasks']} task(s), after {entry['train']})"
                       if entry["eval"] else ", no eval array (the run has no eval.sets nor eval.lm_eval)")
            print(f"{run.name}: submitted train job {entry['train']}{chained}")
    rescored = f" and {arrays} eval array(s) for finished runs" if arrays else ""
    print(f"submitted {submitted} of {len(sweep.runs)} run(s){rescored}; job ids in {jobs_path(sweep)}")
    return 0
