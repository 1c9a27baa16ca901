"""Worker side of `cpt prepare`: raw chunks to documents, documents to token arrays.

A chunk is a piece of one source (a block of whole JSON lines, a few text files, a batch of
rows). Workers parse, split and tokenize it; the parent only reads bytes and writes shards,
so the output order is the chunk order whatever the number of workers.

With a domain field (`cpt prepare --domain-field meta.redpajama_set_name`), each document also
yields its domain: the string at that dotted path of its JSON record (or read beside the text from
a parquet or dataset column), or None when it is missing, empty or not a string. A worker returns,
per split, each document's token count (EOS included) and its domain as an index into the chunk's
own table of names; the parent maps those to the dataset's domain ids (data/domains.py).
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
    domains: list[Any] | None = None
    """Kind "texts" with a domain field: each row's domain value, read beside its text."""
    split: str | None = None
    """The split of every document in the chunk (a corpus layout's own split); None: by hash."""


@dataclass
class Encoded:
    """Tokens of one chunk per split, EOS after every document."""

    tokens: dict[str, np.ndarray]
    docs: dict[str, int]
    skipped: dict[str, int] = field(default_factory=dict)
    nbytes: int = 0
    doc_tokens: dict[str, np.ndarray] = field(default_factory=dict)
    """With a domain field: per split, each document's token count, its EOS included (int64)."""
    doc_domains: dict[str, np.ndarray] = field(default_factory=dict)
    """With a domain field: per split, each document's index into `domain_names` (uint32)."""
    domain_names: list[str | None] = field(default_factory=list)
    """The chunk's domains in order of first appearance; None stands for documents without one."""
    missing_domain: int = 0
    """Documents without a domain (field missing, empty or not a string)."""
    missing_at: str | None = None
    """Where the first of them is: `file:line` or `source row N`."""


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


def field_value(record: Any, path: str) -> Any:
    """The value at a dotted path into a record (`meta.redpajama_set_name`), None where it is absent.
    A key spelled with the dots in it is taken whole first."""
    if not isinstance(record, dict):
        return None
    if path in record:
        return record[path]
    value = record
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def domain_name(value: Any) -> str | None:
    """A domain value as a name: a non-empty string, else None (no domain)."""
    return value if isinstance(value, str) and value else None


def domain_column(columns: list[str], domain_field: str) -> tuple[str | None, str | None]:
    """The column of a parquet file or dataset that holds `domain_field`, and the dotted path into
    its values (a struct column's field: `meta.redpajama_set_name`): (column, None) for a column of
    that whole name, (None, None) when no column holds it."""
    if domain_field in columns:
        return domain_field, None
    head, _, rest = domain_field.partition(".")
    return (head, rest) if rest and head in columns else (None, None)


def column_domains(values: list[Any], rest: str | None) -> list[Any]:
    """The domain values of a column's rows (walking `rest` into struct values)."""
    return values if rest is None else [field_value(v, rest) for v in values]


def _json_records(chunk: Chunk, text_field: str, domain_field: str | None):
    try:
        text = chunk.payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _utf8_error(chunk.origin, chunk.payload, exc, chunk.first_record) from None
    texts, domains, lines = [], [], []
    for n, line in enumerate(text.split("\n"), start=chunk.first_record):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{chunk.origin}:{n}: broken JSON line ({exc.msg} at column {exc.colno})") from None
        texts.append(_field_text(record, text_field, f"{chunk.origin}:{n}"))
        if domain_field is not None:
            domains.append(domain_name(field_value(record, domain_field)))
            lines.append(n)
    return texts, domains, lines


def _file_texts(chunk: Chunk, skipped: dict[str, int]) -> tuple[list[str], list[int]]:
    texts, kept = [], []
    for i, (path, data) in enumerate(chunk.payload):
        try:
            texts.append(data.decode("utf-8"))
            kept.append(i)
        except UnicodeDecodeError as exc:
            if not chunk.lenient:
                raise _utf8_error(path, data, exc, 1) from None
            skipped["undecodable"] = skipped.get("undecodable", 0) + 1
    return texts, kept


def chunk_records(chunk: Chunk, text_field: str, domain_field: str | None = None,
                  skipped: dict[str, int] | None = None) -> tuple[list[str], list[str | None], list[int]]:
    """The documents of a chunk, in order, with (given a domain field) each one's domain (None where it
    has none) and its number for `record_place`; UserError naming file and line for bad records."""
    skipped = {} if skipped is None else skipped
    if chunk.kind == "lines":
        return _json_records(chunk, text_field, domain_field)
    if chunk.kind == "files":
        texts, numbers = _file_texts(chunk, skipped)
        return texts, [None] * len(texts) if domain_field is not None else [], numbers
    texts = [_check_text(t, text_field, f"{chunk.origin} row {chunk.first_record + i}")
             for i, t in enumerate(chunk.payload)]
    if domain_field is None:
        return texts, [], []
    values = chunk.domains if chunk.domains is not None else [None] * len(texts)
    return texts, [domain_name(v) for v in values], list(range(chunk.first_record, chunk.first_record + len(texts)))


