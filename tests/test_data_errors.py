"""Bad input gets a UserError naming the file (and line); outputs are never clobbered or half-written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from continual_pt.cli import main
from continual_pt.data.dataset import PreparedDataset
from continual_pt.errors import UserError
from continual_pt.layout import EXIT_RESUMABLE
from tests.helpers import prepare_quietly

REPO = Path(__file__).resolve().parents[1]


def jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def expect_error(match: str, sources, tokenizer, out: Path, **kw) -> str:
    with pytest.raises(UserError, match=match) as info:
        prepare_quietly(sources, tokenizer, out, **kw)
    assert not out.exists() and not list(out.parent.glob(f"{out.name}.tmp-*"))  # nothing written or left
    return str(info.value)


def test_empty_inputs(tmp_path, data_tokenizer):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    expect_error("empty input", [tmp_path / "empty.jsonl"], data_tokenizer, tmp_path / "o")
    (tmp_path / "blank.jsonl").write_text("\n  \n\n")
    expect_error("empty input: no documents", [tmp_path / "blank.jsonl"], data_tokenizer, tmp_path / "o")
    jsonl(tmp_path / "empties.jsonl", ["", ""])
    expect_error("empty input: no documents", [tmp_path / "empties.jsonl"], data_tokenizer, tmp_path / "o")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "README.md").write_text("not an input")
    expect_error("no input files", [tmp_path / "dir"], data_tokenizer, tmp_path / "o")
    expect_error("matches no files", [tmp_path / "*.parquet"], data_tokenizer, tmp_path / "o")


def test_an_empty_compressed_file_in_a_directory_is_refused_as_a_lone_one_is(tmp_path, data_tokenizer):
    import zstandard

    folder = tmp_path / "shards"
    folder.mkdir()
    good = jsonl(tmp_path / "good.jsonl", ["a document", "another one"]).read_bytes()
    (folder / "part-0.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(good))
    (folder / "part-1.jsonl.zst").write_bytes(b"")
    msg = expect_error("an empty file", [folder], data_tokenizer, tmp_path / "o")
    assert msg.startswith(f"{folder / 'part-1.jsonl.zst'}: an empty file (0 bytes)"), msg


def test_missing_path_and_unknown_type(tmp_path, data_tokenizer):
    msg = expect_error("no such file", [tmp_path / "nope.jsonl"], data_tokenizer, tmp_path / "o")
    assert "python-stdlib" in msg and "hf:NAME" in msg
    (tmp_path / "a.csv").write_text("text\nhello\n")
    msg = expect_error("unknown file type", [tmp_path / "a.csv"], data_tokenizer, tmp_path / "o")
    assert ".jsonl.zst" in msg and str(tmp_path / "a.csv") in msg


def test_non_utf8_names_file_and_line(tmp_path, data_tokenizer):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine line\nsecond \xff\xfe line\n")
    msg = expect_error("not valid UTF-8", [bad], data_tokenizer, tmp_path / "o")
    assert f"{bad}:2:" in msg and "0xff" in msg
    surrogate = tmp_path / "surrogate.jsonl"
    surrogate.write_text('{"text": "fine"}\n{"text": "a\\ud800b"}\n')
    assert f"{surrogate}:2:" in expect_error("lone surrogate U[+]D800", [surrogate], data_tokenizer, tmp_path / "o")
    lines = tmp_path / "bad.jsonl"
    lines.write_bytes(b'{"text": "a"}\n{"text": "b"}\n{"text": "\xc3("}\n')
    assert f"{lines}:3:" in expect_error("not valid UTF-8", [lines], data_tokenizer, tmp_path / "o")


def test_broken_json_names_file_and_line(tmp_path, data_tokenizer):
    path = jsonl(tmp_path / "x.jsonl", [f"doc {i}" for i in range(200)])
    with open(path, "a") as f:
        f.write('{"text": "ok"}\n\n{"text": "unterminated}\n')
    # Found after tokenizing started: still an error with the line, and no output left behind.
    assert f"{path}:203:" in expect_error("broken JSON line", [path], data_tokenizer, tmp_path / "o")
    first = tmp_path / "first.jsonl"
    first.write_text("[1, 2\n")
    assert f"{first}:1:" in expect_error("broken JSON", [first], data_tokenizer, tmp_path / "o")


def test_missing_or_null_text_field(tmp_path, data_tokenizer):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"content": "hi", "id": 1}) + "\n")
    msg = expect_error("no field 'text'", [path], data_tokenizer, tmp_path / "o")
    assert f"{path}:1:" in msg and "content, id" in msg and "--text-field" in msg
    path.write_text(json.dumps({"text": "a"}) + "\n" + json.dumps({"text": None}) + "\n")
    assert f"{path}:2:" in expect_error("is null", [path], data_tokenizer, tmp_path / "o")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "x.parquet")
    assert "columns: body" in expect_error("no column 'text'", [tmp_path / "x.parquet"], data_tokenizer, tmp_path / "o")
    import datasets

    datasets.Dataset.from_dict({"body": ["x"]}).save_to_disk(str(tmp_path / "hf"))
    expect_error("no column 'text'", [tmp_path / "hf"], data_tokenizer, tmp_path / "o")
    # The right --text-field makes the same input work.
    prepare_quietly([tmp_path / "hf"], data_tokenizer, tmp_path / "ok", text_field="body", val_fraction=0.0)


def test_uint16_cannot_hold_a_large_vocabulary(tmp_path, data_tokenizer):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(data_tokenizer / "tokenizer.json"))
    tok.add_tokens([f"<extra_{i}>" for i in range(66_000)])
    tok.save(str(tmp_path / "big.json"))
    path = jsonl(tmp_path / "x.jsonl", ["hello"])
    msg = expect_error("--dtype uint16 cannot hold token ids up to", [path], tmp_path / "big.json", tmp_path / "o",
                       dtype="uint16")
    assert "uint32" in msg


def test_bad_options_and_tokenizer(tmp_path, data_tokenizer):
    path = jsonl(tmp_path / "x.jsonl", ["hello"])
    expect_error("val-fraction must lie in", [path], data_tokenizer, tmp_path / "o", val_fraction=1.5)
    expect_error("is not in its vocabulary", [path], data_tokenizer, tmp_path / "o", eos_token="<nope>")
    (tmp_path / "broken.json").write_text("{}")
    expect_error("not a valid tokenizer.json", [path], tmp_path / "broken.json", tmp_path / "o")


def test_existing_output_is_never_overwritten_or_lost(tmp_path, data_tokenizer, data_docs):
    good = jsonl(tmp_path / "good.jsonl", data_docs(30, seed=11))
    out = tmp_path / "out"
    prepare_quietly([good], data_tokenizer, out)
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(UserError, match="already a prepared dataset; pass --overwrite"):
        prepare_quietly([good], data_tokenizer, out)
    # A failing --overwrite run (bad line found mid-way) keeps the old dataset intact.
    bad = jsonl(tmp_path / "bad.jsonl", data_docs(300, seed=12))
    with open(bad, "a") as f:
        f.write("{oops\n")
    with pytest.raises(UserError, match="broken JSON"):
        prepare_quietly([bad], data_tokenizer, out, overwrite=True)
    assert (out / "manifest.json").read_bytes() == before
    assert PreparedDataset(out).num_docs > 0
    prepare_quietly([jsonl(tmp_path / "new.jsonl", ["new"])], data_tokenizer, out, overwrite=True, val_fraction=0.0)
    assert PreparedDataset(out).num_docs == 1
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out")) == ["out"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="is not empty and is not a prepared dataset"):
        prepare_quietly([good], data_tokenizer, tmp_path / "other")


def test_concurrent_writer_is_refused(tmp_path, data_tokenizer):
    path = jsonl(tmp_path / "x.jsonl", ["hello"])
    live = tmp_path / f"out.tmp-{os.getppid()}"  # a process that is alive
    live.mkdir()
    with pytest.raises(UserError, match=f"another process \\(pid {os.getppid()}\\) is writing"):
        prepare_quietly([path], data_tokenizer, tmp_path / "out")


def start_prepare_and_wait_for_a_shard(out: Path, tokenizer: Path) -> tuple[subprocess.Popen, Path]:
    """A `cpt prepare` subprocess on a corpus large enough to catch it mid-way, once it writes shards."""
    cmd = [sys.executable, "-m", "continual_pt.cli", "prepare", "--source", "python-stdlib", "--tokenizer",
           str(tokenizer), "--out", str(out), "--workers", "1", "--quiet"]
    proc = subprocess.Popen(cmd, cwd=REPO)
    deadline = time.monotonic() + 60
    shard = out.parent / f"{out.name}.tmp-{proc.pid}" / "tasks" / "000000" / "train" / "000000.bin"  # its one task's
    while not (shard.is_file() and shard.stat().st_size > 0):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("prepare ended before it could be interrupted")
        time.sleep(0.05)
    return proc, shard.parents[3]


def test_interrupted_prepare_is_never_mistaken_for_a_dataset(tmp_path, data_tokenizer):
    out = tmp_path / "code"
    proc, tmp = start_prepare_and_wait_for_a_shard(out, data_tokenizer)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert tmp.is_dir() and not out.exists()
    with pytest.raises(UserError, match="unfinished `cpt prepare`"):
        PreparedDataset(tmp)
    tmp.rename(tmp_path / "renamed")  # even under another name, no manifest means incomplete
    with pytest.raises(UserError, match="not a complete prepared dataset"):
        PreparedDataset(tmp_path / "renamed")
    tmp_path.joinpath("renamed").rename(tmp)
    # The next run removes the dead process's leftovers and completes.
    prepare_quietly([jsonl(tmp_path / "x.jsonl", ["def f(): pass"])], data_tokenizer, out, val_fraction=0.0)
    assert PreparedDataset(out).num_docs == 1 and not tmp.exists()


def test_sigterm_removes_the_temporary_directory(tmp_path, data_tokenizer):
    """Stopped before its only task is done, prepare keeps nothing (tests/test_prepare_resume.py: what it keeps)."""
    proc, tmp = start_prepare_and_wait_for_a_shard(tmp_path / "code", data_tokenizer)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == EXIT_RESUMABLE
    assert not tmp.exists() and not (tmp_path / "code").exists()


def test_cli_prints_user_errors_and_exits_2(tmp_path, data_tokenizer, capsys):
    rc = main(["prepare", "--source", str(tmp_path / "missing.jsonl"), "--tokenizer", str(data_tokenizer),
               "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "missing.jsonl: no such file" in capsys.readouterr().err


class _KillsItsWorker:
    """A chunk whose unpickling ends the worker process, as the OOM killer would."""

    def __reduce__(self):
        return os._exit, (1,)


def test_a_dead_worker_fails_the_run_instead_of_hanging(data_tokenizer):
    from continual_pt.data.runner import _in_order
    from continual_pt.data.tasks import Task
    from continual_pt.data.tokenizer import load_tokenizer

    tok = load_tokenizer(str(data_tokenizer))
    init = (tok.tokenizer_json, tok.eos_id, "uint16", 0.0, "text")
    with pytest.raises(UserError, match="a tokenizer process died"):
        list(_in_order(iter([(Task(0, 0), "chunk", _KillsItsWorker())]), 2, init))
