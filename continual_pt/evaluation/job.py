"""Scoring jobs of `cpt eval`: each checkpoint planned and checked before any work, the rows it still
lacks found in its store, its model loaded (or skipped when its run pruned it meanwhile) and scored."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from continual_pt.checkpoint.refs import removed, verify
from continual_pt.checkpoint.weights import load_model_from_checkpoint
from continual_pt.data.dataset import WINDOW_RULE, PackedSequences
from continual_pt.errors import UserError
from continual_pt.evaluation import domains, harness
from continual_pt.evaluation.harness import Harness, request_key
from continual_pt.evaluation.options import EvalOptions
from continual_pt.evaluation.scoring import score_packed
from continual_pt.evaluation.sets import EvalSet, measurement
from continual_pt.evaluation.store import ScoreStore, score_key
from continual_pt.evaluation.targets import Target, plan_target
from continual_pt.layout import SCORES
from continual_pt.model.causal_lm import DTYPES, CausalLMLoss
from continual_pt.runtime import distributed
from continual_pt.runtime.distributed import DistEnv


@dataclass
class Job:
    """One checkpoint to score on the sets it still lacks, and where its rows go."""

    target: Target
    store: ScoreStore
    seq_len: int
    micro_batch_size: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    """One row skeleton (everything but the results) per set, in --set order, then one per --lm-eval request."""


def _row_skeleton(target: Target, s: EvalSet, options: EvalOptions, seq_len: int) -> dict[str, Any]:
    rule = domains.RULE if options.by_domain else WINDOW_RULE
    return {"run": target.run, "kind": target.kind, "tag": target.tag, "step": target.step,
            "tokens_seen": target.tokens_seen, "set_path": str(s.path.resolve()),
            **measurement(target.identity, s, options.tokens, seq_len, options.dtype, rule)}


def store_for(target: Target, store: str | None) -> ScoreStore:
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


def _request_skeleton(target: Target, tasks: Harness, request: str, dtype: str) -> dict[str, Any]:
    return {"run": target.run, "kind": target.kind, "tag": target.tag, "step": target.step,
            "tokens_seen": target.tokens_seen, "checkpoint": target.identity, **tasks.skeleton(request),
            "dtype": dtype}


def plan_jobs(options: EvalOptions, targets: list[Target], sets: list[EvalSet], warn,
              tasks: Harness | None = None) -> list[Job]:
    """Every check (tokenizer, vocabulary, sequence length, store) for every target, before any work."""
    jobs = []
    for target in targets:
        seq_len, mbs = plan_target(target, sets, options.seq_len, options.micro_batch_size, warn)
        job = Job(target, store_for(target, options.store), seq_len, mbs)
        job.rows = [_row_skeleton(target, s, options, seq_len) for s in sets]
        job.rows += [_request_skeleton(target, tasks, r, options.dtype) for r in (tasks.requests if tasks else [])]
        jobs.append(job)
    return jobs


def pending(jobs: list[Job]) -> list[list[int]]:
    """Per job, the indices of its rows not in its store yet (a request: no row of it with its settings)."""
    known: dict[Path, tuple[set[tuple], set[tuple]]] = {}
    todo = []
    for job in jobs:
        if job.store.path not in known:
            rows = job.store.rows()
            known[job.store.path] = ({score_key(r) for r in rows}, {request_key(r) for r in rows if "request" in r})
        keys, requests = known[job.store.path]
        todo.append([i for i, row in enumerate(job.rows)
                     if (request_key(row) not in requests if "request" in row else score_key(row) not in keys)])
    return todo


def broadcast(obj: Any, env: DistEnv) -> Any:
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


def loaded(job: Job, dtype: str, device: torch.device, env: DistEnv) -> torch.nn.Module | None:
    """The job's model on every rank, or None on every rank (after one line) when its run pruned the
    checkpoint (keep_last) between listing and loading; any other failure is raised where it happened."""
    model, problem, gone = None, None, False
    try:
        model = load_model(job.target, dtype, device)
    except Exception as exc:   # noqa: BLE001  (re-raised below unless the checkpoint is gone)
        if job.target.kind == "checkpoint" and removed(job.target.ref.path):
            gone = True
        else:
            problem = exc
    worst = distributed.all_reduce_max([2.0 if problem else 1.0 if gone else 0.0])[0]
    if problem is not None:
        raise problem
    if worst == 2.0:
        raise UserError(f"another rank could not load {job.target.identity}; see its message")
    if worst == 1.0:
        if env.is_main:
            print(f"{job.target.run} {job.target.tag}: skipped: its run pruned it (checkpoint.keep_last) "
                  "before it could be loaded", flush=True)
        return None
    return model


def score_job(job: Job, indices: list[int], sets: list[EvalSet], options: EvalOptions,
              env: DistEnv, device: torch.device, tasks: Harness | None = None) -> list[dict[str, Any]] | None:
    """Load one checkpoint and score it on the chosen sets and lm-eval requests; returns the finished rows,
    or None on every rank when the checkpoint's run pruned it before it was loaded."""
    model = loaded(job, options.dtype, device, env)
    if model is None:
        return None
    rows = _score_sets(job, [i for i in indices if i < len(sets)], sets, options, env, device, model)
    requests = [job.rows[i] for i in indices if i >= len(sets)]
    if requests:
        rows += _score_requests(job, requests, tasks, env, model)
    return rows


