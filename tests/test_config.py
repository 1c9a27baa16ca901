"""Config: precedence, typed conversion, gathered validation, YAML round trip."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from continual_pt import config
from continual_pt.config import ConfigError, parse_duration, resolve_length

MINIMAL = ["model.config.hidden_size=8", "data.train.corpus.path=data/corpus", "train.max_steps=100"]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_precedence_defaults_file_command_line(tmp_path):
    path = write(tmp_path, """
name: phase2
model: {config: {hidden_size: 8}}
data: {train: {sp: {path: data/sp, weight: 0.95}, pile: {path: data/pile, weight: 0.05}}}
train: {max_steps: 1000, micro_batch_size: 4}
schedule: {name: cosine, max_lr: 3.0e-4}
""")
    cfg = config.load(path, ["schedule.max_lr=6e-4", "train.max_steps=100", "data.train.pile.weight=0.25"])
    assert cfg.name == "phase2"                      # file
    assert cfg.schedule.max_lr == 6e-4               # command line beats file, YAML '6e-4' read as a float
    assert cfg.train.max_steps == 100
    assert cfg.train.micro_batch_size == 4           # file
    assert cfg.train.grad_accum == 1                 # default
    assert cfg.optim.betas == [0.9, 0.95]            # paper defaults
    assert cfg.data.train["pile"].weight == 0.25
    assert cfg.data.train["sp"].weight == 0.95
    assert cfg.run_dir == Path("runs/phase2")


def test_dump_loads_back_equal(tmp_path):
    cfg = config.load(None, MINIMAL + ["schedule.warmup=5%", "eval.sets.pile=data/pile",
                                       "schedule.decay_end=0.8", "train.time_limit=01:00:00"])
    text = config.dump(cfg, tmp_path / "config.yaml")
    assert (tmp_path / "config.yaml").read_text() == text
    again = config.load(tmp_path / "config.yaml")
    assert again == cfg
    assert config.from_dict(yaml.safe_load(text)) == cfg


def test_eval_set_shorthand_is_a_path():
    cfg = config.load(None, MINIMAL + ["eval.sets={pile: data/pile, sp: {path: data/sp, split: train}}"])
    assert cfg.eval.sets["pile"].path == "data/pile" and cfg.eval.sets["pile"].split == "val"
    assert cfg.eval.sets["sp"].split == "train"


def test_every_problem_in_one_error_with_file_and_key(tmp_path):
    path = write(tmp_path, """
model: {config: {hidden_size: 8}}
data: {train: {corpus: {path: data/corpus}}}
train: {max_stpes: 10, micro_batch_size: two, max_steps: 100}
schedule: {name: cosine, warmup: 200, max_lr: 1.0e-4, min_lr: 1.0e-3}
""")
    with pytest.raises(ConfigError) as info:
        config.load(path, ["schedule.name=cosin"])
    problems = info.value.problems
    text = str(info.value)
    assert any(f"{path}: train.max_stpes: unknown key; did you mean 'max_steps'?" in p for p in problems)
    assert any(f"{path}: train.micro_batch_size: expected an integer, got 'two'" in p for p in problems)
    assert any(p.startswith("command line: schedule.name:") and "cosine" in p for p in problems)
    assert len(problems) >= 3
    assert "invalid configuration" in text


def test_warmup_longer_than_run_and_min_above_max(tmp_path):
    path = write(tmp_path, """
