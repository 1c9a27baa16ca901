"""cpt eval --lm-eval: downstream tasks of lm-evaluation-harness on our checkpoints, offline, against the
harness's own CLI on the checkpoint's export; the store's bookkeeping for task rows; without the extra."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from continual_pt.cli import main
from continual_pt.evaluation.store import read_scores
from tests import train_support as ts

pytestmark = pytest.mark.usefixtures("one_thread")
pytest.importorskip("lm_eval")

WORDS = "the model learning rate tokens of a corpus and he that shall lord".split()
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def run(world, tmp_path_factory):
    """The 12-step run of tests/test_evaluate.py (checkpoints at steps 4, 8, 12; never written to)."""
    return ts.continual_experiment(tmp_path_factory.getbasetemp() / "experiment", world, rewarm=False)["pre"]


def write_tasks(folder: Path) -> Path:
    """Three offline tasks over local JSON files: a multiple-choice one (short enough for the tiny
    model's 16-token context), a rolling-perplexity one and a second multiple-choice one."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for name, docs in (("mc", 24), ("mc2", 12)):
        with open(folder / f"{name}.jsonl", "w") as f:
            for _ in range(docs):
                f.write(json.dumps({"question": " ".join(rng.choice(WORDS) for _ in range(3)),
                                    "choices": [rng.choice(WORDS) for _ in range(3)],
                                    "answer": rng.randrange(3)}) + "\n")
        (folder / f"tiny_{name}.yaml").write_text(
            f"task: tiny_{name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / name}.jsonl\n"
            "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{question}}\"\n"
            "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{answer}}\"\n"
            "metric_list:\n  - metric: acc\n  - metric: acc_norm\nmetadata:\n  version: 1.0\n")
    with open(folder / "ppl.jsonl", "w") as f:
        for _ in range(8):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(30))}) + "\n")
    (folder / "tiny_ppl.yaml").write_text(
        f"task: tiny_ppl\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'ppl.jsonl'}\n"
        "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"
        "metadata:\n  version: 2.0\n")
    (folder / "tiny_group.yaml").write_text("group: tiny_group\ntask:\n  - tiny_mc\n  - tiny_mc2\n"
                                            "aggregate_metric_list:\n  - metric: acc\n    weight_by_size: true\n"
                                            "metadata:\n  version: 3.0\n")
    return folder


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    return write_tasks(tmp_path_factory.mktemp("lm_eval_tasks"))


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)