def load_tokenizer(target: Target):
    """The target's own tokenizer (lm-eval tokenizes the tasks' text with it)."""
    source = str(target.ref.path / "tokenizer") if target.kind == "checkpoint" else target.name_or_path
    try:
        return AutoTokenizer.from_pretrained(source, revision=target.revision)
    except (OSError, ValueError) as exc:
        raise UserError(f"{target.identity}: no tokenizer to run lm-eval tasks with ({source}: "
                        f"{str(exc).splitlines()[0]})") from None


def _score_requests(job: Job, skeletons: list[dict[str, Any]], tasks: Harness, env: DistEnv,
                    model: torch.nn.Module) -> list[dict[str, Any]]:
    """The rows of the requests (skeletons): rank r evaluates requests r, r + world size, ...; rank 0 gets
    them all, in --lm-eval order."""
    requests = [s["request"] for s in skeletons]
    share = requests[env.rank::env.world_size]
    try:
        mine: list[dict[str, Any]] | str = \
            harness.evaluate(tasks, model, load_tokenizer(job.target), share, env.world_size) if share else []
    except UserError as exc:
        if env.world_size == 1:
            raise
        mine = str(exc)   # every rank raises it below, instead of the others waiting for this one forever
    if env.world_size > 1:
        gathered: list[Any] = [None] * env.world_size
        torch.distributed.all_gather_object(gathered, mine)
        problems = [part for part in gathered if isinstance(part, str)]
        if problems:
            raise UserError(problems[0])
        mine = [row for part in gathered for row in part]
    skeleton = dict(zip(requests, skeletons))
    rows = [{**skeleton[row["request"]], **row} for row in sorted(mine, key=lambda r: requests.index(r["request"]))]
    if env.is_main:
        step = "" if job.target.step is None else f" step {job.target.step}"
        for row in rows:
            print(f"{job.target.run} {job.target.tag}{step}: {harness.describe(row)}", flush=True)
    return rows


def _score_sets(job: Job, indices: list[int], sets: list[EvalSet], options: EvalOptions, env: DistEnv,
                device: torch.device, model: torch.nn.Module) -> list[dict[str, Any]]:
    forward = CausalLMLoss(model)
    rows = []
    for i in indices:
        started = time.monotonic()
        packed = PackedSequences(sets[i].dataset, job.seq_len)
        result = score_packed(forward, packed, options.tokens, job.micro_batch_size, env, device,
                              domain_names=sets[i].dataset.domains if options.by_domain else None)
        seconds = time.monotonic() - started
        by_domain = result.pop("domains", {})
        extra = {"world_size": env.world_size, "seconds": round(seconds, 3),
                 "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        row = {**job.rows[i], **result, **extra}
        rows += [row, *({**job.rows[i], "domain": d, **r, "selection": result["selection"], **extra}
                        for d, r in by_domain.items())]
        if env.is_main:
            step = "" if row["step"] is None else f" step {row['step']}"
            macro = f", macro over {len(by_domain)} domains {row['macro_loss']:.4f}" if by_domain else ""
            print(f"{job.target.run} {job.target.tag}{step}: {row['set']} loss {row['loss']:.4f} "
                  f"ppl {row['ppl']:.3f} ({row['tokens']} tokens{macro}, {seconds:.1f} s)", flush=True)
    return rows
