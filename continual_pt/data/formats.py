"""Local input files by format: JSON lines (plain, .zst, .gz), parquet and text, read as chunks.

Each reader streams its file in pieces of about `chunk_bytes` and names the file and line (or
row) of every record, so a bad record is reported where the user can find it. With a domain
field, a parquet file's domain column is read beside the text (a JSON record carries its own).
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import zstandard

from continual_pt.data.encode import Chunk, chunk_records, column_domains, domain_column, field_value
from continual_pt.data.options import FILE_SUFFIXES, file_format  # noqa: F401  (FILE_SUFFIXES: read from here)
from continual_pt.errors import UserError

CHUNK_BYTES = 1 << 20


def _truncated(path: Path, how: str) -> UserError:
    return UserError(f"{path}: truncated file: {how}; the file is incomplete (an interrupted download "
                     "or copy?): fetch it again")


def _zstd_blocks(path: Path, read_size: int) -> Iterator[bytes]:
    """Decompressed pieces of a .zst file of one or more frames; UserError if it ends inside a frame."""
    dctx = zstandard.ZstdDecompressor()
    frame, in_frame = dctx.decompressobj(), False
    with open(path, "rb") as f:
        # Compressed reads of a fraction of read_size keep the decompressed pieces near read_size.
        while data := f.read(max(1 << 12, read_size // 8)):
            while data:
                try:
                    out = frame.decompress(data)
                except zstandard.ZstdError as exc:
                    raise UserError(f"{path}: not a valid zstd stream ({exc})") from None
                in_frame = True
                if out:
                    yield out
                if not frame.eof:
                    break
                # Multi-frame files (as the Pile ships): the next frame starts in the unused input.
                data, frame, in_frame = frame.unused_data, dctx.decompressobj(), False
    if in_frame:
        raise _truncated(path, "the zstd stream ends inside a frame")


def _gzip_blocks(path: Path, read_size: int) -> Iterator[bytes]:
    """Decompressed pieces of a .gz file; UserError if it ends before its end-of-stream marker."""
    with gzip.open(path, "rb") as f:
        try:
            while data := f.read(read_size):
                yield data
        except EOFError:
            raise _truncated(path, "the gzip stream ends before its end-of-stream marker") from None
        except (gzip.BadGzipFile, zlib.error) as exc:
            raise UserError(f"{path}: not a valid gzip stream ({exc})") from None


def _plain_blocks(path: Path, read_size: int) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while data := f.read(read_size):
            yield data


def _decoded_blocks(path: Path, read_size: int) -> Iterator[bytes]:
    """The bytes of a JSON-lines file, decompressed, in pieces of about read_size."""
    fmt = file_format(path)
    if fmt == ".jsonl.zst":
        return _zstd_blocks(path, read_size)
    if fmt == ".jsonl.gz":
        return _gzip_blocks(path, read_size)
    return _plain_blocks(path, read_size)


def _line_blocks(path: Path, chunk_bytes: int) -> Iterator[Chunk]:
    """Blocks of whole lines of a JSON-lines file, with the number of their first line."""
    line = 1
    rest = b""
    for data in _decoded_blocks(path, chunk_bytes):
        rest += data
        cut = rest.rfind(b"\n") + 1 if len(rest) >= chunk_bytes else 0
        if cut == 0:
            continue
        block, rest = rest[:cut], rest[cut:]
        yield Chunk("lines", str(path), line, block, len(block))
        line += block.count(b"\n")
    if rest:
        yield Chunk("lines", str(path), line, rest, len(rest))


def _parquet_column(path: Path, text_field: str) -> pq.ParquetFile:
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for unreadable files
        raise UserError(f"{path}: not a readable parquet file ({exc})") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise UserError(f"{path}: no column {text_field!r} (columns: {', '.join(names)}); "
                        "choose one with --text-field")
    return pf


def rows_per_chunk(chunk_bytes: int) -> int:
    """Rows of unknown size per chunk of about `chunk_bytes`."""
    # Assume documents of a few kB, as in web corpora.
    return max(16, chunk_bytes // 2048)


def _parquet_chunks(path: Path, text_field: str, chunk_bytes: int, domain_field: str | None) -> Iterator[Chunk]:
    pf = _parquet_column(path, text_field)
    column, rest = domain_column(pf.schema_arrow.names, domain_field) if domain_field else (None, None)
    columns = [text_field] + ([column] if column and column != text_field else [])
    row = 1
    for batch in pf.iter_batches(batch_size=rows_per_chunk(chunk_bytes), columns=columns):
        texts = batch.column(text_field).to_pylist()
        nbytes = sum(len(t) for t in texts if isinstance(t, str))
        domains = None
        if domain_field is not None:
            domains = column_domains(batch.column(column).to_pylist(), rest) if column else [None] * len(texts)
        yield Chunk("texts", str(path), row, texts, nbytes, domains=domains)
        row += len(texts)


def no_domain(where: str, domain_field: str, found: Any) -> UserError:
    """The early refusal of a --domain-field that the first record does not hold."""
    return UserError(f"{where}: no domain: the field {domain_field!r} is missing, empty or not a string in the first "
                     f"record ({found}); name the field with --domain-field, or pass --unknown-domain NAME to put "
                     "records without one under domain NAME")


def _parquet_domain(path: Path, pf: pq.ParquetFile, domain_field: str) -> None:
    names = pf.schema_arrow.names
    column, rest = domain_column(names, domain_field)
    if column is None:
        raise no_domain(str(path), domain_field, f"columns: {', '.join(names)}")
    first = next(pf.iter_batches(batch_size=1, columns=[column]), None)
    value = column_domains(first.column(0).to_pylist(), rest)[0] if first is not None and first.num_rows else None
    if not (isinstance(value, str) and value):
        raise no_domain(f"{path} row 1", domain_field, f"{column}: {value!r}")


def file_group_chunks(paths: list[Path], chunk_bytes: int, lenient: bool = False) -> Iterator[Chunk]:
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


def _first_json_record(path: Path, text_field: str, domain_field: str | None = None) -> None:
    """Fail early on a first record that is not JSON or lacks the text field (or a required domain)."""
    for chunk in _line_blocks(path, 1 << 16):
        for i, line in enumerate(chunk.payload.split(b"\n")):
            if line.strip():
                first = Chunk("lines", chunk.origin, chunk.first_record + i, line, len(line))
                _, domains, _ = chunk_records(first, text_field, domain_field)
                if domain_field is not None and domains[0] is None:
                    raise no_domain(f"{path}:{first.first_record}", domain_field, _found(json.loads(line), domain_field))
                return


def _found(record: Any, domain_field: str) -> str:
    """What a record holds where the domain field should be: its value, or the fields of the deepest
    object on the way."""
    value = field_value(record, domain_field)
    if value is not None:
        return f"it is {value!r}"
    parts = domain_field.split(".")
    for n in range(len(parts) - 1, -1, -1):
        where = field_value(record, ".".join(parts[:n])) if n else record
        if isinstance(where, dict):
            keys = ", ".join(sorted(map(str, where))[:20]) or "none"
            return f"fields{' of ' + '.'.join(parts[:n]) if n else ''}: {keys}"
    return "no fields"


def file_info(path: Path) -> dict[str, Any]:
    """What identifies a file's contents in the manifest: resolved path, size, mtime."""
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


