"""ds_configs/: every file parses, fills, and passes DeepSpeed's own validation at world sizes 1 and 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from continual_pt import config
from continual_pt.config import ConfigError
from continual_pt.config import deepspeed as ds_config
from tests.helpers import REPO

NAMES = ["zero0", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload"]


def test_shipped_configs_are_the_expected_set():
    assert ds_config.available() == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_every_file_parses_and_leaves_decisions_to_the_run_config(name):
    raw = json.loads((ds_config.DS_CONFIG_DIR / f"{name}.json").read_text())
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping"):
        assert raw[key] == "auto"
    assert raw["bf16"]["enabled"] == "auto" and raw["fp16"]["enabled"] == "auto"


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_fill(name, precision):
    cfg = ds_config.fill(ds_config.load(name), micro_batch_size=2, grad_accum=4, dp_size=2,
                         precision=precision, grad_clip=1.0)
    assert cfg["train_batch_size"] == 16
    assert cfg["train_micro_batch_size_per_gpu"] == 2 and cfg["gradient_accumulation_steps"] == 4
    assert cfg["bf16"]["enabled"] is (precision == "bf16")
    assert cfg["fp16"]["enabled"] is (precision == "fp16")
    assert "auto" not in json.dumps(cfg)
    assert not any(k.startswith("_") for k in cfg)


def test_the_reduce_bucket_of_zero1_and_2_is_fitted_to_the_model():
    zero1, zero2 = ds_config.load("zero1"), ds_config.load("zero2_offload")
    assert ds_config.fit_reduce_bucket(zero1, 4_208_128)["zero_optimization"]["reduce_bucket_size"] == 4_208_128
    assert ds_config.fit_reduce_bucket(zero2, 1000)["zero_optimization"]["reduce_bucket_size"] == 1000
    assert zero1["zero_optimization"]["reduce_bucket_size"] == 500_000_000   # the file's dict is not changed
    kept = ds_config.fit_reduce_bucket(zero1, 1000)["zero_optimization"]
    assert {k: v for k, v in kept.items() if k != "reduce_bucket_size"} == {
        k: v for k, v in zero1["zero_optimization"].items() if k != "reduce_bucket_size"}
    # a model at least as large as the bucket, another stage, and a smaller configured bucket are left as they are
    assert ds_config.fit_reduce_bucket(zero1, 500_000_000) is zero1
    for name in ("zero0", "zero3"):
        assert ds_config.fit_reduce_bucket(ds_config.load(name), 1000) == ds_config.load(name)
    small = {"zero_optimization": {"stage": 2, "reduce_bucket_size": 500}}
    assert ds_config.fit_reduce_bucket(small, 1000) is small
    # no reduce_bucket_size in the file: DeepSpeed's default applies, so the model's size is written
    bare = {"zero_optimization": {"stage": 1}}
    assert ds_config.fit_reduce_bucket(bare, 1000) == {"zero_optimization": {"stage": 1, "reduce_bucket_size": 1000}}


def test_batch_arithmetic_is_checked():
    ds_config.check_batch(32, 2, 4, 4)
    with pytest.raises(ds_config.BatchSizeError, match=r"global batch 30 != micro batch 2 x gradient "
                                                         r"accumulation 4 x data-parallel size 4 = 32"):
        ds_config.check_batch(30, 2, 4, 4)
    with pytest.raises(ds_config.BatchSizeError):
        ds_config.fill(ds_config.load("zero1"), micro_batch_size=2, grad_accum=4, dp_size=2,
                       precision="bf16", grad_clip=1.0, global_batch_size=8)


def test_a_fixed_value_in_the_file_that_disagrees_is_an_error():
    raw = ds_config.load("zero1")
    raw["gradient_accumulation_steps"] = 8
    with pytest.raises(ValueError, match="gradient_accumulation_steps is 8 but the run config gives 4"):
        ds_config.fill(raw, micro_batch_size=1, grad_accum=4, dp_size=1, precision="bf16", grad_clip=1.0)
    raw = ds_config.load("zero1")
    raw["zero_optimization"]["reduce_bucket_size"] = "auto"
    with pytest.raises(ValueError, match="zero_optimization.reduce_bucket_size"):
        ds_config.fill(raw, micro_batch_size=1, grad_accum=4, dp_size=1, precision="bf16", grad_clip=1.0)


def test_find_by_name_or_path(tmp_path):
    assert ds_config.find("zero2").name == "zero2.json"
    custom = tmp_path / "mine.json"
    custom.write_text("{}")
    assert ds_config.find(str(custom)) == custom
    assert ds_config.find("zero7") is None
    with pytest.raises(FileNotFoundError, match="accepted: zero0, zero1"):
        ds_config.load("zero7")


def test_shipped_configs_are_package_data_shown_at_the_top_level():
    # A wheel carries only the package: the files live there; the top-level folders show the same ones.
    assert ds_config.DS_CONFIG_DIR == REPO / "continual_pt" / "ds_configs"
    for folder in ("ds_configs", "configs"):
        shipped, browsed = REPO / "continual_pt" / folder, REPO / folder
        files = sorted(p.relative_to(shipped) for p in shipped.rglob("*") if p.is_file())
        assert files == sorted(p.relative_to(browsed) for p in browsed.rglob("*") if p.is_file())
        assert all((shipped / f).read_bytes() == (browsed / f).read_bytes() for f in files)
    assert len(list((REPO / "continual_pt" / "ds_configs").glob("*.json"))) == len(NAMES)
    assert (REPO / "continual_pt" / "configs" / "quickstart" / "pretrain.yaml").is_file()


UNUSABLE = {
    "not_json": ('{"zero_optimization": ', "not valid JSON: Expecting value: line 1 column 23 (char 22)"),
    "a_list": ("[1, 2]", "expected a JSON object of DeepSpeed settings ({...}), got an array"),
    "a_number": ("3", "expected a JSON object of DeepSpeed settings ({...}), got a number"),
    "a_string": ('"zero2"', "expected a JSON object of DeepSpeed settings ({...}), got a string"),
    "a_section_not_an_object": ('{"bf16": true}', "bf16: expected a JSON object, got True"),
    "offload_not_an_object": ('{"zero_optimization": {"stage": 2, "offload_optimizer": "cpu"}}',
                              "zero_optimization.offload_optimizer: expected a JSON object, got 'cpu'"),
}


def _run_config(tmp_path, ds_text: str):
    ds = tmp_path / "ds.json"
    ds.write_text(ds_text)
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump({"model": {"config": {"hidden_size": 8}}, "data": {"train": {"c": "data/c"}},
                                   "train": {"max_steps": 2, "ds_config": str(ds)}}))
    return ds, run


@pytest.mark.parametrize("kind", list(UNUSABLE))
def test_an_unusable_file_is_one_config_problem_naming_it(tmp_path, kind):
    text, message = UNUSABLE[kind]
    ds, run = _run_config(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        config.load(run)
    assert info.value.problems == [f"{run}: train.ds_config: {ds}: {message}"]
    with pytest.raises(ds_config.DeepSpeedFileError) as direct:   # a UserError: `cpt` prints it, no traceback
        ds_config.load(str(ds))
    assert str(direct.value) == f"{ds}: {message}"


def test_the_cli_says_so_in_one_message(tmp_path):
    ds, run = _run_config(tmp_path, "[1, 2]")
    proc = subprocess.run([sys.executable, "-m", "continual_pt.cli", "config", "--config", str(run)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == (f"cpt config: error: invalid configuration (1 problem(s)):\n  - {run}: train.ds_config: "
                           f"{ds}: expected a JSON object of DeepSpeed settings ({{...}}), got an array\n")


class _DataParallel:
    """The slice of an mpu DeepSpeed asks for: the data-parallel world size."""

    def __init__(self, size: int):
        self.size = size

    def get_data_parallel_world_size(self) -> int:
        return self.size


@pytest.fixture(scope="module")
def single_process_group():
    import os

    import deepspeed
    import torch.distributed as dist

    from tests.helpers import free_port

    if not dist.is_initialized():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0",
                          WORLD_SIZE="1")
        deepspeed.init_distributed(dist_backend="gloo")
    yield


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("world_size", [1, 2])
def test_deepspeed_accepts_filled_config(name, world_size, single_process_group):
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = ds_config.fill(ds_config.load(name), micro_batch_size=2, grad_accum=3, dp_size=world_size,
                         precision="bf16", grad_clip=1.0)
    parsed = DeepSpeedConfig(cfg, mpu=_DataParallel(world_size))
    assert parsed.world_size == world_size
    assert parsed.train_batch_size == 6 * world_size
    assert parsed.gradient_accumulation_steps == 3
    assert parsed.zero_optimization_stage == int(name[4])
    assert parsed.bfloat16_config.enabled if hasattr(parsed, "bfloat16_config") else parsed.bfloat16_enabled
    # a wrong global batch is rejected by DeepSpeed too: our check is not looser than theirs
    bad = dict(cfg, train_batch_size=6 * world_size + 1)
    with pytest.raises(AssertionError):
        DeepSpeedConfig(bad, mpu=_DataParallel(world_size))
