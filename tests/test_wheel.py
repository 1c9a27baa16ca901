"""A wheel built from the repo, installed (not editable) into a fresh virtualenv, trains with a
shipped DeepSpeed config from a directory outside the repo."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests import train_support as ts
from tests.helpers import REPO, free_port

pytestmark = pytest.mark.slow

# What a build reads: the package (its ds_configs/ and configs/ link to the top-level folders) and metadata.
BUILD_INPUTS = ("setup.cfg", "pyproject.toml", "README.md", "continual_pt", "ds_configs", "configs")


def run(command: list, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=300, **kwargs)
    assert proc.returncode == 0, f"{command} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def build_wheel(tmp_path: Path) -> Path:
    """A wheel of the repo, built from a copy so that the build leaves nothing in the working tree."""
    src = tmp_path / "src"
    src.mkdir()
    for name in BUILD_INPUTS:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(REPO / name, src / name)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", tmp_path / "dist", src])
    (wheel,) = (tmp_path / "dist").glob("continual_pt-*.whl")
    return wheel


def fresh_venv(path: Path) -> Path:
    """A virtualenv whose own site-packages come first, seeing this environment's packages (torch,
    deepspeed...) after them, but not their .pth files: an editable install here stays invisible."""
    run([sys.executable, "-m", "venv", "--without-pip", path])
    (site,) = (path / "lib").glob("python*/site-packages")
    (site / "parent_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return path / "bin" / "python"


def test_a_wheel_install_trains_with_a_shipped_ds_config(world, tmp_path):
    wheel = build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    assert {"continual_pt/ds_configs/zero2.json", "continual_pt/configs/quickstart/pretrain.yaml"} <= set(names)
    python = fresh_venv(tmp_path / "venv")
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel])
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1", PATH=f"{python.parent}{os.pathsep}{env['PATH']}")
    where = run([python, "-c", "import continual_pt; print(continual_pt.__file__)"], cwd=outside, env=env)
    assert where.stdout.strip().startswith(str(tmp_path / "venv"))
    cfg = ts.write_config(outside / "run.yaml", world, Path("runs"), name="wheel", eval={"sets": {}},
                          train={"max_steps": 2, "micro_batch_size": 2, "grad_accum": 1, "precision": "fp32",
                                 "ds_config": "zero2", "log_every": 1},
                          schedule={"name": "constant", "max_lr": 1.0e-3, "warmup": 0})
    proc = run([python.parent / "cpt", "train", "--config", cfg.name], cwd=outside, env=env)
    assert "step 0/2" in proc.stderr and "ZeRO 2, fp32" in proc.stderr
    assert (outside / "runs" / "wheel" / "checkpoints" / "global_step2" / "COMMITTED.json").is_file()
