"""Nothing lost, nothing silent, in-process with a stand-in engine: re-saving a committed step,
branching on resume from an older checkpoint, checksums, keep-every-N, a full disk, a quota that
torch reports without an errno, export."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import torch

from continual_pt import cli, config, layout
from continual_pt.checkpoint import checkpointer, integrity, refs
from continual_pt.errors import UserError
from continual_pt.runtime.distributed import DistEnv
from continual_pt.training.session import Start, open_session, plan_start, settle_start
from tests import train_support as ts
from tests.helpers import free_port

MODEL = "mp_rank_00_model_states.pt"
OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
MINIMAL = ["model.config.hidden_size=8", "data.train.corpus.path=data/corpus", "train.max_steps=100"]


class FakeEngine:
    """Writes what DeepSpeed's save_checkpoint would: the model states and, optionally, optimizer states."""

    device = torch.device("cpu")

    def __init__(self, weights: bytes, optim: bytes | None = None):
        self.weights, self.optim = weights, optim

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool) -> None:
        path = Path(save_dir) / tag
        path.mkdir(parents=True, exist_ok=True)
        (path / MODEL).write_bytes(self.weights)
        if self.optim is not None:
            (path / OPTIM).write_bytes(self.optim)


def save(ckpt: checkpointer.Checkpointer, step: int, weights: bytes, optim: bytes | None = None,
         extras: dict | None = None) -> refs.CheckpointRef:
    return ckpt.save(FakeEngine(weights, optim), step, {"tokens_seen": step * 10}, {"step": step}, extras or {})


def begin(cfg: config.CheckpointConfig, run_dir: Path) -> Start:
    """What a start does with its checkpoints once its checks have passed: plan, then settle."""
    start = plan_start(cfg, run_dir)
    settle_start(cfg, run_dir, start)
    return start


def names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


# --------------------------------------------------------------------------- re-saving a step


def test_resaving_a_committed_step_replaces_it_whole(tmp_path):
    root = tmp_path / "checkpoints"
    ckpt = checkpointer.Checkpointer(root, keep_last=3, rank=0, world_size=1)
    save(ckpt, 4, b"old-weights", b"old-optim")
    save(ckpt, 4, b"new-weights!")   # e.g. after a resume from an earlier step, or resume: never
    ref = refs.verify(root / "global_step4")
    assert sorted(ref.meta()["files"]) == [MODEL, "rank0.pt"]   # never the marker, never the old optimizer
    assert (ref.path / MODEL).read_bytes() == b"new-weights!"
    assert not (ref.path / OPTIM).exists()
    assert names(root) == ["global_step4", "latest"]               # the retired copy is gone


