"""cpt eval: agreement with in-loop eval and with the Hugging Face export, world-size independence,
the incremental store under concurrent jobs, job-array selection and bad input."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch

from continual_pt.checkpoint import integrity
from continual_pt.cli import main
from continual_pt.data.dataset import PreparedDataset
from continual_pt.evaluation import job
from continual_pt.evaluation.claims import Claim
from continual_pt.evaluation.sets import measurement, open_sets
from continual_pt.evaluation.store import read_scores, score_key
from tests import train_support as ts
from tests.helpers import free_port

BUDGET = "512"   # the in-loop eval budget of the runs
SMALL = "64"     # 4 windows: enough where only bookkeeping is tested


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(world, tmp_path_factory):
    """A 12-step run on 'code' with committed checkpoints at steps 4, 8 and 12 (never written to)."""
    return ts.continual_experiment(tmp_path_factory.getbasetemp() / "experiment", world, rewarm=False)["pre"]


def eval_env() -> dict[str, str]:
    e = ts.env()
    e["PATH"] = os.path.dirname(sys.executable) + os.pathsep + e.get("PATH", "")
    e["OMP_NUM_THREADS"] = "1"
    return e


def sets(world, *names):
    args = []
    for name in names or ("code", "prose"):
        args += ["--set", f"{name}={world[name]}"]
    return args


def eval_cli(*args) -> int:
    return main(["eval", *map(str, args)])


def by_key(rows):
    return {(r["tag"], r["set"]): r for r in rows}


def eval_command(*args, world_size: int = 1) -> list[str]:
    if world_size == 1:
        return [sys.executable, "-m", "continual_pt.evaluate", *map(str, args)]
    return ["torchrun", "--nproc_per_node", str(world_size), "--master_port", str(free_port()),
            "-m", "continual_pt.evaluate", *map(str, args)]


def run_eval(*args, world_size: int = 1, expect: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run(eval_command(*args, world_size=world_size), env=eval_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == expect, proc.stderr[-4000:]
    return proc


def test_scores_equal_in_loop_eval_and_the_hugging_face_export(world, run, tmp_path, capsys):
    store = tmp_path / "scores.jsonl"
    assert eval_cli(run, *sets(world), "--tokens", BUDGET, "--store", store) == 0
    rows = by_key(read_scores(store))
    assert sorted({(r["step"], r["tokens_seen"]) for r in rows.values()}) == [(4, 256), (8, 512), (12, 768)]
    assert all(r["tokens"] == 512 and r["seq_len"] == 16 and r["run"] == "pre" for r in rows.values())
    in_loop = {r["set"]: r["loss"] for r in ts.train_records(run, "eval") if r["step"] == 12}
    for name in ("code", "prose"):
        assert rows["global_step12", name]["loss"] == pytest.approx(in_loop[name], rel=1e-6)
    hf = tmp_path / "hf"
    assert main(["export", str(run / "checkpoints" / "global_step12"), "--out", str(hf)]) == 0
    # No --seq-len: an HF model defaults to 2048 capped at its max_position_embeddings (16 here).
    assert eval_cli(hf, *sets(world), "--tokens", BUDGET, "--store", store) == 0
    exported = {r["set"]: r for r in read_scores(store) if r["kind"] == "hf"}
    for name in ("code", "prose"):
        assert exported[name]["seq_len"] == 16 and exported[name]["step"] is None
        assert exported[name]["loss"] == pytest.approx(rows["global_step12", name]["loss"], abs=1e-5)
        assert exported[name]["ppl"] == pytest.approx(rows["global_step12", name]["ppl"], rel=1e-5)
    assert "has no tokenizer" not in capsys.readouterr().err      # the export carries the tokenizer


def test_a_run_scored_twice_does_no_work_the_second_time(world, run, tmp_path, capsys, monkeypatch):
    store = tmp_path / "scores.jsonl"
    devices = []   # the job keeps freed host memory for the next batch on a CPU (test_host_malloc.py)
    monkeypatch.setattr("continual_pt.evaluation.command.host_malloc.for_device", devices.append)
    assert eval_cli(run, *sets(world), "--tokens", SMALL, "--store", store) == 0
    assert "6 to score, 0 already scored" in capsys.readouterr().err
    assert [d.type for d in devices] == ["cpu"]
    before = store.read_bytes()

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded although everything was scored")

    monkeypatch.setattr("continual_pt.evaluation.job.load_model", no_loading)
    assert eval_cli(run, *sets(world), "--tokens", SMALL, "--store", store) == 0
    assert "0 to score, 6 already scored" in capsys.readouterr().err
    assert store.read_bytes() == before
    monkeypatch.undo()
    # Another budget is another measurement; the default store is the run's own scores.jsonl.
    copy = tmp_path / "pre"
    shutil.copytree(run, copy)
    assert eval_cli(copy / "checkpoints" / "global_step12", *sets(world, "code"), "--micro-batch-size", 64) == 0
    windows = PreparedDataset(world["code"], "val").num_tokens // 17
    assert [(r["budget"], r["tokens"]) for r in read_scores(copy / "scores.jsonl")] == [(None, windows * 16)]
    assert (copy / "scores.csv").is_file()


def test_bf16_is_its_own_measurement_and_close_to_fp32(world, run, tmp_path):
    store = tmp_path / "scores.jsonl"
    ckpt = run / "checkpoints" / "global_step12"
    for dtype in ("fp32", "bf16"):
        assert eval_cli(ckpt, *sets(world, "code"), "--tokens", SMALL, "--dtype", dtype, "--store", store) == 0
    fp32, bf16 = read_scores(store)
    assert (fp32["dtype"], bf16["dtype"]) == ("fp32", "bf16")
    assert bf16["loss"] == pytest.approx(fp32["loss"], abs=0.05)


@pytest.mark.slow
def test_world_size_one_and_two_give_the_same_scores(world, run, tmp_path):
    # 400 tokens = 25 windows: the two ranks hold 13 and 12, so padding is exercised too.
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    assert eval_cli(run, *sets(world), "--tokens", 400, "--store", one) == 0
    proc = run_eval(run, *sets(world), "--tokens", 400, "--store", two, world_size=2)
    assert "world size 2" in proc.stderr
    a, b = by_key(read_scores(one)), by_key(read_scores(two))
    assert a.keys() == b.keys() and len(a) == 6
    for key in a:
        assert (a[key]["world_size"], b[key]["world_size"]) == (1, 2)
        assert a[key]["tokens"] == b[key]["tokens"] == 400
        assert a[key]["windows"] == b[key]["windows"] == 25 and a[key]["selection"] == b[key]["selection"] == "spread"
        # Token sums are float64 and each window is one row of a batch on either world size:
        # only the composition of a batch differs, which moves fp32 logits by a few ulp at most.
        assert b[key]["loss"] == pytest.approx(a[key]["loss"], rel=1e-6)


@pytest.mark.slow
def test_two_jobs_writing_one_store_at_once(world, run, tmp_path):
    store = tmp_path / "scores.jsonl"
    e = eval_env()
    ckpts = run / "checkpoints"
    jobs = [eval_command(run, *sets(world), "--tokens", SMALL, "--store", store),
            eval_command(ckpts / "global_step12", ckpts / "global_step8", *sets(world), "--tokens", SMALL,
                         "--store", store)]
    procs = [subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd in jobs]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    lines = store.read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    keys = [score_key(r) for r in rows]
    assert len(keys) == len(set(keys)) == 6
    assert {(r["step"], r["set"]) for r in rows} == {(s, n) for s in (4, 8, 12) for n in ("code", "prose")}
    assert len((tmp_path / "scores.csv").read_text().splitlines()) == 7


def test_task_index_picks_one_checkpoint(world, run, tmp_path, monkeypatch, capsys):
    store = tmp_path / "scores.jsonl"
    assert eval_cli(run, "--list") == 0
    listing = capsys.readouterr().out
    assert "0\t" in listing and "global_step8" in listing.splitlines()[1] and "3 checkpoint(s)" in listing
    assert eval_cli(run, *sets(world, "code"), "--tokens", SMALL, "--store", store, "--task-index", 1) == 0
    assert [r["step"] for r in read_scores(store)] == [8]
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    assert eval_cli(run, *sets(world, "code"), "--tokens", SMALL, "--store", store) == 0
    assert [r["step"] for r in read_scores(store)] == [8, 12]
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert eval_cli(run, *sets(world, "code"), "--store", store) == 2
    err = capsys.readouterr().err
    assert "SLURM_ARRAY_TASK_ID 3 is out of range: there are 3 checkpoint(s)" in err
    assert eval_cli(run, *sets(world, "code"), "--store", store, "--task-index", "all", "--tokens", SMALL) == 0
    assert sorted(r["step"] for r in read_scores(store)) == [4, 8, 12]


def failing(capsys, *args, needles=()) -> str:
    assert eval_cli(*args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


def test_partial_checkpoints_are_skipped_in_a_run_dir_and_an_error_when_named(world, run, tmp_path, capsys):
    copy = tmp_path / "pre"
    shutil.copytree(run, copy)
    partial = copy / "checkpoints" / "global_step16"        # a save that never committed
    shutil.copytree(copy / "checkpoints" / "global_step12", partial)
    (partial / "COMMITTED.json").unlink()
    corrupt = copy / "checkpoints" / "global_step8"         # committed, then a file lost
    (corrupt / "mp_rank_00_model_states.pt").unlink()
    assert eval_cli(copy, *sets(world, "code"), "--tokens", SMALL) == 0
    err = capsys.readouterr().err
    assert f"warning: skipping {partial}: not committed" in err
    assert "warning: skipping: checkpoint" in err and "global_step8 is partial" in err
    assert [r["step"] for r in read_scores(copy / "scores.jsonl")] == [4, 12]
    failing(capsys, partial, *sets(world, "code"), needles=["global_step16 is partial", "COMMITTED.json"])
    failing(capsys, corrupt, *sets(world, "code"), needles=["global_step8 is partial", "missing"])
    assert [r["step"] for r in read_scores(copy / "scores.jsonl")] == [4, 12]


def test_a_set_prepared_with_another_tokenizer_is_an_error(world, run, tmp_path, capsys):
    other = ts.make_world(tmp_path / "other", vocab_size=280)
    capsys.readouterr()
    store = tmp_path / "scores.jsonl"
    failing(capsys, run, "--set", f"code={world['code']}", "--set", f"prose={other['prose']}", "--store", store,
            needles=["eval set prose", "tokenizer", "prepare the set again"])
    assert not store.exists()                                # checked before anything is written
    hf = tmp_path / "hf"
    assert main(["export", str(run), "--out", str(hf)]) == 0
    failing(capsys, hf, "--set", f"prose={other['prose']}", "--store", store, needles=["tokenizer"])


def tiny_hf_model(path, vocab_size):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=vocab_size, max_position_embeddings=32, rotary_pct=0.25,
                                     **ts.TINY_MODEL)).save_pretrained(path)
    return path


def test_hugging_face_folder_without_tokenizer_is_checked_by_vocabulary(world, tmp_path, capsys):
    store = tmp_path / "scores.jsonl"
    ok = tiny_hf_model(tmp_path / "ok", 320)
    assert eval_cli(ok, *sets(world, "code"), "--tokens", 64, "--store", store) == 0
    err = capsys.readouterr().err
    assert "has no tokenizer to compare" in err and "vocabulary size 320" in err
    assert [(r["kind"], r["seq_len"]) for r in read_scores(store)] == [("hf", 32)]
    small = tiny_hf_model(tmp_path / "small", 100)
    failing(capsys, small, *sets(world, "code"), "--store", store, needles=["vocabulary mismatch", "100"])
    failing(capsys, ok, *sets(world, "code"), "--store", store, "--seq-len", 64,
            needles=["--seq-len 64 exceeds the max_position_embeddings (32)"])
    failing(capsys, ok, *sets(world, "code"), needles=["--store"])   # no run dir to hold the scores


def test_bad_arguments_are_named(world, run, tmp_path, capsys):
    failing(capsys, run, "--set", "code", needles=["--set 'code'", "NAME=PATH"])
    failing(capsys, run, "--set", f"code={world['code']}:test", needles=["unknown split 'test'", "val, train"])
    failing(capsys, run, "--set", f"a={world['code']}", "--set", f"a={world['prose']}", needles=["given twice"])
    failing(capsys, run, "--set", f"a={tmp_path / 'none'}", needles=[str(tmp_path / "none")])
    raw = tmp_path / "raw"   # the text a set is prepared from, not a set
    raw.mkdir()
    shutil.copy(world["tokenizer"].parent / "a.jsonl", raw)
    (raw / "b.txt").write_text("a document")
    failing(capsys, run, "--set", f"sp={raw}", needles=[
        f"--set 'sp={raw}': {raw} is raw text (a folder holding 2 raw files: 1 *.jsonl, 1 *.txt), not a prepared "
        f"dataset; prepare it with `cpt prepare --source {raw} --out <a new folder> --tokenizer <the model's "
        "tokenizer>`, then pass --set sp=<that folder>"])
    failing(capsys, run, needles=["--set NAME=PATH"])
    failing(capsys, tmp_path / "nowhere", *sets(world), needles=["nowhere does not exist"])
    failing(capsys, tmp_path, *sets(world), needles=["not a run directory"])
    failing(capsys, run, *sets(world), "--tokens", 0, needles=["--tokens must be >= 1"])
    failing(capsys, run, *sets(world), "--task-index", "x", needles=["--task-index='x'"])
    failing(capsys, run, *sets(world), "--store", tmp_path / "s.txt", needles=["expected a .jsonl"])
    # A whole training split is a set too.
    store = tmp_path / "scores.jsonl"
    assert eval_cli(run / "checkpoints" / "global_step4", "--set", f"code={world['code']}:train", "--tokens", 64,
                    "--store", store) == 0
    assert [r["split"] for r in read_scores(store)] == ["train"]


def test_hub_names_keep_their_revision_without_touching_the_network(tmp_path, monkeypatch):
    from continual_pt.evaluation.targets import expand_targets

    monkeypatch.chdir(tmp_path)
    (target,) = expand_targets(["EleutherAI/pythia-410m@step143000"], print)
    assert (target.kind, target.name_or_path, target.revision, target.step) == (
        "hub", "EleutherAI/pythia-410m", "step143000", 143000)
    (tmp_path / "runs").mkdir()
    with pytest.raises(Exception, match="runs/missing does not exist"):
        expand_targets(["runs/missing"], print)          # a typo of a local path is not a hub name


def test_listing_checks_sizes_and_only_the_scored_checkpoint_is_hashed(world, run, tmp_path, capsys, monkeypatch):
    """A job-array task must not read every checkpoint of a run: listing compares sizes, and the one
    checkpoint a task scores is checked byte for byte before its weights are used."""
    copy = tmp_path / "pre"
    shutil.copytree(run, copy)
    corrupt = copy / "checkpoints" / "global_step8" / "mp_rank_00_model_states.pt"
    data = bytearray(corrupt.read_bytes())
    data[-5] ^= 0xFF                                       # same size, other bytes
    corrupt.write_bytes(bytes(data))
    hashed: list[str] = []
    real = integrity.checksum
    monkeypatch.setattr(integrity, "checksum", lambda file: hashed.append(str(file)) or real(file))
    assert eval_cli(copy, "--list") == 0
    assert "3 checkpoint(s)" in capsys.readouterr().out and hashed == []
    store = tmp_path / "scores.jsonl"
    assert eval_cli(copy, *sets(world, "code"), "--tokens", SMALL, "--store", store, "--task-index", 0) == 0
    marker = json.loads((copy / "checkpoints" / "global_step4" / "COMMITTED.json").read_text())
    assert sorted(hashed) == sorted(str(copy / "checkpoints" / "global_step4" / name) for name in marker["files"])
    err = failing(capsys, copy, *sets(world, "code"), "--tokens", SMALL, "--store", store, "--task-index", 1,
                  needles=["global_step8", "mp_rank_00_model_states.pt", "checksum"])
    assert "is corrupt" in err
    assert [r["step"] for r in read_scores(store)] == [4]


def test_a_listing_on_stdout_holds_the_list_only(tmp_path):
    """Scripts parse `--list`: a library's chatter (DeepSpeed's accelerator line) goes to stderr."""
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    proc = subprocess.run([sys.executable, "-m", "continual_pt.cli", "eval", str(folder), "--list", "--store",
                           str(tmp_path / "scores.jsonl")], capture_output=True, text=True, timeout=300,
                          env={**ts.env(), "PYTHONPATH": str(ts.REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == f"0\t{folder}\n1 checkpoint(s): use --task-index 0..0 (sbatch --array=0-0)\n"


# --------------------------------------------------------------------------- --claim, and pruned checkpoints


def claim_args(run, world, store) -> list:
    return [run, *sets(world, "code"), "--tokens", SMALL, "--store", store, "--claim"]


def tag_path(run, step: int) -> str:
    return str((run / "checkpoints" / f"global_step{step}").resolve())


def measurements(world, run, step: int, budget: int | None = int(SMALL)) -> list[tuple]:
    """The score keys of a --claim job on set code of one checkpoint (what its claim covers)."""
    (code,) = open_sets([f"code={world['code']}"])
    return [score_key(measurement(tag_path(run, step), code, budget, 16, "fp32"))]


def test_claiming_jobs_leave_a_held_checkpoint_to_its_holder_and_drain_the_rest(world, run, tmp_path, capsys):
    store = tmp_path / "scores.jsonl"
    other_budget = Claim.take(store, tag_path(run, 8), measurements(world, run, 8, budget=None))
    held = Claim.take(store, tag_path(run, 4), measurements(world, run, 4))   # another job is scoring step 4
    assert eval_cli(*claim_args(run, world, store)) == 0
    out = capsys.readouterr().out
    assert [r["step"] for r in read_scores(store)] == [8, 12]
    for step in (8, 12):
        assert f"claimed {tag_path(run, step)} (step {step}): scoring 1 set(s)" in out, out
        assert f"stored 1 row(s) of {tag_path(run, step)} in {store}" in out, out
    assert "this job scored 2 checkpoint(s)" in out and tag_path(run, 4) not in out
    assert Claim.take(store, tag_path(run, 4), measurements(world, run, 4)) is None   # still the other job's
    held.release()
    other_budget.release()
    assert eval_cli(*claim_args(run, world, store)) == 0
    assert [r["step"] for r in read_scores(store)] == [8, 12, 4]
    before = store.read_bytes()
    assert eval_cli(*claim_args(run, world, store)) == 0
    assert "this job scored 0 checkpoint(s)" in capsys.readouterr().out
    assert store.read_bytes() == before
    assert eval_cli(run, *sets(world, "code"), "--tokens", SMALL, "--store", store, "--claim", "--task-index", 1) == 2


def test_a_claim_ends_with_the_process_that_held_it(tmp_path):
    store = tmp_path / "scores.jsonl"
    code = ("import sys, time; from continual_pt.evaluation.claims import Claim; "
            f"c = Claim.take(__import__('pathlib').Path({str(store)!r}), 'x'); print('held', flush=True); "
            "time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=ts.env())
    try:
        assert holder.stdout.readline() == "held\n"
        assert Claim.take(store, "x") is None
        assert Claim.take(store, "y") is not None       # another checkpoint is free
    finally:
        holder.kill()
        holder.wait()
    claim = Claim.take(store, "x")
    assert claim is not None                             # SIGKILL left nothing behind
    claim.release()


def test_concurrent_claiming_jobs_score_each_checkpoint_once(world, run, tmp_path):
    store = tmp_path / "scores.jsonl"
    procs = [subprocess.Popen(eval_command(*claim_args(run, world, store)), env=eval_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0 and "Traceback" not in err, err[-3000:]
        outs.append(out)
    stored = [line.split(" of ")[1].split(" in ")[0] for out in outs for line in out.splitlines()
              if line.startswith("cpt eval: stored ")]
    assert sorted(stored) == sorted(tag_path(run, s) for s in (4, 8, 12)), outs   # each by one job only
    assert sorted(r["step"] for r in read_scores(store)) == [4, 8, 12]


@pytest.mark.parametrize("when", ["before it is opened", "while its weights are read"])
@pytest.mark.parametrize("mode", [[], ["--claim"]])
def test_a_checkpoint_pruned_before_it_is_loaded_is_skipped_with_one_line(world, run, tmp_path, capsys, monkeypatch,
                                                                          when, mode):
    """`cpt eval RUN` beside a run whose keep_last prunes: the pruned checkpoint is skipped, the rest scored."""
    copy = tmp_path / "pre"
    shutil.copytree(run, copy)
    victim = copy / "checkpoints" / "global_step8"
    if when == "before it is opened":
        real = job.verify
        monkeypatch.setattr(job, "verify", lambda path, **kw: (shutil.rmtree(victim) if path == victim else None)
                            or real(path, **kw))
    else:
        real = job.load_model_from_checkpoint

        def pruning(ref):   # the run's rmtree has removed the weights but not yet the marker
            if ref.path == victim:
                (victim / "mp_rank_00_model_states.pt").unlink()
            return real(ref)

        monkeypatch.setattr(job, "load_model_from_checkpoint", pruning)
    store = tmp_path / "scores.jsonl"
    assert eval_cli(copy, *sets(world, "code"), "--tokens", SMALL, "--store", store, *mode) == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    assert out.count("global_step8") == (2 if mode else 1), out     # claimed, then skipped
    assert "pre global_step8: skipped: its run pruned it (checkpoint.keep_last) before it could be loaded" in out
    assert sorted(r["step"] for r in read_scores(store)) == [4, 12]


def test_a_listing_with_sets_says_which_checkpoints_are_unscored(world, run, tmp_path, capsys):
    store = tmp_path / "scores.jsonl"
    assert eval_cli(run, *sets(world, "code"), "--tokens", SMALL, "--store", store, "--task-index", 1) == 0
    capsys.readouterr()
    assert eval_cli(run, *sets(world, "code"), "--tokens", SMALL, "--store", store, "--list") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"0\t{tag_path(run, 4)}\tunscored", f"1\t{tag_path(run, 8)}\tscored",
                     f"2\t{tag_path(run, 12)}\tunscored",
                     "3 checkpoint(s): use --task-index 0..2 (sbatch --array=0-2); 2 not yet scored on every --set"]
    assert eval_cli(run, *sets(world, "code"), "--store", store, "--list") == 0   # another budget: none scored
    assert capsys.readouterr().out.splitlines()[-1].endswith("; 3 not yet scored on every --set")


# --------------------------------------------------------------------------- which windows a budget scores


def test_a_budget_scores_windows_spread_over_the_whole_split(world, run, tmp_path, monkeypatch):
    """A split stored in input order whose first tenth is another kind of text (strings of rare letters and
    digits before the code the model learnt): its first windows are far from the split's loss, windows
    spread over it are not."""
    code = [json.loads(line) for line in (world["tokenizer"].parent / "a.jsonl").open()]
    rng = random.Random(0)
    noise = [{"text": " ".join("".join(rng.choice("qxzjkvw0123456789") for _ in range(rng.randint(2, 9)))
                               for _ in range(60))} for _ in range(60)]
    ordered = noise + code                            # 60 documents of letters and digits, then 600 of code
    source = tmp_path / "ordered.jsonl"
    source.write_text("".join(json.dumps(d) + "\n" for d in ordered))
    data = tmp_path / "ordered"
    assert main(["prepare", "--source", str(source), "--tokenizer", str(world["tokenizer"]), "--out", str(data),
                 "--val-fraction", "0", "--workers", "1", "--quiet"]) == 0
    split = PreparedDataset(data, "train")
    ckpt = run / "checkpoints" / "global_step12"

    def loss(budget, store, *extra):
        args = ["--tokens", budget] if budget else []
        assert eval_cli(ckpt, "--set", f"ordered={data}:train", *args, "--store", tmp_path / store, *extra) == 0
        return read_scores(tmp_path / store)[-1]

    whole = loss(None, "whole.jsonl")
    spread = loss(split.num_tokens // 8, "spread.jsonl")
    assert whole["windows"] == split.num_tokens // 17 and spread["windows"] == -(-(split.num_tokens // 8) // 16)
    monkeypatch.setattr("continual_pt.evaluation.scoring.selected_windows",   # the rule before: the first windows
                        lambda n, seq_len, budget: list(range(min(n, -(-budget // seq_len)))))
    first = loss(split.num_tokens // 10, "first.jsonl")
    print(f"whole {whole['loss']:.4f}, first tenth {first['loss']:.4f}, spread 1/8 {spread['loss']:.4f}")
    assert abs(first["loss"] - whole["loss"]) >= 0.3, (first["loss"], whole["loss"])
    assert abs(spread["loss"] - whole["loss"]) <= 0.05, (spread["loss"], whole["loss"])


# --------------------------------------------------------------------------- losses per domain


@pytest.fixture(scope="module")
def mixed(world, tmp_path_factory):
    """A set whose documents come from three domains (meta.source), prepared with --domain-field."""
    return ts.make_mixed(tmp_path_factory.mktemp("mixed"), world)


def domain_rows(store) -> tuple[dict, dict[str, dict]]:
    rows = read_scores(store)
    (total,) = [r for r in rows if r.get("domain") is None]
    return total, {r["domain"]: r for r in rows if r.get("domain")}


@pytest.mark.slow
def test_scores_by_domain_add_up_to_the_total_on_any_world_size(world, run, mixed, tmp_path, capsys):
    ckpt = run / "checkpoints" / "global_step12"
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    assert eval_cli(ckpt, "--set", f"mixed={mixed}", "--by-domain", "--tokens", 480, "--store", one) == 0
    total, rows = domain_rows(one)
    assert sorted(rows) == sorted(PreparedDataset(mixed, "val").domains) and len(rows) == 3
    assert sum(r["tokens"] for r in rows.values()) == total["tokens"] == 480
    weighted = sum(r["loss"] * r["tokens"] for r in rows.values()) / total["tokens"]
    assert abs(weighted - total["loss"]) < 1e-9
    assert total["macro_loss"] == pytest.approx(sum(r["loss"] for r in rows.values()) / 3, abs=1e-12)
    assert {r["selection"] for r in [total, *rows.values()]} == {"spread-by-domain"}
    before = one.read_bytes()
    assert eval_cli(ckpt, "--set", f"mixed={mixed}", "--by-domain", "--tokens", 480, "--store", one) == 0
    assert one.read_bytes() == before and "0 to score, 1 already scored" in capsys.readouterr().err
    run_eval(ckpt, "--set", f"mixed={mixed}", "--by-domain", "--tokens", 480, "--store", two, world_size=2)
    total2, rows2 = domain_rows(two)
    assert total2["tokens"] == 480 and total2["loss"] == pytest.approx(total["loss"], rel=1e-6)
    for name, r in rows.items():
        assert rows2[name]["tokens"] == r["tokens"] and rows2[name]["loss"] == pytest.approx(r["loss"], rel=1e-6)
    failing(capsys, ckpt, "--set", f"code={world['code']}", "--by-domain", "--store", tmp_path / "x.jsonl",
            needles=["--set code", "has no domains", "--domain-field"])
    assert not (tmp_path / "x.jsonl").exists()


@pytest.mark.slow
def test_in_loop_losses_by_domain_equal_cpt_eval_of_the_same_checkpoint(world, mixed, tmp_path):
    cfg = ts.write_config(tmp_path / "run.yaml", world, tmp_path / "runs", train={"max_steps": 4},
                          eval={"sets": {"mixed": str(mixed)}, "tokens": 480, "every_steps": 4, "at_start": False,
                                "by_domain": True}, checkpoint={"every_steps": 4})
    ts.train(cfg, ["name=domains"])
    run_dir = tmp_path / "runs" / "domains"
    records = [r for r in ts.train_records(run_dir, "eval") if r["step"] == 4]
    in_loop = {r.get("domain"): r for r in records}
    assert sorted(d for d in in_loop if d) == sorted(PreparedDataset(mixed, "val").domains)
    assert "macro_loss" in in_loop[None] and in_loop[None]["eval_tokens"] == 480
    store = tmp_path / "scores.jsonl"
    assert eval_cli(run_dir, "--set", f"mixed={mixed}", "--by-domain", "--tokens", 480, "--store", store) == 0
    total, rows = domain_rows(store)
    assert total["loss"] == pytest.approx(in_loop[None]["loss"], abs=1e-5)
    for name, r in rows.items():
        assert (r["tokens"], r["loss"]) == (in_loop[name]["eval_tokens"], pytest.approx(in_loop[name]["loss"], abs=1e-5))
    # cpt report and cpt plot show each domain (their curves are named set/domain).
    capsys_free = subprocess.run([sys.executable, "-m", "continual_pt.cli", "report", str(run_dir), "--upstream",
                                  "mixed", "--downstream", "mixed", "--by-domain"], env=eval_env(),
                                 capture_output=True, text=True, timeout=300)
    assert capsys_free.returncode == 0, capsys_free.stderr[-3000:]
    table = capsys_free.stdout
    doms = sorted(PreparedDataset(mixed, "val").domains)
    assert "mixed by domain (upstream: forgetting):" in table and "mixed by domain (downstream: gain):" in table
    by_domain = table.split("mixed by domain (upstream: forgetting):")[1]
    row = next(line for line in by_domain.splitlines() if line.startswith("| domains |"))
    assert row.split(" | ")[1:1 + len(doms)] == [f"{in_loop[d]['loss']:.4f}" for d in doms]
    assert main(["plot", str(run_dir), "--out", str(tmp_path / "fig"), "--by-domain"]) == 0
    assert (tmp_path / "fig.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["report", str(run_dir), "--upstream", "mixed", "--downstream", "mixed", "--by-domain",
                 "--source", "metrics"]) == 0
