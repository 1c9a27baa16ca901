"""Scoring on named held-out sets: token-weighted mean loss and perplexity, independent of world size.

Each rank scores its share of a fixed list of windows; per-token losses are summed in
float64 and reduced across ranks, so every rank count gives the same mean.

`cpt eval` scores checkpoints (ours, Hugging Face folders, hub names) as jobs of their own:

    cpt eval runs/rewarm --set pile=data/pile --set slimpajama=data/sp --tokens 22600000
    cpt eval runs/a/checkpoints/global_step400 hf/pythia EleutherAI/pythia-410m@step143000 \\
        --set pile=data/pile --store results/scores.jsonl
    torchrun --nproc_per_node 8 -m continual_pt.evaluate runs/rewarm --set pile=data/pile
    cpt eval runs/rewarm --set pile=data/pile --list        # the numbered checkpoints, for an array
    sbatch --array=0-9 --wrap "cpt eval runs/rewarm --set pile=data/pile"   # a task per checkpoint
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from continual_pt import distributed
from continual_pt.data.dataset import PackedSequences, eval_windows
from continual_pt.distributed import DistEnv
from continual_pt.errors import UserError
from continual_pt.eval_targets import EvalSet, Target, expand_targets, open_sets, pick_task, plan_target
from continual_pt.scores import FILE, ScoreStore, score_key

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@torch.no_grad()
def score_packed(forward, packed: PackedSequences, token_budget: int | None, micro_batch_size: int,
                 env: DistEnv, device: torch.device) -> dict[str, float]:
    """Loss and perplexity of `forward` (a CausalLMLoss or its engine) over a fixed window list.

    Every rank runs the same number of forward passes (ZeRO-3 gathers parameters
    collectively), padding its last batches with repeats whose losses are dropped.
    """
    windows = eval_windows(packed, token_budget, env.rank, env.world_size)
    per_rank = math.ceil(len(eval_windows(packed, token_budget, 0, env.world_size)) / micro_batch_size)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    tokens = 0
    for b in range(per_rank):
        chunk = windows[b * micro_batch_size:(b + 1) * micro_batch_size]
        real = len(chunk)
        if real < micro_batch_size:
            # Padding rows go last and are sliced off below: they cost a forward, never a host sync.
            fill = chunk[0] if chunk else (windows[0] if windows else 0)
            chunk = chunk + [fill] * (micro_batch_size - real)
        rows = torch.from_numpy(np.stack([packed[i] for i in chunk])).long()
        per_seq = forward(rows[:, :-1].to(device), rows[:, 1:].to(device), reduction="per_sequence")
        loss_sum += per_seq[:real].double().sum()
        tokens += real * (rows.shape[1] - 1)
    total_loss, total_tokens = distributed.all_reduce_sum([loss_sum.item(), float(tokens)], device)
    if total_tokens == 0:
        return {"loss": math.nan, "ppl": math.nan, "tokens": 0}
    mean = total_loss / total_tokens
    return {"loss": mean, "ppl": math.exp(min(mean, 700.0)), "tokens": int(total_tokens)}


# --------------------------------------------------------------------------- the eval job


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
            return ScoreStore(path / FILE)
        if path.suffix != ".jsonl":
            raise UserError(f"--store {store}: expected a .jsonl file or an existing directory "
                            f"(then {FILE} inside it)")
        return ScoreStore(path)
    if target.run_dir is None:
        raise UserError(f"{target.identity} is not inside a run directory, so scores have no default home; "
                        "name one with --store PATH.jsonl")
    return ScoreStore(target.run_dir / FILE)


def plan_jobs(args: argparse.Namespace, targets: list[Target], sets: list[EvalSet], warn) -> list[Job]:
    """Every check (tokenizer, vocabulary, sequence length, store) for every target, before any work."""
    jobs = []
    for target in targets:
        seq_len, mbs = plan_target(target, sets, args.seq_len, args.micro_batch_size, warn)
        job = Job(target, _store_for(target, args.store), seq_len, mbs)
        job.rows = [_row_skeleton(target, s, args.tokens, seq_len, args.dtype) for s in sets]
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
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def load_model(target: Target, dtype: str, device: torch.device) -> torch.nn.Module:
    """The target's causal LM on `device` in `dtype`, in eval mode (weights loaded in fp32 first)."""
    from continual_pt import checkpoint

    if target.kind == "checkpoint":
        model = checkpoint.load_model_from_checkpoint(target.ref)
    else:
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(target.name_or_path, revision=target.revision,
                                                         dtype=torch.float32, attn_implementation="sdpa")
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot load a model from {target.identity!r}: {exc}") from None
    model.config.use_cache = False
    return model.to(device=device, dtype=DTYPES[dtype]).eval()


def score_job(job: Job, indices: list[int], sets: list[EvalSet], args: argparse.Namespace,
              env: DistEnv, device: torch.device) -> list[dict[str, Any]]:
    """Load one checkpoint and score it on the chosen sets; returns the finished rows."""
    from continual_pt.model import CausalLMLoss

    forward = CausalLMLoss(load_model(job.target, args.dtype, device))
    rows = []
    for i in indices:
        started = time.monotonic()
        packed = PackedSequences(sets[i].dataset, job.seq_len)
        result = score_packed(forward, packed, args.tokens, job.micro_batch_size, env, device)
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


def _check_args(args: argparse.Namespace) -> None:
    if args.tokens is not None and args.tokens < 1:
        raise UserError(f"--tokens must be >= 1, got {args.tokens}")
    if args.seq_len is not None and args.seq_len < 1:
        raise UserError(f"--seq-len must be >= 1, got {args.seq_len}")
    if args.micro_batch_size is not None and args.micro_batch_size < 1:
        raise UserError(f"--micro-batch-size must be >= 1, got {args.micro_batch_size}")
    if not args.set and not args.list:
        raise UserError("name at least one held-out set: --set NAME=PATH (its val split) or "
                        "--set NAME=PATH:train (the whole training split)")


def run_cli(args: argparse.Namespace) -> int:
    """`cpt eval`: check everything, skip what is scored, score the rest, append rows per checkpoint."""
    env = distributed.detect()
    warn = _warner(env)
    _check_args(args)
    targets = pick_task(expand_targets(args.targets, warn), args.task_index, listing=args.list)
    if args.list:
        return 0
    sets = open_sets(args.set)
    jobs = plan_jobs(args, targets, sets, warn)
    if env.world_size > 1:
        env = distributed.init(env)
    device = distributed.device_for(env.local_rank)
    todo = _broadcast(pending(jobs) if env.is_main else None, env)
    count = sum(len(t) for t in todo)
    if env.is_main:
        budget = "all tokens" if args.tokens is None else f"{args.tokens} tokens"
        print(f"cpt eval: {len(jobs)} checkpoint(s) x {len(sets)} set(s), {budget} per set: {count} to score, "
              f"{len(jobs) * len(sets) - count} already scored (world size {env.world_size})",
              file=sys.stderr, flush=True)
    for job, indices in zip(jobs, todo):
        if not indices:
            continue
        rows = score_job(job, indices, sets, args, env, device)
        if env.is_main:
            written = job.store.append(rows)
            if written < len(rows):
                warn(f"{len(rows) - written} row(s) of {job.target.identity} were written meanwhile by another "
                     f"job; kept theirs in {job.store.path}")
    distributed.barrier()
    return 0


def main(argv: list[str] | None = None) -> int:
    from continual_pt.cli import launched_main

    return launched_main("eval", argv)


if __name__ == "__main__":
    sys.exit(main())
