"""model.config: every key is checked against the model's transformers config class (did-you-mean,
naming the file or command line it came from); with checkpoint.init the weights fix the architecture,
so only dropout rates and initializer_range may differ, and those are applied, saying so."""

from __future__ import annotations

import pytest
import torch
import yaml
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from continual_pt import config
from continual_pt.config import ConfigError
from continual_pt.model import causal_lm as models
from continual_pt.training.session import Start, build_model
from tests import train_support as ts

BASE = {"data": {"train": {"code": {"path": "data/code"}}, "seq_len": 16}, "train": {"max_steps": 2}}


def load(tmp_path, model: dict, overrides: list[str] = (), **sections):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**BASE, "model": model, **sections}))
    return path, config.load(path, list(overrides))


@pytest.fixture
def hf_folder(tmp_path):
    """A tiny GPT-NeoX saved as a Hugging Face folder, and its weights."""
    torch.manual_seed(7)
    net = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=320, max_position_embeddings=64, tie_word_embeddings=False,
                                           **ts.TINY_MODEL))
    net.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf", {k: v.detach().clone() for k, v in net.state_dict().items()}


def test_a_typo_in_model_config_is_refused_with_a_did_you_mean(tmp_path):
    path, cfg = load(tmp_path, {"config": {"hiden_size": 32, "num_hidden_layers": 2}},
                     ["model.config.num_atention_heads=4"])
    with pytest.raises(ConfigError) as info:
        models.architecture(cfg.model, 300, 16)
    assert info.value.problems == [
        f"{path}: model.config.hiden_size: unknown key for gpt_neox (GPTNeoXConfig); did you mean 'hidden_size'?",
        "command line: model.config.num_atention_heads: unknown key for gpt_neox (GPTNeoXConfig); "
        "did you mean 'num_attention_heads'?",
    ]


def test_known_and_legacy_keys_build_from_scratch(tmp_path):
    # rotary_pct is not a field of GPTNeoXConfig any more, but transformers still reads it when building
    _, cfg = load(tmp_path, {"config": {**ts.TINY_MODEL, "rotary_pct": 0.5, "hidden_dropout": 0.1}})
    hf = models.architecture(cfg.model, 300, 16)
    assert (hf.hidden_size, hf.hidden_dropout, hf.vocab_size, hf.max_position_embeddings) == (32, 0.1, 384, 16)
    assert hf.rope_parameters["partial_rotary_factor"] == 0.5


def test_a_typo_over_name_or_path_is_refused(tmp_path, hf_folder):
    folder, _ = hf_folder
    path, cfg = load(tmp_path, {"name_or_path": str(folder), "config": {"hidden_dropuot": 0.1, "num_hidden_layers": 3}})
    with pytest.raises(ConfigError) as info:
        models.architecture(cfg.model, 300, 16)
    assert info.value.problems == [
        f"{path}: model.config.hidden_dropuot: unknown key for gpt_neox (GPTNeoXConfig); "
        "did you mean 'hidden_dropout'?"]
    cfg.model.config.pop("hidden_dropuot")
    assert models.architecture(cfg.model, 300, 16).num_hidden_layers == 3   # from scratch: anything may change


def test_init_refuses_keys_that_change_the_architecture(tmp_path, hf_folder):
    folder, _ = hf_folder
    path, cfg = load(tmp_path, {"config": {**ts.TINY_MODEL, "hidden_size": 64, "hidden_dropout": 0.1}},
                     ["model.config.rotary_pct=0.5", "model.config.max_position_embeddings=128"],
                     checkpoint={"init": str(folder)})
    with pytest.raises(ConfigError) as info:
        build_model(cfg, Start("init_hf", reference=str(folder)), 300)
    rule = "its weights fix the architecture: only dropout rates and initializer_range may differ from it"
    assert info.value.problems == [
        f"{path}: model.config.hidden_size: would change the architecture of checkpoint.init {folder} "
        f"(hidden_size 32 -> 64); {rule}",
        f"command line: model.config.rotary_pct: has no effect on the config of {folder} (transformers reads it "
        "only when a config is built from scratch); set the field it stands for instead",
        f"command line: model.config.max_position_embeddings: would change the architecture of checkpoint.init "
        f"{folder} (max_position_embeddings 64 -> 128); {rule}",
    ]


def test_init_applies_dropout_and_says_so(tmp_path, hf_folder, capsys):
    folder, weights = hf_folder
    # The same values as the init model's (the tiny shape) are accepted silently.
    path, cfg = load(tmp_path, {"config": {**ts.TINY_MODEL, "hidden_dropout": 0.25}},
                     ["model.config.attention_dropout=0.125"], checkpoint={"init": str(folder)})
    net = build_model(cfg, Start("init_hf", reference=str(folder)), 300)
    assert (net.config.hidden_dropout, net.config.attention_dropout) == (0.25, 0.125)
    layer = net.gpt_neox.layers[1]
    assert (layer.post_attention_dropout.p, layer.post_mlp_dropout.p, layer.attention.attention_dropout) == \
        (0.25, 0.25, 0.125)
    state = net.state_dict()
    assert state.keys() == weights.keys() and all(torch.equal(state[k], weights[k]) for k in weights)
    assert (f"checkpoint.init: applying model.config.hidden_dropout=0.25 ({path}), model.config.attention_dropout="
        f"0.125 (command line) over the config of {folder} (dropout rates and initializer_range may differ "
        "from the init model's)") in capsys.readouterr().err.splitlines()


def test_init_from_our_checkpoint_rebuilds_with_the_same_weights(tmp_path, hf_folder):
    # The path of checkpoint.init=<one of our checkpoints>: the loaded model is rebuilt with the new rates.
    folder, weights = hf_folder
    loaded = GPTNeoXForCausalLM.from_pretrained(folder)
    _, cfg = load(tmp_path, {"config": {}}, checkpoint={"init": str(folder)})
    assert models.with_init_config(loaded, cfg.model, "ckpt") is loaded
    _, cfg = load(tmp_path, {"config": {"hidden_dropout": 0.5, "num_attention_heads": 8}})
    with pytest.raises(ConfigError, match="model.config.num_attention_heads: would change the architecture"):
        models.with_init_config(loaded, cfg.model, "ckpt")
    cfg.model.config.pop("num_attention_heads")
    rebuilt = models.with_init_config(loaded, cfg.model, "ckpt")
    assert rebuilt.gpt_neox.layers[0].post_mlp_dropout.p == 0.5 and rebuilt.gpt_neox.emb_dropout.p == 0.5
    state = rebuilt.state_dict()
    assert all(torch.equal(state[k], weights[k]) for k in weights)


def test_cpt_train_refuses_a_typo_before_writing_anything(world, tmp_path):
    cfg = ts.write_config(tmp_path / "run.yaml", world, tmp_path / "runs", name="typo")
    proc = ts.train(cfg, ["model.config.hiden_size=32"], expect=2)
    assert ("cpt train: error: invalid configuration (1 problem(s)):\n  - command line: model.config.hiden_size: "
            "unknown key for gpt_neox (GPTNeoXConfig); did you mean 'hidden_size'?") in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs" / "typo").exists()