def test_a_kill_between_retiring_and_committing_leaves_the_previous_state(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    ckpt = checkpointer.Checkpointer(root, keep_last=3, rank=0, world_size=1)
    save(ckpt, 2, b"two-weights")
    save(ckpt, 4, b"old-weights", b"old-optim")
    write = checkpointer.atomic_write_text

    def killed_at_the_marker(path, text, *args):
        if Path(path).name == layout.MARKER:
            raise KeyboardInterrupt   # what a kill looks like from inside: nothing after this line runs
        write(path, text, *args)

    monkeypatch.setattr(checkpointer, "atomic_write_text", killed_at_the_marker)
    with pytest.raises(KeyboardInterrupt):
        save(ckpt, 4, b"NEW-weights")   # same size as the old weights: only content tells them apart
    monkeypatch.undo()
    newest = refs.newest_committed(root)
    refs.verify(newest.path)
    # Never a mix of the new model states and the old optimizer states under a marker.
    assert newest.step == 2 and (newest.path / MODEL).read_bytes() == b"two-weights"
    begin(config.CheckpointConfig(), tmp_path)   # the next start tidies the leftovers away
    assert names(root) == ["global_step2", "latest"]
    assert (root / layout.LATEST).read_text() == "global_step2"


# --------------------------------------------------------------------------- branching


def test_resuming_an_older_checkpoint_moves_the_newer_ones_aside(tmp_path, capsys):
    root = tmp_path / "checkpoints"
    ckpt = checkpointer.Checkpointer(root, keep_last=5, rank=0, world_size=1)
    for step in (2, 4, 6):
        save(ckpt, step, f"weights-{step}".encode())
    start = begin(config.CheckpointConfig(resume=str(root / "global_step2")), tmp_path)
    assert start.kind == "resume" and start.ref.step == 2
    assert [r.step for r in refs.list_committed(root)] == [2]
    assert (root / layout.LATEST).read_text() == "global_step2"
    (aside,) = (root / "branches").iterdir()
    assert names(aside) == ["global_step4", "global_step6"]
    for step in (4, 6):   # kept whole, never deleted
        assert (refs.verify(aside / f"global_step{step}").path / MODEL).read_bytes() == f"weights-{step}".encode()
    err = capsys.readouterr().err
    assert f"moved global_step4, global_step6 aside to {aside}" in err and "never resumed automatically" in err
    # The next automatic resume continues the live branch, and keep_last counts only that branch.
    assert begin(config.CheckpointConfig(), tmp_path).ref.step == 2
    small = checkpointer.Checkpointer(root, keep_last=2, rank=0, world_size=1)
    save(small, 3, b"weights-3")
    assert [r.step for r in refs.list_committed(root)] == [2, 3]
    save(small, 4, b"weights-4b")
    assert [r.step for r in refs.list_committed(root)] == [3, 4]
    assert names(aside) == ["global_step4", "global_step6"]


def test_a_refused_resume_of_an_older_checkpoint_moves_nothing(world, tmp_path):
    """A start that a check refuses (here a changed precision) must leave the run as it found it."""
    root = tmp_path / "runs" / "run" / "checkpoints"
    ckpt = checkpointer.Checkpointer(root, keep_last=5, rank=0, world_size=1)
    for step in (2, 4):
        ckpt.save(FakeEngine(b"w"), step, {"tokens_seen": step, "zero_stage": 0, "precision": "fp32"}, {}, {})
    cfg = config.load(ts.write_config(tmp_path / "run.yaml", world, tmp_path / "runs", train={"precision": "bf16"},
                                      checkpoint={"resume": str(root / "global_step2")}))
    env = DistEnv(0, 0, 1, "127.0.0.1", free_port(), "none")
    with pytest.raises(UserError, match="saved with train.precision fp32, this run asks for bf16"):
        open_session(cfg, env)
    assert names(root) == ["global_step2", "global_step4", "latest"]
    assert not (root / "branches").exists()


def test_resuming_the_newest_or_another_runs_checkpoint_moves_nothing(tmp_path):
    root = tmp_path / "checkpoints"
    ckpt = checkpointer.Checkpointer(root, keep_last=5, rank=0, world_size=1)
    for step in (2, 4):
        save(ckpt, step, b"w")
    begin(config.CheckpointConfig(resume=str(root / "global_step4")), tmp_path)
    begin(config.CheckpointConfig(resume=str(root / "global_step2")), tmp_path / "other-run")
    assert names(root) == ["global_step2", "global_step4", "latest"]


# --------------------------------------------------------------------------- checksums


def flip_one_byte(file: Path, at: int = 3) -> None:
    data = bytearray(file.read_bytes())
    data[at] ^= 0xFF
    file.write_bytes(bytes(data))


def test_a_byte_flipped_in_place_is_refused_naming_the_file_and_the_newest_intact(tmp_path, capsys):
    root = tmp_path / "checkpoints"
    ckpt = checkpointer.Checkpointer(root, keep_last=5, rank=0, world_size=1)
    for step in (2, 4, 6):
        save(ckpt, step, f"weights-{step}".encode(), b"optimizer-state")
    entry = refs.verify(root / "global_step6").meta()["files"][MODEL]
    assert entry["size"] == 9 and len(entry["xxh3_64"]) == 16
    flip_one_byte(root / "global_step6" / MODEL)
    flip_one_byte(root / "global_step4" / OPTIM)
    expected = (rf"checkpoint {root / 'global_step6'} is corrupt: {MODEL} does not match its checksum in "
                rf"the commit marker .*the newest intact checkpoint is {root / 'global_step2'}: resume from it "
                rf"with checkpoint.resume={root / 'global_step2'}")
    with pytest.raises(UserError, match=expected):
        begin(config.CheckpointConfig(), tmp_path)                              # resume
    with pytest.raises(UserError, match=rf"global_step4 is corrupt: {OPTIM} does not match"):
        begin(config.CheckpointConfig(resume="never", init=str(root / "global_step4")), tmp_path / "b")
    assert cli.main(["export", str(tmp_path), "--out", str(tmp_path / "hf")]) == 2   # export
    assert f"{MODEL} does not match its checksum" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_a_marker_without_checksums_is_still_checked_by_size(tmp_path):
    path = tmp_path / "checkpoints" / "global_step3"
    path.mkdir(parents=True)
    (path / MODEL).write_bytes(b"weights")
    (path / layout.MARKER).write_text(json.dumps({"step": 3, "files": {MODEL: 7}}))
    assert refs.verify(path).step == 3


# --------------------------------------------------------------------------- keep_every, export --out


def test_keep_every_keeps_multiples_besides_the_last(tmp_path):
    root = tmp_path / "checkpoints"
    ckpt = checkpointer.Checkpointer(root, keep_last=2, rank=0, world_size=1, keep_every=4)
    for step in range(1, 10):
        save(ckpt, step, b"w")
    assert [r.step for r in refs.list_committed(root)] == [4, 8, 9]


@pytest.mark.parametrize("overrides, problem", [
    (["checkpoint.keep_every=-1"], "checkpoint.keep_every: must be >= 0, got -1"),
    (["checkpoint.every_steps=300", "checkpoint.keep_every=1000"],
     "checkpoint.keep_every: must be a multiple of checkpoint.every_steps (300), got 1000"),
    (["checkpoint.keep_every=1000"],
     "checkpoint.keep_every: needs checkpoint.every_steps > 0 (without it only the last step is saved)"),
])
def test_keep_every_is_checked(overrides, problem):
    with pytest.raises(config.ConfigError) as info:
        config.load(None, MINIMAL + overrides)
    assert [p.split(": ", 1)[1] for p in info.value.problems] == [problem]
    assert config.load(None, MINIMAL + ["checkpoint.every_steps=500", "checkpoint.keep_every=1000"]
                       ).checkpoint.keep_every == 1000


def test_export_onto_an_existing_file_is_a_clear_error(tmp_path, capsys):
    ckpt = checkpointer.Checkpointer(tmp_path / "checkpoints", keep_last=2, rank=0, world_size=1)
    save(ckpt, 2, b"w")
    target = tmp_path / "model.bin"
    target.write_bytes(b"keep me")
    assert cli.main(["export", str(tmp_path), "--out", str(target)]) == 2
    assert capsys.readouterr().err.strip() == (f"cpt export: error: --out {target} is an existing file; "
                                               "name a folder to write the model into")
    assert target.read_bytes() == b"keep me"


# --------------------------------------------------------------------------- a full disk


@contextlib.contextmanager
def small_disk(where: Path, size: str):
    """A tmpfs of `size` mounted at `where` (we run as root); skip when mounting is not permitted."""
    where.mkdir(parents=True)
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", f"cpt-test-{uuid.uuid4().hex[:8]}",
                        str(where)], check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot mount a small tmpfs to fill up here ({exc}); needs root")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_save_that_would_not_fit_is_refused_before_writing(tmp_path):
    with small_disk(tmp_path / "disk", "1m") as disk:
        root = disk / "checkpoints"
        ckpt = checkpointer.Checkpointer(root, keep_last=2, rank=0, world_size=1)
        first = save(ckpt, 2, b"w" * 600_000)
        free = shutil.disk_usage(root).free
        with pytest.raises(UserError) as info:
            save(ckpt, 4, b"w" * 600_000)
        message = str(info.value)
        assert message.startswith(f"no space left on device: checkpoint {root / 'global_step4'} needs about 0.6 MB "
                                  f"(the size of global_step2) and {root} has {free / 1e6:.1f} MB free")
        assert names(root) == ["global_step2", "latest"]
        assert refs.verify(first.path).step == 2


