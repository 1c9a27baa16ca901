"""benchmarks/gpu_check.py's CPU-side pieces: the HF Trainer comparison trains the run config's model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = ["model.config.hidden_size=32", "model.config.num_hidden_layers=2", "model.config.num_attention_heads=4",
        "model.config.intermediate_size=64", "model.config.vocab_size=512", "data.seq_len=16",
        "train.precision=fp32", "train.max_steps=4", "train.micro_batch_size=2", "train.log_every=2"]


def test_the_hf_trainer_runs_the_configs_model_on_our_windows(gpu_check, data_dataset, tmp_path):
    config = REPO / "configs" / "pythia-410m-gpu-check.yaml"
    overrides = [f"data.train.corpus.path={data_dataset}", *TINY]
    result = gpu_check.hf_worker(config, overrides, tmp_path / "hf", compile_model=False, warmup_steps=1)
    assert result["steps"] == 4 and result["tokens_per_s"] > 0 and result["peak_gib"] is None
    from continual_pt import config as cfgs

    cfg = cfgs.load(config, overrides)
    rows = gpu_check.hf_rows(cfg, 5)
    assert len(rows) == 5 and all(r["input_ids"].shape == (16,) and r["labels"] is r["input_ids"] for r in rows)
    args = gpu_check.hf_arguments(cfg, tmp_path / "args", compile_model=True, cuda=False)
    assert (args.per_device_train_batch_size, args.max_steps, args.learning_rate, args.warmup_steps) == (2, 4, 3e-4, 0)
    assert args.torch_compile and not args.bf16 and args.optim.value == "adamw_torch_fused"


def test_the_main_command_needs_a_tokenizer(gpu_check, capsys):
    with pytest.raises(SystemExit):
        gpu_check.main([])
    assert "--tokenizer is required" in capsys.readouterr().err
