"""The commit protocol across nodes, simulated on one machine: two real processes over gloo save with
a stand-in engine (one rank's file lost or cut short after it reported it never commits; one rank's
disk full ends the save on both with one message, the committed copy put back), decide the
start on rank 0 alone (ranks that see different markers agree), and a real 2-rank `cpt train` whose
rank 1 resolves the run dir elsewhere fails at start, naming the rank."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from continual_pt import config, layout
from continual_pt.checkpoint import checkpointer, commit, refs
from continual_pt.errors import UserError
from tests import train_support as ts
from tests.helpers import free_port

PROBE = Path(__file__).parent / "elastic_probe"


class ShardEngine:
    """Writes what DeepSpeed's ZeRO save writes on one rank: rank 0 the model states, each rank its shard."""

    device = torch.device("cpu")

    def __init__(self, rank: int):
        self.rank = rank

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool) -> None:
        path = Path(save_dir) / tag
        path.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            (path / "mp_rank_00_model_states.pt").write_bytes(b"model" * 10)
        (path / f"zero_pp_rank_{self.rank}_mp_rank_00_optim_states.pt").write_bytes(b"shard" * (10 + self.rank))


def _worker(rank: int, port: int, out: str, scenario: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # A rank left waiting on one that failed ends within a minute, reported as its error.
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    result = {}
    try:
        result = SCENARIOS[scenario](rank, Path(out))
    except Exception as exc:   # noqa: BLE001  (reported to the test, which asserts on it)
        result = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
    finally:
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))
        dist.destroy_process_group()


def two_ranks(tmp_path: Path, scenario: str) -> list[dict]:
    """Run `scenario` on two processes over gloo; each rank's result (or its error)."""
    mp.start_processes(_worker, args=(free_port(), str(tmp_path), scenario), nprocs=2, start_method="spawn")
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def _save(rank: int, root: Path, step: int) -> dict:
    ckpt = checkpointer.Checkpointer(root, keep_last=5, rank=rank, world_size=2)
    ckpt.save(ShardEngine(rank), step, {"tokens_seen": step, "zero_stage": 2}, {"rank": rank}, {})
    return {"saved": step}


def scenario_short_file(rank: int, out: Path) -> dict:
    """Step 2 saves whole; at step 4 rank 1's shard is cut short after rank 1 reported it, at step 6
    it is gone (as on a node whose files never reached the shared filesystem)."""
    root = out / "checkpoints"
    _save(rank, root, 2)
    report = commit.report

    def damaged(tag_dir: Path, r: int):
        table = report(tag_dir, r)
        shard = tag_dir / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"
        if r == 1 and tag_dir.name == "global_step4":
            shard.write_bytes(shard.read_bytes()[:7])
        if r == 1 and tag_dir.name == "global_step6":
            shard.unlink()
        return table

    commit.report = damaged
    errors = []
    for step in (4, 6):
        try:
            _save(rank, root, step)
        except UserError as exc:
            errors.append(str(exc))
    return {"errors": errors}


@pytest.mark.slow
def test_a_save_with_one_ranks_file_short_or_missing_never_commits(tmp_path):
    results = two_ranks(tmp_path, "short_file")
    assert all("error" not in r for r in results), results
    root = tmp_path / "checkpoints"
    step4, step6 = root / "global_step4", root / "global_step6"
    zero1 = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    assert results[0]["errors"] == [
        f"checkpoint {step4} was not committed: rank 1 wrote {zero1} (55 bytes), but as rank 0 sees the folder "
        f"it is corrupt: {zero1} has 7 bytes, the commit marker recorded 55; every rank must save to one "
        "filesystem that all nodes share (checkpoint kept: the previous committed one)",
        f"checkpoint {step6} was not committed: rank 1 wrote {zero1} (55 bytes), but as rank 0 sees the folder "
        f"it is partial: {zero1} is missing; every rank must save to one filesystem that all nodes share "
        "(checkpoint kept: the previous committed one)"]
    assert results[1]["errors"] == results[0]["errors"]   # every rank says why, not only rank 0
    assert [r.step for r in refs.list_committed(root)] == [2]
    assert (root / layout.LATEST).read_text() == "global_step2"
    assert not step4.exists() and not step6.exists()
    files = refs.verify(root / "global_step2").meta()["files"]
    assert sorted(files) == ["mp_rank_00_model_states.pt", "rank0.pt", "rank1.pt",
                             "zero_pp_rank_0_mp_rank_00_optim_states.pt", zero1]


@pytest.mark.slow
def test_verify_refuses_a_marker_that_lacks_a_ranks_files(tmp_path):
    results = two_ranks(tmp_path, "save_once")
    assert all("error" not in r for r in results), results
    tag = tmp_path / "checkpoints" / "global_step2"
    marker = json.loads((tag / layout.MARKER).read_text())
    assert marker["format_version"] == 3 and marker["world_size"] == 2
    for dropped in ("rank1.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"):
        edited = dict(marker, files={k: v for k, v in marker["files"].items() if k != dropped})
        (tag / layout.MARKER).write_text(json.dumps(edited))
        with pytest.raises(UserError, match=f"is partial: its commit marker lists no {dropped} for a save by 2 ranks"):
            refs.verify(tag, hint=False)


