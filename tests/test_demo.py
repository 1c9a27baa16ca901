"""`cpt demo`: the corpora, the shipped upstream model, and a reduced demo end to end from a wheel
install, with every number of REPORT.md checked against the runs' own files and every verdict
recomputed from those numbers."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from continual_pt.demo import corpora
from continual_pt.demo.command import LOCK
from continual_pt.demo.recipe import SCALE
from continual_pt.demo.upstream import PROVENANCE, SHIPPED, shipped, verify
from continual_pt.errors import UserError
from continual_pt.training.lock import RunLock
from tests.helpers import free_port
from tests.test_demo_seeds import check_findings
from tests.test_wheel import build_wheel, fresh_venv, run


def demo(cpt: Path, *args: str, where: Path, env: dict[str, str], expect: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(cpt), "demo", "--scale", "tiny", "--out", "demo", *args], cwd=where, env=env,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == expect, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def test_a_document_lands_in_one_corpus_only_and_the_cut_is_stable():
    assert [corpora.bucket(n) for n in ("Genesis 1", "json/decoder.py")] == \
        [corpora.bucket("Genesis 1"), corpora.bucket("json/decoder.py")]
    for shift in corpora.SHIFTS:
        parts = [p for corpus in corpora.CORPORA[shift].values() for p in corpus]
        for a in parts:
            for b in parts:
                if a is not b and a.source == b.source:
                    assert a.high <= b.low or b.high <= a.low, (shift, a, b)   # no document in two parts
    docs = {"code": [("a.py", "x = 1"), ("b.py", "y = 2")], "scripture": [("Genesis 1", "In the beginning")]}
    weak_up = corpora.corpus_texts("weak", "upstream", docs)
    weak_down = corpora.corpus_texts("weak", "downstream", docs)
    assert not set(weak_up) & set(weak_down)
    assert corpora.corpus_texts("strong", "downstream", docs) == \
        [t for n, t in docs["scripture"] if 250 <= corpora.bucket(n) < 1000]


@pytest.mark.parametrize("shift", ["weak", "strong"])
def test_the_shipped_upstream_model_is_intact_and_says_how_it_was_made(shift):
    folder = shipped(shift, SCALE["demo"])
    assert folder is not None, f"no upstream model ships under {SHIPPED / shift}"
    provenance = verify(folder)
    assert provenance["command"] == f"cpt demo --pretrain --shift {shift}"
    assert (provenance["shift"], provenance["scale"], provenance["seed"]) == (shift, "demo", SCALE["demo"].seed)
    assert set(provenance["checkpoints"]) == {"step70", "step190", "final"}
    assert provenance["tokens_per_param"] == round(provenance["tokens"] / provenance["params"], 1)
    for name in provenance["checkpoints"]:
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (folder / name).iterdir()}
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) < 8_000_000


@pytest.mark.slow
def test_the_in_loop_budget_and_the_cpt_eval_budget_agree_on_the_start_model(tmp_path):
    """The demo's in-loop eval (step 0 of a run is the start model) and its `cpt eval` of the start model are
    two samples of one split: within 0.1 nats at the demo's budgets (with the first windows instead of windows
    spread over the split, upstream was 0.6 apart)."""
    from continual_pt.cli import main
    from continual_pt.demo.command import _datasets
    from continual_pt.demo.upstream import FINAL
    from continual_pt.evaluation.store import read_scores

    scale, model = SCALE["demo"], shipped("weak", SCALE["demo"])
    corpora.write_corpora("weak", tmp_path / "data")
    data = _datasets(tmp_path, model / FINAL, scale)
    losses = {}
    for budget in (scale.eval_tokens, scale.score_tokens):
        store = tmp_path / f"{budget}.jsonl"
        assert main(["eval", str(model / FINAL), *[a for name, path in data.items() for a in ("--set", f"{name}={path}")],
                     "--tokens", str(budget), "--store", str(store)]) == 0
        losses[budget] = {r["set"]: r["loss"] for r in read_scores(store)}
    for name in ("upstream", "downstream"):
        assert abs(losses[scale.eval_tokens][name] - losses[scale.score_tokens][name]) < 0.1, losses


@pytest.mark.parametrize("shift", ["weak", "strong"])
def test_a_changed_shipped_file_is_refused(tmp_path, shift):
    folder = shipped(shift, SCALE["demo"])
    copy = tmp_path / shift
    shutil.copytree(folder, copy)
    weights = copy / "final" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    with pytest.raises(UserError, match="missing or changed"):
        verify(copy)
    (copy / PROVENANCE).unlink()
    with pytest.raises(UserError, match="cannot read"):
        verify(copy)


# ------------------------------------------------------------------ the reduced demo, end to end


def _source_value(out: Path, number: dict) -> float:
    """The loss a finding's number claims, read again from the file it names."""
    rows = [json.loads(line) for line in (out / number["file"]).read_text().splitlines()]
    if number["run"] == "start model":
        (row,) = [r for r in rows if r["set"] == number["set"]]
    elif number["kind"] == "eval":
        assert number["file"] == f"sweep/runs/{number['run']}-seed{number['seed']}/metrics.jsonl", number
        (row,) = [r for r in rows if r.get("kind") == "eval" and r["set"] == number["set"]
                  and r["step"] == number["step"]]
    else:
        assert number["file"] == f"sweep/runs/{number['run']}-seed{number['seed']}/scores.jsonl", number
        (row,) = [r for r in rows if r["set"] == number["set"] and r["step"] == number["step"]]
    return row["loss"]


