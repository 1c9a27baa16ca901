"""`cpt sweep --submit` and `--status`: on the real one-node SLURM cluster (tests/slurm_cluster.py) a
2-run sweep trains, its chained eval arrays score every kept checkpoint, and a second submit
submits nothing; with stand-in sbatch/squeue/scontrol/scancel (fast, no cluster) each decision of
a rerun (pending, running, failed, finished, stale eval array) and the status without SLURM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from continual_pt.cli import main
from continual_pt.config import load
from continual_pt.evaluation.sets import measurement, open_sets
from continual_pt.evaluation.store import ScoreStore
from continual_pt.sweep.scoring import checkpoint_count
from tests import train_support as ts
from tests.helpers import REPO

TRAIN_ARGS = "--ntasks-per-node=1 --gpus-per-node=0 --cpus-per-task=1 --time=30"
EVAL_ARGS = "--gpus-per-task=0 --cpus-per-task=1"
RUNS = ("max_lr0.001", "max_lr0.003")


def write_sweep(root: Path, world: dict[str, Path]) -> Path:
    """A 2-run grid (max LR) over a 12-step tiny run that checkpoints at steps 6 and 12 and scores
    both held-out sets of the world."""
    ts.write_config(root / "base.yaml", world, root / "unused",
                    checkpoint={"every_steps": 6, "keep_last": 2}, eval={
                        "sets": {"code": str(world["code"]), "prose": str(world["prose"])}, "tokens": 256,
                        "every_steps": 6})
    grid = {"sweep": "two", "base": "base.yaml", "out": str(root / "sweep"),
            "grid": {"axes": {"schedule.max_lr": [1.0e-3, 3.0e-3]}}}
    (root / "grid.yaml").write_text(yaml.safe_dump(grid))
    return root / "grid.yaml"


def submit_args(grid: Path) -> list[str]:
    return ["sweep", "--grid", str(grid), "--submit", f"--train-sbatch-args={TRAIN_ARGS}",
            f"--eval-sbatch-args={EVAL_ARGS}"]


def after_plan(out: str) -> list[str]:
    """What --submit printed after the plan and the `wrote ...` line."""
    lines = out.splitlines()
    wrote = [i for i, line in enumerate(lines) if line.startswith("wrote ")]
    assert len(wrote) == 1, out
    return lines[wrote[0] + 1:]


def jobs_json(root: Path) -> dict:
    return json.loads((root / "sweep" / "jobs.json").read_text())["runs"]


# --------------------------------------------------------------------------- on the cluster


def cpt(slurm, root: Path, args: list[str]) -> subprocess.CompletedProcess:
    env = {**slurm.env, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "PYTHON": sys.executable}
    proc = subprocess.run([sys.executable, "-m", "continual_pt.cli", *args], env=env, cwd=root,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.mark.slow
def test_a_submitted_sweep_trains_is_scored_and_is_not_submitted_again(slurm, world, tmp_path):
    grid = write_sweep(tmp_path, world)
    out = cpt(slurm, tmp_path, submit_args(grid)).stdout
    jobs = jobs_json(tmp_path)
    assert sorted(jobs) == list(RUNS) and all(len(jobs[r]) == 1 for r in RUNS)
    for run in RUNS:
        entry = jobs[run][0]
        assert (entry["eval_tasks"], entry["train"].isdigit(), entry["eval"].isdigit()) == (2, True, True)
        assert (f"{run}: submitted train job {entry['train']}, eval array {entry['eval']} (2 task(s), "
                f"after {entry['train']})") in out, out
    logs = sorted((tmp_path / "sweep" / "logs").glob("*.log"))
    ids = [e[k] for r in RUNS for k in ("train", "eval") for e in jobs[r]]
    records = {i: slurm.wait(i, timeout=150, log=logs) for i in ids}
    logs = sorted((tmp_path / "sweep" / "logs").glob("*.log"))
    text = "\n".join(f"--- {p.name}\n{p.read_text()}" for p in logs)
    for run in RUNS:
        train, array = records[jobs[run][0]["train"]], records[jobs[run][0]["eval"]]
        assert [(j["JobState"], j["ExitCode"]) for j in train] == [("COMPLETED", "0:0")], text
        assert sorted((j["ArrayTaskId"], j["JobState"], j["ExitCode"]) for j in array) == \
            [("0", "COMPLETED", "0:0"), ("1", "COMPLETED", "0:0")], text
        assert f"config {tmp_path / 'sweep' / 'configs' / run}.yaml" in text
        rows = [json.loads(line) for line in (tmp_path / "sweep" / "runs" / run / "scores.jsonl").open()]
        assert sorted((r["run"], r["step"], r["set"], r["budget"]) for r in rows) == \
            [(run, s, name, 256) for s in (6, 12) for name in ("code", "prose")], text
    again = cpt(slurm, tmp_path, submit_args(grid)).stdout
    assert after_plan(again) == \
        [f"{run}: not submitted: finished at step 12" for run in RUNS] + \
        [f"submitted 0 of 2 run(s); job ids in {tmp_path / 'sweep' / 'jobs.json'}"], again
    assert jobs_json(tmp_path) == jobs
    status = cpt(slurm, tmp_path, ["sweep", "--grid", str(grid), "--status"]).stdout.splitlines()
    rows = {line.split()[0]: line.split() for line in status[2:-1]}
    for run in RUNS:
        train, array = jobs[run][0]["train"], jobs[run][0]["eval"]
        assert rows[run] == [run, "finished", "12", "0", "of", "2", train, "COMPLETED", array, "2", "COMPLETED"], status
    assert status[-1] == "2 finished", status


# --------------------------------------------------------------------------- stand-ins, no cluster

FAKE_SBATCH = """\
import json, os, sys
from pathlib import Path
root = Path(os.environ["FAKE_SLURM"])
calls = root / "calls.jsonl"
if os.environ.get("FAKE_SBATCH_FAIL") in sys.argv:
    sys.exit("sbatch: error: Batch job submission failed: Invalid partition name specified")
