"""`cpt prepare`: tokenize raw sources once into a dataset directory of packed token shards.

    cpt prepare --source corpus/*.jsonl.zst --tokenizer EleutherAI/pythia-410m --out data/sp
    cpt prepare --source kjv --tokenizer data/tok --out data/kjv --workers 2
    cpt prepare --layout slimpajama --source /data/SlimPajama-627B --tokenizer EleutherAI/pythia-410m --out data/sp

The parent process reads sources in chunks, a pool of processes parses and tokenizes them,
and the parent writes their tokens in chunk order, so the bytes written do not depend on the
number of workers and memory does not depend on the size of the corpus. Layout:

    <out>/manifest.json       written last; its presence marks the dataset complete
    <out>/tokenizer/          copy of the tokenizer (the dataset is self-contained)
    <out>/train/000000.bin    raw little-endian uint16/uint32 tokens, EOS after every document
    <out>/val/000000.bin      documents whose text hashes below --val-fraction (with --layout: the
                              corpus's own validation files, data/layouts.py)
    <out>/<split>/doc_ends.npy, doc_domains.npy
                              with --domain-field or --layout: each document's end and domain id, and
                              the manifest's per-domain counts (the format: data/domains.py)

Bad input (a broken record, a missing field, documents without a domain) fails the run with one
message naming the file and line before anything is in place: the output only appears, renamed
from its temporary directory, once every document is read.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
from tqdm import tqdm

from continual_pt import __version__
from continual_pt.data import domains, encode, layouts, output, sources
from continual_pt.data.dataset import FORMAT_VERSION, MANIFEST
from continual_pt.data.options import PrepareOptions
from continual_pt.data.tokenizer import TOKENIZER_FILES, LoadedTokenizer, load_tokenizer
from continual_pt.errors import UserError
from continual_pt.layout import EXIT_OK

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


@dataclass
class _Totals:
    tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    docs: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    skipped: dict[str, int] = field(default_factory=dict)
    nbytes: int = 0
    seconds: float = 0.0
    index: output.DomainWriter | None = None
    """With domains: the document index written, its missing-domain count and the domain table."""
    by_split: dict[str, dict[str, Any]] = field(default_factory=dict)
    """With domains: each split's manifest entries ("by_domain", "documents")."""


@dataclass(frozen=True)
class _Plan:
    """What prepare reads: its sources, in order, and where each record's domain is."""

    sources: list
    domain_field: str | None
    layout: layouts.Layout | None

    @property
    def known_domains(self) -> tuple[str, ...]:
        layout = self.layout
        return layout.domains if layout and self.domain_field == layout.domain_field else ()


def _plan(options: PrepareOptions) -> _Plan:
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
    return _Plan(srcs, domain_field, layout)


def _encoded(chunks: Iterator[encode.Chunk], workers: int, init_args: tuple) -> Iterator[encode.Encoded]:
    """Encoded chunks in input order, at most 2 x workers of them in flight (bounded memory)."""
    if workers == 1:
        encode.init_worker(*init_args, parent_pid=None)
        yield from map(encode.encode_chunk, chunks)
        return
    # spawn: the parent may hold threads (tqdm, torch) that make fork unsafe. An executor rather
    # than multiprocessing.Pool: a worker killed by the OOM killer fails the run instead of hanging it.
    executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=partial(encode.init_worker, parent_pid=os.getpid()),
                                   initargs=init_args)
    try:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(executor.submit(encode.encode_chunk, chunk))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool:
        raise UserError("a tokenizer process died (out of memory?); run again with fewer --workers") from None
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def _tokenize(plan: _Plan, tok: LoadedTokenizer, dtype: str, options: PrepareOptions, root: Path):
    """Stream every source through the workers into shard writers (and the document index, with
    domains); returns (shards, totals)."""
    writers = {s: output.ShardWriter(root, s, encode.DTYPES[dtype], options.shard_tokens) for s in SPLITS}
    totals = _Totals()
    if plan.domain_field is not None:
        table = output.DomainTable(plan.domain_field, plan.known_domains, options.unknown_domain)
        totals.index = output.DomainWriter(root, SPLITS, table)
    init_args = (tok.tokenizer_json, tok.eos_id, dtype, options.val_fraction, options.text_field, plan.domain_field)
    workers = options.workers or default_workers()
    start = time.perf_counter()
    with tqdm(desc="tokenizing", unit="tok", unit_scale=True, disable=options.quiet, smoothing=0.1) as bar:
        chunks = sources.iter_chunks(plan.sources, options.text_field, sources.CHUNK_BYTES, plan.domain_field)
        for enc in _encoded(chunks, workers, init_args):
            for split in SPLITS:
                writers[split].write(enc.tokens[split])
                totals.tokens[split] += len(enc.tokens[split])
                totals.docs[split] += enc.docs[split]
            if totals.index is not None:
                totals.index.add(enc.domain_names, enc.doc_tokens, enc.doc_domains, enc.missing_domain, enc.missing_at)
            for key, n in enc.skipped.items():
                totals.skipped[key] = totals.skipped.get(key, 0) + n
            totals.nbytes += enc.nbytes
            bar.update(sum(len(t) for t in enc.tokens.values()))
            bar.set_postfix_str(f"{totals.nbytes / 1e6:.0f} MB, {sum(totals.docs.values())} docs", refresh=False)
    totals.seconds = time.perf_counter() - start
    if totals.index is not None:
        totals.by_split = totals.index.finish()
    return {s: w.finish() for s, w in writers.items()}, totals