@pytest.mark.parametrize("writer, problem", [("bytes", "no space left on device"),
                                             ("torch", "disk full or quota exceeded")])
def test_a_disk_that_fills_during_a_save_says_so_and_keeps_the_previous_checkpoint(tmp_path, writer, problem):
    def fill(path: Path) -> None:
        if writer == "torch":   # torch reports a full disk as "RuntimeError: ... unexpected pos", no errno
            torch.save(torch.zeros(400_000), path / "big.pt")
        else:
            (path / "big.bin").write_bytes(b"x" * 1_600_000)

    with small_disk(tmp_path / "disk", "1m") as disk:
        root = disk / "checkpoints"
        ckpt = checkpointer.Checkpointer(root, keep_last=2, rank=0, world_size=1)
        save(ckpt, 2, b"w" * 1000)
        with pytest.raises(UserError, match=rf"^{problem} while saving checkpoint {root / 'global_step4'}: "
                                            rf"rank 0 on {os.uname().nodename} could not write big "
                                            rf"\(0\.\d MB free there\); .*{root / 'global_step2'} is intact"):
            save(ckpt, 4, b"w" * 1000, extras={"big": lambda p: (p.mkdir(), fill(p))})
        assert names(root) == ["global_step2", "latest"]
        refs.verify(root / "global_step2")


