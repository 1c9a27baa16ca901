"""The demo's two corpora, cut from the built-in offline sources by a hash of each document's name.

Pile → SlimPajama is a *weak* shift: the same kinds of text in other proportions. The default
pair is weak too: upstream is mostly Python code (the standard library) with some scripture
(a quarter of the King James Bible's chapters); downstream is mostly the other three quarters
of the chapters with some code held back from upstream. `strong` is code → scripture only, as
the follow-up's English → German. A document goes to a part by a hash of its name (the file's
path in the standard library, the chapter's title), so every machine cuts the same parts from
the same files, and no document is in both corpora.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from continual_pt.data.sources import _kjv_chapters, _stdlib_files, kjv_path
from continual_pt.demo.options import SHIFTS
from continual_pt.errors import UserError
from continual_pt.files import atomic_write_text


@dataclass(frozen=True)
class Part:
    """A share of one source: the documents whose name hashes into [low, high) of 0..999."""

    source: str   # "code" or "scripture"
    low: int
    high: int


# Which parts make each corpus. Code: 31 MB in the standard library, so upstream takes a
# quarter (about 8 MB) and downstream a small held-back slice; scripture: 4.1 MB in all.
CORPORA: dict[str, dict[str, tuple[Part, ...]]] = {
    "weak": {
        "upstream": (Part("code", 0, 250), Part("scripture", 0, 250)),
        "downstream": (Part("scripture", 250, 1000), Part("code", 900, 915)),
    },
    "strong": {
        "upstream": (Part("code", 0, 250),),
        "downstream": (Part("scripture", 250, 1000),),
    },
}


def bucket(name: str) -> int:
    """The document's place in 0..999, from a hash of its name (stable across machines)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big") % 1000


def _code_documents() -> list[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in _stdlib_files():
        try:
            docs.append((path.relative_to(root).as_posix(), path.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, OSError):
            continue   # a few test files are deliberately not UTF-8
    return docs


def _scripture_documents() -> list[tuple[str, str]]:
    return [(chapter.split("\n", 1)[0], chapter) for chapter in _kjv_chapters(kjv_path())]


def documents(source: str) -> list[tuple[str, str]]:
    """(name, text) of every document of a built-in source, in a fixed order."""
    if source == "code":
        return _code_documents()
    if source == "scripture":
        return _scripture_documents()
    raise ValueError(f"unknown demo source {source!r}")


def _picked(part: Part, docs: dict[str, list[tuple[str, str]]]) -> list[tuple[str, str]]:
    return [(name, text) for name, text in docs[part.source] if part.low <= bucket(name) < part.high]


def corpus_texts(shift: str, corpus: str, docs: dict[str, list[tuple[str, str]]]) -> list[str]:
    """The texts of one corpus of a shift, interleaved by name hash so no source comes in one block."""
    chosen = [(hashlib.sha256(name.encode()).hexdigest(), text)
              for part in CORPORA[shift][corpus] for name, text in _picked(part, docs)]
    return [text for _, text in sorted(chosen)]


def write_corpora(shift: str, out: Path) -> dict[str, dict[str, int]]:
    """Write <out>/upstream.jsonl and <out>/downstream.jsonl; returns the bytes of each source per corpus."""
    if shift not in SHIFTS:
        raise UserError(f"--shift must be one of {', '.join(SHIFTS)}, got {shift!r}")
    docs = {source: documents(source) for source in ("code", "scripture")}
    sizes: dict[str, dict[str, int]] = {}
    for corpus in ("upstream", "downstream"):
        sizes[corpus] = {part.source: sum(len(text.encode()) for _, text in _picked(part, docs))
                         for part in CORPORA[shift][corpus]}
        lines = (json.dumps({"text": text}) for text in corpus_texts(shift, corpus, docs))
        atomic_write_text(out / f"{corpus}.jsonl", "\n".join(lines) + "\n")
    return sizes
