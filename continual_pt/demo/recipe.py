"""The demo's sizes and its run configs: the upstream pre-training (Pythia's recipe) and the grid.

Two scales: `demo` (what `cpt demo` runs, and what the shipped upstream model was trained at)
and `tiny` (a few steps of a very small model, to check the whole pipeline quickly). Pythia
keeps checkpoints at steps 10k and 27k of 143k (7% and 19%); the upstream run keeps the same
fractions of its steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

EARLY_FRACTIONS = (0.07, 0.19)   # Pythia's 10k and 27k of 143k steps


@dataclass(frozen=True)
class Scale:
    name: str
    vocab_size: int
    hidden: int
    layers: int
    heads: int
    seq_len: int
    pretrain_steps: int
    pretrain_micro_batch: int
    pretrain_max_lr: float
    pretrain_eval_every: int
    steps: int              # of every continual run
    micro_batch: int
    eval_every: int
    eval_tokens: int        # per set, in-loop (enough windows that its step-0 loss and the start model's
                            # `cpt eval` loss, two samples of one split, agree within 0.1 nats)
    score_tokens: int       # per set, `cpt eval` of each run's final checkpoint
    pretrain_eval_tokens: int   # per set, in-loop during the upstream pre-training
    sample_bytes: tuple[int, int] = (8_500_000, 4_000_000)   # upstream, downstream: the text of a sample of the
                                                             # user's corpora (the built-in ones' sizes)
    seed: int = 1234
    checkpoint_every: int = 10   # pre-training save interval; the early checkpoints are the saves nearest 7%, 19%

    @property
    def early_steps(self) -> tuple[int, int]:
        every = self.checkpoint_every
        return tuple(max(every, round(f * self.pretrain_steps / every) * every)   # type: ignore[return-value]
                     for f in EARLY_FRACTIONS)

    def model_config(self) -> dict[str, Any]:
        return {"model_type": "gpt_neox", "hidden_size": self.hidden, "num_hidden_layers": self.layers,
                "num_attention_heads": self.heads, "intermediate_size": 4 * self.hidden,
                "max_position_embeddings": self.seq_len, "vocab_size": self.vocab_size}


SCALE = {
    "demo": Scale("demo", vocab_size=1024, hidden=48, layers=2, heads=3, seq_len=128,
                  pretrain_steps=1000, pretrain_micro_batch=64, pretrain_max_lr=4e-3, pretrain_eval_every=100,
                  steps=60, micro_batch=32, eval_every=4, eval_tokens=16384, score_tokens=32768,
                  pretrain_eval_tokens=16384),
    "tiny": Scale("tiny", vocab_size=300, hidden=16, layers=1, heads=2, seq_len=32,
                  pretrain_steps=100, pretrain_micro_batch=8, pretrain_max_lr=1e-2, pretrain_eval_every=50,
                  steps=8, micro_batch=4, eval_every=2, eval_tokens=512, score_tokens=1024,
                  pretrain_eval_tokens=2048, sample_bytes=(400_000, 200_000), checkpoint_every=5),
}


def pretrain_config(scale: Scale, name: str, out_dir: str, upstream: str, downstream: str) -> dict[str, Any]:
    """Pythia's recipe at this scale: 1% warmup, cosine to 0.1x max over every step; every save
    that lands on 7% and 19% of the steps kept."""
    every = scale.checkpoint_every
    return {
        "name": name, "out_dir": out_dir,
        "model": {"config": scale.model_config()},
        "data": {"train": {"upstream": {"path": upstream}}, "seq_len": scale.seq_len},
        "train": {"max_steps": scale.pretrain_steps, "micro_batch_size": scale.pretrain_micro_batch,
                  "grad_accum": 1, "precision": "fp32", "ds_config": "zero0", "seed": scale.seed,
                  "log_every": max(1, scale.pretrain_steps // 40)},
        "schedule": {"name": "cosine", "max_lr": scale.pretrain_max_lr, "min_lr_ratio": 0.1, "warmup": 0.01},
        "eval": {"sets": {"upstream": upstream, "downstream": downstream},
                 "every_steps": scale.pretrain_eval_every, "tokens": scale.pretrain_eval_tokens},
        "checkpoint": {"every_steps": every, "keep_every": every, "keep_last": 2},
        "log": {"progress": False},
    }
