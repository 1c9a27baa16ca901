"""The training sampler: a weighted mixture of packed sources, shuffled, sharded, resumable exactly.

Every rank walks the same sequence of global slots and keeps its own slice, so ranks never
overlap. Slot k goes to the source with the largest deficit weight * (k + 1) - consumed (ties
by name), which depends on counts alone: the sequence of (source, window) pairs is the same for
any micro-batch size and data-parallel size, and the state is just the per-source counts.
Within a source, epoch e visits windows in the order of a keyed Feistel permutation of
(seed, source, e): pseudo-random, O(1) memory at any dataset size.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np
import torch

from continual_pt.data.dataset import PackedSequences
from continual_pt.errors import UserError

STATE_VERSION = 1
_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    # splitmix64's finaliser: a cheap, well-mixing round function.
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class FeistelPermutation:
    """A keyed pseudo-random permutation of range(n) computed per index, without any table."""

    def __init__(self, n: int, key: bytes, rounds: int = 6):
        if n < 1:
            raise ValueError(f"cannot permute {n} items")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        bits += bits % 2  # balanced halves; the domain is then < 4 n, so cycle walking stays short
        self.half = bits // 2
        self.mask = (1 << self.half) - 1
        digest = hashlib.blake2b(key, digest_size=8 * rounds).digest()
        self.keys = [int.from_bytes(digest[8 * r:8 * r + 8], "little") for r in range(rounds)]

    def _encrypt(self, x: int) -> int:
        left, right = x >> self.half, x & self.mask
        for key in self.keys:
            left, right = right, left ^ (_mix64(right ^ key) & self.mask)
        return (left << self.half) | right

    def __call__(self, index: int) -> int:
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} outside [0, {self.n})")
        # Cycle walking: re-encrypt until the value falls back into range; still a bijection on [0, n).
        x = self._encrypt(index)
        while x >= self.n:
            x = self._encrypt(x)
        return x


def make_batch(windows: list[np.ndarray]) -> dict[str, Any]:
    """input_ids and labels LongTensors [rows, seq_len] from windows of seq_len + 1 tokens."""
    stacked = torch.from_numpy(np.stack(windows)) if windows else torch.empty(0, 1, dtype=torch.long)
    return {"input_ids": stacked[:, :-1].contiguous(), "labels": stacked[:, 1:].contiguous()}


def epoch_permutation(seed: int, source: str, epoch: int, n: int) -> FeistelPermutation:
    """The visiting order of a source's n windows in one epoch."""
    return FeistelPermutation(n, f"continual-pt\0{seed}\0{source}\0{epoch}".encode())


class MixtureSampler:
    """Global micro-batches drawn from weighted sources; `next_batch()` returns this rank's rows."""

    def __init__(self, sources: dict[str, PackedSequences], weights: dict[str, float], seed: int,
                 micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1):
        _check_arguments(sources, weights, micro_batch_size, dp_rank, dp_size)
        self.sources = sources
        self.names = sorted(sources)
        total = math.fsum(weights[n] for n in self.names)
        self.weights = {n: weights[n] / total for n in self.names}
        self.seed = seed
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seq_len = sources[self.names[0]].seq_len
        self.consumed = dict.fromkeys(self.names, 0)
        self._slots = 0
        self._perms: dict[str, tuple[int, FeistelPermutation]] = {}

    @property
    def slots_consumed(self) -> int:
        """Sequences drawn so far by all ranks together."""
        return self._slots

    def tokens_consumed(self) -> dict[str, int]:
        """Tokens read so far per source, all ranks together (seq_len + 1 per sequence)."""
        return {n: c * (self.seq_len + 1) for n, c in self.consumed.items()}

    def _permutation(self, name: str, epoch: int) -> FeistelPermutation:
        cached = self._perms.get(name)
        if cached is None or cached[0] != epoch:
            cached = (epoch, epoch_permutation(self.seed, name, epoch, len(self.sources[name])))
            self._perms[name] = cached
        return cached[1]

    def next_slot(self) -> tuple[str, int]:
        """Draw the next global slot: (source name, window index); advances the state."""
        k = self._slots
        # max() keeps the first of equal deficits, and names are sorted: ties go by name.
        name = max(self.names, key=lambda n: self.weights[n] * (k + 1) - self.consumed[n])
        epoch, position = divmod(self.consumed[name], len(self.sources[name]))
        index = self._permutation(name, epoch)(position)
        self.consumed[name] += 1
        self._slots += 1
        return name, index

    def next_batch(self) -> dict[str, Any]:
        """Consume one global micro-batch; this rank's input_ids/labels [mbs, seq_len] plus, per row,
        `source` (index into `names`) and `window` (window index in that source)."""
        first = self.dp_rank * self.micro_batch_size
        rows = []
        for j in range(self.micro_batch_size * self.dp_size):
            slot = self.next_slot()
            if first <= j < first + self.micro_batch_size:
                rows.append(slot)
        batch = make_batch([self.sources[name][index] for name, index in rows])
        batch["source"] = torch.tensor([self.names.index(name) for name, _ in rows], dtype=torch.long)
        batch["window"] = torch.tensor([index for _, index in rows], dtype=torch.long)
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The data position: per-source counts and epochs, plus what must match to resume."""
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "micro_batch_size": self.micro_batch_size,
            "dp_size": self.dp_size,
            "seq_len": self.seq_len,
            "slots_consumed": self._slots,
            "sources": {n: {"consumed": c, "epoch": c // len(self.sources[n]), "position": c % len(self.sources[n]),
                            "num_windows": len(self.sources[n]), "weight": self.weights[n]}
                        for n, c in self.consumed.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from the next sequence after `state`, whatever the micro-batch or data-parallel size."""
        _check_state(self, state)
        self.consumed = {n: int(state["sources"][n]["consumed"]) for n in self.names}
        self._slots = sum(self.consumed.values())
        self._perms.clear()

    def __iter__(self):
        while True:
            yield self.next_batch()


