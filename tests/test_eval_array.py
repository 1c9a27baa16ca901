"""Evaluation arrays on the real one-node SLURM cluster (tests/slurm_cluster.py): the tasks of
launch/slurm/eval.sbatch claim checkpoints (`cpt eval --claim`), so every committed checkpoint is
scored exactly once whatever the array's size, and a task stores only the checkpoints its log names:
beside a training run that prunes (keep_last=2), chained by `cpt sweep --submit` to a run that is
requeued twice from outside (its stops write checkpoints the plan did not foresee), and on
lm-evaluation-harness tasks (each task row of each checkpoint written once)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from tests import train_support as ts
from tests.helpers import REPO
from tests.test_eval_tasks import OFFLINE, write_tasks
from tests.test_slurm import EVAL, committed_steps, running_past, submit_train, wait_until
from tests.test_sweep_submit import EVAL_ARGS, TRAIN_ARGS, cpt, jobs_json

TRAIN = {"micro_batch_size": 2, "grad_accum": 2, "precision": "fp32", "ds_config": "zero0", "log_every": 1}
STORED = re.compile(r"^cpt eval: stored (\d+) row\(s\) of (\S+) in ", re.M)
CLAIMED = re.compile(r"^cpt eval: claimed (\S+) \(step \d+\): scoring (\d+) set\(s\)(?: and (\d+) lm-eval task\(s\))?$",
                     re.M)
TASKS = ("tiny_mc", "tiny_ppl", "tiny_mc2")


def stored_by_task(logs: list[Path]) -> dict[str, list[str]]:
    """Each task log -> the checkpoints it says it stored, in order."""
    return {log.name: [m.group(2) for m in STORED.finditer(log.read_text())] for log in logs}


def assert_each_row_named_once(store: Path, logs: list[Path], sets: tuple[str, ...]) -> list[dict]:
    """Every row of the store is a checkpoint that exactly one task log names as stored, once per set."""
    text = "\n".join(f"--- {p.name}\n{p.read_text()}" for p in logs)
    assert "Traceback" not in text, text
    named = [c for paths in stored_by_task(logs).values() for c in paths]
    assert len(named) == len(set(named)), text
    rows = [json.loads(line) for line in store.read_text().splitlines()]
    assert sorted((r["checkpoint"], r["set"]) for r in rows) == sorted((c, s) for c in named for s in sets), text
    return rows


@pytest.mark.slow
def test_an_eval_array_beside_a_pruning_run_stores_only_what_each_task_named(slurm, world, tmp_path):
    cfg = ts.write_config(tmp_path / "run.yaml", world, tmp_path / "runs", train={"max_steps": 1000, **TRAIN},
                          eval={"sets": {}}, checkpoint={"every_steps": 50, "keep_last": 2})
    run_dir = tmp_path / "runs" / "pruning"
    train, train_log = submit_train(slurm, tmp_path, cfg, "pruning")
    wait_until(slurm, train, train_log, "a committed checkpoint", lambda r: committed_steps(run_dir))
    store = tmp_path / "scores.jsonl"
    args = [str(run_dir), "--set", f"code={world['code']}", "--set", f"prose={world['prose']}", "--tokens", "256",
            "--store", str(store)]
    env = {"PYTHON": sys.executable, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    options = ["--output=" + str(tmp_path / "eval-%A_%a.log"), "--gpus-per-task=0", "--cpus-per-task=1"]
    array = slurm.submit(EVAL, [*options, "--array=0-2"], args, env=env, cwd=tmp_path)
    logs = [tmp_path / f"eval-{array}_{i}.log" for i in range(3)]
    records = slurm.wait(array, timeout=240, log=logs)
    assert sorted((j["ArrayTaskId"], j["JobState"], j["ExitCode"]) for j in records) == \
        [(str(i), "COMPLETED", "0:0") for i in range(3)], slurm.report(array, "an eval task failed", logs)
    during = assert_each_row_named_once(store, logs, ("code", "prose"))
    assert during, "the array scored nothing beside the run"
    assert all("nothing left to score" in log.read_text() for log in logs)
    slurm.wait(train, timeout=240, log=train_log)
    assert committed_steps(run_dir) == [950, 1000]
    # After the run: an array of one task scores what the run kept and the first array had not.
    again = slurm.submit(EVAL, [*options, "--array=0"], args, env=env, cwd=tmp_path)
    slurm.wait(again, timeout=240, log=[tmp_path / f"eval-{again}_0.log"])
    rows = assert_each_row_named_once(store, [*logs, tmp_path / f"eval-{again}_0.log"], ("code", "prose"))
    scored = {r["step"] for r in rows}
    assert {950, 1000} <= scored and len(rows) == 2 * len(scored)


@pytest.mark.slow
def test_a_sweep_run_requeued_twice_has_every_checkpoint_scored_once(slurm, world, tmp_path):
    """keep_last (10) above the 3 planned saves; two `scontrol requeue` add two stop checkpoints: the
    chained 3-task array scores all 5, --status says none is left and a second --submit does nothing."""
    ts.write_config(tmp_path / "base.yaml", world, tmp_path / "unused", train={"max_steps": 300, **TRAIN},
                    checkpoint={"every_steps": 100, "keep_last": 10},
                    eval={"sets": {"code": str(world["code"]), "prose": str(world["prose"])}, "tokens": 256,
                          "every_steps": 300})
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"sweep": "one", "base": "base.yaml", "out": str(tmp_path / "sweep"),
                                    "grid": {"axes": {"schedule.max_lr": [1.0e-3]}}}))
    submit = ["sweep", "--grid", str(grid), "--submit", f"--train-sbatch-args={TRAIN_ARGS}",
              f"--eval-sbatch-args={EVAL_ARGS}"]
    cpt(slurm, tmp_path, submit)
    (name, [entry]), = jobs_json(tmp_path).items()
    assert entry["eval_tasks"] == 3
    run_dir, logs = tmp_path / "sweep" / "runs" / name, tmp_path / "sweep" / "logs"
    train_log = logs / f"cpt-train-{name}-{entry['train']}.log"
    wait_until(slurm, entry["train"], train_log, "past step 20", running_past(run_dir, 20, restarts=0))
    slurm.run("scontrol", "requeue", entry["train"])
    # SLURM counts the restart at once; the stopped start saves, exits 75, and the next one starts.
    wait_until(slurm, entry["train"], train_log, "restarted after its stop",
               lambda r: (r["JobState"], r["Restarts"]) == ("RUNNING", "1") and committed_steps(run_dir))
    first_stop = committed_steps(run_dir)[-1]
    wait_until(slurm, entry["train"], train_log, "resumed", running_past(run_dir, first_stop + 20, restarts=1))
    slurm.run("scontrol", "requeue", entry["train"])
    slurm.wait(entry["train"], timeout=240, log=train_log)
    eval_logs = [logs / f"cpt-eval-{name}-{entry['eval']}_{i}.log" for i in range(3)]
    records = slurm.wait(entry["eval"], timeout=240, log=eval_logs)
    assert sorted((j["ArrayTaskId"], j["JobState"], j["ExitCode"]) for j in records) == \
        [(str(i), "COMPLETED", "0:0") for i in range(3)], slurm.report(entry["eval"], "an eval task failed", eval_logs)
    steps = committed_steps(run_dir)
    assert len(steps) == 5 and {100, 200, 300} < set(steps), steps
    rows = assert_each_row_named_once(run_dir / "scores.jsonl", eval_logs, ("code", "prose"))
    assert sorted({r["step"] for r in rows}) == steps
    status = cpt(slurm, tmp_path, ["sweep", "--grid", str(grid), "--status"]).stdout.splitlines()
    assert status[2].split()[:6] == [name, "finished", "300", "0", "of", "5"], status
    again = cpt(slurm, tmp_path, submit).stdout
    assert f"{name}: not submitted: finished at step 300" in again, again


@pytest.fixture(scope="module")
def pretrained(world, tmp_path_factory):
    """The 12-step run of tests/test_evaluate.py (checkpoints at steps 4, 8, 12; never written to)."""
    return ts.continual_experiment(tmp_path_factory.getbasetemp() / "experiment", world, rewarm=False)["pre"]


def run_array(slurm, tmp_path: Path, tasks: int, args: list[str]) -> tuple[list[str], list[Path]]:
    """eval.sbatch as an array of `tasks` over `args`, offline, waited for: each task's (state, exit code)
    and its log."""
    env = {"PYTHON": sys.executable, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **OFFLINE}
    options = ["--output=" + str(tmp_path / "eval-%A_%a.log"), "--gpus-per-task=0", "--cpus-per-task=1"]
    array = slurm.submit(EVAL, [*options, f"--array=0-{tasks - 1}"], args, env=env, cwd=tmp_path)
    logs = [tmp_path / f"eval-{array}_{i}.log" for i in range(tasks)]
    records = slurm.wait(array, timeout=240, log=logs)
    return sorted((j["JobState"], j["ExitCode"]) for j in records), logs


@pytest.mark.slow
def test_an_eval_array_scores_each_lm_eval_task_of_each_checkpoint_once(slurm, pretrained, tmp_path):
    """3 tasks x 2 checkpoints by an array of 2: every task row is written once, by the task whose log
    claims its checkpoint, and a second array scores nothing. A task whose data is missing fails each
    array task with one line, before any claim."""
    pytest.importorskip("lm_eval")
    tasks, broken = write_tasks(tmp_path / "tasks"), write_tasks(tmp_path / "broken")
    (broken / "mc2.jsonl").unlink()
    ckpts = [str((pretrained / "checkpoints" / f"global_step{step}").resolve()) for step in (4, 8)]
    store = tmp_path / "scores.jsonl"
    states, logs = run_array(slurm, tmp_path, 2, [ckpts[0], "--lm-eval", "tiny_mc,tiny_mc2", "--include-path",
                                                  str(broken), "--store", str(store)])
    assert states == [("FAILED", "2:0")] * 2
    for log in logs:
        text = log.read_text()
        assert text.count("cpt eval: error: ") == 1 and "cpt eval: error: lm-eval task tiny_mc2: its data could " \
            "not be loaded (FileNotFoundError: Unable to find " in text, text
        assert "Traceback" not in text and "claimed" not in text and "bad input" in text, text
    assert not store.exists()
    args = [*ckpts, "--lm-eval", ",".join(TASKS), "--include-path", str(tasks), "--store", str(store)]
    states, logs = run_array(slurm, tmp_path, 2, args)
    text = "\n".join(f"--- {p.name}\n{p.read_text()}" for p in logs)
    assert states == [("COMPLETED", "0:0")] * 2 and "Traceback" not in text, text
    claims = [(m.group(1), m.group(2), m.group(3)) for log in logs for m in CLAIMED.finditer(log.read_text())]
    assert sorted(claims) == [(c, "0", "3") for c in ckpts], text
    stored = [c for paths in stored_by_task(logs).values() for c in paths]
    assert sorted(stored) == ckpts and all(f"stored 3 row(s) of {c} in {store}" in text for c in ckpts), text
    rows = [json.loads(line) for line in store.read_text().splitlines()]
    assert sorted((r["checkpoint"], r["task"]) for r in rows) == sorted((c, t) for c in ckpts for t in TASKS)
    assert {(r["request"], r["num_fewshot"], r["limit"], r["dtype"]) for r in rows} == \
        {(t, None, None, "fp32") for t in TASKS}
    # Everything is scored: a second array claims nothing and writes nothing.
    before = store.read_text()
    states, again = run_array(slurm, tmp_path, 2, args)
    assert states == [("COMPLETED", "0:0")] * 2
    for log in again:
        assert "claimed" not in log.read_text() and "this job scored 0 checkpoint(s)" in log.read_text()
    assert store.read_text() == before
