"""Domains of a prepared dataset: the subset each token comes from (SlimPajama's RedPajamaC4, the Pile's Github).

`cpt prepare --domain-field meta.redpajama_set_name` (or `--layout slimpajama|pile`) keeps each
document's domain. Nothing is stored per token: each split stores its document boundaries and one
small domain id per document, and a token's domain is found from them by binary search. A dataset
prepared without domains has none of this and reads as before.

Stored format, beside each split's token shards:

    <out>/<split>/doc_ends.npy      int64 .npy (little-endian), one value per document, in order: the
                                    split's token offset one past the document's EOS. Strictly increasing;
                                    document i holds tokens [doc_ends[i-1], doc_ends[i]) (from 0 for i = 0)
                                    and the last value is the split's num_tokens.
    <out>/<split>/doc_domains.npy   uint16 .npy (little-endian; readers accept uint8 too), one value per
                                    document: its domain id, an index into the manifest's "domains".

manifest.json gains (a reader takes their absence, in datasets prepared before, as no domains):

    "domain_field": "meta.redpajama_set_name"    null without domains
    "domains": ["RedPajamaCommonCrawl", ...]     the names, indexed by domain id; [] without domains. A
                                                 layout lists its corpus's known domains first, in a fixed
                                                 order (data/layouts.py), so ids agree between datasets of
                                                 one corpus; other names follow in order of first appearance.
    "unknown_domain": "unknown" | null           where documents without a domain went (--unknown-domain)
    "docs_without_domain": 0                     how many documents had none
    "splits": {"train": {..., "by_domain": {"RedPajamaC4": {"num_tokens": 123, "num_docs": 4}, ...},
                         "documents": {"ends": {"file": "train/doc_ends.npy", "dtype": "int64", "sha256": ...},
                                       "domains": {"file": "train/doc_domains.npy", "dtype": "uint16",
                                                   "sha256": ...}}}}

"by_domain" lists every name of "domains", in id order, zeros included; its counts sum to the
split's num_tokens and num_docs (tokens include each document's EOS). The files cost 10 bytes per
document: 0.5% of the uint16 tokens of documents of 1,000 tokens.

`output.DomainWriter` writes the files as the documents arrive (the .npy header, padded by numpy
to a size that does not depend on the length, is filled in last); prepare assigns ids in input
order, so the same input gives the same bytes whatever the number of workers.

Reading (`PreparedDataset` hands these on from `DomainIndex`, which checks the files against the
manifest on open: dtype, length, size and the last end; `verify=True` also reads their content):

    ds.domains                        ["RedPajamaCommonCrawl", ...]
    ds.domain_tokens, ds.domain_docs  {"RedPajamaC4": count, ...} of the split, from the manifest
    ds.token_domains(start, stop)     each token's domain id over [start, stop) of the split, vectorised
    ds.domain_ranges("RedPajamaC4")   (k, 2) int64 token ranges [start, stop) of that domain's documents,
                                      adjacent ones merged: what sampling by domain draws from
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from continual_pt.errors import UserError

ENDS = "doc_ends.npy"
IDS = "doc_domains.npy"
ENDS_DTYPE = np.dtype("<i8")
IDS_DTYPE = np.dtype("<u2")
ID_DTYPES = {"uint8": np.dtype("u1"), "uint16": np.dtype("<u2")}
MAX_DOMAINS = 1 << 16
BLOCK = 1 << 22  # documents per pass when scanning a whole split


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _corrupt(where: Path, what: str) -> UserError:
    return UserError(f"{where}: corrupt manifest: {what}; prepare the dataset again")


def _names(manifest: dict[str, Any], where: Path) -> list[str]:
    names = manifest.get("domains") or []
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names) or \
            len(set(names)) != len(names):
        raise _corrupt(where, "'domains' is not a list of distinct names")
    return names


def _read_header(file: Path) -> tuple[np.dtype, tuple[int, ...], int]:
    try:
        with open(file, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
            return dtype, shape, f.tell()
    except (ValueError, OSError, SyntaxError) as exc:
        raise UserError(f"{file}: not a readable .npy file ({exc}); the dataset is corrupt: prepare it again") \
            from None


def _check_npy(root: Path, entry: Any, accepted: dict[str, np.dtype], count: int, where: Path) -> tuple[Path, int]:
    """The file of a manifest entry, checked against it: dtype, length and size; (path, data offset)."""
    if not isinstance(entry, dict) or entry.get("dtype") not in accepted or not isinstance(entry.get("file"), str):
        raise _corrupt(where, f"document index entry {entry!r} names no file of dtype {' or '.join(accepted)}")
    file = root / entry["file"]
    if not file.is_file():
        raise UserError(f"{file}: document index missing (the manifest lists it); prepare the dataset again")
    dtype, shape, offset = _read_header(file)
    want = accepted[entry["dtype"]].newbyteorder("<")
    if dtype != want or shape != (count,):
        raise UserError(f"{file}: holds {dtype} x {shape}, the manifest says {entry['dtype']} x ({count},) "
                        "(one per document); prepare the dataset again")
    size, expected = file.stat().st_size, offset + count * want.itemsize
    if size != expected:
        raise UserError(f"{file}: truncated or corrupt document index: {size} bytes, {expected} expected for "
                        f"{count} documents")
    return file, offset


class DomainIndex:
    """The domains of one split of a prepared dataset, checked against the manifest on open (sizes,
    dtypes, counts) and read through memmaps opened on first use."""

    def __init__(self, root: Path, split: str, manifest: dict[str, Any], info: dict[str, Any], num_tokens: int,
                 num_docs: int):
        where = root / "manifest.json"
        self.root, self.split, self.num_tokens, self.num_docs = root, split, num_tokens, num_docs
        self.names = _names(manifest, where)
        self.tokens: dict[str, int] = {}
        self.docs: dict[str, int] = {}
        self.files: dict[str, tuple[Path, int]] = {}
        self._arrays: dict[str, np.ndarray] = {}
        if not self.names:
            return
        self._read_counts(info.get("by_domain"), where)
        documents = info.get("documents")
        if not isinstance(documents, dict):
            raise _corrupt(where, f"split {split!r} has domains but no 'documents' entry")
        self.files["ends"] = _check_npy(root, documents.get("ends"), {"int64": ENDS_DTYPE}, num_docs, where)
        self.files["domains"] = _check_npy(root, documents.get("domains"), ID_DTYPES, num_docs, where)
        self.sha256 = {key: documents[key].get("sha256") for key in self.files}
        if num_docs and int(self.ends[-1]) != num_tokens:
            raise UserError(f"{self.files['ends'][0]}: the last document ends at token {int(self.ends[-1])}, the "
                            f"split holds {num_tokens}; prepare the dataset again")

    def _read_counts(self, by_domain: Any, where: Path) -> None:
        if not isinstance(by_domain, dict) or list(by_domain) != self.names:
            raise _corrupt(where, f"split {self.split!r}: 'by_domain' does not list the domains {self.names}")
        for name, counts in by_domain.items():
            try:
                self.tokens[name], self.docs[name] = int(counts["num_tokens"]), int(counts["num_docs"])
            except (KeyError, TypeError, ValueError):
                raise _corrupt(where, f"split {self.split!r}: by_domain[{name!r}] is {counts!r}") from None
        if (sum(self.tokens.values()), sum(self.docs.values())) != (self.num_tokens, self.num_docs):
            raise _corrupt(where, f"split {self.split!r}: by_domain counts {sum(self.tokens.values())} tokens and "
                           f"{sum(self.docs.values())} documents, the split {self.num_tokens} and {self.num_docs}")

    def _array(self, key: str) -> np.ndarray:
        found = self._arrays.get(key)
        if found is None:
            file, offset = self.files[key]
            dtype = _read_header(file)[0]
            found = (np.memmap(file, dtype=dtype, mode="r", offset=offset, shape=(self.num_docs,))
                     if self.num_docs else np.empty(0, dtype=dtype))
            self._arrays[key] = found
        return found

    @property
    def ends(self) -> np.ndarray:
        """Each document's end (exclusive) in the split's tokens; read-only memmap."""
        return self._array("ends")

    @property
    def ids(self) -> np.ndarray:
        """Each document's domain id; read-only memmap."""
        return self._array("domains")

    def _require(self) -> None:
        if not self.names:
            raise UserError(f"{self.root} has no domains (prepared without --domain-field or --layout); prepare it "
                            "again with --domain-field FIELD to read tokens by domain")

    def domain_id(self, domain: str | int) -> int:
        """The id of a domain given by name (or id); UserError naming the domains for an unknown one."""
        self._require()
        if isinstance(domain, str) and domain in self.names:
            return self.names.index(domain)
        if isinstance(domain, (int, np.integer)) and not isinstance(domain, bool) and 0 <= domain < len(self.names):
            return int(domain)
        raise UserError(f"{self.root}: no domain {domain!r} (domains: {', '.join(self.names)})")

    def token_domains(self, start: int, stop: int) -> np.ndarray:
        """The domain id of each token in [start, stop) of the split: the documents the range meets are
        found by binary search in the ends, and each one's id repeated over its tokens in the range."""
        self._require()
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"tokens [{start}, {stop}) outside [0, {self.num_tokens}) of {self.root}")
        ends, ids = self.ends, self.ids
        if start == stop:
            return np.empty(0, dtype=ids.dtype)
        first = int(np.searchsorted(ends, start, side="right"))
        last = int(np.searchsorted(ends, stop - 1, side="right"))
        cuts = np.minimum(ends[first:last + 1], stop)
        counts = np.diff(cuts, prepend=start)
        return np.repeat(np.asarray(ids[first:last + 1]), counts)

    def domain_ranges(self, domain: str | int) -> np.ndarray:
        """(k, 2) int64: the token ranges [start, stop) of the domain's documents in split order, adjacent
        documents merged into one range (read in blocks: memory follows the result, not the split)."""
        target = self.domain_id(domain)
        pieces, before = [], 0
        for lo in range(0, self.num_docs, BLOCK):
            ends = np.asarray(self.ends[lo:lo + BLOCK], dtype=np.int64)
            mine = np.asarray(self.ids[lo:lo + BLOCK]) == target
            starts = np.concatenate(([before], ends[:-1]))
            pieces.append(np.stack([starts[mine], ends[mine]], axis=1))
            before = int(ends[-1])
        ranges = np.concatenate(pieces) if pieces else np.empty((0, 2), dtype=np.int64)
        if len(ranges) < 2:
            return ranges.astype(np.int64)
        opens = np.concatenate(([True], ranges[1:, 0] != ranges[:-1, 1]))
        closes = np.concatenate((opens[1:], [True]))
        return np.stack([ranges[opens, 0], ranges[closes, 1]], axis=1)

    def verify(self, tokens_at, eos_id: int) -> None:
        """Check the files' sha256, that ends increase, ids name domains, counts agree with the manifest
        and every document ends in EOS (`tokens_at(positions)`: the split's tokens there)."""
        if not self.names:
            return
        for key, (file, _) in self.files.items():
            if file_sha256(file) != self.sha256[key]:
                raise UserError(f"{file}: corrupt document index (sha256 differs from the manifest)")
        tokens, docs, before = np.zeros(len(self.names), np.int64), np.zeros(len(self.names), np.int64), 0
        for lo in range(0, self.num_docs, BLOCK):
            ends, ids = np.asarray(self.ends[lo:lo + BLOCK]), np.asarray(self.ids[lo:lo + BLOCK])
            lengths = np.diff(ends, prepend=before)
            if int(lengths.min()) <= 0 or int(ids.max()) >= len(self.names):
                raise UserError(f"{self.files['ends'][0].parent}: corrupt document index: ends that do not "
                                f"increase or domain ids beyond the {len(self.names)} domains")
            if np.any(tokens_at(ends - 1) != eos_id):
                raise UserError(f"{self.files['ends'][0]}: corrupt document index: a document does not end in EOS")
            tokens += np.bincount(ids, weights=lengths, minlength=len(self.names)).astype(np.int64)
            docs += np.bincount(ids, minlength=len(self.names))
            before = int(ends[-1])
        if list(tokens) != list(self.tokens.values()) or list(docs) != list(self.docs.values()):
            raise UserError(f"{self.files['ends'][0].parent}: the document index counts other per-domain tokens or "
                            "documents than the manifest's by_domain")

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_arrays"] = {}   # memmaps are reopened in the receiving process
        return state
