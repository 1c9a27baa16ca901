"""`cpt demo`: corpora → upstream model → the grid (`cpt sweep --local`) → `cpt eval` → figures → REPORT.md.

Everything lands in one folder (default `demo/`):

    demo.json              the demo's settings; a rerun with other settings is refused
    demo.lock              held while a demo runs here: a second one at the same time is refused
    data/                  upstream.jsonl, downstream.jsonl and their prepared datasets
    pretrain/, upstream/   with --pretrain: the upstream run and its exported checkpoints
    demo-base.yaml, demo-grid.yaml, sweep/   the grid and its runs (sweep/runs/<run>/)
    figures/               the paper's figures (PNG + SVG), one per finding group
    findings.json, REPORT.md

Every step is skipped when its output is already there, so a stopped demo (Ctrl-C) continues
where it stopped when run again.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch

from continual_pt.data.options import PrepareOptions
from continual_pt.data.prepare import prepare
from continual_pt.demo import report
from continual_pt.demo.corpora import write_corpora
from continual_pt.demo.findings import START_SCORES, decide
from continual_pt.demo.grid import SWEEP, write_grid
from continual_pt.demo.options import SCALES, SHIFTS, DemoOptions
from continual_pt.demo.recipe import SCALE, Scale
from continual_pt.demo.upstream import FINAL, fit_tokenizer, pretrain, shipped, verify
from continual_pt.errors import UserError
from continual_pt.evaluation.command import run_eval
from continual_pt.evaluation.options import EvalOptions
from continual_pt.files import atomic_write_text, check_writable
from continual_pt.layout import CHECKPOINTS, EXIT_OK, EXIT_RESUMABLE
from continual_pt.sweep.options import SweepOptions
from continual_pt.sweep.plan import run_sweep
from continual_pt.training.lock import RunLock

SETTINGS = "demo.json"
LOCK = "demo.lock"
VAL_FRACTION = 0.05


def _scale(options: DemoOptions) -> Scale:
    if options.shift not in SHIFTS:
        raise UserError(f"--shift must be one of {', '.join(SHIFTS)}, got {options.shift!r}")
    if options.scale not in SCALES:
        raise UserError(f"--scale must be one of {', '.join(SCALES)}, got {options.scale!r}")
    if options.seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {options.seeds}")
    return SCALE[options.scale]


def _claim(out: Path, options: DemoOptions, write: bool = True) -> None:
    """Record the settings in a new folder; refuse a folder of another demo or of something else.
    With `write` False only the refusals (nothing is written)."""
    settings = {k: v for k, v in asdict(options).items() if k != "out"}
    path = out / SETTINGS
    if path.is_file():
        old = json.loads(path.read_text())
        if {k: old.get(k) for k in settings} != settings:
            raise UserError(f"{out} holds a demo run with other settings ({path}: {old}); give another --out")
        return
    if out.exists() and (not out.is_dir() or any(p.name != LOCK for p in out.iterdir())):
        raise UserError(f"--out {out} exists and is not a demo folder (no {SETTINGS}); give another --out")
    if write:
        atomic_write_text(path, json.dumps(settings, indent=1) + "\n")


def _datasets(out: Path, tokenizer: Path) -> dict[str, Path]:
    data = {}
    for corpus in ("upstream", "downstream"):
        data[corpus] = out / "data" / corpus
        if not (data[corpus] / "manifest.json").is_file():
            print(f"preparing the {corpus} corpus", flush=True)
            prepare(PrepareOptions(sources=[str(out / "data" / f"{corpus}.jsonl")], tokenizer=str(tokenizer),
                                   out=str(data[corpus]), val_fraction=VAL_FRACTION, quiet=True, overwrite=True))
    return data


def _upstream_model(out: Path, options: DemoOptions, scale: Scale) -> Path:
    """The shipped model (checked against its recorded hashes), or with --pretrain a new one."""
    if options.pretrain:
        return out / "upstream"
    model = shipped(options.shift, scale)
    if model is None:
        raise UserError(f"no upstream model ships for --shift {options.shift} at --scale {scale.name}; build one "
                        f"with `cpt demo --pretrain --shift {options.shift}" +
                        ("" if scale.name == "demo" else f" --scale {scale.name}") + "`")
    verify(model)
    return model


def _score(out: Path, model: Path, data: dict[str, Path], scale: Scale) -> None:
    """`cpt eval` of the start model and of every run's final checkpoint on both held-out sets
    (rows already there are kept, so a rerun scores nothing twice)."""
    runs_dir = out / SWEEP / "runs"
    sets = [f"{name}={path}" for name, path in data.items()]
    jobs = [([str(model / FINAL)], str(out / START_SCORES)),
            (sorted(str(p) for p in runs_dir.iterdir() if (p / CHECKPOINTS).is_dir()), None)]
    for targets, store in jobs:
        with one_thread():
            status = run_eval(EvalOptions(targets=targets, sets=sets, tokens=scale.score_tokens, store=store,
                                          task_index="all"))
        if status != EXIT_OK:
            raise UserError(f"cpt eval of {', '.join(targets)} failed with exit {status}")


@contextmanager
def one_thread():
    """One thread for the runs' processes (OMP_NUM_THREADS, read as torch starts) and for this process's
    `cpt eval`, unless OMP_NUM_THREADS says otherwise: a run this small gains little from a second thread,
    and where the other core is busy two threads wait on each other (one run of the demo on 2 cores beside
    another job: 17 s with one thread, 89 s with two)."""
    if "OMP_NUM_THREADS" in os.environ:
        yield
        return
    threads = torch.get_num_threads()
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    try:
        yield
    finally:
        os.environ.pop("OMP_NUM_THREADS", None)
        torch.set_num_threads(threads)


def run_grid(grid: Path) -> int:
    """`cpt sweep --local` of the grid, each run on one thread (see `one_thread`)."""
    with one_thread():
        return run_sweep(SweepOptions(grid=str(grid), local=True))


def run_demo(options: DemoOptions) -> int:
    out = Path(options.out).resolve()
    scale = _scale(options)
    check_writable(out, "--out")   # before the shipped model is checked (it is read whole)
    started = time.monotonic()
    model = _upstream_model(out, options, scale)   # a missing or changed model is refused before any write
    _claim(out, options, write=False)
    lock = RunLock(out, LOCK, label="demo folder", what="demo")   # one demo at a time per folder
    lock.acquire()
    try:
        _claim(out, options)
        return _steps(out, options, scale, model, started)
    except KeyboardInterrupt:
        # Every step's output is whole or absent, and a run stops with a committed checkpoint.
        print(f"cpt demo: stopped; what is done is kept in {out}: run the same command again to continue",
              flush=True)
        return EXIT_RESUMABLE
    finally:
        lock.release()


def _steps(out: Path, options: DemoOptions, scale: Scale, model: Path, started: float) -> int:
    """Every step of the demo whose output is not there yet, in order."""
    sizes = write_corpora(options.shift, out / "data") if not (out / "data" / "downstream.jsonl").is_file() \
        else json.loads((out / SETTINGS).read_text()).get("sizes", {})
    _remember(out, "sizes", sizes)
    tokenizer = fit_tokenizer(out / "data" / "upstream.jsonl", scale, out / "data" / "tokenizer") \
        if options.pretrain else model / FINAL
    data = _datasets(out, tokenizer)
    if options.pretrain and not (model / "provenance.json").is_file():
        status = pretrain(scale, options.shift, out / "pretrain", data, model)
        if status != EXIT_OK:
            return status
    grid = write_grid(out, scale, model, data, options.full, options.seeds)
    status = run_grid(grid)
    if status != EXIT_OK:
        return status
    runs_dir = out / SWEEP / "runs"
    _score(out, model, data, scale)
    findings = decide(runs_dir, scale.steps, options.seeds)
    figures = report.figures(runs_dir, out / "figures")
    settings = json.loads((out / SETTINGS).read_text())
    spent = [*settings.get("seconds", []), round(time.monotonic() - started, 1)]
    _remember(out, "seconds", spent)
    path = report.write(out, options, scale, model, sizes, findings, figures, spent)
    holding = sum(f.holds is True for f in findings)
    print(f"{holding} of {sum(bool(f.trials) for f in findings)} findings hold at this scale in every one of {options.seeds} seed(s); "
          f"report: {path}", flush=True)
    return EXIT_OK


def _remember(out: Path, key: str, value) -> None:
    path = out / SETTINGS
    settings = json.loads(path.read_text())
    settings[key] = value
    atomic_write_text(path, json.dumps(settings, indent=1) + "\n")
