"""Grid files: expansion, names, variables, the plan, and every bad grid refused before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from continual_pt.cli import main
from continual_pt.config.load import load
from continual_pt.errors import UserError
from continual_pt.layout import SWEEP_PLAN
from continual_pt.sweep.grid import load_sweep
from continual_pt.sweep.plan import plan_text, write_plan

BASE = {"name": "base", "model": {"config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}},
        "data": {"train": {"new": {"path": "data/new", "weight": 0.95}, "old": {"path": "data/old", "weight": 0.05}},
                 "seq_len": 16},
        "train": {"max_steps": 100, "micro_batch_size": 2, "global_batch_size": 4, "grad_accum": 2},
        "schedule": {"name": "cosine", "max_lr": 3.0e-4, "min_lr_ratio": 0.1, "warmup": 0.01},
        "checkpoint": {"init": "runs/upstream"}}


def write_grid(tmp_path: Path, grid: dict) -> Path:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"sweep": "s", "base": "base.yaml", "out": str(tmp_path / "sweep"), **grid},
                                   sort_keys=False))
    return path


ONE_AXIS_SWEEPS = {
    "grids": [{"set": {"schedule.warmup": 0.01}, "axes": {"schedule.max_lr": [1.5e-4, 3.0e-4, 6.0e-4]}},
              {"set": {"schedule.max_lr": 3.0e-4}, "axes": {"schedule.warmup": [0, 0.005, 0.01, 0.02]}},
              {"axes": {"checkpoint.init": {"s143k": "runs/upstream", "s27k": "runs/upstream@27000"}}}],
    "runs": {"constant": {"schedule.name": "constant", "schedule.max_lr": 3.0e-5, "schedule.min_lr_ratio": None,
                          "schedule.warmup": 0}},
    "labels": {"schedule.max_lr": "lr"},
}


def test_one_axis_sweeps_share_their_centre_and_names_spell_every_axis(tmp_path):
    sweep = load_sweep(write_grid(tmp_path, ONE_AXIS_SWEEPS))
    names = [r.name for r in sweep.runs]
    assert names == ["lr0.00015_warmup0.01_inits143k", "lr0.0003_warmup0.01_inits143k",
                     "lr0.0006_warmup0.01_inits143k", "lr0.0003_warmup0_inits143k",
                     "lr0.0003_warmup0.005_inits143k", "lr0.0003_warmup0.02_inits143k",
                     "lr0.0003_warmup0.01_inits27k", "constant"]
    by_name = {r.name: r for r in sweep.runs}
    assert by_name["lr0.0003_warmup0.02_inits143k"].config.schedule.warmup == 0.02
    assert by_name["lr0.0003_warmup0.01_inits27k"].config.checkpoint.init == "runs/upstream@27000"
    assert by_name["constant"].config.schedule.name == "constant"
    assert by_name["constant"].varying == {"schedule.max_lr": 3.0e-5, "schedule.warmup": 0,
                                           "checkpoint.init": "runs/upstream"}
    assert all(r.config.run_dir == tmp_path / "sweep" / "runs" / r.name for r in sweep.runs)


def test_adding_a_value_renames_nothing_and_the_same_grid_writes_the_same_files(tmp_path):
    grid = write_grid(tmp_path, ONE_AXIS_SWEEPS)
    write_plan(load_sweep(grid))
    files = {p: p.read_bytes() for p in sorted((tmp_path / "sweep" / "configs").iterdir())}
    write_plan(load_sweep(grid))
    assert {p: p.read_bytes() for p in sorted((tmp_path / "sweep" / "configs").iterdir())} == files
    wider = json.loads(json.dumps(ONE_AXIS_SWEEPS))
    wider["grids"][0]["axes"]["schedule.max_lr"].append(1.2e-3)
    names = [r.name for r in load_sweep(write_grid(tmp_path, wider)).runs]
    assert {p.stem for p in files} < set(names) and "lr0.0012_warmup0.01_inits143k" in names
    plan = json.loads((tmp_path / "sweep" / SWEEP_PLAN).read_text())
    assert [r["name"] for r in plan["runs"]][:3] == names[:3] and plan["axes"] == ["schedule.max_lr",
                                                                                   "schedule.warmup",
                                                                                   "checkpoint.init"]
    written = load(plan["runs"][0]["config"])
    assert written.name == names[0] and written.schedule.max_lr == 1.5e-4


def test_zip_axes_move_together_and_cross_the_others(tmp_path):
    sweep = load_sweep(write_grid(tmp_path, {"grid": {
        "axes": {"schedule.max_lr": [3.0e-4, 6.0e-4]},
        "zip": [{"data.train.old.weight": [0.01, 0.05, 0.5], "data.train.new.weight": [0.99, 0.95, 0.5]}]}}))
    assert len(sweep.runs) == 6
    pairs = {(r.config.schedule.max_lr, r.config.data.train["old"].weight, r.config.data.train["new"].weight)
             for r in sweep.runs}
    assert pairs == {(lr, o, 1 - o if o != 0.5 else 0.5) for lr in (3.0e-4, 6.0e-4) for o in (0.01, 0.05, 0.5)}
    assert sweep.runs[1].name == "max_lr0.0003_old.weight0.05"       # a zip group is named by its first key


def test_variables_come_from_var_then_the_environment_then_the_default(tmp_path, monkeypatch):
    grid = write_grid(tmp_path, {"vars": {"DATA": "data", "OLD": None},
                                 "set": {"data.train.new.path": "${DATA}/new", "data.train.old.path": "${OLD}"},
                                 "grid": {"axes": {"schedule.max_lr": [3.0e-4]}}})
    with pytest.raises(UserError, match=r"vars.OLD: not set: export OLD=\.\.\. or pass --var OLD=\.\.\.") as info:
        load_sweep(grid)
    assert "(1 problem(s))" in str(info.value)          # once, not again where ${OLD} is used
    monkeypatch.setenv("OLD", "/env/old")
    run = load_sweep(grid).runs[0]
    assert (run.config.data.train["new"].path, run.config.data.train["old"].path) == ("data/new", "/env/old")
    run = load_sweep(grid, {"OLD": "/cli/old", "DATA": "/d"}).runs[0]
    assert (run.config.data.train["new"].path, run.config.data.train["old"].path) == ("/d/new", "/cli/old")
    with pytest.raises(UserError, match="--var NOPE: not a variable of this grid"):
        load_sweep(grid, {"NOPE": "x"})
    undeclared = write_grid(tmp_path, {"set": {"data.train.old.path": "${NOWHERE}"},
                                       "grid": {"axes": {"schedule.max_lr": [3.0e-4]}}})
    with pytest.raises(UserError, match=r"\$\{NOWHERE\}: an undeclared variable"):
        load_sweep(undeclared)


def test_every_problem_of_a_bad_grid_is_named_at_once_and_nothing_is_written(tmp_path, capsys):
    grid = write_grid(tmp_path, {
        "grids": [{"axes": {"schedule.max_lr": [], "schedule.warmpu": [0.01]}},
                  {"axes": {"schedule.max_lr": [3.0e-4, -1.0]}}],
        "colour": "blue"})
    assert main(["sweep", "--grid", str(grid)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cpt sweep: error: invalid sweep grid")
    expected = [f"{grid}: colour: unknown key",
                f"{grid}: grids[0].axes.schedule.max_lr: empty axis",
                "schedule.warmpu",                                       # unknown key, named by the config loader
                # the invalid combination, named by its point in the grid:
                f"{grid}: grids[1] (schedule.max_lr=-1): schedule.max_lr: must be a positive number, got -1.0"]
    for needle in expected:
        assert needle in err, (needle, err)
    assert err.count("\n  - ") == 4
    assert not (tmp_path / "sweep").exists()
    clash = write_grid(tmp_path, {"grid": {"axes": {"schedule.max_lr": [3.0e-4]}},
                                  "runs": {"max_lr0.0003": {"train.max_steps": 7}, "same": {}, "also_same": {}}})
    assert main(["sweep", "--grid", str(clash)]) == 2
    assert (f"{clash}: runs.max_lr0.0003: two different runs are both named 'max_lr0.0003'"
            in capsys.readouterr().err)
    assert not (tmp_path / "sweep").exists()


def test_a_started_runs_config_is_never_changed_by_a_grid_edit(tmp_path):
    grid = write_grid(tmp_path, {"grid": {"axes": {"schedule.max_lr": [3.0e-4, 6.0e-4]}}})
    sweep = load_sweep(grid)
    write_plan(sweep)
    started = sweep.runs[0].config.run_dir
    started.mkdir(parents=True)
    (started / "config.yaml").write_text("name: started\n")
    before = (tmp_path / "sweep" / "configs" / f"{sweep.runs[0].name}.yaml").read_text()
    edited = write_grid(tmp_path, {"set": {"train.max_steps": 200}, "grid": {"axes": {"schedule.max_lr": [3.0e-4,
                                                                                                          6.0e-4]}}})
    with pytest.raises(UserError, match=f"{sweep.runs[0].name}: .* the run has started"):
        write_plan(load_sweep(edited))
    assert (tmp_path / "sweep" / "configs" / f"{sweep.runs[0].name}.yaml").read_text() == before
    assert "max_steps: 100" in (tmp_path / "sweep" / "configs" / f"{sweep.runs[1].name}.yaml").read_text()


def test_the_dry_run_plan_shows_steps_tokens_axes_and_gpu_hours_and_writes_nothing(tmp_path, capsys):
    grid = write_grid(tmp_path, ONE_AXIS_SWEEPS)
    assert main(["sweep", "--grid", str(grid), "--dry-run", "--tokens-per-s", "2"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("sweep s: 8 run(s) under")
    assert lines[1].split() == ["run", "steps", "tokens", "schedule.max_lr", "schedule.warmup", "checkpoint.init",
                                "other", "settings"]
    constant = next(line for line in lines if line.startswith("constant"))
    assert constant.split()[:6] == ["constant", "100", "6.4k", "3e-05", "0", "runs-upstream"]
    assert "schedule.name=constant" in constant
    # 8 runs x 100 steps x 4 sequences x 16 tokens = 51,200 tokens; at 2 tokens/s: 7.1 GPU-hours
    assert lines[-1] == "total: 51.2k tokens; at 2 tokens/s per GPU: 7 GPU-hours"
    assert not (tmp_path / "sweep").exists()
    assert plan_text(load_sweep(grid)).splitlines()[-1] == "total: 51.2k tokens"


def test_a_directory_given_as_the_grid_is_named_as_such(tmp_path, capsys):
    grid = write_grid(tmp_path, {"grid": {"axes": {"schedule.max_lr": [3.0e-4]}}})
    write_plan(load_sweep(grid))
    sweep_dir = tmp_path / "sweep"
    assert main(["sweep", "--grid", str(sweep_dir), "--status"]) == 2
    assert capsys.readouterr().err == (f"cpt sweep: error: {sweep_dir} is a directory, not a grid file: a sweep "
                                       f"directory, expanded from the grid {grid} (pass --grid {grid})\n")
    assert main(["sweep", "--grid", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"cpt sweep: error: {tmp_path} is a directory, not a grid file (pass the "
                                       "grid's YAML file, e.g. configs/sweeps/small.yaml)\n")


def test_a_second_expansion_says_that_it_changed_no_run_config(tmp_path, capsys):
    grid = write_grid(tmp_path, {"grid": {"axes": {"schedule.max_lr": [1.5e-4, 3.0e-4]}}})
    assert main(["sweep", "--grid", str(grid)]) == 0
    assert f"wrote 2 run config(s) and sweep.json under {tmp_path / 'sweep'}" in capsys.readouterr().out
    assert main(["sweep", "--grid", str(grid)]) == 0
    assert f"wrote 0 run config(s) (2 unchanged) and sweep.json under {tmp_path / 'sweep'}" in capsys.readouterr().out
