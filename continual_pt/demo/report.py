"""The demo's figures (the paper's, through `cpt plot`'s code) and REPORT.md.

Every number in the report is one of the findings' `Number`s (read from a run's metrics.jsonl or
scores.jsonl) or the upstream model's provenance; findings.json lists each with its source.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

from continual_pt.data.dataset import PreparedDataset
from continual_pt.demo.findings import DOWN, UP, Finding, Runs, start_scores
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
}
WHAT = {
    "rewarm": "1% warmup to the upstream max LR, cosine to 0.1x (the centre)",
    "warmup0": "warmup 0%", "warmup0.5": "warmup 0.5%", "warmup2": "warmup 2%",
    "maxlr0.5x": "max LR 0.5x upstream max", "maxlr2x": "max LR 2x upstream max",
    "constant": "constant LR at the upstream min (0.1x max), no warmup",
    "scratch": "random init, same schedule", "same-data": "re-warmed on the upstream corpus",
    "from19pct": "from the 19% upstream checkpoint", "from7pct": "from the 7% upstream checkpoint",
    "replay5": "95% downstream + 5% upstream replay",
}


def figures(runs_dir: Path, out: Path) -> dict[str, Path]:
    """One PNG (and SVG) per group: held-out loss vs tokens per set, with the LR, from the in-loop evals."""
    made = {}
    for name, members in FIGURES.items():
        present = [str(runs_dir / m) for m in members if (runs_dir / m / METRICS).is_file()]
        if len(present) >= 2:
            made[name] = plot_runs(load_runs(present, source="metrics"), [UP, DOWN], out / name,
                                   title=f"cpt demo: {name}")[0]
    return made


def _findings_table(findings: list[Finding]) -> list[str]:
    lines = ["| finding | verdict | the numbers that decide it | rule |", "|---|---|---|---|"]
    for f in findings:
        label = f"{f.key}. {f.claim}" if f.key.isdigit() else f"{f.key}: {f.claim}"
        lines.append(f"| {label} | **{f.verdict}** | {f.evidence or 'its runs are not in this grid'} | {f.rule} |")
    return lines


def _runs_table(runs_dir: Path, names: list[str], start: dict[str, float]) -> list[str]:
    r = Runs(runs_dir)
    lines = ["| run | what changes | upstream final | downstream final | upstream vs start model | "
             "downstream vs start model |", "|---|---|---:|---:|---:|---:|"]
    for name in names:
        if not r.has(name):
            continue
        up, down = r.final(name, UP), r.final(name, DOWN)
        lines.append(f"| {name} | {WHAT.get(name, '')} | {up.text()} | {down.text()} | "
                     f"{up.value - start[UP]:+.4f} | {down.value - start[DOWN]:+.4f} |")
    return lines


def _setup(options, scale: Scale, provenance: dict[str, Any], sizes: dict[str, dict[str, int]],
           seconds: list[float], split_tokens: dict[str, int]) -> list[str]:
    held_out = ", ".join(f"{name} {n:,} tokens" for name, n in split_tokens.items())
    mb = {c: ", ".join(f"{src} {n / 1e6:.1f} MB" for src, n in parts.items()) for c, parts in sizes.items()}
    steps_tokens = scale.steps * scale.micro_batch * scale.seq_len
    return [
        f"- Shift: **{options.shift}**. Upstream corpus: {mb.get('upstream', '?')}; downstream: "
        f"{mb.get('downstream', '?')} (code: the Python standard library; scripture: the King James Bible; "
        "documents split by a hash of their name, none in both).",
        f"- Upstream model: GPT-NeoX, {provenance['params']:,} parameters, BPE of {scale.vocab_size} fit on "
        f"upstream only; pre-trained {provenance['tokens']:,} tokens = **{provenance['tokens_per_param']} tokens "
        f"per parameter** (Pythia 410M: ~730) with Pythia's recipe (`{provenance['command']}`, seed "
        f"{provenance['seed']}); checkpoints at steps {', '.join(map(str, provenance['checkpoints'].values()))}.",
        f"- Each continual run: {scale.steps} steps × {scale.micro_batch * scale.seq_len:,} tokens = "
        f"{steps_tokens:,} tokens on the DeepSpeed engine (`cpt sweep --local`), in-loop evaluation every "
        f"{scale.eval_every} steps on {scale.eval_tokens:,} tokens per set; final losses by `cpt eval` of the "
        f"final checkpoint on {scale.score_tokens:,} tokens per held-out set. Each is that many tokens of "
        f"windows spread evenly over the whole held-out split ({held_out}).",
        f"- Wall time of `cpt demo`: {seconds[0] / 60:.1f} min on {platform.machine()} with "
        f"{os.cpu_count()} CPUs ({'--full' if options.full else 'default grid'}, scale {scale.name})"
        + (f"; {len(seconds) - 1} later run(s) of the command added {sum(seconds[1:]) / 60:.1f} min" if
           len(seconds) > 1 else "") + ".",
    ]


def write(out: Path, options, scale: Scale, model: Path, sizes: dict[str, dict[str, int]],
          findings: list[Finding], figs: dict[str, Path], seconds: list[float]) -> Path:
    """Write findings.json and REPORT.md; returns the report's path."""
    provenance = read_provenance(model)
    start = {name: n.value for name, n in start_scores(out).items()}
    runs_dir = out / "sweep" / "runs"
    split_tokens = {name: PreparedDataset(out / "data" / name, "val").num_tokens for name in (UP, DOWN)}
    step0 = {name: Runs(runs_dir).start("rewarm", name).value for name in (UP, DOWN)}
    holding = sum(f.holds is True for f in findings[:7])
    lines = [f"# cpt demo: the paper's findings at laptop scale ({options.shift} shift)", "",
             *_setup(options, scale, provenance, sizes, seconds, split_tokens), "",
             f"**{holding} of the paper's 7 findings hold at this scale**; the replay finding of the "
             f"follow-up {findings[7].verdict}. Losses are nats per token on held-out data.", "",
             "## Findings", "", *_findings_table(findings), "",
             "## Runs", "",
             f"Start model (the final upstream checkpoint, `cpt eval` on {scale.score_tokens:,} tokens per set): "
             f"upstream {start[UP]:.4f}, downstream {start[DOWN]:.4f}. The same model's in-loop step-0 eval in run "
             f"rewarm ({scale.eval_tokens:,} tokens per set, another sample of the same splits): upstream "
             f"{step0[UP]:.4f}, downstream {step0[DOWN]:.4f}.", "",
             *_runs_table(runs_dir, list(WHAT), start), "",
             "## Figures", ""]
    lines += [f"![{name}]({path.relative_to(out).as_posix()})" for name, path in figs.items()]
    atomic_write_text(out / FINDINGS, json.dumps([f.to_json() for f in findings], indent=1) + "\n")
    path = out / REPORT
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