def scenario_save_once(rank: int, out: Path) -> dict:
    return _save(rank, out / "checkpoints", 2)


def scenario_different_markers(rank: int, out: Path) -> dict:
    """Rank 1 sees no committed checkpoint (its view of the marker is stale): the start is rank 0's."""
    from continual_pt.training import session

    if rank == 1:
        refs.newest_committed = lambda root: None
    cfg = config.CheckpointConfig()
    start = session.decide_start(cfg, out)
    refused = None
    if rank == 0:
        refs.verify = lambda *a, **k: (_ for _ in ()).throw(UserError("rank 0 finds the marker damaged"))
    try:
        session.decide_start(cfg, out)
    except UserError as exc:
        refused = str(exc)
    return {"kind": start.kind, "ref": str(start.ref.path) if start.ref else None, "refused": refused}


@pytest.mark.slow
def test_the_start_is_decided_on_rank_0_and_every_rank_follows(tmp_path):
    two_ranks(tmp_path / "save", "save_once")
    run_dir = tmp_path / "save"   # holds checkpoints/global_step2
    (run_dir / "rank0.json").unlink()
    (run_dir / "rank1.json").unlink()
    results = two_ranks(run_dir, "different_markers")
    tag = str(run_dir / "checkpoints" / "global_step2")
    assert results == [{"kind": "resume", "ref": tag, "refused": "rank 0 finds the marker damaged"}] * 2


class FullDiskEngine(ShardEngine):
    """ShardEngine on a node whose disk is full: rank 1's shard goes to /dev/full (the kernel's ENOSPC)."""

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool) -> None:
        if self.rank == 0:
            return super().save_checkpoint(save_dir, tag, client_state, save_latest)
        with open("/dev/full", "wb") as f:
            f.write(b"shard" * 11)


def scenario_full_disk_on_rank_1(rank: int, out: Path) -> dict:
    """Step 2 saves whole; re-saving it (its committed copy moved aside) fails on rank 1 alone."""
    root = out / "checkpoints"
    _save(rank, root, 2)
    ckpt = checkpointer.Checkpointer(root, keep_last=5, rank=rank, world_size=2)
    started = time.monotonic()
    try:
        ckpt.save(FullDiskEngine(rank), 2, {"tokens_seen": 2, "zero_stage": 2}, {"rank": rank}, {})
    except UserError as exc:
        return {"error_message": str(exc), "seconds": time.monotonic() - started}
    return {"saved": 2}


@pytest.mark.slow
def test_a_full_disk_on_one_rank_ends_the_save_on_every_rank_with_the_same_message(tmp_path):
    results = two_ranks(tmp_path, "full_disk_on_rank_1")
    assert all("error" not in r for r in results), results   # neither waited for the other until a timeout
    root = tmp_path / "checkpoints"
    message = (f"no space left on device while saving checkpoint {root / 'global_step2'}: rank 1 on "
               f"{socket.gethostname()} could not write global_step2 (")
    for r in results:
        assert r["error_message"].startswith(message), r
        assert r["error_message"].endswith(f"the partial save was removed and the committed {root / 'global_step2'} "
                                           "is intact; free some space (or move out_dir) and run again"), r
        assert r["seconds"] < 20, r
    assert results[0]["error_message"] == results[1]["error_message"]
    assert sorted(p.name for p in root.iterdir()) == ["global_step2", "latest"]   # the committed copy put back
    assert (root / layout.LATEST).read_text() == "global_step2"
    refs.verify(root / "global_step2")


SCENARIOS = {"short_file": scenario_short_file, "save_once": scenario_save_once,
             "different_markers": scenario_different_markers, "full_disk_on_rank_1": scenario_full_disk_on_rank_1}


@pytest.mark.slow
def test_a_rank_that_does_not_see_rank_0s_run_dir_fails_at_start(world, tmp_path):
    """out_dir is relative and rank 1 works in another directory: as if its run dir were node-local."""
    cfg = ts.write_config(tmp_path / "run.yaml", world, "runs", eval={"sets": {}})
    (tmp_path / "node0").mkdir()
    (tmp_path / "node1").mkdir()
    e = ts.env()
    e["PATH"] = str(Path(sys.executable).parent) + os.pathsep + e.get("PATH", "")
    e["PYTHONPATH"] = str(PROBE) + os.pathsep + e["PYTHONPATH"]
    e["CPT_PROBE_RANK1_CWD"] = str(tmp_path / "node1")
    proc = subprocess.run(ts.train_command(cfg, ["name=split"], 2), env=e, cwd=tmp_path / "node0",
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert (f"the run dir is not shared by every rank: rank 0 on {os.uname().nodename} wrote a file into "
            f"{tmp_path / 'node0' / 'runs' / 'split'}, which rank 1 on {os.uname().nodename} "
            f"({tmp_path / 'node1' / 'runs' / 'split'}) cannot read") in proc.stderr, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "node0" / "runs" / "split").exists()   # the start undid what it created
    assert not (tmp_path / "node1" / "runs" / "split").exists()
