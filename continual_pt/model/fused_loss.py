"""The output layer and the next-token cross-entropy together, in chunks of tokens.

The plain path computes logits [tokens, vocab] in the model's dtype, copies them to fp32 and
takes the cross-entropy: at Pythia's 50k vocabulary that is the largest tensor of the step.
Here the logits of a chunk of tokens are made, reduced to a loss and (when training) turned
into the chunk's gradients at once, so only one chunk of logits exists at a time. Each chunk
computes exactly what the plain path computes for its rows (the same matmul in the model's
dtype, then fp32), so the loss agrees to float rounding. On CUDA, `auto` uses Liger's Triton
kernel when `liger-kernel` is installed (it is not a dependency).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from continual_pt.errors import UserError

try:   # optional: a fused Triton kernel for CUDA
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
except ImportError:  # pragma: no cover - depends on the environment
    LigerFusedLinearCrossEntropyLoss = None

MODES = ("auto", "on", "off")
IGNORE_INDEX = -100
# Model types whose causal-LM head is exactly `lm_head(base_model(...)[0])`: no logit scaling,
# soft-capping or other work between the last hidden state and the loss.
# (Each is checked against the plain path in tests/test_fused_loss.py.)
PLAIN_HEADS = frozenset({"gpt_neox", "llama", "mistral", "qwen2", "gpt2"})
# fp32 bytes of one chunk of logits: small on the CPU (cache-sized work), larger on accelerators.
CHUNK_BYTES = {"cpu": 32 << 20, "cuda": 512 << 20}


def chunk_rows(tokens: int, vocab: int, device: torch.device) -> int:
    """Rows per chunk: as many as fit CHUNK_BYTES of fp32 logits, balanced over the chunks."""
    limit = max(1, CHUNK_BYTES.get(device.type, CHUNK_BYTES["cuda"]) // (4 * vocab))
    chunks = max(1, math.ceil(tokens / limit))
    return math.ceil(tokens / chunks)


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    logits = hidden @ weight.t() if bias is None else torch.addmm(bias, hidden, weight.t())
    return logits.float()


def _chunk_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy of fp32 logits (0 where the label is IGNORE_INDEX)."""
    return nn.functional.cross_entropy(logits, labels, reduction="none", ignore_index=IGNORE_INDEX)


@torch.no_grad()
def per_token_losses(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     labels: torch.Tensor) -> torch.Tensor:
    """fp32 losses [tokens] of hidden states [tokens, hidden] (no gradient: scoring)."""
    rows = chunk_rows(hidden.shape[0], weight.shape[0], hidden.device)
    return torch.cat([_chunk_losses(_chunk_logits(h, weight, bias), y)
                      for h, y in zip(hidden.split(rows), labels.split(rows))])


class _LinearCrossEntropySum(torch.autograd.Function):
    """Sum over tokens of cross_entropy(hidden @ weight.T + bias), gradients made chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels):
        rows = chunk_rows(hidden.shape[0], weight.shape[0], hidden.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        grad_bias = None if bias is None else torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
        for start in range(0, hidden.shape[0], rows):
            h, y = hidden[start:start + rows], labels[start:start + rows]
            keep, picked = (y != IGNORE_INDEX).unsqueeze(1), y.clamp(min=0).unsqueeze(1)
            # One pass over the logits makes the log-probabilities; the loss is what
            # cross_entropy takes from them (minus the label's, 0 where ignored), and their
            # exponential, in place, is the softmax of the gradient.
            grad = torch.log_softmax(_chunk_logits(h, weight, bias), dim=-1)
            total -= (grad.gather(1, picked) * keep).sum()
            # d(sum of losses)/d(logits) = softmax - one-hot, zero on ignored rows; cast to the
            # model's dtype as the plain path's `.float()` does on its way back.
            grad.exp_()
            grad.scatter_add_(1, picked, -keep.to(grad.dtype))
            grad.mul_(keep)
            grad = grad.to(hidden.dtype)
            grad_hidden[start:start + rows] = grad @ weight
            if grad.dtype == torch.float32:
                grad_weight.addmm_(grad.t(), h)
            else:   # the product in the model's dtype, as the plain path's backward makes it
                grad_weight += grad.t() @ h
            if grad_bias is not None:
                grad_bias += grad.float().sum(dim=0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scale = grad_total.float()
        weight_dtype, bias_dtype = ctx.dtypes
        return ((grad_hidden.float() * scale).to(grad_hidden.dtype), (grad_weight * scale).to(weight_dtype),
                None if grad_bias is None else (grad_bias * scale).to(bias_dtype), None)


def loss_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             labels: torch.Tensor) -> torch.Tensor:
    """The fp32 sum of the token losses, differentiable in hidden, weight and bias."""
    if not torch.is_grad_enabled() or not (hidden.requires_grad or weight.requires_grad):
        return per_token_losses(hidden, weight, bias, labels).sum()
    return _LinearCrossEntropySum.apply(hidden, weight, bias, labels)


def fused_head(model: nn.Module, mode: str) -> tuple[nn.Module, nn.Linear] | None:
    """(body, head) to compute the loss from when `mode` and the model allow it, else None.

    `on` refuses a model whose logits are not a plain linear layer over the body's last hidden
    state (a UserError naming model.fused_loss)."""
    if mode not in MODES:
        raise UserError(f"model.fused_loss: unknown value {mode!r}; accepted: {', '.join(MODES)}")
    if mode == "off":
        return None
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    body = getattr(model, "base_model", None)
    if model_type in PLAIN_HEADS and isinstance(head, nn.Linear) and body is not None and body is not model:
        return body, head
    if mode == "on":
        raise UserError(f"model.fused_loss=on: the {model_type or type(model).__name__} model's logits are not a "
                        "plain linear layer over its last hidden state (supported: "
                        f"{', '.join(sorted(PLAIN_HEADS))}); use model.fused_loss=auto or off")
    return None


def liger_available(device: torch.device) -> bool:
    """Whether Liger's fused kernel can run here (CUDA with liger-kernel installed)."""
    return LigerFusedLinearCrossEntropyLoss is not None and device.type == "cuda"


def liger_mean(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor) -> torch.Tensor:
    """The mean token loss by Liger's kernel."""
    return LigerFusedLinearCrossEntropyLoss(reduction="mean", ignore_index=IGNORE_INDEX)(
        head.weight, hidden, labels, head.bias)
