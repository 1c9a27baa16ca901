"""Shared test helpers: ports, paths, tiny models."""

from __future__ import annotations

import socket
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHIA_TOKENIZER = REPO / "tests" / "fixtures" / "pythia-tokenizer"  # shipped with the repo (see its README.md)


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
