"""Shared pieces of the training tests: a small two-corpus world, run commands, and readers."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import yaml

from tests.helpers import REPO, free_port

WORDS_A = ("def return import class self lambda yield while for if else try except with as pass "
           "None True False print range len list dict").split()
WORDS_B = ("and the of unto he that shall lord they his in him not them is be for my thou thy was "
           "which said god").split()


def write_corpus(path: Path, words: list[str], n_docs: int, seed: int) -> Path:
    """A jsonl of `n_docs` short documents drawn from `words`."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n_docs):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(20, 80)))
            f.write(json.dumps({"text": f"{i}: {text}"}) + "\n")
    return path


def make_world(root: Path, vocab_size: int = 300) -> dict[str, Path]:
    """A trained BPE tokenizer and two prepared datasets ('code' upstream, 'prose' downstream)."""
    from continual_pt.cli import main

    root.mkdir(parents=True, exist_ok=True)
    a = write_corpus(root / "a.jsonl", WORDS_A, 600, seed=1)
    b = write_corpus(root / "b.jsonl", WORDS_B, 600, seed=2)
    tok = root / "tokenizer"
    assert main(["tokenizer", "train", "--source", str(a), "--source", str(b), "--vocab-size", str(vocab_size),
                 "--out", str(tok)]) == 0
    paths = {"tokenizer": tok}
    for name, src in (("code", a), ("prose", b)):
        out = root / name
        assert main(["prepare", "--source", str(src), "--tokenizer", str(tok), "--out", str(out),
                     "--val-fraction", "0.1", "--workers", "1", "--quiet"]) == 0
        paths[name] = out
    return paths


def make_mixed(root: Path, world: dict[str, Path], *options: str) -> Path:
    """A dataset of the world's tokenizer whose documents come from three domains (meta.source: code,
    prose and both), shuffled, prepared with --domain-field (30% val; `options` add to cpt prepare's)."""
    from continual_pt.cli import main

    root.mkdir(parents=True, exist_ok=True)
    code = [json.loads(line)["text"] for line in (world["tokenizer"].parent / "a.jsonl").open()]
    prose = [json.loads(line)["text"] for line in (world["tokenizer"].parent / "b.jsonl").open()]
    docs = [{"text": t, "meta": {"source": "code"}} for t in code[:300]] + \
           [{"text": t, "meta": {"source": "prose"}} for t in prose[:300]] + \
           [{"text": a + " " + b, "meta": {"source": "both"}} for a, b in zip(code[300:340], prose[300:340])]
    random.Random(0).shuffle(docs)
    (root / "mixed.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    assert main(["prepare", "--source", str(root / "mixed.jsonl"), "--tokenizer", str(world["tokenizer"]),
                 "--out", str(root / "mixed"), "--val-fraction", "0.3", "--domain-field", "meta.source",
                 "--workers", "1", "--quiet", *options]) == 0
    return root / "mixed"


TINY_MODEL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}


def write_config(path: Path, world: dict[str, Path], out_dir: Path, **sections) -> Path:
    """A run config over the world's data with a tiny GPT-NeoX; `sections` update the defaults."""
    cfg = {
        "name": "run", "out_dir": str(out_dir),
        "model": {"config": dict(TINY_MODEL)},
        "data": {"train": {"code": {"path": str(world["code"])}}, "seq_len": 16},
        "train": {"max_steps": 12, "micro_batch_size": 2, "grad_accum": 2, "precision": "fp32",
                  "ds_config": "zero0", "log_every": 1},
        "schedule": {"name": "cosine", "max_lr": 3.0e-3, "warmup": 3},
        "eval": {"sets": {"code": str(world["code"]), "prose": str(world["prose"])}, "tokens": 512,
                 "every_steps": 6},
        "checkpoint": {"every_steps": 0},
        "log": {"progress": False, "tensorboard": False},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    path.write_text(yaml.safe_dump(cfg))
    return path


def env(threads: int | None = 1) -> dict[str, str]:
    """The environment of a training process; `threads` None leaves torch its own thread count."""
    e = dict(os.environ)
    e.pop("RANK", None)
    e.pop("WORLD_SIZE", None)
    e["MASTER_PORT"] = str(free_port())
    e["PYTHONPATH"] = str(REPO)
    e["PYTHONUNBUFFERED"] = "1"
    # Tiny models train fastest on one thread, above all beside the suite's other worker; every run a
    # test compares is trained alike (CPU float sums depend on the thread count).
    if threads is None:
        e.pop("OMP_NUM_THREADS", None)
    else:
        e["OMP_NUM_THREADS"] = str(threads)
    return e


def train_command(config: Path, overrides: list[str], world_size: int = 1, launcher: str = "deepspeed") -> list[str]:
    if world_size == 1:
        return [sys.executable, "-m", "continual_pt.train", "--config", str(config), *overrides]
    if launcher == "deepspeed":
        return ["deepspeed", "--num_gpus", str(world_size), "--master_port", str(free_port()),
                "--module", "continual_pt.train", "--config", str(config), *overrides]
    if launcher == "torchrun":
        return ["torchrun", "--nproc_per_node", str(world_size), "--master_port", str(free_port()),
                "-m", "continual_pt.train", "--config", str(config), *overrides]
    if launcher == "mpirun":
        return ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", str(world_size),
                sys.executable, "-m", "continual_pt.train", "--config", str(config), *overrides]
    raise ValueError(launcher)


