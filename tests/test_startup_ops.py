"""A start killed while DeepSpeed builds its ops never wedges later starts: leftover torch build
locks are removed, live ones are waited on out loud, and every wait ends in an error naming the file."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import deepspeed
import pytest
import torch
from torch.utils import cpp_extension

from continual_pt.errors import UserError
from continual_pt.runtime import ops
from tests import train_support as ts
from tests.helpers import free_port

OP = "deepspeed_shm_comm"
HOLD_FLOCK = ("import fcntl, sys, time\n"
              "f = open(sys.argv[1], 'a+')\n"
              "fcntl.flock(f, fcntl.LOCK_EX)\n"
              "f.write('pid test-holder on this host'); f.flush()\n"
              "print('held', flush=True)\n"
              "time.sleep(120)\n")
INIT = ("from continual_pt.runtime import distributed\n"
        "distributed.init()\n"
        "print('initialised', flush=True)\n")


def _env(ext: Path | None) -> dict[str, str]:
    """A start's environment, building in `ext` (None: where cpt decides)."""
    e = ts.env()
    e.pop("TORCH_EXTENSIONS_DIR", None)
    if ext is not None:
        e["TORCH_EXTENSIONS_DIR"] = str(ext)
    e["PATH"] = str(Path(sys.executable).parent) + os.pathsep + e.get("PATH", "")   # as ts.train runs it
    e["OMP_NUM_THREADS"] = "1"
    return e


@pytest.fixture
def quick(monkeypatch):
    """Notices and polls in fractions of a second, so a test of a wait takes about one."""
    monkeypatch.setattr(ops, "NOTICE_AFTER_S", 0.3)
    monkeypatch.setattr(ops, "POLL_S", 0.05)


