"""Results of runs: validation curves per held-out set (in-loop evaluations or `cpt eval` scores),
the LR schedule as trained, and `cpt report`'s comparison table.

    cpt report runs/const runs/rewarm-3e-4 runs/rewarm-6e-4 --upstream pile --downstream slimpajama \\
        --baseline runs/const --out report.md
    cpt report sweeps/rewarm --upstream pile --downstream slimpajama --baseline constant

A sweep directory (with `sweep.json`, from `cpt sweep`) stands for its runs, sorted by their axis
values, and the table gains a column per axis key (see results/sweep_dirs.py); `--baseline` may
then name a run of it.

Curves come from a run's metrics.jsonl (kind "eval" records, logged by training) or from the
scores.jsonl that `cpt eval` writes into the run directory. With source "auto", a set uses
the scores when the run has any for it, else the in-loop records. Within the scores, one
series is used per set: the (split, budget, window selection, seq len, dtype) measured at the most
checkpoints, ties going to the larger budget, so that a curve never mixes measurements. A set scored
by domain also has a curve per domain, named `set/domain` (in-loop `eval.by_domain`, `cpt eval
--by-domain`); `--by-domain` adds a table per set of each domain's final loss and its forgetting
(upstream) or gain (downstream). Downstream-task rows of the scores (`cpt eval --lm-eval`) are
never loss rows: they give each run's task series and the table's task columns (results/tasks.py).

The LR is drawn from the schedule in the run's saved config.yaml, from step 0 (so a warmup shows)
to the last step the run reached, at tokens = step x tokens per step.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from continual_pt.config import Problems, ScheduleConfig, build_section
from continual_pt.errors import UserError
from continual_pt.evaluation.store import read_scores
from continual_pt.files import atomic_write_text
from continual_pt.layout import EXIT_OK, METRICS, RUN_CONFIG, SCORES
from continual_pt.results.options import ReportOptions
from continual_pt.results.records import read_metrics
from continual_pt.results.sweep_dirs import expand
from continual_pt.results.tasks import TaskSeries, is_task_row, table_parts, task_series
from continual_pt.schedules import build, check_config, curve

SOURCES = ("auto", "metrics", "scores")


@dataclass(frozen=True)
class Point:
    """One evaluation of one set."""

    step: int
    tokens: int
    loss: float
    ppl: float


@dataclass
class RunCurves:
    """What a run's files say: validation curves per set and the learning rate per step."""

    name: str
    path: Path
    evals: dict[str, list[Point]] = field(default_factory=dict)
    """Set name -> points ordered by step."""
    sources: dict[str, str] = field(default_factory=dict)
    """Set name -> "metrics" or "scores": where its curve came from."""
    metrics_evals: dict[str, list[Point]] = field(default_factory=dict)
    """The in-loop curves, kept for the step-0 reference of forgetting."""
    lr: list[tuple[int, float]] = field(default_factory=list)
    """(tokens seen, learning rate): the schedule from step 0, else each logged training step."""
    init: str | None = None
    """The checkpoint (or pretrained model) the run started from: checkpoint.init of its config."""
    varying: dict[str, Any] = field(default_factory=dict)
    """A sweep's run: axis key -> this run's value (empty for a run dir given on its own)."""
    tasks: dict[str, TaskSeries] = field(default_factory=dict)
    """Task name -> its series of downstream-task scores (cpt eval --lm-eval)."""


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def curve_name(record: dict[str, Any]) -> str:
    """The curve a record or score row belongs to: its set, or `set/domain` for one domain of a set."""
    return f"{record['set']}/{record['domain']}" if record.get("domain") else record["set"]


def domains_of(runs: list[RunCurves], name: str) -> list[str]:
    """The domains of set `name` that any of the runs has curves of (scored by domain), sorted."""
    return sorted({k.split("/", 1)[1] for r in runs for k in r.evals if k.startswith(f"{name}/")})


def _metrics_curves(records: list[dict[str, Any]]) -> dict[str, list[Point]]:
    curves: dict[str, list[Point]] = {}
    for r in records:
        if r.get("kind") == "eval" and _finite(r.get("loss")):
            ppl = r["ppl"] if _finite(r.get("ppl")) else math.exp(min(r["loss"], 700.0))
            curves.setdefault(curve_name(r), []).append(Point(int(r["step"]), int(r.get("tokens") or 0), r["loss"],
                                                              ppl))
    return {k: sorted(v, key=lambda p: p.step) for k, v in curves.items()}


