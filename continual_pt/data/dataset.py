"""Reading prepared datasets: validated memmaps, packed fixed-length windows, evaluation windows.

    ds = PreparedDataset("data/sp", split="train")
    packed = PackedSequences(ds, seq_len=2048)     # windows of 2049 tokens: inputs w[:-1], labels w[1:]
    check_tokenizer({"sp": ds, "pile": PreparedDataset("data/pile")}, expected="EleutherAI/pythia-410m")
    ds.domains, ds.token_domains(0, 2049)          # with --domain-field or --layout (data/domains.py)
"""

from __future__ import annotations

import hashlib
import json
import math
import shlex
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from continual_pt.data.domains import DomainIndex
from continual_pt.data.options import file_format
from continual_pt.data.output import is_temp_dir
from continual_pt.data.tokenizer import canonical_sha256, tokenizer_sha256
from continual_pt.errors import UserError

FORMAT_VERSION = 1  # of manifest.json, written by prepare and checked here
MANIFEST = "manifest.json"
TASKS_DIR = "tasks"
"""In the temporary directory of an unfinished `cpt prepare`: each task's own shards (data/tasks.py)."""
SPLITS = ("train", "val")
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
OPEN_SHARDS = 64  # memmaps kept open per dataset: each holds a file descriptor


@dataclass(frozen=True)
class Setting:
    """Where a user gave a dataset's path, so that a message about the path names that place."""

    where: str
    """The prefix of a message: `run.yaml: data.train.sp.path`, `--set 'sp=data/sp.jsonl'`."""
    repoint: str
    """What to do with a dataset prepared into a new folder: `set data.train.sp.path to that folder`."""
    tokenizer: str = "<the model's tokenizer>"
    """The `cpt prepare --tokenizer` of the advice to prepare raw text."""


def _has_shards(folder: Path) -> bool:
    """Whether `folder` holds token shards of `cpt prepare`: a dataset's, or its tasks' while it runs."""
    return any(f.is_file() for split in SPLITS for pattern in (f"{split}/[0-9]*.bin", f"{TASKS_DIR}/*/{split}/[0-9]*.bin")
               for f in folder.glob(pattern))


def _has_prepare_folders(folder: Path) -> bool:
    """The folders `cpt prepare` makes before its first shard: the tokenizer copy's and one per split."""
    return all((folder / name).is_dir() for name in ("tokenizer", *SPLITS))


def _raw_text(path: Path) -> str | None:
    """What raw text (the input of `cpt prepare`) `path` is: a file of an accepted type, or a folder of them."""
    if path.is_file():
        return f"a {file_format(path)} file" if file_format(path) else None
    kinds = Counter(file_format(f) for f in path.rglob("*") if f.is_file() and file_format(f))
    if not kinds:
        return None
    count = sum(kinds.values())
    listing = ", ".join(f"{n} *{suffix}" for suffix, n in sorted(kinds.items()))
    return f"a folder holding {count} raw file{'s' if count > 1 else ''}: {listing}"


def _not_a_dataset(path: Path, setting: Setting | None) -> str | None:
    """Why `path` cannot be a prepared dataset, and what to do; None if it has a manifest."""
    if not path.exists():
        return f"{path}: no prepared dataset here (write one with `cpt prepare --out {path}`)"
    if path.is_dir() and is_temp_dir(path):
        return f"{path}: the temporary directory of an unfinished `cpt prepare`, not a dataset; run cpt prepare again"
    if (path / MANIFEST).is_file():
        return None
    interrupted = (f"{path}: not a complete prepared dataset (no {MANIFEST}); an interrupted `cpt prepare` never "
                   "writes one: run it again")
    if path.is_dir() and _has_shards(path):
        return interrupted
    raw = _raw_text(path)
    if raw is not None:
        tokenizer = setting.tokenizer if setting else Setting.tokenizer
        then = setting.repoint if setting else "read that folder"
        return (f"{path} is raw text ({raw}), not a prepared dataset; prepare it with `cpt prepare --source "
                f"{shlex.quote(str(path))} --out <a new folder> --tokenizer {tokenizer}`, then {then}")
    if path.is_dir() and _has_prepare_folders(path):
        return interrupted
    what = "a file" if path.is_file() else f"a folder with no {MANIFEST}, shards or raw text files in it"
    return f"{path} is {what}, not a prepared dataset (a folder written by `cpt prepare`)"


