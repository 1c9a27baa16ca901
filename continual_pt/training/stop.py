"""Stop requests: SIGTERM, SIGUSR1 and a first Ctrl-C ask the run to save and exit resumably.

No torch here: `cpt train` installs the process's request before its heavy imports, so a
signal during imports, DeepSpeed set-up or checkpoint loading is remembered, not fatal.
"""

from __future__ import annotations

import os
import signal
import time
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopRequest:
    """Remembers the first stop signal and when it came; the loop acts on it at a safe point.

    A second SIGINT aborts at once (the default action): the last committed checkpoint stays.
    """

    def __init__(self) -> None:
        self.signum = 0
        self.received_at: float | None = None
        self._previous: dict[int, Any] = {}

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
            _say("second SIGINT: aborting at once, without saving (the last committed checkpoint is intact)")
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
            return
        if not self.signum:
            self.signum, self.received_at = signum, time.monotonic()
        if signum == signal.SIGINT:
            _say("SIGINT: stopping at the next safe point, saving what is new (Ctrl-C again aborts without saving)")

    def seconds_since(self) -> float | None:
        """Seconds since the stop signal arrived (None without one)."""
        return None if self.received_at is None else time.monotonic() - self.received_at

    def uninstall(self) -> None:
        """Give the signals back to their previous handlers and forget any request."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        self.signum, self.received_at = 0, None


_PROCESS_REQUEST = StopRequest()


def process_request() -> StopRequest:
    """The stop request of this process, installed on first use (cli does so before heavy imports)."""
    _PROCESS_REQUEST.install()
    return _PROCESS_REQUEST


def _say(text: str) -> None:
    # A signal handler may interrupt a print on stderr; one raw write cannot be torn by that.
    os.write(2, f"cpt train: {text}\n".encode())