def _series_rank(rows: list[dict[str, Any]]) -> tuple:
    budget = rows[0].get("budget")
    return len({r["step"] for r in rows}), math.inf if budget is None else budget


def _scores_curves(rows: list[dict[str, Any]]) -> dict[str, list[Point]]:
    """One series per set from the loss rows of our checkpoints (see the module docstring)."""
    series: dict[str, dict[tuple, list[dict[str, Any]]]] = {}
    for r in rows:
        if is_task_row(r) or r.get("kind") != "checkpoint" or r.get("step") is None or not _finite(r.get("loss")):
            continue
        key = (r.get("split"), r.get("budget"), r.get("selection"), r.get("seq_len"), r.get("dtype"))
        series.setdefault(curve_name(r), {}).setdefault(key, []).append(r)
    curves = {}
    for name, groups in series.items():
        best = max(groups.values(), key=_series_rank)
        by_step = {r["step"]: r for r in best}  # a later row of a step replaces an earlier one
        curves[name] = [Point(int(r["step"]), int(r.get("tokens_seen") or 0), r["loss"], r["ppl"])
                        for r in sorted(by_step.values(), key=lambda r: r["step"])]
    return curves


def _saved_config(run_dir: Path) -> dict[str, Any]:
    """The run's config.yaml as plain data ({} when it has none)."""
    path = run_dir / RUN_CONFIG
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML: {exc}") from None
    if data is not None and not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of config sections, got {type(data).__name__}")
    return data or {}


def _section(saved: dict[str, Any], name: str) -> dict[str, Any]:
    value = saved.get(name)
    return value if isinstance(value, dict) else {}


def tokens_per_step(saved: dict[str, Any], records: list[dict[str, Any]]) -> int | None:
    """Tokens of one optimizer step: from a logged training record, else from the config's
    train.global_batch_size x data.seq_len; None when neither says."""
    for r in records:
        step, tokens = r.get("step"), r.get("tokens")
        if r.get("kind", "train") == "train" and isinstance(step, int) and step > 0 and isinstance(tokens, int):
            return tokens // step
    batch, seq_len = _section(saved, "train").get("global_batch_size"), _section(saved, "data").get("seq_len")
    return batch * seq_len if isinstance(batch, int) and isinstance(seq_len, int) else None


def schedule_lr(run_dir: Path, saved: dict[str, Any],
                records: list[dict[str, Any]]) -> list[tuple[int, float]] | None:
    """(tokens, LR) of the saved config's schedule from step 0 to the last step the run reached;
    None (with a warning if the config is unusable) when the config does not give it."""
    max_steps, tps = _section(saved, "train").get("max_steps"), tokens_per_step(saved, records)
    if "schedule" not in saved or not isinstance(max_steps, int) or max_steps < 1 or not tps:
        return None
    p = Problems(default_origin=str(run_dir / RUN_CONFIG))
    cfg = build_section(ScheduleConfig, saved["schedule"], "schedule", p)
    if not p.items:
        check_config(cfg, p, max_steps)
    if p.items:
        print(f"warning: the LR panel shows the logged LR of {run_dir}: {'; '.join(p.items)}", file=sys.stderr)
        return None
    reached = max((r["step"] for r in records if isinstance(r.get("step"), int)), default=max_steps)
    lr_at = build(cfg, max_steps)
    steps = sorted({s for s in curve(cfg, max_steps)[0] if s <= reached} | {reached})
    return [(step * tps, lr_at(step)) for step in steps]