@dataclass
class FileSource:
    """Local files of known formats, in sorted order."""

    spec: str
    files: list[Path]
    skipped: list[Path] = field(default_factory=list)
    """Files of unknown type that --skip-unknown left out (recorded in the manifest)."""

    def fingerprint(self) -> dict[str, Any]:
        found = {"spec": self.spec, "kind": "files", "files": [file_info(p) for p in self.files]}
        if self.skipped:
            found["skipped_unknown"] = [str(p.resolve()) for p in self.skipped]
        return found

    def probe(self, text_field: str, domain_field: str | None = None) -> None:
        for path in self.files:
            fmt = file_format(path)
            if fmt == ".parquet":
                pf = _parquet_column(path, text_field)
                if domain_field is not None:
                    _parquet_domain(path, pf, domain_field)
            elif fmt != ".txt":
                _first_json_record(path, text_field, domain_field)
            elif domain_field is not None:
                raise no_domain(str(path), domain_field, "a .txt file is one document without fields")

    def chunks(self, text_field: str, chunk_bytes: int = CHUNK_BYTES,
               domain_field: str | None = None) -> Iterator[Chunk]:
        texts: list[Path] = []
        for path in self.files:
            fmt = file_format(path)
            if fmt == ".txt":
                texts.append(path)
                continue
            # Keep file order: flush pending text files before the next other-format file.
            yield from file_group_chunks(texts, chunk_bytes)
            texts = []
            if fmt == ".parquet":
                yield from _parquet_chunks(path, text_field, chunk_bytes, domain_field)
            else:
                yield from _line_blocks(path, chunk_bytes)
        yield from file_group_chunks(texts, chunk_bytes)
