"""The training sampler: a weighted mixture of packed sources, shuffled, sharded, resumable exactly.

Every rank walks the same sequence of global slots and keeps its own slice, so ranks never
overlap. Slot k goes to the source with the largest deficit weight * (k + 1) - consumed (ties
by name), which depends on counts alone: the sequence of (source, window) pairs is the same for
any micro-batch size and data-parallel size, and the state is just the per-source counts.
Within a source, epoch e visits windows in the order of a keyed Feistel permutation of
(seed, source, e): pseudo-random, O(1) memory at any dataset size.

`next_slot()` states the rule one slot at a time; `next_batch()` computes the same slots for a
whole global micro-batch at once in numpy (`draw_sources`, `FeistelPermutation.many`), and only
this rank's rows are permuted and read.
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


def _mix64_many(x: np.ndarray) -> np.ndarray:
    """`_mix64` of every element of a uint64 array (numpy's uint64 products wrap modulo 2**64)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


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

    def _encrypt_many(self, x: np.ndarray) -> np.ndarray:
        half, mask = np.uint64(self.half), np.uint64(self.mask)
        left, right = x >> half, x & mask
        for key in self.keys:
            left, right = right, left ^ (_mix64_many(right ^ np.uint64(key)) & mask)
        return (left << half) | right

    def many(self, indices: np.ndarray) -> np.ndarray:
        """`self(i)` for every i of a 1-d integer array, as int64."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if indices.size <= 16:    # numpy's per-call cost outweighs a few scalar rounds
            return np.array([self(int(i)) for i in indices], dtype=np.int64)
        if not (0 <= indices.min() and indices.max() < self.n):
            raise IndexError(f"indices outside [0, {self.n})")
        x = self._encrypt_many(indices.astype(np.uint64))
        outside = np.flatnonzero(x >= np.uint64(self.n))
        while outside.size:   # cycle walking, for the elements still out of range only
            x[outside] = self._encrypt_many(x[outside])
            outside = outside[x[outside] >= np.uint64(self.n)]
        return x.astype(np.int64)


def _quota_counts(weights: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """Per source (rows) and slot k (columns) the counts that split k by largest remainders of
    weights * k: a close guess of how many slots each source holds before slot k."""
    quota = weights[:, None] * slots.astype(np.float64)[None, :]
    counts = np.floor(quota).astype(np.int64)
    short = slots - counts.sum(axis=0)
    remainder = quota - counts
    for n in range(len(weights)):   # a source's rank among the remainders: largest first, ties by name
        rank = np.zeros(len(slots), dtype=np.int64)
        for m in range(len(weights)):
            if m != n:
                rank += (remainder[m] >= remainder[n]) if m < n else (remainder[m] > remainder[n])
        counts[n] += rank < short
    return counts


def _draw_one_by_one(weights: list[float], counts: np.ndarray, first_slot: int, n: int) -> np.ndarray:
    """`next_slot`'s choice of source for n slots, one at a time (the fallback of `draw_sources`)."""
    out = np.empty(n, dtype=np.int64)
    held = [int(c) for c in counts]
    order = range(len(held))
    for i in range(n):
        k1 = first_slot + i + 1
        out[i] = chosen = max(order, key=lambda j: weights[j] * k1 - held[j])
        held[chosen] += 1
    return out


def _largest_deficit(weights: np.ndarray, slots: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per slot (columns of `counts`), the source with the largest weight * (k + 1) - count, the
    first of equals: `next_slot`'s rule with its float operations, for many slots at once."""
    ahead = (slots + 1).astype(np.float64)
    best = weights[0] * ahead - counts[0]
    chosen = np.zeros(len(slots), dtype=np.int64)
    for n in range(1, len(weights)):
        deficit = weights[n] * ahead - counts[n]
        better = deficit > best
        chosen[better] = n
        best = np.where(better, deficit, best)
    return chosen


def draw_sources(weights: np.ndarray, consumed: np.ndarray, first_slot: int, count: int) -> np.ndarray:
    """The source (index) of each of `count` slots from `first_slot` on, given the sequences each
    source has given so far: exactly `next_slot`'s rule (the largest deficit, ties by name).

    The counts before every slot are guessed (`_quota_counts`) and the rule is applied to all slots
    at once; every slot up to the first one whose guessed counts disagree with the choices before
    it is exact, and the rest is guessed again from there. A guess that keeps failing falls back
    to single slots for a while, so any weights and any state stay exact.
    """
    sources = np.arange(len(weights))[:, None]
    picks = np.empty(count, dtype=np.int64)
    counts = np.asarray(consumed, dtype=np.int64).copy()
    done, window = 0, count
    while done < count:
        slots = np.arange(first_slot + done, first_slot + min(count, done + window), dtype=np.int64)
        guess = _quota_counts(weights, slots)
        guess += (counts - guess[:, 0])[:, None]
        chosen = _largest_deficit(weights, slots, guess)
        taken = chosen[None, :] == sources
        wrong = np.flatnonzero((counts[:, None] + np.cumsum(taken, axis=1) - taken != guess).any(axis=0))
        good = len(slots) if wrong.size == 0 else int(wrong[0])
        if good < 16 < len(slots):   # a poor guess here: a few slots one by one, then guess again
            good = min(64, count - done)
            chosen = _draw_one_by_one(weights.tolist(), counts, first_slot + done, good)
            taken = chosen[None, :] == sources
        picks[done:done + good] = chosen[:good]
        counts += taken[:, :good].sum(axis=1)
        done += good
        window = max(64, 2 * good)
    return picks


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
        self._weight_array = np.array([self.weights[n] for n in self.names], dtype=np.float64)
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

    def next_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """Consume one global micro-batch: (source index, window index) of each of this rank's rows,
        the slots `next_slot` would draw, computed for the whole micro-batch at once."""
        total = self.micro_batch_size * self.dp_size
        consumed = np.array([self.consumed[n] for n in self.names], dtype=np.int64)
        picks = draw_sources(self._weight_array, consumed, self._slots, total)
        mine = slice(self.dp_rank * self.micro_batch_size, (self.dp_rank + 1) * self.micro_batch_size)
        sources = picks[mine]
        taken = picks[None, :] == np.arange(len(self.names))[:, None]
        totals = taken.sum(axis=1)
        # Each own row's position in its source: the source's count before this rank's slice, plus
        # the rows of the same source before it within the slice.
        before = consumed + taken[:, :mine.start].sum(axis=1)
        within = np.cumsum(taken[:, mine], axis=1) - taken[:, mine]
        counts = before[sources] + within[sources, np.arange(self.micro_batch_size)]
        windows = np.empty(self.micro_batch_size, dtype=np.int64)
        for s in np.unique(sources):
            name, at = self.names[s], np.flatnonzero(sources == s)
            epochs, positions = np.divmod(counts[at], len(self.sources[name]))
            for epoch in np.unique(epochs):
                here = at[epochs == epoch]
                windows[here] = self._permutation(name, int(epoch)).many(positions[epochs == epoch])
        for n, c in zip(self.names, totals):
            self.consumed[n] += int(c)
        self._slots += total
        return sources, windows

    def read(self, sources: np.ndarray, windows: np.ndarray) -> dict[str, Any]:
        """The batch of the given rows: input_ids/labels [rows, seq_len] plus, per row, `source`
        (index into `names`) and `window` (window index in that source)."""
        batch = make_batch([self.sources[self.names[s]][int(w)] for s, w in zip(sources, windows)])
        batch["source"] = torch.from_numpy(np.asarray(sources, dtype=np.int64))
        batch["window"] = torch.from_numpy(np.asarray(windows, dtype=np.int64))
        return batch

    def next_batch(self) -> dict[str, Any]:
        """Consume one global micro-batch and read this rank's rows (see `read`)."""
        return self.read(*self.next_rows())

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