def load_run(path: str | Path, source: str = "auto") -> RunCurves:
    """A run directory's curves; UserError if it has neither metrics.jsonl nor scores.jsonl."""
    run_dir = Path(path)
    if source not in SOURCES:
        raise UserError(f"--source {source!r}: accepted: {', '.join(SOURCES)}")
    metrics_file, scores_file = run_dir / METRICS, run_dir / SCORES
    if not metrics_file.is_file() and not scores_file.is_file():
        raise UserError(f"{run_dir}: not a run directory with results (no {METRICS}, no {SCORES})")
    records = read_metrics(metrics_file)
    from_metrics = _metrics_curves(records)
    scores = read_scores(scores_file)
    from_scores = _scores_curves(scores) if source != "metrics" else {}
    saved = _saved_config(run_dir)
    init = _section(saved, "checkpoint").get("init")
    run = RunCurves(str(saved.get("name") or run_dir.name), run_dir, metrics_evals=from_metrics,
                    init=str(init) if init else None, tasks=task_series(scores))
    for name in list(from_metrics) + [n for n in from_scores if n not in from_metrics]:
        use_scores = name in from_scores and source in ("auto", "scores")
        if use_scores or (source != "scores" and name in from_metrics):
            run.evals[name] = from_scores[name] if use_scores else from_metrics[name]
            run.sources[name] = "scores" if use_scores else "metrics"
    planned = schedule_lr(run_dir, saved, records)
    run.lr = planned if planned is not None else [
        (int(r["tokens"]), float(r["lr"])) for r in records
        if r.get("kind", "train") == "train" and _finite(r.get("lr")) and "tokens" in r]
    return run


def load_runs(paths: list[str], source: str = "auto") -> list[RunCurves]:
    """Several runs (a sweep directory standing for its runs); their display names are made unique
    with the folder name when they clash."""
    runs = []
    for member in expand(paths):
        run = load_run(member.path, source)
        run.varying = dict(member.varying)
        runs.append(run)
    names = [r.name for r in runs]
    for r in runs:
        if names.count(r.name) > 1:
            r.name = f"{r.name} ({r.path})"
    return runs


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Summary:
    """The numbers of one run's row."""

    final: Point | None
    best: Point | None


def summarize(points: list[Point]) -> Summary:
    """Final (last step) and best (lowest loss) evaluation; step 0 (the start model) counts only
    when the run has nothing else, since it measures the checkpoint the run started from."""
    trained = [p for p in points if p.step > 0] or points
    if not trained:
        return Summary(None, None)
    return Summary(trained[-1], min(trained, key=lambda p: p.loss))


def start_loss(run: RunCurves, name: str) -> float | None:
    """The set's loss at step 0: from the run's curve, else from its in-loop step-0 evaluation."""
    for points in (run.evals.get(name, []), run.metrics_evals.get(name, [])):
        for p in points:
            if p.step == 0:
                return p.loss
    return None


