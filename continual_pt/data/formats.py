"""Local input files by format: JSON lines (plain, .zst, .gz), parquet and text, read as chunks.

Each reader streams its file in pieces of about `chunk_bytes` and names the file and line (or
row) of every record, so a bad record is reported where the user can find it.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import zstandard

from continual_pt.data.encode import Chunk, chunk_texts
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


def _parquet_chunks(path: Path, text_field: str, chunk_bytes: int) -> Iterator[Chunk]:
    pf = _parquet_column(path, text_field)
    row = 1
    for batch in pf.iter_batches(batch_size=rows_per_chunk(chunk_bytes), columns=[text_field]):
        texts = batch.column(0).to_pylist()
        nbytes = sum(len(t) for t in texts if isinstance(t, str))
        yield Chunk("texts", str(path), row, texts, nbytes)
        row += len(texts)


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


def _first_json_record(path: Path, text_field: str) -> None:
    """Fail early on a first record that is not JSON or lacks the text field."""
    for chunk in _line_blocks(path, 1 << 16):
        for i, line in enumerate(chunk.payload.split(b"\n")):
            if line.strip():
                chunk_texts(Chunk("lines", chunk.origin, chunk.first_record + i, line, len(line)), text_field)
                return


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
            yield from file_group_chunks(texts, chunk_bytes)
            texts = []
            if fmt == ".parquet":
                yield from _parquet_chunks(path, text_field, chunk_bytes)
            else:
                yield from _line_blocks(path, chunk_bytes)
        yield from file_group_chunks(texts, chunk_bytes)
