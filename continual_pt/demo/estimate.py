"""How long a demo will take here, from a short measured step: `cpt demo` on the user's corpora says it
before it starts.

The scale's model is built and timed on this machine, with as many threads as the stage will have (one
for each run of the grid, torch's default for the upstream pre-training, which runs alone), with the
loss the runs use (`CausalLMLoss`: the output layer and the cross-entropy fused in chunks): a few
training steps (forward, backward, AdamW) at the upstream micro batch and a few forward passes without
gradients (as the evaluations run), after one untimed step of each. Every stage's time is then its
tokens times the measured time per token, plus, for every process the demo starts (the upstream run,
each run of the grid), the time a run spends outside its steps and evals (RUN_START_S).
Cutting the samples, fitting the tokenizer and preparing the data are left out (they read a few MB).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from continual_pt.demo.recipe import Scale
from continual_pt.model.causal_lm import CausalLMLoss

RUN_START_S = 5.0
"""Seconds a run's process spends outside its steps and evals (imports, the DeepSpeed engine, loading the start
checkpoint, the saves): 5.3 s before the first eval of a run of the demo's grid on a quiet 2-core machine."""
TIMED = 3


@dataclass(frozen=True)
class Speed:
    """Seconds per token of a training step and of an evaluation (forward only), measured here."""

    train: float
    forward: float


def measure(scale: Scale) -> Speed:
    """Time the scale's model on random tokens, with torch's threads as they are set: TIMED training steps and
    TIMED forward passes."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = CausalLMLoss(AutoModelForCausalLM.from_config(AutoConfig.for_model(**scale.model_config())))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        window = torch.randint(0, scale.vocab_size, (scale.pretrain_micro_batch, scale.seq_len + 1))
        x, y = window[:, :-1], window[:, 1:]
        train = _timed(lambda: _train_step(model, optimizer, x, y)) / x.numel()
        with torch.no_grad():
            forward = _timed(lambda: model(x, y, reduction="per_sequence")) / x.numel()
        return Speed(train, forward)


def _train_step(model: CausalLMLoss, optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    model(x, y).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _timed(step) -> float:
    """Seconds of one call of `step`: the mean of TIMED calls after one untimed."""
    step()
    started = time.perf_counter()
    for _ in range(TIMED):
        step()
    return (time.perf_counter() - started) / TIMED


def run_seconds(speed: Speed, steps: int, step_tokens: int, eval_every: int, eval_tokens: int,
                score_tokens: int = 0) -> float:
    """One run's process: its steps, its in-loop evals of both sets (at step 0, every eval_every steps and
    at the end), `cpt eval` of its final checkpoint on both sets, and its start-up."""
    evals = 1 + steps // eval_every + (steps % eval_every != 0)
    return (steps * step_tokens * speed.train + 2 * (evals * eval_tokens + score_tokens) * speed.forward
            + RUN_START_S)


def pretrain_seconds(scale: Scale, speed: Speed) -> float:
    return run_seconds(speed, scale.pretrain_steps, scale.pretrain_micro_batch * scale.seq_len,
                       scale.pretrain_eval_every, scale.pretrain_eval_tokens)


def grid_seconds(scale: Scale, speed: Speed, run_steps: list[int]) -> float:
    """The runs of the grid (each with its number of steps) and their scoring."""
    step_tokens = scale.micro_batch * scale.seq_len
    return sum(run_seconds(speed, steps, step_tokens, scale.eval_every, scale.eval_tokens, scale.score_tokens)
               for steps in run_steps)


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"