def record_place(chunk: Chunk, number: int) -> str:
    """Where a record of the chunk is, for messages: `file:line`, `source row N` or a text file's path."""
    if chunk.kind == "lines":
        return f"{chunk.origin}:{number}"
    if chunk.kind == "files":
        return chunk.payload[number][0]
    return f"{chunk.origin} row {number}"


def chunk_texts(chunk: Chunk, text_field: str, skipped: dict[str, int] | None = None) -> list[str]:
    """The documents of a chunk, in order; UserError naming file and line for bad records."""
    return chunk_records(chunk, text_field, None, skipped)[0]


class _Worker:
    """Per-process tokenizer state, built once by `init_worker`."""

    def __init__(self, tokenizer_json: str, eos_id: int, dtype: str, val_fraction: float, text_field: str,
                 domain_field: str | None):
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
        self.domain_field = domain_field


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
                domain_field: str | None = None, *, parent_pid: int | None) -> None:
    """Build this process's tokenizer; `parent_pid` is None in the parent, else each process uses one core."""
    global _WORKER
    if parent_pid is not None:
        _die_with_parent(parent_pid)
        # Ctrl-C reaches the whole process group: the parent stops the pool, workers print nothing.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER = _Worker(tokenizer_json, eos_id, dtype, val_fraction, text_field, domain_field)


def _pack(worker: _Worker, encodings: list, origin: str) -> np.ndarray:
    count = sum(len(e.ids) for e in encodings) + len(encodings)
    flat = itertools.chain.from_iterable(x for e in encodings for x in (e.ids, worker.eos))
    tokens = np.fromiter(flat, dtype=np.uint32, count=count)
    if count and int(tokens.max()) > worker.limit:
        raise UserError(f"{origin}: token id {int(tokens.max())} does not fit dtype "
                        f"{np.dtype(worker.dtype).name}; use --dtype uint32")
    return tokens.astype(worker.dtype, copy=False)


def _domain_labels(chunk: Chunk, domains: list[str | None], numbers: list[int], result: Encoded) -> np.ndarray:
    """Each document's index into the chunk's table of domains (filled into `result`, with the count of
    documents without one and where the first of them is)."""
    table: dict[str | None, int] = {}
    labels = np.fromiter((table.setdefault(d, len(table)) for d in domains), dtype=np.uint32, count=len(domains))
    result.domain_names = list(table)
    if None in table:
        missing = [i for i, d in enumerate(domains) if d is None]
        result.missing_domain = len(missing)
        result.missing_at = record_place(chunk, numbers[missing[0]])
    return labels


def encode_chunk(chunk: Chunk) -> Encoded:
    """Tokenize one chunk: documents split by hash (or the chunk's own split) into train and val, EOS
    after each; with a domain field, each document's length and domain too."""
    worker = _WORKER
    if worker is None:
        raise RuntimeError("init_worker was not called in this process")
    skipped: dict[str, int] = {}
    texts, domains, numbers = chunk_records(chunk, worker.text_field, worker.domain_field, skipped)
    keep = [i for i, t in enumerate(texts) if t]
    if len(keep) < len(texts):
        skipped["empty"] = len(texts) - len(keep)
    kept = [texts[i] for i in keep]
    if chunk.split is None:
        held_out = [is_val(t, worker.threshold) for t in kept]
    else:
        held_out = [chunk.split == "val"] * len(kept)
    result = Encoded(tokens={}, docs={}, skipped=skipped, nbytes=chunk.nbytes)
    labels = None
    if worker.domain_field is not None:
        labels = _domain_labels(chunk, [domains[i] for i in keep], [numbers[i] for i in keep], result)
    for split, want in (("train", False), ("val", True)):
        picked = [j for j, v in enumerate(held_out) if v == want]
        docs = [kept[j] for j in picked]
        encodings = worker.tokenizer.encode_batch_fast(docs, add_special_tokens=False) if docs else []
        result.tokens[split] = _pack(worker, encodings, chunk.origin)
        result.docs[split] = len(docs)
        if labels is not None:
            result.doc_tokens[split] = np.fromiter((len(e.ids) + 1 for e in encodings), dtype=np.int64,
                                                   count=len(encodings))
            result.doc_domains[split] = labels[picked]
    return result