@pytest.mark.slow
def test_a_reduced_demo_from_a_wheel_install_reports_only_what_its_runs_say(tmp_path):
    python = fresh_venv(tmp_path / "venv")
    wheel = build_wheel(tmp_path)
    for shift in ("weak", "strong"):   # both shifts' models ship in the wheel
        shipped_files = {f"continual_pt/demo/upstream/{shift}/{rel}" for rel in verify(SHIPPED / shift)["sha256"]}
        assert shipped_files | {f"continual_pt/demo/upstream/{shift}/{PROVENANCE}"} <= \
            set(zipfile.ZipFile(wheel).namelist())
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel])
    where = tmp_path / "elsewhere"
    where.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1", PATH=f"{python.parent}{os.pathsep}{env['PATH']}")
    cpt = python.parent / "cpt"
    proc = demo(cpt, "--pretrain", "--seeds", "2", where=where, env=env)
    out = where / "demo"
    assert "findings hold at this scale" in proc.stdout
    report = (out / "REPORT.md").read_text()
    decided = json.loads((out / "findings.json").read_text())
    assert [f["key"] for f in decided] == ["1", "2", "3", "4", "5", "6", "7", "replay", "3-long"]
    assert [f["verdict"] == "not run" for f in decided] == [False] * 8 + [True]   # 3-long runs with --full
    check_findings(decided, 2, report)
    for f in decided:
        for t in f["trials"]:
            for n in t["numbers"]:
                assert n["value"] == _source_value(out, n), n
    holding = sum(f["holds"] is True for f in decided[:7])
    assert f"**{holding} of the paper's 7 findings hold at this scale** in every one of 2 seed(s)" in report
    for png in re.findall(r"\]\((figures/[^)]+\.png)\)", report):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(re.findall(r"\.png\)", report)) == 5
    provenance = json.loads((out / "upstream" / PROVENANCE).read_text())
    assert f"{provenance['tokens_per_param']} tokens per parameter" in report

    # Run again: everything is there, nothing is trained or scored twice.
    metrics = {p: p.read_bytes() for p in out.glob("sweep/runs/*/*.jsonl")}
    again = demo(cpt, "--pretrain", "--seeds", "2", where=where, env=env)
    assert again.stdout.count("skipped") == 18
    assert metrics == {p: p.read_bytes() for p in out.glob("sweep/runs/*/*.jsonl")}

    # Another demo's settings on the same folder: refused before anything is written.
    other = demo(cpt, "--pretrain", where=where, env=env, expect=2)   # 3 seeds, not 2
    assert "holds a demo run with other settings" in other.stderr
    assert metrics == {p: p.read_bytes() for p in out.glob("sweep/runs/*/*.jsonl")}


