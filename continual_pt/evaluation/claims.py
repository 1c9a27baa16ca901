"""Claims: which job scores which checkpoint, so that any number of concurrent jobs (the tasks of a
job array) drain a run without scoring a checkpoint twice or leaving one out.

A claim is an exclusive `fcntl.flock` on `<store>.claims/<checkpoint hash>.lock`, taken without
waiting and held while the job loads and scores that checkpoint. The OS releases it when its holder
ends, however it ends (a time limit, SIGKILL, a lost node's job cancelled), so no claim outlives
its job and no clean-up is needed. The lock file names its holder, for a person looking on.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
from pathlib import Path


class Claim:
    """A held claim on one checkpoint of one store; release() (or the process's end) gives it back."""

    def __init__(self, fd: int, path: Path):
        self.fd = fd
        self.path = path

    @classmethod
    def take(cls, store_path: Path, identity: str, measurements: list[tuple] = ()) -> Claim | None:
        """The claim on checkpoint `identity` for the store at `store_path`, or None while another job holds it.
        A claim covers the measurements (score keys) the job will make: jobs scoring other sets, budgets or
        dtypes of one checkpoint do not wait for each other."""
        folder = store_path.with_name(store_path.name + ".claims")
        folder.mkdir(parents=True, exist_ok=True)
        what = json.dumps([identity, sorted(measurements)], default=str)
        path = folder / f"{hashlib.sha256(what.encode()).hexdigest()[:20]}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        holder = f"{identity}\nheld by pid {os.getpid()} on {socket.gethostname()}" \
                 f" (job {os.environ.get('SLURM_JOB_ID', '-')})\n".encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder, 0)
        return cls(fd, path)

    def release(self) -> None:
        if self.fd >= 0:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = -1
