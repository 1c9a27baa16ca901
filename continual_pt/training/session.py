"""Set-up of a training phase: data, start mode, model, optimizer, schedule and the DeepSpeed engine.

Everything a user can get wrong (a missing dataset or checkpoint, a vocabulary mismatch,
mismatched tokenizers, a batch that does not add up) is checked here, on every rank,
before the run directory is touched.
"""

from __future__ import annotations

import os
import shlex
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import deepspeed
import torch
import yaml
from deepspeed import DeepSpeedEngine
from deepspeed.ops.adam import DeepSpeedCPUAdam
from transformers import AutoConfig, PretrainedConfig

from continual_pt import config, schedules
from continual_pt.checkpoint import branches, commit, elastic, refs, weights
from continual_pt.checkpoint.checkpointer import Checkpointer, set_rng_state
from continual_pt.config import RunConfig
from continual_pt.config import deepspeed as ds_config
from continual_pt.data.dataset import PackedSequences, PreparedDataset, Setting, check_tokenizer
from continual_pt.data.mixture import Mixture, describe
from continual_pt.data.sampler import MixtureSampler
from continual_pt.errors import Problems, UserError
from continual_pt.evaluation.scoring import HeldOut
from continual_pt.files import check_writable
from continual_pt.layout import CHECKPOINTS, RUN_CONFIG
from continual_pt.model import causal_lm
from continual_pt.model.causal_lm import default_peak_tflops
from continual_pt.results.metrics import MetricsLogger
from continual_pt.runtime import distributed, host_malloc, lean_engine, ops
from continual_pt.runtime.distributed import DistEnv
from continual_pt.schedules.scheduler import ScheduleLR
from continual_pt.training.lock import RunLock
from continual_pt.training.resume import RunFinished, Start, check_resume  # noqa: F401  (RunFinished: re-exported)
from continual_pt.training.state import TrainState


def plan_start(cfg: config.CheckpointConfig, run_dir: Path) -> Start:
    """Resolve resume/init into one start mode, changing nothing; errors name the missing or partial
    checkpoint."""
    if cfg.resume not in ("auto", "never"):
        return Start("resume", refs.resolve(cfg.resume, what="checkpoint.resume"))
    if cfg.resume == "auto":
        ref = refs.newest_committed(run_dir / CHECKPOINTS)
        if ref is not None:
            return Start("resume", refs.verify(ref.path))
    if cfg.init:
        if refs.is_ours(cfg.init):
            return Start("init_checkpoint", refs.resolve(cfg.init, what="checkpoint.init"))
        return Start("init_hf", reference=cfg.init)
    return Start("scratch")


def decide_start(cfg: config.CheckpointConfig, run_dir: Path) -> Start:
    """`plan_start` on rank 0 alone, its decision (or its error) broadcast: ranks that read the markers
    each on their own could start differently."""
    return commit.decided_on_rank0(lambda: plan_start(cfg, run_dir))


def settle_start(cfg: config.CheckpointConfig, run_dir: Path, start: Start) -> None:
    """Once every check of the start has passed: remove our leftover partial saves, and when an explicit
    checkpoint.resume names an older checkpoint of this run, move the newer ones aside (a branch)."""
    explicit = start.kind == "resume" and cfg.resume not in ("auto", "never")
    branches.open_root(run_dir / CHECKPOINTS, resume=start.ref if explicit else None)


def _setting(cfg: RunConfig, key: str, origin: str) -> Setting:
    """How messages about the dataset path of config key `key` (set in `origin`) name it."""
    tokenizer = shlex.quote(cfg.data.tokenizer) if cfg.data.tokenizer else Setting.tokenizer
    return Setting(f"{origin}: {key}" if origin else key, f"set {key} to that folder", tokenizer)


