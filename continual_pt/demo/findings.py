"""The paper's findings, each decided from the runs' own files by a stated rule, seed by seed.

Two kinds of numbers decide them, and every one is kept with the file it came from:
- `eval`: a run's in-loop evaluation at one step (its metrics.jsonl, `kind: eval`), for the
  course of training (the early rise, the early lead of the constant LR);
- `score`: `cpt eval` of a run's final checkpoint on the held-out set (its scores.jsonl), for
  final losses.
Each rule is applied to the runs of one seed at a time (see `continual_pt.demo.evidence`). A
finding whose runs are missing (not in this grid) is "not run", never guessed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from continual_pt.demo.evidence import Finding, Number, Runs
from continual_pt.evaluation.store import read_scores
from continual_pt.layout import SCORES

UP, DOWN = "upstream", "downstream"
RISE = 0.01        # nats: a loss "rises" when it goes above its step-0 value by more than this
SAME = 0.02        # nats: final losses within this of each other are "the same"
RE_WARMED = ("rewarm", "warmup0", "warmup0.5", "warmup2", "maxlr0.5x", "maxlr2x")


START_SCORES = f"start-{SCORES}"   # `cpt eval` of the start model (the final upstream checkpoint)


def start_scores(out: Path) -> dict[str, Number]:
    """The start model's `cpt eval` loss per set, from <out>/start-scores.jsonl."""
    rows = [r for r in read_scores(out / START_SCORES) if "set" in r]   # loss rows (not lm-eval task rows)
    return {r["set"]: Number("start model", r["set"], "score", int(r["step"] or 0), float(r["loss"]), 0,
                             START_SCORES) for r in rows}


def rewarming_raises_both_losses_first(r: Runs, window: int) -> Finding:
    f = Finding("1", "Re-warming first raises the loss on both upstream and downstream data.",
                f"in run rewarm, the highest in-loop loss of the first {window} steps exceeds the step-0 loss "
                f"by more than {RISE} on both sets")
    if r.has("rewarm"):
        t = f.trial(r)
        parts, t.holds = [], True
        for name in (UP, DOWN):
            s, p = r.start("rewarm", name), r.peak_early("rewarm", name, window)
            t.numbers += [s, p]
            t.holds &= p.value - s.value > RISE
            t.margins[f"{name} rise − {RISE}"] = p.value - s.value - RISE
            parts.append(f"{name} {t.q(s.value)} at step 0 → {t.q(p.value)} at step {t.q(p.step, 'd')} "
                         f"({t.q(p.value - s.value, '+.4f')})")
        t.template = "; ".join(parts)
    return f


def warmup_length_has_no_lasting_effect(r: Runs, window: int) -> Finding:
    names = [n for n in ("warmup0", "warmup0.5", "rewarm", "warmup2") if r.has(n)]
    f = Finding("2", "Warmup length (0-2%) has no significant lasting effect; 0% gives a short initial spike.",
                f"the final downstream losses of the warmup runs (0%, 0.5%, 1% = rewarm, 2%) lie within {SAME}; "
                f"the early peaks (first {window} steps) are shown")
    if "warmup0" in names and "rewarm" in names:
        t = f.trial(r)
        finals = [r.final(n, DOWN) for n in names]
        peaks = [r.peak_early(n, DOWN, window) for n in names]
        t.numbers = finals + peaks
        spread = max(x.value for x in finals) - min(x.value for x in finals)
        t.holds = spread <= SAME
        t.margins[f"{SAME} − spread"] = SAME - spread
        t.template = (f"final downstream {', '.join(f'{n} {t.q(x.value)}' for n, x in zip(names, finals))}: "
                      f"spread {t.q(spread)}; early downstream peaks "
                      f"{', '.join(f'{n} {t.q(x.value)}' for n, x in zip(names, peaks))}")
    return f


