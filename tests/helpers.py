"""Shared test helpers: ports, paths, a quiet `cpt prepare`."""

from __future__ import annotations

import socket
from pathlib import Path

from continual_pt.data.prepare import PrepareOptions, prepare

REPO = Path(__file__).resolve().parents[1]
PYTHIA_TOKENIZER = REPO / "tests" / "fixtures" / "pythia-tokenizer"  # shipped with the repo (see its README.md)


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_quietly(sources, tokenizer, out: Path, **kw) -> dict:
    """`cpt prepare` in this process, one worker and no progress output unless asked; the manifest."""
    kw.setdefault("workers", 1)
    kw.setdefault("quiet", True)
    return prepare(PrepareOptions(sources=[str(s) for s in sources], tokenizer=str(tokenizer), out=str(out), **kw))
