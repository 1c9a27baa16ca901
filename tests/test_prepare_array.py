"""launch/slurm/prepare.sbatch on the one-node SLURM cluster (tests/slurm_cluster.py), submitted as its
header says: an array of 4 elements over 12 input files and the merge chained after it (afterany).
One element is cancelled before it starts: the merge refuses, naming its tasks and the element; that
element alone submitted again (TASKS=4), cancelled as it runs (it keeps the task it finished),
submitted once more, and the merge again write the dataset a one-process prepare writes, byte
for byte, without touching what the other elements did; a few training steps run on it."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from continual_pt.data.tasks import KILL_AT
from tests import train_support as ts
from tests.helpers import REPO
from tests.test_prepare_resume import FLAGS, write_corpus
from tests.test_prepare_spread import PREPARE, one_process, same_dataset

ENV = {"PYTHON": sys.executable, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, data_docs) -> Path:
    return write_corpus(tmp_path_factory.mktemp("array") / "corpus", data_docs)


@pytest.fixture(scope="module")
def reference(corpus, data_tokenizer, tmp_path_factory):
    return one_process(corpus, data_tokenizer, tmp_path_factory.mktemp("one-process"))


def states(records: list[dict[str, str]]) -> list[tuple[str, str, str]]:
    return sorted((j.get("ArrayTaskId", "-"), j["JobState"], j["ExitCode"]) for j in records)


def done_files(shared: Path) -> dict[str, tuple[int, int]]:
    """Each completion record and shard of the shared folder: (inode, mtime) — rewritten files change both."""
    return {p.relative_to(shared).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in sorted((shared / "tasks").rglob("*")) if p.is_file() and p.name != "plan.json"}


@pytest.mark.slow
def test_an_array_with_a_cancelled_element_resubmitted_writes_the_one_process_dataset(slurm, tmp_path, corpus,
                                                                                       data_tokenizer, reference):
    out = tmp_path / "ds"
    args = ["-s", str(corpus), "-t", str(data_tokenizer), "-o", str(out), *FLAGS]
    options = ["--cpus-per-task=1", "--time=10"]
    array = slurm.submit(PREPARE, [*options, "--array=0-3", f"--output={tmp_path}/prep-%A_%a.log"], args, env=ENV,
                         cwd=tmp_path)
    slurm.run("scancel", f"{array}_3")   # two run at a time on the two CPUs: element 3 is still pending
    merge = slurm.submit(PREPARE, [*options, f"--dependency=afterany:{array}", f"--output={tmp_path}/merge-%j.log"],
                         ["--merge", *args], env=ENV, cwd=tmp_path)
    logs = [tmp_path / f"prep-{array}_{i}.log" for i in range(4)]
    records = slurm.wait(array, timeout=180, log=logs)
    # (a pending element cancelled may leave no record of its own)
    assert [s for s in states(records) if s[0] != "3"] == [(str(i), "COMPLETED", "0:0") for i in range(3)] and \
        all(s[1] == "CANCELLED" for s in states(records) if s[0] == "3"), slurm.report(array, "an element failed", logs)
    assert not logs[3].exists()
    merge_log = tmp_path / f"merge-{merge}.log"
    assert states(slurm.wait(merge, timeout=120, log=merge_log)) == [("-", "FAILED", "2:0")]
    text = merge_log.read_text()
    assert "cannot merge the tasks: task 3 (" in text and "9 of 12 task(s) are done: run array element(s) 3 again " \
        "(--task-count 4; prepare.sbatch: TASKS=4 sbatch --array=3 ...), then the merge" in text, text
    shared = tmp_path / "ds.tmp-tasks"
    before = done_files(shared)
    assert len([p for p in before if p.endswith(".done.json")]) == 9 and not out.exists()

    # Submitted again, it is cancelled while it runs (held still after its first task): it keeps that task.
    held = slurm.submit(PREPARE, [*options, "--array=3", f"--output={tmp_path}/prep-%A_%a.log"], args,
                        env={**ENV, "TASKS": "4", KILL_AT: "task-1:SIGSTOP"}, cwd=tmp_path)
    deadline = time.time() + 60
    while not (shared / "tasks" / "000003.done.json").exists():
        assert time.time() < deadline, slurm.report(held, "element 3 did no task", [tmp_path / f"prep-{held}_3.log"])
        time.sleep(0.2)
    slurm.run("scancel", held)
    assert states(slurm.wait(held, timeout=60))[0][1] == "CANCELLED"
    assert "cpt prepare: stopped by SIGTERM; kept 1 of this element's 3 task(s) (" in \
        (tmp_path / f"prep-{held}_3.log").read_text()
    again = slurm.submit(PREPARE, [*options, "--array=3", f"--output={tmp_path}/prep-%A_%a.log"], args,
                         env={**ENV, "TASKS": "4"}, cwd=tmp_path)
    merge = slurm.submit(PREPARE, [*options, f"--dependency=afterany:{again}", f"--output={tmp_path}/merge-%j.log"],
                         ["--merge", *args], env=ENV, cwd=tmp_path)
    element_log = tmp_path / f"prep-{again}_3.log"
    assert states(slurm.wait(again, timeout=120, log=element_log)) == [("3", "COMPLETED", "0:0")]
    assert "element 3 of 4: 2 task(s) done in this run, 1 done before, of its 3" in element_log.read_text()
    after = done_files(shared)
    assert {k: v for k, v in after.items() if k in before} == before   # the other elements' files untouched
    merge_log = tmp_path / f"merge-{merge}.log"
    assert states(slurm.wait(merge, timeout=120, log=merge_log)) == [("-", "COMPLETED", "0:0")], merge_log.read_text()
    same_dataset(out, reference)
    assert not shared.exists()

    cfg = ts.write_config(tmp_path / "run.yaml", {"code": out, "prose": out}, tmp_path / "runs", train={"max_steps": 3},
                          eval={"sets": {}})
    ts.train(cfg)
    assert [r["step"] for r in ts.train_records(tmp_path / "runs" / "run")] == [1, 2, 3]