def higher_max_lr_learns_more_and_forgets_more(r: Runs, suffix: str = "") -> Finding:
    """Finding 3 on runs maxlr0.5x, rewarm, maxlr2x; with suffix "-long", on their 4x longer twins (--full)."""
    names = tuple(n + suffix for n in ("maxlr0.5x", "rewarm", "maxlr2x"))
    f = Finding("3" + suffix, "Higher max LR: lower final downstream loss, more forgetting upstream."
                + (" (A continual phase 4x as long.)" if suffix else ""),
                "final downstream loss falls and final upstream loss rises from 0.5x to 1x to 2x the upstream max LR"
                + (f" (runs {', '.join(names)})" if suffix else ""))
    if r.has(*names):
        t = f.trial(r)
        down = [r.final(n, DOWN) for n in names]
        up = [r.final(n, UP) for n in names]
        t.numbers = down + up
        t.holds = all(a.value > b.value for a, b in zip(down, down[1:])) and \
            all(a.value < b.value for a, b in zip(up, up[1:]))
        for label, (a, b) in {"downstream 0.5x − 1x": down[:2], "downstream 1x − 2x": down[1:],
                              "upstream 1x − 0.5x": up[1::-1], "upstream 2x − 1x": up[:0:-1]}.items():
            t.margins[label] = a.value - b.value
        t.template = (f"downstream {' → '.join(t.q(x.value) for x in down)}; "
                      f"upstream {' → '.join(t.q(x.value) for x in up)}")
    return f


def constant_lr_leads_early_rewarming_wins_late(r: Runs, window: int) -> Finding:
    f = Finding("4", "Constant LR is best early; re-warm + re-decay wins at the end.",
                f"downstream: the mean of the in-loop losses of the first {window} steps is lower for constant "
                "than for rewarm, and rewarm ends below constant (cpt eval)")
    if r.has("constant", "rewarm"):
        t = f.trial(r)
        early = {n: [x for x in r.curve(n, DOWN) if 0 < x.step <= window] for n in ("constant", "rewarm")}
        mean = {n: sum(x.value for x in xs) / len(xs) for n, xs in early.items()}
        c_end, w_end = r.final("constant", DOWN), r.final("rewarm", DOWN)
        t.numbers = [*early["constant"], *early["rewarm"], c_end, w_end]
        t.holds = mean["constant"] < mean["rewarm"] and w_end.value < c_end.value
        t.margins["early: rewarm − constant"] = mean["rewarm"] - mean["constant"]
        t.margins["end: constant − rewarm"] = c_end.value - w_end.value
        t.template = (f"first {window} steps: constant {' → '.join(t.q(x.value) for x in early['constant'])} "
                      f"(mean {t.q(mean['constant'])}) vs rewarm {' → '.join(t.q(x.value) for x in early['rewarm'])} "
                      f"(mean {t.q(mean['rewarm'])}); end: constant {t.q(c_end.value)} vs rewarm {t.q(w_end.value)}")
    return f


def every_rewarmed_run_beats_scratch(r: Runs) -> Finding:
    f = Finding("5", "All re-warmed models beat training from scratch on both datasets.",
                "every re-warmed run (rewarm, warmup*, maxlr*) ends below scratch on both sets (cpt eval)")
    names = [n for n in RE_WARMED if r.has(n)]
    if names and r.has("scratch"):
        t = f.trial(r)
        parts, t.holds = [], True
        for name in (UP, DOWN):
            scratch = r.final("scratch", name)
            worst = max((r.final(n, name) for n in names), key=lambda x: x.value)
            t.numbers += [scratch, worst]
            t.holds &= worst.value < scratch.value
            t.margins[f"{name}: scratch − worst"] = scratch.value - worst.value
            parts.append(f"{name}: worst re-warmed {t.q(worst.run, 's')} {t.q(worst.value)} vs scratch "
                         f"{t.q(scratch.value)}")
        t.template = "; ".join(parts)
    return f


