"""The options of `cpt export` and `cpt checkpoint info/convert` (see `continual_pt.options`)."""

from __future__ import annotations

from dataclasses import dataclass

from continual_pt.layout import CHECKPOINTS, PRECISIONS, TAG_PREFIX
from continual_pt.options import option


@dataclass(kw_only=True)
class InfoOptions:
    """`cpt checkpoint info`: one checkpoint folder, or a run (its checkpoints, the newest in detail)."""

    path: str = option(help=f"a checkpoint folder ({TAG_PREFIX}<N>), or a run or {CHECKPOINTS} directory (all its "
                       "checkpoints listed, the newest committed one in detail)", positional=True)


@dataclass(kw_only=True)
class ConvertOptions:
    """`cpt checkpoint convert`: the universal conversion of a committed checkpoint, made ahead of time."""

    path: str = option(help="a checkpoint folder, or a run directory (its newest committed checkpoint)",
                       positional=True)


@dataclass(kw_only=True)
class ExportOptions:
    """`cpt export`: which checkpoint, where to, in which dtype."""

    checkpoint: str = option(help="a run directory (its newest committed checkpoint) or a checkpoint folder",
                             positional=True)
    out: str = option(help="folder to write", flags=("--out", "-o"))
    dtype: str = option("fp32", help="weight dtype", choices=PRECISIONS)
