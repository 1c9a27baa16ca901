"""The held-out sets `cpt eval` scores on: `--set NAME=PATH[:SPLIT]`, one split of a prepared dataset,
opened, checked and fingerprinted by content; and the fields that identify one measurement of a
checkpoint on a set (a row of the scores store). No torch: `cpt sweep --status` counts with it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from continual_pt.data.dataset import WINDOW_RULE, PreparedDataset, Setting
from continual_pt.errors import UserError

SPLITS = ("val", "train")


@dataclass
class EvalSet:
    """A named held-out set: one split of a prepared dataset, opened and fingerprinted."""

    name: str
    path: Path
    split: str
    dataset: PreparedDataset | None = None
    fingerprint: str = ""


def parse_set(spec: str) -> EvalSet:
    """NAME=PATH (its val split) or NAME=PATH:SPLIT with SPLIT in val, train (the whole train split)."""
    name, sep, rest = spec.partition("=")
    if not sep or not name.strip() or not rest:
        raise UserError(f"--set {spec!r}: expected NAME=PATH or NAME=PATH:SPLIT (split val, the default, "
                        "or train), e.g. --set pile=data/pile or --set sp=data/sp:train")
    path, split = rest, "val"
    head, colon, tail = rest.rpartition(":")
    if colon and tail in SPLITS:
        path, split = head, tail
    elif colon and "/" not in tail and not Path(rest).exists():
        raise UserError(f"--set {spec!r}: unknown split {tail!r}; accepted: {', '.join(SPLITS)}")
    return EvalSet(name.strip(), Path(path), split)


def fingerprint(ds: PreparedDataset) -> str:
    """Content identity of a split: its tokenizer and the sha256 of each shard (not the prepare time)."""
    ident = {"tokenizer": ds.tokenizer_sha256, "split": ds.split,
             "shards": [[s.get("sha256"), int(s["num_tokens"])] for s in ds.shards]}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def open_sets(specs: list[str]) -> list[EvalSet]:
    """Parse and open every --set (UserError on a missing dataset, split or a repeated name)."""
    sets: list[EvalSet] = []
    for spec in specs:
        s = parse_set(spec)
        if any(o.name == s.name for o in sets):
            raise UserError(f"--set {spec!r}: the name {s.name!r} is given twice; names must differ")
        setting = Setting(f"--set {spec!r}", f"pass --set {s.name}=<that folder>")
        s.dataset = PreparedDataset(s.path, split=s.split, setting=setting)
        s.fingerprint = fingerprint(s.dataset)
        sets.append(s)
    return sets


def measurement(identity: str, s: EvalSet, budget: int | None, seq_len: int, dtype: str,
                selection: str = WINDOW_RULE) -> dict[str, Any]:
    """The fields that make a row of checkpoint `identity` on set `s` one measurement (the store's key);
    a row of one domain of it adds its `domain`."""
    return {"checkpoint": identity, "set": s.name, "split": s.split, "set_fingerprint": s.fingerprint,
            "budget": budget, "selection": selection, "seq_len": seq_len, "dtype": dtype}
