"""Models: build from a config (from scratch) or load a Hugging Face checkpoint; FLOPs per token.

Knows nothing of DeepSpeed. Hub names take an optional revision (`EleutherAI/pythia-410m@step143000`).
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from huggingface_hub.errors import StrictDataclassError
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from continual_pt.config import ConfigError, ModelConfig
from continual_pt.errors import UserError
from continual_pt.layout import PRECISIONS
from continual_pt.model import fused_loss as fused
from continual_pt.model.fused_loss import fused_head

# What a transformers config refuses to build: its own checks raise any of these.
CONFIG_ERRORS = (ValueError, TypeError, StrictDataclassError)

DTYPES = dict(zip(PRECISIONS, (torch.bfloat16, torch.float16, torch.float32), strict=True))
"""Weight dtypes by the names the command line takes (export, eval)."""

# Dense bf16 peak of one accelerator, TFLOP/s, for MFU when log.peak_tflops is unset.
PEAK_TFLOPS_BF16 = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "V100": 125.0}


def default_peak_tflops() -> float | None:
    """A known peak for the visible GPU, or None (on the CPU: no MFU unless configured)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, value in PEAK_TFLOPS_BF16.items():
        if key in name:
            return value
    return None


# Defaults of a from-scratch GPT-NeoX: the Pythia family's choices, with dropout off as in the paper.
GPT_NEOX_DEFAULTS: dict[str, Any] = {
    "rotary_pct": 0.25, "use_parallel_residual": True, "hidden_dropout": 0.0, "attention_dropout": 0.0,
    "tie_word_embeddings": False, "initializer_range": 0.02, "layer_norm_eps": 1e-5,
}


def split_revision(reference: str) -> tuple[str, str | None]:
    """`name@revision` -> (name, revision); a local path never carries a revision."""
    if "@" in reference and not Path(reference).exists():
        name, _, revision = reference.rpartition("@")
        return name, revision or None
    return reference, None


def pad_vocab(vocab_size: int, multiple: int = 128) -> int:
    """Embedding rows for a vocabulary, padded as Pythia pads 50277 to 50304."""
    return int(math.ceil(vocab_size / multiple) * multiple)


def load_hf_config(name_or_path: str, revision: str | None = None):
    """The transformers config of a hub model or local folder, with a clear error if absent."""
    try:
        return AutoConfig.from_pretrained(name_or_path, revision=revision)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load a model config from {name_or_path!r}"
                        f"{f' at revision {revision!r}' if revision else ''}: {exc}") from None


def architecture(cfg: ModelConfig, vocab_size: int, seq_len: int) -> PretrainedConfig:
    """The transformers config to build from scratch: name_or_path's with cfg.config over it, or
    cfg.config alone; every key of cfg.config must be a field of the model's config class."""
    if cfg.name_or_path:
        return merged_config(load_hf_config(cfg.name_or_path, cfg.revision), cfg, cfg.name_or_path, init=False)
    fields = dict(cfg.config)
    model_type = fields.pop("model_type", "gpt_neox")
    if model_type == "gpt_neox":
        fields = {**GPT_NEOX_DEFAULTS, **fields}
    fields.setdefault("vocab_size", pad_vocab(vocab_size))
    fields.setdefault("max_position_embeddings", seq_len)
    try:
        hf = AutoConfig.for_model(model_type, **fields)
    except CONFIG_ERRORS as exc:
        raise UserError(f"model.config: cannot build a {model_type!r} config: {exc}") from None
    built, known = hf.to_dict(), config_fields(type(hf))
    # transformers keeps a key it does not know as a stray attribute that no model reads.
    problems = [unknown_key(cfg, key, type(hf)) for key in cfg.config if key not in known and key in built]
    if problems:
        raise ConfigError(problems)
    return hf


@functools.cache
def config_fields(cls: type[PretrainedConfig]) -> frozenset[str]:
    """The fields a transformers config class defines: its own, the common ones and their aliases."""
    params = [name for cls_ in (cls, PretrainedConfig) for name in inspect.signature(cls_.__init__).parameters]
    try:
        defaults = list(cls().to_dict())
    except CONFIG_ERRORS:  # a class without usable defaults: its signature alone
        defaults = []
    return frozenset(params + defaults + list(getattr(cls, "attribute_map", {}))) - {"self", "kwargs"}


