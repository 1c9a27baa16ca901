"""Checkpoint safety through real `cpt train` processes: a resume from an older checkpoint branches
the run, a checkpoint corrupted in place is refused with the newest intact one named, and a disk
that fills during a save ends the run with exit 2 and a plain message."""

from __future__ import annotations

import pytest

from continual_pt.checkpoint import refs
from tests import train_support as ts
from tests.test_checkpoint_safety import MODEL, flip_one_byte, small_disk

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
