"""Batches read ahead of the step on a background thread, the data position kept as consumed.

The reader thread draws and reads the next batches of a `MixtureSampler` (memmap reads,
tensors, pinned memory on CUDA) into a bounded queue while the step computes; the step takes
them in order and copies them to the device without blocking the host. With each batch the
reader records the sampler's state after it, so `state_dict()` is the position of the last
batch the step took, never of one merely read ahead: a checkpoint resumes at the very next
batch, as without read-ahead.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

import torch

from continual_pt.data.sampler import MixtureSampler

_DONE = object()


class Prefetcher:
    """`next_batch()` hands out the sampler's batches in order, read up to `depth` batches ahead."""

    def __init__(self, sampler: MixtureSampler, device: torch.device, depth: int = 4):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.sampler = sampler
        self.device = device
        self._pin = device.type == "cuda"
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._state = sampler.state_dict()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Prefetcher:
        """Start reading ahead (from the sampler's current position)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._read, name="cpt-prefetch", daemon=True)
            self._thread.start()
        return self

    def _read(self) -> None:
        try:
            while not self._stop.is_set():
                batch = self.sampler.next_batch()
                if self._pin:
                    batch = {k: v.pin_memory() for k, v in batch.items()}
                self._put((batch, self.sampler.state_dict()))
        except BaseException as exc:   # handed to the step, which raises it where the batch was due
            self._put((_DONE, exc))

    def _put(self, item: tuple) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def next_batch(self) -> dict[str, Any]:
        """The next batch, its tensors on the device (copied without blocking the host on CUDA)."""
        self.start()
        batch, state = self._queue.get()
        if batch is _DONE:
            self.close()
            raise state
        self._state = state
        return {k: v.to(self.device, non_blocking=self._pin) for k, v in batch.items()}

    def state_dict(self) -> dict[str, Any]:
        """The sampler's state after the last batch handed out (what a checkpoint must hold)."""
        return self._state

    def close(self) -> None:
        """Stop the reader and drop what it read ahead; the sampler's own position is then ahead of
        `state_dict()` and is not to be used."""
        self._stop.set()
        if self._thread is not None:
            while self._thread.is_alive():
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    self._thread.join(timeout=0.05)
            self._thread = None


class Synchronous:
    """A sampler drawn in the step itself (any object with next_batch and state_dict)."""

    def __init__(self, sampler: Any, device: torch.device):
        self.sampler = sampler
        self.device = device

    def start(self) -> Synchronous:
        return self

    def next_batch(self) -> dict[str, Any]:
        return {k: v.to(self.device) for k, v in self.sampler.next_batch().items()}

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def close(self) -> None:
        pass


def batches_for(sampler: Any, device: torch.device, depth: int = 4) -> Prefetcher | Synchronous:
    """Our sampler is read ahead (its next_batch touches nothing outside it); any other sampler is
    drawn in the step, where its effects happen at the time they always did."""
    if isinstance(sampler, MixtureSampler):
        return Prefetcher(sampler, device, depth)
    return Synchronous(sampler, device)
