"""Checkpoint safety through real `cpt train` processes: a resume from an older checkpoint branches
the run, a checkpoint corrupted in place is refused with the newest intact one named, a disk that
fills during a save ends the run with exit 2 and a plain message, and so does one rank's full disk
or quota on every rank, at once."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from continual_pt import layout
from continual_pt.checkpoint import refs
from tests import train_support as ts
from tests.helpers import free_port
from tests.test_checkpoint_safety import MODEL, flip_one_byte, small_disk

PROBE = Path(__file__).parent / "elastic_probe"

pytestmark = pytest.mark.slow


def test_branching_then_corruption_through_real_runs(world, tmp_path):
    cfg = ts.write_config(tmp_path / "run.yaml", world, tmp_path / "runs",
                          train={"max_steps": 8, "micro_batch_size": 2, "grad_accum": 2, "precision": "fp32",
                                 "ds_config": "zero0", "log_every": 1},
                          checkpoint={"every_steps": 2, "keep_last": 3}, eval={"sets": {}})
    root = tmp_path / "runs" / "r" / "checkpoints"
    ts.train(cfg, ["name=r"])
    old = {s: (root / f"global_step{s}" / MODEL).read_bytes() for s in (6, 8)}
    proc = ts.train(cfg, ["name=r", f"checkpoint.resume={root / 'global_step4'}"])
    (aside,) = (root / "branches").iterdir()
    assert f"moved global_step6, global_step8 aside to {aside}" in proc.stderr
    assert f"start=resume from {root / 'global_step4'}, step 4/8" in proc.stderr
    # The abandoned branch is kept whole; the live one re-saved steps 6 and 8 cleanly.
    for step in (6, 8):
        assert (refs.verify(aside / f"global_step{step}").path / MODEL).read_bytes() == old[step]
    assert [refs.verify(r.path).step for r in refs.list_committed(root)] == [4, 6, 8]
    flip_one_byte(root / "global_step8" / MODEL, at=1000)
    proc = ts.train(cfg, ["name=r"], expect=2)
    assert (f"cpt train: error: checkpoint {root / 'global_step8'} is corrupt: {MODEL} does not match its "
            f"checksum in the commit marker") in proc.stderr
    assert (f"the newest intact checkpoint is {root / 'global_step6'}: resume from it with "
            f"checkpoint.resume={root / 'global_step6'}") in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_disk_full_during_a_real_save_exits_2_with_the_path(world, tmp_path):
    with small_disk(tmp_path / "disk", "400k") as disk:   # the config and metrics fit, a checkpoint does not
        cfg = ts.write_config(tmp_path / "run.yaml", world, disk / "runs",
                              train={"max_steps": 4, "micro_batch_size": 2, "grad_accum": 1, "precision": "fp32",
                                     "ds_config": "zero0", "log_every": 1}, eval={"sets": {}})
        proc = ts.train(cfg, ["name=r"], expect=2)
        root = disk / "runs" / "r" / "checkpoints"
        # DeepSpeed's torch.save fails first; torch's zip writer names no errno
        assert (f"cpt train: error: disk full or quota exceeded while saving checkpoint {root / 'global_step4'}: "
                in proc.stderr)
        assert "there is no earlier committed checkpoint" in proc.stderr and "Traceback" not in proc.stderr
        assert not (root / "global_step4").exists()


def rank_processes(cfg: Path, overrides: list[str], world_size: int, logs: Path,
                   **extra: str) -> list[subprocess.Popen]:
    """Each rank a `python -m continual_pt.train` of its own, as srun or one launcher per node starts them:
    nothing ends one rank because another ended (a launcher on one node does so for its own ranks only)."""
    port = str(free_port())
    procs = []
    for rank in range(world_size):
        e = {**ts.env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, **extra}
        e["PYTHONPATH"] = str(PROBE) + os.pathsep + e["PYTHONPATH"]
        with open(logs / f"rank{rank}.log", "w") as log:
            procs.append(subprocess.Popen(ts.train_command(cfg, overrides), env=e, stdout=subprocess.DEVNULL,
                                          stderr=log, text=True))
    return procs


def logged_step(run_dir: Path) -> int:
    records = ts.train_records(run_dir) if (run_dir / "metrics.jsonl").exists() else []
    return records[-1]["step"] if records else 0


def test_a_full_disk_on_one_rank_ends_every_rank_with_exit_2_at_once_and_a_rerun_resumes(world, tmp_path):
    """ZeRO 2, two ranks: at step 4's save, rank 1's node refuses its writes (its optimizer shard, inside
    DeepSpeed's save, first) as a quota does, torch naming no errno."""
    cfg = ts.write_config(tmp_path / "run.yaml", world, tmp_path / "runs",
                          train={"max_steps": 4, "micro_batch_size": 2, "grad_accum": 1, "precision": "fp32",
                                 "ds_config": "zero2", "log_every": 1},
                          checkpoint={"every_steps": 2, "keep_last": 3}, eval={"sets": {}})
    run, root = tmp_path / "runs" / "r", tmp_path / "runs" / "r" / "checkpoints"
    procs = rank_processes(cfg, ["name=r"], 2, tmp_path, CPT_PROBE_FULL_DISK="1:4:zip")
    try:
        deadline = time.monotonic() + 300
        while logged_step(run) < 4:
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
                [(p.poll(), (tmp_path / f"rank{r}.log").read_text()[-3000:]) for r, p in enumerate(procs)]
            time.sleep(0.05)
        fault = time.monotonic()   # step 4 is logged; its save begins
        statuses = [p.wait(timeout=max(1.0, fault + 60 - time.monotonic())) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    ended = time.monotonic() - fault
    logs = [(tmp_path / f"rank{r}.log").read_text() for r in range(2)]
    assert statuses == [2, 2], logs
    assert ended < 60, ended
    step4 = root / "global_step4"
    for log in logs:   # every rank says it, the same way
        assert (f"cpt train: error: disk full or quota exceeded while saving checkpoint {step4}: rank 1 on "
                f"{socket.gethostname()} could not write zero_pp_rank_1_mp_rank_00_optim_states.pt (") in log, log
        assert (f"the partial save was removed and the committed {root / 'global_step2'} is intact; free some space "
                "or raise the quota (or move out_dir) and run again") in log, log
        assert "Traceback" not in log, log
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["global_step2"]   # nothing partial, aside
    assert (root / layout.LATEST).read_text() == "global_step2"
    refs.verify(root / "global_step2")
    proc = ts.train(cfg, ["name=r"], world_size=2)   # the disk has room again
    assert f"start=resume from {root / 'global_step2'}, step 2/4" in proc.stderr
    assert [r.step for r in refs.list_committed(root)] == [2, 4]
