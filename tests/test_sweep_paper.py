"""configs/paper/: `cpt sweep --dry-run` lists exactly the runs of Gupta et al. (2023) and of the
follow-up's replay axis, each with the settings the papers give it (no training)."""

from __future__ import annotations

import re

import pytest

from continual_pt.cli import main
from continual_pt.config.typed import to_dict
from continual_pt.sweep.grid import load_sweep
from tests.helpers import REPO

PAPER = REPO / "configs" / "paper"
VARS = {"PILE": "/data/pile", "SLIMPAJAMA": "/data/slimpajama"}
INIT = "EleutherAI/pythia-410m@step{}"

# What every run of both grids shares: the paper's batch, optimizer, clipping, precision, length,
# decay end (~240B tokens), evaluation and held-out sets.
COMMON = {
    "data.seq_len": 2048, "train.global_batch_size": 1104, "train.max_steps": 131296, "train.precision": "fp16",
    "optim.betas": [0.9, 0.95], "optim.eps": 1e-8, "optim.weight_decay": 0.1, "optim.grad_clip": 1.0,
    "eval.every_steps": 100, "eval.tokens": 22609920, "eval.sets.pile.path": "/data/pile",
    "eval.sets.slimpajama.path": "/data/slimpajama", "eval.sets.pile.split": "val",
    "eval.sets.slimpajama.split": "val",
}
# The centre run: cosine re-warm to 3e-4 over 1%, re-decay to 3e-5 at step 106149, from step 143000,
# on SlimPajama alone.
CENTRE = {
    "schedule.name": "cosine", "schedule.max_lr": 3e-4, "schedule.warmup": 0.01, "schedule.min_lr_ratio": 0.1,
    "schedule.decay_end": 106149, "checkpoint.init": INIT.format(143000), "model.config": {},
    "data.train": {"slimpajama": {"path": "/data/slimpajama", "weight": 1.0, "split": "train"}},
}
ARCH_410M = {"model_type": "gpt_neox", "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
             "intermediate_size": 4096, "rotary_pct": 0.25, "rotary_emb_base": 10000,
             "max_position_embeddings": 2048, "vocab_size": 50304, "use_parallel_residual": True,
             "layer_norm_eps": 1e-5}

REWARMING = [   # (run name, what differs from the centre run)
    ("lr1.5e-4_warmup1pct_init143k", {"schedule.max_lr": 1.5e-4}),
    ("lr3e-4_warmup1pct_init143k", {}),
    ("lr6e-4_warmup1pct_init143k", {"schedule.max_lr": 6e-4}),
    ("lr3e-4_warmup0pct_init143k", {"schedule.warmup": 0.0}),
    ("lr3e-4_warmup0.5pct_init143k", {"schedule.warmup": 0.005}),
    ("lr3e-4_warmup2pct_init143k", {"schedule.warmup": 0.02}),
    ("lr3e-4_warmup1pct_init27k", {"checkpoint.init": INIT.format(27000)}),
    ("lr3e-4_warmup1pct_init10k", {"checkpoint.init": INIT.format(10000)}),
    ("constant-lr3e-5", {"schedule.name": "constant", "schedule.max_lr": 3e-5, "schedule.warmup": 0,
                         "schedule.min_lr_ratio": None, "schedule.decay_end": None}),
    ("scratch", {"checkpoint.init": None, "model.config": ARCH_410M}),
    ("pile-rewarm", {"data.train": {"pile": {"path": "/data/pile", "weight": 1.0, "split": "train"}}}),
]


def replay(share: float | None) -> dict:
    sp = {"path": "/data/slimpajama", "weight": round(1 - (share or 0), 2), "split": "train"}
    pile = {"path": "/data/pile", "weight": share, "split": "train"}
    return {"data.train": {"slimpajama": sp, **({"pile": pile} if share else {})}}


REPLAY = [
    ("replay1pct", replay(0.01)),
    ("replay5pct", replay(0.05)),
    ("replay10pct", replay(0.10)),
    ("replay50pct", replay(0.50)),
    ("replay0pct", replay(None)),
]


def dotted(flat: dict, key: str):
    node = flat
    for part in key.split("."):
        node = node[part]
    return node


def listed_runs(grid: str, capsys) -> list[str]:
    """The run names `cpt sweep --dry-run` prints, in its order."""
    argv = ["sweep", "--grid", str(PAPER / grid), "--dry-run"] + [f"--var={k}={v}" for k, v in VARS.items()]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"sweep paper-{grid.removesuffix('.yaml')}: ") and lines[1].startswith("run ")
    rows = lines[2:-1]
    assert lines[-1].startswith("total: ")
    return [re.split(r"\s+", row)[0] for row in rows]


@pytest.mark.parametrize("grid, table", [("rewarming.yaml", REWARMING), ("replay.yaml", REPLAY)])
def test_the_paper_grid_lists_exactly_the_papers_runs(grid, table, capsys):
    assert listed_runs(grid, capsys) == [name for name, _ in table]
    sweep = load_sweep(PAPER / grid, VARS)
    assert len(sweep.runs) == len(table)
    for run, (name, differs) in zip(sweep.runs, table):
        flat = to_dict(run.config)
        expected = {**COMMON, **CENTRE, **differs}
        got = {key: dotted(flat, key) for key in expected}
        assert got == expected, name
        assert run.name == name and run.config.run_dir.name == name


def test_the_paper_grid_needs_the_data_paths(capsys):
    assert main(["sweep", "--grid", str(PAPER / "rewarming.yaml"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "vars.PILE: not set: export PILE=... or pass --var PILE=..." in err
    assert "vars.SLIMPAJAMA: not set" in err


def test_the_decay_ends_at_240b_tokens_and_the_batch_fits_one_node():
    cfg = load_sweep(PAPER / "rewarming.yaml", VARS).runs[0].config
    tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
    assert tokens_per_step == 2260992
    assert (cfg.schedule.decay_end - 1) * tokens_per_step < 240e9 <= cfg.schedule.decay_end * tokens_per_step
    assert cfg.eval.tokens == 10 * tokens_per_step
    assert cfg.train.micro_batch_size * cfg.train.grad_accum * 8 == 1104
