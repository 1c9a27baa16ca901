"""What a run's eval array scores: the run's eval.sets at its eval.tokens budget, with `cpt eval --claim`
(launch/slurm/eval.sbatch), and how many of its committed checkpoints still lack a row.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from continual_pt.config import RunConfig
from continual_pt.errors import UserError
from continual_pt.evaluation.options import EvalOptions
from continual_pt.evaluation.progress import unscored
from continual_pt.evaluation.sets import open_sets
from continual_pt.options import default_of

EVAL_FIELDS = {f.name: f for f in dataclasses.fields(EvalOptions)}


def checkpoint_count(cfg: RunConfig) -> int:
    """Committed checkpoints the run plans to keep at its end (its stops may add some): the size of its
    eval array, whose tasks claim checkpoints until none is left, so any size scores them all."""
    steps, every = cfg.train.max_steps, cfg.checkpoint.every_steps
    saved = list(range(every, steps + 1, every)) if every else []
    if not saved or saved[-1] != steps:
        saved.append(steps)
    keep_every = cfg.checkpoint.keep_every
    kept = set(saved[-cfg.checkpoint.keep_last:]) | {s for s in saved if keep_every and s % keep_every == 0}
    return len(kept)


def set_specs(cfg: RunConfig) -> list[str]:
    return [f"{name}={spec.path}:{spec.split}" for name, spec in cfg.eval.sets.items()]


def eval_arguments(cfg: RunConfig) -> list[str]:
    """`cpt eval` options scoring the run's eval.sets with its budget (the run dir comes first)."""
    args = [str(Path(cfg.run_dir).resolve())]
    for spec in set_specs(cfg):
        args += ["--set", spec]
    if cfg.eval.tokens is not None:
        args += ["--tokens", str(cfg.eval.tokens)]
    return args


def scoring_state(cfg: RunConfig) -> tuple[int, int] | None:
    """(committed checkpoints, those still lacking a row) as the run's eval array scores them; None for
    a run without eval.sets or whose sets cannot be opened now (the array would say why)."""
    if not cfg.eval.sets:
        return None
    try:
        sets = open_sets(set_specs(cfg))
    except UserError:
        return None
    committed, missing = unscored(Path(cfg.run_dir), sets, cfg.eval.tokens, cfg.data.seq_len,
                                  default_of(EVAL_FIELDS["dtype"]))
    return len(committed), len(missing)