# --------------------------------------------------------------------------- a quota, with the disk not full


def test_a_quota_that_torch_reports_without_an_errno_is_a_clear_error_naming_the_rank(tmp_path):
    """torch.save to /dev/full fails in its zip writer as it does over a quota: the kernel refuses the
    write, torch's RuntimeError names no errno, and the disk (here tmp_path's) still has space."""
    root = tmp_path / "checkpoints"
    ckpt = checkpointer.Checkpointer(root, keep_last=2, rank=0, world_size=1)
    save(ckpt, 2, b"old-weights")
    save(ckpt, 4, b"four")

    def over_quota(folder: Path) -> None:
        folder.mkdir()
        torch.save({"state": torch.zeros(1000)}, "/dev/full")

    free = shutil.disk_usage(root).free
    with pytest.raises(UserError) as info:   # re-saving step 4: the committed one is put back
        save(ckpt, 4, b"new-weights", extras={"run": over_quota})
    message = str(info.value)
    assert message.startswith(f"disk full or quota exceeded while saving checkpoint {root / 'global_step4'}: "
                              f"rank 0 on {os.uname().nodename} could not write run ("), message
    assert message.endswith(f"; the partial save was removed and the committed {root / 'global_step4'} is intact; "
                            "free some space or raise the quota (or move out_dir) and run again"), message
    assert free > 16 << 20 and "Traceback" not in message
    assert names(root) == ["global_step2", "global_step4", "latest"]   # no retired copy left aside
    assert (root / layout.LATEST).read_text() == "global_step4"
    assert (refs.verify(root / "global_step4").path / MODEL).read_bytes() == b"four"


def _zip_writer_error(obj) -> RuntimeError:
    try:
        torch.save(obj, "/dev/full")
    except RuntimeError as exc:
        return exc
    raise AssertionError("torch.save to /dev/full did not fail")


def _copytree_error(tmp_path: Path) -> shutil.Error:
    """What copytree (a checkpoint's tokenizer copy) raises over a quota: the errno only in its text."""
    def over_quota(src, dst):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), dst)

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a").write_text("a")
    try:
        shutil.copytree(tmp_path / "src", tmp_path / "dst", copy_function=over_quota)
    except shutil.Error as exc:
        return exc
    raise AssertionError("copytree did not fail")


def test_disk_problems_are_told_from_other_errors(tmp_path):
    def wrapped(exc: Exception) -> RuntimeError:
        try:
            raise RuntimeError("could not save the checkpoint") from exc
        except RuntimeError as outer:
            return outer

    cases = [
        (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "no space left on device"),
        (OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)), "disk quota exceeded"),
        (_zip_writer_error({"a": 1}), "disk full or quota exceeded"),              # a small file: a failed stream
        (_zip_writer_error(torch.zeros(100_000)), "disk full or quota exceeded"),  # a large one: "unexpected pos"
        (RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"),
         "disk full or quota exceeded"),
        (_copytree_error(tmp_path), "disk quota exceeded"),                        # the errno only in its text
        (Exception("No space left on device (os error 28)"), "no space left on device"),
        (wrapped(OSError(errno.ENOSPC, "No space left on device")), "no space left on device"),
        (PermissionError(errno.EACCES, "Permission denied"), None),
        (RuntimeError("shape mismatch"), None),
        (ValueError("unexpected pos"), None),
    ]
    for exc, problem in cases:
        assert integrity.disk_problem(exc) == problem, repr(exc)
