"""`cpt demo --upstream SRC --downstream SRC`: the demo on a user's own corpora. How the samples are cut
(files spread over the corpus, equal shares, a layout's validation files never read), the options it
refuses before writing anything, the time estimate's arithmetic, and the whole demo from a wheel install
on two corpora in the Pile's and SlimPajama's layouts, whose rerun trains nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import zstandard

from continual_pt.demo import estimate, sample
from continual_pt.demo.recipe import SCALE
from tests.conftest import make_docs
from tests.helpers import free_port
from tests.test_data_domains import PILE, SLIM, pile, slimpajama
from tests.test_demo_seeds import check_findings
from tests.test_wheel import build_wheel, fresh_venv, run


def _jsonl(path: Path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def _texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


def test_spread_takes_the_first_and_the_last_and_evenly_between():
    assert sample.spread(list(range(10)), 4) == [0, 3, 6, 9]
    assert sample.spread(list(range(70)), 64)[:3] == [0, 1, 2] and sample.spread(list(range(70)), 64)[-1] == 69
    assert len(set(sample.spread(list(range(70)), 64))) == 64
    assert sample.spread([5, 6], 4) == [5, 6] and sample.spread([5, 6, 7], 1) == [5]


def _corpus(name: str, sources: list[Path], layout: str | None = None) -> sample.Corpus:
    return sample.Corpus(name, tuple(map(str, sources)), layout, "text", None)


def test_a_sample_reads_at_most_SPREAD_files_spread_over_the_corpus(tmp_path):
    folder = tmp_path / "corpus"
    for i in range(70):   # 100-byte documents, 5 per file
        _jsonl(folder / f"part-{i:03d}.jsonl", [f"file {i:03d} doc {j} ".ljust(100, "x") for j in range(5)])
    info = sample.cut(_corpus("upstream", [folder]), sample.SPREAD * 100, tmp_path / "s.jsonl")
    chosen = sample.spread(list(range(70)), sample.SPREAD)
    assert _texts(tmp_path / "s.jsonl") == [f"file {i:03d} doc 0 ".ljust(100, "x") for i in chosen]
    assert info == {"bytes": {str(folder): 6400}, "documents": 64, "files_read": 64, "files": 70}
    first = (tmp_path / "s.jsonl").read_bytes()
    sample.cut(_corpus("upstream", [folder]), sample.SPREAD * 100, tmp_path / "s.jsonl")
    assert (tmp_path / "s.jsonl").read_bytes() == first   # the same corpus gives the same sample


def test_a_file_that_runs_out_passes_its_share_on(tmp_path):
    folder = tmp_path / "corpus"
    _jsonl(folder / "a.jsonl", ["a0".ljust(100, "x")])
    _jsonl(folder / "b.jsonl", [f"b{j}".ljust(100, "x") for j in range(10)])
    _jsonl(folder / "c.jsonl", [f"c{j}".ljust(100, "x") for j in range(10)])
    info = sample.cut(_corpus("downstream", [folder]), 900, tmp_path / "s.jsonl")   # shares 300, 400, 400
    assert [t[:2] for t in _texts(tmp_path / "s.jsonl")] == ["a0", "b0", "b1", "b2", "b3", "c0", "c1", "c2", "c3"]
    assert info["documents"] == 9 and info["bytes"] == {str(folder): 900}


def test_a_layout_sample_keeps_domains_and_never_reads_the_validation_files(tmp_path):
    corpus = pile(tmp_path / "pile", make_docs(300, seed=3))
    held_out = {text for text, _ in corpus.expected["val"] + corpus.expected["test"]}
    info = sample.cut(_corpus("upstream", [tmp_path / "pile"], "pile"), 10**6, tmp_path / "s.jsonl")
    records = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    expected = [(t, d) for t, d in corpus.expected["train"] if t]
    assert [(r["text"], r["domain"]) for r in records] == expected   # the whole train split: under budget
    assert not held_out & {r["text"] for r in records}
    assert info["files_read"] == info["files"] == 3
    assert sum(info["bytes"].values()) == sum(len(t.encode()) for t, _ in expected)
    assert set(info["bytes"]) <= set(PILE)


def test_a_hub_dataset_is_sampled_by_its_own_files_with_their_domains(tmp_path, monkeypatch):
    root = tmp_path / "org-corpus"   # a dataset repository as the hub holds one (data/train/*.jsonl.zst)
    (root / "data" / "train").mkdir(parents=True)
    for i in range(6):
        lines = "".join(json.dumps({"text": f"file {i} doc {j} ".ljust(100, "x"), "meta": {"kind": ("a", "b")[j % 2]}})
                        + "\n" for j in range(10))
        (root / "data" / "train" / f"part-{i:05d}.jsonl.zst").write_bytes(
            zstandard.ZstdCompressor().compress(lines.encode()))
    monkeypatch.setattr(sample, "SPREAD", 3)
    corpus = sample.Corpus("downstream", (f"hf:{root}",), None, "text", "meta.kind")
    info = sample.cut(corpus, 3 * 200, tmp_path / "s.jsonl")   # two documents from each of 3 files
    records = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert [(r["text"][:13], r["domain"]) for r in records] == \
        [(f"file {i} doc {j} ", ("a", "b")[j]) for i in sample.spread(list(range(6)), 3) for j in range(2)]
    assert info == {"bytes": {"a": 300, "b": 300}, "documents": 6, "files_read": 3, "files": 6}


@pytest.mark.parametrize("args, message", [
    (["--upstream", "kjv"], "give both --upstream and --downstream (your corpora), or neither"),
    (["--upstream", "kjv", "--downstream", "kjv", "--shift", "strong"], "--shift chooses between the built-in"),
    (["--upstream-layout", "pile"], "--upstream-layout: describe(s) your corpora, given with --upstream"),
    (["--upstream", "no-such-folder", "--downstream", "kjv"], "--upstream: no-such-folder: no such file or directory"),
    (["--upstream", "kjv", "--downstream", "kjv", "--downstream-layout", "slimpajama"],
     "--downstream: kjv: --layout slimpajama reads a corpus folder as cerebras/SlimPajama-627B ships it"),
])
def test_bad_corpus_options_are_refused_before_anything_is_written(tmp_path, capsys, monkeypatch, args, message):
    from continual_pt.cli import main
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--scale", "tiny", "--out", "demo", *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


def test_ctrl_c_while_cutting_keeps_the_sample_that_is_cut_and_the_same_command_cuts_only_the_rest(
        tmp_path, monkeypatch, capsys):
    from continual_pt.cli import main
    from continual_pt.demo import command

    for name in ("up", "down"):
        _jsonl(tmp_path / name / "a.jsonl", [f"{name} document {i} " * 20 for i in range(50)])
    calls = []

    def cut(corpus, budget, out):
        calls.append(corpus.name)
        if calls == ["upstream", "downstream"]:
            raise KeyboardInterrupt
        return sample.cut(corpus, budget, out)

    def stop(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(command, "cut", cut)
    monkeypatch.setattr(command, "fit_tokenizer", stop)   # the step after the samples
    monkeypatch.setattr(command, "measure", lambda scale: estimate.Speed(1e-6, 1e-7))
    args = ["demo", "--scale", "tiny", "--out", str(tmp_path / "demo"), "--upstream", str(tmp_path / "up"),
            "--downstream", str(tmp_path / "down")]
    assert main(args) == 75
    data = tmp_path / "demo" / "data"
    assert calls == ["upstream", "downstream"] and sorted(p.name for p in data.iterdir()) == \
        ["upstream.jsonl", "upstream.sample.json"]
    kept = (data / "upstream.jsonl").read_bytes()
    assert "run the same command again to continue" in capsys.readouterr().out
    assert main(args) == 75   # stopped again, at the tokenizer
    assert calls == ["upstream", "downstream", "downstream"] and (data / "upstream.jsonl").read_bytes() == kept
    assert json.loads((data / "downstream.sample.json").read_text())["documents"] == 50


def test_the_estimate_is_the_tokens_times_the_measured_speed_plus_start_up():
    speed = estimate.Speed(train=2e-6, forward=5e-7)
    # 10 steps of 1,000 tokens; evals at 0, 4, 8 and 10 on 2 sets of 300 tokens; cpt eval of 2 x 500 tokens
    assert estimate.run_seconds(speed, 10, 1000, 4, 300, 500) == pytest.approx(
        10 * 1000 * 2e-6 + 2 * (4 * 300 + 500) * 5e-7 + estimate.RUN_START_S)
    tiny = SCALE["tiny"]
    assert estimate.grid_seconds(tiny, speed, [8, 8, 32]) == pytest.approx(
        2 * estimate.run_seconds(speed, 8, 128, 2, 512, 1024) + estimate.run_seconds(speed, 32, 128, 2, 512, 1024))
    measured = estimate.measure(tiny)
    assert 0 < measured.forward < measured.train < 1e-3


@pytest.mark.slow
def test_the_demo_on_two_corpora_of_the_papers_layouts_from_a_wheel_install_and_its_rerun(tmp_path):
    python = fresh_venv(tmp_path / "venv")
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q",
         build_wheel(tmp_path)])
    where = tmp_path / "elsewhere"
    upstream, downstream = pile(where / "pile", make_docs(300, seed=4)), slimpajama(where / "sp", make_docs(300, 5))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1", PATH=f"{python.parent}{os.pathsep}{env['PATH']}")
    args = ["--upstream", "pile", "--upstream-layout", "pile", "--downstream", "sp", "--downstream-layout",
            "slimpajama", "--scale", "tiny", "--seeds", "1", "--out", "demo"]

    def demo(*extra: str, expect: int = 0) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(python.parent / "cpt"), "demo", *args, *extra], cwd=where, env=env,
                              capture_output=True, text=True, timeout=1200)
        assert proc.returncode == expect, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        return proc

    proc = demo()
    out = where / "demo"
    plan = proc.stdout.index("cpt demo on your corpora (scale tiny, 1 seed(s))")
    assert plan < proc.stdout.index("cutting a sample") < proc.stdout.index("pre-training the upstream model")
    assert "the grid: 9 settings x 1 seed(s) = 9 runs of 8 steps" in proc.stdout
    assert "time left: about" in proc.stdout and "us per token on one thread" in proc.stdout
    for corpus, written, names in (("upstream", upstream, PILE), ("downstream", downstream, SLIM)):
        records = [json.loads(line) for line in (out / "data" / f"{corpus}.jsonl").read_text().splitlines()]
        assert [(r["text"], r["domain"]) for r in records] == [(t, d) for t, d in written.expected["train"] if t]
        manifest = json.loads((out / "data" / corpus / "manifest.json").read_text())
        assert manifest["domains"] and set(manifest["domains"]) <= set(names), manifest["domains"]
    report = (out / "REPORT.md").read_text()
    assert report.startswith("# cpt demo: the paper's findings at laptop scale (your corpora)")
    assert "- Corpora: **yours**, upstream `pile`: a sample of 120 documents from 3 of its 3 file(s)" in report
    provenance = json.loads((out / "upstream" / "provenance.json").read_text())
    assert provenance["command"] == ("cpt demo --upstream pile --downstream sp --upstream-layout pile "
                                     "--downstream-layout slimpajama --scale tiny")
    check_findings(json.loads((out / "findings.json").read_text()), 1, report)

    # Run again: the plan says everything is done, nothing is cut, trained or scored twice.
    kept = {p: p.read_bytes() for p in [*out.glob("sweep/runs/*/*.jsonl"), *out.glob("data/*.jsonl"),
                                        *out.glob("pretrain/*/metrics.jsonl")]}
    again = demo()
    assert "(done)" in again.stdout and "(9 done)" in again.stdout and "time left: about 0 s" in again.stdout
    assert "cutting a sample" not in again.stdout and "pre-training" not in again.stdout
    assert again.stdout.count("skipped") == 9
    assert kept == {p: p.read_bytes() for p in kept}

    # Another corpus on the same folder: refused before anything is written.
    other = demo("--downstream", "pile", expect=2)
    assert "holds a demo run with other settings" in other.stderr
    assert kept == {p: p.read_bytes() for p in kept}
