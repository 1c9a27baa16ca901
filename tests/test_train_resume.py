"""Exact, preemption-safe resume: a run stopped and resumed equals a run that never stopped."""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import time

import pytest
import torch

from continual_pt import layout
from continual_pt.checkpoint import refs
from tests import train_support as ts

pytestmark = pytest.mark.slow


def assert_same_run(a, b):
    ra, rb = ts.train_records(a), ts.train_records(b)
    assert [r["step"] for r in ra] == list(range(1, 13))
    assert [r["step"] for r in rb] == list(range(1, 13))
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb]
    assert [r["lr"] for r in ra] == [r["lr"] for r in rb]
    assert [r["tokens"] for r in ra] == [r["tokens"] for r in rb]
    ea = [(r["set"], r["loss"]) for r in ts.train_records(a, "eval")]
    eb = [(r["set"], r["loss"]) for r in ts.train_records(b, "eval")]
    assert ea == eb
    wa, wb = ts.final_weights(a), ts.final_weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


MATRIX = [("zero0", "fp32", 1, "sources"), ("zero2", "bf16", 1, "sources"), ("zero3", "fp32", 1, "sources"),
          ("zero0", "fp32", 2, "sources"), ("zero2", "bf16", 2, "sources"), ("zero3", "fp32", 2, "sources"),
          ("zero1", "fp32", 1, "domains")]


@pytest.mark.parametrize("zero, precision, world_size, mixture", MATRIX,
                         ids=["-".join(map(str, case[:3])) + ("-domains" if case[3] == "domains" else "")
                              for case in MATRIX])
def test_stop_and_resume_is_bitwise_identical(world, tmp_path, zero, precision, world_size, mixture):
    train = {"code": {"path": str(world["code"]), "weight": 0.8}, "prose": {"path": str(world["prose"]), "weight": 0.2}}
    if mixture == "domains":   # one source re-weights two of its three domains: sources mixed/code and mixed/prose
        train = {"code": {"path": str(world["code"]), "weight": 0.5},
                 "mixed": {"path": str(ts.make_mixed(tmp_path, world)), "weight": 0.5,
                           "domains": {"code": 1.0, "prose": 3.0}}}
    cfg = ts.write_config(tmp_path / "run.yaml", world, tmp_path / "runs", data={"train": train, "seq_len": 16},
                          train={"max_steps": 12, "micro_batch_size": 2, "grad_accum": 2, "precision": precision,
                                 "ds_config": zero, "log_every": 1})
    # One rank runs at torch's own thread count (a launcher of two sets one per rank).
    threads = None if world_size == 1 else 1
    straight = ts.train_in_background(cfg, ["name=straight"], world_size, threads=threads)   # alongside the stopped run
    ts.train(cfg, ["name=stopped", "train.stop_after_steps=6"], world_size, expect=75, threads=threads)
    stopped = tmp_path / "runs" / "stopped"
    assert [r.step for r in refs.list_committed(stopped / "checkpoints")] == [6]
    resumed = ts.train(cfg, ["name=stopped"], world_size, threads=threads)
    straight.result()
    assert_same_run(tmp_path / "runs" / "straight", stopped)
    if mixture == "domains":
        shares = re.findall(r"^  (\S+) +([\d.]+)% ", resumed.stderr, re.MULTILINE)
        assert shares == [("code", "50.00"), ("mixed/code", "12.50"), ("mixed/prose", "37.50")], resumed.stderr


def test_resume_with_another_micro_batch_continues_the_data_stream(world, tmp_path):
    """Data position is state: halving the micro batch and doubling accumulation sees the same tokens."""
    cfg = ts.write_config(tmp_path / "run.yaml", world, tmp_path / "runs")
    a = ts.train_in_background(cfg, ["name=a"])
    ts.train(cfg, ["name=b", "train.stop_after_steps=6"], expect=75)
    ts.train(cfg, ["name=b", "train.micro_batch_size=1", "train.grad_accum=4"])
    a.result()
    ra, rb = ts.train_records(tmp_path / "runs" / "a"), ts.train_records(tmp_path / "runs" / "b")
    assert [r["tokens"] for r in ra] == [r["tokens"] for r in rb]
    assert [r["lr"] for r in ra] == [r["lr"] for r in rb]
    # same data, summed in another order: equal up to float rounding
    assert [r["loss"] for r in ra] == pytest.approx([r["loss"] for r in rb], rel=1e-5)