def lm_eval_cli(model: Path, tasks: Path, names: str, out: Path, *extra: str) -> dict:
    """The harness's own CLI on a Hugging Face folder; its results JSON."""
    # A process of its own, as a user runs it: none of the distributed variables an in-process DeepSpeed
    # engine of an earlier test left in this worker's environment (LOCAL_RANK makes accelerate expect RANK).
    env = {k: v for k, v in {**ts.env(), **OFFLINE, "OMP_NUM_THREADS": "1"}.items()
           if k not in ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK", "CROSS_SIZE")}
    proc = subprocess.run([os.path.join(os.path.dirname(sys.executable), "lm_eval"), "--model", "hf",
                           "--model_args", f"pretrained={model},dtype=float32", "--tasks", names,
                           "--include_path", str(tasks), "--device", "cpu", "--output_path", str(out), *extra],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    found = sorted(out.rglob("results_*.json"))
    assert len(found) == 1, found
    return json.loads(found[0].read_text())


def task_rows(store: Path) -> dict[str, dict]:
    return {r["task"]: r for r in read_scores(store) if "task" in r}


def test_task_metrics_equal_the_harness_cli_on_the_export(run, tasks, tmp_path, capsys):
    ckpt = run / "checkpoints" / "global_step12"
    store = tmp_path / "scores.jsonl"
    assert main(["eval", str(ckpt), "--lm-eval", "tiny_mc,tiny_ppl", "--include-path", str(tasks),
                 "--store", str(store)]) == 0
    printed = capsys.readouterr().out
    assert "tiny_mc (0-shot, 24 docs): acc " in printed and "tiny_ppl (0-shot, 8 docs): word_perplexity" in printed
    rows = task_rows(store)
    hf = tmp_path / "hf"
    assert main(["export", str(ckpt), "--out", str(hf)]) == 0
    theirs = lm_eval_cli(hf, tasks, "tiny_mc,tiny_ppl", tmp_path / "cli")
    from importlib.metadata import version
    for task in ("tiny_mc", "tiny_ppl"):
        row, expected = rows[task], theirs["results"][task]
        assert (row["harness"], row["task_version"], row["request_version"]) == \
            (f"lm-eval {version('lm-eval')}", theirs["versions"][task], theirs["versions"][task])
        assert (row["n_shot"], row["num_fewshot"], row["limit"], row["samples"], row["step"], row["dtype"]) == \
            (0, None, None, {"tiny_mc": 24, "tiny_ppl": 8}[task], 12, "fp32")
        for key, value in expected.items():
            metric, _, kind = key.partition(",")
            if kind != "none":
                continue
            ours = row["stderr"][metric[:-7]] if metric.endswith("_stderr") else row["metrics"][metric]
            if value == "N/A":
                assert ours is None, (task, key)
            else:   # the harness prints 4 decimals; both ran the same forwards, so they agree far beyond
                assert f"{ours:.4f}" == f"{value:.4f}" and ours == pytest.approx(value, rel=1e-9), (task, key)
    assert set(rows["tiny_mc"]["metrics"]) == {"acc", "acc_norm"}


def test_a_rerun_scores_nothing_twice_and_other_settings_are_other_rows(run, tasks, tmp_path, capsys):
    store = tmp_path / "scores.jsonl"
    args = ["eval", str(run), "--lm-eval", "tiny_mc2", "--include-path", str(tasks), "--store", str(store),
            "--lm-eval-limit", "5"]
    assert main(args) == 0
    assert "3 checkpoint(s) x 0 set(s) + 1 lm-eval task(s), all tokens per set: 3 to score" in capsys.readouterr().err
    first = read_scores(store)
    assert sorted((r["step"], r["task"], r["samples"], r["limit"]) for r in first) == \
        [(4, "tiny_mc2", 5, 5), (8, "tiny_mc2", 5, 5), (12, "tiny_mc2", 5, 5)]
    assert main(args) == 0
    assert "0 to score, 3 already scored" in capsys.readouterr().err
    assert read_scores(store) == first
    assert main([*args, "--num-fewshot", "1", "--task-index", "2"]) == 0   # another measurement: scored
    rows = read_scores(store)
    assert len(rows) == 4 and rows[:3] == first and (rows[3]["num_fewshot"], rows[3]["n_shot"]) == (1, 1)
    assert main(["eval", str(run), "--lm-eval", "tiny_mc2", "--include-path", str(tasks), "--store", str(store),
                 "--lm-eval-limit", "5", "--list"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith("; 0 not yet scored on every --lm-eval task")


def test_a_group_is_one_request_with_a_row_per_subtask_and_its_aggregate(run, tasks, tmp_path, capsys):
    store = tmp_path / "scores.jsonl"
    args = ["eval", str(run / "checkpoints" / "global_step4"), "--lm-eval", "tiny_group,tiny_mc",
            "--include-path", str(tasks), "--store", str(store), "--lm-eval-limit", "4"]
    assert main(args) == 0
    rows = read_scores(store)
    assert sorted((r["request"], r["task"], r["request_version"], r["samples"]) for r in rows) == \
        [("tiny_group", "tiny_group", 3.0, None), ("tiny_group", "tiny_mc", 3.0, 4), ("tiny_group", "tiny_mc2", 3.0, 4),
         ("tiny_mc", "tiny_mc", 1.0, 4)]
    group = {r["task"]: r for r in rows if r["request"] == "tiny_group"}
    assert group["tiny_group"]["metrics"]["acc"] == pytest.approx(
        (group["tiny_mc"]["metrics"]["acc"] + group["tiny_mc2"]["metrics"]["acc"]) / 2)
    assert [r for r in rows if r["request"] == "tiny_mc"][0]["metrics"] == group["tiny_mc"]["metrics"]
    capsys.readouterr()
    assert main(args) == 0
    assert "0 to score, 2 already scored" in capsys.readouterr().err and read_scores(store) == rows


def test_without_the_extra_lm_eval_says_how_to_install_it_and_nothing_else_changes(run, world, tmp_path,
                                                                                   monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)   # as if not installed: `import lm_eval` fails
    store = tmp_path / "scores.jsonl"
    ckpt = str(run / "checkpoints" / "global_step12")
    assert main(["eval", ckpt, "--set", f"code={world['code']}", "--lm-eval", "hellaswag", "--store", str(store)]) == 2
    err = capsys.readouterr().err
    assert "--lm-eval needs lm-evaluation-harness, which is not installed: pip install -e '.[lm-eval]'" in err, err
    assert "Traceback" not in err and not store.exists()
    assert main(["eval", ckpt, "--set", f"code={world['code']}", "--tokens", "64", "--store", str(store)]) == 0
    assert [r["set"] for r in read_scores(store)] == ["code"]


def test_bad_task_requests_fail_before_anything_is_written(run, tasks, tmp_path, capsys):
    store = tmp_path / "scores.jsonl"
    ckpt = str(run / "checkpoints" / "global_step12")
    hub = tmp_path / "hub_tasks"
    hub.mkdir()
    (hub / "hub_mc.yaml").write_text((tasks / "tiny_mc.yaml").read_text().replace("task: tiny_mc", "task: hub_mc")
                                     .split("dataset_kwargs")[0].replace("json", "someone/not-cached") +
                                     "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{question}}\"\n"
                                     "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{answer}}\"\n")
    cases = {("--lm-eval", "no_such_task", "--include-path", str(tasks)): "unknown task(s) no_such_task",
             ("--lm-eval", "tiny_mc,", "--include-path", str(tasks)): "an empty task name",
             ("--lm-eval", "tiny_mc", "--include-path", str(tmp_path / "nowhere")): "not a folder",
             ("--lm-eval", "tiny_mc", "--include-path", str(tasks), "--lm-eval-limit", "2.5"): "whole number"}
    for args, message in cases.items():
        assert main(["eval", ckpt, *args, "--store", str(store)]) == 2, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (args, err)
    # A task whose data is on the hub, not in the cache, with the hub out of reach (offline mode is read
    # when huggingface_hub is imported: a process of its own).
    proc = subprocess.run([sys.executable, "-m", "continual_pt.evaluate", ckpt, "--lm-eval", "hub_mc",
                           "--include-path", str(hub), "--store", str(store)],
                          env={**ts.env(), **OFFLINE}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "lm-eval task hub_mc: its data could not be loaded (ConnectionError: Couldn't reach " \
           "'someone/not-cached' on the Hub" in proc.stderr and "--include-path" in proc.stderr.splitlines()[-1]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not store.exists()


@pytest.mark.slow
def test_two_ranks_share_the_requests_and_store_what_one_rank_stores(run, tasks, tmp_path):
    """Under torchrun each rank evaluates its share of the requests; rank 0 stores them all, in order."""
    from tests.helpers import free_port

    ckpt = str(run / "checkpoints" / "global_step8")
    args = [ckpt, "--lm-eval", "tiny_mc,tiny_ppl", "--lm-eval-limit", "6", "--include-path", str(tasks)]
    env = {**ts.env(), **OFFLINE, "OMP_NUM_THREADS": "1"}
    for store, launch in ((tmp_path / "one.jsonl", [sys.executable, "-m", "continual_pt.evaluate"]),
                          (tmp_path / "two.jsonl", ["torchrun", "--nproc_per_node", "2", "--master_port",
                                                    str(free_port()), "-m", "continual_pt.evaluate"])):
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
        proc = subprocess.run([*launch, *args, "--store", str(store)], env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
    one, two = read_scores(tmp_path / "one.jsonl"), read_scores(tmp_path / "two.jsonl")
    assert [r["task"] for r in two] == ["tiny_mc", "tiny_ppl"] and [r["world_size"] for r in two] == [2, 2]
    for a, b in zip(one, two):
        assert (a["metrics"], a["stderr"], a["samples"]) == (b["metrics"], b["stderr"], b["samples"]) and a["samples"] == 6
