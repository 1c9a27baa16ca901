"""The options of `cpt demo` (see `continual_pt.options`)."""

from __future__ import annotations

from dataclasses import dataclass

from continual_pt.options import option

SHIFTS = ("weak", "strong")
"""How far downstream is from upstream: weak (mostly code -> mostly scripture, as Pile -> SlimPajama) or
strong (code -> scripture only, as English -> German)."""
SCALES = ("demo", "tiny")
"""demo: the miniature of the paper; tiny: a very small model and a few steps, to check the pipeline."""


@dataclass(kw_only=True)
class DemoOptions:
    """`cpt demo`: where its folder is, which shift, how much of the grid, at which scale."""

    out: str = option("demo", help="folder for everything the demo writes", flags=("--out", "-o"))
    shift: str = option("weak", help="weak: mostly code -> mostly scripture, as Pile -> SlimPajama; strong: code "
                        "-> scripture only, as English -> German", choices=SHIFTS)
    full: bool = option(False, help="also warmup 0.5%% and 2%%, the 7%% upstream checkpoint, and finding 3's three "
                        "max LRs over a 4x longer phase (default: the subset that fits about 10 minutes on 2 cores)")
    pretrain: bool = option(False, help="pre-train the upstream model here (Pythia's recipe)")
    seeds: int = option(3, help="replicates of every run (seeds S, S+1, ...: the order of the data, and the "
                        "initialisation of the run from scratch); each number of the report is their mean ± sd, and a "
                        "finding holds only if it holds in every seed (fewer is quicker and says less: with 1 there is "
                        "no spread to show)", metavar="N")
    scale: str = option("demo", help="demo, or tiny: a very small model and a few steps, to check the pipeline",
                        choices=SCALES)