model: {config: {hidden_size: 8}}
data: {train: {corpus: {path: data/corpus}}}
train: {max_steps: 100}
schedule: {warmup: 200, max_lr: 1.0e-4, min_lr: 1.0e-3}
""")
    with pytest.raises(ConfigError) as info:
        config.load(path)
    keys = [p.split(": ")[1] for p in info.value.problems]
    assert "schedule.warmup" in keys and "schedule.min_lr" in keys
    assert all(p.startswith(f"{path}: ") for p in info.value.problems)


@pytest.mark.parametrize("override, key", [
    ("train.precision=fp8", "train.precision"),
    ("train.ds_config=zero9", "train.ds_config"),
    ("checkpoint.keep_last=1", "checkpoint.keep_last"),
    ("optim.betas=[0.9]", "optim.betas"),
    ("train.max_steps=0", "train.max_steps"),
    ("data.seq_len=-1", "data.seq_len"),
    ("train.time_limit=soon", "train.time_limit"),
    ("schedule.warmup=1.5", "schedule.warmup"),
    ("nmae=x", "nmae"),
])
def test_single_bad_value_names_its_key(override, key):
    with pytest.raises(ConfigError) as info:
        config.load(None, MINIMAL + [override])
    assert [p.split(": ")[1] for p in info.value.problems] == [key]
    assert info.value.problems[0].startswith("command line: ")


def test_fused_loss_on_under_zero3_is_refused_by_the_config():
    """Refused with the config's other problems, before a run dir exists, not at the first forward."""
    with pytest.raises(ConfigError) as info:
        config.load(None, MINIMAL + ["model.fused_loss=on", "train.ds_config=zero3"])
    assert [p.split(": ")[1] for p in info.value.problems] == ["model.fused_loss"]
    assert "ZeRO stage 3 (train.ds_config=zero3" in info.value.problems[0]
    for allowed in (["model.fused_loss=auto", "train.ds_config=zero3"], ["model.fused_loss=on", "train.ds_config=zero2"]):
        config.load(None, MINIMAL + allowed)


def test_fused_loss_reads_yamls_bare_on_and_off(tmp_path):
    for spelled, meant in (("on", "on"), ("off", "off"), ("true", "on"), ("'auto'", "auto")):
        path = write(tmp_path, f"model: {{config: {{hidden_size: 8}}, fused_loss: {spelled}}}\n"
                               "data: {train: {corpus: {path: data/corpus}}}\ntrain: {max_steps: 10}\n")
        assert config.load(path).model.fused_loss == meant
        assert config.load(None, MINIMAL + [f"model.fused_loss={spelled}"]).model.fused_loss == meant


def test_resume_path_and_init_together_is_an_error():
    with pytest.raises(ConfigError) as info:
        config.load(None, MINIMAL + ["checkpoint.resume=runs/a/checkpoints/global_step10",
                                     "checkpoint.init=runs/pretrain"])
    assert "checkpoint.init" in str(info.value) and "never both" in str(info.value)
    # auto + init is the normal re-warming start (init applies only when nothing is resumed)
    cfg = config.load(None, MINIMAL + ["checkpoint.init=runs/pretrain"])
    assert cfg.checkpoint.resume == "auto"


def test_missing_architecture_and_data():
    with pytest.raises(ConfigError) as info:
        config.load(None, ["train.max_steps=10"])
    keys = {p.split(": ")[1] for p in info.value.problems}
    assert {"model", "data.train"} <= keys


