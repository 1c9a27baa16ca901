"""Elastic resume: a ZeRO 1-3 run stopped on one world size or ZeRO stage continues on another through
DeepSpeed's universal checkpoint, with the weights and Adam moments bitwise as saved, the schedule,
step, tokens and data stream continuing exactly, and the losses those of an uninterrupted run.

Each chain trains 8 steps in legs (2 ranks, then 1, then 2 again; the ZeRO 2 chain also turns optimizer
offload on and off and ends on ZeRO 3, the ZeRO 3 chain ends on ZeRO 1),
under a probe (tests/elastic_probe) that records the windows each rank reads and, on rank 0, the full
fp32 weights, Adam moments and LR right before each save and right after each resume loads.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from continual_pt import layout
from continual_pt.checkpoint import elastic, integrity, refs
from tests import train_support as ts

pytestmark = pytest.mark.slow

PROBE = Path(__file__).parent / "elastic_probe"
MAX_STEPS = 8
# (world size, ds_config, steps) per leg; the global batch stays 8 sequences (grad_accum = 4 / ranks).
# The ZeRO 2 chain also turns optimizer offload on (same ranks and stage: a plain load into DeepSpeed's
# CPU Adam) and off again together with 1 -> 2 ranks; the ZeRO 3 chain ends on ZeRO 1.
CHAINS = {
    "zero1": [(2, "zero1", 3), (1, "zero1", 3), (2, "zero1", 2)],
    "zero2": [(2, "zero2", 2), (1, "zero2", 2), (1, "zero2_offload", 1), (2, "zero2", 1), (2, "zero3", 2)],
    "zero3": [(2, "zero3", 3), (1, "zero3", 3), (2, "zero1", 2)],
}
# The optimizer-group keys both torch's AdamW and DeepSpeed's CPU Adam have: across an offload switch
# only these can be compared (each class keeps its own flags besides).
SHARED_GROUP_KEYS = ("lr", "betas", "eps", "weight_decay")


def stage(ds_config: str) -> int:
    return int(ds_config[len("zero")])


def converts(before: tuple[int, str, int], after: tuple[int, str, int]) -> bool:
    """Whether resuming leg `before`'s checkpoint as leg `after` goes through the universal format."""
    return before[0] != after[0] or stage(before[1]) != stage(after[1])


def probe_env(probe_dir: Path, tag: str) -> dict[str, str]:
    e = ts.env()
    e["PATH"] = str(Path(sys.executable).parent) + os.pathsep + e.get("PATH", "")
    e["PYTHONPATH"] = str(PROBE) + os.pathsep + e["PYTHONPATH"]
    e["CPT_PROBE_DIR"], e["CPT_PROBE_TAG"] = str(probe_dir), tag
    e["OMP_NUM_THREADS"] = "1"
    return e


