"""The paper's findings, each decided from the runs' own files by a stated rule.

Two kinds of numbers decide them, and every one is kept with where it came from:
- `eval`: a run's in-loop evaluation at one step (its metrics.jsonl, `kind: eval`), for the
  course of training (the early rise, the early lead of the constant LR);
- `score`: `cpt eval` of a run's final checkpoint on the held-out set (its scores.jsonl), for
  final losses.
A finding whose runs are missing (not in this grid) is "not run", never guessed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from continual_pt.evaluation.store import read_scores
from continual_pt.layout import METRICS, SCORES
from continual_pt.results.records import read_metrics

UP, DOWN = "upstream", "downstream"
RISE = 0.01        # nats: a loss "rises" when it goes above its step-0 value by more than this
SAME = 0.02        # nats: final losses within this of each other are "the same"
RE_WARMED = ("rewarm", "warmup0", "warmup0.5", "warmup2", "maxlr0.5x", "maxlr2x")


@dataclass(frozen=True)
class Number:
    """One loss read from a run's files."""

    run: str
    set: str
    kind: str        # "eval" (metrics.jsonl, in-loop) or "score" (scores.jsonl, cpt eval)
    step: int
    value: float

    def text(self) -> str:
        return f"{self.value:.4f}"


@dataclass
class Finding:
    key: str
    claim: str
    rule: str
    holds: bool | None = None          # None: not run in this grid
    evidence: str = ""
    numbers: list[Number] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        return {True: "holds", False: "does not hold", None: "not run"}[self.holds]

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "verdict": self.verdict}


class Runs:
    """The numbers of a demo's runs, read from <sweep>/runs/<name>/{metrics,scores}.jsonl."""

    def __init__(self, runs_dir: Path):
        self.dir = runs_dir
        self._evals: dict[str, list[dict[str, Any]]] = {}
        self._scores: dict[str, list[dict[str, Any]]] = {}

    def has(self, *names: str) -> bool:
        return all((self.dir / n / METRICS).is_file() for n in names)

    def curve(self, run: str, name: str) -> list[Number]:
        """In-loop evaluations of a set, by step."""
        if run not in self._evals:
            self._evals[run] = [r for r in read_metrics(self.dir / run / METRICS)
                                if r.get("kind") == "eval" and not r.get("domain")]
        return [Number(run, name, "eval", int(r["step"]), float(r["loss"])) for r in self._evals[run]
                if r.get("set") == name]

    def start(self, run: str, name: str) -> Number:
        return self.curve(run, name)[0]

    def final(self, run: str, name: str) -> Number:
        """`cpt eval` of the run's newest scored checkpoint on the set."""
        if run not in self._scores:
            self._scores[run] = read_scores(self.dir / run / SCORES)
        rows = [r for r in self._scores[run] if r.get("set") == name and not r.get("domain")]
        if not rows:
            raise LookupError(f"{self.dir / run / SCORES}: no score of set {name!r}")
        row = max(rows, key=lambda r: r["step"] or 0)
        return Number(run, name, "score", int(row["step"] or 0), float(row["loss"]))

    def peak_early(self, run: str, name: str, window: int) -> Number:
        """The highest in-loop loss after step 0 up to `window` steps."""
        early = [n for n in self.curve(run, name) if 0 < n.step <= window]
        return max(early, key=lambda n: n.value)


START_SCORES = f"start-{SCORES}"   # `cpt eval` of the start model (the final upstream checkpoint)


def start_scores(out: Path) -> dict[str, Number]:
    """The start model's `cpt eval` loss per set, from <out>/start-scores.jsonl."""
    rows = [r for r in read_scores(out / START_SCORES) if "set" in r]   # loss rows (not lm-eval task rows)
    return {r["set"]: Number("start model", r["set"], "score", int(r["step"] or 0), float(r["loss"])) for r in rows}


def _chain(numbers: list[Number]) -> str:
    return " → ".join(n.text() for n in numbers)


