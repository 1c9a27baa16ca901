"""`cpt demo --upstream SRC... --downstream SRC...`: a sample of each of the user's corpora, of the demo's size.

Each corpus is read as `cpt prepare` reads it (files, globs, folders, saved or hub datasets, the built-in
sources; a layout for a corpus folder as it ships; a domain field). Its units of work (prepare's tasks:
one per input file, one per file of a hub dataset, one per other source) are taken evenly spaced over
the whole corpus, at most SPREAD of them, and from each the first documents up to an equal share of the
sample's bytes (a unit that runs out passes what it lacks on to the next ones). So a folder of 59,000
chunk files gives documents from all over it while only a few MB are read. With a layout only the
training files are read: the demo holds out its own share of the sample's documents by a hash of each
(as it does for its built-in corpora), so the corpus's validation files stay unseen.

The sample is written once, whole or not at all (`data/<corpus>.jsonl`, each record `{"text": ...}`
with `"domain"` when the corpus has domains), and kept: a rerun of the demo reads nothing again.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from continual_pt.data import tasks
from continual_pt.data.encode import chunk_records
from continual_pt.data.formats import CHUNK_BYTES
from continual_pt.data.options import PrepareOptions
from continual_pt.data.prepare import SourcePlan, plan_sources
from continual_pt.demo.options import DemoOptions
from continual_pt.errors import UserError
from continual_pt.files import atomic_write_text

SPREAD = 64
"""At most this many of a corpus's files (prepare's tasks) are read for its sample."""
NO_DOMAIN = "(no domain)"
"""The domain of a sampled document whose record has none, when the corpus has a domain field."""
DOMAIN_KEY = "domain"
"""The key of a document's domain in the sample's records (what `cpt prepare --domain-field` reads)."""


@dataclass(frozen=True)
class Corpus:
    """One of the user's two corpora: its sources and how to read them."""

    name: str
    sources: tuple[str, ...]
    layout: str | None
    text_field: str
    domain_field: str | None
    _plan: SourcePlan | None = field(default=None, compare=False, repr=False)

    @property
    def flag(self) -> str:
        return f"--{self.name}"

    def plan(self) -> SourcePlan:
        """Every source resolved and probed (a UserError naming it if it cannot be read); reads nothing more.
        Done once per Corpus: the probe opens every file (a folder of 59,000 chunks), and the check before
        anything is written and the sampling share it."""
        if self._plan is None:
            options = PrepareOptions(sources=list(self.sources), layout=self.layout, text_field=self.text_field,
                                     domain_field=self.domain_field,
                                     unknown_domain=NO_DOMAIN if self.domain_field or self.layout else None)
            try:
                object.__setattr__(self, "_plan", plan_sources(options))
            except UserError as exc:
                raise UserError(f"{self.flag}: {exc}") from None
        return self._plan


def own_corpora(options: DemoOptions) -> list[Corpus]:
    """The user's upstream and downstream corpora as the options give them."""
    return [Corpus("upstream", tuple(options.upstream), options.upstream_layout, options.text_field,
                   options.domain_field),
            Corpus("downstream", tuple(options.downstream), options.downstream_layout, options.text_field,
                   options.domain_field)]


def spread(items: list, count: int) -> list:
    """At most `count` of `items`, evenly spaced from the first to the last, in order."""
    if len(items) <= count:
        return list(items)
    if count == 1:
        return items[:1]
    return [items[round(i * (len(items) - 1) / (count - 1))] for i in range(count)]


def _documents(task: tasks.Task, plan: SourcePlan, text_field: str, chunk_bytes: int) -> Iterator[tuple[str, Any]]:
    """(text, domain) of a task's non-empty documents, in order, read a chunk at a time."""
    for chunk in tasks.task_chunks(task, plan.sources, text_field, chunk_bytes, plan.domain_field):
        texts, domains, _ = chunk_records(chunk, text_field, plan.domain_field)
        for i, text in enumerate(texts):
            if text:
                yield text, (domains[i] or NO_DOMAIN) if plan.domain_field else None


def cut(corpus: Corpus, budget: int, out: Path) -> dict[str, Any]:
    """Write the sample of `corpus` (about `budget` bytes of text) to `out`; returns what it holds: bytes per
    domain (or per source), documents, and how many of the corpus's files were read of how many."""
    plan = corpus.plan()
    units = [t for t in tasks.split_tasks(plan.sources) if t.split != "val"]
    chosen = spread(units, SPREAD)
    lines: list[str] = []
    taken: Counter[str] = Counter()
    total = 0
    for i, task in enumerate(chosen):
        share = (budget - total) / (len(chosen) - i)
        got = 0
        for text, domain in _documents(task, plan, corpus.text_field, min(CHUNK_BYTES, max(1 << 16, int(share)))):
            size = len(text.encode())
            lines.append(json.dumps({"text": text} if domain is None else {"text": text, DOMAIN_KEY: domain}))
            taken[domain if domain is not None else plan.sources[task.source].spec] += size
            got += size
            if got >= share:
                break
        total += got
    if not lines:
        raise UserError(f"{corpus.flag} {' '.join(corpus.sources)}: no documents with text (field "
                        f"{corpus.text_field!r}) to sample")
    atomic_write_text(out, "\n".join(lines) + "\n")
    return {"bytes": dict(taken), "documents": len(lines), "files_read": len(chosen), "files": len(units)}
