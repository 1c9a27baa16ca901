"""An output that cannot be written (a read-only file system, a folder without write permission, a
path under a regular file) is said in one line naming the option, the path and the reason, with
exit 2, before any work: nothing tokenized, trained, scored or exported first. A file the system
refuses mid-way is said the same way; any other OSError keeps its traceback."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml

from continual_pt import files
from continual_pt.checkpoint.checkpointer import Checkpointer
from continual_pt.cli import main
from continual_pt.errors import UserError
from tests import train_support as ts

WITHOUT_OVERRIDE = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]
"""Root without the capabilities that let it ignore permission bits (chmod then holds for it too)."""


def permission_bits_hold() -> bool:
    """Whether a folder without write permission refuses this process (not root, or root without
    CAP_DAC_OVERRIDE: the tests run as both)."""
    with tempfile.TemporaryDirectory() as where:
        folder = Path(where) / "no-write"
        folder.mkdir(mode=0o555)
        try:
            (folder / "probe").touch()
        except PermissionError:
            return True
        return False


def as_a_user(command: list[str]) -> list[str]:
    """`command` run so that permission bits hold for it: as is, or as root without its override."""
    if permission_bits_hold():
        return command
    try:
        subprocess.run([*WITHOUT_OVERRIDE, "true"], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot drop root's capability to ignore permission bits here ({exc})")
    return [*WITHOUT_OVERRIDE, *command]


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, text=True)


@contextlib.contextmanager
def unwritable_folder(where: Path):
    """(an empty folder nothing can be written into, the reason the system gives): it loses its write
    permission, or where permission bits do not hold (root), it becomes a read-only bind mount of
    itself (skipped where mounting is not permitted)."""
    where.mkdir()
    if permission_bits_hold():
        where.chmod(0o555)
        try:
            yield where, "permission denied"
        finally:
            where.chmod(0o755)
        return
    try:
        _mount("--bind", str(where), str(where))
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot bind-mount a folder read-only here ({exc}); needs root or another user")
    try:
        _mount("-o", "remount,bind,ro", str(where))
        yield where, "read-only file system"
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture
def locked(tmp_path):
    with unwritable_folder(tmp_path / "locked") as found:
        yield found


def cli(argv: list[str], capfd) -> tuple[int, str, str]:
    """`cpt ARGV` in this process: (status, stdout, stderr)."""
    status = main([str(a) for a in argv])
    out, err = capfd.readouterr()
    return status, out, err


def refused(err: str, command: str, what: str, path: Path, blocker: Path, reason: str) -> None:
    assert err.strip().splitlines()[-1] == f"cpt {command}: error: {what} {path}: cannot write {blocker}: {reason}", err
    assert "Traceback" not in err


# --------------------------------------------------------------------------- inputs, cheap and real


def tiny_model(vocab_size: int):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=vocab_size, max_position_embeddings=16, **ts.TINY_MODEL))


class WeightsEngine:
    """What DeepSpeed's save_checkpoint writes of a ZeRO 0 model: its weights, loadable by export."""

    def __init__(self, model):
        self.model = model

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool) -> None:
        path = Path(save_dir) / tag
        path.mkdir(parents=True, exist_ok=True)
        torch.save({"module": self.model.state_dict()}, path / "mp_rank_00_model_states.pt")


@pytest.fixture(scope="module")
def committed_run(world, tmp_path_factory) -> Path:
    """A run dir with one committed checkpoint of a tiny model (its config and tokenizer beside it)."""
    run = tmp_path_factory.mktemp("committed") / "run"
    model = tiny_model(300)
    extras = {"model": model.config.save_pretrained, "tokenizer": lambda p: shutil.copytree(world["tokenizer"], p)}
    Checkpointer(run / "checkpoints", keep_last=1, rank=0, world_size=1).save(
        WeightsEngine(model), 1, {"tokens_seen": 32}, {"step": 1}, extras)
    return run