def _check_arguments(sources: dict[str, PackedSequences], weights: dict[str, float], micro_batch_size: int,
                     dp_rank: int, dp_size: int) -> None:
    if not sources:
        raise UserError("the mixture has no sources")
    if set(sources) != set(weights):
        raise UserError(f"sources {sorted(sources)} and weights {sorted(weights)} name different datasets")
    for name, weight in weights.items():
        if not (math.isfinite(weight) and weight > 0):
            raise UserError(f"data source {name!r}: weight must be a positive number, got {weight}")
    seq_lens = {name: s.seq_len for name, s in sources.items()}
    if len(set(seq_lens.values())) > 1:
        raise UserError(f"the sources are packed with different seq_len: {seq_lens}")
    for name, source in sources.items():
        if len(source) == 0:
            raise UserError(f"data source {name!r} ({source.dataset.path}, split {source.dataset.split!r}) has "
                            f"{source.dataset.num_tokens} tokens: fewer than one sequence of {source.window}")
    if micro_batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"bad micro_batch_size={micro_batch_size}, dp_rank={dp_rank}, dp_size={dp_size}")


def _check_state(sampler: MixtureSampler, state: dict[str, Any]) -> None:
    version = state.get("version")
    if version != STATE_VERSION:
        raise UserError(f"data sampler state version {version!r} is not supported (expected {STATE_VERSION})")
    if state.get("seed") != sampler.seed:
        raise UserError(f"the checkpoint's data seed is {state.get('seed')}, the config says {sampler.seed}: "
                        "resuming with another seed would repeat and skip data; set data.seed back")
    saved = set(state.get("sources", {}))
    if saved != set(sampler.names):
        raise UserError(f"the checkpoint's data sources {sorted(saved)} differ from the config's "
                        f"{sampler.names} (missing: {sorted(saved - set(sampler.names))}, new: "
                        f"{sorted(set(sampler.names) - saved)}); start a new phase to change the mixture")
    if state.get("seq_len") != sampler.seq_len:
        raise UserError(f"the checkpoint's seq_len is {state.get('seq_len')}, the config says {sampler.seq_len}")
    for name in sampler.names:
        entry = state["sources"][name]
        if entry.get("num_windows") != len(sampler.sources[name]):
            raise UserError(f"data source {name!r} ({sampler.sources[name].dataset.path}) has "
                            f"{len(sampler.sources[name])} sequences, the checkpoint saw {entry.get('num_windows')}: "
                            "the dataset changed since the checkpoint")
        if not math.isclose(float(entry.get("weight", -1)), sampler.weights[name], rel_tol=1e-9):
            raise UserError(f"data source {name!r}: weight {sampler.weights[name]:.6g} (normalised) differs from the "
                            f"checkpoint's {entry.get('weight')}; start a new phase to change the mixture")
        if not isinstance(entry.get("consumed"), int) or entry["consumed"] < 0:
            raise UserError(f"data source {name!r}: corrupt sampler state (consumed={entry.get('consumed')!r})")
