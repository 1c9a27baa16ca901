"""The options of `cpt export` and `cpt checkpoint info/convert` (no torch: the CLI reads them)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class InfoOptions:
    """`cpt checkpoint info`: one checkpoint folder, or a run (its checkpoints, the newest in detail)."""

    path: str


@dataclass
class ConvertOptions:
    """`cpt checkpoint convert`: the universal conversion of a committed checkpoint."""

    path: str


@dataclass
class ExportOptions:
    """`cpt export`: which checkpoint, where to, in which dtype."""

    checkpoint: str
    """A run directory (its newest committed checkpoint) or a checkpoint folder."""
    out: str
    dtype: str = "fp32"
