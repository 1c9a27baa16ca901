"""Set-up of a training phase: data, start mode, model, optimizer, schedule and the DeepSpeed engine.

Everything a user can get wrong (a missing dataset or checkpoint, a vocabulary mismatch,
mismatched tokenizers, a batch that does not add up) is checked here, on every rank,
before the run directory is touched.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import deepspeed
import torch
import yaml
from deepspeed.ops.adam import DeepSpeedCPUAdam
from transformers import AutoConfig

from continual_pt import config, schedules
from continual_pt.components import checkpoint, distributed
from continual_pt.components import model as models
from continual_pt.components.checkpoint import set_rng_state
from continual_pt.components.distributed import DistEnv
from continual_pt.components.model import default_peak_tflops
from continual_pt.components.scoring import score_packed
from continual_pt.config import RunConfig
from continual_pt.config import deepspeed as ds_config
from continual_pt.data.dataset import PackedSequences, PreparedDataset, check_tokenizer
from continual_pt.data.sampler import MixtureSampler
from continual_pt.errors import UserError
from continual_pt.results.metrics import MetricsLogger
from continual_pt.schedules.scheduler import ScheduleLR


@dataclass(frozen=True)
class Start:
    """How this phase starts: resume (everything), init (weights only) or scratch."""

    kind: str  # "resume", "init_checkpoint", "init_hf", "scratch"
    ref: checkpoint.CheckpointRef | None = None
    reference: str | None = None


def plan_start(cfg: config.CheckpointConfig, run_dir: Path) -> Start:
    """Resolve resume/init into one start mode; errors name the missing or partial checkpoint."""
    if cfg.resume not in ("auto", "never"):
        return Start("resume", checkpoint.resolve(cfg.resume, what="checkpoint.resume"))
    if cfg.resume == "auto":
        ref = checkpoint.newest_committed(run_dir / "checkpoints")
        if ref is not None:
            return Start("resume", checkpoint.verify(ref.path))
    if cfg.init:
        if checkpoint.is_ours(cfg.init):
            return Start("init_checkpoint", checkpoint.resolve(cfg.init, what="checkpoint.init"))
        return Start("init_hf", reference=cfg.init)
    return Start("scratch")


def open_datasets(cfg: RunConfig) -> tuple[dict[str, PackedSequences], dict[str, PackedSequences], str]:
    """Training sources and eval sets as packed sequences; all must share one tokenizer."""
    opened: dict[str, PreparedDataset] = {}
    train, evals = {}, {}
    for name, src in cfg.data.train.items():
        ds = PreparedDataset(src.path, split=src.split)
        opened[f"data.train.{name}"] = ds
        train[name] = PackedSequences(ds, cfg.data.seq_len)
    for name, spec in cfg.eval.sets.items():
        ds = PreparedDataset(spec.path, split=spec.split)
        opened[f"eval.sets.{name}"] = ds
        evals[name] = PackedSequences(ds, cfg.data.seq_len)
    check_tokenizer(opened, cfg.data.tokenizer)
    return train, evals, str(next(iter(opened.values())).tokenizer_dir)


def build_model(cfg: RunConfig, start: Start, vocab_size: int):
    """The model to train, with the weights its start mode asks for (fp32, not yet on the engine)."""
    if start.kind == "resume":
        hf_config = AutoConfig.from_pretrained(start.ref.path / "model")
        return models.build(hf_config, cfg.model, cfg.train.seed)
    if start.kind == "init_checkpoint":
        model = checkpoint.load_model_from_checkpoint(start.ref, cfg.model.attn_implementation)
        return models.finish_for_training(model, cfg.model)
    if start.kind == "init_hf":
        return models.load_pretrained(start.reference, cfg.model)
    hf_config = models.architecture(cfg.model, vocab_size, cfg.data.seq_len)
    return models.build(hf_config, cfg.model, cfg.train.seed)


def make_optimizer(model: torch.nn.Module, cfg: config.OptimConfig, offload: bool, lr: float):
    """AdamW; weight decay on matrices and embeddings only (never on biases and norm weights)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = {"lr": lr, "betas": tuple(cfg.betas), "eps": cfg.eps}
    if offload:
        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    # The fused kernel (CUDA, and the CPU since torch 2.4) is the fastest AdamW step there is.
    return torch.optim.AdamW(groups, fused=True, **kwargs)


@dataclass
class Session:
    """Everything the step loop needs, built and checked."""

    env: DistEnv
    device: torch.device
    run_dir: Path
    engine: Any
    sampler: MixtureSampler
    eval_sets: dict[str, PackedSequences]
    logger: MetricsLogger
    lr_at: Callable[[int], float]
    zero_stage: int
    tokens_per_step: int
    flops_per_token: float
    peak_flops: float | None
    eval_micro_batch_size: int
    eval_tokens: int | None
    hf_config: Any
    tokenizer_dir: str
    resolved_config: dict[str, Any]
    start_step: int = 0
    start_tokens: int = 0
    nonfinite_skips: int = 0
    resumed: bool = False

    def lr_used(self, step: int) -> float:
        return self.lr_at(step)

    def evaluate(self) -> dict[str, dict[str, float]]:
        self.engine.eval()
        try:
            return {name: score_packed(self.engine, packed, self.eval_tokens, self.eval_micro_batch_size,
                                       self.env, self.device)
                    for name, packed in self.eval_sets.items()}
        finally:
            self.engine.train()

    def checkpoint_extras(self) -> dict[str, Callable[[Path], None]]:
        def write_model(path: Path) -> None:
            self.hf_config.save_pretrained(path)

        def write_tokenizer(path: Path) -> None:
            shutil.copytree(self.tokenizer_dir, path, dirs_exist_ok=True)

        def write_config(path: Path) -> None:
            path.mkdir(parents=True, exist_ok=True)
            (path / "config.yaml").write_text(self.resolved_text)

        return {"model": write_model, "tokenizer": write_tokenizer, "run": write_config}

    @property
    def resolved_text(self) -> str:
        return yaml.safe_dump(self.resolved_config, sort_keys=False)


