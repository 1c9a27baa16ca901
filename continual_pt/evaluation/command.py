"""`cpt eval`: token-weighted loss and perplexity of checkpoints on named held-out sets.

`cpt eval` scores checkpoints (ours, Hugging Face folders, hub names) as jobs of their own:

    cpt eval runs/rewarm --set pile=data/pile --set slimpajama=data/sp --tokens 22600000
    cpt eval runs/a/checkpoints/global_step400 hf/pythia EleutherAI/pythia-410m@step143000 \\
        --set pile=data/pile --store results/scores.jsonl
    torchrun --nproc_per_node 8 -m continual_pt.evaluate runs/rewarm --set pile=data/pile
    cpt eval runs/rewarm --set pile=data/pile --list        # the numbered checkpoints, which are unscored
    sbatch --array=0-3 --wrap "cpt eval runs/rewarm --set pile=data/pile --claim"   # 4 tasks drain the run

With --claim, each job takes the oldest committed checkpoint that still lacks a row and no other
job is scoring (`claims.Claim`), scores it, and takes the next, until none is left: any number of
jobs drains a run, each checkpoint is scored once, and the list is read anew each time, so
checkpoints committed meanwhile are scored and pruned ones are not looked for.
"""

from __future__ import annotations

import sys

from continual_pt.errors import UserError
from continual_pt.evaluation.claims import Claim
from continual_pt.evaluation.domains import require_domains
from continual_pt.evaluation.harness import Harness, open_harness
from continual_pt.evaluation.job import Job, broadcast, pending, plan_jobs, score_job, store_for
from continual_pt.evaluation.options import EvalOptions
from continual_pt.evaluation.sets import EvalSet, open_sets
from continual_pt.evaluation.store import score_key
from continual_pt.evaluation.targets import expand_targets, pick_task, print_listing
from continual_pt.files import check_writable
from continual_pt.layout import EXIT_OK
from continual_pt.runtime import distributed, host_malloc
from continual_pt.runtime.distributed import DistEnv


def _warner(env: DistEnv):
    said: set[str] = set()

    def warn(message: str) -> None:
        if env.is_main and message not in said:
            said.add(message)
            print(f"cpt eval: warning: {message}", file=sys.stderr, flush=True)

    return warn


def _check_options(options: EvalOptions) -> None:
    if options.tokens is not None and options.tokens < 1:
        raise UserError(f"--tokens must be >= 1, got {options.tokens}")
    if options.seq_len is not None and options.seq_len < 1:
        raise UserError(f"--seq-len must be >= 1, got {options.seq_len}")
    if options.micro_batch_size is not None and options.micro_batch_size < 1:
        raise UserError(f"--micro-batch-size must be >= 1, got {options.micro_batch_size}")
    if not options.sets and not options.lm_eval and not options.list_only:
        raise UserError("name at least one held-out set: --set NAME=PATH (its val split) or "
                        "--set NAME=PATH:train (the whole training split), or lm-eval tasks: --lm-eval TASKS")
    if options.claim and options.task_index not in (None, "all"):
        raise UserError("--claim takes the next unscored checkpoint itself; leave out --task-index")


def open_by_domain(options: EvalOptions) -> list[EvalSet]:
    """The --set sets, each checked to have domains when scored --by-domain (before any work)."""
    sets = open_sets(options.sets)
    if options.by_domain:
        for s in sets:
            require_domains(s.dataset, f"--set {s.name}")
    return sets


def open_tasks(options: EvalOptions) -> Harness | None:
    """The --lm-eval requests, checked and their data loaded (None without --lm-eval)."""
    return open_harness(options.lm_eval, options.include_path, options.num_fewshot, options.lm_eval_limit,
                        options.lm_eval_batch_size)


def _listing(options: EvalOptions, warn) -> int:
    targets = expand_targets(options.targets, warn)
    unscored = None
    if options.sets or options.lm_eval:
        jobs = plan_jobs(options, targets, open_sets(options.sets), warn, open_tasks(options))
        unscored = [bool(indices) for indices in pending(jobs)]
    asked = [name for name, given in (("--set", options.sets), ("--lm-eval task", options.lm_eval)) if given]
    print_listing(targets, unscored, " and ".join(asked) or "--set")
    return EXIT_OK


def _started(env: DistEnv) -> tuple[DistEnv, object]:
    if env.world_size > 1:
        env = distributed.init(env)
    device = distributed.device_for(env.local_rank)
    host_malloc.for_device(device)
    return env, device