def run(cfg: Path, overrides: list[str], world_size: int, probe_dir: Path, tag: str,
        expect: int = 0) -> subprocess.CompletedProcess:
    probe_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(ts.train_command(cfg, overrides, world_size), env=probe_env(probe_dir, tag),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == expect, f"{tag}: exit {proc.returncode}\n{proc.stderr[-6000:]}"
    return proc


def leg_overrides(name: str, world_size: int, ds_config: str, steps: int, last: bool) -> list[str]:
    out = [f"name={name}", f"train.ds_config={ds_config}", f"train.grad_accum={4 // world_size}"]
    return out if last else [*out, f"train.stop_after_steps={steps}"]


def write_cfg(root: Path, world: dict[str, Path]) -> Path:
    return ts.write_config(root / "run.yaml", world, root / "runs",
                           data={"train": {"code": {"path": str(world["code"]), "weight": 0.8},
                                           "prose": {"path": str(world["prose"]), "weight": 0.2}},
                                 "seq_len": 16},
                           train={"max_steps": MAX_STEPS, "micro_batch_size": 2, "grad_accum": 2,
                                  "precision": "fp32", "ds_config": "zero2", "log_every": 1},
                           checkpoint={"every_steps": 0, "keep_last": 10}, eval={"sets": {}})


def global_windows(probe_dir: Path, tag: str, world_size: int) -> list[list[int]]:
    """The (source, window) rows of every global micro-batch of one leg, in order: rank 0's rows of
    micro-batch i, then rank 1's, ..."""
    per_rank = [[json.loads(line) for line in (probe_dir / f"windows-{tag}-rank{r}.jsonl").read_text().splitlines()]
                for r in range(world_size)]
    assert len({len(rows) for rows in per_rank}) == 1, f"{tag}: ranks read different numbers of micro-batches"
    return [row for i in range(len(per_rank[0])) for r in range(world_size) for row in per_rank[r][i]]


def train_straight(root: Path, world: dict[str, Path]) -> dict:
    """An uninterrupted 8-step run on 2 ranks (ZeRO 2): its run dir, windows and config."""
    cfg = write_cfg(root, world)
    run(cfg, ["name=straight"], 2, root / "probe", "straight")
    return {"run_dir": root / "runs" / "straight", "windows": global_windows(root / "probe", "straight", 2),
            "cfg": cfg}


def train_chain(name: str, root: Path, world: dict[str, Path]) -> dict:
    """One chain of legs trained to step 8: its run dir, probe dir, legs and each leg's stderr."""
    cfg = write_cfg(root, world)
    legs, stderr, step = CHAINS[name], [], 0
    for i, (world_size, ds_config, steps) in enumerate(legs):
        last = i == len(legs) - 1
        proc = run(cfg, leg_overrides("chain", world_size, ds_config, steps, last), world_size, root / "probe",
                   f"leg{i}", expect=0 if last else 75)
        stderr.append(proc.stderr)
        step += steps
    assert step == MAX_STEPS
    return {"name": name, "run_dir": root / "runs" / "chain", "probe": root / "probe", "legs": legs,
            "stderr": stderr, "cfg": cfg}


def selected_chains(request) -> list[str]:
    """The chains this module's selected tests use (all three, unless -k or a node id picks fewer)."""
    params = [getattr(item, "callspec", None) for item in request.session.items
              if getattr(item, "module", None) is request.module]
    return sorted({spec.params["chain"] for spec in params if spec is not None and "chain" in spec.params})


@pytest.fixture(scope="module")
def started(request, world, tmp_path_factory):
    """The straight run and each chain this session selected, every one trained in its own folder, two
    at a time: a leg leaves a core of two idle for seconds (the launchers' start, one rank's save), which
    the other fills. Each is a Future; `.result()` waits for it and raises what it raised."""
    pool = ThreadPoolExecutor(max_workers=2)
    jobs = {"straight": pool.submit(train_straight, tmp_path_factory.mktemp("elastic-straight"), world)}
    for name in selected_chains(request):
        jobs[name] = pool.submit(train_chain, name, tmp_path_factory.mktemp(f"elastic-{name}"), world)
    pool.shutdown(wait=False)
    yield jobs
    for job in jobs.values():      # none left training past the module (after a failure under -x, say)
        if not job.cancel():
            job.exception()


@pytest.fixture(scope="module")
def straight(started):
    """An uninterrupted 8-step run on 2 ranks (ZeRO 2): its run dir, windows and config."""
    return started["straight"].result()


@pytest.fixture(scope="module", params=sorted(CHAINS))
def chain(request, started):
    """One chain of legs trained to step 8: its run dir, probe dir, legs and each leg's stderr."""
    return started[request.param].result()


def test_weights_and_adam_moments_load_bitwise_as_saved(chain):
    step = 0
    for i, (_, ds_config, steps) in enumerate(chain["legs"][:-1]):
        step += steps
        saved = torch.load(chain["probe"] / f"saved-leg{i}-step{step}.pt")
        loaded = torch.load(chain["probe"] / f"loaded-leg{i + 1}-step{step}.pt")
        assert saved.keys() == loaded.keys()
        assert loaded["lr"] == saved["lr"], f"leg {i + 1}: LR {loaded['lr']} after loading, {saved['lr']} saved"
        if ("offload" in ds_config) == ("offload" in chain["legs"][i + 1][1]):
            assert loaded["groups"] == saved["groups"], f"leg {i + 1}: optimizer groups differ"
        else:
            assert [{k: g[k] for k in SHARED_GROUP_KEYS} for g in loaded["groups"]] == \
                [{k: g[k] for k in SHARED_GROUP_KEYS} for g in saved["groups"]], f"leg {i + 1}: groups differ"
        for key in saved.keys() - {"lr", "groups"}:
            for what, a, b in zip(("fp32 weights", "exp_avg", "exp_avg_sq"), saved[key], loaded[key]):
                assert torch.equal(a, b), f"{chain['name']} leg {i + 1} ({ds_config}): {key} {what} differ"
        assert any(saved[k][1].abs().sum() > 0 for k in saved.keys() - {"lr", "groups"}), "Adam moments are all 0"


def test_step_lr_tokens_continue_and_losses_match_an_uninterrupted_run(chain, straight):
    ra, rb = ts.train_records(straight["run_dir"]), ts.train_records(chain["run_dir"])
    assert [r["step"] for r in rb] == list(range(1, MAX_STEPS + 1))
    assert [r["lr"] for r in rb] == [r["lr"] for r in ra]
    assert [r["tokens"] for r in rb] == [r["tokens"] for r in ra]
    diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(ra, rb))
    print(f"{chain['name']}: largest loss difference to the uninterrupted 2-rank run: {diff:.3g}")
    assert diff < 1e-3


