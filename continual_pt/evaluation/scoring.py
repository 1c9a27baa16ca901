"""Scoring on a held-out set: token-weighted mean loss and perplexity, independent of world size.

Each rank scores its share of a fixed list of windows; per-token losses are summed in
float64 and reduced across ranks, so every rank count gives the same mean. The in-loop
evaluation of training and `cpt eval` both score with `score_packed`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from deepspeed import DeepSpeedEngine

from continual_pt.data.dataset import WINDOW_RULE, PackedSequences, eval_windows
from continual_pt.runtime import distributed
from continual_pt.runtime.distributed import DistEnv


class ScoringStopped(Exception):
    """A stop request ended the scoring between two batches; nothing of it is to be reported."""


@torch.no_grad()
def score_packed(forward, packed: PackedSequences, token_budget: int | None, micro_batch_size: int,
                 env: DistEnv, device: torch.device, stop: Callable[[], bool] | None = None) -> dict[str, float]:
    """Loss and perplexity of `forward` (a CausalLMLoss or its engine) over a fixed window list (the
    budget's windows spread over the whole split, `selected_windows`), and how they were selected.

    Every rank runs the same number of forward passes (ZeRO-3 gathers parameters
    collectively), padding its last batches with repeats whose losses are dropped.
    `stop`, asked before every batch, must answer alike on every rank (it raises ScoringStopped).
    """
    windows = eval_windows(packed, token_budget, env.rank, env.world_size)
    per_rank = math.ceil(len(eval_windows(packed, token_budget, 0, env.world_size)) / micro_batch_size)
    selection = {"selection": WINDOW_RULE, "windows": len(eval_windows(packed, token_budget))}
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    tokens = 0
    for b in range(per_rank):
        if stop is not None and stop():
            raise ScoringStopped(f"stopped after {b} of {per_rank} batches")
        chunk = windows[b * micro_batch_size:(b + 1) * micro_batch_size]
        real = len(chunk)
        if real < micro_batch_size:
            # Padding rows go last and are sliced off below: they cost a forward, never a host sync.
            fill = chunk[0] if chunk else (windows[0] if windows else 0)
            chunk = chunk + [fill] * (micro_batch_size - real)
        rows = torch.from_numpy(np.stack([packed[i] for i in chunk])).long()
        per_seq = forward(rows[:, :-1].to(device), rows[:, 1:].to(device), reduction="per_sequence")
        loss_sum += per_seq[:real].double().sum()
        tokens += real * (rows.shape[1] - 1)
    total_loss, total_tokens = distributed.all_reduce_sum([loss_sum.item(), float(tokens)])
    if total_tokens == 0:
        return {"loss": math.nan, "ppl": math.nan, "tokens": 0, **selection}
    mean = total_loss / total_tokens
    return {"loss": mean, "ppl": math.exp(min(mean, 700.0)), "tokens": int(total_tokens), **selection}


@dataclass(frozen=True)
class HeldOut:
    """The held-out sets and how much of each is scored (the same tokens every time)."""

    sets: dict[str, PackedSequences]
    tokens: int | None
    micro_batch_size: int

    def score(self, engine: DeepSpeedEngine, env: DistEnv, device: torch.device,
              stop: Callable[[], bool] | None = None) -> dict[str, dict[str, float]]:
        """Token-weighted loss and perplexity per set, in eval mode, back in train mode after.

        `stop` (asked between batches, alike on every rank) ends it early with ScoringStopped."""
        engine.eval()
        try:
            return {name: score_packed(engine, packed, self.tokens, self.micro_batch_size, env, device, stop)
                    for name, packed in self.sets.items()}
        finally:
            engine.train()
