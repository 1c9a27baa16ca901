"""An output that cannot be written (a read-only file system, a folder without write permission, a
path under a regular file) is named with the reason; a file the system refuses mid-way is said in
one line with exit 2; any other OSError keeps its traceback."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from continual_pt import files
from continual_pt.cli import main
from continual_pt.errors import UserError


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


def corpus(world) -> str:
    return str(world["tokenizer"].parent / "a.jsonl")


# --------------------------------------------------------------------------- the check


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
