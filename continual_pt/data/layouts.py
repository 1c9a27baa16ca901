"""Corpus layouts: `cpt prepare --layout slimpajama|pile --source <corpus folder>` reads a corpus as it ships.

A layout names the files of each split, the field that holds each record's domain (text is read
from --text-field, `text` by default) and the corpus's known domains, which the manifest lists
first and in the order below, so that domain ids agree between datasets of one corpus. The
corpus's own validation files become the val split (there is no hash split: --val-fraction is
not used). Its test files are never read, so they stay unseen: prepare them on their own when
needed (`cpt prepare --source <corpus>/test --domain-field <the field> --val-fraction 0 ...`: the
test set is then that dataset's train split).

    slimpajama   cerebras/SlimPajama-627B, domain meta.redpajama_set_name
                 train/chunk*/*.jsonl.zst        train  (chunk1..chunk10/example_train_<n>.jsonl.zst)
                 validation/chunk*/*.jsonl.zst   val    (chunk1..chunk5/example_holdout_<n>.jsonl.zst)
                 test/chunk*/*.jsonl.zst         not read
    pile         the Pile (as EleutherAI shipped it, and its copies on the hub), domain meta.pile_set_name
                 train/*.jsonl.zst               train  (00.jsonl.zst .. 29.jsonl.zst)
                 val.jsonl.zst                   val
                 test.jsonl.zst                  not read

Order, which fixes the bytes written: corpus folders in --source order; in each, the train files,
then the validation files; within a split, files in natural order of their path in the corpus
folder (digit runs compare as numbers: chunk2 before chunk10, example_train_9 before
example_train_10). Any other file inside a split's own folder (train/, validation/) fails the run,
named, unless --skip-unknown (then it is named and recorded); files beside them (README.md,
.gitattributes) are not inputs. A folder without the layout's train and validation files is
refused, saying what was expected and what the folder holds.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from continual_pt.data.encode import Chunk
from continual_pt.data.formats import CHUNK_BYTES, FileSource, file_info
from continual_pt.data.sources import check_sizes
from continual_pt.errors import UserError

SLIMPAJAMA_DOMAINS = ("RedPajamaCommonCrawl", "RedPajamaC4", "RedPajamaGithub", "RedPajamaBook", "RedPajamaWikipedia",
                      "RedPajamaArXiv", "RedPajamaStackExchange")
PILE_DOMAINS = ("Pile-CC", "PubMed Central", "Books3", "OpenWebText2", "ArXiv", "Github", "FreeLaw", "StackExchange",
                "USPTO Backgrounds", "PubMed Abstracts", "Gutenberg (PG-19)", "OpenSubtitles", "Wikipedia (en)",
                "DM Mathematics", "Ubuntu IRC", "BookCorpus2", "EuroParl", "HackerNews", "YoutubeSubtitles",
                "PhilPapers", "NIH ExPorter", "Enron Emails")


@dataclass(frozen=True)
class Layout:
    """Where a corpus keeps each split, and where its records keep their domain."""

    name: str
    corpus: str
    domain_field: str
    domains: tuple[str, ...]
    splits: tuple[tuple[str, str], ...]
    """(our split, glob relative to the corpus folder), in the order they are read."""
    unread: str
    """The glob of the corpus's test files, which are never read."""

    def describe(self) -> dict[str, Any]:
        """The manifest's record of the layout."""
        return {"name": self.name, "corpus": self.corpus, "domain_field": self.domain_field,
                "splits": dict(self.splits), "not_read": self.unread}

    @property
    def split_rule(self) -> str:
        return (f"the corpus's own splits (--layout {self.name}): "
                + ", ".join(f"{pattern} -> {split}" for split, pattern in self.splits)
                + f"; {self.unread} not read")


LAYOUT_TABLE = {
    "slimpajama": Layout("slimpajama", "cerebras/SlimPajama-627B", "meta.redpajama_set_name", SLIMPAJAMA_DOMAINS,
                         (("train", "train/chunk*/*.jsonl.zst"), ("val", "validation/chunk*/*.jsonl.zst")),
                         "test/chunk*/*.jsonl.zst"),
    "pile": Layout("pile", "the Pile", "meta.pile_set_name", PILE_DOMAINS,
                   (("train", "train/*.jsonl.zst"), ("val", "val.jsonl.zst")), "test.jsonl.zst"),
}


def natural_key(path: str) -> tuple:
    """Sort key of a relative path with its digit runs compared as numbers (chunk2 < chunk10)."""
    parts = re.split(r"(\d+)", path)
    return tuple((0, int(p), p) if p.isdigit() else (1, 0, p) for p in parts), path


