"""The options of `cpt demo` (see `continual_pt.options`)."""

from __future__ import annotations

from dataclasses import dataclass

from continual_pt.data.options import LAYOUTS
from continual_pt.errors import Problems
from continual_pt.options import option

SHIFTS = ("weak", "strong")
"""How far downstream is from upstream: weak (mostly code -> mostly scripture, as Pile -> SlimPajama) or
strong (code -> scripture only, as English -> German)."""
SCALES = ("demo", "tiny")
"""demo: the miniature of the paper; tiny: a very small model and a few steps, to check the pipeline."""
OWN = "your own corpora"


@dataclass(kw_only=True)
class DemoOptions:
    """`cpt demo`: where its folder is, which shift, how much of the grid, at which scale."""

    GROUPS = {OWN: "Run the same study on a sample of your corpora instead of the built-in ones (a pilot before "
                   "the cluster run): give both --upstream and --downstream. The demo cuts a sample of each, fits "
                   "its tokenizer and pre-trains its upstream model on yours (--pretrain is implied), then runs "
                   "the grid and writes the same report. It prints its plan and a time estimate first."}

    out: str = option("demo", help="folder for everything the demo writes", flags=("--out", "-o"))
    shift: str = option("weak", help="weak: mostly code -> mostly scripture, as Pile -> SlimPajama; strong: code "
                        "-> scripture only, as English -> German (the built-in corpora)", choices=SHIFTS)
    full: bool = option(False, help="also warmup 0.5%% and 2%%, the 7%% upstream checkpoint, and finding 3's three "
                        "max LRs over a 4x longer phase (default: the subset that fits about 10 minutes on 2 cores)")
    pretrain: bool = option(False, help="pre-train the upstream model here (Pythia's recipe)")
    seeds: int = option(3, help="replicates of every run (seeds S, S+1, ...: the order of the data, and the "
                        "initialisation of the run from scratch); each number of the report is their mean ± sd, and a "
                        "finding holds only if it holds in every seed (fewer is quicker and says less: with 1 there is "
                        "no spread to show)", metavar="N")
    scale: str = option("demo", help="demo, or tiny: a very small model and a few steps, to check the pipeline",
                        choices=SCALES)
    upstream: list[str] = option([], help="your upstream corpus, the one the model was trained on (repeatable): "
                                 "anything `cpt prepare --source` reads", metavar="SRC", group=OWN)
    downstream: list[str] = option([], help="your downstream corpus, the new one (repeatable): anything `cpt prepare "
                                   "--source` reads", metavar="SRC", group=OWN)
    upstream_layout: str | None = option(None, help="read each --upstream as a corpus folder as it ships, as `cpt "
                                         "prepare --layout` does (only its training files are sampled)",
                                         choices=LAYOUTS, group=OWN)
    downstream_layout: str | None = option(None, help="the same for each --downstream", choices=LAYOUTS, group=OWN)
    domain_field: str | None = option(None, help="where a record of either corpus keeps its domain (as `cpt prepare "
                                      "--domain-field`; a layout brings its own): the report gives each sample's "
                                      "make-up by domain", metavar="PATH", group=OWN)
    text_field: str = option("text", help="field holding the text in either corpus (as `cpt prepare --text-field`)",
                             group=OWN)

    @property
    def own(self) -> bool:
        """Whether the demo runs on the user's corpora."""
        return bool(self.upstream or self.downstream)

    def check(self) -> None:
        """Raise one UserError listing every invalid option."""
        p = Problems("options")
        if self.seeds < 1:
            p.add("", f"--seeds must be at least 1, got {self.seeds}")
        if self.own and not (self.upstream and self.downstream):
            p.add("", "give both --upstream and --downstream (your corpora), or neither (the built-in ones)")
        if self.own and self.shift != "weak":
            p.add("", "--shift chooses between the built-in corpora; with --upstream and --downstream the shift is "
                      "the one between yours")
        if not self.own:
            given = [flag for flag, value in (("--upstream-layout", self.upstream_layout),
                                              ("--downstream-layout", self.downstream_layout),
                                              ("--domain-field", self.domain_field),
                                              ("--text-field", self.text_field != "text")) if value]
            if given:
                p.add("", f"{', '.join(given)}: describe(s) your corpora, given with --upstream and --downstream")
        if not self.text_field:
            p.add("", "--text-field must not be empty")
        if self.domain_field == "":
            p.add("", "--domain-field must not be empty")
        p.raise_if_any()
