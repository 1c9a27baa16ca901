"""The demo's figures (the paper's, through `cpt plot`'s code) and REPORT.md.

Every number in the report is the mean ± sd over the seeds of one of the findings' quantities (each
read from a run's metrics.jsonl or scores.jsonl, or computed from those), or the upstream model's
provenance; findings.json lists every seed's numbers with the file each was read from.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

from continual_pt.data.dataset import PreparedDataset
from continual_pt.demo.evidence import Finding, Runs, run_name, spread
from continual_pt.demo.findings import DOWN, UP, start_scores
from continual_pt.demo.notes import notes
from continual_pt.demo.recipe import Scale
from continual_pt.demo.upstream import read_provenance
from continual_pt.files import atomic_write_text
from continual_pt.layout import METRICS
from continual_pt.results.plots import plot_runs
from continual_pt.results.report import load_runs

REPORT = "REPORT.md"
FINDINGS = "findings.json"
FIGURES = {   # figure -> its runs, in legend order (those not run are left out)
    "warmup": ("warmup0", "warmup0.5", "rewarm", "warmup2"),
    "max-lr": ("maxlr0.5x", "rewarm", "maxlr2x", "constant", "scratch"),
    "checkpoints": ("from7pct", "from19pct", "rewarm"),
    "same-data": ("same-data", "rewarm"),
    "replay": ("rewarm", "replay5"),
    "max-lr-long": ("maxlr0.5x-long", "rewarm-long", "maxlr2x-long"),
}
WHAT = {
    "rewarm": "1% warmup to the upstream max LR, cosine to 0.1x (the centre)",
    "warmup0": "warmup 0%", "warmup0.5": "warmup 0.5%", "warmup2": "warmup 2%",
    "maxlr0.5x": "max LR 0.5x upstream max", "maxlr2x": "max LR 2x upstream max",
    "constant": "constant LR at the upstream min (0.1x max), no warmup",
    "scratch": "random init, same schedule", "same-data": "re-warmed on the upstream corpus",
    "from19pct": "from the 19% upstream checkpoint", "from7pct": "from the 7% upstream checkpoint",
    "replay5": "95% downstream + 5% upstream replay",
    "maxlr0.5x-long": "max LR 0.5x, a 4x longer phase", "rewarm-long": "as rewarm, a 4x longer phase",
    "maxlr2x-long": "max LR 2x, a 4x longer phase",
}


def figures(runs_dir: Path, out: Path) -> dict[str, Path]:
    """One PNG (and SVG) per group: held-out loss vs tokens per set, with the LR, from the in-loop evals of
    the runs of seed 1 (the other seeds' curves are in their runs' metrics.jsonl)."""
    made = {}
    for name, members in FIGURES.items():
        present = [str(runs_dir / run_name(m, 1)) for m in members if (runs_dir / run_name(m, 1) / METRICS).is_file()]
        if len(present) >= 2:
            made[name] = plot_runs(load_runs(present, source="metrics"), [UP, DOWN], out / name,
                                   title=f"cpt demo: {name} (seed 1)")[0]
    return made


def _label(f: Finding) -> str:
    return f"{f.key}. {f.claim}" if f.key.isdigit() else f"{f.key}: {f.claim}"


def _findings_table(findings: list[Finding]) -> list[str]:
    lines = ["| finding | verdict | the numbers that decide it | margin of the rule (> 0: on the claim's side) | "
             "rule |", "|---|---|---|---|---|"]
    for f in findings:
        lines.append(f"| {_label(f)} | **{f.verdict}** | {f.evidence or 'its runs are not in this grid'} | "
                     f"{f.margin_text() or '-'} | {f.rule} |")
    return lines


def _seeds_table(findings: list[Finding], seeds: int) -> list[str]:
    lines = ["| finding | " + " | ".join(f"seed {k}" for k in range(1, seeds + 1)) + " |",
             "|---|" + "---|" * seeds]
    for f in findings:
        cells = {t.seed: "holds" if t.holds else "does not hold" for t in f.trials}
        lines.append(f"| {f.key} | " + " | ".join(cells.get(k, "not run") for k in range(1, seeds + 1)) + " |")
    return lines


def _runs_table(runs_dir: Path, names: list[str], start: dict[str, float], seeds: int) -> list[str]:
    per_seed = [Runs(runs_dir, k) for k in range(1, seeds + 1)]
    lines = ["| run | what changes | upstream final | downstream final | upstream vs start model | "
             "downstream vs start model |", "|---|---|---:|---:|---:|---:|"]
    for name in names:
        if not all(r.has(name) for r in per_seed):
            continue
        up, down = [r.final(name, UP).value for r in per_seed], [r.final(name, DOWN).value for r in per_seed]
        lines.append(f"| {name} | {WHAT.get(name, '')} | {spread(up)} | {spread(down)} | "
                     f"{spread([v - start[UP] for v in up], '+.4f')} | "
                     f"{spread([v - start[DOWN] for v in down], '+.4f')} |")
    return lines


def _corpora(out: Path, options, sizes: dict[str, dict[str, int]]) -> str:
    """The report's line on the two corpora: the built-in ones of the shift, or the samples of the user's."""
    mb = {c: ", ".join(f"{src} {n / 1e6:.2f} MB" for src, n in parts.items()) for c, parts in sizes.items()}
    if not options.own:
        return (f"- Shift: **{options.shift}**. Upstream corpus: {mb.get('upstream', '?')}; downstream: "
                f"{mb.get('downstream', '?')} (code: the Python standard library; scripture: the King James Bible; "
                "documents split by a hash of their name, none in both).")
    parts = []
    for corpus, sources in (("upstream", options.upstream), ("downstream", options.downstream)):
        info = json.loads((out / "data" / f"{corpus}.sample.json").read_text())
        parts.append(f"{corpus} `{' '.join(sources)}`: a sample of {info['documents']:,} documents from "
                     f"{info['files_read']} of its {info['files']} file(s) ({mb.get(corpus, '?')})")
    return ("- Corpora: **yours**, " + "; ".join(parts) + ". Each sample is the first documents of files spread "
            "evenly over the corpus, up to an equal share each (`data/<corpus>.sample.json`).")


def _setup(out: Path, options, scale: Scale, provenance: dict[str, Any], sizes: dict[str, dict[str, int]],
           seconds: list[float], split_tokens: dict[str, int]) -> list[str]:
    held_out = ", ".join(f"{name} {n:,} tokens" for name, n in split_tokens.items())
    steps_tokens = scale.steps * scale.micro_batch * scale.seq_len
    return [
        _corpora(out, options, sizes),
        f"- Upstream model: GPT-NeoX, {provenance['params']:,} parameters, BPE of {scale.vocab_size} fit on "
        f"upstream only; pre-trained {provenance['tokens']:,} tokens = **{provenance['tokens_per_param']} tokens "
        f"per parameter** (Pythia 410M: ~730) with Pythia's recipe (`{provenance['command']}`, seed "
        f"{provenance['seed']}); checkpoints at steps {', '.join(map(str, provenance['checkpoints'].values()))}.",
        f"- Each continual run: {scale.steps} steps × {scale.micro_batch * scale.seq_len:,} tokens = "
        f"{steps_tokens:,} tokens on the DeepSpeed engine (`cpt sweep --local`), in-loop evaluation every "
        f"{scale.eval_every} steps on {scale.eval_tokens:,} tokens per set; final losses by `cpt eval` of the "
        f"final checkpoint on {scale.score_tokens:,} tokens per held-out set. Each is that many tokens of "
        f"windows spread evenly over the whole held-out split ({held_out}).",
        f"- **{options.seeds} seed(s)** per run (`train.seed` and `data.seed` {scale.seed}"
        + (f" to {scale.seed + options.seeds - 1}" if options.seeds > 1 else "") + ": the order of the data, and "
        "the initialisation of scratch). Every number below is the mean ± sd over the seeds (sd with n - 1); "
        "each rule is applied to each seed's runs alone: a finding **holds** when it holds in every seed, **does "
        "not hold** when it holds in none, and is **mixed (k of n)** otherwise. `findings.json` keeps every "
        "seed's numbers with the file each was read from.",
        f"- Wall time of `cpt demo`: {seconds[0] / 60:.1f} min on {platform.machine()} with "
        f"{os.cpu_count()} CPUs ({'--full' if options.full else 'default grid'}, scale {scale.name})"
        + (f"; {len(seconds) - 1} later run(s) of the command added {sum(seconds[1:]) / 60:.1f} min" if
           len(seconds) > 1 else "") + ".",
    ]


def _start_lines(out: Path, scale: Scale, runs_dir: Path, seeds: int) -> list[str]:
    start = {name: n.value for name, n in start_scores(out).items()}
    step0 = {name: spread([Runs(runs_dir, k).start("rewarm", name).value for k in range(1, seeds + 1)])
             for name in (UP, DOWN)}
    return [f"Start model (the final upstream checkpoint, `cpt eval` on {scale.score_tokens:,} tokens per set): "
            f"upstream {start[UP]:.4f}, downstream {start[DOWN]:.4f}. The same model's in-loop step-0 eval in run "
            f"rewarm ({scale.eval_tokens:,} tokens per set, another sample of the same splits): upstream "
            f"{step0[UP]}, downstream {step0[DOWN]}.", "", *_runs_table(runs_dir, list(WHAT), start, seeds)]


def write(out: Path, options, scale: Scale, model: Path, sizes: dict[str, dict[str, int]],
          findings: list[Finding], figs: dict[str, Path], seconds: list[float]) -> Path:
    """Write findings.json and REPORT.md; returns the report's path."""
    provenance = read_provenance(model)
    runs_dir = out / "sweep" / "runs"
    split_tokens = {name: PreparedDataset(out / "data" / name, "val").num_tokens for name in (UP, DOWN)}
    holding = sum(f.holds is True for f in findings[:7])
    mixed = sum(f.verdict.startswith("mixed") for f in findings[:7])
    title = "your corpora" if options.own else f"{options.shift} shift"
    lines = [f"# cpt demo: the paper's findings at laptop scale ({title})", "",
             *_setup(out, options, scale, provenance, sizes, seconds, split_tokens), "",
             f"**{holding} of the paper's 7 findings hold at this scale** in every one of {options.seeds} seed(s)"
             + (f" ({mixed} mixed)" if mixed else "") + f"; the replay finding of the follow-up "
             f"{findings[7].verdict}. Losses are nats per token on held-out data.", "",
             "## Findings", "", *_findings_table(findings), "",
             "Per seed:", "", *_seeds_table(findings, options.seeds), "",
             "## At this scale", "", *notes(scale, provenance, findings, runs_dir, options.seeds), "",
             "## Runs", "", *_start_lines(out, scale, runs_dir, options.seeds), "",
             "## Figures", ""]
    lines += [f"![{name}]({path.relative_to(out).as_posix()})" for name, path in figs.items()]
    atomic_write_text(out / FINDINGS, json.dumps([f.to_json() for f in findings], indent=1) + "\n")
    path = out / REPORT
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
