"""The README's two commands stay true: CI runs the test command verbatim, shipped configs load."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from continual_pt import config
from tests.helpers import REPO


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    commands = []
    for block in blocks[:2]:
        lines = [ln for ln in block.splitlines() if ln.strip() and not ln.startswith("#")]
        assert len(lines) == 1, block
        commands.append(lines[0])
    return commands


def test_readme_opens_with_two_commands_and_ci_runs_the_test_command():
    install_and_run, install_and_test = readme_commands()
    assert "pip install torch==2.13.0" in install_and_run and install_and_run.endswith("&& cpt demo")
    assert install_and_test.endswith("&& pytest")
    ci = (REPO / ".ci" / "run").read_text()
    assert install_and_test in ci.splitlines()


def is_grid(path: Path) -> bool:
    return "sweep" in (yaml.safe_load(path.read_text()) or {})


SHIPPED = sorted(p.relative_to(REPO) for p in (REPO / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", [str(p) for p in SHIPPED if not is_grid(REPO / p)])
def test_every_shipped_config_loads(path):
    cfg = config.load(REPO / path)
    assert cfg.train.max_steps > 0


@pytest.mark.parametrize("path", [str(p) for p in SHIPPED if is_grid(REPO / p)])
def test_every_shipped_grid_expands_with_its_variables_set(path):
    from continual_pt.sweep.grid import load_sweep

    declared = yaml.safe_load((REPO / path).read_text()).get("vars") or {}
    sweep = load_sweep(REPO / path, {name: f"/data/{name.lower()}" for name in declared})
    assert sweep.runs and all(run.config.train.max_steps > 0 for run in sweep.runs)


def test_quickstart_script_uses_the_shipped_configs():
    script = (REPO / "configs" / "quickstart" / "run.sh").read_text()
    for name in ("pretrain.yaml", "rewarm.yaml"):
        assert f"configs/quickstart/{name}" in script
        assert Path(REPO / "configs" / "quickstart" / name).is_file()


@pytest.mark.parametrize("argv, needles", [
    (["--help"], ["train", "prepare", "schedule", "eval", "export", "re-warm"]),
    (["schedule", "--help"], ["plot", "show", "--spec"]),
    (["schedule", "plot", "--help"], ["--out", "--config", "--steps"]),
    (["train", "--help"], ["SIGTERM", "resume", "key=value"]),
])
def test_help_explains_itself(argv, needles, capsys):
    from continual_pt.cli import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    out = capsys.readouterr().out
    for needle in needles:
        assert needle in out, needle