def _wait_for_new_lines(path, lines_before, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and len(path.read_text().splitlines()) > lines_before:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.returncode}\n{proc.stderr.read()[-3000:]}")
        time.sleep(0.01)
    raise AssertionError("run logged nothing in time")


@pytest.fixture(scope="module")
def signal_straight(world, tmp_path_factory):
    """The signal tests' config and its uninterrupted run: one config for both signals, so one straight
    run, started in the background alongside the first signalled run (`.result()` waits for it)."""
    root = tmp_path_factory.mktemp("signal")
    cfg = ts.write_config(root / "run.yaml", world, root / "runs",
                          train={"max_steps": 40, "micro_batch_size": 4, "grad_accum": 4, "precision": "fp32",
                                 "ds_config": "zero1", "log_every": 1},
                          eval={"sets": {}})
    straight = ts.train_in_background(cfg, ["name=straight"])
    yield cfg, root / "runs", straight
    straight.exception()   # not left training past the module, whatever failed


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_signal_saves_commits_and_resumes_to_the_same_numbers(signal_straight, sig):
    cfg, runs, straight = signal_straight
    run_dir = runs / f"signalled-{sig.name}"
    proc = subprocess.Popen(ts.train_command(cfg, [f"name={run_dir.name}"]), env=ts.env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    ts.wait_for_step(run_dir, 3, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    assert f"received {sig.name}" in err
    ref = refs.resolve(run_dir)
    assert 3 <= ref.step < 40
    ts.train(cfg, [f"name={run_dir.name}"])
    straight.result()
    ra, rb = ts.train_records(runs / "straight"), ts.train_records(run_dir)
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb]
    wa, wb = ts.final_weights(runs / "straight"), ts.final_weights(run_dir)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_sigkill_during_saves_never_leaves_latest_on_an_uncommitted_checkpoint(world, tmp_path):
    """Kill at random moments of a run that saves every step; resume always finds the newest committed."""
    cfg = ts.write_config(tmp_path / "run.yaml", world, tmp_path / "runs",
                          train={"max_steps": 400, "micro_batch_size": 1, "grad_accum": 1, "precision": "fp32",
                                 "ds_config": "zero1", "log_every": 1},
                          checkpoint={"every_steps": 1, "keep_last": 2}, eval={"sets": {}})
    run_dir = tmp_path / "runs" / "killed"
    rng = random.Random(0)
    caught_mid_save = progressed = 0
    previous_step = 0
    metrics = run_dir / "metrics.jsonl"
    for trial in range(10):
        lines_before = len(metrics.read_text().splitlines()) if metrics.exists() else 0
        proc = subprocess.Popen(ts.train_command(cfg, ["name=killed"]), env=ts.env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        _wait_for_new_lines(metrics, lines_before, proc)   # this process has trained and saved a step
        time.sleep(rng.uniform(0.0, 0.5))
        proc.kill()
        proc.wait()
        root = run_dir / "checkpoints"
        latest = (root / layout.LATEST).read_text().strip()
        assert refs.is_committed(root / latest), f"trial {trial}: latest -> {latest} is not committed"
        newest = refs.newest_committed(root)
        refs.verify(newest.path)
        partial = [p for p in root.glob("global_step*") if not refs.is_committed(p)]
        caught_mid_save += bool(partial)
        assert newest.step >= previous_step
        records = ts.train_records(run_dir)
        assert records and records[-1]["step"] >= newest.step
        progressed += newest.step > previous_step
        previous_step = newest.step
    # Resume picks the newest committed checkpoint, whatever the last kill left behind.
    proc = ts.train(cfg, ["name=killed", "train.max_steps=" + str(previous_step + 2)])
    assert f"start=resume from {run_dir / 'checkpoints' / layout.tag_for(previous_step)}" in proc.stderr
    print(f"kills inside a save: {caught_mid_save}/10; trials that committed new steps: {progressed}/10")
    assert caught_mid_save >= 1, "no kill landed inside a save: the test did not exercise the protocol"
    assert progressed >= 3, "most trials should commit new steps before they are killed"
    assert json.loads((run_dir / "checkpoints" / layout.tag_for(previous_step + 2) / layout.MARKER)
                      .read_text())["step"] == previous_step + 2
