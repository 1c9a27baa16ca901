"""Benchmark `cpt prepare` against the usual Hugging Face recipe on the same jsonl corpus.

    python benchmarks/bench_prepare.py                 # 50 MB corpus, then `cpt prepare` again at 4x
    python benchmarks/bench_prepare.py --mb 200 --scale 2 --tokenizer path/to/tokenizer
    python benchmarks/bench_prepare.py --domains --mb 500 --doc-kb 2   # with and without --domain-field
    python benchmarks/bench_prepare.py --mb 40 --files 12 --baseline /tmp/old --repeat 3 --scale 1
    python benchmarks/bench_prepare.py --mb 40 --scale 3 --elements 4   # also spread over 4 processes + merge

`--baseline DIR` also runs the `cpt prepare` of another checkout (DIR holds its continual_pt/, e.g.
`git archive <commit> continual_pt | tar -x -C DIR`), alternated with this one's on the same
corpus; `--files N` writes the corpus as N files (N tasks of the task-based prepare); `--elements K`
(default 4) also runs the spread prepare: K processes `cpt prepare --task-index I --task-count K`
(one tokenizer each) at once, then `--merge`, and projects its per-core rate to 300B tokens on one
and on 16 nodes of 64 cores, with its peak RSS per element at the two corpus sizes. Besides wall
time, each row gives tokens per CPU second of the whole process tree: the per-core rate, which
other load on the machine distorts less than wall time.

The recipe is that of transformers' examples/pytorch/language-modeling/run_clm.py:
`load_dataset("json")`, `.map(tokenizer, batched=True, num_proc=N)`, then `.map(group_texts)`.
Both run in fresh subprocesses (interpreter start and imports included) with the same number
of processes; peak RSS is sampled over each whole process tree (shared pages of worker
processes are counted once per process, as `ps` does). The corpus is built offline from this
Python's standard library and the King James Bible, shuffled and repeated to the asked size;
each record carries a domain (`meta.redpajama_set_name`, one of SlimPajama's 7 names), read only
with `--domains`, which instead compares `cpt prepare` with and without `--domain-field` on the
same corpus: peak RSS (the domains' document index must cost no memory that grows) and tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
PYTHIA = REPO / "tests" / "fixtures" / "pythia-tokenizer"   # shipped with the repo (see its README.md)
DOMAINS = ("RedPajamaCommonCrawl", "RedPajamaC4", "RedPajamaGithub", "RedPajamaBook", "RedPajamaWikipedia",
           "RedPajamaArXiv", "RedPajamaStackExchange")

HF_RECIPE = r"""
import json, sys, time
from itertools import chain
import datasets, pyarrow.compute as pc
from transformers import AutoTokenizer
path, tok_dir, cache, nproc, block = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
datasets.disable_progress_bars()
tokenizer = AutoTokenizer.from_pretrained(tok_dir)
raw = datasets.load_dataset("json", data_files=path, split="train", cache_dir=cache)
def tokenize_function(examples):
    return tokenizer(examples["text"])
