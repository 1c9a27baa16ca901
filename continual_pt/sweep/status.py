"""`cpt sweep --status`: where each run of a sweep stands.

From the run dir (`runs.run_state`: not started, stopped, finished, failed) and, where SLURM is
installed, the jobs `--submit` recorded in jobs.json (`squeue`): a run whose training job is
pending is queued, one whose job runs is running (at the step its metrics last logged); a job
that failed other than by a resumable stop (exit 75) marks the run failed. Without SLURM the
run dirs alone answer, and the table says so once. `unscored` counts the committed checkpoints
that still lack a row on the run's eval.sets or eval.lm_eval tasks (as its eval array scores them), of
all committed.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from continual_pt.layout import EXIT_OK, EXIT_RESUMABLE, METRICS
from continual_pt.sweep.grid import PlannedRun, Sweep
from continual_pt.sweep.runs import exit_text, run_state
from continual_pt.sweep.scoring import scoring_state
from continual_pt.sweep.submit import Task, describe, live, query_jobs, read_jobs, recorded_ids, slurm_here

RUNNING = {"RUNNING", "COMPLETING", "CONFIGURING", "SIGNALING", "STAGE_OUT"}


def last_logged_step(run_dir: Path) -> int | None:
    """The step of the newest training record in run_dir/metrics.jsonl (its tail only), None if none."""
    path = Path(run_dir) / METRICS
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 65536))
            lines = f.read().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("kind", "train") == "train" and isinstance(record.get("step"), int):
            return record["step"]
    return None


def job_exit(job: str) -> int | None:
    """The batch script's exit status of a job SLURM still knows (`scontrol show job`), else None."""
    try:
        proc = subprocess.run(["scontrol", "show", "job", "--oneliner", job], capture_output=True, text=True,
                              timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for token in proc.stdout.split():
        if token.startswith("ExitCode="):
            status = token.removeprefix("ExitCode=").partition(":")[0]
            return int(status) if status.isdigit() else None
    return None


def run_status(run: PlannedRun, train: str, queue: dict[str, list[Task]]) -> tuple[str, str]:
    """(state, step) of one run: not started, queued, running, stopped (resumable), finished or failed."""
    state = run_state(run.config)
    tasks = queue.get(train, [])
    step = "" if state.step is None else str(state.step)
    if state.state != "finished" and live(tasks):
        if any(t.state in RUNNING for t in tasks):
            logged = last_logged_step(run.config.run_dir)
            return "running", "" if logged is None else str(logged)
        return "queued", step
    if state.state == "failed":
        return f"failed: {state.detail}", step
    if state.state != "finished" and tasks and tasks[0].state == "FAILED":
        status = job_exit(train)
        if status is not None and status != EXIT_RESUMABLE:
            return f"failed: job {train} {exit_text(status)}", step
    if state.state == "stopped":
        return "stopped (resumable)", step
    return state.state, step


def latest(entries: list[dict[str, Any]], kind: str) -> str:
    """The newest recorded job of a kind (train, eval) of a run, '' if none."""
    return next((str(e[kind]) for e in reversed(entries) if e.get(kind)), "")


def jobs_text(entries: list[dict[str, Any]], queue: dict[str, list[Task]]) -> tuple[str, str]:
    """The latest training job and eval array of a run as squeue shows them."""
    out = []
    for kind in ("train", "eval"):
        job = latest(entries, kind)
        out.append(describe(job, queue.get(job, [])) if job else "-")
    return out[0], out[1]


def unscored_text(run: PlannedRun) -> str:
    """`<unscored> of <committed>` checkpoints on the run's eval.sets and tasks; `-` without either."""
    state = scoring_state(run.config)
    return "-" if state is None else f"{state[1]} of {state[0]}"


def show_status(sweep: Sweep) -> int:
    """Print each run's state, step, unscored checkpoints and jobs, then how many runs are in each state."""
    jobs = read_jobs(sweep)
    here = slurm_here()
    queue = query_jobs(recorded_ids(jobs)) if here else {}
    header = ["run", "state", "step", "unscored", *(("train job", "eval array") if here else ())]
    rows, counts = [], {}
    for run in sweep.runs:
        entries = jobs.get(run.name) or []
        state, step = run_status(run, latest(entries, "train"), queue)
        counts[state.partition(":")[0]] = counts.get(state.partition(":")[0], 0) + 1
        rows.append([run.name, state, step, unscored_text(run), *(jobs_text(entries, queue) if here else ())])
    if not here:
        print("no SLURM here (squeue not found): states from the run dirs only")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print(f"sweep {sweep.name}: {len(sweep.runs)} run(s) under {sweep.directory}")
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    print(", ".join(f"{n} {state}" for state, n in counts.items()))
    return EXIT_OK