def open_datasets(cfg: RunConfig) -> tuple[Mixture, dict[str, PackedSequences], str]:
    """The training mixture (sources with `domains` expanded into one per domain) and the eval sets as
    packed sequences; all must share one tokenizer. Every problem of the sources' domains is raised at once."""
    opened: dict[str, PreparedDataset] = {}
    train, evals = Mixture(), {}
    origins = {f"data.train.{name}": src.origin for name, src in cfg.data.train.items()}
    for src in cfg.data.train.values():
        origins.update(src.origins)
    problems = Problems("data mixture", origins)
    for name, src in cfg.data.train.items():
        setting = _setting(cfg, f"data.train.{name}.path", src.origin)
        ds = PreparedDataset(src.path, split=src.split, setting=setting)
        opened[f"data.train.{name}"] = ds
        train.add(name, ds, src.weight, cfg.data.seq_len, src.domains, f"data.train.{name}", problems)
    problems.raise_if_any()
    for name, spec in cfg.eval.sets.items():
        setting = _setting(cfg, f"eval.sets.{name}.path", spec.origin)
        ds = PreparedDataset(spec.path, split=spec.split, setting=setting)
        if ds.num_tokens < cfg.data.seq_len + 1:
            raise UserError(f"eval.sets.{name} ({spec.path}, split {spec.split}) has {ds.num_tokens} tokens, fewer "
                            f"than one window of data.seq_len + 1 = {cfg.data.seq_len + 1}; lower data.seq_len "
                            "or use a larger set")
        opened[f"eval.sets.{name}"] = ds
        evals[name] = PackedSequences(ds, cfg.data.seq_len)
    check_tokenizer(opened, cfg.data.tokenizer)
    return train, evals, str(next(iter(opened.values())).verified_tokenizer_dir())


def build_model(cfg: RunConfig, start: Start, vocab_size: int) -> torch.nn.Module:
    """The model to train, with the weights its start mode asks for (fp32, not yet on the engine)."""
    if start.kind == "resume":
        hf_config = AutoConfig.from_pretrained(start.ref.path / "model")
        return causal_lm.build(hf_config, cfg.model, cfg.train.seed)
    if start.kind == "init_checkpoint":
        model = weights.load_model_from_checkpoint(start.ref, cfg.model.attn_implementation)
        model = causal_lm.with_init_config(model, cfg.model, str(start.ref.path))
        return causal_lm.finish_for_training(model, cfg.model)
    if start.kind == "init_hf":
        return causal_lm.load_pretrained(start.reference, cfg.model)
    hf_config = causal_lm.architecture(cfg.model, vocab_size, cfg.data.seq_len)
    return causal_lm.build(hf_config, cfg.model, cfg.train.seed)


def make_optimizer(model: torch.nn.Module, cfg: config.OptimConfig, offload: bool,
                   lr: float) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices and embeddings only (never on biases and norm weights)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = {"lr": lr, "betas": tuple(cfg.betas), "eps": cfg.eps}
    if offload:
        ops.prepare(("CPUAdamBuilder",))   # built under our lock: a kill mid-build cannot wedge later starts
        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    # The fused kernel (CUDA, and the CPU since torch 2.4) is the fastest AdamW step there is.
    return torch.optim.AdamW(groups, fused=True, **kwargs)


@dataclass(frozen=True)
class PhaseConstants:
    """Fixed for the whole phase, derived from the config, the model and the world size."""

    lr_at: Callable[[int], float]
    tokens_per_step: int
    flops_per_token: float
    peak_flops: float | None
    zero_stage: int


@dataclass(frozen=True)
class CheckpointFiles:
    """What every checkpoint carries besides the engine's state, so that it exports on its own."""

    hf_config: PretrainedConfig
    tokenizer_dir: str
    resolved_config: dict[str, Any]

    def writers(self) -> dict[str, Callable[[Path], None]]:
        """Folder name in the checkpoint -> what writes it (the `extras` of `Checkpointer.save`)."""
        def write_model(path: Path) -> None:
            self.hf_config.save_pretrained(path)

        def write_tokenizer(path: Path) -> None:
            shutil.copytree(self.tokenizer_dir, path, dirs_exist_ok=True)

        def write_config(path: Path) -> None:
            path.mkdir(parents=True, exist_ok=True)
            (path / RUN_CONFIG).write_text(yaml.safe_dump(self.resolved_config, sort_keys=False))

        return {"model": write_model, "tokenizer": write_tokenizer, "run": write_config}


@dataclass(frozen=True)
class Session:
    """What `open_session` built and checked: the engine and what feeds, scores, records and saves it,
    the phase's constants, and the state the loop starts from."""

    env: DistEnv
    device: torch.device
    engine: DeepSpeedEngine
    sampler: MixtureSampler
    held_out: HeldOut
    logger: MetricsLogger
    checkpointer: Checkpointer
    constants: PhaseConstants
    files: CheckpointFiles
    start: TrainState
    resumed: bool
    lock: RunLock | None = None

    def release(self) -> None:
        """Let the run dir's lock go (the process's end would too)."""
        if self.lock is not None:
            self.lock.release()