job = str(100 + (len(calls.read_text().splitlines()) if calls.exists() else 0))
env = {k: os.environ.get(k) for k in ("CONFIG", "OUT_DIR", "NAME", "PYTHON")}
with open(calls, "a") as f:
    f.write(json.dumps({"args": sys.argv[1:], "env": env}) + "\\n")
with open(root / "queue", "a") as f:
    f.write(f"{job}|{job}|PENDING|None\\n")
print(job)
"""
FAKE_SQUEUE = """\
import os, sys
from pathlib import Path
queue = Path(os.environ["FAKE_SLURM"]) / "queue"
sys.stdout.write(queue.read_text() if queue.exists() else "")
"""
FAKE_SCONTROL = """\
import json, os, sys
from pathlib import Path
exits = json.loads((Path(os.environ["FAKE_SLURM"]) / "exits.json").read_text())
print(f"JobId={sys.argv[-1]} JobState=FAILED ExitCode={exits[sys.argv[-1]]}")
"""
FAKE_SCANCEL = """\
import os, sys
from pathlib import Path
with open(Path(os.environ["FAKE_SLURM"]) / "scancel.log", "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\\n")
"""


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """sbatch, squeue, scontrol and scancel stand-ins first on PATH; state under tmp_path/slurm."""
    state, bin_dir = tmp_path / "slurm", tmp_path / "bin"
    state.mkdir()
    bin_dir.mkdir()
    for name, code in (("sbatch", FAKE_SBATCH), ("squeue", FAKE_SQUEUE), ("scontrol", FAKE_SCONTROL),
                       ("scancel", FAKE_SCANCEL)):
        (bin_dir / name).write_text(f"#!{sys.executable}\n{code}")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM", str(state))
    return state


def calls(state: Path) -> list[dict]:
    path = state / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def set_queue(state: Path, lines: list[str]) -> None:
    (state / "queue").write_text("".join(line + "\n" for line in lines))


def paths_world(root: Path) -> dict[str, Path]:
    return {name: root / name for name in ("code", "prose")}   # paths only: nothing trains here


def submit(grid: Path, capsys) -> list[str]:
    assert main(submit_args(grid)) == 0
    return after_plan(capsys.readouterr().out)


def test_submit_chains_an_eval_array_to_each_training_job_and_records_the_ids(fake_slurm, tmp_path, capsys):
    grid = write_sweep(tmp_path, paths_world(tmp_path))
    assert submit(grid, capsys) == [
        "max_lr0.001: submitted train job 100, eval array 101 (2 task(s), after 100)",
        "max_lr0.003: submitted train job 102, eval array 103 (2 task(s), after 102)",
        f"submitted 2 of 2 run(s); job ids in {tmp_path / 'sweep' / 'jobs.json'}"]
    sweep, logs = tmp_path / "sweep", tmp_path / "sweep" / "logs"
    made = calls(fake_slurm)
    for i, run in enumerate(RUNS):
        train, evaluation = made[2 * i], made[2 * i + 1]
        env = {"CONFIG": str(sweep / "configs" / f"{run}.yaml"), "OUT_DIR": str(sweep / "runs"), "NAME": run,
               "PYTHON": os.environ.get("PYTHON", sys.executable)}
        assert train == {"args": ["--parsable", f"--job-name=cpt-train-{run}", f"--output={logs}/%x-%j.log",
                                  *TRAIN_ARGS.split(), str(REPO / "launch" / "slurm" / "train.sbatch")],
                         "env": env}
        assert evaluation == {"args": ["--parsable", f"--job-name=cpt-eval-{run}", f"--output={logs}/%x-%A_%a.log",
                                       "--array=0-1", f"--dependency=afterok:{100 + 2 * i}",
                                       "--kill-on-invalid-dep=yes", *EVAL_ARGS.split(),
                                       str(REPO / "launch" / "slurm" / "eval.sbatch"), str(sweep / "runs" / run),
                                       "--set", f"code={tmp_path / 'code'}:val",
                                       "--set", f"prose={tmp_path / 'prose'}:val", "--tokens", "256"],
                              "env": env}
    assert {run: [(e["train"], e["eval"], e["eval_tasks"]) for e in entries]
            for run, entries in jobs_json(tmp_path).items()} == \
        {RUNS[0]: [("100", "101", 2)], RUNS[1]: [("102", "103", 2)]}


def test_a_rerun_submits_only_runs_without_a_live_job_that_are_not_finished(fake_slurm, tmp_path, capsys):
    grid = write_sweep(tmp_path, paths_world(tmp_path))
    submit(grid, capsys)
    assert submit(grid, capsys)[:2] == ["max_lr0.001: not submitted: train job 100 PENDING (None)",
                                        "max_lr0.003: not submitted: train job 102 PENDING (None)"]
    assert len(calls(fake_slurm)) == 4
    # The first run's job failed (its array can never start); the second's runs.
    set_queue(fake_slurm, ["100|100|FAILED|NonZeroExitCode", "101|101_[0-1]|PENDING|DependencyNeverSatisfied",
                           "102|102|RUNNING|None", "103|103_[0-1]|PENDING|Dependency"])
    assert submit(grid, capsys) == [
        "max_lr0.001: submitted train job 104, eval array 105 (2 task(s), after 104)",
        "max_lr0.003: not submitted: train job 102 RUNNING",
        f"submitted 1 of 2 run(s); job ids in {tmp_path / 'sweep' / 'jobs.json'}"]
    assert (fake_slurm / "scancel.log").read_text() == "101\n"
    assert [e["train"] for e in jobs_json(tmp_path)[RUNS[0]]] == ["100", "104"]
    # Every job gone from squeue; the second run finished (a committed checkpoint at max_steps).
    set_queue(fake_slurm, [])
    done = tmp_path / "sweep" / "runs" / RUNS[1] / "checkpoints" / "global_step12"
    done.mkdir(parents=True)
    (done / "COMMITTED.json").write_text("{}")
    assert submit(grid, capsys)[:2] == ["max_lr0.001: submitted train job 106, eval array 107 (2 task(s), after 106)",
                                        "max_lr0.003: not submitted: finished at step 12"]
    assert len(calls(fake_slurm)) == 8


def test_a_failed_eval_submission_keeps_the_training_jobs_id(fake_slurm, tmp_path, capsys, monkeypatch):
    grid = write_sweep(tmp_path, paths_world(tmp_path))
    monkeypatch.setenv("FAKE_SBATCH_FAIL", str(REPO / "launch" / "slurm" / "eval.sbatch"))
    assert main(submit_args(grid)) == 2
    err = capsys.readouterr().err
    assert ("max_lr0.001: training job 100 is submitted (and recorded) but its eval array is not: sbatch "
            in err and "Invalid partition name specified" in err), err
    assert [(e["train"], e["eval"]) for e in jobs_json(tmp_path)[RUNS[0]]] == [("100", None)]
    assert sorted(jobs_json(tmp_path)) == [RUNS[0]]
    monkeypatch.delenv("FAKE_SBATCH_FAIL")
    assert submit(grid, capsys)[:2] == ["max_lr0.001: not submitted: train job 100 PENDING (None)",
                                        "max_lr0.003: submitted train job 101, eval array 102 (2 task(s), after 101)"]


def test_status_reads_the_queue_and_the_run_dirs(fake_slurm, tmp_path, capsys, monkeypatch):
    grid = write_sweep(tmp_path, paths_world(tmp_path))
    submit(grid, capsys)
    runs = tmp_path / "sweep" / "runs"
    (runs / RUNS[0]).mkdir(parents=True)
    (runs / RUNS[0] / "metrics.jsonl").write_text(
        "".join(json.dumps({"kind": kind, "step": s}) + "\n" for s, kind in ((6, "train"), (7, "train"), (8, "eval"))))

    def status() -> list[list[str]]:
        assert main(["sweep", "--grid", str(grid), "--status"]) == 0
        lines = capsys.readouterr().out.splitlines()
        return [line.split() for line in lines]

    set_queue(fake_slurm, ["100|100|RUNNING|None", "101|101_[0-1]|PENDING|Dependency",
                           "102|102|PENDING|Priority", "103|103_[0-1]|PENDING|Dependency"])
    assert status()[2:] == [[RUNS[0], "running", "7", "-", "100", "RUNNING", "101", "PENDING", "(Dependency)"],
                            [RUNS[1], "queued", "-", "102", "PENDING", "(Priority)", "103", "PENDING", "(Dependency)"],
                            ["1", "running,", "1", "queued"]]
    # Both jobs failed: the first stopped resumably past its requeue cap (exit 75), the second on bad input.
    step = runs / RUNS[0] / "checkpoints" / "global_step6"
    step.mkdir(parents=True)
    (step / "COMMITTED.json").write_text("{}")
    set_queue(fake_slurm, ["100|100|FAILED|NonZeroExitCode", "102|102|FAILED|NonZeroExitCode"])
    (fake_slurm / "exits.json").write_text(json.dumps({"100": "75:0", "102": "2:0"}))
    rows = status()
    assert rows[2][:4] == [RUNS[0], "stopped", "(resumable)", "6"]
    assert rows[3][:6] == [RUNS[1], "failed:", "job", "102", "exit", "2"]
    # No SLURM here: the run dirs alone, said once.
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    rows = status()
    assert rows[0] == "no SLURM here (squeue not found): states from the run dirs only".split()
    assert rows[2:] == [["run", "state", "step", "unscored"], [RUNS[0], "stopped", "(resumable)", "6", "-"],
                        [RUNS[1], "not", "started", "-"], ["1", "stopped", "(resumable),", "1", "not", "started"]]


def test_a_finished_run_with_unscored_checkpoints_gets_an_eval_array_of_its_own(fake_slurm, world, tmp_path,
                                                                               capsys):
    """Its chained array was cancelled, failed, or ended before the run's last checkpoints: --status
    counts them and --submit scores them; once all are scored the run is left alone."""
    grid = write_sweep(tmp_path, world)
    submit(grid, capsys)
    set_queue(fake_slurm, ["100|100|COMPLETED|None", "101|101_[0-1]|CANCELLED|None",
                           "102|102|RUNNING|None", "103|103_[0-1]|PENDING|Dependency"])
    run_dir = tmp_path / "sweep" / "runs" / RUNS[0]
    for step in (6, 9, 12):            # 9: a stop the plan did not foresee
        (run_dir / "checkpoints" / f"global_step{step}").mkdir(parents=True)
        (run_dir / "checkpoints" / f"global_step{step}" / "COMMITTED.json").write_text("{}")
    assert main(["sweep", "--grid", str(grid), "--status"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert rows[2][:7] == [RUNS[0], "finished", "12", "3", "of", "3", "100"], rows
    assert submit(grid, capsys) == [
        f"{RUNS[0]}: finished with 3 committed checkpoint(s) unscored: submitted eval array 104 (2 task(s))",
        f"{RUNS[1]}: not submitted: train job 102 RUNNING",
        f"submitted 0 of 2 run(s) and 1 eval array(s) for finished runs; job ids in {tmp_path / 'sweep' / 'jobs.json'}"]
    eval_call = calls(fake_slurm)[-1]["args"]
    assert "--array=0-1" in eval_call and not any(a.startswith("--dependency") for a in eval_call)
    assert eval_call[-7:] == [str(run_dir), "--set", f"code={world['code']}:val", "--set",
                              f"prose={world['prose']}:val", "--tokens", "256"]
    assert [(e["train"], e["eval"]) for e in jobs_json(tmp_path)[RUNS[0]]] == [("100", "101"), (None, "104")]
    set_queue(fake_slurm, ["104|104_[0-1]|RUNNING|None"])
    assert submit(grid, capsys)[0] == f"{RUNS[0]}: not submitted: finished at step 12; eval job 104 RUNNING"
    # Its array scored them all: nothing more to submit.
    set_queue(fake_slurm, [])
    sets = open_sets([f"{name}={world[name]}:val" for name in ("code", "prose")])
    ScoreStore(run_dir / "scores.jsonl").append(
        [measurement(str((run_dir / "checkpoints" / f"global_step{step}").resolve()), s, 256, 16, "fp32")
         for step in (6, 9, 12) for s in sets])
    assert submit(grid, capsys)[0] == f"{RUNS[0]}: not submitted: finished at step 12"
    assert main(["sweep", "--grid", str(grid), "--status"]) == 0
    assert capsys.readouterr().out.splitlines()[2].split()[3:6] == ["0", "of", "3"]


def test_submit_names_the_missing_batch_scripts(fake_slurm, tmp_path, capsys):
    grid = write_sweep(tmp_path, paths_world(tmp_path))
    assert main([*submit_args(grid), "--scripts", str(tmp_path)]) == 2
    assert f"no train.sbatch and eval.sbatch in {tmp_path}" in capsys.readouterr().err
    assert calls(fake_slurm) == []


@pytest.mark.parametrize("steps, every, keep_last, keep_every, count", [
    (12, 6, 2, 0, 2),          # 6, 12
    (12, 0, 2, 0, 1),          # the end only
    (10, 4, 2, 0, 2),          # 4, 8, 10: the last two
    (10, 4, 5, 0, 3),          # all three
    (100, 10, 2, 20, 6),       # 90, 100 and 20, 40, 60, 80
    (131296, 1000, 2, 10000, 15),   # the paper's base: 131000, 131296 and 10000 ... 130000
])
def test_an_eval_array_has_a_task_per_checkpoint_the_run_plans_to_keep(steps, every, keep_last, keep_every, count):
    cfg = load(None, ["model.config={hidden_size: 8}", "data.train.a.path=x", f"train.max_steps={steps}",
                      f"checkpoint.every_steps={every}", f"checkpoint.keep_last={keep_last}",
                      f"checkpoint.keep_every={keep_every}"])
    assert checkpoint_count(cfg) == count


def task_grid(root: Path, world: dict[str, Path], sets: bool) -> Path:
    """write_sweep's grid with lm-eval tasks set for every run by the grid, the base having eval.sets or not."""
    grid = write_sweep(root, world)
    if not sets:
        base = yaml.safe_load((root / "base.yaml").read_text())
        base["eval"] = {"sets": {}}
        (root / "base.yaml").write_text(yaml.safe_dump(base))
    raw = yaml.safe_load(grid.read_text())
    raw["set"] = {"eval.lm_eval": {"tasks": ["tiny_mc,tiny_ppl", "tiny_mc"], "num_fewshot": 0, "limit": 5,
                                   "include_path": [str(root / "tasks")]}}
    grid.write_text(yaml.safe_dump(raw))
    return grid