def test_an_empty_file_is_named_and_so_is_every_key_it_leaves_unset(tmp_path):
    empty = tmp_path / "run.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError) as info:
        config.load(empty)
    assert info.value.problems[0] == (f"{empty}: the file is empty (a run needs at least data.train, "
                                      "train.max_steps and a model: see configs/)")
    assert {p.partition(": ")[0] for p in info.value.problems[1:]} == {f"{empty} (not set there)"}
    assert len(info.value.problems) == 4


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        config.load(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(write(tmp_path, "train: [unclosed"))
    with pytest.raises(ConfigError, match="not of the form key=value"):
        config.load(None, MINIMAL + ["train.max_steps"])


@pytest.mark.parametrize("value, steps", [(10, 10), (0.25, 25), ("5%", 5), (0, 0), (1.0, 100), ("0.5%", 0)])
def test_resolve_length(value, steps):
    assert resolve_length(value, 100) == steps


@pytest.mark.parametrize("text, seconds", [("90", 90), (90, 90), ("01:30", 90), ("02:00:05", 7205),
                                           ("1-00:00:00", 86400)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


def test_cli_bad_config_exits_nonzero_with_one_message(tmp_path):
    path = write(tmp_path, """
model: {config: {hidden_size: 8}}
data: {train: {corpus: {path: data/corpus}}}
train: {max_steps: 100, warmup: 3}
schedule: {name: cosnie, warmup: 500, min_lr: 1.0, max_lr: 1.0e-3}
""")
    proc = subprocess.run([sys.executable, "-m", "continual_pt.cli", "config", "--config", str(path),
                           "train.precision=int3"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stdout == ""
    err = proc.stderr
    assert err.count("invalid configuration") == 1
    for key in ("train.warmup", "schedule.name", "train.precision"):
        assert key in err
    assert f"{path}: train.warmup: unknown key" in err
    assert "command line: train.precision" in err
    assert "Traceback" not in err


def test_an_override_that_is_not_yaml_is_a_problem_not_a_traceback():
    # An unquoted `key={a: b}` reaches us split by the shell into 'key={a:' and 'b}'.
    with pytest.raises(ConfigError) as info:
        config.load(None, MINIMAL + ["model.config={hidden_size:", "8}"])
    assert info.value.problems == [
        "command line: override 'model.config={hidden_size:': the value is not valid YAML (while parsing a flow "
        "node); quote it for the shell, e.g. 'model.config={hidden_size: 64}'",
        "command line: override '8}' is not of the form key=value (e.g. train.max_steps=100)"]


def test_model_config_origins_are_recorded_but_never_dumped(tmp_path):
    path = write(tmp_path, "model: {config: {hidden_size: 8}}\ndata: {train: {c: data/c}}\ntrain: {max_steps: 3}\n")
    cfg = config.load(path, ["model.config.num_hidden_layers=2"])
    assert cfg.model.origins == {"hidden_size": str(path), "num_hidden_layers": "command line"}
    assert cfg.model.where("num_hidden_layers") == "command line: model.config.num_hidden_layers"
    assert "origins" not in config.dump(cfg) and "origins" not in config.to_dict(cfg)["model"]
    assert config.from_dict(config.to_dict(cfg)).model.origins == {"hidden_size": "config",
                                                                  "num_hidden_layers": "config"}
    with pytest.raises(ConfigError, match="model.origins: unknown key"):
        config.load(path, ["model.origins={hidden_size: x}"])


def test_eval_lm_eval_tasks_are_checked_and_saved_only_when_set(tmp_path):
    cfg = config.load(None, MINIMAL + ['eval.lm_eval={tasks: ["hellaswag,arc_easy", hellaswag], limit: 100.0, '
                                       'batch_size: "4"}', "eval.lm_eval.include_path=[tasks]"])
    tasks = cfg.eval.lm_eval
    assert (tasks.requests(), tasks.limit, tasks.num_fewshot, tasks.batch_size, tasks.include_path) == \
        (["hellaswag", "arc_easy"], 100, None, 4, ["tasks"])
    assert config.load(write(tmp_path, config.dump(cfg))) == cfg
    assert "lm_eval" not in config.dump(config.load(None, MINIMAL))   # older saved configs compare equal
    with pytest.raises(ConfigError) as err:
        config.load(None, MINIMAL + ["eval.lm_eval={tasks: [], limit: 2.5, num_fewshot: -1, batch_size: autox, "
                                     "include_path: ['']}"])
    assert err.value.problems == [
        "command line: eval.lm_eval.tasks: empty: name the tasks to score, or leave eval.lm_eval out",
        "command line: eval.lm_eval.limit: expected a count of documents (e.g. 100) or a fraction below 1 (e.g. "
        "0.1), got 2.5",
        "command line: eval.lm_eval.num_fewshot: must be >= 0, got -1",
        "command line: eval.lm_eval.batch_size: expected a count >= 1, auto or auto:N, got 'autox'",
        "command line: eval.lm_eval.include_path: an empty folder name"]
    with pytest.raises(ConfigError, match=r"eval.lm_eval.tasks: an empty task name in \['a,'\]"):
        config.load(None, MINIMAL + ["eval.lm_eval.tasks=['a,']", "eval.lm_eval.limit=0.25"])