tokenized = raw.map(tokenize_function, batched=True, num_proc=nproc, remove_columns=raw.column_names)
def group_texts(examples):
    concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
    total_length = len(concatenated[list(examples.keys())[0]])
    total_length = (total_length // block) * block
    result = {k: [t[i : i + block] for i in range(0, total_length, block)] for k, t in concatenated.items()}
    result["labels"] = result["input_ids"].copy()
    return result
grouped = tokenized.map(group_texts, batched=True, num_proc=nproc)
tokens = pc.sum(pc.list_value_length(tokenized.data.column("input_ids"))).as_py()
print(json.dumps({"tokens": tokens, "blocks": grouped.num_rows}))
"""


def corpus_documents(doc_kb: float | None = None) -> list[str]:
    """Offline documents: standard-library sources and King James chapters (tens of MB), each cut at
    line ends into pieces of about `doc_kb` kB if given (web corpora's documents are a few kB)."""
    from continual_pt.data import sources

    docs = [d for d in sources.iter_documents([sources.StdlibSource(), sources.KJVSource()], "text") if d.strip()]
    if doc_kb is None:
        return docs
    pieces, size = [], int(doc_kb * 1000)
    for doc in docs:
        piece = ""
        for line in doc.splitlines(keepends=True):
            piece += line
            if len(piece) >= size:
                pieces.append(piece)
                piece = ""
        if piece.strip():
            pieces.append(piece)
    return pieces


def write_corpus(path: Path, docs: list[str], megabytes: float, seed: int = 0) -> int:
    """Write shuffled passes over `docs` as jsonl until `megabytes`; returns the bytes written."""
    rng = random.Random(seed)
    target, written, n = int(megabytes * 1e6), 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            order = list(range(len(docs)))
            rng.shuffle(order)
            for i in order:
                meta = {"redpajama_set_name": DOMAINS[n % len(DOMAINS)]}
                line = json.dumps({"text": docs[i], "id": n, "meta": meta}, ensure_ascii=False) + "\n"
                f.write(line)
                written += len(line.encode("utf-8"))
                n += 1
                if written >= target:
                    break
    return written


def measure(cmd: list[str], log: Path, cwd: Path = REPO, env: dict | None = None) -> dict:
    """Run `cmd`; its wall time, stdout and peak RSS of its process tree (sum) and of its largest process."""
    return measure_many([cmd], [log], cwd, env)[0]


def measure_many(cmds: list[list[str]], logs: list[Path], cwd: Path = REPO, env: dict | None = None) -> list[dict]:
    """Run `cmds` at once; each one's wall time, stdout and peak RSS of its process tree (sum) and of its
    largest process; "cpu" (the CPU seconds of all of them together) in the first."""
    peaks = [{"tree": 0, "largest": 0} for _ in cmds]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    errs = [open(log, "w") for log in logs]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=cwd, env=env)
             for cmd, err in zip(cmds, errs, strict=True)]
    done = threading.Event()

    def sample() -> None:
        roots = [psutil.Process(p.pid) for p in procs]
        while not done.is_set():
            for root, peak in zip(roots, peaks, strict=True):
                try:
                    rss = [p.memory_info().rss for p in [root, *root.children(recursive=True)]]
                except psutil.Error:
                    rss = []
                if rss:
                    peak["tree"] = max(peak["tree"], sum(rss))
                    peak["largest"] = max(peak["largest"], max(rss))
            done.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    results = []
    for proc, peak in zip(procs, peaks, strict=True):
        out, _ = proc.communicate()
        results.append({"seconds": time.perf_counter() - start, "stdout": out, **peak})
    done.set()
    sampler.join()
    for err in errs:
        err.close()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds of the whole tree (workers are reaped by their parent before it exits): a
    # measure of work that other load on the machine distorts less than wall time.
    results[0]["cpu"] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    for cmd, proc, log in zip(cmds, procs, logs, strict=True):
        if proc.returncode:
            sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{log.read_text()[-3000:]}")
    return results


def run_ours(corpus: Path, tokenizer: str, out: Path, workers: int, extra: tuple[str, ...] = (),
             checkout: Path | None = None) -> dict:
    """`cpt prepare` in a subprocess (of another checkout's package: `checkout`); tokens from its manifest."""
    env = None if checkout is None else {**os.environ, "PYTHONPATH": str(checkout)}
    result = measure([sys.executable, "-m", "continual_pt.cli", "prepare", "-s", str(corpus), "-t", tokenizer,
                      "-o", str(out), "--workers", str(workers), "--quiet", *extra], out.with_suffix(".log"),
                     cwd=checkout or REPO, env=env)
    manifest = json.loads((out / "manifest.json").read_text())
    result["tokens"] = sum(s["num_tokens"] for s in manifest["splits"].values())
    return result


def run_spread(corpus: Path, tokenizer: str, out: Path, elements: int) -> dict:
    """`cpt prepare --task-index I --task-count N` as N processes at once (one tokenizer each: --workers 1),
    then `--merge`; the wall time and CPU of both, the elements' largest peak RSS and the merge's."""
    argv = [sys.executable, "-m", "continual_pt.cli", "prepare", "-s", str(corpus), "-t", tokenizer, "-o", str(out),
            "--quiet"]
    runs = measure_many([[*argv, "--workers", "1", "--task-index", str(i), "--task-count", str(elements)]
                         for i in range(elements)], [out.with_name(f"{out.name}-{i}.log") for i in range(elements)])
    merged = measure([*argv, "--merge"], out.with_name(f"{out.name}-merge.log"))
    manifest = json.loads((out / "manifest.json").read_text())
    tokens = sum(s["num_tokens"] for s in manifest["splits"].values())
    task_peak = max(r["tree"] for r in runs)
    return {"seconds": max(r["seconds"] for r in runs) + merged["seconds"], "cpu": runs[0]["cpu"] + merged["cpu"],
            "tree": task_peak, "largest": max(r["largest"] for r in runs), "tokens": tokens,
            "merge_seconds": merged["seconds"], "merge_cpu": merged["cpu"], "merge_rss": merged["tree"],
            "elements_cpu": runs[0]["cpu"], "shard_bytes": sum(f.stat().st_size for f in out.glob("*/*.bin"))}


