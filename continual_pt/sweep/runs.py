"""Where a run of a sweep stands, from its run dir alone: not started, stopped, finished or failed.

Committed checkpoints are read the way the checkpoint module writes them (a `global_step<N>`
folder under `<run dir>/checkpoints` is committed once it holds `COMMITTED.json`), without
importing it: that module pulls in torch and DeepSpeed, and `--status` should answer at once.

A local attempt's exit status is kept in `<run dir>/sweep-exit.json` (with the step it ended at);
a status other than 0 or 75 marks the run failed until it gets past that step, so a run trained
further by hand afterwards is not reported failed from a stale record.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from continual_pt.config import RunConfig
from continual_pt.files import atomic_write_text
from continual_pt.layout import (
    CHECKPOINTS,
    EXIT_MEANINGS,
    EXIT_OK,
    EXIT_RESUMABLE,
    MARKER,
    RUN_CONFIG,
    step_of,
)

EXIT_FILE = "sweep-exit.json"


@dataclass(frozen=True)
class RunState:
    state: str          # "not started" | "stopped" | "finished" | "failed"
    step: int | None    # newest committed step, if any
    detail: str = ""    # e.g. "exit 1 (non-finite loss)" for failed


def committed_step(run_dir: Path) -> int | None:
    """The newest committed checkpoint's step under `run_dir/checkpoints`, None if none."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return None
    steps = [step for p in root.iterdir() if (step := step_of(p.name)) is not None and (p / MARKER).is_file()]
    return max(steps) if steps else None


def exit_text(status: int) -> str:
    """`exit 1 (non-finite loss)`, `killed by signal 9`, ..."""
    if status < 0:
        return f"killed by signal {-status}"
    meaning = EXIT_MEANINGS.get(status)
    return f"exit {status}" + (f" ({meaning})" if meaning else "")


def record_exit(run_dir: Path, status: int, error: str = "") -> None:
    """Keep the exit status of a local attempt at the run (and the step it reached)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"status": status, "step": committed_step(run_dir), "error": error,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write_text(run_dir / EXIT_FILE, json.dumps(record) + "\n")


def read_exit(run_dir: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((Path(run_dir) / EXIT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("status"), int) else None


def run_state(cfg: RunConfig) -> RunState:
    """The state of one run, from its run dir and the last local attempt's exit record."""
    run_dir = cfg.run_dir
    step = committed_step(run_dir)
    if step is not None and step >= cfg.train.max_steps:
        return RunState("finished", step)
    record = read_exit(run_dir)
    if record and record["status"] not in (EXIT_OK, EXIT_RESUMABLE) and record.get("step") == step:
        error = str(record.get("error") or "")
        return RunState("failed", step, exit_text(record["status"]) + (f": {error}" if error else ""))
    if step is not None or (run_dir / RUN_CONFIG).is_file():
        return RunState("stopped", step)
    return RunState("not started", None)