def _fmt(value: float | None, digits: int, signed: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _axis_cell(run: RunCurves, key: str) -> str:
    """A run's value of an axis key as table text ("" when the run is not of a sweep with that axis)."""
    if key not in run.varying:
        return ""
    value = run.varying[key]
    return ("-" if value is None else str(value)).replace("|", "\\|")


def report_rows(runs: list[RunCurves], upstream: str, downstream: str,
                baseline: RunCurves | None) -> list[dict[str, Any]]:
    """Per run: final/best loss and ppl of both sets, forgetting and gain (None where unknown).
    Forgetting is measured only for a run that started from a checkpoint (checkpoint.init): the
    step 0 of a run from scratch is a random model, nothing there to forget."""
    base_final = summarize(baseline.evals.get(downstream, [])).final if baseline else None
    rows = []
    axes = list(dict.fromkeys(key for run in runs for key in run.varying))
    for run in runs:
        up, down = summarize(run.evals.get(upstream, [])), summarize(run.evals.get(downstream, []))
        start = start_loss(run, upstream) if run.init else None
        last = up.final or down.final
        rows.append({
            "run": run.name, "axes": [_axis_cell(run, key) for key in axes],
            "tokens": last.tokens if last else None, "up": up, "down": down,
            "forgetting": up.final.loss - start if up.final and start is not None else None,
            "gain": base_final.loss - down.final.loss if base_final and down.final else None,
        })
    return rows


def markdown_table(runs: list[RunCurves], upstream: str, downstream: str,
                   baseline: RunCurves | None = None, task_metrics: list[str] | tuple[str, ...] = ()) -> str:
    """The comparison table as GitHub markdown, one row per run in the given order, with a column
    per axis key of the sweeps among them, and task columns (all metrics, or `task_metrics`) with
    their notes below when the runs have downstream-task scores."""
    task_head, task_cells, notes = table_parts(runs, baseline, task_metrics)
    axes = list(dict.fromkeys(key for run in runs for key in run.varying))
    head = ["run", *axes, "tokens"]
    for name in (upstream, downstream):
        head += [f"{name} final loss", f"{name} final ppl", f"{name} best loss", f"{name} best ppl"]
    head.append(f"forgetting (Δ {upstream} loss from step 0)")
    if baseline is not None:
        head.append(f"gain vs {baseline.name} (Δ final {downstream} loss)")
    head += task_head
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for row, tasks in zip(report_rows(runs, upstream, downstream, baseline), task_cells):
        cells = [row["run"], *row["axes"], "n/a" if row["tokens"] is None else f"{row['tokens']:,}"]
        for s in (row["up"], row["down"]):
            cells += [_fmt(s.final and s.final.loss, 4), _fmt(s.final and s.final.ppl, 2),
                      _fmt(s.best and s.best.loss, 4), _fmt(s.best and s.best.ppl, 2)]
        cells.append(_fmt(row["forgetting"], 4, signed=True))
        if baseline is not None:
            cells.append(_fmt(row["gain"], 4, signed=True))
        lines.append("| " + " | ".join(cells + tasks) + " |")
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def domain_table(runs: list[RunCurves], name: str, upstream: bool, baseline: RunCurves | None) -> str:
    """Per run, each domain's final loss of set `name` and its forgetting from step 0 (upstream: runs
    started from a checkpoint) or its gain against the baseline's final loss (downstream)."""
    doms = domains_of(runs, name)
    change = "Δ from step 0" if upstream else (f"gain vs {baseline.name}" if baseline else None)
    head = ["run", *(f"{d} final" for d in doms), *((f"{d} {change}" for d in doms) if change else ())]
    lines = [f"{name} by domain ({'upstream: forgetting' if upstream else 'downstream: gain'}):", "",
             "| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for run in runs:
        finals = [summarize(run.evals.get(f"{name}/{d}", [])).final for d in doms]
        cells = [run.name, *(_fmt(f and f.loss, 4) for f in finals)]
        for d, f in zip(doms, finals):
            if upstream:
                start = start_loss(run, f"{name}/{d}") if run.init else None
                cells.append(_fmt(f.loss - start if f and start is not None else None, 4, signed=True))
            elif baseline is not None:
                base = summarize(baseline.evals.get(f"{name}/{d}", [])).final
                cells.append(_fmt(base.loss - f.loss if base and f else None, 4, signed=True))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _check_set(runs: list[RunCurves], flag: str, name: str | None) -> str:
    known = sorted({s for r in runs for s in r.evals if "/" not in s})
    if not name:
        raise UserError(f"{flag} is required: the name of a held-out set; these runs have: "
                        f"{', '.join(known) or 'none'}")
    if name not in known:
        raise UserError(f"{flag} {name!r}: no run has evaluations of that set; known sets: "
                        f"{', '.join(known) or 'none'}")
    return name


def run_report(options: ReportOptions) -> int:
    """`cpt report`: print or write the markdown comparison table."""
    runs = load_runs(options.runs, options.source)
    upstream = _check_set(runs, "--upstream", options.upstream)
    downstream = _check_set(runs, "--downstream", options.downstream)
    baseline = None
    if options.baseline:
        match = [r for r in runs if r.path.resolve() == Path(options.baseline).resolve()]
        if not match and not Path(options.baseline).exists():   # a run of a sweep, by its name
            match = [r for r in runs if r.path.name == options.baseline or r.name == options.baseline][:1]
        baseline = match[0] if match else load_run(options.baseline, options.source)
        if not baseline.evals.get(downstream):
            raise UserError(f"--baseline {options.baseline}: no evaluation of {downstream!r} to compare with")
    table = markdown_table(runs, upstream, downstream, baseline, options.task_metrics)
    if options.by_domain:
        tables = [domain_table(runs, name, is_upstream, baseline)
                  for name, is_upstream in ((upstream, True), (downstream, False)) if domains_of(runs, name)]
        if not tables:
            raise UserError(f"--by-domain: neither {upstream!r} nor {downstream!r} was scored by domain in these "
                            "runs (eval.by_domain: true, or cpt eval --by-domain)")
        table = "\n".join([table, *tables])
    if options.out:
        out = Path(options.out)
        atomic_write_text(out, table)
        print(f"wrote {out}")
    else:
        print(table, end="")
    return EXIT_OK
