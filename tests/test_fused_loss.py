"""The chunked output layer + cross-entropy equals the plain full-logits loss, in value and gradients."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from continual_pt.errors import UserError
from continual_pt.model import fused_loss
from continual_pt.model.causal_lm import CausalLMLoss

VOCAB = 503
TINY = {
    "gpt_neox": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     rotary_pct=0.25, max_position_embeddings=64),
    "llama": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=64),
    "mistral": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=64, max_position_embeddings=64),
    "qwen2": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, max_position_embeddings=64),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                 bos_token_id=0, eos_token_id=0),
}


def tiny(model_type: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(model_type, vocab_size=VOCAB, tie_word_embeddings=False, **TINY[model_type])
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)


def batch(seed: int = 1, rows: int = 3, seq: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (rows, seq + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 7 rows, so that a batch of 120 tokens spans many (and a ragged last one)."""
    monkeypatch.setitem(fused_loss.CHUNK_BYTES, "cpu", 7 * 4 * VOCAB)


def loss_and_grads(net: torch.nn.Module, mode: str, ids, labels, reduction="mean"):
    net.zero_grad()
    loss = CausalLMLoss(net, mode)(ids, labels, reduction)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_fused_loss_and_gradients_equal_the_plain_path(model_type, small_chunks):
    net = tiny(model_type)
    ids, labels = batch()
    assert fused_loss.chunk_rows(ids.numel(), VOCAB, ids.device) == 7
    plain, plain_grads = loss_and_grads(net, "off", ids, labels)
    fused, fused_grads = loss_and_grads(net, "on", ids, labels)
    assert abs(fused.item() - plain.item()) < 1e-5
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # The sum reduction, and "auto" (which takes the fused path for these models) too.
    assert abs(CausalLMLoss(net, "auto")(ids, labels, "sum").item() - plain.item() * ids.numel()) < 1e-5 * ids.numel()


def test_the_fused_path_is_taken_and_never_builds_full_logits(small_chunks, monkeypatch):
    net = tiny("gpt_neox")
    ids, labels = batch()
    widths = []
    real = fused_loss._chunk_logits
    monkeypatch.setattr(fused_loss, "_chunk_logits", lambda h, w, b: widths.append(h.shape[0]) or real(h, w, b))
    monkeypatch.setattr(type(net), "forward", lambda *a, **k: pytest.fail("the full model's logits were computed"))
    CausalLMLoss(net, "auto")(ids, labels).backward()
    assert max(widths) == 7 and sum(widths) == ids.numel()


def test_per_sequence_losses_for_scoring_equal_the_plain_path(small_chunks):
    net = tiny("gpt_neox").eval()
    ids, labels = batch(seed=3, rows=4)
    with torch.no_grad():
        plain = CausalLMLoss(net, "off")(ids, labels, "per_sequence")
        fused = CausalLMLoss(net, "on")(ids, labels, "per_sequence")
    assert fused.dtype == plain.dtype == torch.float32 and fused.shape == (4,)
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-5)


def test_ignored_labels_count_as_in_the_plain_path(small_chunks):
    net = tiny("llama")
    ids, labels = batch()
    labels = labels.clone()
    labels[0, :11] = fused_loss.IGNORE_INDEX
    plain, plain_grads = loss_and_grads(net, "off", ids, labels)
    fused, fused_grads = loss_and_grads(net, "on", ids, labels)
    assert abs(fused.item() - plain.item()) < 1e-5
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_bf16_weights_give_the_plain_bf16_loss_to_its_precision(small_chunks):
    net = tiny("gpt_neox").to(torch.bfloat16)
    ids, labels = batch()
    plain, plain_grads = loss_and_grads(net, "off", ids, labels)
    fused, fused_grads = loss_and_grads(net, "on", ids, labels)
    assert plain.dtype == fused.dtype == torch.float32
    assert abs(fused.item() - plain.item()) < 1e-4
    head = "lm_head.weight"
    assert fused_grads[head].dtype == torch.bfloat16
    torch.testing.assert_close(fused_grads[head].float(), plain_grads[head].float(), rtol=2e-2, atol=1e-3)


def test_a_scaled_loss_scales_every_gradient():
    net = tiny("gpt_neox")
    ids, labels = batch()
    _, once = loss_and_grads(net, "on", ids, labels)
    net.zero_grad()
    (CausalLMLoss(net, "on")(ids, labels) * 8.0).backward()
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.grad, once[name] * 8.0, msg=name)


def test_modes_choose_and_refuse():
    net = tiny("gpt_neox")
    assert CausalLMLoss(net, "off")._fused is None
    assert CausalLMLoss(net, "auto")._fused == (net.gpt_neox, net.lm_head)
    assert not [n for n, _ in CausalLMLoss(net, "auto").named_modules() if n.endswith("lm_head") and n != "model.lm_head"]

    class Opaque(torch.nn.Module):
        def forward(self, input_ids, use_cache=False):
            raise AssertionError

    assert CausalLMLoss(Opaque(), "auto")._fused is None
    with pytest.raises(UserError, match="model.fused_loss=on: the Opaque model's logits are not a plain linear"):
        CausalLMLoss(Opaque(), "on")
    with pytest.raises(UserError, match="model.fused_loss: unknown value 'yes'"):
        CausalLMLoss(net, "yes")
