"""MixtureSampler: every token once per epoch across ranks, exact resume, batch-size independence, proportions."""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections import Counter

import numpy as np
import pytest
import torch

from continual_pt.data.dataset import PackedSequences, PreparedDataset
from continual_pt.data.sampler import FeistelPermutation, MixtureSampler, epoch_permutation
from continual_pt.errors import UserError

SEQ = 15


@pytest.fixture(scope="module")
def data_sources(data_dataset) -> dict[str, PackedSequences]:
    return {"big": PackedSequences(PreparedDataset(data_dataset, "train"), SEQ),
            "small": PackedSequences(PreparedDataset(data_dataset, "val"), SEQ)}


def sampler(sources, weights, mbs=2, rank=0, size=1, seed=7) -> MixtureSampler:
    return MixtureSampler({n: sources[n] for n in weights}, weights, seed, mbs, rank, size)


def global_rows(sources, weights, batches, mbs, size, state=None):
    """(source, window, row tensor) per global slot, gathered from every rank like an all-gather."""
    ranks = [sampler(sources, weights, mbs, r, size) for r in range(size)]
    for s in ranks:
        if state is not None:
            s.load_state_dict(copy.deepcopy(state))
    rows = []
    for _ in range(batches):
        outs = [s.next_batch() for s in ranks]
        for out in outs:
            full = torch.cat([out["input_ids"], out["labels"][:, -1:]], dim=1)
            rows += [(ranks[0].names[int(src)], int(w), full[i]) for i, (src, w) in
                     enumerate(zip(out["source"], out["window"]))]
    return rows, ranks[0]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 16, 17, 100, 255, 256, 257, 1000, 4099])
def test_feistel_is_a_permutation(n):
    perm = FeistelPermutation(n, b"key")
    assert sorted(perm(i) for i in range(n)) == list(range(n))


def test_permutation_depends_on_seed_source_and_epoch():
    n = 1000
    orders = {key: [epoch_permutation(*key, n)(i) for i in range(n)]
              for key in [(1, "a", 0), (2, "a", 0), (1, "b", 0), (1, "a", 1)]}
    assert len({tuple(o) for o in orders.values()}) == 4
    assert orders[(1, "a", 0)] == [epoch_permutation(1, "a", 0, n)(i) for i in range(n)]
    # Shuffled, not nearly sorted: few fixed points and little correlation with the identity.
    order = np.array(orders[(1, "a", 0)])
    assert (order == np.arange(n)).sum() < 10
    assert abs(np.corrcoef(order, np.arange(n))[0, 1]) < 0.1
    big = FeistelPermutation(146_000_000, b"k")  # 300B tokens / 2049: no table is built
    assert len({big(i) for i in range(2000)}) == 2000


@pytest.mark.parametrize("size, mbs", [(1, 4), (2, 3), (3, 2)])
def test_every_train_token_read_once_per_epoch(data_sources, size, mbs):
    packed = data_sources["big"]
    n = len(packed)
    batches = math.ceil(n / (mbs * size))
    rows, _ = global_rows(data_sources, {"big": 1.0}, batches, mbs, size)
    epoch = rows[:n]
    assert sorted(w for _, w, _ in epoch) == list(range(n))  # each window exactly once
    # Hash audit: the multiset of windows read equals the multiset of windows in the dataset...
    digest = lambda a: hashlib.sha1(np.asarray(a, dtype=np.int64).tobytes()).hexdigest()  # noqa: E731
    flat = packed.dataset.tokens(0, n * packed.window).astype(np.int64)
    assert Counter(digest(r.numpy()) for _, _, r in epoch) == \
        Counter(digest(flat[i * packed.window:(i + 1) * packed.window]) for i in range(n))
    # ...so every token of the split except the dropped tail is read exactly once.
    assert sum(len(r) for _, _, r in epoch) + packed.dropped_tokens == packed.dataset.num_tokens
    # The next epoch reshuffles and starts over.
    if len(rows) > n:
        assert [w for _, w, _ in rows[n:]] == [epoch_permutation(7, "big", 1, n)(i) for i in range(len(rows) - n)]


