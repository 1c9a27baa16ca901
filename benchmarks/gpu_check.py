"""GPU check: train the Pythia-410M shape (from config, seq 2048, bf16, ZeRO 2) and report tokens/s and MFU.

    python benchmarks/gpu_check.py --tokenizer path/to/pythia-tokenizer [--steps 50] [--micro-batch 16]

Prepares a corpus from this Python's standard library (no network), measures a bf16 matmul
peak, runs `python -m continual_pt.train` on configs/pythia-410m-gpu-check.yaml, and prints
the steady-state tokens/s (records after the first `--warmup-records`) with MFU against the
card's spec peak and against the measured matmul peak, and the peak GPU memory.

Then the same model (same config, seed, windows of our sampler, micro batch, schedule and
AdamW settings) trains under the Hugging Face `Trainer` as users set it up (bf16 autocast,
fused AdamW, its dataloader with pinned memory, `torch_compile` for the compile variant), in a
subprocess of this script (`--hf-worker`), and both are printed side by side with the ratio
of tokens/s. `--hf none` leaves it out.
"""

from __future__ import annotations

import argparse
import importlib.util
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


def hf_rows(cfg, count: int) -> list[dict]:
    """`count` training rows for the HF Trainer: our sampler's windows, input_ids = labels (it shifts)."""
    from continual_pt.data.dataset import PackedSequences, PreparedDataset
    from continual_pt.data.sampler import MixtureSampler

    sources = {n: PackedSequences(PreparedDataset(s.path, s.split), cfg.data.seq_len) for n, s in cfg.data.train.items()}
    sampler = MixtureSampler(sources, {n: s.weight for n, s in cfg.data.train.items()}, cfg.data.seed,
                             cfg.train.micro_batch_size)
    rows = []
    while len(rows) < count:
        rows += [{"input_ids": ids, "labels": ids} for ids in sampler.next_batch()["input_ids"]]
    return rows[:count]


def hf_arguments(cfg, out: Path, compile_model: bool, cuda: bool):
    """TrainingArguments for the run config: its batch, steps, precision, schedule and AdamW settings."""
    from transformers import TrainingArguments

    from continual_pt.schedules.lengths import resolve_length

    return TrainingArguments(
        output_dir=str(out), use_cpu=not cuda, bf16=cfg.train.precision == "bf16",
        fp16=cfg.train.precision == "fp16", per_device_train_batch_size=cfg.train.micro_batch_size,
        gradient_accumulation_steps=cfg.train.grad_accum, max_steps=cfg.train.max_steps,
        learning_rate=cfg.schedule.max_lr, lr_scheduler_type="cosine",
        warmup_steps=resolve_length(cfg.schedule.warmup, cfg.train.max_steps), weight_decay=cfg.optim.weight_decay, adam_beta1=cfg.optim.betas[0],
        adam_beta2=cfg.optim.betas[1], adam_epsilon=cfg.optim.eps, max_grad_norm=cfg.optim.grad_clip,
        optim="adamw_torch_fused", torch_compile=compile_model, logging_steps=cfg.train.log_every,
        report_to=[], save_strategy="no", eval_strategy="no", disable_tqdm=True, seed=cfg.train.seed,
        gradient_checkpointing=cfg.model.activation_checkpointing)


def hf_worker(config: Path, overrides: list[str], out: Path, compile_model: bool, warmup_steps: int) -> dict:
    """Train the run config's model under the HF Trainer; median step time after `warmup_steps`."""
    import torch
    from transformers import Trainer, TrainerCallback

    from continual_pt import config as cfgs
    from continual_pt.data.dataset import PreparedDataset
    from continual_pt.model import causal_lm as models

    cfg = cfgs.load(config, overrides)
    cuda = torch.cuda.is_available()
    vocab = PreparedDataset(next(iter(cfg.data.train.values())).path).vocab_size
    net = models.build(models.architecture(cfg.model, vocab, cfg.data.seq_len), cfg.model, cfg.train.seed)
    rows = hf_rows(cfg, cfg.train.max_steps * cfg.train.grad_accum * cfg.train.micro_batch_size)
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.started)

    trainer = Trainer(model=net, args=hf_arguments(cfg, out, compile_model, cuda), train_dataset=rows,
                      callbacks=[Clock()])
    trainer.train()
    steady = times[warmup_steps:] or times
    tokens_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * cfg.data.seq_len
    flops = models.flops_per_token(net.config, models.num_params(net), cfg.data.seq_len)
    tps = tokens_per_step / statistics.median(steady)
    return {"tokens_per_s": tps, "flops_per_token": flops, "steps": len(times),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}


