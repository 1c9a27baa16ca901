"""Scoring on a held-out set: token-weighted mean loss and perplexity, independent of world size.

Each rank scores its share of a fixed list of windows; per-token losses are summed in
float64 and reduced across ranks, so every rank count gives the same mean. The in-loop
evaluation of training and `cpt eval` both score with `score_packed`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from deepspeed import DeepSpeedEngine

from continual_pt.data.dataset import WINDOW_RULE, PackedSequences, selected_windows
from continual_pt.evaluation import domains
from continual_pt.runtime import distributed
from continual_pt.runtime.distributed import DistEnv


class ScoringStopped(Exception):
    """A stop request ended the scoring between two batches; nothing of it is to be reported."""


def _batches(packed: PackedSequences, selected: list[int], micro_batch_size: int, env: DistEnv,
             stop: Callable[[], bool] | None) -> Iterator[tuple[list[int], int, torch.Tensor]]:
    """(windows, real rows, token rows) of this rank's batches over its share of `selected`.

    Every rank runs the same number of forward passes (ZeRO-3 gathers parameters collectively),
    padding its last batches with repeats that the caller drops (the first `real` rows are real).
    `stop`, asked before every batch, must answer alike on every rank (it raises ScoringStopped)."""
    windows = selected[env.rank::env.world_size]
    per_rank = math.ceil(len(selected[0::env.world_size]) / micro_batch_size)
    for b in range(per_rank):
        if stop is not None and stop():
            raise ScoringStopped(f"stopped after {b} of {per_rank} batches")
        chunk = windows[b * micro_batch_size:(b + 1) * micro_batch_size]
        real = len(chunk)
        if real < micro_batch_size:
            # Padding rows go last and are sliced off: they cost a forward, never a host sync.
            fill = chunk[0] if chunk else (windows[0] if windows else 0)
            chunk = chunk + [fill] * (micro_batch_size - real)
        yield chunk[:real], real, torch.from_numpy(np.stack([packed[i] for i in chunk])).long()


@torch.no_grad()
def score_packed(forward, packed: PackedSequences, token_budget: int | None, micro_batch_size: int,
                 env: DistEnv, device: torch.device, stop: Callable[[], bool] | None = None,
                 domain_names: list[str] | None = None) -> dict[str, Any]:
    """Loss and perplexity of `forward` (a CausalLMLoss or its engine) over a fixed window list (the
    budget's windows spread over the whole split, `selected_windows`), and how they were selected.
    With `domain_names` (the set's domains), windows are chosen per domain and the result has a row per
    domain and the macro mean (`evaluation/domains.py`)."""
    if domain_names is not None:
        return _score_by_domain(forward, packed, token_budget, micro_batch_size, env, device, stop, domain_names)
    selected = selected_windows(len(packed), packed.seq_len, token_budget)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    tokens = 0
    for _, real, rows in _batches(packed, selected, micro_batch_size, env, stop):
        per_seq = forward(rows[:, :-1].to(device), rows[:, 1:].to(device), reduction="per_sequence")
        loss_sum += per_seq[:real].double().sum()
        tokens += real * (rows.shape[1] - 1)
    total_loss, total_tokens = distributed.all_reduce_sum([loss_sum.item(), float(tokens)])
    selection = {"selection": WINDOW_RULE, "windows": len(selected)}
    if total_tokens == 0:
        return {"loss": math.nan, "ppl": math.nan, "tokens": 0, **selection}
    mean = total_loss / total_tokens
    return {"loss": mean, "ppl": math.exp(min(mean, 700.0)), "tokens": int(total_tokens), **selection}


def _score_by_domain(forward, packed: PackedSequences, token_budget: int | None, micro_batch_size: int,
                     env: DistEnv, device: torch.device, stop: Callable[[], bool] | None,
                     names: list[str]) -> dict[str, Any]:
    """Each scored token's loss added to its domain's sum; the totals follow from the domain sums."""
    selected = domains.selected_by_domain(packed, token_budget)
    sums = torch.zeros(len(names), dtype=torch.float64, device=device)
    counts = torch.zeros(len(names), dtype=torch.float64, device=device)
    for chunk, real, rows in _batches(packed, selected, micro_batch_size, env, stop):
        per_token = forward(rows[:, :-1].to(device), rows[:, 1:].to(device), reduction="per_token")
        owners = torch.from_numpy(domains.token_domains(packed, chunk)).reshape(-1).to(device)
        sums.index_add_(0, owners, per_token[:real].double().reshape(-1))
        counts.index_add_(0, owners, torch.ones_like(owners, dtype=torch.float64))
    reduced = distributed.all_reduce_sum([*sums.tolist(), *counts.tolist()])
    result = domains.summarize(names, reduced[:len(names)], reduced[len(names):])
    return {**result, "selection": domains.RULE, "windows": len(selected)}


@dataclass(frozen=True)
class HeldOut:
    """The held-out sets and how much of each is scored (the same tokens every time); with `by_domain`,
    a loss per domain of each set too (every set must have domains: checked when the run starts)."""

    sets: dict[str, PackedSequences]
    tokens: int | None
    micro_batch_size: int
    by_domain: bool = False

    def __post_init__(self) -> None:
        if self.by_domain:
            for name, packed in self.sets.items():
                domains.require_domains(packed.dataset, f"eval.sets.{name}")

    def score(self, engine: DeepSpeedEngine, env: DistEnv, device: torch.device,
              stop: Callable[[], bool] | None = None) -> dict[str, dict[str, Any]]:
        """Token-weighted loss and perplexity per set, in eval mode, back in train mode after.

        `stop` (asked between batches, alike on every rank) ends it early with ScoringStopped."""
        engine.eval()
        try:
            return {name: score_packed(engine, packed, self.tokens, self.micro_batch_size, env, device, stop,
                                       packed.dataset.domains if self.by_domain else None)
                    for name, packed in self.sets.items()}
        finally:
            engine.train()
