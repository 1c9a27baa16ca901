"""`cpt prepare` keeps its done tasks: killed (SIGKILL at a chosen point: after the k-th completion
record, in the merge, after the manifest) or stopped (SIGTERM, Ctrl-C: exit 75) and run again, it does
only the rest and writes the dataset an uninterrupted run writes, byte for byte; changed arguments or
inputs of done tasks are refused by name; a bad input fails its task alone; --status says how far it is.

The points are chosen by CPT_PREPARE_KILL_AT (data/tasks.py), which signals the process there."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import zstandard

from continual_pt.cli import main
from continual_pt.data.dataset import PreparedDataset
from continual_pt.data.merge import check_done
from continual_pt.data.tasks import KILL_AT, Task
from continual_pt.errors import UserError
from continual_pt.layout import EXIT_OK, EXIT_RESUMABLE, EXIT_USAGE
from tests.helpers import prepare_quietly

REPO = Path(__file__).resolve().parents[1]
FILES = 12
ARGS = {"val_fraction": 0.2, "shard_tokens": 3000, "domain_field": "meta.kind", "unknown_domain": "other"}
FLAGS = ["--val-fraction", "0.2", "--shard-tokens", "3000", "--domain-field", "meta.kind", "--unknown-domain", "other"]
ZST = 5
"""The task whose file is a .jsonl.zst (the others are .jsonl)."""


def _records(docs: list[str], i: int) -> bytes:
    kinds = ("prose", "code", None, f"kind{i % 4}")
    return "".join(json.dumps({"text": d, **({"meta": {"kind": kinds[j % 4]}} if kinds[j % 4] else {})}) + "\n"
                   for j, d in enumerate(docs)).encode()


def write_corpus(root: Path, docs) -> Path:
    """12 small input files (one of them zstd-compressed), one task each."""
    root.mkdir()
    for i in range(FILES):
        data = _records(docs(400 if i == ZST else 25, seed=100 + i), i)
        if i == ZST:   # two frames, the first longer than what prepare probes before it starts (64 kB)
            cut = data.index(b"\n", len(data) // 2) + 1
            frames = [zstandard.ZstdCompressor().compress(part) for part in (data[:cut], data[cut:])]
            (root / f"f{i:02d}.jsonl.zst").write_bytes(b"".join(frames))
            (root / ".second-frame").write_text(str(len(frames[1])))
        else:
            (root / f"f{i:02d}.jsonl").write_bytes(data)
    return root


def snapshot(out: Path) -> tuple[dict[str, str], dict]:
    """sha256 of every file but the manifest, and the manifest without its time and the run's own options."""
    files = {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(out.rglob("*")) if p.is_file() and p.name != "manifest.json"}
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.pop("created_utc")
    for key in ("out", "quiet", "workers"):
        manifest["args"].pop(key)
    return files, manifest


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, data_docs) -> Path:
    return write_corpus(tmp_path_factory.mktemp("resume") / "corpus", data_docs)


@pytest.fixture(scope="module")
def reference(corpus, data_tokenizer, tmp_path_factory):
    """The dataset of an uninterrupted run."""
    out = tmp_path_factory.mktemp("reference") / "ds"
    prepare_quietly([corpus], data_tokenizer, out, workers=2, **ARGS)
    return snapshot(out)