def rewarming_raises_both_losses_first(r: Runs, window: int) -> Finding:
    f = Finding("1", "Re-warming first raises the loss on both upstream and downstream data.",
                f"in run rewarm, the highest in-loop loss of the first {window} steps exceeds the step-0 loss "
                f"by more than {RISE} on both sets")
    if r.has("rewarm"):
        parts = []
        f.holds = True
        for name in (UP, DOWN):
            s, p = r.start("rewarm", name), r.peak_early("rewarm", name, window)
            f.numbers += [s, p]
            f.holds &= p.value - s.value > RISE
            parts.append(f"{name} {s.text()} at step 0 → {p.text()} at step {p.step} ({p.value - s.value:+.4f})")
        f.evidence = "; ".join(parts)
    return f


def warmup_length_has_no_lasting_effect(r: Runs, window: int) -> Finding:
    names = [n for n in ("warmup0", "warmup0.5", "rewarm", "warmup2") if r.has(n)]
    f = Finding("2", "Warmup length (0-2%) has no significant lasting effect; 0% gives a short initial spike.",
                f"the final downstream losses of the warmup runs (0%, 0.5%, 1% = rewarm, 2%) lie within {SAME}; "
                f"the early peaks (first {window} steps) are shown")
    if "warmup0" in names and "rewarm" in names:
        finals = [r.final(n, DOWN) for n in names]
        peaks = [r.peak_early(n, DOWN, window) for n in names]
        f.numbers = finals + peaks
        spread = max(x.value for x in finals) - min(x.value for x in finals)
        f.holds = spread <= SAME
        f.evidence = (f"final downstream {', '.join(f'{n} {x.text()}' for n, x in zip(names, finals))}: "
                      f"spread {spread:.4f}; early downstream peaks {', '.join(f'{n} {x.text()}' for n, x in zip(names, peaks))}")
    return f


def higher_max_lr_learns_more_and_forgets_more(r: Runs) -> Finding:
    names = ("maxlr0.5x", "rewarm", "maxlr2x")
    f = Finding("3", "Higher max LR: lower final downstream loss, more forgetting upstream.",
                "final downstream loss falls and final upstream loss rises from 0.5x to 1x to 2x the upstream max LR")
    if r.has(*names):
        down = [r.final(n, DOWN) for n in names]
        up = [r.final(n, UP) for n in names]
        f.numbers = down + up
        falls = all(a.value > b.value for a, b in zip(down, down[1:]))
        rises = all(a.value < b.value for a, b in zip(up, up[1:]))
        f.holds = falls and rises
        f.evidence = (f"downstream {_chain(down)} ({'falls' if falls else 'does not fall throughout'}); "
                      f"upstream {_chain(up)} ({'rises' if rises else 'does not rise throughout'})")
    return f


def constant_lr_leads_early_rewarming_wins_late(r: Runs, window: int) -> Finding:
    f = Finding("4", "Constant LR is best early; re-warm + re-decay wins at the end.",
                f"downstream: the mean of the in-loop losses of the first {window} steps is lower for constant "
                "than for rewarm, and rewarm ends below constant (cpt eval)")
    if r.has("constant", "rewarm"):
        early = {n: [x for x in r.curve(n, DOWN) if 0 < x.step <= window] for n in ("constant", "rewarm")}
        mean = {n: sum(x.value for x in xs) / len(xs) for n, xs in early.items()}
        c_end, w_end = r.final("constant", DOWN), r.final("rewarm", DOWN)
        f.numbers = [*early["constant"], *early["rewarm"], c_end, w_end]
        f.holds = mean["constant"] < mean["rewarm"] and w_end.value < c_end.value
        f.evidence = (f"first {window} steps: constant {_chain(early['constant'])} (mean {mean['constant']:.4f}) vs "
                      f"rewarm {_chain(early['rewarm'])} (mean {mean['rewarm']:.4f}); end: constant "
                      f"{c_end.text()} vs rewarm {w_end.text()}")
    return f