def hf_train(args, out_dir: Path, name: str, extra: list[str], compile_model: bool) -> dict | None:
    """One HF Trainer run in a subprocess of this script; its summary row (None if it failed)."""
    overrides = [f"data.train.corpus.path={args.data}", f"train.max_steps={args.steps}",
                 f"train.micro_batch_size={args.micro_batch}", *extra]
    cmd = [sys.executable, __file__, "--hf-worker", "--config", str(REPO / "configs/pythia-410m-gpu-check.yaml"),
           "--out", str(out_dir / name), "--warmup-steps", str(args.warmup_records * 5),
           *(["--compile"] if compile_model else []), *[f"--override={o}" for o in overrides]]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.run_timeout)
        output, status = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        output, status = f"{exc.stdout or ''}{exc.stderr or ''}", "timeout"
    (out_dir / f"{name}.log").write_text(output if isinstance(output, str) else output.decode())
    result = next((json.loads(line[7:]) for line in output.splitlines() if line.startswith("RESULT ")), None)
    if status != 0 or result is None:
        print(f"{name}: exit {status}\n{str(output)[-3000:]}")
        return None
    row = {"run": name, "tokens_per_s": round(result["tokens_per_s"]),
           "mfu_vs_spec": round(result["tokens_per_s"] * result["flops_per_token"] / (args.peak_tflops * 1e12), 4),
           "peak_gib": result["peak_gib"] and round(result["peak_gib"], 2)}
    print(json.dumps(row))
    return row


def summarise(name: str, records: list[dict], warmup: int, measured_peak: float, spec_peak: float) -> dict:
    steady = records[warmup:]
    if not steady:
        return {"run": name, "error": "no steady-state records"}
    tps = statistics.median(r["tokens_per_s"] for r in steady)
    mfu = statistics.median(r["mfu"] for r in steady)
    row = {"run": name, "tokens_per_s": round(tps), "mfu_vs_spec": round(mfu, 4),
           "mfu_vs_measured_matmul": round(mfu * spec_peak / measured_peak, 4),
           "final_loss": round(records[-1]["loss"], 4),
           "peak_gib": max((r.get("peak_gib") or 0.0 for r in records), default=None)}
    print(json.dumps(row))
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", help="the Pythia tokenizer (folder or hub name); required")
    parser.add_argument("--data", default="data/gpu-check")
    parser.add_argument("--out", default="runs/gpu-check")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the card's dense bf16 spec peak")
    parser.add_argument("--warmup-records", type=int, default=2)
    parser.add_argument("--variants", default="eager,compile", help="eager and/or compile")
    parser.add_argument("--override", action="append", default=[], help="extra run-config override (repeatable)")
    parser.add_argument("--run-timeout", type=float, default=200.0, help="seconds per training run")
    parser.add_argument("--hf", default="same", help="HF Trainer variants: same (as --variants), or none")
    parser.add_argument("--hf-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--warmup-steps", type=int, default=10, help=argparse.SUPPRESS)
    parser.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.hf_worker:
        result = hf_worker(args.config, args.override, Path(args.out), args.compile, args.warmup_steps)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    if not args.tokenizer:
        parser.error("--tokenizer is required")
    if args.hf != "none" and importlib.util.find_spec("accelerate") is None:
        print("accelerate is not installed (pip install accelerate): leaving out the HF Trainer", file=sys.stderr)
        args.hf = "none"
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
        if args.hf != "none":
            hf = hf_train(args, out, f"hf-{name}", args.override, variant == "compile")
            rows.append(hf or {"run": f"hf-{name}", "error": "failed"})
            if hf and rows[-2].get("tokens_per_s"):
                print(f"{name}: cpt {rows[-2]['tokens_per_s']:,} tokens/s vs HF Trainer {hf['tokens_per_s']:,}: "
                      f"{rows[-2]['tokens_per_s'] / hf['tokens_per_s']:.2f}x")
    (out / "summary.json").write_text(json.dumps({"matmul_tflops": measured, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
