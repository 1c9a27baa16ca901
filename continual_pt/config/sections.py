"""The sections of a run config: small dataclasses composed into one `RunConfig`.

Precedence is defaults < YAML file < command-line overrides (`schedule.max_lr=6e-4`).
Every problem (unknown key, wrong type, out-of-range or inconsistent value) is gathered
into one `ConfigError` naming the file (or "command line") and the dotted key; it is raised
before anything is written. A resolved config dumps to YAML that loads back equal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from continual_pt.config import deepspeed
from continual_pt.config.tasks import LmEvalConfig
from continual_pt.config.typed import Problems, parse_duration
from continual_pt.layout import PRECISIONS
from continual_pt.schedules import ScheduleConfig, check_config

# --------------------------------------------------------------------------- sections


@dataclass
class ModelConfig:
    """Which architecture to build. Weights come from `checkpoint.init` or `resume`, never from here."""

    name_or_path: str | None = None
    """Hugging Face hub name or local folder whose config.json gives the architecture."""
    revision: str | None = None
    """Hub revision of `name_or_path` (e.g. a Pythia step, `step143000`)."""
    config: dict[str, Any] = field(default_factory=dict)
    """Architecture fields; alone they define a model from scratch (`model_type` defaults to
    gpt_neox), with `name_or_path` they override its config."""
    attn_implementation: str = "sdpa"
    """Attention kernel: sdpa, eager (or another that transformers accepts)."""
    activation_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    fused_loss: str | bool = "auto"
    """Output layer + cross-entropy in chunks, never holding the full fp32 logits: auto (where the
    model allows it), on (refuse a model that does not), off (full logits, as plain transformers).
    YAML reads a bare on/off as true/false: they mean on/off here."""
    origins: dict[str, str] = field(default_factory=dict, repr=False, compare=False,
                                    metadata={"internal": True})
    """Where each key of `config` came from (a file or "command line"), for messages; never dumped."""

    def where(self, key: str) -> str:
        """`<origin>: model.config.<key>`, the prefix of a message about one key of `config`."""
        return f"{self.origins.get(key, 'config')}: model.config.{key}"

    def check(self, p: Problems) -> None:
        if self.attn_implementation not in ("sdpa", "eager", "flash_attention_2", "flex_attention"):
            p.add("model.attn_implementation",
                  f"unknown value {self.attn_implementation!r}; accepted: sdpa, eager, "
                  "flash_attention_2, flex_attention")
        if isinstance(self.fused_loss, bool):
            self.fused_loss = "on" if self.fused_loss else "off"
        if self.fused_loss not in ("auto", "on", "off"):
            p.add("model.fused_loss", f"unknown value {self.fused_loss!r}; accepted: auto, on, off")
        if self.revision and not self.name_or_path:
            p.add("model.revision", "set without model.name_or_path")


@dataclass
class SourceConfig:
    """One prepared dataset in the training mixture."""

    path: str = ""
    """Directory written by `cpt prepare`."""
    weight: float = 1.0
    """Share of every batch drawn from this source (weights are normalised)."""
    split: str = "train"
    """Which split of the prepared dataset to train on."""
    domains: dict[str, float] | list[str] | None = field(default=None, metadata={"omit_unset": True})
    """Train on some domains of a dataset prepared with domains, each its own part of the mixture:
    {Github: 2.0, ArXiv: 1.0} (relative weights within this source) or [Github, ArXiv] (keep only these,
    weighted by their tokens in the split). `weight` still sets the whole source's share. Left out of a
    saved config when unset, so configs saved before it existed compare equal."""
    origin: str = field(default="", repr=False, compare=False, metadata={"internal": True})
    """Where `path` came from (a file or "command line"), for messages; never dumped."""
    origins: dict[str, str] = field(default_factory=dict, repr=False, compare=False, metadata={"internal": True})
    """Where `domains` and each of its entries came from, by dotted key, for messages; never dumped."""

    def check_domains(self, key: str, p: Problems) -> None:
        """The problems of `domains` that need no dataset (`key`: data.train.<name>.domains)."""
        if self.domains is None:
            return
        if not self.domains:
            p.add(key, "empty: name the domains to keep, or leave domains out to train on the whole dataset")
        if isinstance(self.domains, dict):
            for name, weight in self.domains.items():
                if not name:
                    p.add(key, "a domain without a name")
                elif isinstance(weight, float) and not (math.isfinite(weight) and weight > 0):
                    p.add(f"{key}.{name}", f"must be > 0, got {weight}")
            return
        names = [n for n in self.domains if n is not None]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice or "" in names:
            p.add(key, f"lists {', '.join(map(repr, twice))} twice" if twice else "a domain without a name")


@dataclass
class DataConfig:
    """Training data: a weighted mixture of prepared datasets, packed into fixed-length sequences."""

    train: dict[str, SourceConfig] = field(default_factory=dict)
    """Named sources, e.g. {slimpajama: {path: data/sp, weight: 0.95}, pile: {path: data/pile, weight: 0.05}}."""
    seq_len: int = 2048
    """Tokens per training sequence (each sample reads seq_len + 1 tokens)."""
    seed: int = 1234
    """Shuffling seed of the sampler."""
    tokenizer: str | None = None
    """Optional tokenizer (folder or hub name) that every manifest must match."""

    def check(self, p: Problems) -> None:
        if not self.train:
            p.add("data.train", "no training source given (e.g. data.train.corpus.path=data/corpus)")
        for name, src in self.train.items():
            if not src.path:
                p.add(f"data.train.{name}.path", "missing: the directory written by `cpt prepare`")
            if not src.weight > 0:
                p.add(f"data.train.{name}.weight", f"must be > 0, got {src.weight}")
            if src.split not in ("train", "val"):
                p.add(f"data.train.{name}.split", f"unknown split {src.split!r}; accepted: train, val")
            src.check_domains(f"data.train.{name}.domains", p)
        if self.seq_len < 1:
            p.add("data.seq_len", f"must be >= 1, got {self.seq_len}")


@dataclass
class OptimConfig:
    """AdamW with the paper's defaults. The learning rate itself lives in `schedule`."""

    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    """Applied to weight matrices and embeddings; never to biases and norm weights."""
    grad_clip: float = 1.0
    """Global gradient-norm clipping; 0 disables it."""

    def check(self, p: Problems) -> None:
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            p.add("optim.betas", f"must be two numbers in [0, 1), got {self.betas}")
        if self.eps <= 0:
            p.add("optim.eps", f"must be > 0, got {self.eps}")
        if self.weight_decay < 0:
            p.add("optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        if self.grad_clip < 0:
            p.add("optim.grad_clip", f"must be >= 0, got {self.grad_clip}")


@dataclass
class TrainConfig:
    """The optimizer-step loop."""

    max_steps: int = 0
    """Optimizer steps in this phase (required)."""
    micro_batch_size: int = 1
    """Sequences per rank per forward pass."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    global_batch_size: int | None = None
    """Optional check: must equal micro_batch_size x grad_accum x data-parallel size."""
    precision: str = "bf16"
    """bf16, fp16 or fp32."""
    ds_config: str = "zero1"
    """A file name in ds_configs/ (without .json) or a path to a DeepSpeed JSON config."""
    seed: int = 1234
    """Seed of the model initialisation and of every other random draw of the run."""
    compile: bool = False
    """Compile the model with torch.compile through the DeepSpeed engine (GPU throughput)."""
    log_every: int = 10
    """Steps between metric lines."""
    max_nonfinite_skips: int = 0
    """Micro-batches with a non-finite loss that are skipped (replaced by the next batch) before the
    run stops; 0 stops at the first one, reporting its step."""
    time_limit: str | None = None
    """Wall-clock budget ("HH:MM:SS" or seconds): save and exit before it runs out."""
    time_limit_margin: str = "00:05:00"
    """How long before the time limit to stop (room for the final checkpoint)."""
    stop_after_steps: int | None = None
    """Stop resumably after this many steps of this invocation (e.g. a fixed chunk per job)."""

    def check(self, p: Problems) -> None:
        if self.max_steps <= 0:
            p.add("train.max_steps", f"must be > 0, got {self.max_steps}")
        for key in ("micro_batch_size", "grad_accum", "log_every"):
            if getattr(self, key) < 1:
                p.add(f"train.{key}", f"must be >= 1, got {getattr(self, key)}")
        if self.global_batch_size is not None and self.global_batch_size < 1:
            p.add("train.global_batch_size", f"must be >= 1, got {self.global_batch_size}")
        if self.precision not in PRECISIONS:
            p.add("train.precision", f"unknown precision {self.precision!r}; accepted: {', '.join(PRECISIONS)}")
        if self.stop_after_steps is not None and self.stop_after_steps < 1:
            p.add("train.stop_after_steps", f"must be >= 1, got {self.stop_after_steps}")
        if self.max_nonfinite_skips < 0:
            p.add("train.max_nonfinite_skips", f"must be >= 0, got {self.max_nonfinite_skips}")
        for key in ("time_limit", "time_limit_margin"):
            value = getattr(self, key)
            if value is not None:
                try:
                    parse_duration(value)
                except ValueError as exc:
                    p.add(f"train.{key}", str(exc))
        ds_problem = deepspeed.problem(self.ds_config)
        if ds_problem:
            p.add("train.ds_config", ds_problem)


@dataclass
class EvalSetConfig:
    """One named held-out set."""

    path: str = ""
    """Directory written by `cpt prepare`."""
    split: str = "val"
    """val (the held-out split) or train (the whole prepared dataset's training split)."""
    origin: str = field(default="", repr=False, compare=False, metadata={"internal": True})
    """Where `path` came from (a file or "command line"), for messages; never dumped."""


@dataclass
class EvalConfig:
    """In-loop evaluation: one token-weighted loss and perplexity per named held-out set; and (`lm_eval`)
    the downstream tasks the run's eval array scores besides."""

    sets: dict[str, EvalSetConfig] = field(default_factory=dict)
    """Named sets, e.g. {pile: {path: data/pile}, slimpajama: {path: data/sp}}."""
    every_steps: int = 0
    """Steps between evaluations; 0 evaluates only at the start and the end."""
    tokens: int | None = None
    """Token budget per set: ceil(tokens / seq_len) windows spread evenly over the whole split, the same
    every time; unset scores the whole split."""
    micro_batch_size: int | None = None
    """Sequences per rank per forward pass (default: train.micro_batch_size)."""
    at_start: bool = True
    """Also evaluate before the first step (the start point of forgetting curves)."""
    by_domain: bool = False
    """Also a loss per domain of each set (sets prepared with domains; a budget is shared among them)."""
    lm_eval: LmEvalConfig | None = field(default=None, metadata={"omit_unset": True})
    """lm-evaluation-harness tasks scored by the run's eval array (`cpt eval --claim`), not in the training
    loop, e.g. {tasks: [hellaswag, arc_easy], num_fewshot: 0, limit: 500}; a run with tasks and no `sets`
    still gets an eval array. Left out of a saved config when unset, so configs saved before it existed
    compare equal."""

    def check(self, p: Problems) -> None:
        for name, spec in self.sets.items():
            if not spec.path:
                p.add(f"eval.sets.{name}.path", "missing: the directory written by `cpt prepare`")
            if spec.split not in ("train", "val"):
                p.add(f"eval.sets.{name}.split", f"unknown split {spec.split!r}; accepted: train, val")
        if self.every_steps < 0:
            p.add("eval.every_steps", f"must be >= 0, got {self.every_steps}")
        if self.tokens is not None and self.tokens < 1:
            p.add("eval.tokens", f"must be >= 1, got {self.tokens}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            p.add("eval.micro_batch_size", f"must be >= 1, got {self.micro_batch_size}")
        if self.lm_eval is not None:
            self.lm_eval.check(p)


@dataclass
class CheckpointConfig:
    """How a run starts (resume or init, never both) and how it saves."""

    resume: str = "auto"
    """auto (the newest committed checkpoint of this run, if any), never, or a checkpoint path."""
    init: str | None = None
    """Start a new phase from weights only: a Hugging Face name or folder (`name@revision`
    for a hub revision) or one of our run or checkpoint directories. Used only when nothing
    is resumed, so a requeued job continues its own run instead of starting again."""
    keep_optimizer: bool = False
    """With `init` from one of our checkpoints, also load its optimizer state."""
    every_steps: int = 0
    """Steps between checkpoints; 0 saves only at the end and on preemption."""
    keep_last: int = 2
    """Committed checkpoints kept (at least 2)."""
    keep_every: int = 0
    """Also keep every checkpoint whose step is a multiple of this (0: none), e.g. 1000 as Pythia
    does, for evaluations and later runs from earlier checkpoints; a multiple of every_steps."""
    elastic: str = "auto"
    """Resuming on another number of ranks or another ZeRO stage: auto (convert the checkpoint once
    to DeepSpeed's universal format, kept beside it, and load that) or never (refuse)."""

    def check(self, p: Problems) -> None:
        if self.elastic not in ("auto", "never"):
            p.add("checkpoint.elastic", f"must be auto or never, got {self.elastic!r}")
        if self.resume not in ("auto", "never") and self.init:
            p.add("checkpoint.init", f"given together with checkpoint.resume={self.resume!r}: a run "
                  "either resumes (everything) or starts a new phase from weights (init), never both")
        if self.keep_optimizer and not self.init:
            p.add("checkpoint.keep_optimizer", "only applies with checkpoint.init")
        if self.every_steps < 0:
            p.add("checkpoint.every_steps", f"must be >= 0, got {self.every_steps}")
        if self.keep_last < 2:
            p.add("checkpoint.keep_last", f"must be >= 2 (a kill during a save must leave one "
                  f"committed checkpoint), got {self.keep_last}")
        if self.keep_every < 0:
            p.add("checkpoint.keep_every", f"must be >= 0, got {self.keep_every}")
        elif self.keep_every and not self.every_steps:
            p.add("checkpoint.keep_every", "needs checkpoint.every_steps > 0 (without it only the last step is saved)")
        elif self.keep_every and self.keep_every % self.every_steps:
            p.add("checkpoint.keep_every", f"must be a multiple of checkpoint.every_steps ({self.every_steps}), "
                  f"got {self.keep_every}")


@dataclass
class LogConfig:
    """Where metrics go."""

    tensorboard: bool = True
    wandb: bool = False
    """Log to Weights & Biases (needs `pip install wandb`)."""
    wandb_project: str | None = None
    peak_tflops: float | None = None
    """Peak TFLOP/s of one accelerator, for MFU (default: a known value for the device, else none)."""
    progress: bool = True
    """A progress bar with ETA on rank 0."""


@dataclass
class RunConfig:
    """One training phase."""

    name: str = "run"
    """Run name: the run directory is out_dir/name."""
    out_dir: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    def _zero_stage(self) -> int | None:
        """The ZeRO stage of train.ds_config; None while it is unreadable (reported on its own)."""
        path = deepspeed.find(self.train.ds_config)
        try:
            return deepspeed.zero_stage(deepspeed.read(path)) if path else None
        except deepspeed.DeepSpeedFileError:
            return None

    def check(self, p: Problems) -> None:
        if not self.name or "/" in self.name:
            p.add("name", f"must be a non-empty name without '/', got {self.name!r}")
        self.model.check(p)
        self.data.check(p)
        self.optim.check(p)
        self.train.check(p)
        check_config(self.schedule, p, max(self.train.max_steps, 1))
        self.eval.check(p)
        self.checkpoint.check(p)
        if self.model.fused_loss == "on" and self._zero_stage() == 3:
            p.add("model.fused_loss", f"on does not work with ZeRO stage 3 (train.ds_config={self.train.ds_config} "
                  "partitions the output layer); use auto (the plain loss under ZeRO 3) or off")
        if not (self.model.name_or_path or self.model.config or self.checkpoint.init
                or self.checkpoint.resume not in ("auto", "never")):
            p.add("model", "no architecture: set model.name_or_path, model.config, or checkpoint.init")
