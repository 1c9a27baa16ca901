"""`cpt sweep --local` end to end on a tiny grid: runs train one after another, a run stopped part
way resumes on the next `--local`, a failing run is reported while the others train, a rerun of a
finished sweep trains nothing, Ctrl-C stops the sweep with 75; `cpt report` and `cpt plot` take
the sweep directory; the shipped small grid expands over prepared data given by its variables."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from continual_pt.cli import main
from continual_pt.config.load import load
from continual_pt.results.records import read_metrics
from continual_pt.sweep.grid import load_sweep
from continual_pt.sweep.plan import LOCAL_LOCK
from continual_pt.sweep.runs import RunState, record_exit, run_state
from continual_pt.training.lock import RunLock
from tests.helpers import REPO
from tests.train_support import write_config

SMALL_GRID = REPO / "configs" / "sweeps" / "small.yaml"


@pytest.fixture(autouse=True)
def one_process_env(monkeypatch):
    """Each run is one training process on one thread, whatever this shell was launched under."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def tiny_grid(tmp_path: Path, world: dict[str, Path], base_train: dict | None = None, extra: str = "") -> Path:
    """A grid of 3 runs over the world: lr0.001 (stops after 2 of its 4 steps), lr0.003, and the
    constant baseline whose data path is the variable EXTRA (default: the world's prose)."""
    base = write_config(tmp_path / "base.yaml", world, tmp_path / "unused",
                        train={"max_steps": 4, "micro_batch_size": 2, "grad_accum": 1, "precision": "fp32",
                               "ds_config": "zero0", "log_every": 1, **(base_train or {})},
                        eval={"sets": {"code": str(world["code"]), "prose": str(world["prose"])},
                              "tokens": 256, "every_steps": 2})
    grid = {
        "sweep": "tiny", "base": str(base), "out": str(tmp_path / "sweep"),
        "vars": {"EXTRA": str(world["prose"])},
        "grids": [{"set": {"train.stop_after_steps": 2}, "axes": {"schedule.max_lr": [1.0e-3]}},
                  {"axes": {"schedule.max_lr": [3.0e-3]}}],
        "runs": {"constant": {"schedule.name": "constant", "data.train.code.path": "${EXTRA}"}},
        "labels": {"schedule.max_lr": "lr"},
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False) + extra)
    return path


def local(grid: Path, capfd, *variables: str) -> tuple[int, str, str]:
    """`cpt sweep --grid GRID --local` here; (status, its stdout and its runs' stdout, all of it
    with stderr too)."""
    argv = ["sweep", "--grid", str(grid), "--local"]
    for v in variables:
        argv += ["--var", v]
    status = main(argv)
    out, err = capfd.readouterr()
    return status, out, out + err


def train_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind", "train") == "train"]


def summary_rows(text: str) -> dict[str, list[str]]:
    """The last state table printed: run -> [state, step, detail...] (states may hold a space)."""
    table = text[text.rindex("\nrun "):].splitlines()[2:]
    rows = {}
    for line in table:
        match = re.match(r"^(\S+)\s+(not started|stopped|finished|failed)\s+(\S+)\s*(.*)$", line)
        if not match:
            break
        rows[match.group(1)] = [match.group(2), match.group(3), match.group(4)]
    return rows


def table_rows(markdown: str) -> list[list[str]]:
    """The header and the rows of a markdown table (not its |---| line)."""
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines]


def final_eval_loss(run_dir: Path, name: str) -> float:
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")
            if r.get("kind") == "eval" and r["set"] == name][-1]


