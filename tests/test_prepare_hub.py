"""A hub dataset (hf:NAME) splits into tasks by its own files, each streaming only its file: tested
offline on a local folder in the hub's layout (data/train/*.jsonl.zst, data/validation/), which
`datasets.load_dataset` streams as it streams a hub repository. The dataset is the one the same files
read from disk give, byte for byte, in one process or spread over elements; an element never reads
another's file (a broken one fails only its own task, named)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import zstandard

from continual_pt.layout import EXIT_OK, EXIT_USAGE
from tests.test_prepare_resume import FLAGS, cpt, snapshot
from tests.test_prepare_spread import same_dataset

FILES = 6


@pytest.fixture(scope="module")
def repo(tmp_path_factory, data_docs) -> Path:
    """A dataset repository as the hub holds one: data/<split>/*.jsonl.zst."""
    root = tmp_path_factory.mktemp("hub") / "org-corpus"
    for split, count in (("train", FILES), ("validation", 1)):
        (root / "data" / split).mkdir(parents=True)
        for i in range(count):
            docs = data_docs(30, seed=300 + i + (100 if split == "validation" else 0))
            lines = "".join(json.dumps({"text": d, "meta": {"kind": ("prose", "code")[j % 2]}}) + "\n"
                            for j, d in enumerate(docs))
            (root / "data" / split / f"part-{i:05d}.jsonl.zst").write_bytes(
                zstandard.ZstdCompressor().compress(lines.encode()))
    return root


def prepare(*argv: str):
    proc = cpt("prepare", *FLAGS, "--workers", "1", *argv)
    return proc


def test_a_hub_dataset_is_one_task_per_file_and_writes_what_its_files_give(tmp_path, repo, data_tokenizer):
    proc = prepare("-s", f"hf:{repo}", "-t", str(data_tokenizer), "-o", str(tmp_path / "hub"))
    assert proc.returncode == EXIT_OK, proc.stderr
    files, manifest = snapshot(tmp_path / "hub")
    train = sorted((repo / "data" / "train").iterdir())
    assert [t["input"] for t in manifest["tasks"]] == [str(p) for p in train]
    assert all(t["num_docs"] == 30 for t in manifest["tasks"])
    proc = prepare("-s", str(repo / "data" / "train"), "-t", str(data_tokenizer), "-o", str(tmp_path / "disk"))
    assert proc.returncode == EXIT_OK, proc.stderr
    assert files == snapshot(tmp_path / "disk")[0]


def test_spread_elements_stream_only_their_files(tmp_path, repo, data_tokenizer):
    args = ["-s", f"hf:{repo}", "-t", str(data_tokenizer)]
    assert prepare(*args, "-o", str(tmp_path / "one")).returncode == EXIT_OK
    reference = snapshot(tmp_path / "one")
    out = str(tmp_path / "ds")
    broken = sorted((repo / "data" / "train").iterdir())[4]   # task 4: element 1 of 3
    whole = broken.read_bytes()
    broken.write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "a"}\n{"text": broken\n'))
    try:
        for index in (0, 2):
            proc = prepare(*args, "-o", out, "--task-index", str(index), "--task-count", "3")
            assert proc.returncode == EXIT_OK, proc.stderr
        proc = prepare(*args, "-o", out, "--task-index", "1", "--task-count", "3")
        assert proc.returncode == EXIT_USAGE
        assert re.search(rf"task 4 \({re.escape(str(broken))}\) failed: {re.escape(str(broken))}: cannot read",
                         proc.stderr), proc.stderr
        assert "task 1 (" not in proc.stderr
    finally:
        broken.write_bytes(whole)
    assert prepare(*args, "-o", out, "--task-index", "1", "--task-count", "3").returncode == EXIT_OK
    proc = prepare(*args, "-o", out, "--merge")
    assert proc.returncode == EXIT_OK, proc.stderr
    same_dataset(Path(out), reference)
