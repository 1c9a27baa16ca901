"""One run at a time per run directory: rank 0 holds an exclusive lock on `<run dir>/run.lock`.

The lock is an fcntl.flock, so the OS releases it whenever its holder dies: a requeued job is
never blocked by a killed one. The file names its holder (host, pid, SLURM job) for the
message a second start refuses with.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from continual_pt.errors import UserError
from continual_pt.layout import RUN_LOCK


class RunLock:
    """The held lock of one run directory; `release()` (or the process's end) lets it go."""

    def __init__(self, run_dir: Path, file_name: str = RUN_LOCK, label: str = "run dir", what: str = "run"):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / file_name
        self.label, self.what = label, what   # for the message: "<label> X is in use ... wait for that <what>"
        self.created_dir = False
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise UserError naming the holder; creates the run dir if needed."""
        self.created_dir = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise UserError(f"{self.label} {self.run_dir} is in use: {self.holder()} holds {self.path}; "
                                f"wait for that {self.what} to end (or stop it) before starting another") from None
            # The file may have been unlinked by a holder cleaning up after we opened it: lock the live one.
            if self.path.exists() and os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                break
            os.close(fd)
        self._fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(holder_record()).encode() + b"\n")

    def holder(self) -> str:
        """Who holds the lock, as its file tells."""
        try:
            record = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return "another process"
        job = f", SLURM job {record['slurm_job_id']}" if record.get("slurm_job_id") else ""
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.get("since", 0)))
        return f"pid {record.get('pid')} on host {record.get('host')}{job} (since {since})"

    def release(self, undo_dir: bool = False) -> None:
        """Let the lock go; with `undo_dir`, remove the lock file and the run dir this lock created
        (set-up failed, so the run dir holds nothing else)."""
        if self._fd is None:
            return
        if undo_dir and self.created_dir:
            self.path.unlink(missing_ok=True)
            try:
                self.run_dir.rmdir()
            except OSError:
                pass  # something else was written there meanwhile: leave it
        os.close(self._fd)
        self._fd = None


def holder_record() -> dict[str, object]:
    """What the lock file says of its holder."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "since": time.time()}
