"""`cpt prepare` spread over the elements of a job array: element I of N (--task-index I --task-count N)
does its share of the tasks in the shared folder <out>.tmp-tasks, and --merge writes the dataset a
one-process prepare of the same inputs writes, refusing while a task is missing or failed and naming
the elements to run again; on the one-node SLURM cluster, launch/slurm/prepare.sbatch as an array of
4 with the merge chained after it, one element cancelled and resubmitted, and a few training steps
on the result."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from continual_pt.layout import EXIT_OK, EXIT_RESUMABLE, EXIT_USAGE
from tests.helpers import REPO, prepare_quietly
from tests.test_prepare_resume import ARGS, cpt, cpt_prepare, snapshot, write_corpus

PREPARE = REPO / "launch" / "slurm" / "prepare.sbatch"
SPREAD = ("task_index", "task_count", "merge")


def one_process(src: Path, tokenizer: Path, root: Path):
    """The snapshot of a one-process prepare of `src` (tests/test_prepare_resume.py's options)."""
    prepare_quietly([src], tokenizer, root / "ds", workers=2, **ARGS)
    return snapshot(root / "ds")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, data_docs) -> Path:
    return write_corpus(tmp_path_factory.mktemp("spread") / "corpus", data_docs)


@pytest.fixture(scope="module")
def reference(corpus, data_tokenizer, tmp_path_factory):
    return one_process(corpus, data_tokenizer, tmp_path_factory.mktemp("one-process"))


def same_dataset(out: Path, expected) -> None:
    """Byte for byte the one-process dataset; the manifest too, but the options that say how it was run."""
    files, manifest = snapshot(out)
    for key in SPREAD:
        manifest["args"].pop(key)
        expected[1]["args"].pop(key, None)
    assert files == expected[0]
    assert manifest == expected[1]


def element(src: Path, tokenizer: Path, out: Path, index: int, count: int, *extra: str, **kw):
    return cpt_prepare(src, tokenizer, out, None, "--task-index", str(index), "--task-count", str(count), *extra,
                       **kw)


def merge(src: Path, tokenizer: Path, out: Path, *extra: str):
    return cpt_prepare(src, tokenizer, out, None, "--merge", *extra)


def test_elements_then_the_merge_write_the_one_process_dataset(tmp_path, corpus, data_tokenizer, reference):
    out = tmp_path / "ds"
    shared = tmp_path / "ds.tmp-tasks"
    for index in (2, 0):
        proc = element(corpus, data_tokenizer, out, index, 4)
        assert proc.returncode == EXIT_OK, proc.stderr
        assert f"element {index} of 4: 3 task(s) done in this run, 0 done before, of its 3" in proc.stdout
    assert sorted(p.name for p in (shared / "tasks").glob("*.done.json")) == \
        [f"{i:06d}.done.json" for i in (0, 2, 4, 6, 8, 10)]
    proc = merge(corpus, data_tokenizer, out)
    assert proc.returncode == EXIT_USAGE and not out.exists()
    assert re.search(r"cannot merge the tasks: task 1 \(\S+f01\.jsonl\) is not done; task 3 .* and 1 more task\(s\) "
                     r"not done; 6 of 12 task\(s\) are done: run array element\(s\) 1,3 again \(--task-count 4; "
                     r"prepare\.sbatch: TASKS=4 sbatch --array=1,3 \.\.\.\), then the merge", proc.stderr), proc.stderr
    status = cpt("prepare", "--status", str(out)).stdout
    assert re.fullmatch(rf"{re.escape(str(shared))}: spread over 4 element\(s\) \(--task-count\), then --merge: 12 "
                        r"task\(s\): 6 done, 0 failed, 6 running or to do; [\d,]+ tokens so far\n", status), status
    # An element with another count or other arguments is refused: its share would overlap the others'.
    proc = element(corpus, data_tokenizer, out, 1, 2)
    assert proc.returncode == EXIT_USAGE
    assert "its tasks are spread over 4 elements, this one says --task-count 2: pass --task-count 4" in proc.stderr
    proc = element(corpus, data_tokenizer, out, 1, 4, "--val-fraction", "0.3")
    assert proc.returncode == EXIT_USAGE and "--val-fraction: 0.2 then, 0.3 now" in proc.stderr, proc.stderr
    for index in (1, 3):
        assert element(corpus, data_tokenizer, out, index, 4, workers=1).returncode == EXIT_OK
    again = element(corpus, data_tokenizer, out, 3, 4)   # nothing left to do: nothing rewritten
    assert "0 task(s) done in this run, 3 done before" in again.stdout
    proc = merge(corpus, data_tokenizer, out)
    assert proc.returncode == EXIT_OK, proc.stderr
    assert proc.stdout.startswith(f"{out}: merged 12 task(s): train: ")
    same_dataset(out, reference)
    assert not shared.exists()