def test_the_data_stream_continues_without_a_window_repeated_or_skipped(chain, straight):
    windows = []
    for i, (world_size, _, _) in enumerate(chain["legs"]):
        windows += global_windows(chain["probe"], f"leg{i}", world_size)
    assert windows == straight["windows"]
    assert len(windows) == MAX_STEPS * 8


def test_each_elastic_resume_says_once_what_does_not_carry_and_converts_once(chain):
    legs = chain["legs"]
    for before, after, err in zip(legs, legs[1:], chain["stderr"][1:]):
        if not converts(before, after):   # an offload switch alone loads as saved, saying nothing
            assert "elastic resume:" not in err and "universal" not in err, err[-3000:]
            continue
        assert err.count("elastic resume:") == 1, err[-3000:]
        assert "each rank's RNG stream" in err and "converted now" in err
    root = chain["run_dir"] / "checkpoints"
    converted = sorted(p.name for p in (root / layout.UNIVERSAL).iterdir())
    kept = {r.tag for r in refs.list_committed(root)}
    assert set(converted) <= kept and len(converted) == sum(map(converts, legs, legs[1:]))
    for tag in converted:
        assert elastic.usable(root / tag) == root / layout.UNIVERSAL / tag
        refs.verify(root / tag)   # the originals still match their markers


# --------------------------------------------------------------------------- refusal, conversion ahead, kill


def copy_checkpoint(source_run: Path, tag: str, dest_run: Path) -> Path:
    """A fresh run dir holding one committed checkpoint of another run (no conversion)."""
    dest = dest_run / "checkpoints" / tag
    shutil.copytree(source_run / "checkpoints" / tag, dest)
    return dest


def snapshot(tag_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(tag_dir)): integrity.checksum(p) for p in sorted(tag_dir.rglob("*")) if p.is_file()}


def test_elastic_never_refuses_with_the_message_of_before(straight, tmp_path):
    cfg = straight["cfg"]
    copy_checkpoint(straight["run_dir"], "global_step8", tmp_path / "runs" / "copy")
    proc = run(cfg, ["name=copy", f"out_dir={tmp_path / 'runs'}", "train.max_steps=10", "train.grad_accum=4",
                     "checkpoint.elastic=never"], 1, tmp_path / "probe", "never", expect=2)
    tag = tmp_path / "runs" / "copy" / "checkpoints" / "global_step8"
    assert (f"checkpoint {tag} was written by 2 ranks with ZeRO stage 2; this run has 1 ranks. Resume with 2 "
            "ranks, or start a new phase from its weights (checkpoint.init)") in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tag.parent / layout.UNIVERSAL).exists()


def test_a_killed_conversion_is_never_trusted_and_the_original_never_changes(straight, tmp_path):
    run_dir = tmp_path / "runs" / "copy"
    tag = copy_checkpoint(straight["run_dir"], "global_step8", run_dir)
    before = snapshot(tag)
    base = tag.parent / layout.UNIVERSAL
    proc = subprocess.Popen([sys.executable, "-m", "continual_pt.cli", "checkpoint", "convert", str(tag)],
                            env=probe_env(tmp_path / "probe", "kill"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    while proc.poll() is None and not (base.is_dir() and any(base.glob(f"{elastic.TEMPORARY}*/*/zero"))):
        time.sleep(0.002)
    proc.kill()
    proc.wait()
    assert proc.returncode == -9, "the conversion ended before it could be killed"
    assert elastic.usable(tag) is None and not (base / tag.name).exists()
    assert snapshot(tag) == before
    # cpt checkpoint info tells, the next conversion starts over, and a resume reuses it.
    info = subprocess.run([sys.executable, "-m", "continual_pt.cli", "checkpoint", "info", str(run_dir)],
                          env=ts.env(), capture_output=True, text=True)
    assert "universal conversion: none" in info.stdout, info.stdout + info.stderr
    again = subprocess.run([sys.executable, "-m", "continual_pt.cli", "checkpoint", "convert", str(run_dir)],
                           env=ts.env(), capture_output=True, text=True)
    assert again.returncode == 0 and f"to {base / tag.name}" in again.stdout, again.stdout + again.stderr
    assert elastic.usable(tag) == base / tag.name and not list(base.glob(f"{elastic.TEMPORARY}*"))
    assert snapshot(tag) == before
    resumed = run(straight["cfg"], ["name=copy", f"out_dir={tmp_path / 'runs'}", "train.max_steps=9",
                                    "train.grad_accum=4"], 1, tmp_path / "probe", "reuse")
    assert "converted by an earlier resume" in resumed.stderr and "converted now" not in resumed.stderr
    assert snapshot(tag) == before
