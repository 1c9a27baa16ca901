"""Models: build from a config (from scratch) or load a Hugging Face checkpoint; FLOPs per token.

Knows nothing of DeepSpeed. Hub names take an optional revision (`EleutherAI/pythia-410m@step143000`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from continual_pt.config import ModelConfig
from continual_pt.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
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


def architecture(cfg: ModelConfig, vocab_size: int, seq_len: int, base=None):
    """The transformers config to build: from `base` (an init model's), name_or_path, or cfg.config."""
    if cfg.name_or_path:
        hf = load_hf_config(cfg.name_or_path, cfg.revision)
    elif base is not None:
        hf = base
    else:
        fields = dict(cfg.config)
        model_type = fields.pop("model_type", "gpt_neox")
        if model_type == "gpt_neox":
            fields = {**GPT_NEOX_DEFAULTS, **fields}
        fields.setdefault("vocab_size", pad_vocab(vocab_size))
        fields.setdefault("max_position_embeddings", seq_len)
        try:
            return AutoConfig.for_model(model_type, **fields)
        except (ValueError, TypeError) as exc:
            raise UserError(f"model.config: cannot build a {model_type!r} config: {exc}") from None
    overrides = {k: v for k, v in cfg.config.items() if k != "model_type"}
    if overrides:
        hf = hf.__class__.from_dict({**hf.to_dict(), **overrides})
    return hf


def build(hf_config, cfg: ModelConfig, seed: int) -> nn.Module:
    """A freshly initialised causal LM (fp32) from a transformers config, seeded."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config, attn_implementation=cfg.attn_implementation,
                                             dtype=torch.float32)
    return finish_for_training(model, cfg)


def load_pretrained(reference: str, cfg: ModelConfig) -> nn.Module:
    """A Hugging Face model's weights (hub name, `name@revision`, or folder) in fp32."""
    name, revision = split_revision(reference)
    try:
        model = AutoModelForCausalLM.from_pretrained(name, revision=revision, dtype=torch.float32,
                                                     attn_implementation=cfg.attn_implementation)
    except (OSError, ValueError) as exc:
        raise UserError(f"checkpoint.init: cannot load a Hugging Face model from {reference!r}: {exc}") from None
    return finish_for_training(model, cfg)


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
    model's own shifting loss is bypassed.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        logits = self.model(input_ids=input_ids, use_cache=False).logits
        loss = nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                                           reduction="none" if reduction == "per_sequence" else reduction)
        if reduction == "per_sequence":
            return loss.view(labels.shape).sum(dim=1)
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
