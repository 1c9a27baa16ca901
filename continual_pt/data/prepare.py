"""`cpt prepare`: tokenize raw sources once into a dataset directory of packed token shards.

    cpt prepare --source corpus/*.jsonl.zst --tokenizer EleutherAI/pythia-410m --out data/sp
    cpt prepare --source kjv --tokenizer data/tok --out data/kjv --workers 2
    cpt prepare --layout slimpajama --source /data/SlimPajama-627B --tokenizer EleutherAI/pythia-410m --out data/sp

The inputs split into tasks (one per input file, data/tasks.py); the parent reads each task's
chunks, a pool of processes parses and tokenizes them, and the parent writes each task's tokens
in chunk order and, once they are complete, its completion record; the merge (data/merge.py) then
writes the dataset from the tasks, so the bytes written depend neither on the number of workers nor
on where a run was stopped and resumed, and memory does not depend on the size of the corpus. Layout:

    <out>/manifest.json       written last; its presence marks the dataset complete
    <out>/tokenizer/          copy of the tokenizer (the dataset is self-contained)
    <out>/train/000000.bin    raw little-endian uint16/uint32 tokens, EOS after every document
    <out>/val/000000.bin      documents whose text hashes below --val-fraction (with --layout: the
                              corpus's own validation files, data/layouts.py)
    <out>/<split>/doc_ends.npy, doc_domains.npy
                              with --domain-field or --layout: each document's end and domain id, and
                              the manifest's per-domain counts (the format: data/domains.py)

A run stopped by SIGTERM or Ctrl-C (exit 75) or killed keeps its done tasks in its temporary
directory `<out>.tmp-<pid>`; the same command again does only the rest (data/resume.py), and
`cpt prepare --status OUT` says how far it is. Bad input (a broken record, a missing field,
documents without a domain) fails its task with one message naming the file and line; the output
only appears, renamed from the temporary directory, once every task is done and merged.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers

from continual_pt import __version__
from continual_pt.data import domains, encode, layouts, merge, output, resume, runner, sources, spread, tasks
from continual_pt.data.dataset import FORMAT_VERSION, MANIFEST
from continual_pt.data.options import PrepareOptions
from continual_pt.data.tokenizer import TOKENIZER_FILES, LoadedTokenizer, load_tokenizer
from continual_pt.errors import UserError
from continual_pt.layout import EXIT_OK, EXIT_RESUMABLE

TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "val")
DATASET = output.OutputKind(
    "a prepared dataset", MANIFEST,
    re.compile(rf"{re.escape(MANIFEST)}|{TOKENIZER_DIR}/({'|'.join(map(re.escape, TOKENIZER_FILES))})?"
               rf"|({'|'.join(SPLITS)})/(\d{{6,}}\.bin|{re.escape(domains.ENDS)}|{re.escape(domains.IDS)})?"))


def default_workers() -> int:
    """CPUs this process may use (respects affinity masks set by SLURM or taskset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def choose_dtype(requested: str, vocab_size: int, tokenizer: str) -> str:
    """The shard dtype: the requested one if every token id fits, else a UserError."""
    if requested == "auto":
        return "uint16" if vocab_size <= 1 << 16 else "uint32"
    limit = int(np.iinfo(encode.DTYPES[requested]).max)
    if vocab_size - 1 > limit:
        raise UserError(f"--dtype {requested} cannot hold token ids up to {vocab_size - 1} (tokenizer "
                        f"{tokenizer!r} has {vocab_size} ids); use --dtype uint32 or auto")
    return requested


@dataclass(frozen=True)
class SourcePlan:
    """What prepare reads: its sources, in order, and where each record's domain is."""

    sources: list
    domain_field: str | None
    layout: layouts.Layout | None

    @property
    def known_domains(self) -> tuple[str, ...]:
        layout = self.layout
        return layout.domains if layout and self.domain_field == layout.domain_field else ()


def plan_sources(options: PrepareOptions) -> SourcePlan:
    """Resolve and probe every source (or corpus folder of --layout); raises before anything is written."""
    layout = layouts.LAYOUT_TABLE[options.layout] if options.layout else None
    domain_field = options.domain_field or (layout.domain_field if layout else None)
    required = domain_field if options.unknown_domain is None else None
    if layout is None:
        srcs = sources.resolve_sources(options.sources, options.text_field, options.hf_split, options.hf_config,
                                       options.skip_unknown, required)
    else:
        srcs = [layouts.resolve_layout(spec, layout, options.skip_unknown) for spec in options.sources]
        for src in srcs:
            src.probe(options.text_field, required)
    return SourcePlan(srcs, domain_field, layout)


def _software() -> dict[str, str]:
    return {"continual_pt": __version__, "tokenizers": tokenizers.__version__, "numpy": np.__version__,
            "python": sys.version.split()[0]}


def _check_domains(plan: SourcePlan, options: PrepareOptions, totals: merge.Totals) -> None:
    """Documents without a domain fail the run, counted, unless --unknown-domain names theirs."""
    index = totals.index
    if index is not None and index.missing and options.unknown_domain is None:
        raise UserError(f"{index.missing_at}: no domain: the field {plan.domain_field!r} is missing, empty or not a "
                        f"string in {index.missing:,} document(s) (the first is here); fix them, or pass "
                        "--unknown-domain NAME (e.g. unknown) to put them under domain NAME")


def _domain_fields(plan: SourcePlan, options: PrepareOptions, totals: merge.Totals) -> dict[str, Any]:
    index = totals.index
    found: dict[str, Any] = {"domain_field": plan.domain_field, "domains": index.table.names if index else []}
    if index is not None:
        found.update(unknown_domain=options.unknown_domain, docs_without_domain=index.missing)
    found["layout"] = plan.layout.describe() if plan.layout else None
    return found


def _manifest(options: PrepareOptions, plan: SourcePlan, tok: LoadedTokenizer, dtype: str, shards: dict,
              totals: merge.Totals, fingerprints: list[dict[str, Any]], layout: list[dict[str, Any]]) -> dict[str, Any]:
    hashed = "val if blake2b(utf-8 text, digest_size=8) as little-endian int < val_fraction * 2**64"
    return {
        "format_version": FORMAT_VERSION,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tokenizer": {"name": tok.name, "sha256": tok.sha256, "dir": TOKENIZER_DIR, "eos_token": tok.eos_token},
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "dtype": dtype,
        "byte_order": "little",
        "document_separator": "eos_id after every document",
        "text_field": options.text_field,
        "val_fraction": None if plan.layout else options.val_fraction,
        "split_rule": plan.layout.split_rule if plan.layout else hashed,
        **_domain_fields(plan, options, totals),
        "splits": {s: {"num_tokens": totals.tokens[s], "num_docs": totals.docs[s], "shards": shards[s],
                       **totals.by_split.get(s, {})} for s in SPLITS},
        "skipped_docs": totals.skipped,
        "input_bytes": totals.nbytes,
        "sources": fingerprints,
        "tasks": layout,
        "args": asdict(options),
        "software": _software(),
    }


def _job(options: PrepareOptions, out: Path) -> tuple[runner.Job, list[tasks.Task], LoadedTokenizer, SourcePlan]:
    """Everything checked and resolved before anything is written: tokenizer, sources, tasks, plan."""
    output.check_destination(out, options.overwrite, DATASET)
    tok = load_tokenizer(options.tokenizer, options.eos_token)
    dtype = choose_dtype(options.dtype, tok.vocab_size, options.tokenizer)
    plan = plan_sources(options)
    for note in [] if options.quiet else sources.skipped_notes(plan.sources) + layouts.notes(plan.sources):
        print(note, file=sys.stderr)
    task_list = tasks.split_tasks(plan.sources)
    record = resume.plan_record(options, tok.sha256, dtype, task_list, plan.sources)
    init_args = (tok.tokenizer_json, tok.eos_id, dtype, options.val_fraction, options.text_field, plan.domain_field)
    job = runner.Job(Path(), plan.sources, record, init_args, dtype, options, plan.domain_field, plan.known_domains)
    return job, task_list, tok, plan


def prepare(options: PrepareOptions) -> dict[str, Any]:
    """Tokenize `options.sources` into the dataset directory `options.out`; returns its manifest.

    A stopped run's done tasks are kept and only the rest is done (data/resume.py)."""
    options.check()
    out = Path(options.out)
    job, task_list, tok, plan = _job(options, out)
    fingerprints = [s.fingerprint() for s in plan.sources]
    work, kept = resume.open_work(out, job.plan, task_list, options.overwrite)
    job = replace(job, work=work)
    try:
        manifest, run = _complete(job, task_list, tok, plan, fingerprints)
        resume.remove_tasks(work, task_list)
    except _Stopped as stop:
        stop.kept = _kept(work, task_list)
        raise
    except BaseException:
        if not tasks.done_records(work, len(task_list)) and not (work / MANIFEST).is_file():
            shutil.rmtree(work, ignore_errors=True)   # nothing to keep: nothing left, as before tasks
        raise
    output.commit_directory(work, out)
    if not options.quiet:
        _print_summary(out, manifest, run, kept)
    return manifest


def _complete(job: runner.Job, task_list: list[tasks.Task], tok: LoadedTokenizer, plan: SourcePlan,
              fingerprints: list[dict[str, Any]], run_missing: bool = True) -> tuple[dict[str, Any], runner.Run]:
    """Do the tasks not done (unless `run_missing` is False: the merge of a spread prepare), then merge
    them and write the manifest (unless a stopped run had)."""
    work, options = job.work, job.options
    if (work / MANIFEST).is_file():
        return tasks.read_json(work / MANIFEST), runner.Run()
    shutil.rmtree(work / TOKENIZER_DIR, ignore_errors=True)
    tok.copy_to(work / TOKENIZER_DIR)
    done = tasks.done_records(work, len(task_list))
    todo = [t for t in task_list if t.index not in done] if run_missing else []
    run = runner.run_tasks(job, todo, options.workers or default_workers()) if todo else runner.Run()
    records = tasks.done_records(work, len(task_list))
    failed = tasks.failed_records(work, len(task_list))
    if failed and not records:
        raise UserError(failed[min(failed)]["error"])
    try:
        merge.check_done(task_list, records, failed, plan.sources)
    except UserError as exc:
        raise UserError(f"{exc}; the {len(records)} done task(s) are kept in {work}: fix the input(s) and run the "
                        "same command again to do the rest") from None
    table = output.DomainTable(plan.domain_field, plan.known_domains, options.unknown_domain) \
        if plan.domain_field is not None else None
    shards, totals = merge.merge_tasks(work, task_list, records, job.dtype, options.shard_tokens, table)
    try:
        if sum(totals.docs.values()) == 0:
            raise UserError(f"empty input: no documents in {', '.join(options.sources)} "
                            f"(skipped: {totals.skipped or 'none'})")
        _check_domains(plan, options, totals)
    except UserError:
        shutil.rmtree(work, ignore_errors=True)   # the same command would fail again: keep nothing
        raise
    layout = [{"input": t.describe(plan.sources), "split": t.split, "num_tokens": sum(records[t.index]["tokens"].values()),
               "num_docs": sum(records[t.index]["docs"].values())} for t in task_list]
    manifest = _manifest(options, plan, tok, job.dtype, shards, totals, fingerprints, layout)
    tasks.write_json(work / MANIFEST, manifest)
    return manifest, run


def run_element(options: PrepareOptions, index: int, count: int) -> runner.Run:
    """Element `index` of `count` of a spread prepare (data/spread.py): its tasks not done, in the shared folder."""
    options.check()
    out = Path(options.out)
    job, task_list, _, _ = _job(options, out)
    work = spread.open_shared(out, job.plan, count, task_list)
    job = replace(job, work=work)
    own = spread.mine(task_list, index, count)
    before = tasks.done_records(work, len(task_list))
    todo = [t for t in own if t.index not in before]
    spread.clear(work, todo)
    try:
        run = runner.run_tasks(job, todo, options.workers or default_workers())
    except _Stopped as stop:
        stop.kept = spread.kept(work, own)
        raise
    done = tasks.done_records(work, len(task_list))
    if run.failed:
        raise UserError("; ".join(f"task {i} ({task_list[i].describe(job.srcs)}) failed: {message}"
                                  for i, message in sorted(run.failed.items()))
                        + f"; this element's other tasks are kept in {work}: fix the input(s) and run "
                        f"element {index} again (--task-index {index} --task-count {count})")
    if not options.quiet:
        rest = "all done: run the merge (the same command with --merge instead of --task-index/--task-count)" \
            if len(done) == len(task_list) else "the merge runs once every element is done"
        print(f"{out}: element {index} of {count}: {len(run.done)} task(s) done in this run, "
              f"{len(own) - len(todo)} done before, of its {len(own)}: {run.tokens:,} tokens in "
              f"{run.seconds:.1f} s; {len(done)} of {len(task_list)} task(s) done in {work}; {rest}")
    return run


def merge_spread(options: PrepareOptions) -> dict[str, Any]:
    """`cpt prepare --merge`: the dataset from the tasks that a job array did, once every one is done."""
    options.check()
    out = Path(options.out)
    job, task_list, tok, plan = _job(options, out)
    work = spread.shared_work(out)
    spread.check_mergeable(work, job.plan, task_list, plan.sources)
    job = replace(job, work=work)
    try:
        manifest, _ = _complete(job, task_list, tok, plan, [s.fingerprint() for s in plan.sources], run_missing=False)
        resume.remove_tasks(work, task_list)
    except _Stopped as stop:
        stop.kept = f"the {len(task_list)} done task(s) in {work} (the merge starts again)"
        raise
    output.commit_directory(work, out)
    if not options.quiet:
        print(f"{out}: merged {len(task_list)} task(s): " + "; ".join(
            f"{s}: {m['num_tokens']:,} tokens, {m['num_docs']:,} docs, {len(m['shards'])} shard(s)"
            for s, m in manifest["splits"].items()))
    return manifest


def _kept(work: Path, task_list: list[tasks.Task]) -> str:
    """What a stopped run keeps, in a few words; removes its directory when that is nothing."""
    if (work / MANIFEST).is_file():
        return f"the merged dataset in {work}"
    records = tasks.done_records(work, len(task_list))
    if not records:
        shutil.rmtree(work, ignore_errors=True)
        return f"0 of {len(task_list)} task(s)"
    tokens = sum(sum(r["tokens"].values()) for r in records.values())
    return f"{len(records)} of {len(task_list)} task(s) ({tokens:,} tokens) in {work}"


def _print_summary(out: Path, manifest: dict[str, Any], run: runner.Run, kept: int) -> None:
    seconds = max(run.seconds, 1e-9)
    parts = [f"{s}: {m['num_tokens']:,} tokens, {m['num_docs']:,} docs, {len(m['shards'])} shard(s)"
             for s, m in manifest["splits"].items()]
    print(f"{out}: " + "; ".join(parts))
    resumed = f", {kept} done before" if kept else ""
    print(f"{len(run.done)} task(s) of {len(manifest['tasks'])} done in this run{resumed}: {run.nbytes / 1e6:.1f} MB in "
          f"{seconds:.1f} s: {run.nbytes / 1e6 / seconds:.1f} MB/s, {run.tokens / seconds:,.0f} tokens/s "
          f"({manifest['dtype']}, skipped: {manifest['skipped_docs'] or 'none'})")
    if manifest["domains"]:
        train = manifest["splits"]["train"]
        shares = ", ".join(f"{name} {train['by_domain'][name]['num_tokens'] / max(1, train['num_tokens']):.1%}"
                           for name in manifest["domains"])
        without = manifest["docs_without_domain"]
        print(f"{len(manifest['domains'])} domains ({manifest['domain_field']}), train tokens: {shares}"
              + (f"; {without:,} document(s) without one under {manifest['unknown_domain']!r}" if without else ""))


class _Stopped(BaseException):
    """SIGTERM or Ctrl-C: unwinds the run (completed tasks stay); `kept` says what."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.kept = "nothing"


def _stop(signum: int, frame: Any) -> None:
    raise _Stopped(signum)


def run_prepare(options: PrepareOptions) -> int:
    """`cpt prepare` (and `cpt prepare --status OUT`)."""
    if options.status is not None:
        print("\n".join(resume.status(Path(options.status))))
        return EXIT_OK
    # SIGTERM (scancel, timeouts) and Ctrl-C unwind without a traceback, keeping the tasks done.
    previous = {signum: signal.signal(signum, _stop) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        if options.merge:
            merge_spread(options)
        elif (element := spread.share(options)) is not None:
            run_element(options, *element)
        else:
            prepare(options)
    except _Stopped as stop:
        print(f"cpt prepare: stopped by {signal.Signals(stop.signum).name}; kept {stop.kept}; run the same "
              "command again to do the rest", file=sys.stderr)
        return EXIT_RESUMABLE
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return EXIT_OK