def task_args(root: Path) -> list[str]:
    """The `cpt eval` options of task_grid's tasks."""
    return ["--lm-eval", "tiny_mc,tiny_ppl", "--lm-eval-limit", "5", "--num-fewshot", "0", "--include-path",
            str(root / "tasks")]


def test_a_runs_lm_eval_tasks_go_to_its_eval_array_even_without_eval_sets(fake_slurm, tmp_path, capsys):
    grid = task_grid(tmp_path, paths_world(tmp_path), sets=False)
    assert submit(grid, capsys)[0] == "max_lr0.001: submitted train job 100, eval array 101 (2 task(s), after 100)"
    sweep = tmp_path / "sweep"
    assert calls(fake_slurm)[1]["args"][-10:] == [str(REPO / "launch" / "slurm" / "eval.sbatch"),
                                                  str(sweep / "runs" / RUNS[0]), *task_args(tmp_path)]
    saved = yaml.safe_load((sweep / "configs" / f"{RUNS[0]}.yaml").read_text())["eval"]
    assert (saved["sets"], saved["lm_eval"]["tasks"], saved["lm_eval"]["limit"]) == \
        ({}, ["tiny_mc,tiny_ppl", "tiny_mc"], 5)
    # Without tasks nor sets, no array (and a config without eval.lm_eval saves none).
    raw = yaml.safe_load(grid.read_text())
    del raw["set"]
    raw["out"] = str(tmp_path / "plain")
    grid.write_text(yaml.safe_dump(raw))
    assert submit(grid, capsys)[0] == "max_lr0.001: submitted train job 104, no eval array (the run has no " \
                                      "eval.sets nor eval.lm_eval)"
    assert "lm_eval" not in yaml.safe_load((tmp_path / "plain" / "configs" / f"{RUNS[0]}.yaml").read_text())["eval"]


