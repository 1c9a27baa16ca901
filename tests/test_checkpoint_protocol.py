"""The commit protocol on disk, without an engine: what counts as committed, partial or corrupt."""

from __future__ import annotations

import json

import pytest

from continual_pt import layout
from continual_pt.checkpoint import checkpointer, refs
from continual_pt.errors import UserError


def fake_checkpoint(root, step, committed=True, extra=b"weights"):
    path = root / layout.tag_for(step)
    path.mkdir(parents=True)
    (path / "mp_rank_00_model_states.pt").write_bytes(extra)
    if committed:
        files = {"mp_rank_00_model_states.pt": len(extra)}
        (path / layout.MARKER).write_text(json.dumps({"step": step, "files": files}))
    return path


def test_newest_committed_ignores_partial_and_latest(tmp_path):
    root = tmp_path / "checkpoints"
    fake_checkpoint(root, 10)
    fake_checkpoint(root, 20)
    fake_checkpoint(root, 30, committed=False)
    (root / layout.LATEST).write_text("global_step30")  # what a non-atomic writer could leave
    assert [r.step for r in refs.list_committed(root)] == [10, 20]
    assert refs.newest_committed(root).step == 20
    assert refs.resolve(tmp_path).step == 20        # a run dir
    assert refs.resolve(root).step == 20            # its checkpoints dir


def test_naming_a_partial_or_corrupt_checkpoint_is_an_error(tmp_path):
    root = tmp_path / "checkpoints"
    partial = fake_checkpoint(root, 30, committed=False)
    with pytest.raises(UserError, match=r"global_step30 is partial: it has no COMMITTED.json"):
        refs.resolve(partial)
    good = fake_checkpoint(root, 40)
    (good / "mp_rank_00_model_states.pt").write_bytes(b"trunc")
    with pytest.raises(UserError, match=r"is corrupt: mp_rank_00_model_states.pt has 5 bytes, the commit "
                                        r"marker recorded 7"):
        refs.resolve(good)
    (good / "mp_rank_00_model_states.pt").unlink()
    with pytest.raises(UserError, match="is partial: mp_rank_00_model_states.pt is missing"):
        refs.verify(good)
    with pytest.raises(UserError, match="does not exist"):
        refs.resolve(tmp_path / "nowhere")
    only_partial = tmp_path / "other"
    fake_checkpoint(only_partial / "checkpoints", 5, committed=False)
    with pytest.raises(UserError, match="no committed checkpoint"):
        refs.resolve(only_partial)


def test_prune_keeps_last_k_and_drops_stale_partials(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        fake_checkpoint(root, step)
    fake_checkpoint(root, 5, committed=False)   # older than nothing yet: a save in progress is kept
    fake_checkpoint(root, 0, committed=False)   # a stale partial older than the newest committed
    checkpointer.Checkpointer(root, keep_last=2, rank=0, world_size=1).prune()
    assert sorted(p.name for p in root.iterdir()) == ["global_step3", "global_step4", "global_step5"]


def test_is_ours(tmp_path):
    run = tmp_path / "run"
    fake_checkpoint(run / "checkpoints", 3)
    assert refs.is_ours(run)
    assert refs.is_ours(run / "checkpoints" / "global_step3")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert not refs.is_ours(hf)
    assert not refs.is_ours("EleutherAI/pythia-410m@step143000")