def run_recipe(corpus: Path, tokenizer: str, work: Path, workers: int, block: int) -> dict:
    """The run_clm.py recipe in a subprocess with a fresh cache; tokens as it counts them (no EOS)."""
    work.mkdir()
    files = str(corpus / "*.jsonl") if corpus.is_dir() else str(corpus)
    result = measure([sys.executable, "-c", HF_RECIPE, files, tokenizer, str(work / "hf-cache"),
                      str(workers), str(block)], work / "hf.log")
    result["tokens"] = json.loads(result["stdout"].strip().splitlines()[-1])["tokens"]
    return result


def train_tokenizer(work: Path) -> str:
    """A byte-level BPE trained on kjv, when the Pythia fixture is absent."""
    out = work / "bpe"
    subprocess.run([sys.executable, "-m", "continual_pt.cli", "tokenizer", "train", "-s", "kjv", "--vocab-size",
                    "16384", "-o", str(out), "-q"], check=True, cwd=REPO)
    return str(out)


def row(name: str, r: dict, nbytes: int) -> str:
    """One line of the results table."""
    mb, s = nbytes / 1e6, r["seconds"]
    return (f"{name:<28}{mb:>6.0f}{s:>9.1f}{mb / s:>8.2f}{r['tokens'] / s / 1e6:>9.3f}{r['cpu']:>8.1f}"
            f"{r['tokens'] / r['cpu'] / 1e6:>12.3f}{r['tree'] / 2**20:>15.0f}{r['largest'] / 2**20:>14.0f}")


HEADER = (f"{'pipeline':<28}{'MB':>6}{'wall s':>9}{'MB/s':>8}{'Mtok/s':>9}{'CPU s':>8}{'Mtok/CPU-s':>12}"
          f"{'peak RSS MiB':>15}{'largest proc':>14}")