def _load_manifest(path: Path, setting: Setting | None = None) -> dict[str, Any]:
    problem = _not_a_dataset(path, setting)
    if problem is not None:
        raise UserError(f"{setting.where}: {problem}" if setting else problem)
    manifest_path = path / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{manifest_path}: corrupt manifest ({exc})") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise UserError(f"{manifest_path}: format_version {version!r} is not supported (this version of "
                        f"continual-pt reads {FORMAT_VERSION}); prepare the dataset again")
    return manifest


def _field(manifest: dict[str, Any], key: str, where: Path) -> Any:
    try:
        value = manifest
        for part in key.split("."):
            value = value[part]
        return value
    except (KeyError, TypeError):
        raise UserError(f"{where}: corrupt manifest, field {key!r} missing") from None


class PreparedDataset:
    """One split of a directory written by `cpt prepare`, validated on open, read through memmaps."""

    def __init__(self, path: str | Path, split: str = "train", *, verify: bool = False,
                 setting: Setting | None = None):
        """`setting`: where the user gave `path` (a config key, an option), named by every message that
        `path` is no prepared dataset."""
        self.path = Path(path)
        self.split = split
        self.manifest = _load_manifest(self.path, setting)
        where = self.path / MANIFEST
        self.dtype = self._dtype(where)
        self.vocab_size = int(_field(self.manifest, "vocab_size", where))
        self.eos_id = int(_field(self.manifest, "eos_id", where))
        self.tokenizer_sha256 = str(_field(self.manifest, "tokenizer.sha256", where))
        self.tokenizer_name = str(_field(self.manifest, "tokenizer.name", where))
        self.tokenizer_dir = self.path / _field(self.manifest, "tokenizer.dir", where)
        splits = _field(self.manifest, "splits", where)
        if split not in splits:
            raise UserError(f"{where}: no split {split!r} (splits: {', '.join(splits)})")
        info = splits[split]
        self.num_tokens = int(_field(info, "num_tokens", where))
        self.num_docs = int(_field(info, "num_docs", where))
        self.shards: list[dict[str, Any]] = list(_field(info, "shards", where))
        self._check_ranges(where)
        self._check_files()
        self.offsets = np.cumsum([0] + [int(s["num_tokens"]) for s in self.shards], dtype=np.int64)
        if int(self.offsets[-1]) != self.num_tokens:
            raise UserError(f"{where}: split {split!r} claims {self.num_tokens} tokens but its shards hold "
                            f"{int(self.offsets[-1])}")
        self.domain_index = DomainIndex(self.path, split, self.manifest, info, self.num_tokens, self.num_docs)
        self._maps: OrderedDict[int, np.memmap] = OrderedDict()
        if verify:
            self.verify()

    @property
    def domains(self) -> list[str]:
        """The dataset's domain names, indexed by domain id ([] without domains)."""
        return self.domain_index.names

    @property
    def domain_tokens(self) -> dict[str, int]:
        """Tokens of this split per domain (EOS included), from the manifest."""
        return self.domain_index.tokens

    @property
    def domain_docs(self) -> dict[str, int]:
        """Documents of this split per domain, from the manifest."""
        return self.domain_index.docs

    def token_domains(self, start: int, stop: int) -> np.ndarray:
        """The domain id of each token in [start, stop) of the split (UserError without domains)."""
        return self.domain_index.token_domains(start, stop)

    def domain_ranges(self, domain: str | int) -> np.ndarray:
        """(k, 2) token ranges [start, stop) of one domain's documents, adjacent ones merged."""
        return self.domain_index.domain_ranges(domain)

    def _dtype(self, where: Path) -> np.dtype:
        name = _field(self.manifest, "dtype", where)
        if name not in DTYPES:
            raise UserError(f"{where}: dtype {name!r} unknown; accepted: {', '.join(DTYPES)}")
        return np.dtype(DTYPES[name]).newbyteorder("<")

    def _check_ranges(self, where: Path) -> None:
        limit = int(np.iinfo(self.dtype).max) + 1
        if not 0 < self.vocab_size <= limit:
            raise UserError(f"{where}: vocab_size {self.vocab_size} does not fit dtype {self.dtype.name} "
                            f"(at most {limit} ids); the manifest is corrupt or the dataset was written wrongly")
        if not 0 <= self.eos_id < self.vocab_size:
            raise UserError(f"{where}: eos_id {self.eos_id} is outside the vocabulary (size {self.vocab_size})")
        if not (self.tokenizer_dir / "tokenizer.json").is_file():
            raise UserError(f"{self.tokenizer_dir}: the dataset's tokenizer copy is missing (tokenizer.json)")

    def verified_tokenizer_dir(self) -> Path:
        """The dataset's tokenizer copy, once it is checked to be the tokenizer the dataset was prepared
        with (the manifest's sha256): a run ships it in every checkpoint and `cpt export`."""
        file = self.tokenizer_dir / "tokenizer.json"
        try:
            found = canonical_sha256(file.read_text(encoding="utf-8"))
        except Exception as exc:   # noqa: BLE001  (a missing file, bad JSON, or the tokenizers library's own)
            raise UserError(f"{file}: the dataset's tokenizer copy cannot be read ({exc})") from None
        if found != self.tokenizer_sha256:
            raise UserError(f"{file}: the dataset's tokenizer copy is not the tokenizer it was prepared with (sha256 "
                            f"{found[:16]}, the manifest says {self.tokenizer_sha256[:16]}); put back the copy "
                            f"{self.tokenizer_name!r} or prepare the dataset again")
        return self.tokenizer_dir

    def _check_files(self) -> None:
        for shard in self.shards:
            file = self.path / shard["file"]
            expected = int(shard["num_tokens"]) * self.dtype.itemsize
            if not file.is_file():
                raise UserError(f"{file}: shard missing (the manifest lists it)")
            size = file.stat().st_size
            if size != expected:
                raise UserError(f"{file}: truncated or corrupt shard: {size} bytes, the manifest says "
                                f"{shard['num_tokens']} tokens x {self.dtype.itemsize} bytes = {expected}")

    def verify(self) -> None:
        """Check every shard's sha256 and token range (reads the whole split)."""
        for i, shard in enumerate(self.shards):
            file = self.path / shard["file"]
            digest = hashlib.sha256()
            with open(file, "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    digest.update(block)
            if digest.hexdigest() != shard["sha256"]:
                raise UserError(f"{file}: corrupt shard (sha256 differs from the manifest)")
            data = self._shard(i)
            if len(data) and int(data.max()) >= self.vocab_size:
                raise UserError(f"{file}: token id {int(data.max())} >= vocab_size {self.vocab_size}")
        self.domain_index.verify(self._tokens_at, self.eos_id)

    def _tokens_at(self, positions: np.ndarray) -> np.ndarray:
        """The tokens at sorted positions of the split."""
        shard = np.searchsorted(self.offsets, positions, side="right") - 1
        found = np.empty(len(positions), dtype=self.dtype)
        for i in np.unique(shard):
            mine = shard == i
            found[mine] = self._shard(int(i))[positions[mine] - self.offsets[i]]
        return found

    def _shard(self, i: int) -> np.memmap:
        data = self._maps.get(i)
        if data is None:
            data = np.memmap(self.path / self.shards[i]["file"], dtype=self.dtype, mode="r")
            self._maps[i] = data
            if len(self._maps) > OPEN_SHARDS:
                self._maps.popitem(last=False)
        else:
            self._maps.move_to_end(i)
        return data

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the split's concatenated shards (read-only; may be a memmap view)."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"tokens [{start}, {stop}) outside [0, {self.num_tokens}) of {self.path}")
        if start == stop:
            return np.empty(0, dtype=self.dtype)
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pieces = []
        i, pos = first, start
        while pos < stop:
            base = int(self.offsets[i])
            end = min(stop, int(self.offsets[i + 1]))
            if end > pos:
                pieces.append(self._shard(i)[pos - base:end - base])
            pos = max(pos, end)
            i += 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def shard_at(self, position: int) -> Path:
        """The shard file holding token `position` (for messages)."""
        i = int(np.searchsorted(self.offsets, position, side="right")) - 1
        return self.path / self.shards[min(i, len(self.shards) - 1)]["file"]

    def __getstate__(self) -> dict[str, Any]:
        # Memmaps are reopened in the receiving process (DataLoader workers).
        state = self.__dict__.copy()
        state["_maps"] = OrderedDict()
        return state

    def __repr__(self) -> str:
        return f"PreparedDataset({str(self.path)!r}, split={self.split!r}, tokens={self.num_tokens})"


def check_tokenizer(datasets: dict[str, PreparedDataset], expected: str | None = None) -> str | None:
    """The common tokenizer hash of `datasets`; UserError naming each dataset if they disagree
    with each other or with `expected` (a tokenizer folder, hub name, or sha256)."""
    hashes = {name: ds.tokenizer_sha256 for name, ds in datasets.items()}
    listing = "\n".join(f"  {name}: {ds.path} tokenizer {ds.tokenizer_name!r} sha256 {ds.tokenizer_sha256[:16]}"
                        for name, ds in datasets.items())
    if len(set(hashes.values())) > 1:
        raise UserError(f"the datasets were tokenized with different tokenizers:\n{listing}\n"
                        "prepare them again with one tokenizer")
    if expected is not None:
        want = tokenizer_sha256(expected)
        if any(h != want for h in hashes.values()):
            raise UserError(f"the configured tokenizer {expected!r} (sha256 {want[:16]}) differs from the one "
                            f"the datasets were prepared with:\n{listing}\n"
                            "set data.tokenizer to the tokenizer they were prepared with, or prepare them again")
    return next(iter(hashes.values()), None)


class PackedSequences:
    """Non-overlapping windows of seq_len + 1 tokens over a split; the tail shorter than a window is dropped."""

    def __init__(self, dataset: PreparedDataset, seq_len: int):
        if seq_len < 1:
            raise UserError(f"seq_len must be >= 1, got {seq_len}")
        self.dataset = dataset
        self.seq_len = seq_len
        self.window = seq_len + 1
        self.num_windows = dataset.num_tokens // self.window
        self.dropped_tokens = dataset.num_tokens - self.num_windows * self.window

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < self.num_windows:
            raise IndexError(f"window {index} outside [0, {self.num_windows}) of {self.dataset.path}")
        start = index * self.window
        window = self.dataset.tokens(start, start + self.window).astype(np.int64)
        # A corrupt id would otherwise surface as a device-side assert deep inside the embedding.
        if int(window.max()) >= self.dataset.vocab_size:
            bad = int(np.argmax(window >= self.dataset.vocab_size))
            raise UserError(f"{self.dataset.shard_at(start + bad)}: token id {int(window[bad])} >= vocab_size "
                            f"{self.dataset.vocab_size} ({self._where(start + bad)}); the shard is corrupt")
        return window

    def _where(self, position: int) -> str:
        """Token `position` of what is read, as the split's token (and the domain's, for a domain's view)."""
        in_split = getattr(self.dataset, "split_position", None)
        if in_split is None:
            return f"token {position} of split {self.dataset.split!r}"
        return (f"token {in_split(position)} of split {self.dataset.split!r}, token {position} of its domain "
                f"{self.dataset.domain!r}")

    def __repr__(self) -> str:
        return f"PackedSequences({self.dataset!r}, seq_len={self.seq_len}, windows={self.num_windows})"


WINDOW_RULE = "spread"
"""How eval windows are chosen (recorded with every score, so rows of other rules are never mixed)."""


def selected_windows(num_windows: int, seq_len: int, token_budget: int | None) -> list[int]:
    """The windows an eval scores: all of them without a budget (or one they fit in), else
    ceil(budget / seq_len) windows spread evenly over the whole split: the middle window of each of that
    many equal strata. A split is stored in input order, so its first windows are one document or source
    and not the split. Deterministic: every evaluation scores the same tokens."""
    count = num_windows if token_budget is None else min(num_windows, math.ceil(token_budget / seq_len))
    if count == num_windows:
        return list(range(num_windows))
    return [(2 * i + 1) * num_windows // (2 * count) for i in range(count)]


def eval_windows(packed: PackedSequences, token_budget: int | None, dp_rank: int = 0, dp_size: int = 1) -> list[int]:
    """This rank's share of the selected windows (`selected_windows`): ranks take every dp_size-th one,
    starting at their own rank, so no window is scored twice and every world size scores the same ones."""
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} outside [0, {dp_size})")
    return selected_windows(len(packed), packed.seq_len, token_budget)[dp_rank::dp_size]
