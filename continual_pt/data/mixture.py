"""Training mixtures by domain: a source may keep or re-weight the domains of a dataset prepared with them.

    data.train.pile: {path: data/pile, weight: 0.2, domains: {Github: 2.0, ArXiv: 1.0}}
    data.train.pile: {path: data/pile, weight: 0.2, domains: [Github, ArXiv]}

Such a source becomes one sub-source per kept domain, named `pile/Github`: a `PackedSequences` over
a `DomainView`, the domain's documents laid end to end as one token stream, so its windows never mix
domains. Its weight is the source's weight times the domain's share of the source: its relative
weight among the kept domains (mapping), or its tokens among theirs in the split (list). The sampler
sees plain sources, so its exactness and bitwise resume hold as for any mixture, and a source without
`domains` keeps its name and its sampler state. A resume whose domains or their weights changed meets
the sampler's check of names and weights: refused, like any changed mixture (start a new phase).

Cost: a view reads its ranges from the document index on its first read, not at start-up, and holds
16 bytes per range of its domain's documents (adjacent ones merged), per rank: on 10M documents of 7
domains, 2.5M ranges of the largest took 0.9 s to find and hold 38 MiB (259 MiB at the peak of the scan);
a window read through the ranges took 8.4 us against 3.6 us from the split, both from memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from continual_pt.data.dataset import PackedSequences, PreparedDataset
from continual_pt.errors import Problems, UserError


class DomainView:
    """One domain of a split as one contiguous token stream: the token ranges of its documents
    (`PreparedDataset.domain_ranges`) end to end. What `PackedSequences` reads of a dataset:
    num_tokens, tokens(start, stop), vocab_size, dtype, path, split and shard_at."""

    def __init__(self, dataset: PreparedDataset, domain: str):
        self.base, self.domain = dataset, domain
        self.num_tokens = int(dataset.domain_tokens[domain])   # the manifest's count; checked on first read
        self.vocab_size, self.dtype, self.path, self.split = (dataset.vocab_size, dataset.dtype, dataset.path,
                                                              dataset.split)
        self._starts: np.ndarray | None = None
        self._offsets: np.ndarray | None = None

    def _index(self) -> tuple[np.ndarray, np.ndarray]:
        """The ranges' starts in the split and their offsets in the view (one more: the view's end)."""
        if self._starts is None:
            ranges = self.base.domain_ranges(self.domain)
            offsets = np.concatenate(([0], np.cumsum(ranges[:, 1] - ranges[:, 0]))).astype(np.int64)
            if int(offsets[-1]) != self.num_tokens:
                raise UserError(f"{self.path}: the document index holds {int(offsets[-1])} tokens of domain "
                                f"{self.domain!r} in split {self.split!r}, the manifest {self.num_tokens}; "
                                "prepare the dataset again")
            self._starts, self._offsets = ranges[:, 0].copy(), offsets
        return self._starts, self._offsets

    def split_position(self, position: int) -> int:
        """The split's token offset of token `position` of the view."""
        starts, offsets = self._index()
        i = int(np.searchsorted(offsets, position, side="right")) - 1
        return int(starts[i]) + position - int(offsets[i])

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the view: read range by range from the split."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"tokens [{start}, {stop}) outside [0, {self.num_tokens}) of domain {self.domain!r} "
                             f"of {self.path}")
        if start == stop:
            return np.empty(0, dtype=self.dtype)
        starts, offsets = self._index()
        i = int(np.searchsorted(offsets, start, side="right")) - 1
        pieces, pos = [], start
        while pos < stop:
            end = min(stop, int(offsets[i + 1]))
            base = int(starts[i]) - int(offsets[i])
            pieces.append(self.base.tokens(base + pos, base + end))
            pos, i = end, i + 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def shard_at(self, position: int) -> Path:
        """The shard file holding token `position` of the view (for messages)."""
        return self.base.shard_at(self.split_position(position))

    def __repr__(self) -> str:
        return f"DomainView({str(self.path)!r}, split={self.split!r}, domain={self.domain!r}, tokens={self.num_tokens})"


def domain_shares(dataset: PreparedDataset, domains: dict[str, float] | list[str], key: str,
                  p: Problems) -> dict[str, float]:
    """Each kept domain's share of its source (they sum to 1); an unknown domain, or domains of a
    dataset without any, is a problem of `key` (data.train.<name>.domains)."""
    if not dataset.domains:
        p.add(key, f"{dataset.path} has no domains (prepared without --domain-field or --layout): prepare it "
              "again with --domain-field FIELD, or leave domains out to train on the whole dataset")
        return {}
    unknown = [d for d in domains if d not in dataset.domains]
    for name in unknown:
        where = f"{key}.{name}" if isinstance(domains, dict) else key
        p.add(where, f"{dataset.path} has no domain {name!r} (its domains: {', '.join(dataset.domains)})")
    if unknown:
        return {}
    weights = domains if isinstance(domains, dict) else {d: float(dataset.domain_tokens[d]) for d in domains}
    total = math.fsum(weights.values())
    return {d: w / total if total > 0 else 0.0 for d, w in weights.items()}


@dataclass
class Mixture:
    """The training sources as the sampler takes them: packed sequences and un-normalised weights, a
    source with `domains` expanded into one `<source>/<domain>` per kept domain."""

    sources: dict[str, PackedSequences] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, dataset: PreparedDataset, weight: float, seq_len: int,
            domains: dict[str, float] | list[str] | None = None, key: str = "", p: Problems | None = None) -> None:
        """Add source `name` (config key `key`, data.train.<name>); the problems of its `domains` go to `p`
        (raised here without one)."""
        problems = p if p is not None else Problems("data mixture")
        if domains is None:
            self._put(name, PackedSequences(dataset, seq_len), weight, key, problems)
        else:
            at = f"{key}.domains"
            for domain, share in domain_shares(dataset, domains, at, problems).items():
                view = DomainView(dataset, domain)
                if view.num_tokens < seq_len + 1:
                    problems.add(f"{at}.{domain}" if isinstance(domains, dict) else at,
                                 f"domain {domain!r} has {view.num_tokens} tokens in split {dataset.split!r} of "
                                 f"{dataset.path}, fewer than one sequence of data.seq_len + 1 = {seq_len + 1}: "
                                 "leave it out")
                else:
                    self._put(f"{name}/{domain}", PackedSequences(view, seq_len), weight * share, key, problems)
        if p is None:
            problems.raise_if_any()

    def _put(self, name: str, packed: PackedSequences, weight: float, key: str, p: Problems) -> None:
        if name in self.sources:
            p.add(key, f"the mixture has two sources named {name!r} (a source and a domain of another): rename one")
            return
        self.sources[name], self.weights[name] = packed, weight


def describe(mixture: Mixture, phase_sequences: int | None = None) -> str:
    """The start-up lines of the mixture: each source's share of the training sequences, its tokens and
    (given the sequences of the whole phase) how many epochs of it the phase reads."""
    total = math.fsum(mixture.weights.values())
    names = sorted(mixture.sources)
    tokens = {n: f"{mixture.sources[n].dataset.num_tokens:,}" for n in names}
    width, digits = max(map(len, names)), max(map(len, tokens.values()))
    lines = ["data mixture (each source's share of the training sequences):"]
    for name in names:
        packed, share = mixture.sources[name], mixture.weights[name] / total
        line = f"  {name:<{width}}  {share:7.2%}  {tokens[name]:>{digits}} tokens"
        if phase_sequences is not None:
            line += f", {share * phase_sequences / len(packed):.3g} epochs this phase"
        lines.append(line)
    return "\n".join(lines)
