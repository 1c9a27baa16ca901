"""Losses per domain of a held-out set: how a budget is shared among domains, which windows it picks,
and that the set's total is exactly the token-weighted mean of its domain rows."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, GPTNeoXConfig

from continual_pt.data.dataset import PackedSequences, PreparedDataset
from continual_pt.evaluation import domains
from continual_pt.evaluation.scoring import score_packed
from continual_pt.model.causal_lm import CausalLMLoss
from continual_pt.runtime.distributed import DistEnv
from tests import train_support as ts


class Domained:
    """A prepared split read as if its documents were 50-token runs cycling through three domains, the
    third of which only every fourth time (a small domain)."""

    def __init__(self, dataset: PreparedDataset):
        self.dataset = dataset
        self.path, self.split, self.num_tokens = dataset.path, dataset.split, dataset.num_tokens
        self.vocab_size = dataset.vocab_size
        self.domains = ["big", "middle", "small"]
        block = np.arange(self.num_tokens) // 50
        self.ids = np.where(block % 8 == 7, 2, block % 2)

    def tokens(self, start: int, stop: int) -> np.ndarray:
        return self.dataset.tokens(start, stop)

    def token_domains(self, start: int, stop: int) -> np.ndarray:
        return self.ids[start:stop]


@pytest.mark.parametrize("available, total, given", [
    ([10, 10, 10], 9, [3, 3, 3]),
    ([10, 2, 0, 5], 9, [4, 2, 0, 3]),        # a small domain gives what it lacks to the others
    ([10, 10], 5, [3, 2]),                   # the remainder to the lower ids
    ([3, 1], 100, [3, 1]),                   # more than there is: all of it
])
def test_a_budget_is_shared_equally_among_domains_that_have_windows(available, total, given):
    assert domains.shares(available, total) == given


@pytest.fixture(scope="module")
def split(world):
    return Domained(PreparedDataset(world["code"], "val"))


def test_windows_are_spread_within_each_domain_so_a_small_domain_is_measured(split):
    packed = PackedSequences(split, 16)
    owners = domains.window_domains(packed)
    assert list(owners[:4]) == [int(split.ids[i * 17 + 1]) for i in range(4)]
    chosen = domains.selected_by_domain(packed, 30 * 16)
    assert [int((owners[chosen] == d).sum()) for d in range(3)] == [10, 10, 10]
    assert chosen == sorted(set(chosen))
    small = np.flatnonzero(owners == 2)
    assert [c for c in chosen if owners[c] == 2] == [int(small[(2 * i + 1) * len(small) // 20]) for i in range(10)]
    assert domains.selected_by_domain(packed, None) == list(range(len(packed)))


def test_the_total_is_the_token_weighted_mean_of_the_domain_rows_and_equals_the_plain_score(split):
    torch.manual_seed(0)
    net = AutoModelForCausalLM.from_config(GPTNeoXConfig(**ts.TINY_MODEL, vocab_size=300, max_position_embeddings=64),
                                           dtype=torch.float32)
    model = CausalLMLoss(net.eval())
    packed, env, cpu = PackedSequences(split, 16), DistEnv(0, 0, 1, "127.0.0.1", 0, "none"), torch.device("cpu")
    whole = score_packed(model, packed, None, 8, env, cpu, domain_names=split.domains)
    rows = whole["domains"]
    assert sum(r["tokens"] for r in rows.values()) == whole["tokens"] == len(packed) * 16
    weighted = sum(r["loss"] * r["tokens"] for r in rows.values()) / whole["tokens"]
    assert abs(weighted - whole["loss"]) < 1e-9
    assert whole["macro_loss"] == pytest.approx(sum(r["loss"] for r in rows.values()) / 3, abs=1e-12)
    plain = score_packed(model, packed, None, 8, env, cpu)   # sums each window in fp32 first: a few ulp apart
    assert plain["loss"] == pytest.approx(whole["loss"], rel=1e-7) and (whole["selection"], plain["selection"]) == \
        (domains.RULE, "spread")
    small = score_packed(model, packed, 30 * 16, 8, env, cpu, domain_names=split.domains)
    assert small["windows"] == 30 and sum(r["tokens"] for r in small["domains"].values()) == small["tokens"] == 480
    assert all(r["tokens"] > 100 and not math.isnan(r["loss"]) for r in small["domains"].values())