def split_corpus(path: Path, files: int) -> Path:
    """The corpus as `files` jsonl files of about equal size in a folder beside it, in order."""
    folder = path.with_suffix("")
    folder.mkdir()
    data = path.read_bytes()
    start = 0
    for i in range(files):
        end = len(data) if i == files - 1 else data.index(b"\n", (i + 1) * len(data) // files) + 1
        (folder / f"part{i:03d}.jsonl").write_bytes(data[start:end])
        start = end
    path.unlink()
    return folder


def main() -> None:
    """Build the corpus, run both pipelines, print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=50, help="corpus size in MB of jsonl (default 50)")
    parser.add_argument("--scale", type=int, default=4, help="also run cpt prepare on a corpus this many times "
                                                             "larger, to show its memory does not grow (default 4)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer folder (default: the Pythia fixture if present, else a BPE trained on kjv)")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                        help="processes for both pipelines (default: all CPUs)")
    parser.add_argument("--block", type=int, default=2048, help="group_texts block size of the recipe")
    parser.add_argument("--repeat", type=int, default=1,
                        help="alternate the two pipelines this many times and keep each one's best run "
                             "(steadier numbers on a busy machine)")
    parser.add_argument("--domains", action="store_true",
                        help="compare cpt prepare with and without --domain-field meta.redpajama_set_name instead")
    parser.add_argument("--files", type=int, default=12,
                        help="write the corpus as this many files (tasks of the task-based prepare; default 12)")
    parser.add_argument("--elements", type=int, default=4,
                        help="processes of the spread prepare (--task-index I --task-count N, one tokenizer "
                             "each, then --merge; default 4; 0 leaves it out)")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="a checkout (folder holding continual_pt/) whose cpt prepare also runs, alternated")
    parser.add_argument("--doc-kb", type=float, default=None,
                        help="with --domains: cut documents into pieces of about this many kB (many small "
                             "documents: the most work per byte for the document index)")
    args = parser.parse_args()
    if args.domains:
        compare_domains(args)
        return

    with tempfile.TemporaryDirectory(prefix="bench_prepare_") as tmp:
        work = Path(tmp)
        tokenizer = tokenizer_for(args, work)
        docs = corpus_documents()
        small, large = work / "corpus.jsonl", work / f"corpus_x{args.scale}.jsonl"
        small_bytes = write_corpus(small, docs, args.mb)
        large_bytes = write_corpus(large, docs, args.mb * args.scale) if args.scale > 1 else 0
        if args.files > 1:
            small = split_corpus(small, args.files)
            large = split_corpus(large, args.files) if large_bytes else large
        print(f"corpus: {small_bytes / 1e6:.0f} MB jsonl (and {large_bytes / 1e6:.0f} MB), tokenizer "
              f"{tokenizer}, {args.workers} processes each, {psutil.cpu_count()} CPUs, load average "
              f"{os.getloadavg()[0]:.1f} (other work on the machine skews both timings)", flush=True)
        runs: dict[str, list[dict]] = {"ours": [], "recipe": [], "baseline": [], "spread": []}
        for i in range(args.repeat):
            runs["ours"].append(run_ours(small, tokenizer, work / f"ours{i}", args.workers))
            if args.elements:
                runs["spread"].append(run_spread(small, tokenizer, work / f"spread{i}", args.elements))
            if args.baseline:
                runs["baseline"].append(run_ours(small, tokenizer, work / f"base{i}", args.workers,
                                                 checkout=args.baseline.resolve()))
            runs["recipe"].append(run_recipe(small, tokenizer, work / f"recipe{i}", args.workers, args.block))
        ours, recipe, base, spread = (min(r, key=lambda x: x["seconds"]) if r else None for r in runs.values())
        big = run_ours(large, tokenizer, work / "ours_large", args.workers) if large_bytes else None
        big_spread = run_spread(large, tokenizer, work / "spread_large", args.elements) \
            if large_bytes and args.elements else None
        load = os.getloadavg()
        copy = copy_rate(work / ("spread_large" if big_spread else "spread0")) if spread else 0.0

    print(f"\n{HEADER}")
    print(row(f"cpt prepare ({args.files} file(s))", ours, small_bytes))
    if base:
        print(row("cpt prepare (baseline)", base, small_bytes))
    print(row("HF datasets recipe", recipe, small_bytes))
    if spread:
        print(row(f"cpt prepare, {args.elements} elements", spread, small_bytes))
    if big:
        print(row(f"cpt prepare ({args.scale}x corpus)", big, large_bytes))
    if big_spread:
        print(row(f"{args.elements} elements ({args.scale}x corpus)", big_spread, large_bytes))
    if spread:
        print_spread(args, ours, spread, big, big_spread, load, copy)
    print(f"\nspeed: cpt prepare is {recipe['seconds'] / ours['seconds']:.2f}x the recipe in wall time, "
          f"{recipe['cpu'] / ours['cpu']:.2f}x in CPU time "
          f"(tokens: {ours['tokens']:,} incl. one EOS per document vs {recipe['tokens']:,})")
    if base:
        pairs = ", ".join(f"{b['cpu'] / o['cpu']:.3f}" for o, b in zip(runs["ours"], runs["baseline"], strict=True))
        print(f"against the baseline {args.baseline}: {base['seconds'] / ours['seconds']:.3f}x in wall time (best of "
              f"{args.repeat}), {ours['tokens'] / ours['cpu'] / (base['tokens'] / base['cpu']):.3f}x in tokens per CPU "
              f"second (baseline CPU / ours, run by run: {pairs})")
    print(f"peak RSS: cpt prepare {ours['tree'] / 2**20:.0f} MiB vs recipe {recipe['tree'] / 2**20:.0f} MiB "
          f"({recipe['tree'] / ours['tree']:.1f}x)")
    if big:
        print(f"cpt prepare peak RSS at {args.scale}x the corpus: {big['tree'] / ours['tree']:.2f}x "
              f"({ours['tree'] / 2**20:.0f} -> {big['tree'] / 2**20:.0f} MiB)")


def copy_rate(folder: Path) -> float:
    """Bytes per second of copying `folder`'s shards as the merge does (8 MB reads, written, fsynced)."""
    start, nbytes = time.perf_counter(), 0
    for shard in sorted(folder.glob("*/*.bin")):
        target = shard.with_name(shard.name + ".copy")
        with open(shard, "rb") as src, open(target, "wb") as dst:
            while block := src.read(8 << 20):
                dst.write(block)
                nbytes += len(block)
            dst.flush()
            os.fsync(dst.fileno())
        target.unlink()
    return nbytes / (time.perf_counter() - start)


def marginal(small: dict, big: dict) -> float:
    """Tokens per CPU second between two corpus sizes: what one more token costs, without the start-up
    (imports, tokenizer load, plan) that a run of hours makes negligible and a run of seconds does not."""
    return (big["tokens"] - small["tokens"]) / max(big["cpu"] - small["cpu"], 1e-9)


def print_spread(args: argparse.Namespace, ours: dict, spread: dict, big: dict | None, big_spread: dict | None,
                 load: tuple, copy: float) -> None:
    """The spread prepare against the one-process one, and what its per-core rate projects for 300B tokens."""
    basis, one = (big_spread, big) if big_spread and big else (spread, ours)
    rate, one_rate = basis["tokens"] / basis["cpu"], one["tokens"] / one["cpu"]
    print(f"\nper CPU second on the {basis['tokens'] / 1e6:.1f}M-token corpus, start-up included: spread prepare "
          f"({args.elements} elements + merge) {rate / 1e6:.3f} Mtok, one-process prepare {one_rate / 1e6:.3f} Mtok "
          f"({rate / one_rate:.3f}x)")
    if big_spread and big:
        rate, one_rate = marginal(spread, big_spread), marginal(ours, big)
        print(f"per CPU second between the two sizes (start-up excluded): spread prepare {rate / 1e6:.3f} Mtok, "
              f"one-process prepare {one_rate / 1e6:.3f} Mtok ({rate / one_rate:.3f}x)")
        print(f"peak RSS per element: {spread['tree'] / 2**20:.0f} MiB at {args.mb:.0f} MB, "
              f"{big_spread['tree'] / 2**20:.0f} MiB at {args.mb * args.scale:.0f} MB "
              f"({big_spread['tree'] / spread['tree']:.2f}x)")
    print(f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} at the end. The merge: "
          f"{basis['merge_seconds']:.1f} s, peak RSS {basis['merge_rss'] / 2**20:.0f} MiB; copying its shards as it "
          f"does: {copy / 1e6:.0f} MB/s")
    tokens = 300e9
    per_token = basis["shard_bytes"] / basis["tokens"]
    print(f"projected for {tokens / 1e9:.0f}B tokens at {rate / 1e6:.3f} Mtok per CPU second: one 64-core node "
          f"{tokens / (rate * 64) / 3600:.1f} h, 16 such nodes {tokens / (rate * 64 * 16) / 3600:.2f} h, then the "
          f"merge {tokens * per_token / copy / 3600:.2f} h at that copy rate; shards {tokens * per_token / 1e9:.0f} GB "
          f"({per_token:.2f} bytes a token), twice that until the merge has removed the tasks' copies")