@pytest.mark.parametrize("shift", ["weak", "strong"])
def test_a_scale_without_a_shipped_model_is_refused_before_anything_is_written(tmp_path, capsys, shift):
    """Both shifts ship their model at the demo scale; none ships at the tiny scale, which needs --pretrain."""
    from continual_pt.cli import main
    out = tmp_path / "demo"
    assert main(["demo", "--shift", shift, "--scale", "tiny", "--out", str(out)]) == 2
    assert f"no upstream model ships for --shift {shift} at --scale tiny; build one with `cpt demo --pretrain " \
        f"--shift {shift} --scale tiny`" in capsys.readouterr().err
    assert not out.exists()


def test_the_strong_shift_runs_from_its_shipped_model_without_pretrain(tmp_path, monkeypatch):
    from continual_pt.cli import main
    from continual_pt.demo import command

    started = []
    monkeypatch.setattr(command, "_steps", lambda out, options, scale, model, t, own: started.append(model) or 0)
    assert main(["demo", "--shift", "strong", "--out", str(tmp_path / "demo")]) == 0
    assert started == [SHIPPED / "strong"]
    assert json.loads((tmp_path / "demo" / "demo.json").read_text())["shift"] == "strong"


def test_the_grid_runs_one_thread_per_run_unless_the_user_says(tmp_path, monkeypatch):
    import torch

    from continual_pt.demo import command

    seen = []
    monkeypatch.setattr(command, "run_sweep", lambda opts: seen.append(os.environ.get("OMP_NUM_THREADS")) or 0)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    threads = torch.get_num_threads()
    assert command.run_grid(tmp_path / "demo-grid.yaml") == 0
    assert "OMP_NUM_THREADS" not in os.environ   # only the runs' processes see it
    with command.one_thread():   # and this process's cpt eval of the checkpoints
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == threads
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert command.run_grid(tmp_path / "demo-grid.yaml") == 0
    assert seen == ["1", "2"] and os.environ["OMP_NUM_THREADS"] == "2"


def test_a_second_demo_on_a_live_demo_folder_is_refused_before_writing(tmp_path, capsys):
    from continual_pt.cli import main
    out = tmp_path / "demo"
    holder = RunLock(out, LOCK, label="demo folder", what="demo")
    holder.acquire()   # as the first `cpt demo` holds it while it runs
    try:
        assert main(["demo", "--out", str(out)]) == 2
    finally:
        holder.release()
    err = capsys.readouterr().err
    assert f"demo folder {out} is in use: pid {os.getpid()}" in err and "wait for that demo to end" in err
    assert [p.name for p in out.iterdir()] == [LOCK]


def test_a_stopped_upstream_pretraining_ends_the_demo_with_75_and_exports_nothing(tmp_path, monkeypatch):
    from continual_pt.demo import upstream

    monkeypatch.setattr(upstream, "train_once", lambda config: (75, "", True))   # Ctrl-C: committed, stopped
    out = tmp_path / "upstream"
    data = {"upstream": tmp_path / "up", "downstream": tmp_path / "down"}
    assert upstream.pretrain(SCALE["tiny"], "weak", tmp_path / "work", data, out) == 75
    assert not out.exists()


def test_ctrl_c_at_any_step_of_the_demo_exits_75_and_the_same_command_goes_on(tmp_path, monkeypatch, capsys):
    from continual_pt.cli import main
    from continual_pt.demo import command

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(command, "_steps", interrupted)
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 75
    assert f"cpt demo: stopped; what is done is kept in {out}: run the same command again" in capsys.readouterr().out
    monkeypatch.setattr(command, "_steps", lambda *args: 0)
    assert main(["demo", "--out", str(out)]) == 0   # the same settings, the lock released
