"""Read-ahead of training batches: the same batches in order, the data position as consumed, errors
where the batch was due, and a slow reader hidden behind the step."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from continual_pt.data.sampler import MixtureSampler
from continual_pt.errors import UserError
from continual_pt.training.prefetch import Prefetcher, Synchronous, batches_for

CPU = torch.device("cpu")


class Windows:
    """n windows of 5 tokens (window i holds i); reading one takes `delay` seconds; window `bad` is corrupt."""

    def __init__(self, n: int, delay: float = 0.0, bad: int | None = None):
        self.n, self.seq_len, self.delay, self.bad = n, 4, delay, bad
        self.reads = 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> np.ndarray:
        if self.delay:
            time.sleep(self.delay)
        if index == self.bad:
            raise UserError(f"window {index}: the shard is corrupt")
        self.reads += 1
        return np.full(5, index, dtype=np.int64)


def mixture(delay: float = 0.0, bad: int | None = None) -> MixtureSampler:
    return MixtureSampler({"a": Windows(37, delay, bad), "b": Windows(11, delay)}, {"a": 0.8, "b": 0.2}, 5, 2, 1, 3)


def test_prefetched_batches_and_positions_equal_drawing_in_the_step():
    plain, ahead = mixture(), mixture()
    batches = Prefetcher(ahead, CPU, depth=3).start()
    try:
        for n in range(1, 41):
            want = plain.next_batch()
            got = batches.next_batch()
            assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
            if n % 7 == 0:
                time.sleep(0.05)   # let the reader fill its queue: it is ahead of the step now
                assert ahead.slots_consumed > plain.slots_consumed
            # The position to save is the step's, never the reader's.
            assert batches.state_dict() == plain.state_dict()
    finally:
        batches.close()
    # A sampler resumed from the saved position continues with the step's next batch.
    resumed = mixture()
    resumed.load_state_dict(batches.state_dict())
    assert torch.equal(resumed.next_batch()["input_ids"], plain.next_batch()["input_ids"])


def test_the_position_before_any_batch_is_the_samplers_start():
    sampler = mixture()
    sampler.next_batch()
    start = sampler.state_dict()
    batches = Prefetcher(sampler, CPU).start()
    time.sleep(0.05)
    try:
        assert batches.state_dict() == start and sampler.state_dict() != start
    finally:
        batches.close()


def test_a_reader_error_is_raised_by_the_step_that_needed_the_batch():
    reference = mixture()
    due = next(i for i in range(1, 100) if 7 in reference.next_batch()["window"].tolist())
    batches = Prefetcher(mixture(bad=7), CPU).start()
    for _ in range(due - 1):
        batches.next_batch()
    with pytest.raises(UserError, match="window 7: the shard is corrupt"):
        batches.next_batch()
    assert not [t for t in threading.enumerate() if t.name == "cpt-prefetch"]


def test_close_stops_the_reader_even_with_a_full_queue():
    batches = Prefetcher(mixture(), CPU, depth=1).start()
    batches.next_batch()
    time.sleep(0.05)
    batches.close()
    assert not [t for t in threading.enumerate() if t.name == "cpt-prefetch"]


def test_only_our_sampler_is_read_ahead():
    assert isinstance(batches_for(mixture(), CPU), Prefetcher)

    class Other:
        def next_batch(self):
            return {"input_ids": torch.zeros(1, 2, dtype=torch.long)}

        def state_dict(self):
            return {"drawn": 1}

    other = batches_for(Other(), CPU)
    assert isinstance(other, Synchronous) and other.state_dict() == {"drawn": 1}


def test_a_slow_reader_is_hidden_behind_a_step_as_slow():
    """20 ms to read a batch (2 windows of 10 ms) and 20 ms of step: read ahead, a step costs ~20 ms, not ~40."""
    steps, work = 15, 0.02

    def run(batches) -> float:
        batches.next_batch()                   # the first batch cannot be hidden
        started = time.perf_counter()
        for _ in range(steps):
            batches.next_batch()
            time.sleep(work)
        return (time.perf_counter() - started) / steps

    sync = run(Synchronous(mixture(delay=0.01), CPU))
    ahead = Prefetcher(mixture(delay=0.01), CPU, depth=2).start()
    try:
        hidden = run(ahead)
    finally:
        ahead.close()
    assert sync > 0.038 and hidden < 0.75 * sync, (sync, hidden)