def _store(job: Job, rows: list[dict], warn) -> None:
    written = job.store.append(rows)
    if written < len(rows):
        warn(f"{len(rows) - written} row(s) of {job.target.identity} were written meanwhile by another "
             f"job; kept theirs in {job.store.path}")


def run_eval(options: EvalOptions) -> int:
    """`cpt eval`: check everything, skip what is scored, score the rest, append rows per checkpoint."""
    env = distributed.detect()
    warn = _warner(env)
    _check_options(options)
    if options.list_only:
        return _listing(options, warn)
    if options.claim:
        return _drain(options, env, warn)
    targets = pick_task(expand_targets(options.targets, warn), options.task_index)
    sets, tasks = open_by_domain(options), open_tasks(options)
    jobs = plan_jobs(options, targets, sets, warn, tasks)
    for path in dict.fromkeys(job.store.path for job in jobs):   # before any scoring, not after it
        check_writable(path, "--store", file=True)
    env, device = _started(env)
    todo = broadcast(pending(jobs) if env.is_main else None, env)
    count = sum(len(t) for t in todo)
    if env.is_main:
        budget = "all tokens" if options.tokens is None else f"{options.tokens} tokens"
        each = len(jobs[0].rows) if jobs else 0
        extra = f" + {each - len(sets)} lm-eval task(s)" if tasks else ""
        print(f"cpt eval: {len(jobs)} checkpoint(s) x {len(sets)} set(s){extra}, {budget} per set: {count} to "
              f"score, {len(jobs) * each - count} already scored (world size {env.world_size})",
              file=sys.stderr, flush=True)
    for job, indices in zip(jobs, todo):
        if indices:
            rows = score_job(job, indices, sets, options, env, device, tasks)
            if env.is_main and rows is not None:
                _store(job, rows, warn)
    distributed.barrier()
    return EXIT_OK


# --------------------------------------------------------------------------- --claim


def _claim_next(options: EvalOptions, sets: list[EvalSet], tasks: Harness | None, planned: dict[str, Job],
                warn) -> tuple[Job, list[int], Claim] | None:
    """The oldest checkpoint that lacks a row and no other job holds, claimed; None when none is left."""
    targets = expand_targets(options.targets, warn, allow_none=True)   # anew: new commits join, pruned ones go
    for target in targets:
        if target.identity not in planned:
            planned[target.identity] = plan_jobs(options, [target], sets, warn, tasks)[0]
    jobs = [planned[t.identity] for t in targets]
    for job, indices in zip(jobs, pending(jobs)):
        if not indices:
            continue
        claim = Claim.take(job.store.path, job.target.identity, [score_key(row) for row in job.rows])
        if claim is None:
            continue   # another job is scoring it
        indices = pending([job])[0]   # again, holding the claim: a job may have stored it meanwhile
        if indices:
            return job, indices, claim
        claim.release()
    return None


def _drain(options: EvalOptions, env: DistEnv, warn) -> int:
    """Claim, score and store checkpoints one at a time until none is left unscored and unclaimed."""
    sets, tasks = open_by_domain(options), open_tasks(options)
    targets = expand_targets(options.targets, warn, allow_none=True)
    for path in dict.fromkeys(store_for(t, options.store).path for t in targets):
        check_writable(path, "--store", file=True)
    env, device = _started(env)
    planned: dict[str, Job] = {}
    stored = skipped = 0
    while True:
        picked = _claim_next(options, sets, tasks, planned, warn) if env.is_main else None
        choice = broadcast(picked[:2] if picked else None, env)
        if choice is None:
            break
        job, indices = choice
        try:
            if env.is_main:
                n_sets = sum(i < len(sets) for i in indices)
                also = f" and {len(indices) - n_sets} lm-eval task(s)" if len(indices) > n_sets else ""
                print(f"cpt eval: claimed {job.target.identity} (step {job.target.step}): scoring "
                      f"{n_sets} set(s){also}", flush=True)
            rows = score_job(job, indices, sets, options, env, device, tasks)
            if env.is_main and rows is not None:
                _store(job, rows, warn)
                print(f"cpt eval: stored {len(rows)} row(s) of {job.target.identity} in {job.store.path}", flush=True)
        finally:
            if picked:
                picked[2].release()
        stored, skipped = stored + (rows is not None), skipped + (rows is None)
    if env.is_main:
        print(f"cpt eval: nothing left to score in {', '.join(options.targets)}: this job scored {stored} "
              f"checkpoint(s)" + (f", skipped {skipped} pruned meanwhile" if skipped else "") +
              "; the rest are scored or being scored by another job", flush=True)
    distributed.barrier()
    return EXIT_OK
