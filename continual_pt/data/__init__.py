"""Data: raw sources, tokenization, packed token shards with a manifest, and a resumable sampler.

The public names below are imported lazily, so that `cpt --help` (which imports
`continual_pt.data.prepare_args`) stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "PreparedDataset": "dataset", "PackedSequences": "dataset", "check_tokenizer": "dataset",
    "eval_windows": "dataset", "make_batch": "dataset", "MixtureSampler": "sampler",
    "PrepareOptions": "prepare", "prepare": "prepare", "load_tokenizer": "tokenizer",
    "tokenizer_sha256": "tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
