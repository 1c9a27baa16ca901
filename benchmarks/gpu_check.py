"""GPU check: train the Pythia-410M shape (from config, seq 2048, bf16, ZeRO 2) and report tokens/s and MFU.

    python benchmarks/gpu_check.py --tokenizer path/to/pythia-tokenizer [--steps 50] [--micro-batch 16]

Prepares a corpus from this Python's standard library (no network), measures a bf16 matmul
peak, runs `python -m continual_pt.train` on configs/pythia-410m-gpu-check.yaml, and prints
the steady-state tokens/s (records after the first `--warmup-records`) with MFU against the
card's spec peak and against the measured matmul peak.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def matmul_peak_tflops(n: int = 8192, reps: int = 10) -> float:
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def prepare(tokenizer: str, out: Path) -> None:
    if (out / "manifest.json").is_file():
        return
    cmd = [sys.executable, "-m", "continual_pt.cli", "prepare", "--source", "python-stdlib",
           "--tokenizer", tokenizer, "--out", str(out), "--quiet"]
    subprocess.run(cmd, check=True)


def train(args, out_dir: Path, name: str, extra: list[str]) -> list[dict]:
    cmd = [sys.executable, "-m", "continual_pt.train", "--config", str(REPO / "configs/pythia-410m-gpu-check.yaml"),
           f"name={name}", f"out_dir={out_dir}", f"data.train.corpus.path={args.data}",
           f"train.max_steps={args.steps}", f"train.micro_batch_size={args.micro_batch}",
           f"log.peak_tflops={args.peak_tflops}", *extra]
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.run_timeout)
        output, status = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        output, status = f"{exc.stdout or ''}{exc.stderr or ''}", "timeout"
    wall = time.perf_counter() - started
    (out_dir / f"{name}.log").write_text(output if isinstance(output, str) else output.decode())
    metrics = out_dir / name / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    train_records = [r for r in records if r.get("kind") == "train"]
    print(f"{name}: exit {status}, {wall:.0f} s wall, {len(train_records)} train records")
    for r in train_records:
        print(f"  step {r['step']:3d} loss {r['loss']:.4f} tokens/s {r['tokens_per_s']:,.0f} mfu {r.get('mfu', 0):.3f}")
    if status != 0:
        print(str(output)[-3000:])
    return train_records


def summarise(name: str, records: list[dict], warmup: int, measured_peak: float, spec_peak: float) -> dict:
    steady = records[warmup:]
    if not steady:
        return {"run": name, "error": "no steady-state records"}
    tps = statistics.median(r["tokens_per_s"] for r in steady)
    mfu = statistics.median(r["mfu"] for r in steady)
    row = {"run": name, "tokens_per_s": round(tps), "mfu_vs_spec": round(mfu, 4),
           "mfu_vs_measured_matmul": round(mfu * spec_peak / measured_peak, 4),
           "final_loss": round(records[-1]["loss"], 4)}
    print(json.dumps(row))
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--data", default="data/gpu-check")
    parser.add_argument("--out", default="runs/gpu-check")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the card's dense bf16 spec peak")
    parser.add_argument("--warmup-records", type=int, default=2)
    parser.add_argument("--variants", default="eager,compile", help="eager and/or compile")
    parser.add_argument("--override", action="append", default=[], help="extra run-config override (repeatable)")
    parser.add_argument("--run-timeout", type=float, default=200.0, help="seconds per training run")
    args = parser.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    measured = matmul_peak_tflops()
    print(f"bf16 matmul 8192^3: {measured:.0f} TFLOP/s; spec peak used for MFU: {args.peak_tflops:.0f}")
    prepare(args.tokenizer, Path(args.data))
    rows = []
    for variant in args.variants.split(","):
        extra = (["train.compile=true"] if variant == "compile" else []) + args.override
        name = "-".join(["410m", variant, *(o.replace("=", "_").replace(".", "_") for o in args.override)])
        records = train(args, out, name, extra)
        rows.append(summarise(name, records, args.warmup_records, measured, args.peak_tflops))
    (out / "summary.json").write_text(json.dumps({"matmul_tflops": measured, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