def _write_run_dir(cfg: RunConfig, run_dir: Path) -> None:
    """Create the run dir and save the resolved config, keeping any earlier one it replaces."""
    run_dir.mkdir(parents=True, exist_ok=True)
    target = run_dir / RUN_CONFIG
    text = config.dump(cfg)
    if target.is_file() and target.read_text() != text:
        n = 1
        while (run_dir / f"config.prev{n}.yaml").exists():
            n += 1
        os.replace(target, run_dir / f"config.prev{n}.yaml")
    config.dump(cfg, target)


def deepspeed_config(cfg: RunConfig, env: DistEnv) -> dict[str, Any]:
    """The run's DeepSpeed JSON with its batch, precision and clipping filled in from the config."""
    raw = ds_config.load(cfg.train.ds_config)
    try:
        return ds_config.fill(raw, micro_batch_size=cfg.train.micro_batch_size, grad_accum=cfg.train.grad_accum,
                              dp_size=env.world_size, precision=cfg.train.precision,
                              grad_clip=cfg.optim.grad_clip, global_batch_size=cfg.train.global_batch_size)
    except ValueError as exc:
        raise UserError(f"train.ds_config {cfg.train.ds_config}: {exc}") from None


def build_engine(cfg: RunConfig, net: torch.nn.Module, ds_cfg: dict[str, Any],
                 lr_at: Callable[[int], float]) -> DeepSpeedEngine:
    """The DeepSpeed engine over the model's loss, with AdamW and the phase's schedule."""
    optimizer = make_optimizer(net, cfg.optim, ds_config.offloads_optimizer(ds_cfg), lr_at(0))
    ds_cfg = ds_config.fit_reduce_bucket(ds_cfg, sum(p.numel() for p in net.parameters() if p.requires_grad))
    engine, _, _, _ = deepspeed.initialize(model=causal_lm.CausalLMLoss(net, cfg.model.fused_loss), optimizer=optimizer,
                                           lr_scheduler=ScheduleLR(optimizer, lr_at), config=ds_cfg)
    lean_engine.skip_lone_allreduce(engine, ds_config.zero_stage(ds_cfg))
    if cfg.train.compile:
        engine.compile()
    return engine


def restore(cfg: RunConfig, start: Start, engine: DeepSpeedEngine, sampler: MixtureSampler,
            checkpointer: Checkpointer, rank: int, universal: Path | None = None) -> TrainState:
    """Load what the start mode asks for; on resume, the loop's state, data position and RNG too."""
    state = TrainState()
    if start.kind == "resume":
        client, rank_state = checkpointer.load(engine, start.ref, universal=universal)
        if universal is not None:
            elastic.restore_param_groups(engine, universal)
        elastic.complete_param_groups(engine)
        state.load_state_dict(client)
        sampler.load_state_dict(rank_state["sampler"])
        if rank_state.get("rank") == rank:
            set_rng_state(rank_state["rng"])
    elif start.kind == "init_checkpoint" and cfg.checkpoint.keep_optimizer:
        checkpointer.load(engine, start.ref, load_optimizer=True, load_schedule=False)
        elastic.complete_param_groups(engine)
    return state


def phase_constants(cfg: RunConfig, env: DistEnv, hf_config: PretrainedConfig, n_params: int,
                    lr_at: Callable[[int], float], zero_stage: int) -> PhaseConstants:
    """The schedule, throughput and MFU constants of the phase."""
    peak = cfg.log.peak_tflops or default_peak_tflops()
    return PhaseConstants(lr_at=lr_at, zero_stage=zero_stage,
                   tokens_per_step=cfg.train.micro_batch_size * cfg.train.grad_accum * env.world_size
                   * cfg.data.seq_len,
                   flops_per_token=causal_lm.flops_per_token(hf_config, n_params, cfg.data.seq_len),
                   peak_flops=peak * 1e12 if peak else None)


def start_line(cfg: RunConfig, env: DistEnv, start: Start, step: int, n_params: int, zero_stage: int,
               device: torch.device) -> str:
    """The first message of a phase: how it starts, from where, on what."""
    origin = f" from {start.ref.path}" if start.ref else ""
    reference = f" {start.reference}" if start.reference else ""
    return (f"{cfg.name}: start={start.kind}{origin}{reference}, step {step}/{cfg.train.max_steps}, "
            f"{n_params / 1e6:.1f}M params (non-embedding), world size {env.world_size} ({env.launcher}), "
            f"ZeRO {zero_stage}, {cfg.train.precision}, device {device}")