def test_a_stopped_element_keeps_its_tasks_and_a_killed_merge_is_finished(tmp_path, corpus, data_tokenizer,
                                                                          reference):
    out = tmp_path / "ds"
    argv = ["--task-index", "0", "--task-count", "2"]
    proc = cpt_prepare(corpus, data_tokenizer, out, "task-2:SIGTERM", *argv)
    assert proc.returncode == EXIT_RESUMABLE, proc.stderr
    assert re.search(r"stopped by SIGTERM; kept 2 of this element's 6 task\(s\) \([\d,]+ tokens\) in "
                     rf"{re.escape(str(out))}\.tmp-tasks", proc.stderr), proc.stderr
    proc = element(corpus, data_tokenizer, out, 0, 2)
    assert proc.returncode == EXIT_OK and "4 task(s) done in this run, 2 done before, of its 6" in proc.stdout
    assert element(corpus, data_tokenizer, out, 1, 2).returncode == EXIT_OK
    proc = cpt_prepare(corpus, data_tokenizer, out, "merge:SIGTERM", "--merge")
    assert proc.returncode == EXIT_RESUMABLE
    assert proc.stderr.splitlines()[-1] == (f"cpt prepare: stopped by SIGTERM; kept the 12 done task(s) in {out}.tmp-tasks "
                                            "(the merge starts again); run the same command again to do the rest")
    for point in ("merge", "cleanup"):
        assert cpt_prepare(corpus, data_tokenizer, out, point, "--merge").returncode == -9
        assert not out.exists()
    proc = merge(corpus, data_tokenizer, out)
    assert proc.returncode == EXIT_OK, proc.stderr
    same_dataset(out, reference)


def test_the_array_ids_come_from_slurm_and_are_checked(tmp_path, corpus, data_tokenizer, monkeypatch):
    out = tmp_path / "ds"
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.delenv("SLURM_ARRAY_TASK_COUNT", raising=False)
    proc = cpt_prepare(corpus, data_tokenizer, out, None, "--task-count", "6")
    assert proc.returncode == EXIT_OK and "element 1 of 6: 2 task(s) done in this run" in proc.stdout, proc.stderr
    proc = cpt_prepare(corpus, data_tokenizer, out, None, "--task-index", "1")
    assert proc.returncode == EXIT_USAGE
    assert "--task-count is needed (or $SLURM_ARRAY_TASK_COUNT, which a SLURM job array sets)" in proc.stderr
    proc = element(corpus, data_tokenizer, out, 6, 6)
    assert proc.returncode == EXIT_USAGE and "--task-index 6 --task-count 6: the index must lie in" in proc.stderr
    proc = cpt_prepare(corpus, data_tokenizer, out, None, "--merge", "--task-count", "6")
    assert proc.returncode == EXIT_USAGE and "--merge merges what the elements" in proc.stderr
    # Without --task-index/--task-count a prepare is whole, even inside an array.
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "6")
    proc = cpt_prepare(corpus, data_tokenizer, tmp_path / "whole")
    assert proc.returncode == EXIT_OK and "12 task(s) of 12 done in this run" in proc.stdout, proc.stderr