def every_rewarmed_run_beats_scratch(r: Runs) -> Finding:
    f = Finding("5", "All re-warmed models beat training from scratch on both datasets.",
                "every re-warmed run (rewarm, warmup*, maxlr*) ends below scratch on both sets (cpt eval)")
    names = [n for n in RE_WARMED if r.has(n)]
    if names and r.has("scratch"):
        parts, f.holds = [], True
        for name in (UP, DOWN):
            scratch = r.final("scratch", name)
            worst = max((r.final(n, name) for n in names), key=lambda x: x.value)
            f.numbers += [scratch, worst]
            f.holds &= worst.value < scratch.value
            parts.append(f"{name}: worst re-warmed {worst.run} {worst.text()} vs scratch {scratch.text()}")
        f.evidence = "; ".join(parts)
    return f


def rewarming_on_the_same_data_raises_the_loss(r: Runs, window: int) -> Finding:
    f = Finding("6", "Re-warming on the same (upstream) data also raises the loss.",
                f"in run same-data, the highest in-loop upstream loss of the first {window} steps exceeds the "
                f"step-0 loss by more than {RISE}")
    if r.has("same-data"):
        s, p = r.start("same-data", UP), r.peak_early("same-data", UP, window)
        f.numbers = [s, p]
        f.holds = p.value - s.value > RISE
        f.evidence = f"upstream {s.text()} at step 0 → {p.text()} at step {p.step} ({p.value - s.value:+.4f})"
    return f


def the_final_upstream_checkpoint_is_the_best_start(r: Runs) -> Finding:
    f = Finding("7", "Earlier upstream checkpoints do not learn the new data faster; the final one is best.",
                "the run from the final upstream checkpoint (rewarm) ends with the lowest downstream loss of "
                "the runs from 7%, 19% and 100% of pre-training (cpt eval)")
    names = [n for n in ("from7pct", "from19pct") if r.has(n)]
    if names and r.has("rewarm"):
        final = r.final("rewarm", DOWN)
        others = [r.final(n, DOWN) for n in names]
        f.numbers = [final, *others]
        f.holds = all(final.value < o.value for o in others)
        f.evidence = f"downstream: from final {final.text()}; " + ", ".join(f"{o.run} {o.text()}" for o in others)
    return f


def replay_cuts_forgetting_cheaply(r: Runs) -> Finding:
    f = Finding("replay", "5% replay of upstream data cuts forgetting at a small downstream cost (Ibrahim et al.).",
                "replay5 ends below rewarm upstream, and its downstream loss rises by less than its upstream "
                "loss falls (cpt eval)")
    if r.has("replay5", "rewarm"):
        up_r, up_w = r.final("replay5", UP), r.final("rewarm", UP)
        down_r, down_w = r.final("replay5", DOWN), r.final("rewarm", DOWN)
        f.numbers = [up_r, up_w, down_r, down_w]
        gain, cost = up_w.value - up_r.value, down_r.value - down_w.value
        f.holds = gain > 0 and cost < gain
        f.evidence = (f"upstream: replay5 {up_r.text()} vs rewarm {up_w.text()} ({-gain:+.4f}); "
                      f"downstream: replay5 {down_r.text()} vs rewarm {down_w.text()} ({cost:+.4f})")
    return f


def decide(runs_dir: Path, steps: int) -> list[Finding]:
    """Every finding, in the paper's order, then replay."""
    r = Runs(runs_dir)
    window = max(1, steps // 4)
    checks: list[Callable[[], Finding]] = [
        lambda: rewarming_raises_both_losses_first(r, window),
        lambda: warmup_length_has_no_lasting_effect(r, window),
        lambda: higher_max_lr_learns_more_and_forgets_more(r),
        lambda: constant_lr_leads_early_rewarming_wins_late(r, window),
        lambda: every_rewarmed_run_beats_scratch(r),
        lambda: rewarming_on_the_same_data_raises_the_loss(r, window),
        lambda: the_final_upstream_checkpoint_is_the_best_start(r),
        lambda: replay_cuts_forgetting_cheaply(r)]
    return [check() for check in checks]