def lock_run_dir(run_dir: Path, env: DistEnv) -> RunLock | None:
    """Rank 0 locks the run dir; every rank learns whether it could (so none waits on the others)."""
    lock = RunLock(run_dir) if env.is_main else None
    distributed.on_main_rank(env.is_main, lambda: lock.acquire(),
                             f"run dir {run_dir} is in use by another run (rank 0 could not lock it)")
    return lock


def open_session(cfg: RunConfig, env: DistEnv) -> Session:
    """Check the data, lock the run dir, then build and restore the rest (see `_open_locked`).

    On any failure of set-up the lock goes, and so does the run dir if this start created it."""
    distributed.on_main_rank(env.is_main, lambda: check_writable(cfg.run_dir, "run dir (out_dir/name)"),
                             f"rank 0 cannot write the run dir {cfg.run_dir} (see its error)")
    device = distributed.device_for(env.local_rank)
    host_malloc.for_device(device)
    datasets = open_datasets(cfg)
    lock = lock_run_dir(cfg.run_dir, env)
    try:
        commit.check_shared_dir(cfg.run_dir)
        return _open_locked(cfg, env, device, datasets, lock)
    except BaseException:
        if lock is not None:
            lock.release(undo_dir=True)
        raise


def _open_locked(cfg: RunConfig, env: DistEnv, device: torch.device,
                 datasets: tuple[Mixture, dict[str, PackedSequences], str],
                 lock: RunLock | None) -> Session:
    """Check everything, build the engine, restore state, then (rank 0) write the run dir."""
    train_sets, eval_sets, tokenizer_dir = datasets
    vocab = next(iter(train_sets.sources.values())).dataset.vocab_size
    start = decide_start(cfg.checkpoint, cfg.run_dir)
    ds_cfg = deepspeed_config(cfg, env)
    zero_stage = ds_config.zero_stage(ds_cfg)
    check_resume(cfg, start, zero_stage, env.world_size, env.is_main)
    net = build_model(cfg, start, vocab)
    causal_lm.check_vocab(net.get_input_embeddings().weight.shape[0], vocab, "the training data")
    settle_start(cfg.checkpoint, cfg.run_dir, start)   # nothing is moved before every check passed
    universal, converted = None, False
    if start.kind == "resume" and elastic.needs_universal(start.ref.meta(), env.world_size, zero_stage,
                                                          cfg.checkpoint.elastic):
        universal, converted = elastic.prepare(start.ref.path, env.is_main)
        ds_cfg = elastic.with_universal_loading(ds_cfg)
    hf_config = net.config
    n_params = causal_lm.num_params(net)  # before DeepSpeed, which may partition the parameters away
    lr_at = schedules.build(cfg.schedule, cfg.train.max_steps)
    constants = phase_constants(cfg, env, hf_config, n_params, lr_at, zero_stage)
    engine = build_engine(cfg, net, ds_cfg, lr_at)
    sampler = MixtureSampler(train_sets.sources, train_sets.weights, cfg.data.seed, cfg.train.micro_batch_size,
                             env.rank, env.world_size)
    checkpointer = Checkpointer(cfg.run_dir / CHECKPOINTS, cfg.checkpoint.keep_last, env.rank,
                                           env.world_size, keep_every=cfg.checkpoint.keep_every)
    state = restore(cfg, start, engine, sampler, checkpointer, env.rank, universal)
    distributed.barrier()
    if env.is_main:
        _write_run_dir(cfg, cfg.run_dir)
    distributed.barrier()
    logger = MetricsLogger(cfg.run_dir, cfg.log, env.is_main, cfg.name, cfg.train.max_steps, state.step,
                           config.to_dict(cfg))
    logger.message(start_line(cfg, env, start, state.step, n_params, zero_stage, device))
    logger.message(describe(train_sets, cfg.train.max_steps * constants.tokens_per_step // cfg.data.seq_len))
    if universal is not None:
        logger.message(elastic.note(start.ref.meta(), env.world_size, zero_stage, universal, converted,
                                    constants.tokens_per_step))
    held_out = HeldOut(eval_sets, cfg.eval.tokens, cfg.eval.micro_batch_size or cfg.train.micro_batch_size,
                       cfg.eval.by_domain)
    return Session(env=env, device=device, engine=engine, sampler=sampler, held_out=held_out, logger=logger,
                   checkpointer=checkpointer, constants=constants, start=state, resumed=start.kind == "resume",
                   files=CheckpointFiles(hf_config, tokenizer_dir, config.to_dict(cfg)), lock=lock)