def test_local_sweep_end_to_end(tmp_path, world, capfd):
    grid = tiny_grid(tmp_path, world)
    runs = tmp_path / "sweep" / "runs"

    # 1. The first run stops at step 2 (exit 75): the sweep stops there with 75, nothing else runs.
    status, _, text = local(grid, capfd)
    assert status == 75, text
    assert "[1/3] lr0.001: starting" in text and "lr0.001: stopped (exit 75)" in text
    assert summary_rows(text) == {"lr0.001": ["stopped", "2", ""], "lr0.003": ["not started", "-", ""],
                                  "constant": ["not started", "-", ""]}
    assert train_steps(runs / "lr0.001") == [1, 2]
    assert not (runs / "lr0.003").exists() and not (runs / "constant").exists()
    # A report on the sweep so far: the run with results, the others named as left out.
    assert main(["report", str(tmp_path / "sweep"), "--upstream", "code", "--downstream", "prose"]) == 0
    out, err = capfd.readouterr()
    assert [row[0] for row in table_rows(out)[1:]] == ["lr0.001"]
    assert "2 run(s) without results yet left out: lr0.003, constant" in err

    # 2. A bad data path through a variable: that run fails at start (exit 2), the others train.
    status, out, text = local(grid, capfd, f"EXTRA={tmp_path / 'missing'}")
    assert status == 1, text
    assert "[1/3] lr0.001: resuming from step 2" in text and "[2/3] lr0.003: starting" in text
    assert re.search(r"constant: failed, exit 2 \(bad input\): .*missing.*; going on with the next run", text)
    assert out.rstrip().endswith("1 of 3 run(s) failed: constant")
    rows = summary_rows(text)
    assert rows["lr0.001"] == ["finished", "4", ""] and rows["lr0.003"] == ["finished", "4", ""]
    assert rows["constant"][:2] == ["failed", "-"] and rows["constant"][2].startswith("exit 2 (bad input): ")
    assert train_steps(runs / "lr0.001") == [1, 2, 3, 4]     # resumed at 3: no step trained twice
    assert train_steps(runs / "lr0.003") == [1, 2, 3, 4]

    # 3. With the variable back at its default the failed run trains; the finished ones are skipped.
    status, _, text = local(grid, capfd)
    assert status == 0, text
    assert "[1/3] lr0.001: finished at step 4, skipped" in text
    assert "[2/3] lr0.003: finished at step 4, skipped" in text
    assert "[3/3] constant: starting" in text
    assert {name: row[:2] for name, row in summary_rows(text).items()} == {
        "lr0.001": ["finished", "4"], "lr0.003": ["finished", "4"], "constant": ["finished", "4"]}

    # 4. A rerun trains nothing: no training process starts, no metrics line is added.
    before = {d.name: (d / "metrics.jsonl").read_bytes() for d in runs.iterdir()}
    started = time.monotonic()
    status, _, text = local(grid, capfd)
    assert status == 0, text
    assert time.monotonic() - started < 5
    assert [line for line in text.splitlines() if line.startswith("[")] == [
        "[1/3] lr0.001: finished at step 4, skipped", "[2/3] lr0.003: finished at step 4, skipped",
        "[3/3] constant: finished at step 4, skipped"]
    assert "start=" not in text and "step 0: eval" not in text
    assert {d.name: (d / "metrics.jsonl").read_bytes() for d in runs.iterdir()} == before

    # 5. cpt report on the sweep directory: one row per run, sorted by the axis, with its column.
    assert main(["report", str(tmp_path / "sweep"), "--upstream", "code", "--downstream", "prose",
                 "--baseline", "constant"]) == 0
    table = table_rows(capfd.readouterr().out)
    assert table[0][:3] == ["run", "schedule.max_lr", "tokens"]
    assert [row[:2] for row in table[1:]] == [["lr0.001", "0.001"], ["lr0.003", "0.003"], ["constant", "0.003"]]
    for row in table[1:]:
        assert row[3] == f"{final_eval_loss(runs / row[0], 'code'):.4f}"
        assert row[7] == f"{final_eval_loss(runs / row[0], 'prose'):.4f}"
    assert table[3][-1] == "+0.0000"   # the baseline against itself
    gain = final_eval_loss(runs / "constant", "prose") - final_eval_loss(runs / "lr0.001", "prose")
    assert table[1][-1] == f"{gain:+.4f}"

    # 6. lm-eval tasks on two runs' final checkpoints (offline, local tasks): cpt report on the sweep shows
    # their columns, each cell the store's value and stderr, and the gain against the baseline.
    from continual_pt.evaluation.store import read_scores
    from tests.test_eval_tasks import write_tasks

    tasks = write_tasks(tmp_path / "tasks")
    acc = {}
    for name in ("lr0.001", "constant"):
        assert main(["eval", str(runs / name / "checkpoints" / "global_step4"), "--lm-eval", "tiny_mc",
                     "--include-path", str(tasks), "--lm-eval-limit", "6"]) == 0
        row = next(r for r in read_scores(runs / name / "scores.jsonl") if r.get("task") == "tiny_mc")
        acc[name] = (row["metrics"]["acc"], row["stderr"]["acc"])
    capfd.readouterr()
    assert main(["report", str(tmp_path / "sweep"), "--upstream", "code", "--downstream", "prose",
                 "--baseline", "constant", "--task-metric", "acc"]) == 0
    table = table_rows(capfd.readouterr().out)
    head = table[0]
    cells = {row[0]: dict(zip(head, row)) for row in table[1:]}
    column, gain = "tiny_mc acc (0-shot, limit 6)", "gain vs constant (Δ tiny_mc acc (0-shot, limit 6))"
    assert head[-3:] == ["tasks at step", column, gain], head
    for name, (value, err) in acc.items():
        assert cells[name]["tasks at step"] == "4" and cells[name][column] == f"{value:.4f} ± {err:.4f}"
    assert cells["lr0.001"][gain] == f"{acc['lr0.001'][0] - acc['constant'][0]:+.4f}"
    assert cells["lr0.003"][column] == "n/a" and cells["constant"][gain] == "+0.0000"

    # 7. cpt plot on the sweep directory: one line per run.
    assert main(["plot", str(tmp_path / "sweep"), "--out", str(tmp_path / "fig")]) == 0
    assert (tmp_path / "fig.png").stat().st_size > 10_000
    svg = (tmp_path / "fig.svg").read_text()
    assert all(f">{name}<" in svg for name in ("lr0.001", "lr0.003", "constant"))