def unknown_key(cfg: ModelConfig, key: str, cls: type[PretrainedConfig]) -> str:
    """The problem line for a model.config key that `cls` does not define, with a did-you-mean."""
    fields = sorted(f for f in config_fields(cls) if not f.startswith("_"))
    close = difflib.get_close_matches(key, fields, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}?" if close else f"accepted: {', '.join(fields)}"
    return f"{cfg.where(key)}: unknown key for {cls.model_type} ({cls.__name__}); {hint}"


def may_differ_on_init(field: str) -> bool:
    """Whether a config field may differ from the init model's: it changes no parameter shape and
    nothing the loaded weights compute at inference (dropout rates; the initialisation range)."""
    return "dropout" in field or field.endswith("_pdrop") or field == "initializer_range"


def _changes(cls: type[PretrainedConfig], base: dict[str, Any], key: str, value: Any) -> dict[str, tuple]:
    """Field -> (before, after) of the config `base` once `key` is set to `value`."""
    after = cls.from_dict({**base, key: value}).to_dict()
    return {f: (base.get(f), after.get(f)) for f in sorted(set(base) | set(after))
            if f not in ("_name_or_path", "transformers_version") and base.get(f) != after.get(f)}


def _judge(cfg: ModelConfig, base: PretrainedConfig, source: str, init: bool) -> tuple[dict[str, Any], list[str]]:
    """The model.config keys to apply over `base`, and the problems of the others."""
    cls, known = type(base), config_fields(type(base))
    # Compared after the same round trip as the candidates, so that only `key` makes a difference.
    before = cls.from_dict(base.to_dict()).to_dict()
    applied, problems = {}, []
    for key, value in cfg.config.items():
        if key == "model_type":
            if value != base.model_type:
                problems.append(f"{cfg.where(key)}: {value!r}, but {source} is a {base.model_type!r} model")
            continue
        try:
            changes = _changes(cls, before, key, value)
        except CONFIG_ERRORS as exc:
            problems.append(f"{cfg.where(key)}: cannot apply {value!r} to the config of {source}: {exc}")
            continue
        if key not in known and key in changes:
            problems.append(unknown_key(cfg, key, cls))
        elif not changes and key not in known and key not in before:
            problems.append(f"{cfg.where(key)}: has no effect on the config of {source} (transformers reads "
                            "it only when a config is built from scratch); set the field it stands for instead")
        elif changes and init and not all(may_differ_on_init(f) for f in changes):
            changed = ", ".join(f"{f} {old!r} -> {new!r}" for f, (old, new) in changes.items())
            problems.append(f"{cfg.where(key)}: would change the architecture of checkpoint.init {source} "
                            f"({changed}); its weights fix the architecture: only dropout rates and "
                            "initializer_range may differ from it")
        elif changes:
            applied[key] = value
    return applied, problems


def merged_config(base: PretrainedConfig, cfg: ModelConfig, source: str, init: bool) -> PretrainedConfig:
    """`base` with model.config applied; unknown or ineffective keys are refused, and with `init`
    (the weights come from `source`) so is every key that would change the architecture."""
    applied, problems = _judge(cfg, base, source, init)
    if problems:
        raise ConfigError(problems)
    if not applied:
        return base
    if init and (not dist.is_initialized() or dist.get_rank() == 0):
        listed = ", ".join(f"model.config.{k}={v!r} ({cfg.origins.get(k, 'config')})" for k, v in applied.items())
        print(f"checkpoint.init: applying {listed} over the config of {source} (dropout rates and "
              "initializer_range may differ from the init model's)", file=sys.stderr, flush=True)
    return type(base).from_dict({**base.to_dict(), **applied})


