"""`cpt sweep --local`: the sweep's runs one after another on this machine.

Each run is `python -m continual_pt.train --config <sweep dir>/configs/<run>.yaml`, its output
streamed as it comes. A finished run is skipped (one line says so); a stopped one resumes (the
run's checkpoint.resume, `auto` by default). A run that exits 75 (Ctrl-C, SIGTERM, a time limit,
train.stop_after_steps) stops the sweep at once with 75: the same command continues it. A run
that fails (1 non-finite loss, 2 bad input, or killed) is recorded in its run dir and the sweep
goes on with the next; the sweep then ends with 1, naming the failed runs.

Ctrl-C at a terminal reaches the training process too (it shares our process group): it saves a
checkpoint and exits 75 on its own, so here SIGINT is only noted while a run trains. SIGTERM,
SIGUSR1 and SIGHUP sent to this process alone are passed on to the run, which stops the same way.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from continual_pt.layout import EXIT_FAILED, EXIT_OK, EXIT_RESUMABLE
from continual_pt.sweep.grid import PlannedRun, Sweep
from continual_pt.sweep.runs import exit_text, record_exit, run_state

PASSED_ON = (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)
ERROR_MARK = b": error: "
TAIL_BYTES = 65536


class _Stops:
    """Signals that came while a run trained: SIGINT noted, the others passed on to the run."""

    def __init__(self) -> None:
        self.interrupted = False
        self.child: subprocess.Popen | None = None
        self.pending: list[int] = []

    def handle(self, signum: int, frame) -> None:
        self.interrupted = True
        if signum == signal.SIGINT:
            return
        if self.child is None:
            self.pending.append(signum)
        elif self.child.poll() is None:
            self.child.send_signal(signum)

    def attach(self, child: subprocess.Popen) -> None:
        self.child = child
        for signum in self.pending:
            child.send_signal(signum)


@contextmanager
def _stops_noted():
    stops = _Stops()
    previous = {sig: signal.signal(sig, stops.handle) for sig in (signal.SIGINT, *PASSED_ON)}
    try:
        yield stops
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    if sys.stderr.isatty() and "COLUMNS" not in env:   # the progress bar's width, through the pipe
        env["COLUMNS"] = str(shutil.get_terminal_size().columns)
    return env


def _forward(fd: int) -> bytes:
    """Copy the run's stderr to ours as it comes; the last bytes of it are returned."""
    out = getattr(sys.stderr, "buffer", None)
    tail = b""
    while chunk := os.read(fd, 8192):
        if out is not None:
            out.write(chunk)
            out.flush()
        else:
            sys.stderr.write(chunk.decode("utf-8", "replace"))
            sys.stderr.flush()
        tail = (tail + chunk)[-TAIL_BYTES:]
    return tail


def error_line(tail: bytes) -> str:
    """The message of the run's last `cpt train: error: ...` line (its first line), else ""."""
    for line in reversed(tail.decode("utf-8", "replace").splitlines()):
        head, mark, message = line.partition(ERROR_MARK.decode())
        if mark and head.startswith("cpt "):
            return message.strip()[:300]
    return ""


def train_once(config: Path) -> tuple[int, str, bool]:
    """Train one run to its end or stop: (exit status, its error message, whether we were signalled)."""
    command = [sys.executable, "-m", "continual_pt.train", "--config", str(config)]
    sys.stdout.flush()
    sys.stderr.flush()
    with _stops_noted() as stops:
        child = subprocess.Popen(command, stderr=subprocess.PIPE, env=_child_env())
        stops.attach(child)
        try:
            tail = _forward(child.stderr.fileno())
        finally:
            child.stderr.close()
            status = child.wait()
    return status, error_line(tail), stops.interrupted


def _config(sweep: Sweep, run: PlannedRun) -> Path:
    return sweep.directory / "configs" / f"{run.name}.yaml"


def summary(sweep: Sweep) -> str:
    """A table of every run's state and newest committed step."""
    rows = [(run.name, state.state, "-" if state.step is None else str(state.step), state.detail)
            for run in sweep.runs for state in [run_state(run.config)]]
    header = ("run", "state", "step", "")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    return "\n".join("  ".join([*(c.ljust(w) for c, w in zip(row[:3], widths)), row[3]]).rstrip()
                     for row in [header, *rows])


def run_local(sweep: Sweep) -> int:
    """Run every run of the sweep here, one after another (see the module docstring)."""
    failed: list[str] = []
    total = len(sweep.runs)
    for i, run in enumerate(sweep.runs, 1):
        state = run_state(run.config)
        if state.state == "finished":
            print(f"[{i}/{total}] {run.name}: finished at step {state.step}, skipped", flush=True)
            continue
        start = f"resuming from step {state.step}" if state.step is not None else "starting"
        print(f"[{i}/{total}] {run.name}: {start} ({_config(sweep, run)})", flush=True)
        status, error, interrupted = train_once(_config(sweep, run))
        record_exit(run.config.run_dir, EXIT_RESUMABLE if interrupted and status != EXIT_OK else status, error)
        if interrupted or status == EXIT_RESUMABLE:
            print(f"{run.name}: stopped ({exit_text(status)}); the sweep stops here: run the same "
                  "command again to continue", flush=True)
            print(summary(sweep), flush=True)
            return EXIT_RESUMABLE
        if status != EXIT_OK:
            failed.append(run.name)
            print(f"{run.name}: failed, {exit_text(status)}" + (f": {error}" if error else "")
                  + "; going on with the next run", flush=True)
    print(summary(sweep), flush=True)
    if failed:
        print(f"{len(failed)} of {total} run(s) failed: {', '.join(failed)}", flush=True)
        return EXIT_FAILED
    return EXIT_OK
