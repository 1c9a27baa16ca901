"""The paper's grid in miniature, written as a `cpt sweep` grid file and run with `cpt sweep --local`.

Every run continues the upstream model on the downstream corpus with the paper's schedule
(linear warmup, cosine to 0.1x max) unless it is the baseline that changes it:

| run           | what changes                                  | paper           |
|---------------|-----------------------------------------------|-----------------|
| rewarm        | nothing: 1% warmup to the upstream max LR     | the centre      |
| warmup0 (0.5, 2) | warmup 0% (0.5%, 2%)                       | finding 2       |
| maxlr0.5x, maxlr2x | max LR 0.5x, 2x the upstream max          | finding 3       |
| constant      | constant LR at the upstream min, no warmup    | finding 4       |
| scratch       | random init, the same schedule                | finding 5       |
| same-data     | re-warmed on the upstream corpus itself       | finding 6       |
| from19pct (7pct) | from the 19% (7%) upstream checkpoint      | finding 7       |
| replay5       | 5% of every batch from upstream (compute-equivalent) | Ibrahim et al. |
| (maxlr0.5x-long, rewarm-long, maxlr2x-long) | finding 3's runs over a 4x longer phase | finding 3 |

The runs in parentheses run with `--full` only. Each runs once per seed, as `<run>-seed<k>` with
`train.seed` and `data.seed` set to the scale's seed + k - 1 (the order of the data, and the
initialisation of `scratch`), all runs of seed 1 first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from continual_pt.demo.evidence import run_name, seed_value
from continual_pt.demo.recipe import Scale
from continual_pt.demo.upstream import FINAL, checkpoint_names
from continual_pt.files import atomic_write_text

SWEEP = "sweep"
LONG = 4   # the --full runs of finding 3 train this many times as long (the paper's phases are equal)
FULL_ONLY = ("warmup0.5", "warmup2", "from7pct", "maxlr0.5x-long", "rewarm-long", "maxlr2x-long")


def base_config(scale: Scale, upstream_model: Path, data: dict[str, Path]) -> dict[str, Any]:
    """The centre run: the final upstream checkpoint re-warmed and re-decayed on downstream."""
    return {
        "name": "demo",
        "model": {},
        "data": {"train": {"downstream": {"path": str(data["downstream"])}}, "seq_len": scale.seq_len},
        "train": {"max_steps": scale.steps, "micro_batch_size": scale.micro_batch, "grad_accum": 1,
                  "precision": "fp32", "ds_config": "zero0", "seed": scale.seed,
                  "log_every": max(1, scale.steps // 10)},
        "schedule": {"name": "cosine", "max_lr": scale.pretrain_max_lr, "min_lr_ratio": 0.1, "warmup": 0.01},
        "eval": {"sets": {"upstream": str(data["upstream"]), "downstream": str(data["downstream"])},
                 "every_steps": scale.eval_every, "tokens": scale.eval_tokens},
        "checkpoint": {"init": str(upstream_model / FINAL), "every_steps": 0, "keep_last": 2},
        "log": {"progress": False},
    }


def runs(scale: Scale, upstream_model: Path, data: dict[str, Path], full: bool) -> dict[str, dict[str, Any]]:
    """Run name -> the dotted keys it sets over the base config, in the report's order."""
    lr = scale.pretrain_max_lr
    early, mid = list(checkpoint_names(scale))[:2]
    upstream = {"path": str(data["upstream"])}
    long = {"train.max_steps": scale.steps * LONG, "eval.every_steps": scale.eval_every * LONG}
    grid = {
        "rewarm": {},
        "maxlr0.5x": {"schedule.max_lr": lr / 2},
        "maxlr2x": {"schedule.max_lr": lr * 2},
        "constant": {"schedule": {"name": "constant", "max_lr": lr * 0.1, "warmup": 0.0}},
        "warmup0": {"schedule.warmup": 0.0},
        "warmup0.5": {"schedule.warmup": 0.005},
        "warmup2": {"schedule.warmup": 0.02},
        "scratch": {"checkpoint.init": None, "model.name_or_path": str(upstream_model / FINAL)},
        "same-data": {"data.train": {"upstream": upstream}},
        "from19pct": {"checkpoint.init": str(upstream_model / mid)},
        "from7pct": {"checkpoint.init": str(upstream_model / early)},
        "replay5": {"data.train": {"downstream": {"path": str(data["downstream"]), "weight": 0.95},
                                   "upstream": {**upstream, "weight": 0.05}}},
        "maxlr0.5x-long": {"schedule.max_lr": lr / 2, **long},
        "rewarm-long": long,
        "maxlr2x-long": {"schedule.max_lr": lr * 2, **long},
    }
    return {name: keys for name, keys in grid.items() if full or name not in FULL_ONLY}


def seeded(settings: dict[str, dict[str, Any]], scale: Scale, seeds: int) -> dict[str, dict[str, Any]]:
    """Every setting once per seed: `<run>-seed<k>`, seed by seed."""
    return {run_name(name, k): {**keys, "train.seed": seed_value(scale.seed, k), "data.seed": seed_value(scale.seed, k)}
            for k in range(1, seeds + 1) for name, keys in settings.items()}


def write_grid(out: Path, scale: Scale, upstream_model: Path, data: dict[str, Path], full: bool,
               seeds: int) -> Path:
    """Write <out>/demo-base.yaml and <out>/demo-grid.yaml; the sweep's runs go under <out>/sweep."""
    base = out / "demo-base.yaml"
    atomic_write_text(base, yaml.safe_dump(base_config(scale, upstream_model, data), sort_keys=False))
    grid = {"sweep": "demo", "base": base.name, "out": str(out / SWEEP),
            "runs": seeded(runs(scale, upstream_model, data, full), scale, seeds)}
    path = out / "demo-grid.yaml"
    atomic_write_text(path, yaml.safe_dump(grid, sort_keys=False))
    return path