def _write_run_dir(cfg: RunConfig, run_dir: Path) -> None:
    """Create the run dir and save the resolved config, keeping any earlier one it replaces."""
    run_dir.mkdir(parents=True, exist_ok=True)
    target = run_dir / "config.yaml"
    text = config.dump(cfg)
    if target.is_file() and target.read_text() != text:
        n = 1
        while (run_dir / f"config.prev{n}.yaml").exists():
            n += 1
        os.replace(target, run_dir / f"config.prev{n}.yaml")
    config.dump(cfg, target)


def open_session(cfg: RunConfig, env: DistEnv) -> Session:
    """Check everything, build the engine, restore state, then (rank 0) create the run dir."""
    device = distributed.device_for(env.local_rank)
    run_dir = cfg.run_dir
    train_sets, eval_sets, tokenizer_dir = open_datasets(cfg)
    vocab = next(iter(train_sets.values())).dataset.vocab_size
    start = plan_start(cfg.checkpoint, run_dir)
    raw_ds = ds_config.load(cfg.train.ds_config)
    try:
        ds_cfg = ds_config.fill(raw_ds, micro_batch_size=cfg.train.micro_batch_size,
                                grad_accum=cfg.train.grad_accum, dp_size=env.world_size,
                                precision=cfg.train.precision, grad_clip=cfg.optim.grad_clip,
                                global_batch_size=cfg.train.global_batch_size)
    except ValueError as exc:
        raise UserError(f"train.ds_config {cfg.train.ds_config}: {exc}") from None
    net = build_model(cfg, start, vocab)
    models.check_vocab(net.get_input_embeddings().weight.shape[0], vocab, "the training data")
    n_params = models.num_params(net)
    hf_config = net.config
    lr_at = schedules.build(cfg.schedule, cfg.train.max_steps)
    offload = ds_config.offloads_optimizer(ds_cfg)
    optimizer = make_optimizer(net, cfg.optim, offload, lr_at(0))
    scheduler = ScheduleLR(optimizer, lr_at)
    engine, _, _, _ = deepspeed.initialize(model=models.CausalLMLoss(net), optimizer=optimizer,
                                           lr_scheduler=scheduler, config=ds_cfg)
    if cfg.train.compile:
        engine.compile()
    sampler = MixtureSampler(train_sets, {n: s.weight for n, s in cfg.data.train.items()}, cfg.data.seed,
                             cfg.train.micro_batch_size, env.rank, env.world_size)
    step = tokens = skips = 0
    ckpt = checkpoint.Checkpointer(run_dir / "checkpoints", cfg.checkpoint.keep_last, env.rank, env.world_size)
    if start.kind == "resume":
        client, rank_state = ckpt.load(engine, start.ref)
        step, tokens, skips = client["step"], client["tokens_seen"], client.get("nonfinite_skips", 0)
        sampler.load_state_dict(rank_state["sampler"])
        if rank_state.get("rank") == env.rank:
            set_rng_state(rank_state["rng"])
    elif start.kind == "init_checkpoint" and cfg.checkpoint.keep_optimizer:
        ckpt.load(engine, start.ref, load_optimizer=True, load_schedule=False)
    distributed.barrier()
    if env.is_main:
        _write_run_dir(cfg, run_dir)
    distributed.barrier()
    peak = cfg.log.peak_tflops or default_peak_tflops()
    eval_mbs = cfg.eval.micro_batch_size or cfg.train.micro_batch_size
    logger = MetricsLogger(run_dir, cfg.log, env.is_main, cfg.name, cfg.train.max_steps, step,
                           config.to_dict(cfg))
    logger.message(f"{cfg.name}: start={start.kind}{f' from {start.ref.path}' if start.ref else ''}"
                   f"{f' {start.reference}' if start.reference else ''}, step {step}/{cfg.train.max_steps}, "
                   f"{n_params / 1e6:.1f}M params (non-embedding), world size {env.world_size} ({env.launcher}), "
                   f"ZeRO {ds_config.zero_stage(ds_cfg)}, {cfg.train.precision}, device {device}")
    return Session(
        env=env, device=device, run_dir=run_dir, engine=engine, sampler=sampler, eval_sets=eval_sets,
        logger=logger, lr_at=lr_at, zero_stage=ds_config.zero_stage(ds_cfg),
        tokens_per_step=cfg.train.micro_batch_size * cfg.train.grad_accum * env.world_size * cfg.data.seq_len,
        flops_per_token=models.flops_per_token(hf_config, n_params, cfg.data.seq_len),
        peak_flops=peak * 1e12 if peak else None, eval_micro_batch_size=eval_mbs, eval_tokens=cfg.eval.tokens,
        hf_config=hf_config, tokenizer_dir=tokenizer_dir, resolved_config=config.to_dict(cfg),
        start_step=step, start_tokens=tokens, nonfinite_skips=skips, resumed=start.kind == "resume")
