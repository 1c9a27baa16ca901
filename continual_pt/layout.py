"""The names every room must agree on: the files of a run directory, the layout of a checkpoint,
and the exit statuses of `cpt`. Nothing else in the package spells them (tests/test_layout.py
fails on a second literal), so renaming one here renames it everywhere.

No torch, no imports of the package: the light readers (`cpt sweep --status`, `cpt stop`, the
launchers' supervisor) read the same names as the training loop that writes them.

    <run dir>/
      config.yaml              the resolved run config
      metrics.jsonl            one record per log and eval event
      scores.jsonl             `cpt eval`'s rows (and scores.csv beside it)
      run.lock                 held by rank 0 for the life of a run
      STOP, STOP.done          a stop request, and the run's answer to it
      checkpoints/
        latest                 the newest committed tag's name (loaders trust markers instead)
        global_step<N>/        one checkpoint; committed once COMMITTED.json is in it
          COMMITTED.json, rank<r>.pt, model/, tokenizer/, run/config.yaml
        universal/global_step<N>/   its conversion to DeepSpeed's universal format
        branches/after-step<N>-<time>/   checkpoints moved aside by a resume from an older one
"""

from __future__ import annotations

import re
from pathlib import Path

# --------------------------------------------------------------------------- the run directory

RUN_CONFIG = "config.yaml"
"""The resolved config of a run (in the run dir), and of the run a checkpoint was saved by (in its run/)."""
METRICS = "metrics.jsonl"
SCORES = "scores.jsonl"
RUN_LOCK = "run.lock"
STOP = "STOP"
"""A stop request written into the run dir by `cpt stop` or `cpt launch`; rank 0 watches for it."""
STOP_DONE = "STOP.done"
"""The run's answer to a stop request: the step it committed and its exit status."""
CHECKPOINTS = "checkpoints"
SWEEP_PLAN = "sweep.json"
"""A sweep directory's plan (every run's name, config and run dir), which `cpt sweep` writes."""

# --------------------------------------------------------------------------- a checkpoints folder

LATEST = "latest"
MARKER = "COMMITTED.json"
"""Written into a checkpoint folder last of all: a folder without it is a save that never finished."""
TAG_PREFIX = "global_step"
TAG_PATTERN = re.compile(rf"^{TAG_PREFIX}(\d+)$")
"""The name of a checkpoint folder; group 1 is its optimizer step."""
RANK_FILE = "rank{rank}.pt"
"""Each rank's own state in a checkpoint (data position, RNG): RANK_FILE.format(rank=r)."""
UNIVERSAL = "universal"
"""The folder beside the tags that holds their universal conversions."""
BRANCHES = "branches"
"""The folder beside the tags that holds the branches a resume from an older checkpoint moved aside."""


def tag_for(step: int) -> str:
    """The checkpoint folder name of optimizer step `step`."""
    return f"{TAG_PREFIX}{step}"


def step_of(name: str) -> int | None:
    """The step of a checkpoint folder name (`global_step<N>`), None for any other name."""
    match = TAG_PATTERN.match(name)
    return int(match.group(1)) if match else None


def list_tags(root: Path) -> list[Path]:
    """Every checkpoint folder under a checkpoints/ folder, committed or not, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and step_of(p.name) is not None),
                  key=lambda p: step_of(p.name))


def is_committed(tag_dir: Path) -> bool:
    """Whether a checkpoint folder holds its commit marker (a save that finished)."""
    return (Path(tag_dir) / MARKER).is_file()


# --------------------------------------------------------------------------- exit statuses

EXIT_OK = 0
"""Finished (also: a run already at train.max_steps, which does nothing)."""
EXIT_FAILED = 1
"""The run failed: a non-finite loss, or some of a sweep's runs failed."""
EXIT_USAGE = 2
"""Bad input (a UserError), or an output the file system refuses (read-only, no permission, full):
said in one line, before anything was written wherever it can be foreseen."""
EXIT_RESUMABLE = 75
"""Stopped early (a signal, a time limit, a stop request) after a committed checkpoint: run the same
command again to resume (BSD's EX_TEMPFAIL)."""
EXIT_INTERRUPTED = 130
"""Ctrl-C outside a training step (128 + SIGINT, as a shell reports it)."""
EXIT_MEANINGS = {EXIT_FAILED: "non-finite loss", EXIT_USAGE: "bad input"}

# --------------------------------------------------------------------------- precisions

PRECISIONS = ("bf16", "fp16", "fp32")
"""Training precisions (train.precision, recorded in every commit marker and checked on resume) and
the dtypes weights are scored or exported in (`cpt eval --dtype`, `cpt export --dtype`)."""
