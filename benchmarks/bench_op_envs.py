"""Start times of `cpt train` from two Python environments on one machine, alternating A, B, A, B:
does a start rebuild DeepSpeed's op after the other environment's start?

    python benchmarks/bench_op_envs.py                                # this tree
    git worktree add /tmp/cpt-before <commit>                         # a checkout to compare with
    python benchmarks/bench_op_envs.py --baseline /tmp/cpt-before     # its starts, then this tree's

A is the environment of the Python that runs this script. B, made once in --work, is a second
virtualenv of the same base Python (`venv --without-pip`) with installs of its own of torch,
DeepSpeed and ninja: the files their wheels' RECORD lists, hard-linked where the disk allows (the
same versions at other paths, as a second `pip install` leaves them), and a .pth file that gives
it A's site-packages for everything else.

A start is `python -m continual_pt.cli train` of a tiny model (tests/train_support.py) for two
steps, without evaluation, from the tree (first on PYTHONPATH) with the environment's bin first on
PATH, as an activated virtualenv has it; its time is the wall time of the process, and `built` says
whether it wrote an op's .so. Each tree's starts share a torch cache of their own (XDG_CACHE_HOME
in --work, empty at first), so the first start of each environment builds the op (minutes on a
busy 2-core machine) and ~/.cache is left alone.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
INSTALLED = ("torch", "deepspeed", "ninja")   # installed again in B; the rest is A's


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:   # another file system
        shutil.copy2(src, dst)


def make_env_b(where: Path) -> Path:
    """A second virtualenv at `where` with its own torch, DeepSpeed and ninja; its python."""
    python = where / "bin" / "python"
    if python.exists():
        return python
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    for name in INSTALLED:
        dist = importlib.metadata.distribution(name)
        for file in dist.files or ():
            src = Path(dist.locate_file(file))
            dst = Path(os.path.normpath(site / file))   # bin/ninja is ../../../bin/ninja in RECORD
            if src.is_file() and not dst.exists():
                _link_or_copy(src, dst)
    here = next(p for p in map(Path, sys.path) if p.name == "site-packages" and (p / "torch").is_dir())
    (site / "env_a.pth").write_text(f"{here}\n")
    return python


def write_run_config(work: Path) -> Path:
    """A prepared tiny dataset and a run config of two steps over it."""
    sys.path.insert(0, str(REPO))
    from tests import train_support as ts

    world = ts.make_world(work / "world")
    return ts.write_config(work / "run.yaml", world, work / "runs", train={"max_steps": 2},
                           schedule={"name": "cosine", "max_lr": 3.0e-3, "warmup": 1},
                           eval={"sets": {}, "every_steps": 0})


def built_ops(cache: Path) -> dict[Path, int]:
    """Every op library under torch's cache root, with its modification time."""
    return {so: so.stat().st_mtime_ns for so in (cache / "torch_extensions").glob("*/*/*.so")}


def start(python: Path, tree: Path, config: Path, cache: Path, name: str, log: Path) -> tuple[float, bool]:
    """One `cpt train` start: (wall seconds, whether it built an op)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_EXTENSIONS_DIR", "RANK", "WORLD_SIZE")}
    env.update(PYTHONPATH=str(tree), XDG_CACHE_HOME=str(cache), OMP_NUM_THREADS="1",
               PATH=os.pathsep.join([str(python.parent), env.get("PATH", "")]))
    before = built_ops(cache)
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run([str(python), "-m", "continual_pt.cli", "train", "--config", str(config),
                               f"name={name}"], cwd=tree, env=env, stdout=out, stderr=subprocess.STDOUT)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{name}: cpt train exited {proc.returncode}; see {log}")
    return elapsed, built_ops(cache) != before


def measure(label: str, tree: Path, pythons: dict[str, Path], config: Path, work: Path, rounds: int) -> None:
    """Alternate starts from the environments, `rounds` each, printing a row per start."""
    cache = work / f"cache-{label}"
    shutil.rmtree(cache, ignore_errors=True)
    for i in range(rounds):
        for env_name, python in pythons.items():
            name = f"{label}-{env_name}{i + 1}"
            seconds, built = start(python, tree, config, cache, name, work / f"{name}.log")
            print(f"{label:<10}{env_name:>5}{i + 1:>7}{seconds:>10.1f}{'yes' if built else 'no':>7}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, help="another checkout of the repository, measured first")
    parser.add_argument("--rounds", type=int, default=2, help="starts per environment and tree (default 2)")
    parser.add_argument("--work", type=Path, help="where environment B, the data and the caches go "
                                                   "(default: a temporary folder, removed after)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-op-envs-") as tmp:
        work = (args.work or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        pythons = {"A": Path(sys.executable), "B": make_env_b(work / "env-b")}
        config = write_run_config(work)
        trees = ([("baseline", args.baseline.resolve())] if args.baseline else []) + [("this", REPO)]
        print(f"{'tree':<10}{'env':>5}{'start':>7}{'seconds':>10}{'built':>7}", flush=True)
        for label, tree in trees:
            measure(label, tree, pythons, config, work, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
