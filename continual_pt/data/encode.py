"""Worker side of `cpt prepare`: raw chunks to documents, documents to token arrays.

A chunk is a piece of one source (a block of whole JSON lines, a few text files, a batch of
rows). Workers parse, split and tokenize it; the parent only reads bytes and writes shards,
so the output order is the chunk order whatever the number of workers.
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from continual_pt.data.options import SHARD_DTYPES
from continual_pt.errors import UserError

DTYPES = dict(zip(SHARD_DTYPES, (np.uint16, np.uint32), strict=True))
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


@dataclass
class Chunk:
    """A piece of one source, in order; `kind` says what `payload` holds."""

    kind: str
    """"lines": bytes of whole JSON lines; "files": [(path, bytes)], one document each; "texts": [str]."""
    origin: str
    """File or source the records come from, for messages."""
    first_record: int
    """Line (kind "lines") or row (kind "texts") number of the first record, counting from 1."""
    payload: Any
    nbytes: int
    """Raw bytes this chunk covers (for throughput)."""
    lenient: bool = False
    """Skip undecodable files instead of failing (built-in sources the user cannot fix)."""


@dataclass
class Encoded:
    """Tokens of one chunk per split, EOS after every document."""

    tokens: dict[str, np.ndarray]
    docs: dict[str, int]
    skipped: dict[str, int] = field(default_factory=dict)
    nbytes: int = 0


def val_threshold(val_fraction: float) -> int:
    """The 64-bit hash value below which a document goes to the validation split."""
    return min(1 << 64, int(val_fraction * (1 << 64)))


def is_val(text: str, threshold: int) -> bool:
    """Whether a document belongs to validation: a hash of its text alone, so the split never
    changes when the corpus grows and identical documents always land on the same side."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") < threshold


def _utf8_error(origin: str, data: bytes, exc: UnicodeDecodeError, first_line: int) -> UserError:
    line = first_line + data.count(b"\n", 0, exc.start)
    column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
    return UserError(f"{origin}:{line}: not valid UTF-8 (byte 0x{data[exc.start]:02x} at column {column}); "
                     "convert the file to UTF-8")


def _field_text(record: Any, text_field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object with a {text_field!r} field, got {type(record).__name__}")
    if text_field not in record:
        fields = ", ".join(sorted(map(str, record))[:20]) or "none"
        raise UserError(f"{where}: no field {text_field!r} (fields: {fields}); choose one with --text-field")
    return _check_text(record[text_field], text_field, where)


def _check_text(value: Any, text_field: str, where: str) -> str:
    if not isinstance(value, str):
        what = "null" if value is None else type(value).__name__
        raise UserError(f"{where}: field {text_field!r} is {what}, expected a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        # JSON may escape lone surrogates ("\\ud800"): valid JSON, but not text any tokenizer accepts.
        raise UserError(f"{where}: field {text_field!r} is not valid Unicode (lone surrogate "
                        f"U+{ord(value[exc.start]):04X} at character {exc.start + 1})") from None
    return value


def _json_texts(chunk: Chunk, text_field: str) -> list[str]:
    try:
        text = chunk.payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _utf8_error(chunk.origin, chunk.payload, exc, chunk.first_record) from None
    texts = []
    for n, line in enumerate(text.split("\n"), start=chunk.first_record):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{chunk.origin}:{n}: broken JSON line ({exc.msg} at column {exc.colno})") from None
        texts.append(_field_text(record, text_field, f"{chunk.origin}:{n}"))
    return texts


def _file_texts(chunk: Chunk, skipped: dict[str, int]) -> list[str]:
    texts = []
    for path, data in chunk.payload:
        try:
            texts.append(data.decode("utf-8"))
        except UnicodeDecodeError as exc:
            if not chunk.lenient:
                raise _utf8_error(path, data, exc, 1) from None
            skipped["undecodable"] = skipped.get("undecodable", 0) + 1
    return texts


def chunk_texts(chunk: Chunk, text_field: str, skipped: dict[str, int] | None = None) -> list[str]:
    """The documents of a chunk, in order; UserError naming file and line for bad records."""
    skipped = {} if skipped is None else skipped
    if chunk.kind == "lines":
        return _json_texts(chunk, text_field)
    if chunk.kind == "files":
        return _file_texts(chunk, skipped)
    return [_check_text(t, text_field, f"{chunk.origin} row {chunk.first_record + i}")
            for i, t in enumerate(chunk.payload)]


class _Worker:
    """Per-process tokenizer state, built once by `init_worker`."""

    def __init__(self, tokenizer_json: str, eos_id: int, dtype: str, val_fraction: float, text_field: str):
        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        # Document text is data: a literal "<|endoftext|>" in it must not become the EOS id.
        self.tokenizer.encode_special_tokens = True
        # A tokenizer.json may carry truncation/padding settings meant for inference; they would
        # silently cut documents here.
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.eos = (eos_id,)
        self.dtype = DTYPES[dtype]
        self.limit = int(np.iinfo(self.dtype).max)
        self.threshold = val_threshold(val_fraction)
        self.text_field = text_field


_WORKER: _Worker | None = None


def _die_with_parent(parent_pid: int) -> None:
    """End this worker when `cpt prepare` dies, even by SIGKILL: an orphan would hold a core for minutes."""
    linux = sys.platform.startswith("linux")
    if not linux or ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)


def init_worker(tokenizer_json: str, eos_id: int, dtype: str, val_fraction: float, text_field: str,
                parent_pid: int | None) -> None:
    """Build this process's tokenizer; `parent_pid` is None in the parent, else each process uses one core."""
    global _WORKER
    if parent_pid is not None:
        _die_with_parent(parent_pid)
        # Ctrl-C reaches the whole process group: the parent stops the pool, workers print nothing.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER = _Worker(tokenizer_json, eos_id, dtype, val_fraction, text_field)


def _pack(worker: _Worker, encodings: list, origin: str) -> np.ndarray:
    count = sum(len(e.ids) for e in encodings) + len(encodings)
    flat = itertools.chain.from_iterable(x for e in encodings for x in (e.ids, worker.eos))
    tokens = np.fromiter(flat, dtype=np.uint32, count=count)
    if count and int(tokens.max()) > worker.limit:
        raise UserError(f"{origin}: token id {int(tokens.max())} does not fit dtype "
                        f"{np.dtype(worker.dtype).name}; use --dtype uint32")
    return tokens.astype(worker.dtype, copy=False)


def encode_chunk(chunk: Chunk) -> Encoded:
    """Tokenize one chunk: documents split by hash into train and val, EOS after each."""
    worker = _WORKER
    if worker is None:
        raise RuntimeError("init_worker was not called in this process")
    skipped: dict[str, int] = {}
    texts = chunk_texts(chunk, worker.text_field, skipped)
    kept = [t for t in texts if t]
    if len(kept) < len(texts):
        skipped["empty"] = len(texts) - len(kept)
    held_out = [is_val(t, worker.threshold) for t in kept]
    result = Encoded(tokens={}, docs={}, skipped=skipped, nbytes=chunk.nbytes)
    for split, want in (("train", False), ("val", True)):
        docs = [t for t, v in zip(kept, held_out) if v == want]
        encodings = worker.tokenizer.encode_batch_fast(docs, add_special_tokens=False) if docs else []
        result.tokens[split] = _pack(worker, encodings, chunk.origin)
        result.docs[split] = len(docs)
    return result