def tokenizer_for(args: argparse.Namespace, work: Path) -> str:
    """--tokenizer, else the Pythia tokenizer the repository ships, else one trained into `work`."""
    return args.tokenizer or (str(PYTHIA) if PYTHIA.is_dir() else train_tokenizer(work))


def compare_domains(args: argparse.Namespace) -> None:
    """`cpt prepare` of one corpus without and with --domain-field, alternated --repeat times (best of each)."""
    with tempfile.TemporaryDirectory(prefix="bench_prepare_") as tmp:
        work = Path(tmp)
        tokenizer = tokenizer_for(args, work)
        corpus = work / "corpus.jsonl"
        nbytes = write_corpus(corpus, corpus_documents(args.doc_kb), args.mb)
        print(f"corpus: {nbytes / 1e6:.0f} MB jsonl, {len(DOMAINS)} domains, documents "
              f"{f'of about {args.doc_kb} kB' if args.doc_kb else 'whole'}, tokenizer {tokenizer}, {args.workers} "
              f"processes, {psutil.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)
        runs: dict[str, list[dict]] = {"plain": [], "domains": []}
        for i in range(args.repeat):
            runs["plain"].append(run_ours(corpus, tokenizer, work / f"plain{i}", args.workers))
            runs["domains"].append(run_ours(corpus, tokenizer, work / f"domains{i}", args.workers,
                                            ("--domain-field", "meta.redpajama_set_name")))
            index = sum(f.stat().st_size for f in (work / f"domains{i}").glob("*/doc_*.npy"))
            shutil.rmtree(work / f"plain{i}")
            shutil.rmtree(work / f"domains{i}")
        plain, with_domains = (min(r, key=lambda x: x["seconds"]) for r in runs.values())
    print(f"\n{HEADER}")
    print(row("cpt prepare", plain, nbytes))
    print(row("cpt prepare --domain-field", with_domains, nbytes))
    print(f"\nwith domains: peak RSS {with_domains['tree'] / plain['tree']:.3f}x (largest process "
          f"{with_domains['largest'] / plain['largest']:.3f}x), tokens/s {plain['seconds'] / with_domains['seconds']:.3f}x, "
          f"document index {index / 1e6:.2f} MB beside {plain['tokens'] * 2 / 1e6:.0f} MB of tokens")


if __name__ == "__main__":
    main()
