"""`cpt launch`: run a launcher (deepspeed, torchrun, mpirun, ...) under the stop contract.

A stop signal sent to a launcher does not reliably become a committed checkpoint: the
`deepspeed` runner dies at once on SIGTERM and leaves its ranks training as orphans, its
per-node `launch` process never forwards SIGUSR1, torchrun turns a rank's exit 75 into 1, and a
signal to the job's process group ends the launcher while its ranks are still writing. So the
supervisor stands in front of the launcher:

- it starts the launcher in a session of its own, so signals meant for the job reach only it;
- SIGTERM, SIGUSR1, SIGHUP or a first Ctrl-C becomes a stop request in the run directory
  (`<run dir>/STOP`), which rank 0 sees within a second and every rank acts on at the same step
  boundary, on whichever node it runs;
- once the launcher has exited it waits for every process the launcher left behind (it is their
  subreaper), then exits with the status the run answered in `<run dir>/STOP.done`: 75 after a
  committed checkpoint, so a requeued job never starts before the stop checkpoint is complete.

A second Ctrl-C kills the launcher's process group at once (the last committed checkpoint stays).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from continual_pt.config.load import load_source
from continual_pt.errors import UserError
from continual_pt.layout import EXIT_FAILED, EXIT_OK, EXIT_RESUMABLE, RUN_CONFIG, RUN_LOCK, STOP, STOP_DONE
from continual_pt.options import ConfigSource
from continual_pt.training import stop as stops
from continual_pt.training.lock import RunLock
from continual_pt.training.options import LaunchOptions, StopOptions

FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP, signal.SIGINT)
TRAIN_MODULE = "continual_pt.train"
PR_SET_CHILD_SUBREAPER = 36


def launch(opts: LaunchOptions) -> int:
    """`cpt launch -- COMMAND`: run COMMAND, turn stop signals into a committed checkpoint, exit as the run did."""
    command = opts.command[1:] if opts.command[:1] == ["--"] else list(opts.command)
    if not command:
        raise UserError("no launcher command: cpt launch -- deepspeed --num_gpus 2 -m continual_pt.train "
                        "--config run.yaml")
    if shutil.which(command[0]) is None:
        raise UserError(f"cannot run the launcher command: {command[0]!r} is not an executable file nor a "
                        "command on PATH (e.g. deepspeed, torchrun, mpirun; activate the environment that has it)")
    run_dir = Path(opts.run_dir) if opts.run_dir else load_source(config_source(command)).run_dir
    return Supervisor(command, run_dir, opts.grace).run()


def request(opts: StopOptions) -> int:
    """`cpt stop RUN_DIR`: ask a run (on any node) to save a committed checkpoint and exit 75."""
    run_dir = Path(opts.run_dir)
    if not (run_dir / RUN_CONFIG).is_file():
        raise UserError(f"{run_dir} is not a run directory (it has no {RUN_CONFIG})")
    lock = RunLock(run_dir)
    try:
        lock.acquire()
    except UserError:
        pass   # held: a run is live there, as it should be
    else:
        lock.release()
        raise UserError(f"no run is running in {run_dir} (nothing holds its {RUN_LOCK}): nothing to stop")
    token = _new_token()
    path = stops.request_stop(run_dir, token, "cpt stop")
    print(f"asked the run in {run_dir} to save a committed checkpoint and exit ({path})")
    deadline = time.monotonic() + opts.wait
    while time.monotonic() < deadline:
        done = stops.read_record(run_dir / STOP_DONE)
        if done and isinstance(done.get("request"), dict) and done["request"].get("token") == token:
            print(f"the run exited with status {done.get('exit')} at step {done.get('step')}")
            return EXIT_OK
        time.sleep(0.5)
    if opts.wait:
        print(f"no answer within {opts.wait:.0f} s; the request stays until the run sees it", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def config_source(command: list[str]) -> ConfigSource:
    """The run config named by the training arguments inside a launcher command line."""
    at = next((i for i, a in enumerate(command)
               if a == TRAIN_MODULE or a.replace(os.sep, "/").endswith("continual_pt/train.py")), None)
    if at is None:
        raise UserError(f"cannot find {TRAIN_MODULE} in the command {' '.join(command)!r}: pass --run-dir")
    config, overrides = None, []
    args = iter(command[at + 1:])
    for arg in args:
        if arg in ("--config", "-c"):
            config = next(args, None)
        elif arg.startswith("--config="):
            config = arg.partition("=")[2]
        elif not arg.startswith("-"):
            overrides.append(arg)
    return ConfigSource(config=config, overrides=overrides)


class Supervisor:
    """One launcher process and the stop request it may be asked to deliver."""

    def __init__(self, command: list[str], run_dir: Path, grace: float):
        self.command = command
        self.run_dir = run_dir
        self.grace = grace
        self.token = _new_token()
        self.received: list[int] = []
        self.requested = False
        self.child: subprocess.Popen | None = None
        self.before: set[int] = set()   # our children before the launch: not the launcher's to wait for

    def run(self) -> int:
        self._check_free()
        previous = {sig: signal.signal(sig, self._handle) for sig in FORWARDED}
        try:
            _become_subreaper()
            self.before = _children()
            self.child = subprocess.Popen(self.command, start_new_session=True)
            status = self._wait_for_launcher()
            if not self._wait_for_leftovers():
                _say(f"processes of the launcher are still running {self.grace:.0f} s after it exited; not "
                     "waiting longer")
            return self._outcome(_exit_status(status))
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _check_free(self) -> None:
        """Refuse a run dir another run holds (its pending request is not ours to clear); drop stale requests."""
        if not self.run_dir.is_dir():
            return
        lock = RunLock(self.run_dir)
        lock.acquire()
        try:
            stale = stops.read_record(self.run_dir / STOP)
            if stale is not None:
                _say(f"removed a stop request left by an earlier start ({_origin(stale)})")
            for name in (STOP, STOP_DONE):
                (self.run_dir / name).unlink(missing_ok=True)
        finally:
            lock.release()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and signal.SIGINT in self.received and self.child is not None:
            _say("second SIGINT: killing the launcher's processes without saving (the last committed "
                 "checkpoint is intact)")
            _kill_group(self.child.pid, signal.SIGKILL)
        self.received.append(signum)
        if self.child is not None and not self.requested:
            self._request()   # a Python handler runs in the main thread between bytecodes: file I/O is safe

    def _wait_for_launcher(self) -> int:
        assert self.child is not None
        while True:
            if self.received and not self.requested:
                self._request()
            try:
                return self.child.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                continue

    def _request(self) -> None:
        why = signal.Signals(self.received[0]).name
        self.requested = True
        try:
            path = stops.request_stop(self.run_dir, self.token, f"cpt launch received {why}")
        except OSError as exc:
            _say(f"{why}: cannot write the stop request in {self.run_dir} ({exc}); sending SIGTERM to the "
                 "launcher's processes instead")
            _kill_group(self.child.pid, signal.SIGTERM)
            return
        _say(f"{why}: asked every rank to save a committed checkpoint and exit ({path}); waiting for them")

    def _wait_for_leftovers(self) -> bool:
        """Reap every process the launcher left behind (orphans come to us); False after `grace` seconds."""
        deadline = time.monotonic() + self.grace
        told = False
        while True:
            left = _children() - self.before
            for pid in left:
                try:
                    os.waitpid(pid, os.WNOHANG)   # reaps it once it has exited
                except ChildProcessError:
                    pass
            if not _children() - self.before:
                return True
            if not told:
                _say("the launcher exited; waiting for the processes it left behind")
                told = True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)

    def _outcome(self, status: int) -> int:
        """The run's own answer to our request if it gave one, else the launcher's status."""
        done = stops.read_record(self.run_dir / STOP_DONE)
        if done and isinstance(done.get("request"), dict) and done["request"].get("token") == self.token:
            (self.run_dir / STOP_DONE).unlink(missing_ok=True)
            code = int(done.get("exit", status))
            where = f"a committed checkpoint at step {done['step']}" if done.get("step") is not None else "no step"
            _say(f"the run stopped with {where}; exit status {code}"
                 + (" (run the same command again to resume)" if code == EXIT_RESUMABLE else ""))
            return code
        if self.requested:
            pending = stops.read_record(self.run_dir / STOP)
            if pending and pending.get("token") == self.token:
                (self.run_dir / STOP).unlink(missing_ok=True)
            _say(f"the launcher exited with status {status} before the run answered the stop request: no new "
                 "checkpoint was committed for it")
        return status


def _new_token() -> str:
    """A name for one stop request, unique across hosts and processes (its answer carries it back)."""
    return f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"


def _exit_status(returncode: int) -> int:
    """A Popen return code as a shell would report it (128 + N for a death by signal N)."""
    return 128 - returncode if returncode < 0 else returncode


def _children() -> set[int]:
    """This process's children, from /proc (orphans of the launcher come to us as a subreaper)."""
    if not os.path.isdir("/proc"):
        return set()
    me = os.getpid()
    return {int(e.name) for e in os.scandir("/proc") if e.name.isdigit() and stops.parent_of(int(e.name)) == me}


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _become_subreaper() -> None:
    """Orphaned descendants (ranks whose launcher died) become our children, so we can wait for them."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        except (OSError, AttributeError):
            pass


def _origin(record: dict) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.get("time", 0)))
    return f"{record.get('why', 'unknown cause')}, pid {record.get('pid')} on {record.get('host')} at {when}"


def _say(text: str) -> None:
    os.write(2, f"cpt launch: {text}\n".encode())