def test_ranks_slice_one_global_order(data_sources):
    one, _ = global_rows(data_sources, {"big": 1, "small": 1}, 6, 6, 1)
    three, _ = global_rows(data_sources, {"big": 1, "small": 1}, 6, 2, 3)
    assert [(s, w) for s, w, _ in one] == [(s, w) for s, w, _ in three]


@pytest.mark.parametrize("weights", [{"small": 1.0}, {"big": 0.2, "small": 0.8}])
def test_resume_gives_identical_batches(data_sources, weights):
    straight = sampler(data_sources, weights, mbs=3, rank=1, size=2)
    first = [straight.next_batch() for _ in range(7)]
    state = json.loads(json.dumps(straight.state_dict()))  # checkpoints store it as plain data
    expected = [straight.next_batch() for _ in range(90)]
    assert straight.state_dict()["sources"]["small"]["epoch"] == 1  # the resumed part crosses an epoch
    resumed = sampler(data_sources, weights, mbs=3, rank=1, size=2)
    resumed.load_state_dict(state)
    for want, got in zip(expected, (resumed.next_batch() for _ in range(90))):
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k], got[k]) for k in want)
    assert resumed.state_dict() == straight.state_dict()
    assert not torch.equal(first[0]["input_ids"], expected[0]["input_ids"])


def test_resume_with_another_batch_shape_continues_at_the_next_sequence(data_sources):
    weights = {"big": 0.8, "small": 0.2}
    flat, _ = global_rows(data_sources, weights, 30, 4, 1)
    before, s = global_rows(data_sources, weights, 5, 4, 1)
    assert s.state_dict()["sources"]["big"]["consumed"] + s.state_dict()["sources"]["small"]["consumed"] == 20
    after, _ = global_rows(data_sources, weights, 8, 3, 2, state=s.state_dict())
    stream = before + after
    assert [(a, b) for a, b, _ in stream] == [(a, b) for a, b, _ in flat[:len(stream)]]
    assert all(torch.equal(x, y) for (_, _, x), (_, _, y) in zip(stream, flat))


def test_mixture_proportions_hold_in_every_batch(data_sources):
    s = sampler(data_sources, {"big": 95, "small": 5}, mbs=8)
    counts = Counter()
    for b in range(1, 1001):
        batch = s.next_batch()
        counts.update(s.names[int(i)] for i in batch["source"])
        # Deficit rule: the running count never strays a full sequence from its share.
        assert abs(counts["small"] - 0.05 * 8 * b) < 1
    assert counts["small"] == 400 and counts["big"] == 7600
    state = s.state_dict()["sources"]
    assert state["small"]["epoch"] == 400 // len(data_sources["small"])


def test_load_state_dict_refuses_what_would_break_the_data_order(data_sources):
    s = sampler(data_sources, {"big": 0.9, "small": 0.1})
    s.next_batch()
    good = s.state_dict()
    for change, match in [(lambda st: st.update(version=9), "version 9 is not supported"),
                          (lambda st: st.update(seed=8), "data seed is 8"),
                          (lambda st: st["sources"].pop("small"), "differ from the config's"),
                          (lambda st: st.update(seq_len=16), "seq_len is 16"),
                          (lambda st: st["sources"]["big"].update(weight=0.5), "weight 0.9"),
                          (lambda st: st["sources"]["big"].update(num_windows=3), "the dataset changed"),
                          (lambda st: st["sources"]["big"].update(consumed=-1), "corrupt sampler state")]:
        state = copy.deepcopy(good)
        change(state)
        with pytest.raises(UserError, match=match):
            sampler(data_sources, {"big": 0.9, "small": 0.1}).load_state_dict(state)


def test_bad_sampler_arguments(data_dataset, data_sources):
    tiny = PackedSequences(PreparedDataset(data_dataset, "val"), 10**7)
    with pytest.raises(UserError, match="fewer than one sequence"):
        MixtureSampler({"t": tiny}, {"t": 1.0}, 0, 1, 0, 1)
    with pytest.raises(UserError, match="weight must be a positive number"):
        sampler(data_sources, {"big": 1.0, "small": 0.0})
    other = PackedSequences(PreparedDataset(data_dataset, "val"), SEQ + 1)
    with pytest.raises(UserError, match="different seq_len"):
        MixtureSampler({"a": data_sources["big"], "b": other}, {"a": 1, "b": 1}, 0, 1, 0, 1)