@pytest.fixture(scope="module")
def hf_model(committed_run, tmp_path_factory) -> Path:
    """The checkpoint exported as a Hugging Face folder, as `cpt eval` scores one."""
    out = tmp_path_factory.mktemp("hf") / "model"
    assert main(["export", str(committed_run), "--out", str(out)]) == 0
    return out


def corpus(world) -> str:
    return str(world["tokenizer"].parent / "a.jsonl")


# --------------------------------------------------------------------------- one test per command


def test_prepare(world, locked, capfd):
    folder, reason = locked
    out = folder / "data" / "code"
    status, stdout, err = cli(["prepare", "-s", corpus(world), "-t", world["tokenizer"], "-o", out], capfd)
    assert status == 2
    refused(err, "prepare", "--out", out, folder, reason)
    assert stdout == "" and "tokens" not in err   # no progress, no summary: nothing was tokenized


def test_tokenizer_train(world, locked, capfd):
    folder, reason = locked
    out = folder / "tok"
    status, stdout, err = cli(["tokenizer", "train", "-s", corpus(world), "--vocab-size", 300, "-o", out], capfd)
    assert status == 2
    refused(err, "tokenizer", "--out", out, folder, reason)
    assert "trained a byte-level BPE" not in stdout + err


def test_export(committed_run, locked, capfd, monkeypatch):
    folder, reason = locked

    def resolve(*args, **kwargs):
        pytest.fail("the checkpoint was verified (read whole) before --out was checked")

    monkeypatch.setattr("continual_pt.checkpoint.weights.resolve", resolve)
    status, stdout, err = cli(["export", committed_run, "--out", folder / "hf"], capfd)
    assert status == 2
    refused(err, "export", "--out", folder / "hf", folder, reason)
    assert stdout == ""


@pytest.mark.parametrize("mode", [[], ["--claim"]])
def test_eval(world, hf_model, locked, capfd, mode):
    folder, reason = locked
    store = folder / "scores.jsonl"
    status, stdout, err = cli(["eval", hf_model, "--set", f"code={world['code']}", "--tokens", 64,
                               "--store", store, *mode], capfd)
    assert status == 2
    refused(err, "eval", "--store", store, folder, reason)
    assert " loss " not in stdout and "to score" not in err   # nothing was scored


def test_sweep_local(world, locked, tmp_path, capfd):
    folder, reason = locked
    base = ts.write_config(tmp_path / "base.yaml", world, tmp_path / "unused", train={"max_steps": 4})
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"sweep": "s", "base": str(base), "out": str(folder / "sweep"),
                                    "grid": {"axes": {"schedule.max_lr": [1.0e-3, 3.0e-3]}}}))
    status, stdout, err = cli(["sweep", "--grid", grid, "--local"], capfd)
    assert status == 2
    refused(err, "sweep", "sweep dir (the grid's out)", folder / "sweep", folder, reason)
    assert stdout == ""   # not even the plan: nothing trained


def test_sweep_run_dirs(world, locked, tmp_path, capfd):
    """A run dir the sweep dir holds (here a link to a read-only one) is checked too."""
    folder, reason = locked
    base = ts.write_config(tmp_path / "base.yaml", world, tmp_path / "unused", train={"max_steps": 4})
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"sweep": "s", "base": str(base), "out": str(tmp_path / "sweep"),
                                    "grid": {"axes": {"schedule.max_lr": [1.0e-3]}}, "labels": {"schedule.max_lr": "lr"}}))
    (tmp_path / "sweep" / "runs").mkdir(parents=True)
    (tmp_path / "sweep" / "runs" / "lr0.001").symlink_to(folder)
    status, stdout, err = cli(["sweep", "--grid", grid, "--local"], capfd)
    assert status == 2
    run_dir = tmp_path / "sweep" / "runs" / "lr0.001"
    assert err.strip() == f"cpt sweep: error: run dir of lr0.001 {run_dir}: cannot write: {reason}"
    assert stdout == "" and sorted(p.name for p in (tmp_path / "sweep").iterdir()) == ["runs"]


