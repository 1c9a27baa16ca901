"""`cpt demo`: corpora → upstream model → the grid (`cpt sweep --local`) → `cpt eval` → figures → REPORT.md.

Everything lands in one folder (default `demo/`):

    demo.json              the demo's settings; a rerun with other settings is refused
    demo.lock              held while a demo runs here: a second one at the same time is refused
    data/                  upstream.jsonl, downstream.jsonl and their prepared datasets (with --upstream and
                           --downstream: samples of the user's corpora, and <corpus>.sample.json, what each holds)
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
import shlex
import time
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

import torch

from continual_pt.data.dataset import PreparedDataset
from continual_pt.data.options import PrepareOptions
from continual_pt.data.prepare import prepare
from continual_pt.demo import report
from continual_pt.demo.corpora import write_corpora
from continual_pt.demo.estimate import RUN_START_S, grid_seconds, measure, minutes, pretrain_seconds
from continual_pt.demo.findings import START_SCORES, decide
from continual_pt.demo.grid import LONG, SWEEP, runs, write_grid
from continual_pt.demo.options import SCALES, SHIFTS, DemoOptions
from continual_pt.demo.recipe import SCALE, Scale
from continual_pt.demo.sample import DOMAIN_KEY, SPREAD, Corpus, cut, own_corpora
from continual_pt.demo.upstream import FINAL, fit_tokenizer, pretrain, shipped, verify
from continual_pt.errors import UserError
from continual_pt.evaluation.command import run_eval
from continual_pt.evaluation.options import EvalOptions
from continual_pt.files import atomic_write_text, check_writable
from continual_pt.layout import CHECKPOINTS, EXIT_OK, EXIT_RESUMABLE
from continual_pt.sweep.options import SweepOptions
from continual_pt.sweep.plan import run_sweep
from continual_pt.sweep.runs import read_exit
from continual_pt.training.lock import RunLock

SETTINGS = "demo.json"
LOCK = "demo.lock"
VAL_FRACTION = 0.05
HELD_OUT_DOCUMENTS = 8
"""A sample of few (long) documents holds out a larger share, up to MAX_VAL_FRACTION, so as to expect this many."""
MAX_VAL_FRACTION = 0.25


def _scale(options: DemoOptions) -> Scale:
    if options.shift not in SHIFTS:
        raise UserError(f"--shift must be one of {', '.join(SHIFTS)}, got {options.shift!r}")
    if options.scale not in SCALES:
        raise UserError(f"--scale must be one of {', '.join(SCALES)}, got {options.scale!r}")
    options.check()
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


def _datasets(out: Path, tokenizer: Path, scale: Scale, own: list[Corpus] | None = None) -> dict[str, Path]:
    """The prepared datasets of the two corpora (of the samples of the user's, with their domains), each
    checked to hold at least one held-out window."""
    data = {}
    for i, corpus in enumerate(("upstream", "downstream")):
        data[corpus] = out / "data" / corpus
        fraction = _val_fraction(out, corpus, own)
        if not (data[corpus] / "manifest.json").is_file():
            print(f"preparing the {corpus} corpus", flush=True)
            domains = own is not None and bool(own[i].domain_field or own[i].layout)
            prepare(PrepareOptions(sources=[str(out / "data" / f"{corpus}.jsonl")], tokenizer=str(tokenizer),
                                   out=str(data[corpus]), val_fraction=fraction, quiet=True, overwrite=True,
                                   domain_field=DOMAIN_KEY if domains else None))
        held_out = PreparedDataset(data[corpus], "val").num_tokens
        if own is not None and held_out <= scale.seq_len:
            raise UserError(f"{own[i].flag}: the sample holds out {held_out} tokens ({fraction:.0%} of its documents, "
                            f"by hash), fewer than one window of {scale.seq_len + 1}: give a larger corpus (the "
                            f"sample takes up to {scale.sample_bytes[i]:,} bytes of text)")
    return data


def _val_fraction(out: Path, corpus: str, own: list[Corpus] | None) -> float:
    """The share of a corpus's documents held out: VAL_FRACTION, or for a sample of few documents enough to
    expect HELD_OUT_DOCUMENTS of them (at most MAX_VAL_FRACTION)."""
    if own is None:
        return VAL_FRACTION
    documents = json.loads((out / "data" / f"{corpus}.sample.json").read_text())["documents"]
    return round(min(MAX_VAL_FRACTION, max(VAL_FRACTION, HELD_OUT_DOCUMENTS / documents)), 4)


def _samples(out: Path, scale: Scale, own: list[Corpus]) -> dict[str, dict[str, int]]:
    """Cut the sample of each of the user's corpora that is not cut yet; bytes per domain (or source) of each."""
    sizes = {}
    for corpus, budget in zip(own, scale.sample_bytes):
        info = out / "data" / f"{corpus.name}.sample.json"
        if not info.is_file():   # written after the sample: a sample without it is cut again, the same
            print(f"cutting a sample of {budget:,} bytes of the {corpus.name} corpus", flush=True)
            (out / "data").mkdir(parents=True, exist_ok=True)
            atomic_write_text(info, json.dumps(cut(corpus, budget, out / "data" / f"{corpus.name}.jsonl")) + "\n")
        sizes[corpus.name] = json.loads(info.read_text())["bytes"]
    return sizes


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
    if options.own:
        options = replace(options, pretrain=True)   # no upstream model ships for the user's corpora
    check_writable(out, "--out")   # before the shipped model is checked (it is read whole)
    started = time.monotonic()
    model = _upstream_model(out, options, scale)   # a missing or changed model is refused before any write
    _claim(out, options, write=False)
    own = own_corpora(options) if options.own else None
    for corpus in own or []:
        if not (out / "data" / f"{corpus.name}.sample.json").is_file():
            corpus.plan()   # an unreadable source is refused before anything is written
    lock = RunLock(out, LOCK, label="demo folder", what="demo")   # one demo at a time per folder
    lock.acquire()
    try:
        _claim(out, options)
        if own is not None:
            _announce(out, options, scale, own)
        return _steps(out, options, scale, model, started, own)
    except KeyboardInterrupt:
        # Every step's output is whole or absent, and a run stops with a committed checkpoint.
        print(f"cpt demo: stopped; what is done is kept in {out}: run the same command again to continue",
              flush=True)
        return EXIT_RESUMABLE
    finally:
        lock.release()


def _steps(out: Path, options: DemoOptions, scale: Scale, model: Path, started: float,
           own: list[Corpus] | None) -> int:
    """Every step of the demo whose output is not there yet, in order (`own`: the user's corpora, if given)."""
    if own is not None:
        sizes = _samples(out, scale, own)
    elif not (out / "data" / "downstream.jsonl").is_file():
        sizes = write_corpora(options.shift, out / "data")
    else:
        sizes = json.loads((out / SETTINGS).read_text()).get("sizes", {})
    _remember(out, "sizes", sizes)
    tokenizer = fit_tokenizer(out / "data" / "upstream.jsonl", scale, out / "data" / "tokenizer") \
        if options.pretrain else model / FINAL
    data = _datasets(out, tokenizer, scale, own)
    if options.pretrain and not (model / "provenance.json").is_file():
        status = pretrain(scale, "own" if own else options.shift, out / "pretrain", data, model,
                          command=command_line(options))
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


def command_line(options: DemoOptions) -> str:
    """The `cpt demo` command that builds this demo's upstream model (its provenance records it)."""
    words = ["cpt", "demo", "--pretrain"]
    if options.own:
        words = ["cpt", "demo"] + [w for src in options.upstream for w in ("--upstream", src)] + \
            [w for src in options.downstream for w in ("--downstream", src)]
        for flag, value in (("--upstream-layout", options.upstream_layout),
                            ("--downstream-layout", options.downstream_layout),
                            ("--domain-field", options.domain_field)):
            words += [flag, value] if value else []
        words += ["--text-field", options.text_field] if options.text_field != "text" else []
    else:
        words += ["--shift", options.shift]
    words += ["--scale", options.scale] if options.scale != "demo" else []
    return shlex.join(words)


def _announce(out: Path, options: DemoOptions, scale: Scale, own: list[Corpus]) -> None:
    """Print what the demo on the user's corpora will do, what of it is done, and the time the rest will take
    (from a step of the scale's model measured here)."""
    with one_thread():
        speed = measure(scale)   # as each run of the grid trains
    modelled = (out / "upstream" / "provenance.json").is_file()
    alone = speed if modelled else measure(scale)   # the upstream pre-training, alone, on torch's threads
    dummy = {"upstream": out, "downstream": out}
    settings = runs(scale, out, dummy, options.full)
    run_steps = [keys.get("train.max_steps", scale.steps) for keys in settings.values()] * options.seeds
    done = _finished_runs(out)
    left = (0 if modelled else pretrain_seconds(scale, alone)) + grid_seconds(scale, speed, run_steps[len(done):])
    sample = [f"up to {budget:,} bytes of text from {corpus.flag} {' '.join(corpus.sources)}"
              + (f" (--{corpus.name}-layout {corpus.layout})" if corpus.layout else "")
              + (" (cut)" if (out / "data" / f"{corpus.name}.sample.json").is_file() else "")
              for corpus, budget in zip(own, scale.sample_bytes)]
    lines = [f"cpt demo on your corpora (scale {scale.name}, {options.seeds} seed(s)), in {out}:",
             f"  1. samples: {'; '.join(sample)}, from at most {SPREAD} files spread over each",
             f"  2. a byte-level BPE of {scale.vocab_size} tokens fit on the upstream sample; both samples "
             f"prepared, {VAL_FRACTION:.0%} of their documents held out (up to {MAX_VAL_FRACTION:.0%} of a sample of "
             f"few documents, so as to hold out about {HELD_OUT_DOCUMENTS})",
             f"  3. the upstream model: GPT-NeoX {scale.hidden} x {scale.layers} layers, {scale.pretrain_steps} steps "
             f"of {scale.pretrain_micro_batch * scale.seq_len:,} tokens with Pythia's recipe"
             + (" (done)" if modelled else ""),
             f"  4. the grid: {len(settings)} settings x {options.seeds} seed(s) = {len(run_steps)} runs of "
             f"{scale.steps} steps" + (f" ({LONG * scale.steps} for the long ones)" if options.full else "")
             + f" of {scale.micro_batch * scale.seq_len:,} tokens" + (f" ({len(done)} done)" if done else ""),
             "  5. `cpt eval` of every final checkpoint, the figures, REPORT.md",
             f"  time left: about {minutes(left)} (a training step measured here: {speed.train * 1e6:.1f} us per "
             f"token on one thread" + ("" if modelled else f", {alone.train * 1e6:.1f} on {torch.get_num_threads()} "
                                       "for the upstream model") +
             f"; plus {minutes(RUN_START_S)} of start-up per run; reading the corpora not counted)"]
    print("\n".join(lines), flush=True)


def _finished_runs(out: Path) -> list[Path]:
    """The grid's runs that ended (a successful exit record of `cpt sweep --local`)."""
    runs_dir = out / SWEEP / "runs"
    ended = sorted(runs_dir.iterdir()) if runs_dir.is_dir() else []
    return [run for run in ended if (read_exit(run) or {}).get("status") == EXIT_OK]


def _remember(out: Path, key: str, value) -> None:
    path = out / SETTINGS
    settings = json.loads(path.read_text())
    settings[key] = value
    atomic_write_text(path, json.dumps(settings, indent=1) + "\n")
