"""What a run's eval array scores: the run's eval.sets at its eval.tokens budget and its eval.lm_eval
tasks, with `cpt eval --claim` (launch/slurm/eval.sbatch), and how many of its committed checkpoints
still lack a row.
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


def task_names(cfg: RunConfig) -> list[str]:
    """The run's eval.lm_eval tasks, once each (none without eval.lm_eval)."""
    return cfg.eval.lm_eval.requests() if cfg.eval.lm_eval else []


def has_eval_array(cfg: RunConfig) -> bool:
    """Whether the run's checkpoints are scored by an eval array: it has eval.sets or eval.lm_eval tasks."""
    return bool(cfg.eval.sets or task_names(cfg))


def task_arguments(cfg: RunConfig) -> list[str]:
    """`cpt eval` options scoring the run's eval.lm_eval tasks (none without them)."""
    lm = cfg.eval.lm_eval
    if not task_names(cfg):
        return []
    args = ["--lm-eval", ",".join(task_names(cfg))]
    if lm.limit is not None:
        args += ["--lm-eval-limit", str(lm.limit)]
    if lm.num_fewshot is not None:
        args += ["--num-fewshot", str(lm.num_fewshot)]
    if str(lm.batch_size) != default_of(EVAL_FIELDS["lm_eval_batch_size"]):
        args += ["--lm-eval-batch-size", str(lm.batch_size)]
    for folder in lm.include_path:
        args += ["--include-path", folder]
    return args


def eval_arguments(cfg: RunConfig) -> list[str]:
    """`cpt eval` options scoring the run's eval.sets with its budget and its eval.lm_eval tasks (the run dir
    comes first)."""
    args = [str(Path(cfg.run_dir).resolve())]
    for spec in set_specs(cfg):
        args += ["--set", spec]
    if cfg.eval.tokens is not None:
        args += ["--tokens", str(cfg.eval.tokens)]
    return args + task_arguments(cfg)


def scoring_state(cfg: RunConfig) -> tuple[int, int] | None:
    """(committed checkpoints, those still lacking a row on a set or a task) as the run's eval array scores
    them; None for a run without eval.sets and tasks, or whose sets cannot be opened now (the array would
    say why). A task counts as scored by its name, few-shot count, limit and dtype (progress.unscored)."""
    if not has_eval_array(cfg):
        return None
    try:
        sets = open_sets(set_specs(cfg))
    except UserError:
        return None
    lm = cfg.eval.lm_eval
    requests = [(name, lm.num_fewshot, lm.limit) for name in task_names(cfg)]
    committed, missing = unscored(Path(cfg.run_dir), sets, cfg.eval.tokens, cfg.data.seq_len,
                                  default_of(EVAL_FIELDS["dtype"]), requests=requests)
    return len(committed), len(missing)