def test_ctrl_c_stops_the_sweep_with_75_and_the_run_saves(tmp_path, world):
    """Ctrl-C reaches the whole process group: the run saves and exits 75, the sweep returns 75."""
    grid = tiny_grid(tmp_path, world, base_train={"max_steps": 100000, "log_every": 1})
    sweep_dir = tmp_path / "sweep"
    proc = subprocess.Popen([sys.executable, "-m", "continual_pt.cli", "sweep", "--grid", str(grid), "--local"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    metrics = sweep_dir / "runs" / "lr0.001" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and train_steps(metrics.parent)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 75, out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
    assert "lr0.001: stopped (exit 75); the sweep stops here" in out
    cfg = load(sweep_dir / "configs" / "lr0.001.yaml")
    state = run_state(cfg)
    assert state.state == "stopped" and 0 < state.step < 100000
    assert state.step == train_steps(metrics.parent)[-1]
    assert not (sweep_dir / "runs" / "lr0.003").exists()


def test_a_second_local_sweep_on_a_live_sweep_dir_is_refused_before_writing(tmp_path, world, capfd):
    """A second `--local` on the same sweep would meet each live run and record it failed: refused."""
    grid = tiny_grid(tmp_path, world)
    sweep_dir = tmp_path / "sweep"
    holder = RunLock(sweep_dir, LOCAL_LOCK, label="sweep dir", what="sweep")
    holder.acquire()   # as the first `cpt sweep --local` holds it (flock: another open file conflicts)
    try:
        assert main(["sweep", "--grid", str(grid), "--local"]) == 2
    finally:
        holder.release()
    err = capfd.readouterr().err
    assert f"sweep dir {sweep_dir} is in use: pid {os.getpid()}" in err and "wait for that sweep to end" in err
    assert [p.name for p in sweep_dir.iterdir()] == [LOCAL_LOCK]   # no config, plan or run written


def test_run_states_from_the_run_dir(tmp_path, world):
    base = write_config(tmp_path / "base.yaml", world, tmp_path / "runs", train={"max_steps": 4})
    cfg = load(base)
    run_dir = cfg.run_dir

    def commit(step: int) -> None:
        tag = run_dir / "checkpoints" / f"global_step{step}"
        tag.mkdir(parents=True, exist_ok=True)
        (tag / "COMMITTED.json").write_text("{}")

    assert run_state(cfg) == RunState("not started", None)
    record_exit(run_dir, 2, "data: no prepared dataset")
    assert run_state(cfg) == RunState("failed", None, "exit 2 (bad input): data: no prepared dataset")
    (run_dir / "config.yaml").write_text("name: run\n")
    record_exit(run_dir, 75)
    assert run_state(cfg) == RunState("stopped", None)            # started, nothing committed yet
    (run_dir / "checkpoints" / "global_step3").mkdir(parents=True)    # a save cut short: not committed
    commit(2)
    assert run_state(cfg) == RunState("stopped", 2)
    record_exit(run_dir, 1)
    assert run_state(cfg) == RunState("failed", 2, "exit 1 (non-finite loss)")
    record_exit(run_dir, -9)
    assert run_state(cfg) == RunState("failed", 2, "killed by signal 9")
    commit(3)   # trained on past the failure (by hand): the record is stale
    assert run_state(cfg) == RunState("stopped", 3)
    record_exit(run_dir, 1)
    commit(4)
    assert run_state(cfg) == RunState("finished", 4)


def test_small_grid_expands_over_prepared_data(tmp_path, world, capfd):
    """configs/sweeps/small.yaml with its variables pointed at prepared data laid out as the quickstart's."""
    data = tmp_path / "data"
    data.mkdir()
    for name, target in (("code", world["code"]), ("bible", world["prose"]), ("tokenizer", world["tokenizer"])):
        (data / name).symlink_to(target)
    variables = [f"DATA={data}", f"INIT={tmp_path / 'pretrained'}"]
    argv = ["sweep", "--grid", str(SMALL_GRID), "--dry-run"]
    for v in variables:
        argv += ["--var", v]
    assert main(argv) == 0
    out = capfd.readouterr().out
    names = ["lr0.001", "lr0.003", "lr0.006", "constant"]
    assert [line.split()[0] for line in out.splitlines()[2:6]] == names
    sweep = load_sweep(SMALL_GRID, dict(v.split("=", 1) for v in variables))
    assert [r.name for r in sweep.runs] == names
    assert [r.varying["schedule.max_lr"] for r in sweep.runs] == [1.0e-3, 3.0e-3, 6.0e-3, 3.0e-4]
    for run in sweep.runs:
        cfg = run.config
        assert {k: (s.path, s.weight) for k, s in cfg.data.train.items()} == {
            "bible": (str(data / "bible"), 0.95), "code": (str(data / "code"), 0.05)}
        assert {k: v.path for k, v in cfg.eval.sets.items()} == {"code": str(data / "code"),
                                                                  "bible": str(data / "bible")}
        assert cfg.checkpoint.init == str(tmp_path / "pretrained")
        assert (cfg.train.max_steps, cfg.train.micro_batch_size) == (60, 8)
    constant = sweep.runs[-1].config.schedule
    assert (constant.name, constant.max_lr, constant.warmup) == ("constant", 3.0e-4, 0)
