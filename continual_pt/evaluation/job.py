"""`cpt eval`: token-weighted loss and perplexity of checkpoints on named held-out sets.

`cpt eval` scores checkpoints (ours, Hugging Face folders, hub names) as jobs of their own:

    cpt eval runs/rewarm --set pile=data/pile --set slimpajama=data/sp --tokens 22600000
    cpt eval runs/a/checkpoints/global_step400 hf/pythia EleutherAI/pythia-410m@step143000 \\
        --set pile=data/pile --store results/scores.jsonl
    torchrun --nproc_per_node 8 -m continual_pt.evaluate runs/rewarm --set pile=data/pile
    cpt eval runs/rewarm --set pile=data/pile --list        # the numbered checkpoints, for an array
    sbatch --array=0-9 --wrap "cpt eval runs/rewarm --set pile=data/pile"   # a task per checkpoint
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from continual_pt.checkpoint.refs import verify
from continual_pt.checkpoint.weights import load_model_from_checkpoint
from continual_pt.data.dataset import PackedSequences
from continual_pt.errors import UserError
from continual_pt.evaluation.options import EvalOptions
from continual_pt.evaluation.scoring import score_packed
from continual_pt.evaluation.store import ScoreStore, score_key
from continual_pt.evaluation.targets import EvalSet, Target, expand_targets, open_sets, pick_task, plan_target
from continual_pt.layout import EXIT_OK, SCORES
from continual_pt.model.causal_lm import DTYPES, CausalLMLoss
from continual_pt.runtime import distributed, host_malloc
from continual_pt.runtime.distributed import DistEnv


@dataclass
class Job:
    """One checkpoint to score on the sets it still lacks, and where its rows go."""

    target: Target
    store: ScoreStore
    seq_len: int
    micro_batch_size: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    """One row skeleton (everything but the results) per set, in --set order."""


def _row_skeleton(target: Target, s: EvalSet, budget: int | None, seq_len: int, dtype: str) -> dict[str, Any]:
    return {"run": target.run, "checkpoint": target.identity, "kind": target.kind, "tag": target.tag,
            "step": target.step, "tokens_seen": target.tokens_seen, "set": s.name,
            "set_path": str(s.path.resolve()), "split": s.split, "set_fingerprint": s.fingerprint,
            "budget": budget, "seq_len": seq_len, "dtype": dtype}


def _store_for(target: Target, store: str | None) -> ScoreStore:
    if store:
        path = Path(store)
        if path.is_dir():
            return ScoreStore(path / SCORES)
        if path.suffix != ".jsonl":
            raise UserError(f"--store {store}: expected a .jsonl file or an existing directory "
                            f"(then {SCORES} inside it)")
        return ScoreStore(path)
    if target.run_dir is None:
        raise UserError(f"{target.identity} is not inside a run directory, so scores have no default home; "
                        "name one with --store PATH.jsonl")
    return ScoreStore(target.run_dir / SCORES)


def plan_jobs(options: EvalOptions, targets: list[Target], sets: list[EvalSet], warn) -> list[Job]:
    """Every check (tokenizer, vocabulary, sequence length, store) for every target, before any work."""
    jobs = []
    for target in targets:
        seq_len, mbs = plan_target(target, sets, options.seq_len, options.micro_batch_size, warn)
        job = Job(target, _store_for(target, options.store), seq_len, mbs)
        job.rows = [_row_skeleton(target, s, options.tokens, seq_len, options.dtype) for s in sets]
        jobs.append(job)
    return jobs


def pending(jobs: list[Job]) -> list[list[int]]:
    """Per job, the indices of its rows not in its store yet."""
    known: dict[Path, set[tuple]] = {}
    todo = []
    for job in jobs:
        keys = known.setdefault(job.store.path, job.store.keys())
        todo.append([i for i, row in enumerate(job.rows) if score_key(row) not in keys])
    return todo


def _broadcast(obj: Any, env: DistEnv) -> Any:
    """Rank 0's value on every rank, so that all ranks run the same forwards even while the
    store changes under concurrent jobs."""
    if env.world_size == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def load_model(target: Target, dtype: str, device: torch.device) -> torch.nn.Module:
    """The target's causal LM on `device` in `dtype`, in eval mode (weights loaded in fp32 first)."""
    if target.kind == "checkpoint":
        # Listing checked sizes only; the one checkpoint scored is checked byte for byte.
        model = load_model_from_checkpoint(verify(target.ref.path))
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(target.name_or_path, revision=target.revision,
                                                         dtype=torch.float32, attn_implementation="sdpa")
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot load a model from {target.identity!r}: {exc}") from None
    model.config.use_cache = False
    return model.to(device=device, dtype=DTYPES[dtype]).eval()