def _software() -> dict[str, str]:
    return {"continual_pt": __version__, "tokenizers": tokenizers.__version__, "numpy": np.__version__,
            "python": sys.version.split()[0]}


def _check_domains(plan: _Plan, options: PrepareOptions, totals: _Totals) -> None:
    """Documents without a domain fail the run, counted, unless --unknown-domain names theirs."""
    index = totals.index
    if index is not None and index.missing and options.unknown_domain is None:
        raise UserError(f"{index.missing_at}: no domain: the field {plan.domain_field!r} is missing, empty or not a "
                        f"string in {index.missing:,} document(s) (the first is here); fix them, or pass "
                        "--unknown-domain NAME (e.g. unknown) to put them under domain NAME")


def _domain_fields(plan: _Plan, options: PrepareOptions, totals: _Totals) -> dict[str, Any]:
    index = totals.index
    found: dict[str, Any] = {"domain_field": plan.domain_field, "domains": index.table.names if index else []}
    if index is not None:
        found.update(unknown_domain=options.unknown_domain, docs_without_domain=index.missing)
    found["layout"] = plan.layout.describe() if plan.layout else None
    return found


def _manifest(options: PrepareOptions, plan: _Plan, tok: LoadedTokenizer, dtype: str, shards: dict,
              totals: _Totals, fingerprints: list[dict[str, Any]]) -> dict[str, Any]:
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
        "args": asdict(options),
        "software": _software(),
    }


def prepare(options: PrepareOptions) -> dict[str, Any]:
    """Tokenize `options.sources` into the dataset directory `options.out`; returns its manifest."""
    options.check()
    out = Path(options.out)
    output.check_destination(out, options.overwrite, DATASET)
    tok = load_tokenizer(options.tokenizer, options.eos_token)
    dtype = choose_dtype(options.dtype, tok.vocab_size, options.tokenizer)
    plan = _plan(options)
    for note in [] if options.quiet else sources.skipped_notes(plan.sources) + layouts.notes(plan.sources):
        print(note, file=sys.stderr)
    fingerprints = [s.fingerprint() for s in plan.sources]
    with output.atomic_directory(out, options.overwrite) as tmp:
        tok.copy_to(tmp / TOKENIZER_DIR)
        shards, totals = _tokenize(plan, tok, dtype, options, tmp)
        if sum(totals.docs.values()) == 0:
            raise UserError(f"empty input: no documents in {', '.join(options.sources)} "
                            f"(skipped: {totals.skipped or 'none'})")
        _check_domains(plan, options, totals)
        manifest = _manifest(options, plan, tok, dtype, shards, totals, fingerprints)
        with open(tmp / MANIFEST, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
    if not options.quiet:
        _print_summary(out, manifest, totals)
    return manifest


def _print_summary(out: Path, manifest: dict[str, Any], totals: _Totals) -> None:
    seconds = max(totals.seconds, 1e-9)
    tokens = sum(totals.tokens.values())
    parts = [f"{s}: {m['num_tokens']:,} tokens, {m['num_docs']:,} docs, {len(m['shards'])} shard(s)"
             for s, m in manifest["splits"].items()]
    print(f"{out}: " + "; ".join(parts))
    print(f"{totals.nbytes / 1e6:.1f} MB in {seconds:.1f} s: {totals.nbytes / 1e6 / seconds:.1f} MB/s, "
          f"{tokens / seconds:,.0f} tokens/s ({manifest['dtype']}, skipped: {totals.skipped or 'none'})")
    if manifest["domains"]:
        train = manifest["splits"]["train"]
        shares = ", ".join(f"{name} {train['by_domain'][name]['num_tokens'] / max(1, train['num_tokens']):.1%}"
                           for name in manifest["domains"])
        without = manifest["docs_without_domain"]
        print(f"{len(manifest['domains'])} domains ({manifest['domain_field']}), train tokens: {shares}"
              + (f"; {without:,} document(s) without one under {manifest['unknown_domain']!r}" if without else ""))


def _stop(signum: int, frame: Any) -> None:
    print(f"cpt prepare: stopped by {signal.Signals(signum).name}; the unfinished output is removed",
          file=sys.stderr)
    sys.exit(128 + signum)


def run_prepare(options: PrepareOptions) -> int:
    """`cpt prepare`."""
    # SIGTERM (scancel, timeouts) and Ctrl-C unwind without a traceback, removing the temporary directory.
    previous = {signum: signal.signal(signum, _stop) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        prepare(options)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return EXIT_OK