def test_a_checkpoint_lacking_a_task_row_is_unscored_for_status_and_submit(fake_slurm, world, tmp_path, capsys):
    """Every loss row is there: a task row missing (or of another limit, few-shot count or dtype) leaves its
    checkpoint unscored, and the finished run gets an eval array that scores sets and tasks."""
    grid = task_grid(tmp_path, world, sets=True)
    submit(grid, capsys)
    set_queue(fake_slurm, ["100|100|COMPLETED|None", "101|101_[0-1]|CANCELLED|None", "102|102|RUNNING|None"])
    run_dir = tmp_path / "sweep" / "runs" / RUNS[0]
    ckpts = {step: (run_dir / "checkpoints" / f"global_step{step}").resolve() for step in (6, 12)}
    for path in ckpts.values():
        path.mkdir(parents=True)
        (path / "COMMITTED.json").write_text("{}")
    sets = open_sets([f"{name}={world[name]}:val" for name in ("code", "prose")])
    store = ScoreStore(run_dir / "scores.jsonl")
    store.append([measurement(str(p), s, 256, 16, "fp32") for p in ckpts.values() for s in sets])

    def task_row(step: int, request: str, **changed) -> dict:
        return {"checkpoint": str(ckpts[step]), "task": request, "request": request, "request_version": 1.0,
                "harness": "lm-eval 0.4.13", "task_version": 1.0, "num_fewshot": 0, "limit": 5, "dtype": "fp32",
                "metrics": {"acc": 0.5}, **changed}

    store.append([task_row(6, "tiny_mc"), task_row(6, "tiny_ppl"), task_row(12, "tiny_mc"),
                  task_row(12, "tiny_ppl", limit=6), task_row(12, "tiny_ppl", num_fewshot=1),
                  task_row(12, "tiny_ppl", dtype="bf16")])

    def unscored() -> list[str]:
        assert main(["sweep", "--grid", str(grid), "--status"]) == 0
        return capsys.readouterr().out.splitlines()[2].split()[3:6]

    assert unscored() == ["1", "of", "2"]
    assert submit(grid, capsys)[0] == \
        f"{RUNS[0]}: finished with 1 committed checkpoint(s) unscored: submitted eval array 104 (1 task(s))"
    assert calls(fake_slurm)[-1]["args"][-15:] == [str(run_dir), "--set", f"code={world['code']}:val", "--set",
                                                   f"prose={world['prose']}:val", "--tokens", "256", *task_args(tmp_path)]
    set_queue(fake_slurm, [])
    store.append([task_row(12, "tiny_ppl", task="tiny_ppl_sub", request_version=2.0, harness="lm-eval 9")])
    assert unscored() == ["0", "of", "2"]   # versions are not compared without the harness's index
    assert submit(grid, capsys)[0] == f"{RUNS[0]}: not submitted: finished at step 12"
