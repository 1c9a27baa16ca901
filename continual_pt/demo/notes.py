"""The report's "At this scale" notes: how the miniature differs from the paper's runs, read from the
runs themselves, and what that does to finding 3 (a higher max LR gives a lower downstream loss).

In the paper the continual phase (297B tokens of SlimPajama) is about as long as the upstream one
(Pythia's 300B tokens of the Pile), and its 1% warmup alone is 1,313 steps; its re-warmed runs trail
the constant LR for the first ~100B tokens and have ~200B left to make up for it. Here a continual
run is a few percent of the upstream pre-training, and re-warming to a high LR costs a spike that
the run spends a large share of its steps recovering from: the recovery step of each max LR is
shown, so the reader sees how much of the phase is left to profit from the larger steps.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from continual_pt.demo.evidence import Finding, Number, Runs, spread
from continual_pt.demo.grid import LONG
from continual_pt.demo.recipe import Scale
from continual_pt.layout import METRICS
from continual_pt.results.records import read_metrics

DOWN = "downstream"
PAPER_TOKENS = {"upstream": 300e9, "downstream": 296.86e9}   # Pythia on the Pile; the SlimPajama phase
PAPER_WARMUP_STEPS = 1313                                      # 1% of 131,296 steps
MAX_LR = {"maxlr0.5x": "0.5x", "rewarm": "1x", "maxlr2x": "2x"}


def recovery_step(curve: list[Number]) -> int | None:
    """The first in-loop step after the early rise at which the loss is back at or below its step-0 value."""
    start, later = curve[0].value, curve[1:]
    risen = next((i for i, n in enumerate(later) if n.value > start), None)
    if risen is None:
        return 0   # it never rose
    return next((n.step for n in later[risen:] if n.value <= start), None)


def _tokens_per_s(r: Runs) -> float | None:
    if not r.has("rewarm"):
        return None
    speeds = [float(x["tokens_per_s"]) for x in read_metrics(r.path("rewarm", METRICS))
              if x.get("kind") == "train" and x.get("tokens_per_s")]
    return statistics.median(speeds) if speeds else None


def _phases(scale: Scale, provenance: dict[str, Any], r: Runs, runs: int) -> str:
    tokens = scale.steps * scale.micro_batch * scale.seq_len
    ratio = tokens / provenance["tokens"]
    paper = PAPER_TOKENS["downstream"] / PAPER_TOKENS["upstream"]
    speed = _tokens_per_s(r)
    cost = (f" A continual phase as long as the upstream one ({provenance['tokens']:,} tokens) would take about "
            f"{provenance['tokens'] / speed / 60:.1f} min per run at this run's training speed ({speed:,.0f} "
            f"tokens/s), {runs * provenance['tokens'] / speed / 60:.0f} min for the grid's {runs} runs." if speed else "")
    return (f"- **Phase lengths.** Each continual run trains on {tokens:,} tokens, {100 * ratio:.1f}% of the "
            f"upstream pre-training ({provenance['tokens']:,}); in the paper the continual phase is "
            f"{100 * paper:.0f}% of the upstream one (296.86B tokens of SlimPajama after Pythia's 300B of the "
            f"Pile). The 1% warmup is {0.01 * scale.steps:g} steps here (the LR is at its maximum after the "
            f"first step) and {PAPER_WARMUP_STEPS:,} steps there.{cost}")


def _finding3(finding: Finding, per_seed: list[Runs], steps: int) -> str:
    names = [n for n in MAX_LR if all(r.has(n) for r in per_seed)]
    if len(names) < len(MAX_LR):
        return ""
    rise = {n: [r.peak_early(n, DOWN, steps).value - r.start(n, DOWN).value for r in per_seed] for n in names}
    back = {n: [recovery_step(r.curve(n, DOWN)) for r in per_seed] for n in names}
    back_text = ", ".join(f"{MAX_LR[n]} " + "/".join("never" if s is None else str(s) for s in back[n])
                          for n in names)
    margins = finding.margins
    fails = sum(not (a > 0 and b > 0) for a, b in zip(margins["downstream 0.5x − 1x"], margins["downstream 1x − 2x"]))
    why = ("" if not fails else
           f" Here the downstream side fails in {fails} of {len(per_seed)} seed(s), as expected when the phase is too "
           "short for the higher LR to pay back its spike. The upstream side (more forgetting) needs no recovery "
           "and shows at once.")
    return ("- **Finding 3 and the length of the phase.** The early spike of the downstream loss at each max LR "
            "(highest in-loop loss above step 0: "
            + ", ".join(f"{MAX_LR[n]} {spread(rise[n], '+.4f')}" for n in names)
            + f") and the step at which the run is back at its step-0 downstream loss (step {back_text} of "
            f"{steps}, seed by seed; 0: it never rose above it): the rest of the phase, at a decaying LR, is what "
            "a higher LR has to profit from its larger steps. In the paper the re-warmed runs trail the constant LR for the first ~100B tokens (finding 4) and "
            "still have ~200B tokens to pay that back."
            + why + " The rule is kept as the paper states it, and the default grid keeps its length (the "
            "cost of the paper's ratio is above).")


def _longer(long: Finding, scale: Scale, provenance: dict[str, Any]) -> str:
    if not long.trials:
        return ("- `cpt demo --full` also runs finding 3's three max LRs over a 4x longer phase "
                f"({LONG * scale.steps} steps), closer to the paper's equal phases, and decides it again there.")
    tokens = LONG * scale.steps * scale.micro_batch * scale.seq_len
    return (f"- **Finding 3 over a 4x longer phase** ({LONG * scale.steps} steps, {tokens:,} tokens, "
            f"{100 * tokens / provenance['tokens']:.1f}% of the upstream pre-training; runs *-long): "
            f"**{long.verdict}**: {long.evidence}.")


def notes(scale: Scale, provenance: dict[str, Any], findings: list[Finding], runs_dir: Path,
          seeds: int) -> list[str]:
    per_seed = [Runs(runs_dir, k) for k in range(1, seeds + 1)]
    runs = sum(1 for p in runs_dir.iterdir() if (p / METRICS).is_file())
    lines = [_phases(scale, provenance, per_seed[0], runs)]
    by_key = {f.key: f for f in findings}
    if by_key["3"].trials:
        lines.append(_finding3(by_key["3"], per_seed, scale.steps))
        lines.append(_longer(by_key["3-long"], scale, provenance))
    return [line for line in lines if line]