@pytest.fixture
def torch_root(tmp_path, monkeypatch) -> Path:
    """Torch's default build root in `tmp_path`, and TORCH_EXTENSIONS_DIR unset (restored after)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv(ops.ROOT_ENV, "")
    monkeypatch.delenv(ops.ROOT_ENV)
    return Path(cpp_extension.get_default_build_root())


ELSEWHERE = {"an interpreter prefix": (sys, "prefix", "/other/venv"),
             "a torch version": (torch, "__version__", "2.99.0+cpu"),
             "a torch install": (torch, "__file__", "/other/lib/torch/__init__.py"),
             "a DeepSpeed version": (deepspeed, "__version__", "0.99.0"),
             "a DeepSpeed install": (deepspeed, "__file__", "/other/lib/deepspeed/__init__.py")}


@pytest.mark.parametrize("other", ELSEWHERE.values(), ids=ELSEWHERE.keys())
def test_each_environment_builds_its_ops_in_a_folder_of_its_own(torch_root, monkeypatch, other):
    here = ops.extensions_root()
    python = re.escape(f"py{sys.version_info.major}{sys.version_info.minor}{sys.abiflags}")
    versions = re.escape(f"torch{torch.__version__.replace('+', '_')}-ds{deepspeed.__version__}")
    assert re.fullmatch(rf"{python}_(cpu|cu\d+|rocm\d+)-{versions}-[0-9a-f]{{10}}", here.name), here.name
    assert here.parent == torch_root
    assert ops.extensions_root() == here   # the same environment: the same folder, every time
    monkeypatch.setattr(*other)
    elsewhere = ops.extensions_root()
    assert elsewhere.parent == torch_root and elsewhere != here


def test_torch_builds_where_the_environment_root_is_set(torch_root):
    root = ops.use_environment_root()
    assert os.environ[ops.ROOT_ENV] == str(root)
    assert Path(cpp_extension._get_build_directory(OP, False)) == root / OP
    assert list(torch_root.iterdir()) == [root]


def test_a_torch_extensions_dir_the_user_set_is_used_as_is(torch_root, tmp_path, monkeypatch):
    monkeypatch.setenv(ops.ROOT_ENV, str(tmp_path / "ext"))
    monkeypatch.setattr(sys, "prefix", "/other/venv")
    assert ops.use_environment_root() == tmp_path / "ext"
    assert os.environ[ops.ROOT_ENV] == str(tmp_path / "ext")
    assert Path(cpp_extension._get_build_directory(OP, False)) == tmp_path / "ext" / OP


def test_a_lock_left_by_a_killed_build_is_removed_and_named(tmp_path, quick):
    baton = tmp_path / OP / "lock"
    baton.parent.mkdir()
    baton.touch()
    said: list[str] = []
    ops.settle_batons(tmp_path, timeout=5, say=said.append)
    assert not baton.exists()
    assert said == [f"removed {baton}: a build was killed holding it (no live process has it open)"]


def test_a_lock_held_by_a_live_build_is_waited_on_out_loud_then_named(tmp_path, quick):
    baton = tmp_path / OP / "lock"
    baton.parent.mkdir()
    said: list[str] = []
    with open(baton, "w"):   # held open, as torch holds the lock while it builds
        with pytest.raises(UserError) as err:
            ops.settle_batons(tmp_path, timeout=1.0, say=said.append)
    assert baton.exists()
    held = f"{baton} (pids [{os.getpid()}])"
    assert said == [f"waiting for the torch extension build lock {held} (another process is building a DeepSpeed op)"]
    assert str(err.value).startswith(f"gave up after 1 s waiting for the torch extension build lock {held}; ")
    assert ops.TIMEOUT_ENV in str(err.value)


def test_our_lock_names_a_live_holder_and_is_free_once_it_dies(tmp_path, quick):
    path = tmp_path / ops.LOCK_NAME
    holder = subprocess.Popen([sys.executable, "-c", HOLD_FLOCK, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        said: list[str] = []
        with pytest.raises(UserError) as err:
            with ops.build_lock(tmp_path, timeout=1.0, say=said.append):
                pass
        assert said == [f"waiting for {path}, held by pid test-holder on this host"]
        assert str(err.value).startswith(f"gave up after 1 s waiting for {path}, held by pid test-holder on this host;")
        holder.kill()   # SIGKILL: nothing of the holder's own runs, the OS drops its lock
        holder.wait(timeout=30)
        start = time.monotonic()
        with ops.build_lock(tmp_path, timeout=5.0, say=said.append):
            assert time.monotonic() - start < 1.0
            assert path.read_text().startswith(f"pid {os.getpid()} on ")
        assert len(said) == 1
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_ops_build_with_the_ninja_of_this_environment(monkeypatch):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    with ops.environment_ninja():
        assert shutil.which("ninja") == str(Path(sys.executable).parent / "ninja")
    assert os.environ["PATH"] == "/usr/bin:/bin"


def test_bad_timeout_setting_is_named(monkeypatch):
    monkeypatch.setenv(ops.TIMEOUT_ENV, "soon")
    with pytest.raises(UserError, match=f"^environment variable {ops.TIMEOUT_ENV}='soon': expected a positive"):
        ops.timeout_s()


@pytest.fixture(scope="module")
def built_ext(tmp_path_factory) -> Path:
    """An extensions dir holding an up-to-date build of the op (copied from this machine's cache)."""
    ext = tmp_path_factory.mktemp("built") / "ext"
    ext.mkdir()
    src = ops.extensions_root() / OP
    if (src / f"{OP}.so").exists():
        with ops.build_lock(src.parent, timeout=600):
            shutil.copytree(src, ext / OP, ignore=shutil.ignore_patterns("lock"))
    # Brings the copy up to date (a build only where it is missing or stale).
    subprocess.run([sys.executable, "-c", INIT], env=_env(ext), check=True, timeout=900, capture_output=True)
    return ext


def test_start_after_a_killed_build_does_not_wait_on_its_lock(built_ext, tmp_path):
    ext = tmp_path / "ext"
    shutil.copytree(built_ext, ext)
    baton = ext / OP / "lock"
    baton.touch()   # what a start killed during the build leaves: the lock, and no process
    proc = subprocess.run([sys.executable, "-c", INIT], env=_env(ext), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1] == "initialised"
    assert f"cpt: removed {baton}: a build was killed holding it (no live process has it open)" in proc.stderr
    assert not baton.exists()


RANK_ROOT = ("import os\n"
             "from continual_pt.runtime import distributed\n"
             "env = distributed.init()\n"
             "print('rank', env.rank, os.environ['TORCH_EXTENSIONS_DIR'], flush=True)\n"
             "distributed.end_process(0)\n")


def test_every_rank_builds_and_loads_in_the_environment_folder(built_ext, torch_root, tmp_path):
    root = ops.extensions_root()
    shutil.copytree(built_ext / OP, root / OP)   # this environment's op, built: no rank builds it
    script = tmp_path / "rank_root.py"
    script.write_text(RANK_ROOT)
    e = _env(None)   # XDG_CACHE_HOME as torch_root set it
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), str(script)],
                          env=e, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(line for line in proc.stdout.splitlines() if line.startswith("rank ")) == \
        [f"rank 0 {root}", f"rank 1 {root}"]
    assert "building DeepSpeed op" not in proc.stderr
    assert list(torch_root.iterdir()) == [root]   # nothing in torch's own py3X_cpu


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"exited {proc.returncode} before {path} appeared\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.1)


@pytest.mark.slow
def test_train_killed_during_the_op_build_then_started_again_trains(world, tmp_path):
    ext = tmp_path / "ext"   # nothing built: the first start must build the op
    cfg = ts.write_config(tmp_path / "run.yaml", world, tmp_path / "runs", name="wedge",
                          train={"max_steps": 2}, schedule={"name": "cosine", "max_lr": 3.0e-3, "warmup": 1},
                          eval={"sets": {}, "every_steps": 0})
    cmd = ts.train_command(cfg, [])
    with open(tmp_path / "first.log", "w") as out:
        first = subprocess.Popen(cmd, env=_env(ext), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for(ext / OP / "lock", first, timeout=180, log=tmp_path / "first.log")
        time.sleep(1.0)   # the compiler is running
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)   # a time limit: the whole job, compiler included
        first.wait(timeout=30)
    assert (ext / OP / "lock").exists()   # the wedge as a killed start leaves it
    log = tmp_path / "second.log"
    with open(log, "w") as out:
        second = subprocess.Popen(cmd, env=_env(ext), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            start = time.monotonic()
            while f"cpt: removed {ext / OP / 'lock'}" not in log.read_text():
                assert second.poll() is None and time.monotonic() - start < 60, log.read_text()[-3000:]
                time.sleep(0.5)
            assert second.wait(timeout=900) == 0, log.read_text()[-3000:]
        finally:
            if second.poll() is None:
                os.killpg(second.pid, signal.SIGKILL)
    assert [r["step"] for r in ts.train_records(tmp_path / "runs" / "wedge")] == [1, 2]