def test_demo(locked, capfd, monkeypatch):
    folder, reason = locked
    monkeypatch.setattr("continual_pt.demo.command.verify",
                        lambda model: pytest.fail("the shipped model was read before --out was checked"))
    status, stdout, err = cli(["demo", "--out", folder / "demo"], capfd)
    assert status == 2
    refused(err, "demo", "--out", folder / "demo", folder, reason)
    assert stdout == ""


def test_train(world, locked, tmp_path):
    folder, reason = locked
    cfg = ts.write_config(tmp_path / "run.yaml", world, folder / "runs")
    proc = ts.train(cfg, ["name=ro"], expect=2)
    refused(proc.stderr, "train", "run dir (out_dir/name)", folder / "runs" / "ro", folder, reason)
    assert "start=" not in proc.stdout + proc.stderr and "Traceback" not in proc.stdout   # set-up never began


# --------------------------------------------------------------------------- the other reasons


def test_permission_denied_even_as_root(world, tmp_path):
    """A folder without write permission (chmod 0o555), for root too once it cannot ignore permission bits."""
    folder = tmp_path / "no-write"
    folder.mkdir(mode=0o555)
    out = folder / "code"
    command = as_a_user([sys.executable, "-m", "continual_pt.cli", "prepare", "-s", corpus(world), "-t",
                         str(world["tokenizer"]), "-o", str(out)])
    proc = subprocess.run(command, env=ts.env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    refused(proc.stderr, "prepare", "--out", out, folder, "permission denied")
    assert proc.stdout == "" and list(folder.iterdir()) == []


def test_an_output_under_a_regular_file_is_not_a_directory(world, tmp_path, capfd):
    (tmp_path / "notes.txt").write_text("a file")
    out = tmp_path / "notes.txt" / "tok"
    status, stdout, err = cli(["tokenizer", "train", "-s", corpus(world), "--vocab-size", 300, "-o", out], capfd)
    assert status == 2
    refused(err, "tokenizer", "--out", out, tmp_path / "notes.txt", "not a directory")


def test_check_writable_names_the_path_and_the_kind_it_must_be(tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("")
    files.check_writable(tmp_path / "dir", "--out")
    files.check_writable(tmp_path / "new" / "deeper", "--out")
    files.check_writable(tmp_path / "file", "--store", file=True)
    with pytest.raises(UserError, match=rf"^--store {tmp_path / 'dir'}: cannot write: is a directory$"):
        files.check_writable(tmp_path / "dir", "--store", file=True)
    with pytest.raises(UserError, match=rf"^--out {tmp_path / 'file'}: cannot write: not a directory$"):
        files.check_writable(tmp_path / "file", "--out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "file"]   # the probes left nothing behind


def test_a_file_of_a_read_only_folder_is_refused_and_its_folder_named(locked):
    folder, reason = locked
    assert files.unwritable(folder / "scores.jsonl", file=True) == (folder, reason)
    assert files.unwritable(folder, replaced=True) == (folder, reason)


# --------------------------------------------------------------------------- refused mid-way


def test_a_file_refused_mid_way_is_one_line_not_a_traceback(world, locked, capfd, monkeypatch):
    """As when the disk is remounted read-only after the checks: the write itself fails."""
    folder, reason = locked
    monkeypatch.setattr("continual_pt.data.output.check_writable", lambda *a, **k: None, raising=False)
    out = folder / "code"
    status, stdout, err = cli(["prepare", "-s", corpus(world), "-t", world["tokenizer"], "-o", out, "-q"], capfd)
    assert status == 2
    assert err.strip() == f"cpt prepare: error: {out.with_name(f'code.tmp-{os.getpid()}')}: {reason}"


@pytest.mark.parametrize("exc", [OSError(errno.ENOENT, "No such file or directory", "x"),
                                 OSError(errno.EROFS, "Read-only file system"), ValueError("x")])
def test_other_errors_are_not_taken_for_the_environment(exc):
    assert files.environment_fault(exc) is None


def test_environment_faults_name_the_file():
    for code in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT):
        assert files.environment_fault(OSError(code, os.strerror(code), "/x/y")) == \
            f"/x/y: {os.strerror(code)[0].lower()}{os.strerror(code)[1:]}"
