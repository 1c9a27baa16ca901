"""`cpt prepare` loses nothing and says what it refuses: --overwrite only replaces its own output,
truncated compressed inputs and unknown file types are named, workers die with their parent."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zstandard

from continual_pt.cli import main
from continual_pt.data.dataset import PreparedDataset
from continual_pt.data.formats import FILE_SUFFIXES
from continual_pt.errors import UserError
from tests.helpers import prepare_quietly

REPO = Path(__file__).resolve().parents[1]
ACCEPTED = ", ".join(FILE_SUFFIXES)


def lines_of(texts: list[str]) -> bytes:
    return "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def refused(match: str, sources, tokenizer, out: Path, **kw) -> str:
    """The message of the UserError a run raises; asserts it left no temporary directory."""
    with pytest.raises(UserError, match=match) as info:
        prepare_quietly(sources, tokenizer, out, **kw)
    assert not list(out.parent.glob(f"{out.name}.tmp-*"))
    return str(info.value)


# --------------------------------------------------------------------------- --overwrite


def test_overwrite_never_replaces_a_directory_prepare_did_not_write(tmp_path, data_tokenizer, capsys):
    src = tmp_path / "x.jsonl"
    src.write_bytes(lines_of(["hello"]))
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "global_step10").mkdir(parents=True)
    (run_dir / "checkpoints" / "global_step10" / "model.pt").write_bytes(b"weights")
    (run_dir / "config.yaml").write_text("train: {}\n")
    (run_dir / "metrics.jsonl").write_text("{}\n")
    before = tree(run_dir)
    msg = refused("refusing", [src], data_tokenizer, run_dir, overwrite=True)
    assert msg == (f"{run_dir} exists, is not empty and is not a prepared dataset (it holds checkpoints/, "
                   "config.yaml, metrics.jsonl); refusing to replace it: choose another --out")
    assert tree(run_dir) == before
    # Through the CLI: exit 2, the same message, and no advice to pass the flag that was refused.
    rc = main(["prepare", "-s", str(src), "-t", str(data_tokenizer), "-o", str(run_dir), "--overwrite", "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and err == f"cpt prepare: error: {msg}\n" and "--overwrite" not in err
    assert tree(run_dir) == before
    # A raw corpus laid out like a dataset (train/, val/) is not one: its files are named.
    corpus = tmp_path / "corpus"
    (corpus / "train").mkdir(parents=True)
    (corpus / "train" / "a.jsonl").write_bytes(lines_of(["raw"]))
    (corpus / "val").mkdir()
    msg = refused("refusing", [src], data_tokenizer, corpus, overwrite=True)
    assert "(it holds train/a.jsonl)" in msg and "--overwrite" not in msg
    assert tree(corpus) == {"train/a.jsonl": lines_of(["raw"])}


def test_overwrite_replaces_a_dataset_only_when_it_holds_nothing_else(tmp_path, data_tokenizer):
    src = tmp_path / "x.jsonl"
    src.write_bytes(lines_of(["old one", "old two"]))
    out = tmp_path / "ds"
    prepare_quietly([src], data_tokenizer, out, val_fraction=0.0)
    (out / "notes.txt").write_text("mine")
    msg = refused("refusing", [src], data_tokenizer, out, overwrite=True)
    assert msg == (f"{out} is a prepared dataset but also holds entries it did not write (notes.txt); "
                   "refusing to replace it: move them away or choose another --out")
    assert (out / "notes.txt").read_text() == "mine" and PreparedDataset(out).num_docs == 2
    (out / "notes.txt").unlink()
    src.write_bytes(lines_of(["new"]))
    prepare_quietly([src], data_tokenizer, out, val_fraction=0.0, overwrite=True)
    assert PreparedDataset(out).num_docs == 1


def test_overwrite_replaces_an_interrupted_output(tmp_path, data_tokenizer):
    src = tmp_path / "x.jsonl"
    src.write_bytes(lines_of(["one", "two", "three"]))
    out = tmp_path / "ds"
    prepare_quietly([src], data_tokenizer, out, val_fraction=0.0)
    (out / "manifest.json").unlink()  # as a killed run's temporary directory renamed by hand
    msg = refused("interrupted", [src], data_tokenizer, out)
    assert msg == (f"{out} holds the output of an interrupted run (no manifest.json), not yet a prepared "
                   "dataset; pass --overwrite to replace it")
    prepare_quietly([src], data_tokenizer, out, val_fraction=0.0, overwrite=True)
    assert PreparedDataset(out).num_docs == 3


def test_tokenizer_overwrite_keeps_a_model_folder(tmp_path, data_tokenizer, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "tokenizer.json").write_bytes((data_tokenizer / "tokenizer.json").read_bytes())
    (model / "model.safetensors").write_bytes(b"weights")
    before = tree(model)
    assert main(["tokenizer", "train", "-s", "kjv", "--vocab-size", "300", "-o", str(model), "--overwrite"]) == 2
    assert capsys.readouterr().err == (
        f"cpt tokenizer: error: {model} is a tokenizer but also holds entries it did not write "
        "(model.safetensors); refusing to replace it: move them away or choose another --out\n")
    assert tree(model) == before


# --------------------------------------------------------------------------- truncated inputs


def _corpus(n: int = 1000) -> bytes:
    return lines_of([f"document {i}: " + "words " * (i % 37) for i in range(n)])


def _two_frames(data: bytes) -> bytes:
    cut = data.index(b"\n", len(data) // 2) + 1
    c = zstandard.ZstdCompressor()
    return c.compress(data[:cut]) + c.compress(data[cut:])


@pytest.mark.parametrize("name, compress, how", [
    ("multi.jsonl.zst", _two_frames, "the zstd stream ends inside a frame"),
    ("single.jsonl.zst", lambda d: zstandard.ZstdCompressor().compress(d), "the zstd stream ends inside a frame"),
    ("doc.jsonl.gz", gzip.compress, "the gzip stream ends before its end-of-stream marker"),
])
def test_a_truncated_compressed_file_is_named_as_truncated(tmp_path, data_tokenizer, capsys, name, compress, how):
    whole = compress(_corpus())
    path = tmp_path / name
    for keep in (len(whole) * 3 // 4, len(whole) - 1):
        path.write_bytes(whole[:keep])
        msg = refused("truncated", [path], data_tokenizer, tmp_path / "o")
        assert msg == (f"{path}: truncated file: {how}; the file is incomplete (an interrupted download or "
                       "copy?): fetch it again")
        assert not (tmp_path / "o").exists()
    rc = main(["prepare", "-s", str(path), "-t", str(data_tokenizer), "-o", str(tmp_path / "o"), "-q"])
    assert rc == 2 and capsys.readouterr().err == f"cpt prepare: error: {msg}\n"
    path.write_bytes(whole)  # the complete file is read in full
    splits = prepare_quietly([path], data_tokenizer, tmp_path / "o")["splits"]
    assert splits["train"]["num_docs"] + splits["val"]["num_docs"] == 1000


# --------------------------------------------------------------------------- unknown file types


def _mixed_directory(root: Path) -> Path:
    d = root / "mixed"
    (d / ".git").mkdir(parents=True)
    (d / ".git" / "config").write_text("[core]\n")
    (d / ".gitattributes").write_text("*.jsonl filter=lfs\n")
    (d / "a.jsonl").write_bytes(lines_of(["alpha", "beta"]))
    (d / "b.csv").write_text("text\ngamma\n")
    (d / "c.jsonl.bz2").write_bytes(b"BZh9")
    (d / "README.md").write_text("# corpus\n")
    return d


def test_unknown_file_types_in_a_directory_are_named_and_fail(tmp_path, data_tokenizer):
    d = _mixed_directory(tmp_path)
    msg = refused("unknown type", [d], data_tokenizer, tmp_path / "o")
    assert msg == (f"{d}: 3 files of unknown type (1 .bz2, 1 .csv, 1 .md): {d / 'README.md'}, {d / 'b.csv'}, "
                   f"{d / 'c.jsonl.bz2'} (accepted: {ACCEPTED}); convert them, or pass --skip-unknown to read "
                   "only the others")
    assert not (tmp_path / "o").exists()
    msg = refused("unknown type", [f"{d}/*"], data_tokenizer, tmp_path / "o")
    assert msg.startswith(f"{d}/*: 3 files of unknown type (1 .bz2, 1 .csv, 1 .md): ")


def test_skip_unknown_skips_them_and_says_so(tmp_path, data_tokenizer, capsys):
    d = _mixed_directory(tmp_path)
    out = tmp_path / "o"
    assert main(["prepare", "-s", str(d), "-t", str(data_tokenizer), "-o", str(out), "--val-fraction", "0",
                 "-j", "1", "--skip-unknown"]) == 0
    assert (f"{d}: skipped 3 files of unknown type (1 .bz2, 1 .csv, 1 .md): {d / 'README.md'}, "
            f"{d / 'b.csv'}, {d / 'c.jsonl.bz2'}\n") in capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert PreparedDataset(out).num_docs == 2 and manifest["args"]["skip_unknown"] is True
    assert manifest["sources"][0]["skipped_unknown"] == [str((d / n).resolve())
                                                        for n in ("README.md", "b.csv", "c.jsonl.bz2")]
    assert [f["path"] for f in manifest["sources"][0]["files"]] == [str((d / "a.jsonl").resolve())]
    tok = tmp_path / "tok"
    assert main(["tokenizer", "train", "-s", str(d), "--vocab-size", "260", "-o", str(tok), "-q"]) == 2
    assert "pass --skip-unknown" in capsys.readouterr().err and not tok.exists()
    assert main(["tokenizer", "train", "-s", str(d), "--vocab-size", "260", "-o", str(tok), "-q",
                 "--skip-unknown"]) == 0
    assert (tok / "tokenizer.json").is_file()


# --------------------------------------------------------------------------- SIGKILL


def _children(pid: int) -> list[int]:
    """Live (not zombie) processes whose parent is `pid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_exit_when_prepare_is_killed(tmp_path, data_tokenizer):
    out = tmp_path / "code"
    cmd = [sys.executable, "-m", "continual_pt.cli", "prepare", "--source", "python-stdlib", "--tokenizer",
           str(data_tokenizer), "--out", str(out), "--workers", "2", "--quiet"]
    proc = subprocess.Popen(cmd, cwd=REPO)
    shard = tmp_path / f"code.tmp-{proc.pid}" / "tasks" / "000000" / "train" / "000000.bin"
    deadline = time.monotonic() + 90
    workers: list[int] = []
    try:
        while not (shard.is_file() and shard.stat().st_size > 0 and len(workers) >= 2):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("prepare ended before it could be killed mid-run")
            time.sleep(0.05)
            workers = [p for p in _children(proc.pid) if b"spawn_main" in _cmdline(p)]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 5
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [p for p in workers if _alive(p)] == []
    finally:
        proc.kill()
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
