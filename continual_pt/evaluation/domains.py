"""Losses per domain of a held-out set (in-loop `eval.by_domain: true`, `cpt eval --by-domain`).

A set prepared with domains (`cpt prepare --domain-field` or `--layout`) knows each token's domain.
Scored by domain, every scored token's loss is added to its own domain's sum (a window that crosses
documents adds to several), so the set's total is exactly the token-weighted mean of the domain
rows: the same tokens, summed once. The macro mean (the plain mean of the domain losses) is the
second summary: a small domain counts as much as a large one.

With a token budget the windows are chosen per domain, so that small domains are measured too: a
window belongs to the domain of its first predicted token; the budget's windows are shared equally
among the domains, a domain with fewer windows than its share giving the rest to the others, and
each domain's windows are spread evenly over its own windows in the split (the rule of
`selected_windows`, within a domain). Without a budget every window is scored.
"""

from __future__ import annotations

import math

import numpy as np

from continual_pt.data.dataset import PackedSequences
from continual_pt.errors import UserError

RULE = "spread-by-domain"
"""The selection rule recorded with scores by domain (another measurement than a plain `spread`)."""
BLOCK_WINDOWS = 4096   # windows whose tokens' domains are read at once


def require_domains(dataset, name: str) -> list[str]:
    """The domains of a set (a PreparedDataset) to be scored by domain; UserError naming it if it has none."""
    names = list(getattr(dataset, "domains", []) or [])
    if not names:
        raise UserError(f"held-out set {name} ({dataset.path}) has no domains: prepare it with "
                        "`cpt prepare --domain-field FIELD` (or --layout) to score it by domain")
    return names


_OWNERS: dict[tuple, np.ndarray] = {}


def window_domains(packed: PackedSequences) -> np.ndarray:
    """The domain id of each window: its first predicted token's (kept: every eval of the set asks again)."""
    ds, window = packed.dataset, packed.window
    key = (str(ds.path), ds.split, ds.num_tokens, window)
    if key not in _OWNERS:
        out = np.empty(packed.num_windows, dtype=np.int64)
        for lo in range(0, packed.num_windows, BLOCK_WINDOWS):
            hi = min(packed.num_windows, lo + BLOCK_WINDOWS)
            out[lo:hi] = ds.token_domains(lo * window, hi * window)[1::window][:hi - lo]
        _OWNERS[key] = out
    return _OWNERS[key]


def shares(available: list[int], total: int) -> list[int]:
    """`total` windows shared equally among domains with `available` windows each: a domain with fewer
    than its share takes all it has and the rest is shared among the others (deterministic: ties of the
    remainder go to the lower domain ids)."""
    given = [0] * len(available)
    open_ = [d for d, n in enumerate(available) if n > 0]
    left = min(total, sum(available))
    while left > 0 and open_:
        each, extra = divmod(left, len(open_))
        for i, d in enumerate(list(open_)):
            take = min(available[d] - given[d], each + (1 if i < extra else 0))
            given[d] += take
            left -= take
        open_ = [d for d in open_ if given[d] < available[d]]
    return given


def selected_by_domain(packed: PackedSequences, token_budget: int | None) -> list[int]:
    """The windows a by-domain eval scores, in split order (see the module docstring)."""
    count = len(packed) if token_budget is None else min(len(packed), math.ceil(token_budget / packed.seq_len))
    if count == len(packed):
        return list(range(len(packed)))
    owners = window_domains(packed)
    members = [np.flatnonzero(owners == d) for d in range(len(packed.dataset.domains))]
    chosen: list[int] = []
    for windows, k in zip(members, shares([len(m) for m in members], count)):
        chosen += [int(windows[(2 * i + 1) * len(windows) // (2 * k)]) for i in range(k)]
    return sorted(chosen)


def token_domains(packed: PackedSequences, windows: list[int]) -> np.ndarray:
    """[len(windows), seq_len]: the domain id of each predicted token of each window."""
    w = packed.window
    return np.stack([packed.dataset.token_domains(i * w + 1, (i + 1) * w) for i in windows]).astype(np.int64)


def summarize(names: list[str], sums: list[float], counts: list[float]) -> dict:
    """The set's total (token-weighted over the same tokens), its macro mean, and a row per domain."""
    per_domain = {}
    for name, s, n in zip(names, sums, counts):
        loss = s / n if n else math.nan
        per_domain[name] = {"loss": loss, "ppl": math.exp(min(loss, 700.0)) if n else math.nan, "tokens": int(n)}
    tokens = sum(counts)
    total = sum(sums) / tokens if tokens else math.nan
    measured = [r["loss"] for r in per_domain.values() if r["tokens"]]
    return {"loss": total, "ppl": math.exp(min(total, 700.0)) if tokens else math.nan, "tokens": int(tokens),
            "macro_loss": sum(measured) / len(measured) if measured else math.nan, "domains": per_domain}
