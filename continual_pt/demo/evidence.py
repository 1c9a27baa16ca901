"""What a finding rests on: the losses read from the runs' files, one seed's decision, and the
decision over every seed.

Every setting of the grid runs once per seed (`<run>-seed<k>`: data order, and the initialisation
where it is random). A finding's rule is applied to each seed's runs alone (a `Trial`); the finding
holds when it holds in every seed, does not hold when it holds in none, and is "mixed (k of n)"
otherwise. Each quantity its evidence shows, and each margin of its rule, is reported as the mean
± the standard deviation over the seeds.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from continual_pt.evaluation.store import read_scores
from continual_pt.layout import METRICS, SCORES
from continual_pt.results.records import read_metrics

CATEGORICAL = ("d", "s")   # formats of quantities that are not averaged (a step, a run's name)


def run_name(run: str, seed: int) -> str:
    """The folder of one seed of a setting: `rewarm-seed1`, ..."""
    return f"{run}-seed{seed}"


def seed_value(base: int, seed: int) -> int:
    """The `train.seed` and `data.seed` of the k-th seed (1-based): the scale's seed, then the next ones."""
    return base + seed - 1


@dataclass(frozen=True)
class Number:
    """One loss read from a run's files."""

    run: str         # the setting (rewarm, maxlr2x, ...; "start model" for the upstream model's scores)
    set: str
    kind: str        # "eval" (metrics.jsonl, in-loop) or "score" (scores.jsonl, cpt eval)
    step: int
    value: float
    seed: int = 1
    file: str = ""   # the file it was read from, relative to the demo folder

    def text(self) -> str:
        return f"{self.value:.4f}"


def spread(values: list[Any], spec: str = ".4f") -> str:
    """`mean ± sd` of one quantity over the seeds; a step or a name: the one value, or each seed's."""
    if spec in CATEGORICAL:
        texts = [format(v, spec) for v in values]
        return texts[0] if len(set(texts)) == 1 else "/".join(texts)
    if len(values) == 1:
        return format(values[0], spec)
    return f"{format(statistics.fmean(values), spec)} ± {statistics.stdev(values):.4f}"


def mean_sd(values: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else None,
            "values": values}


@dataclass
class Trial:
    """One seed's decision of a finding: the numbers it read, the quantities its evidence shows (in the
    order of their `{i}` in `template`) and the rule's margins (> 0 on the side of the claim)."""

    seed: int
    holds: bool = False
    numbers: list[Number] = field(default_factory=list)
    shown: list[tuple[Any, str]] = field(default_factory=list)
    template: str = ""
    margins: dict[str, float] = field(default_factory=dict)

    def q(self, value: Any, spec: str = ".4f") -> str:
        """Show a quantity in the evidence; returns its place in the template."""
        self.shown.append((value, spec))
        return f"{{{len(self.shown) - 1}}}"

    @property
    def evidence(self) -> str:
        return self.template.format(*(format(v, spec) for v, spec in self.shown))

    def to_json(self) -> dict[str, Any]:
        return {"seed": self.seed, "holds": self.holds, "evidence": self.evidence, "margins": self.margins,
                "shown": [v for v, _ in self.shown], "numbers": [asdict(n) for n in self.numbers]}


@dataclass
class Finding:
    key: str
    claim: str
    rule: str
    trials: list[Trial] = field(default_factory=list)   # one per seed; none: not run in this grid

    def trial(self, r: Runs) -> Trial:
        self.trials.append(Trial(r.seed))
        return self.trials[-1]

    @property
    def held(self) -> int:
        """In how many seeds the rule holds."""
        return sum(t.holds for t in self.trials)

    @property
    def holds(self) -> bool | None:
        """True in every seed, False in none; None when mixed or not run."""
        if not self.trials or 0 < self.held < len(self.trials):
            return None
        return self.held == len(self.trials)

    @property
    def verdict(self) -> str:
        n = len(self.trials)
        if not n:
            return "not run"
        if self.held in (0, n):
            return "holds" if self.held else "does not hold"
        return f"mixed ({self.held} of {n})"

    def _column(self, i: int) -> list[Any]:
        return [t.shown[i][0] for t in self.trials]

    @property
    def evidence(self) -> str:
        """The evidence with every quantity as mean ± sd over the seeds."""
        if not self.trials:
            return ""
        first = self.trials[0]
        if any(t.template != first.template or len(t.shown) != len(first.shown) for t in self.trials):
            raise ValueError(f"finding {self.key}: the seeds' runs differ; cannot summarise them")
        return first.template.format(*(spread(self._column(i), spec) for i, (_, spec) in enumerate(first.shown)))

    @property
    def margins(self) -> dict[str, list[float]]:
        return {label: [t.margins[label] for t in self.trials] for label in (self.trials[0].margins
                                                                              if self.trials else {})}

    def margin_text(self) -> str:
        return "; ".join(f"{label} {spread(values, '+.4f')}" for label, values in self.margins.items())

    def to_json(self) -> dict[str, Any]:
        quantities = [mean_sd(self._column(i)) if spec not in CATEGORICAL else {"values": self._column(i)}
                      for i, (_, spec) in enumerate(self.trials[0].shown)] if self.trials else []
        return {"key": self.key, "claim": self.claim, "rule": self.rule, "verdict": self.verdict,
                "holds": self.holds, "holds_in": self.held, "seeds": len(self.trials), "evidence": self.evidence,
                "shown": quantities, "margins": {k: mean_sd(v) for k, v in self.margins.items()},
                "trials": [t.to_json() for t in self.trials]}


class Runs:
    """The numbers of one seed of a demo's runs, read from <demo>/sweep/runs/<run>-seed<k>/{metrics,scores}.jsonl."""

    def __init__(self, runs_dir: Path, seed: int = 1):
        self.dir = runs_dir
        self.seed = seed
        self._evals: dict[str, list[dict[str, Any]]] = {}
        self._scores: dict[str, list[dict[str, Any]]] = {}

    def path(self, run: str, name: str) -> Path:
        return self.dir / run_name(run, self.seed) / name

    def _rel(self, path: Path) -> str:
        return path.relative_to(self.dir.parent.parent).as_posix()

    def has(self, *names: str) -> bool:
        return all(self.path(n, METRICS).is_file() for n in names)

    def curve(self, run: str, name: str) -> list[Number]:
        """In-loop evaluations of a set, by step."""
        if run not in self._evals:
            self._evals[run] = [r for r in read_metrics(self.path(run, METRICS))
                                if r.get("kind") == "eval" and not r.get("domain")]
        file = self._rel(self.path(run, METRICS))
        return [Number(run, name, "eval", int(r["step"]), float(r["loss"]), self.seed, file)
                for r in self._evals[run] if r.get("set") == name]

    def start(self, run: str, name: str) -> Number:
        return self.curve(run, name)[0]

    def final(self, run: str, name: str) -> Number:
        """`cpt eval` of the run's newest scored checkpoint on the set."""
        path = self.path(run, SCORES)
        if run not in self._scores:
            self._scores[run] = read_scores(path)
        rows = [r for r in self._scores[run] if r.get("set") == name and not r.get("domain")]
        if not rows:
            raise LookupError(f"{path}: no score of set {name!r}")
        row = max(rows, key=lambda r: r["step"] or 0)
        return Number(run, name, "score", int(row["step"] or 0), float(row["loss"]), self.seed, self._rel(path))

    def peak_early(self, run: str, name: str, window: int) -> Number:
        """The highest in-loop loss after step 0 up to `window` steps."""
        early = [n for n in self.curve(run, name) if 0 < n.step <= window]
        return max(early, key=lambda n: n.value)