@dataclass
class LayoutSource:
    """One corpus folder read by a layout: each split's files, in order."""

    spec: str
    root: Path
    layout: Layout
    files: dict[str, list[Path]]
    unread: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    """Unexpected files in a split's folder that --skip-unknown left out."""

    def fingerprint(self) -> dict[str, Any]:
        found = {"spec": self.spec, "kind": "layout", "layout": self.layout.name, "root": str(self.root.resolve()),
                 "files": {split: [file_info(p) for p in paths] for split, paths in self.files.items()},
                 "not_read": [p.relative_to(self.root).as_posix() for p in self.unread]}
        if self.skipped:
            found["skipped_unknown"] = [str(p.resolve()) for p in self.skipped]
        return found

    def probe(self, text_field: str, domain_field: str | None = None) -> None:
        for paths in self.files.values():
            source = FileSource(self.spec, paths)
            check_sizes(source)
            source.probe(text_field, domain_field)

    def chunks(self, text_field: str, chunk_bytes: int = CHUNK_BYTES,
               domain_field: str | None = None) -> Iterator[Chunk]:
        for split, paths in self.files.items():
            for chunk in FileSource(self.spec, paths).chunks(text_field, chunk_bytes, domain_field):
                yield replace(chunk, split=split)


def _matches(root: Path, pattern: str) -> list[Path]:
    found = [p for p in root.glob(pattern) if p.is_file()]
    return sorted(found, key=lambda p: natural_key(p.relative_to(root).as_posix()))


def _holds(root: Path, limit: int = 8) -> str:
    entries = sorted(root.iterdir(), key=lambda p: p.name)
    names = [f"{p.name}/" if p.is_dir() else p.name for p in entries if not p.name.startswith(".")]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more if names else "nothing"


def _unexpected(root: Path, layout: Layout, files: dict[str, list[Path]]) -> list[Path]:
    """Files inside a split's own folder (train/, validation/) that its glob does not take."""
    taken = {p for paths in files.values() for p in paths}
    found = []
    for _, pattern in layout.splits:
        folder = pattern.split("/")[0] if "/" in pattern else None
        if folder and (root / folder).is_dir():
            found += [p for p in (root / folder).rglob("*") if p.is_file() and p not in taken
                      and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    return sorted(found, key=lambda p: natural_key(p.relative_to(root).as_posix()))


def resolve_layout(spec: str, layout: Layout, skip_unknown: bool) -> LayoutSource:
    """The corpus folder `spec` read by `layout`; UserError saying what was expected and what was found."""
    root = Path(spec).expanduser()
    expected = " and ".join(pattern for _, pattern in layout.splits)
    if not root.is_dir():
        what = "a file" if root.is_file() else "nothing"
        raise UserError(f"{spec}: --layout {layout.name} reads a corpus folder as {layout.corpus} ships it "
                        f"({expected}); there is {what} at this path")
    files = {split: _matches(root, pattern) for split, pattern in layout.splits}
    lacking = [pattern for split, pattern in layout.splits if not files[split]]
    if lacking:
        raise UserError(f"{root}: not laid out as --layout {layout.name} reads it ({layout.corpus}): expected "
                        f"{expected}, found no {' and no '.join(lacking)} (the folder holds {_holds(root)})")
    unexpected = _unexpected(root, layout, files)
    if unexpected and not skip_unknown:
        names = ", ".join(p.relative_to(root).as_posix() for p in unexpected[:8])
        more = f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else ""
        raise UserError(f"{root}: {len(unexpected)} file(s) that --layout {layout.name} does not read in its split "
                        f"folders: {names}{more} (it reads {expected}); remove them, or pass --skip-unknown to "
                        "leave them out")
    return LayoutSource(spec, root, layout, files, _matches(root, layout.unread), unexpected)


def notes(sources: list) -> list[str]:
    """What a layout leaves unread in each corpus folder: its test files, and files --skip-unknown skipped."""
    found = []
    for s in sources:
        if isinstance(s, LayoutSource) and s.skipped:
            names = ", ".join(p.relative_to(s.root).as_posix() for p in s.skipped[:8])
            found.append(f"{s.root}: skipped {len(s.skipped)} file(s) that --layout {s.layout.name} does not read: "
                         f"{names}{' and more' if len(s.skipped) > 8 else ''}")
        if isinstance(s, LayoutSource) and s.unread:
            found.append(f"{s.root}: {len(s.unread)} test file(s) ({s.layout.unread}) not read: --layout "
                         f"{s.layout.name} keeps the corpus's test split unseen")
    return found