def rewarming_on_the_same_data_raises_the_loss(r: Runs, window: int) -> Finding:
    f = Finding("6", "Re-warming on the same (upstream) data also raises the loss.",
                f"in run same-data, the highest in-loop upstream loss of the first {window} steps exceeds the "
                f"step-0 loss by more than {RISE}")
    if r.has("same-data"):
        t = f.trial(r)
        s, p = r.start("same-data", UP), r.peak_early("same-data", UP, window)
        t.numbers = [s, p]
        t.holds = p.value - s.value > RISE
        t.margins[f"rise − {RISE}"] = p.value - s.value - RISE
        t.template = (f"upstream {t.q(s.value)} at step 0 → {t.q(p.value)} at step {t.q(p.step, 'd')} "
                      f"({t.q(p.value - s.value, '+.4f')})")
    return f


def the_final_upstream_checkpoint_is_the_best_start(r: Runs) -> Finding:
    f = Finding("7", "Earlier upstream checkpoints do not learn the new data faster; the final one is best.",
                "the run from the final upstream checkpoint (rewarm) ends with the lowest downstream loss of "
                "the runs from 7%, 19% and 100% of pre-training (cpt eval)")
    names = [n for n in ("from7pct", "from19pct") if r.has(n)]
    if names and r.has("rewarm"):
        t = f.trial(r)
        final = r.final("rewarm", DOWN)
        others = [r.final(n, DOWN) for n in names]
        t.numbers = [final, *others]
        t.holds = all(final.value < o.value for o in others)
        t.margins.update({f"{o.run} − final": o.value - final.value for o in others})
        t.template = f"downstream: from final {t.q(final.value)}; " + ", ".join(f"{o.run} {t.q(o.value)}" for o in others)
    return f


def replay_cuts_forgetting_cheaply(r: Runs) -> Finding:
    f = Finding("replay", "5% replay of upstream data cuts forgetting at a small downstream cost (Ibrahim et al.).",
                "replay5 ends below rewarm upstream, and its downstream loss rises by less than its upstream "
                "loss falls (cpt eval)")
    if r.has("replay5", "rewarm"):
        t = f.trial(r)
        up_r, up_w = r.final("replay5", UP), r.final("rewarm", UP)
        down_r, down_w = r.final("replay5", DOWN), r.final("rewarm", DOWN)
        t.numbers = [up_r, up_w, down_r, down_w]
        gain, cost = up_w.value - up_r.value, down_r.value - down_w.value
        t.holds = gain > 0 and cost < gain
        t.margins.update({"upstream gain": gain, "gain − downstream cost": gain - cost})
        t.template = (f"upstream: replay5 {t.q(up_r.value)} vs rewarm {t.q(up_w.value)} ({t.q(-gain, '+.4f')}); "
                      f"downstream: replay5 {t.q(down_r.value)} vs rewarm {t.q(down_w.value)} ({t.q(cost, '+.4f')})")
    return f


def decide(runs_dir: Path, steps: int, seeds: int) -> list[Finding]:
    """Every finding, in the paper's order, then replay, then finding 3 over a longer phase; each rule applied
    to every seed's runs."""
    window = max(1, steps // 4)
    checks: list[Callable[[Runs], Finding]] = [
        lambda r: rewarming_raises_both_losses_first(r, window),
        lambda r: warmup_length_has_no_lasting_effect(r, window),
        higher_max_lr_learns_more_and_forgets_more,
        lambda r: constant_lr_leads_early_rewarming_wins_late(r, window),
        every_rewarmed_run_beats_scratch,
        lambda r: rewarming_on_the_same_data_raises_the_loss(r, window),
        the_final_upstream_checkpoint_is_the_best_start,
        replay_cuts_forgetting_cheaply,
        lambda r: higher_max_lr_learns_more_and_forgets_more(r, "-long")]
    per_seed = [[check(r) for check in checks] for r in (Runs(runs_dir, seed) for seed in range(1, seeds + 1))]
    decided = per_seed[0]
    for later in per_seed[1:]:
        for finding, again in zip(decided, later):
            finding.trials += again.trials
    return decided