def score_job(job: Job, indices: list[int], sets: list[EvalSet], options: EvalOptions,
              env: DistEnv, device: torch.device) -> list[dict[str, Any]]:
    """Load one checkpoint and score it on the chosen sets; returns the finished rows."""
    forward = CausalLMLoss(load_model(job.target, options.dtype, device))
    rows = []
    for i in indices:
        started = time.monotonic()
        packed = PackedSequences(sets[i].dataset, job.seq_len)
        result = score_packed(forward, packed, options.tokens, job.micro_batch_size, env, device)
        seconds = time.monotonic() - started
        row = {**job.rows[i], **result, "world_size": env.world_size, "seconds": round(seconds, 3),
               "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        rows.append(row)
        if env.is_main:
            step = "" if row["step"] is None else f" step {row['step']}"
            print(f"{job.target.run} {job.target.tag}{step}: {row['set']} loss {row['loss']:.4f} "
                  f"ppl {row['ppl']:.3f} ({row['tokens']} tokens, {seconds:.1f} s)", flush=True)
    return rows


def _warner(env: DistEnv):
    def warn(message: str) -> None:
        if env.is_main:
            print(f"cpt eval: warning: {message}", file=sys.stderr, flush=True)

    return warn


def _check_options(options: EvalOptions) -> None:
    if options.tokens is not None and options.tokens < 1:
        raise UserError(f"--tokens must be >= 1, got {options.tokens}")
    if options.seq_len is not None and options.seq_len < 1:
        raise UserError(f"--seq-len must be >= 1, got {options.seq_len}")
    if options.micro_batch_size is not None and options.micro_batch_size < 1:
        raise UserError(f"--micro-batch-size must be >= 1, got {options.micro_batch_size}")
    if not options.sets and not options.list_only:
        raise UserError("name at least one held-out set: --set NAME=PATH (its val split) or "
                        "--set NAME=PATH:train (the whole training split)")


def run_eval(options: EvalOptions) -> int:
    """`cpt eval`: check everything, skip what is scored, score the rest, append rows per checkpoint."""
    env = distributed.detect()
    warn = _warner(env)
    _check_options(options)
    targets = pick_task(expand_targets(options.targets, warn), options.task_index, listing=options.list_only)
    if options.list_only:
        return EXIT_OK
    sets = open_sets(options.sets)
    jobs = plan_jobs(options, targets, sets, warn)
    if env.world_size > 1:
        env = distributed.init(env)
    device = distributed.device_for(env.local_rank)
    host_malloc.for_device(device)
    todo = _broadcast(pending(jobs) if env.is_main else None, env)
    count = sum(len(t) for t in todo)
    if env.is_main:
        budget = "all tokens" if options.tokens is None else f"{options.tokens} tokens"
        print(f"cpt eval: {len(jobs)} checkpoint(s) x {len(sets)} set(s), {budget} per set: {count} to score, "
              f"{len(jobs) * len(sets) - count} already scored (world size {env.world_size})",
              file=sys.stderr, flush=True)
    for job, indices in zip(jobs, todo):
        if not indices:
            continue
        rows = score_job(job, indices, sets, options, env, device)
        if env.is_main:
            written = job.store.append(rows)
            if written < len(rows):
                warn(f"{len(rows) - written} row(s) of {job.target.identity} were written meanwhile by another "
                     f"job; kept theirs in {job.store.path}")
    distributed.barrier()
    return EXIT_OK