def train(config: Path, overrides: list[str] = (), world_size: int = 1, launcher: str = "deepspeed",
          expect: int = 0, timeout: int = 300, threads: int | None = 1) -> subprocess.CompletedProcess:
    """Run `python -m continual_pt.train` (under a launcher when world_size > 1) and check its status."""
    bin_dir = str(Path(sys.executable).parent)
    e = env(threads)
    e["PATH"] = bin_dir + os.pathsep + e.get("PATH", "")
    proc = subprocess.run(train_command(config, list(overrides), world_size, launcher), env=e,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == expect, f"exit {proc.returncode} (expected {expect})\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Wait until `proc` (stderr piped) has logged training step `step` in run_dir; fail if it ends first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        records = train_records(run_dir) if (run_dir / "metrics.jsonl").exists() else []
        if records and records[-1]["step"] >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.returncode}\n{proc.stderr.read()[-4000:]}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"{run_dir} did not reach step {step} in {timeout} s")


def train_records(run_dir: Path, kind: str = "train") -> list[dict]:
    from continual_pt.results.records import read_metrics

    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind", "train") == kind]


def final_weights(run_dir: Path) -> dict:
    from continual_pt.checkpoint import refs, weights

    return weights.consolidated_state_dict(refs.resolve(run_dir))


def _train_once(root: Path, cfg: Path, name: str, overrides: list[str] = ()) -> Path:
    run_dir = root / "runs" / name
    done = root / f".{name}.complete"
    if not done.exists():
        shutil.rmtree(run_dir, ignore_errors=True)   # an interrupted earlier attempt
        # A tiny model trains fastest on one thread, above all while other processes share the cores.
        previous = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = "1"
        try:
            train(cfg, overrides)
        finally:
            if previous is None:
                os.environ.pop("OMP_NUM_THREADS")
            else:
                os.environ["OMP_NUM_THREADS"] = previous
        done.touch()
    return run_dir


def continual_experiment(root: Path, world: dict[str, Path], rewarm: bool = True) -> dict[str, Path]:
    """A miniature of the paper, each run trained once per `root`: pre-train 12 steps on 'code'
    (checkpoints at 4, 8, 12), then (with `rewarm`) re-warm on 'prose' from its final checkpoint
    with a cosine and a constant LR, evaluating both sets in the loop. Returns the run dirs."""
    runs = root / "runs"
    root.mkdir(parents=True, exist_ok=True)
    pre = write_config(root / "pre.yaml", world, runs, name="pre", checkpoint={"every_steps": 4, "keep_last": 5})
    out = {"pre": _train_once(root, pre, "pre")}
    if not rewarm:
        return out
    phase = {"data": {"train": {"prose": {"path": str(world["prose"])}}, "seq_len": 16},
             "model": {}, "checkpoint": {"init": str(out["pre"]), "every_steps": 4, "keep_last": 5},
             "eval": {"sets": {"code": str(world["code"]), "prose": str(world["prose"])}, "tokens": 512,
                      "every_steps": 2}}
    cosine = write_config(root / "cosine.yaml", world, runs, name="rewarm-cosine",
                          schedule={"name": "cosine", "max_lr": 2.0e-3, "warmup": 2}, **phase)
    constant = write_config(root / "constant.yaml", world, runs, name="constant",
                            schedule={"name": "constant", "max_lr": 3.0e-4, "warmup": 0}, **phase)
    out["cosine"] = _train_once(root, cosine, "rewarm-cosine")
    out["constant"] = _train_once(root, constant, "constant")
    return out


def train_in_background(config: Path, overrides: list[str] = (), world_size: int = 1, launcher: str = "deepspeed",
                        expect: int = 0, timeout: int = 300, threads: int | None = 1) -> Future:
    """`train`, started now in a thread of its own so that its run shares the cores with the caller's next one
    (a lone tiny run leaves a core of two idle). `.result()` waits for it and returns or raises what `train` would."""
    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(train, config, list(overrides), world_size, launcher, expect, timeout, threads)
    pool.shutdown(wait=False)
    return future
