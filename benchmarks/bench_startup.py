"""Start-up time of `cpt --help` and `cpt config`: this tree against another checkout, paired.

    git worktree add /tmp/cpt-before <commit>              # the checkout to compare with
    python benchmarks/bench_startup.py --baseline /tmp/cpt-before

Each round runs every command once from each tree (`python -m continual_pt.cli ...` with the tree
first on PYTHONPATH), in an order that alternates between rounds, so that both trees meet the
same load; the table gives the median wall time of each and the median of the per-round ratios
(this tree / baseline). `cpt config` resolves the shipped quickstart config.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMANDS = {"cpt --help": ["--help"],
            "cpt config": ["config", "--config", "configs/quickstart/pretrain.yaml", "train.max_steps=10"]}


def seconds(tree: Path, args: list[str]) -> float:
    """Wall time of one `python -m continual_pt.cli ARGS` run from `tree`."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "continual_pt.cli", *args], cwd=tree, env=env,
                          capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{tree}: cpt {' '.join(args)} exited {proc.returncode}\n{proc.stderr[-2000:]}")
    return elapsed


def measure(baseline: Path, rounds: int) -> dict[str, dict[str, list[float]]]:
    """{command: {"this": [s...], "baseline": [s...]}}, one of each per round, the order alternating."""
    times = {name: {"this": [], "baseline": []} for name in COMMANDS}
    for _ in range(2):   # warm the file cache and the .pyc files of both trees
        for args in COMMANDS.values():
            seconds(REPO, args), seconds(baseline, args)
    for i in range(rounds):
        for name, args in COMMANDS.items():
            order = [("this", REPO), ("baseline", baseline)]
            for label, tree in order if i % 2 == 0 else order[::-1]:
                times[name][label].append(seconds(tree, args))
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, type=Path, help="another checkout of the repository")
    parser.add_argument("--rounds", type=int, default=7, help="paired runs per command (default 7)")
    args = parser.parse_args()
    times = measure(args.baseline.resolve(), args.rounds)
    print(f"{'command':<14}{'this (ms)':>11}{'baseline (ms)':>15}{'ratio':>8}   (medians of {args.rounds} pairs)")
    for name, t in times.items():
        ratio = statistics.median(a / b for a, b in zip(t["this"], t["baseline"]))
        print(f"{name:<14}{statistics.median(t['this']) * 1e3:>11.0f}{statistics.median(t['baseline']) * 1e3:>15.0f}"
              f"{ratio:>8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
