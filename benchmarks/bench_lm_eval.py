"""Benchmark `cpt eval --lm-eval` on a checkpoint against lm-evaluation-harness's own CLI on the
checkpoint's `cpt export` folder: the whole command, as a user runs each, paired and alternating.

    python benchmarks/bench_lm_eval.py                       # GPT-NeoX 256 x 4 layers, 2 local tasks, 3 pairs
    python benchmarks/bench_lm_eval.py --hidden 512 --layers 8 --docs 400 --repeats 5

Both commands score the same weights (fp32) on the same offline tasks (written here: a multiple-choice
task and a rolling-perplexity task over local JSON files, so that no network is needed) with the same
batch size, one process each, one thread each (OMP_NUM_THREADS=1, so that the pair is not a contest for
the cores). Ours loads the checkpoint as it is (ZeRO files), theirs the exported folder: the export
itself is not timed (it is what a user no longer has to write). The metrics of the two are compared
too: a ratio of times means nothing if they scored different things.

When every task is in --include-path, `cpt eval` indexes only those folders, where the CLI indexes the
harness's ~15,000 built-in task YAMLs too (seconds). A third command, `cpt eval` made to index them as
well, is what a harness task such as hellaswag costs (which needs its data, so cannot run offline here).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

# bench_train lies beside this file; put its folder on the path however this file is run
# (`python benchmarks/bench_lm_eval.py` does it, runpy and importers do not)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import prepare_data  # noqa: E402  (the tokenizer and kjv data bench_train uses)

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the lord said unto him that he shall go and the people of israel were in the land "
         "which god had given them for an inheritance").split()


def train_checkpoint(args: argparse.Namespace, work: Path, data: Path) -> Path:
    """A checkpoint of a model of the asked shape after a few steps of `cpt train` (its final save)."""
    raw = {"name": "bench", "out_dir": str(work / "runs"),
           "model": {"config": {"hidden_size": args.hidden, "num_hidden_layers": args.layers,
                                "num_attention_heads": args.heads, "intermediate_size": 4 * args.hidden}},
           "data": {"train": {"kjv": {"path": str(data)}}, "seq_len": args.seq_len, "seed": 0},
           "schedule": {"name": "constant", "max_lr": 1e-3, "warmup": 0},
           "train": {"max_steps": 4, "micro_batch_size": 2, "grad_accum": 1, "precision": "fp32",
                     "ds_config": "zero0", "log_every": 1},
           "eval": {"sets": {}, "at_start": False}, "checkpoint": {"every_steps": 0}}
    cfg = work / "bench.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    subprocess.run([sys.executable, "-m", "continual_pt.cli", "train", "--config", str(cfg)], check=True,
                   cwd=REPO, env=environment(), stdout=subprocess.DEVNULL)
    return work / "runs" / "bench" / "checkpoints" / "global_step4"


def write_tasks(folder: Path, docs: int) -> list[str]:
    """bench_mc (multiple choice, `docs` documents) and bench_ppl (rolling perplexity, docs / 4)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    with open(folder / "mc.jsonl", "w") as f:
        for _ in range(docs):
            f.write(json.dumps({"question": " ".join(rng.choice(WORDS) for _ in range(12)),
                                "choices": [" ".join(rng.choice(WORDS) for _ in range(3)) for _ in range(4)],
                                "answer": rng.randrange(4)}) + "\n")
    with open(folder / "ppl.jsonl", "w") as f:
        for _ in range(max(1, docs // 4)):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(200))}) + "\n")
    common = "test_split: test\nmetadata:\n  version: 1.0\n"
    (folder / "bench_mc.yaml").write_text(
        f"task: bench_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: \"{{question}}\"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: \"{{answer}}\"\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n" + common)
    (folder / "bench_ppl.yaml").write_text(
        f"task: bench_ppl\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'ppl.jsonl'}\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n" + common)
    return ["bench_mc", "bench_ppl"]


def environment() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    proc = subprocess.run(command, env=environment(), capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"{command[0]} failed:\n{proc.stderr[-3000:]}")
    return seconds


FULL_INDEX = ("import sys; from continual_pt.evaluation import harness; index = harness._manager; "
              "harness._manager = lambda paths, local=False: index(paths); "
              "from continual_pt.cli import launched_main; sys.exit(launched_main('eval'))")


def commands(ckpt: Path, export: Path, tasks: Path, names: list[str], batch: int, work: Path, i: int):
    store = work / f"scores-{i}.jsonl"
    args = [str(ckpt), "--lm-eval", ",".join(names), "--include-path", str(tasks), "--lm-eval-batch-size",
            str(batch)]
    ours = [sys.executable, "-m", "continual_pt.evaluate", *args, "--store", str(store)]
    full = [sys.executable, "-c", FULL_INDEX, *args, "--store", str(work / f"scores-full-{i}.jsonl")]
    theirs = [os.path.join(os.path.dirname(sys.executable), "lm_eval"), "--model", "hf", "--model_args",
              f"pretrained={export},dtype=float32", "--tasks", ",".join(names), "--include_path", str(tasks),
              "--device", "cpu", "--batch_size", str(batch), "--output_path", str(work / f"cli-{i}")]
    return store, ours, full, theirs


def same_metrics(store: Path, cli: Path) -> bool:
    rows = {r["task"]: r for r in map(json.loads, store.read_text().splitlines())}
    theirs = json.loads(next(cli.rglob("results_*.json")).read_text())["results"]
    return all(f"{rows[t]['metrics'][k.split(',')[0]]:.4f}" == f"{v:.4f}"
               for t, entry in theirs.items() for k, v in entry.items()
               if k.endswith(",none") and "_stderr" not in k)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--docs", type=int, default=200, help="documents of the multiple-choice task")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3, help="pairs, alternating which goes first")
    p.add_argument("--work", help="folder to keep (default: a temporary one)")
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_lm_eval_"))
    sys.path.insert(0, str(REPO))
    data = Path(prepare_data(work, args.vocab))
    ckpt = train_checkpoint(args, work, data)
    export = work / "export"
    subprocess.run([sys.executable, "-m", "continual_pt.cli", "export", str(ckpt), "--out", str(export)],
                   check=True, env=environment(), stdout=subprocess.DEVNULL)
    names = write_tasks(work / "tasks", args.docs)
    times: dict[str, list[float]] = {"cpt eval --lm-eval": [], "lm_eval CLI on the export": [],
                                     "cpt eval, full task index": []}
    for i in range(args.repeats):
        store, ours, full, theirs = commands(ckpt, export, work / "tasks", names, args.batch_size, work, i)
        pair = [("cpt eval --lm-eval", ours), ("lm_eval CLI on the export", theirs), ("cpt eval, full task index", full)]
        for name, command in (pair if i % 2 == 0 else pair[::-1]):
            times[name].append(timed(command))
        if not same_metrics(store, work / f"cli-{i}"):
            sys.exit("the two commands gave different metrics")
    a, b, c = (statistics.median(v) for v in times.values())
    print(f"model {args.hidden}x{args.layers} (vocab {args.vocab}), tasks {', '.join(names)} "
          f"({args.docs} + {max(1, args.docs // 4)} docs), batch {args.batch_size}, {args.repeats} pairs, 1 thread")
    for name, values in times.items():
        print(f"  {name:28s} median {statistics.median(values):6.2f} s  ({', '.join(f'{v:.2f}' for v in values)})")
    for label, mine in (("cpt", times["cpt eval --lm-eval"]), ("cpt full index", times["cpt eval, full task index"])):
        ratios = [x / y for x, y in zip(mine, times["lm_eval CLI on the export"])]
        print(f"  ratio {label} / lm_eval: median of pairs {statistics.median(ratios):.3f} "
              f"({', '.join(f'{r:.3f}' for r in ratios)})")
    print(f"  medians: {a:.2f} / {b:.2f} / {c:.2f} s; metrics equal to the printed 4 decimals")


if __name__ == "__main__":
    main()