def cpt(*argv: str) -> subprocess.CompletedProcess:
    """`cpt ARGV` in this process (faster than a new one), its exit status and output."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(list(argv))
    return subprocess.CompletedProcess(argv, rc, stdout.getvalue(), stderr.getvalue())


def cpt_prepare(corpus: Path, tokenizer: Path, out: Path, kill_at: str | None = None, *extra: str,
                workers: int = 2, own_process: bool = False) -> subprocess.CompletedProcess:
    """`cpt prepare` of the corpus; with `kill_at`, in a process of its own that CPT_PREPARE_KILL_AT signals."""
    argv = ["prepare", "-s", str(corpus), "-t", str(tokenizer), "-o", str(out), "--workers", str(workers), *FLAGS,
            *extra]
    if not (kill_at or own_process):
        return cpt(*argv)
    env = {k: v for k, v in os.environ.items() if k != KILL_AT} | ({KILL_AT: kill_at} if kill_at else {})
    return subprocess.run([sys.executable, "-m", "continual_pt.cli", *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


def work_dir(out: Path) -> Path:
    found = list(out.parent.glob(f"{out.name}.tmp-*"))
    assert len(found) == 1, found
    return found[0]


def done_before(proc: subprocess.CompletedProcess) -> tuple[int, int]:
    """(tasks done in this run, tasks done before) from the summary."""
    match = re.search(r"(\d+) task\(s\) of 12 done in this run(?:, (\d+) done before)?", proc.stdout)
    assert match, proc.stdout + proc.stderr
    return int(match.group(1)), int(match.group(2) or 0)


@pytest.mark.parametrize("kills, kept", [
    (["task-1"], 1),
    (["task-4", "task-3"], 7),         # killed twice: each run keeps what it did
    (["merge"], FILES),                # halfway through writing the dataset's shards
    (["cleanup"], FILES),              # manifest written, the tasks' files being removed
])
def test_killed_anywhere_a_rerun_finishes_the_same_dataset(tmp_path, corpus, data_tokenizer, reference, kills, kept):
    out = tmp_path / "ds"
    for point in kills:
        proc = cpt_prepare(corpus, data_tokenizer, out, point, workers=1 if point == "task-3" else 2)
        assert proc.returncode == -9, proc.stderr
        assert not out.exists() and work_dir(out).is_dir()
    proc = cpt_prepare(corpus, data_tokenizer, out)
    assert proc.returncode == EXIT_OK, proc.stderr
    if kills[0].startswith("task-"):
        assert done_before(proc) == (FILES - kept, kept)
    assert snapshot(out) == reference
    assert not list(tmp_path.glob("ds.tmp-*"))
    assert PreparedDataset(out).num_docs == reference[1]["splits"]["train"]["num_docs"]


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_sigterm_or_ctrl_c_exits_75_keeping_the_done_tasks(tmp_path, corpus, data_tokenizer, reference, signame):
    out = tmp_path / "ds"
    proc = cpt_prepare(corpus, data_tokenizer, out, f"task-3:{signame}")
    assert proc.returncode == EXIT_RESUMABLE, proc.stderr
    tokens = sum(r["num_tokens"] for r in reference[1]["tasks"][:3])
    assert proc.stderr.splitlines()[-1] == (
        f"cpt prepare: stopped by {signame}; kept 3 of 12 task(s) ({tokens:,} tokens) in {work_dir(out)}; run the "
        "same command again to do the rest")
    proc = cpt_prepare(corpus, data_tokenizer, out)
    assert proc.returncode == EXIT_OK and done_before(proc) == (9, 3)
    assert snapshot(out) == reference


def test_changed_arguments_or_inputs_of_done_tasks_are_refused(tmp_path, data_docs, data_tokenizer):
    corpus = write_corpus(tmp_path / "corpus", data_docs)
    out = tmp_path / "ds"
    assert cpt_prepare(corpus, data_tokenizer, out, "task-2").returncode == -9
    work = work_dir(out)
    proc = cpt_prepare(corpus, data_tokenizer, out, None, "--val-fraction", "0.3")   # the last one counts
    assert proc.returncode == EXIT_USAGE
    assert re.search(r"holds 2 done task\(s\) .*--val-fraction: 0\.2 then, 0\.3 now; run the same command as before "
                     r"to finish it, or pass --overwrite to start again", proc.stderr), proc.stderr
    done = corpus / "f00.jsonl"
    size = done.stat().st_size
    done.write_bytes(done.read_bytes() + b'{"text": "one more"}\n')
    proc = cpt_prepare(corpus, data_tokenizer, out)
    assert proc.returncode == EXIT_USAGE
    assert f"the input of done task 0 changed ({done.resolve()}: size {size} then, {size + 21} now)" in proc.stderr
    assert work_dir(out) == work   # refused: the kept tasks are still there
    # A file whose task is not done may change (fetched again); --overwrite starts over.
    (corpus / "f11.jsonl").write_bytes(_records(data_docs(3, seed=7), 11))
    done.write_bytes(done.read_bytes()[:size])
    proc = cpt_prepare(corpus, data_tokenizer, out, None, "--overwrite")
    assert proc.returncode == EXIT_OK and done_before(proc) == (12, 0), proc.stderr


def test_a_bad_input_fails_its_task_alone_and_status_names_it(tmp_path, data_docs, data_tokenizer, reference):
    corpus = write_corpus(tmp_path / "corpus", data_docs)
    out = tmp_path / "ds"
    zst = corpus / f"f{ZST:02d}.jsonl.zst"
    whole = zst.read_bytes()
    zst.write_bytes(whole[:len(whole) - int((corpus / ".second-frame").read_text()) // 2])
    bad = corpus / "f08.jsonl"
    good = bad.read_bytes()
    lines = good.split(b"\n")
    lines[3] = lines[3].replace(b'{"text"', b'{"body"')   # not the first record, which prepare probes at once
    bad.write_bytes(b"\n".join(lines))
    proc = cpt_prepare(corpus, data_tokenizer, out, own_process=True)   # then gone, as --status says
    assert proc.returncode == EXIT_USAGE, proc.stderr
    work = work_dir(out)
    assert proc.stderr.splitlines()[-1] == (
        f"cpt prepare: error: cannot merge the tasks: task {ZST} ({zst}) failed: {zst}: truncated file: the zstd stream "
        "ends inside a frame; the file is incomplete (an interrupted download or copy?): fetch it again; task 8 "
        f"({bad}) failed: {bad}:4: no field 'text' (fields: body, meta); choose one with --text-field; the 10 done "
        f"task(s) are kept in {work}: fix the input(s) and run the same command again to do the rest")
    status = cpt("prepare", "--status", str(out))
    lines = status.stdout.splitlines()
    assert re.fullmatch(rf"{re.escape(str(work))}: stopped \(run the same command again to resume\): 12 task\(s\): "
                        r"10 done, 2 failed, 0 absent; [\d,]+ tokens so far", lines[0]), status.stdout
    assert lines[1].startswith(f"  failed: task {ZST} ({zst}): {zst}: truncated file")
    assert lines[2].startswith(f"  failed: task 8 ({bad}): {bad}:4: no field 'text'")
    zst.write_bytes(whole)
    bad.write_bytes(good)
    proc = cpt_prepare(corpus, data_tokenizer, out)
    assert proc.returncode == EXIT_OK and done_before(proc) == (2, 10)


def test_status_counts_done_and_absent_tasks_then_the_dataset(tmp_path, corpus, data_tokenizer, reference):
    out = tmp_path / "ds"

    def status() -> str:
        proc = cpt("prepare", "--status", str(out))
        assert proc.returncode == EXIT_OK, proc.stderr
        return proc.stdout

    assert status() == f"{out}: no prepared dataset and no prepare in progress\n"
    assert cpt_prepare(corpus, data_tokenizer, out, "task-4").returncode == -9
    tokens = sum(r["num_tokens"] for r in reference[1]["tasks"][:4])
    assert status() == (f"{work_dir(out)}: stopped (run the same command again to resume): 12 task(s): 4 done, "
                        f"0 failed, 8 absent; {tokens:,} tokens so far\n")
    assert cpt_prepare(corpus, data_tokenizer, out).returncode == EXIT_OK
    splits = reference[1]["splits"]
    assert status() == (f"{out}: complete: 12 task(s) done, {sum(s['num_tokens'] for s in splits.values()):,} "
                        f"tokens, {sum(s['num_docs'] for s in splits.values()):,} documents\n")


def test_the_merge_names_the_tasks_not_done():
    task_list = [Task(0, 0, (Path("a.jsonl"),)), Task(1, 0, (Path("b.jsonl"),)), Task(2, 0, (Path("c.jsonl"),))]
    failed = {2: {"input": "c.jsonl", "error": "c.jsonl:3: broken JSON line"}}
    with pytest.raises(UserError) as info:
        check_done(task_list, {0: {}}, failed, [])
    assert str(info.value) == ("cannot merge the tasks: task 2 (c.jsonl) failed: c.jsonl:3: broken JSON line; "
                               "task 1 (b.jsonl) is not done")