def build(hf_config, cfg: ModelConfig, seed: int) -> nn.Module:
    """A freshly initialised causal LM (fp32) from a transformers config, seeded."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config, attn_implementation=cfg.attn_implementation,
                                             dtype=torch.float32)
    return finish_for_training(model, cfg)


def load_pretrained(reference: str, cfg: ModelConfig) -> nn.Module:
    """A Hugging Face model's weights (hub name, `name@revision`, or folder) in fp32, with the
    model.config fields that may differ from its config applied."""
    name, revision = split_revision(reference)
    try:
        base = AutoConfig.from_pretrained(name, revision=revision)
        hf = merged_config(base, cfg, reference, init=True)
        model = AutoModelForCausalLM.from_pretrained(name, revision=revision, config=hf, dtype=torch.float32,
                                                     attn_implementation=cfg.attn_implementation)
    except UserError:
        raise
    except (OSError, ValueError) as exc:
        raise UserError(f"checkpoint.init: cannot load a Hugging Face model from {reference!r}: {exc}") from None
    return finish_for_training(model, cfg)


def with_init_config(model: nn.Module, cfg: ModelConfig, source: str) -> nn.Module:
    """`model` (weights loaded from `source`) rebuilt with the model.config fields that may differ
    from its config applied; the same model if there are none. Refuses architecture changes."""
    hf = merged_config(model.config, cfg, source, init=True)
    if hf is model.config:
        return model
    # Dropout modules read their rates when built: build anew and move the same weights over.
    rebuilt = AutoModelForCausalLM.from_config(hf, attn_implementation=cfg.attn_implementation,
                                               dtype=torch.float32)
    rebuilt.load_state_dict(model.state_dict())
    return rebuilt


def finish_for_training(model: nn.Module, cfg: ModelConfig) -> nn.Module:
    """Training-time switches: activation checkpointing on request, no KV cache."""
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


def check_vocab(model_vocab: int, dataset_vocab: int, where: str) -> None:
    """The embedding must have a row for every token id the data holds."""
    if model_vocab < dataset_vocab:
        raise UserError(f"vocabulary mismatch: the model has {model_vocab} embedding rows but {where} was "
                        f"tokenized with a vocabulary of {dataset_vocab}; use the model's tokenizer or "
                        f"set model.config.vocab_size >= {dataset_vocab}")


class CausalLMLoss(nn.Module):
    """Wraps a causal LM so that forward(input_ids, labels) returns the mean next-token loss.

    Labels are already shifted (the data gives seq_len + 1 tokens per window), so the
    model's own shifting loss is bypassed. With `fused_loss` (model.fused_loss: auto, on, off)
    the output layer and the loss run together in chunks (`fused_loss.py`) where the model
    allows it, never holding the full fp32 logits.
    """

    def __init__(self, model: nn.Module, fused_loss: str = "auto"):
        super().__init__()
        self.model = model
        self.fused_loss = fused_loss
        # A tuple, so that the body and head are not registered twice as submodules.
        self._fused = fused_head(model, fused_loss)

    def _fused_parts(self) -> tuple[nn.Module, nn.Linear] | None:
        if self._fused is None:
            return None
        if hasattr(self._fused[1].weight, "ds_id"):   # ZeRO-3 gathers weights only inside module calls
            if self.fused_loss == "on":
                raise UserError("model.fused_loss=on does not work with ZeRO stage 3 (partitioned output "
                                "layer); use model.fused_loss=auto or off")
            return None
        return self._fused

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """The loss: "mean" over tokens, "sum", or unreduced for scoring: "per_sequence" [batch] and
        "per_token" [batch, seq] (the per-sequence values are sums of the per-token ones)."""
        parts = self._fused_parts()
        unreduced = reduction in ("per_sequence", "per_token")
        if parts is None or (unreduced and torch.is_grad_enabled()):
            return self.plain(input_ids, labels, reduction)
        body, head = parts
        hidden = body(input_ids=input_ids, use_cache=False)[0]
        hidden, flat = hidden.reshape(-1, hidden.size(-1)), labels.reshape(-1)
        if unreduced:
            per_token = fused.per_token_losses(hidden, head.weight, head.bias, flat).view(labels.shape)
            return per_token if reduction == "per_token" else per_token.sum(dim=1)
        if reduction == "mean" and fused.liger_available(hidden.device):
            return fused.liger_mean(hidden, head, flat)
        total = fused.loss_sum(hidden, head.weight, head.bias, flat)
        return total if reduction == "sum" else total / (flat != fused.IGNORE_INDEX).sum()

    def plain(self, input_ids: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """The loss from the model's full logits (model.fused_loss=off)."""
        logits = self.model(input_ids=input_ids, use_cache=False).logits
        unreduced = reduction in ("per_sequence", "per_token")
        loss = nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                                           reduction="none" if unreduced else reduction)
        if unreduced:
            return loss.view(labels.shape) if reduction == "per_token" else loss.view(labels.shape).sum(dim=1)
        return loss


def num_params(model: nn.Module, exclude_embeddings: bool = True) -> int:
    """Parameters, without the input embedding (the usual count for FLOPs)."""
    total = sum(p.numel() for p in model.parameters())
    if exclude_embeddings and hasattr(model, "get_input_embeddings"):
        total -= model.get_input_embeddings().weight.numel()
    return total


def flops_per_token(hf_config, n_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls plus 12 L H T for attention (PaLM appendix B)."""
    layers = getattr(hf_config, "num_hidden_layers", 0)
    hidden = getattr(hf_config, "hidden_size", 0)
    return 6.0 * n_params + 12.0 * layers * hidden * seq_len
