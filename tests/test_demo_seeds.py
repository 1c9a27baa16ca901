"""`cpt demo`'s replicates: every verdict re-derived from findings.json over all seeds with the stated
rules, every mean and sd checked against the seeds' own numbers, and seeds that disagree make a
finding "mixed (k of n)" (constructed run files, no training)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from continual_pt.demo import findings
from continual_pt.demo.evidence import Finding, Trial, run_name

STEPS = 8   # the decision window is STEPS // 4 = 2 steps


def rule_holds(key: str, v: list[float]) -> bool:
    """Each finding's rule, written again over the numbers one seed lists (in their listed order)."""
    if key == "1":
        return v[1] - v[0] > findings.RISE and v[3] - v[2] > findings.RISE
    if key == "6":
        return v[1] - v[0] > findings.RISE
    if key == "2":
        finals = v[: len(v) // 2]
        return max(finals) - min(finals) <= findings.SAME
    if key in ("3", "3-long"):
        return v[0] > v[1] > v[2] and v[3] < v[4] < v[5]
    if key == "4":
        early = (len(v) - 2) // 2
        constant, rewarm = v[:early], v[early:2 * early]
        return sum(constant) / early < sum(rewarm) / early and v[-1] < v[-2]
    if key == "5":
        return v[1] < v[0] and v[3] < v[2]
    if key == "7":
        return all(v[0] < o for o in v[1:])
    assert key == "replay"
    gain, cost = v[1] - v[0], v[2] - v[3]
    return gain > 0 and cost < gain


def expected_verdict(held: list[bool]) -> str:
    if not held:
        return "not run"
    if all(held):
        return "holds"
    return "does not hold" if not any(held) else f"mixed ({sum(held)} of {len(held)})"


def _summary_text(values: list[float]) -> str:
    """How the report writes a quantity: the mean (its sign aside) ± the sample sd."""
    if len(values) == 1:
        return f"{abs(values[0]):.4f}"
    return f"{abs(statistics.fmean(values)):.4f} ± {statistics.stdev(values):.4f}"


def check_findings(decided: list[dict], seeds: int, report: str | None = None) -> None:
    """Re-derive every verdict of findings.json from every seed's numbers, and check each mean and sd
    (and, given the report, that its row shows them) against the seeds' own values."""
    for f in decided:
        trials = f["trials"]
        if not trials:
            assert (f["verdict"], f["holds"], f["evidence"]) == ("not run", None, ""), f
            continue
        assert [t["seed"] for t in trials] == list(range(1, seeds + 1)), f["key"]
        for t in trials:
            values = [n["value"] for n in t["numbers"]]
            assert t["holds"] == rule_holds(f["key"], values), (f["key"], t)
            assert all(n["seed"] == t["seed"] and n["file"] for n in t["numbers"]), t
            shown = [v for v in t["shown"] if isinstance(v, float)]
            assert all(v in shown for v in values), (f["key"], t)   # every number it read is shown
        held = [t["holds"] for t in trials]
        assert f["verdict"] == expected_verdict(held) and f["holds_in"] == sum(held) and f["seeds"] == seeds
        assert f["holds"] == (all(held) if f["verdict"] in ("holds", "does not hold") else None)
        for i, q in enumerate(f["shown"]):
            column = [t["shown"][i] for t in trials]
            assert q["values"] == column
            if "mean" in q:
                assert q["mean"] == pytest.approx(statistics.fmean(column), abs=1e-12)
                assert q["sd"] == (pytest.approx(statistics.stdev(column), abs=1e-12) if seeds > 1 else None)
        for label, m in f["margins"].items():
            assert m["values"] == [t["margins"][label] for t in trials]
            assert m["mean"] == pytest.approx(statistics.fmean(m["values"]), abs=1e-12)
        if report is not None:
            row = next(line for line in report.splitlines() if line.startswith(f"| {f['key']}"))
            assert f"**{f['verdict']}**" in row
            for q in [*f["shown"], *f["margins"].values()]:
                if "mean" in q:
                    assert _summary_text(q["values"]) in row, (q, row)


# ------------------------------------------------------------------ a constructed demo folder


def _curve(start: float, peak: float, end: float) -> list[float]:
    """In-loop losses at steps 0, 2, 4, 6, 8: the start, the early peak, then down to the end."""
    return [start, peak, (peak + end) / 2, (peak + 3 * end) / 4, end]


# run -> (upstream start, peak, final), (downstream start, peak, final); seed 2 of maxlr2x ends higher
RUNS = {
    "rewarm": ((3.0, 3.5, 3.30), (3.2, 3.6, 2.50)),
    "maxlr0.5x": ((3.0, 3.3, 3.20), (3.2, 3.4, 2.60)),
    "maxlr2x": ((3.0, 3.9, 3.45), (3.2, 3.9, 2.40)),
    "constant": ((3.0, 3.0, 3.10), (3.2, 3.0, 2.70)),
    "warmup0": ((3.0, 3.6, 3.31), (3.2, 3.7, 2.51)),
    "scratch": ((7.0, 6.5, 5.00), (7.0, 6.5, 5.00)),
    "same-data": ((3.0, 3.3, 2.95), (3.2, 3.3, 3.25)),
    "from19pct": ((3.6, 3.9, 3.80), (3.4, 3.6, 2.90)),
    "replay5": ((3.0, 3.4, 3.10), (3.2, 3.6, 2.52)),
}
LONG = {"maxlr0.5x-long": ((3.0, 3.3, 3.15), (3.2, 3.4, 2.30)), "rewarm-long": ((3.0, 3.5, 3.25), (3.2, 3.6, 2.20)),
        "maxlr2x-long": ((3.0, 3.9, 3.40), (3.2, 3.9, 2.10))}


def write_runs(runs_dir: Path, seeds: int, maxlr2x_down: dict[int, float], long: bool = False) -> None:
    for seed in range(1, seeds + 1):
        for run, sets in {**RUNS, **(LONG if long else {})}.items():
            folder = runs_dir / run_name(run, seed)
            folder.mkdir(parents=True)
            evals, scores = [], []
            for name, (start, peak, end) in zip((findings.UP, findings.DOWN), sets):
                if run == "maxlr2x" and name == findings.DOWN:
                    end = maxlr2x_down[seed]
                jitter = 0.001 * seed   # the seeds differ a little everywhere
                for step, loss in zip(range(0, STEPS + 1, 2), _curve(start, peak + jitter, end + jitter)):
                    evals.append({"kind": "eval", "set": name, "step": step, "loss": loss})
                scores.append({"set": name, "step": STEPS, "loss": end + jitter})
            (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
            (folder / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in scores))


def test_seeds_that_disagree_make_a_finding_mixed_and_each_number_is_the_seeds_mean_and_sd(tmp_path):
    runs_dir = tmp_path / "sweep" / "runs"
    write_runs(runs_dir, 3, maxlr2x_down={1: 2.40, 2: 2.55, 3: 2.45}, long=True)   # seed 2: 2x ends above 1x
    decided = findings.decide(runs_dir, STEPS, 3)
    verdicts = {f.key: f.verdict for f in decided}
    assert verdicts == {"1": "holds", "2": "holds", "3": "mixed (2 of 3)", "4": "holds", "5": "holds",
                        "6": "holds", "7": "holds", "replay": "holds", "3-long": "holds"}
    f3 = decided[2]
    assert f3.holds is None and f3.held == 2
    assert [t.holds for t in f3.trials] == [True, False, True]
    down_2x = [2.40 + 0.001, 2.55 + 0.002, 2.45 + 0.003]
    assert f"{statistics.fmean(down_2x):.4f} ± {statistics.stdev(down_2x):.4f}" in f3.evidence
    margin = [2.501 - 2.401, 2.502 - 2.552, 2.503 - 2.453]   # downstream 1x - 2x, seed by seed
    assert f"downstream 1x − 2x {statistics.fmean(margin):+.4f} ± {statistics.stdev(margin):.4f}" in f3.margin_text()
    check_findings(json.loads(json.dumps([f.to_json() for f in decided])), 3)
    # Every number names the file it was read from, in the folder of its seed.
    number = f3.trials[1].numbers[2]
    assert (number.run, number.seed, number.file) == ("maxlr2x", 2, "sweep/runs/maxlr2x-seed2/scores.jsonl")


def test_a_finding_holds_in_every_seed_or_in_none_and_a_check_of_the_rules_catches_a_wrong_verdict(tmp_path):
    runs_dir = tmp_path / "sweep" / "runs"
    write_runs(runs_dir, 2, maxlr2x_down={1: 2.55, 2: 2.56})
    decided = [f.to_json() for f in findings.decide(runs_dir, STEPS, 2)]
    assert decided[2]["verdict"] == "does not hold" and decided[2]["holds"] is False
    assert decided[8]["key"] == "3-long" and decided[8]["verdict"] == "not run"   # its runs are --full only
    check_findings(decided, 2)
    decided[2]["trials"][0]["holds"] = True   # a verdict its numbers do not give is caught
    with pytest.raises(AssertionError):
        check_findings(decided, 2)


def test_one_seed_shows_the_value_alone_and_no_seed_is_not_run():
    f = Finding("x", "claim", "rule")
    assert f.verdict == "not run" and f.holds is None and f.evidence == ""
    t = Trial(1, holds=True)
    t.template = f"loss {t.q(3.25)} at step {t.q(4, 'd')}"
    f.trials.append(t)
    assert (f.verdict, f.holds, f.evidence) == ("holds", True, "loss 3.2500 at step 4")
