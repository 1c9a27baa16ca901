"""Stop requests: SIGTERM, SIGUSR1 and a first Ctrl-C ask the run to save and exit resumably.

A request can also come as a file, `<run dir>/STOP`, which rank 0 watches: a launcher's signal
cannot always reach every rank (the `deepspeed` and `torchrun` launchers drop or mishandle
SIGUSR1, and ranks on other nodes are out of reach), but every rank shares the run directory.
`cpt launch` and `cpt stop` write it; rank 0 answers with `<run dir>/STOP.done` once the run has
exited cleanly (the step it committed and its exit status) and removes the request.

No torch here: `cpt train` installs the process's request before its heavy imports, so a
signal during imports, DeepSpeed set-up or checkpoint loading is remembered, not fatal.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path
from types import FrameType
from typing import Any

from continual_pt.files import atomic_write_text
from continual_pt.layout import STOP, STOP_DONE

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
FILE_REQUEST = 256   # stands where a signal number would for a request made by the STOP file
LAUNCHER_GONE = 257  # ... and for the death of the launcher process that started this rank
POLL_SECONDS = 0.25  # how often rank 0 looks for the STOP file (one stat, at a step boundary)


def describe(code: int) -> str:
    """The name of a stop request's cause: a signal's name, or the STOP file."""
    if code == FILE_REQUEST:
        return f"a stop request ({STOP} in the run dir)"
    if code == LAUNCHER_GONE:
        return "the launcher's exit (this rank's launcher process died)"
    return signal.Signals(code).name


def parent_of(pid: int) -> int | None:
    """The parent pid of process `pid` from /proc (None if it is gone or there is no /proc)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat[stat.rindex(b")") + 2:].split()[1])   # the field after the state: ppid


def ancestors(depth: int, pid: int | None = None) -> list[int]:
    """The parent, grandparent, ... of `pid` (default: this process), `depth` of them, from /proc."""
    chain, pid = [], os.getpid() if pid is None else pid
    for _ in range(depth):
        pid = parent_of(pid)
        if pid is None:
            break
        chain.append(pid)
    return chain


class StopRequest:
    """Remembers the first stop signal and when it came; the loop acts on it at a safe point.

    A second SIGINT aborts at once (the default action): the last committed checkpoint stays.
    """

    def __init__(self) -> None:
        self.signum = 0
        self.received_at: float | None = None
        self._previous: dict[int, Any] = {}
        self._watched: Path | None = None
        self._launchers: list[int] = []
        self._next_poll = 0.0

    def watch_launcher(self, depth: int) -> None:
        """Stop if the launcher `depth` generations up dies (its ranks would otherwise train on as orphans)."""
        self._launchers = ancestors(depth)

    def watch(self, path: Path) -> None:
        """Treat the appearance of the file `path` as a stop request (rank 0 watches the run's STOP file)."""
        self._watched = Path(path)

    def current(self) -> int:
        """The request's cause so far: a signal number, FILE_REQUEST, LAUNCHER_GONE or 0.

        The STOP file and the launcher are looked at every POLL_SECONDS at most.
        """
        now = time.monotonic()
        if self.signum or now < self._next_poll or not (self._watched or self._launchers):
            return self.signum
        self._next_poll = now + POLL_SECONDS
        if self._watched is not None and self._watched.exists():
            self.signum, self.received_at = FILE_REQUEST, now
        elif self._launchers and ancestors(len(self._launchers)) != self._launchers:
            self.signum, self.received_at = LAUNCHER_GONE, now
        return self.signum

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def install(self) -> bool:
        """Take over the stop signals; False when this request already holds them."""
        if self.installed:
            return False
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return True

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            abort_on_sigint(signum, frame)
            return
        if not self.signum:
            self.signum, self.received_at = signum, time.monotonic()
        if signum == signal.SIGINT:
            _say("SIGINT: stopping at the next safe point, saving what is new (Ctrl-C again aborts without saving)")

    def seconds_since(self) -> float | None:
        """Seconds since the stop signal arrived (None without one)."""
        return None if self.received_at is None else time.monotonic() - self.received_at

    def uninstall(self, process: bool = False) -> None:
        """Give the signals back to their previous handlers and forget any request. `process`: this request
        held the signals for the whole process (`cpt train`), which ends next; after a first Ctrl-C, a second
        one then still aborts at once, saying so, until the process has ended (not Python's KeyboardInterrupt
        in the middle of its teardown)."""
        interrupted = process and self.signum == signal.SIGINT
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if interrupted:
            signal.signal(signal.SIGINT, abort_on_sigint)
        self._previous.clear()
        self.signum, self.received_at = 0, None
        self._watched, self._launchers = None, []


_PROCESS_REQUEST = StopRequest()


def process_request() -> StopRequest:
    """The stop request of this process, installed on first use (cli does so before heavy imports)."""
    _PROCESS_REQUEST.install()
    return _PROCESS_REQUEST


def request_stop(run_dir: Path, token: str, why: str) -> Path:
    """Ask the run in `run_dir` to save and exit resumably; `token` names this request in its answer."""
    path = Path(run_dir) / STOP
    record = {"token": token, "why": why, "host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
    atomic_write_text(path, json.dumps(record) + "\n")
    return path


def read_record(path: Path) -> dict[str, Any] | None:
    """A STOP or STOP.done file's record; None if there is none, {} if it is not one we wrote."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def answer(run_dir: Path, step: int | None, status: int) -> dict[str, Any] | None:
    """Rank 0, exiting cleanly: turn a pending STOP request into STOP.done (step, exit status) and drop it."""
    request = read_record(Path(run_dir) / STOP)
    if request is None:
        return None
    done = {"request": request, "step": step, "exit": status, "time": time.time()}
    atomic_write_text(Path(run_dir) / STOP_DONE, json.dumps(done) + "\n")
    (Path(run_dir) / STOP).unlink(missing_ok=True)
    return done


def abort_on_sigint(signum: int, frame: FrameType | None) -> None:
    """A second Ctrl-C: say so, then end the process as SIGINT does by default (no save, no exit functions)."""
    _say("second SIGINT: aborting at once, without saving (the last committed checkpoint is intact)")
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)


def _say(text: str) -> None:
    # A signal handler may interrupt a print on stderr; one raw write cannot be torn by that.
    os.write(2, f"cpt train: {text}\n".encode())
