"""How a phase starts (re-warm from a Hugging Face folder or our checkpoint), export, launchers, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from continual_pt import config
from continual_pt.checkpoint import refs, weights
from tests import train_support as ts

pytestmark = pytest.mark.slow

# Opens a session exactly as training does, then reports what the engine starts from.
INSPECT = r"""
import json, sys, torch
from continual_pt import config
from continual_pt.runtime import distributed
from continual_pt.training.session import open_session
cfg = config.load(sys.argv[1], sys.argv[2:])
env = distributed.init()
s = open_session(cfg, env)
opt = s.engine.optimizer
state = getattr(opt, "optimizer", opt).state
weights = {k: v.detach().float() for k, v in s.engine.module.model.state_dict().items()}
torch.save(weights, cfg.run_dir / "start_weights.pt")
print(json.dumps({"lr": [g["lr"] for g in opt.param_groups], "optimizer_state": len(state),
                  "schedule_step": s.engine.lr_scheduler.last_epoch, "start_step": s.start.step}))
"""


def inspect(cfg_path, overrides):
    proc = subprocess.run([sys.executable, "-c", INSPECT, str(cfg_path), *overrides], env=ts.env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def pretrained(world, tmp_path_factory):
    """A short pre-training run on 'code', saved every 4 steps."""
    root = tmp_path_factory.mktemp("pre")
    cfg = ts.write_config(root / "pre.yaml", world, root / "runs", name="pre",
                          checkpoint={"every_steps": 4, "keep_last": 2})
    ts.train(cfg)
    return root / "runs" / "pre"


def hf_folder(tmp_path, vocab_size=320, poison=False):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(7)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=vocab_size, max_position_embeddings=64, rotary_pct=0.25,
                                             tie_word_embeddings=False, **ts.TINY_MODEL))
    if poison:  # every forward pass gives a non-finite loss
        with torch.no_grad():
            model.get_output_embeddings().weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf", {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_rewarm_from_hugging_face_folder(world, tmp_path):
    folder, expected = hf_folder(tmp_path)
    cfg = ts.write_config(tmp_path / "rewarm.yaml", world, tmp_path / "runs", name="rewarm",
                          model={}, checkpoint={"init": str(folder)},
                          data={"train": {"prose": {"path": str(world["prose"])}}, "seq_len": 16})
    info = inspect(cfg, [])
    assert info["lr"] == [0.0, 0.0]             # warmup step 0: the re-warming starts from 0
    assert info["schedule_step"] == 0 and info["start_step"] == 0
    assert info["optimizer_state"] == 0          # a fresh optimizer
    got = torch.load(tmp_path / "runs" / "rewarm" / "start_weights.pt")
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    ts.train(cfg, ["name=rewarm2"])
    records = ts.train_records(tmp_path / "runs" / "rewarm2")
    lr_at = __import__("continual_pt.schedules", fromlist=["build"]).build(
        config.load(cfg).schedule, 12)
    assert [r["lr"] for r in records] == [lr_at(k) for k in range(12)]
    assert records[0]["lr"] == 0.0 and records[3]["lr"] == 3.0e-3


@pytest.mark.parametrize("skips", [0, 3])
def test_non_finite_loss_stops_the_run_with_its_step_and_saves_nothing(world, tmp_path, skips):
    folder, _ = hf_folder(tmp_path, poison=True)
    cfg = ts.write_config(tmp_path / "nan.yaml", world, tmp_path / "runs", name="nan", model={},
                          checkpoint={"init": str(folder), "every_steps": 1})
    proc = ts.train(cfg, [f"train.max_nonfinite_skips={skips}"], expect=1)
    assert "non-finite loss at step 1 " in proc.stderr
    if skips:
        assert "skipping the batch (3/3)" in proc.stderr and "3 batch(es) skipped before" in proc.stderr
    assert not (tmp_path / "runs" / "nan" / "checkpoints").exists()


def test_init_from_our_checkpoint_is_weights_only_unless_asked(world, pretrained, tmp_path):
    cfg = ts.write_config(tmp_path / "next.yaml", world, tmp_path / "runs", name="next", model={},
                          checkpoint={"init": str(pretrained)})
    info = inspect(cfg, [])
    assert info["schedule_step"] == 0 and info["optimizer_state"] == 0 and info["lr"] == [0.0, 0.0]
    expected = weights.consolidated_state_dict(refs.resolve(pretrained))
    got = torch.load(tmp_path / "runs" / "next" / "start_weights.pt")
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    kept = inspect(cfg, ["name=kept", "checkpoint.keep_optimizer=true"])
    assert kept["optimizer_state"] > 0 and kept["schedule_step"] == 0 and kept["lr"] == [0.0, 0.0]


def test_export_loads_without_deepspeed_and_scores_like_the_engine(world, pretrained, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from continual_pt.cli import main
    from continual_pt.data.dataset import PackedSequences, PreparedDataset
    from continual_pt.evaluation.scoring import score_packed
    from continual_pt.model.causal_lm import CausalLMLoss
    from continual_pt.runtime.distributed import DistEnv

    out = tmp_path / "hf"
    assert main(["export", str(pretrained), "--out", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == 300
    engine_eval = {r["set"]: r["loss"] for r in ts.train_records(pretrained, "eval") if r["step"] == 12}
    env = DistEnv(0, 0, 1, "127.0.0.1", 0, "none")
    for name in ("code", "prose"):
        packed = PackedSequences(PreparedDataset(world[name], split="val"), 16)
        got = score_packed(CausalLMLoss(model.eval()), packed, 512, 2, env, torch.device("cpu"))
        assert got["loss"] == pytest.approx(engine_eval[name], abs=1e-5)
    assert main(["export", str(pretrained), "--out", str(out)]) == 2   # never overwrites


def test_activation_checkpointing_gives_the_same_losses(world, tmp_path):
    cfg = ts.write_config(tmp_path / "run.yaml", world, tmp_path / "runs", eval={"sets": {}})
    ts.train(cfg, ["name=plain", "train.max_steps=4"])
    ts.train(cfg, ["name=ckpt", "train.max_steps=4", "model.activation_checkpointing=true"])
    plain, ckpt = (ts.train_records(tmp_path / "runs" / n) for n in ("plain", "ckpt"))
    assert [r["loss"] for r in ckpt] == pytest.approx([r["loss"] for r in plain], rel=1e-6)


@pytest.mark.parametrize("launcher", ["torchrun", "mpirun"])
def test_runs_under_other_launchers(world, tmp_path, launcher):
    cfg = ts.write_config(tmp_path / "run.yaml", world, tmp_path / "runs", name=launcher)
    proc = ts.train(cfg, ["train.max_steps=4"], world_size=2, launcher=launcher)
    assert f"world size 2 ({launcher})" in proc.stderr
    assert [r["step"] for r in ts.train_records(tmp_path / "runs" / launcher)] == [1, 2, 3, 4]


def bad_run(cfg, overrides, *needles):
    proc = ts.train(cfg, overrides, expect=2)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in proc.stderr, proc.stderr[-3000:]
    return proc


# Bad inputs, one per case: each returns (overrides, what stderr must say).
def resume_path_missing(tmp_path, request):
    return [f"checkpoint.resume={tmp_path / 'nowhere'}"], ["checkpoint.resume", "does not exist"]


def resume_path_partial(tmp_path, request):
    partial = tmp_path / "partial" / "checkpoints" / "global_step9"
    partial.mkdir(parents=True)
    return [f"checkpoint.resume={partial}"], ["global_step9 is partial"]


def resume_and_init_together(tmp_path, request):
    pretrained = request.getfixturevalue("pretrained")   # only this case needs a trained run
    return [f"checkpoint.resume={pretrained}", f"checkpoint.init={pretrained}"], ["never both"]


def model_vocabulary_mismatch(tmp_path, request):
    return ["model.config.vocab_size=100"], ["vocabulary mismatch", "100 embedding rows", "300"]


def train_data_missing(tmp_path, request):
    return [f"data.train.code.path={tmp_path / 'missing'}"], [str(tmp_path / "missing")]


def train_data_raw_text(tmp_path, request):
    raw = request.getfixturevalue("world")["tokenizer"].parent / "a.jsonl"   # what 'code' was prepared from
    cfg = tmp_path / "run.yaml"
    run = yaml.safe_load(cfg.read_text())
    run["data"]["train"]["code"]["path"] = str(raw)
    cfg.write_text(yaml.safe_dump(run))
    return [], [f"{cfg}: data.train.code.path: {raw} is raw text (a .jsonl file), not a prepared dataset; prepare it "
                f"with `cpt prepare --source {raw} --out <a new folder> --tokenizer <the model's tokenizer>`, then set "
                "data.train.code.path to that folder"]


def train_domains_the_data_lacks(tmp_path, request):
    world = request.getfixturevalue("world")
    mixed = ts.make_mixed(tmp_path / "mixed", world)
    cfg = tmp_path / "run.yaml"
    run = yaml.safe_load(cfg.read_text())
    run["data"]["train"]["code"]["domains"] = ["code"]
    run["data"]["train"]["mixed"] = {"path": str(mixed), "domains": {"code": 1.0, "cod": 1.0}}
    cfg.write_text(yaml.safe_dump(run))
    return [], [f"{cfg}: data.train.code.domains: {world['code']} has no domains (prepared without --domain-field",
                f"{cfg}: data.train.mixed.domains.cod: {mixed} has no domain 'cod' (its domains: "]


def eval_set_of_another_tokenizer(tmp_path, request):
    other_tok = ts.make_world(tmp_path / "other", vocab_size=280)
    return [f"eval.sets.prose={other_tok['prose']}"], ["tokenizer"]


BAD_INPUTS = [resume_path_missing, resume_path_partial, resume_and_init_together, model_vocabulary_mismatch,
              train_data_missing, train_data_raw_text, train_domains_the_data_lacks, eval_set_of_another_tokenizer]


@pytest.mark.parametrize("bad_input", BAD_INPUTS, ids=[f.__name__ for f in BAD_INPUTS])
def test_bad_input_is_reported_before_anything_is_written(world, tmp_path, request, bad_input):
    cfg = ts.write_config(tmp_path / "run.yaml", world, tmp_path / "runs", name="bad")
    overrides, needles = bad_input(tmp_path, request)
    bad_run(cfg, overrides, *needles)
    assert not (tmp_path / "runs" / "bad").exists()
