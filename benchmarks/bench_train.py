"""Benchmark `cpt train` against a plain PyTorch loop and the Hugging Face Trainer on the same model.

    python benchmarks/bench_train.py                              # fp32 and bf16 (fp32: 2-4 minutes on 2 cores;
                                                                  # bf16 15+ without bf16 instructions)
    python benchmarks/bench_train.py --aa                         # plus plain vs itself: the noise floor
    python benchmarks/bench_train.py --precision bf16 --steps 60 --hidden 512 --layers 8
    python benchmarks/bench_train.py --ds-config zero0,zero1       # one cpt row per DeepSpeed config
    python benchmarks/bench_train.py --data path/to/prepared       # a dataset written by `cpt prepare`

All loops train the same from-scratch GPT-NeoX (built by `continual_pt.model`, same seed, same
initial weights) on the same packed token windows, with AdamW (betas 0.9/0.95, eps 1e-8, weight
decay 0.1 on matrices only), gradient clipping at 1.0, a cosine schedule, and the same micro
batch, accumulation and sequence length:

* cpt: the real `Trainer.train()` on a session from `training.session.open_session` (DeepSpeed engine,
  our sampler, metrics.jsonl and TensorBoard every --log-every steps, no progress bar, no
  evaluation, one checkpoint at the end that is not timed).
* plain: the shortest correct loop: batches already in memory, the loss from the full fp32
  logits (cpt's default model.fused_loss=auto chunks them), loss / accumulation, backward,
  clip, step. In bf16 it does what DeepSpeed does: bf16 weights and gradients, fp32 master
  weights and AdamW state (`plain`); `plain-amp` is torch.autocast over fp32 weights instead.
* hf: `transformers.Trainer` as users set it up (autocast bf16 on the CPU, its default fused
  AdamW, the model's own shifted loss, its dataloader and collator), logging every --log-every
  steps, no saving, no progress bar.

The machine is shared and noisy, so the loops run interleaved: each in a process of its own,
in its main thread, as a user runs it (a thread's allocator arena behaves otherwise), and only one
at a time runs a block of --block optimizer steps while the others sleep, in an order shuffled
every round. A step's time runs from the end of the previous step (or the moment its loop was
woken) to the end of this one, so data loading, logging and every other per-step cost of the
loop count. The first --warmup steps of every loop are dropped; tokens/s comes from the median
step time; `faults` is the median of the process's minor page faults per step. Each ratio is
shown twice: from the medians, and as the median over rounds of the ratio of the two loops' block
times in that round (pairs that ran seconds apart, so a change in the machine's load cancels); a
goal counts as met when both are.
cpt train runs unchanged (`Trainer.train()` on `open_session`, with its own signal handlers); its
metrics.jsonl is written as usual, though its tokens/s there also counts the other loops' turns.
On a CPU cpt train fixes glibc's malloc thresholds (`continual_pt.runtime.host_malloc`), so
that the memory a step frees is reused by the next one instead of being faulted in again; the
other loops keep glibc's defaults, as a user's script does, unless --same-malloc gives them the
same thresholds (which shows how much of a difference is the allocator's).
MFU = tokens/s x FLOPs per token (6N + 12 L H T, `continual_pt.model.flops_per_token`) divided
by the best of a few n^3 `torch.matmul` timings in that precision on this machine (n <= 2048,
sized to ~0.5 s a matmul), taken before and between rounds; when the machine is busy the whole
time that peak reads low and MFU high, so trust MFU only from a quiet run (--aa shows how quiet it
was: plain against itself).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SEED = 1234
MAX_LR = 6e-4


# --------------------------------------------------------------------------- scheduling


class LoopProcess:
    """One loop in a process of its own (its main thread, its own allocator, as a user runs it).

    It builds its loop, says `ready`, and then runs a block of steps each time the driver says
    `go`, answering `done` after each block and `result {json}` after its last step; while it
    waits for `go` it sleeps, so only one loop runs at a time. Its output goes to `log`."""

    def __init__(self, name: str, argv: list[str], env: dict, log: Path):
        cmd_r, cmd_w = os.pipe()   # driver -> loop
        rep_r, rep_w = os.pipe()   # loop -> driver
        self.name, self.log = name, log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(argv + ["--loop", name, "--control", f"{cmd_r},{rep_w}"], env=env,
                                         cwd=REPO, stdout=out, stderr=subprocess.STDOUT, pass_fds=(cmd_r, rep_w))
        os.close(cmd_r)
        os.close(rep_w)
        self._cmd, self._rep = os.fdopen(cmd_w, "w", buffering=1), os.fdopen(rep_r)
        self.result: dict | None = None

    def _answer(self) -> str:
        line = self._rep.readline()
        if not line:
            self.proc.wait()
            sys.exit(f"loop {self.name!r} failed ({self.proc.returncode}); its log:\n{self.log.read_text()[-6000:]}")
        return line.strip()

    def wait_ready(self) -> None:
        if self._answer() != "ready":
            sys.exit(f"loop {self.name!r} did not start; see {self.log}")

    def resume(self) -> None:
        """Let the loop run its next block (or to its end) and wait until it hands back."""
        self._cmd.write("go\n")
        answer = self._answer()
        if answer.startswith("result "):
            self.result = json.loads(answer[len("result "):])
            self.proc.wait(timeout=600)


class Stepper:
    """The loop process's side: `mark()` ends a step, and every `block` steps waits for the next `go`.

    A step's time runs from the end of the previous step (or the moment the loop was woken) to
    the end of this one; its page faults are the process's minor faults in that time."""

    def __init__(self, control: str, total_steps: int, block: int):
        cmd, rep = (int(fd) for fd in control.split(","))
        self._cmd, self._rep = os.fdopen(cmd), os.fdopen(rep, "w", buffering=1)
        self.total_steps, self.block = total_steps, block
        self.durations: list[float] = []
        self.faults: list[int] = []
        self._since, self._faults = 0.0, 0

    def _wait(self) -> None:
        if self._cmd.readline().strip() != "go":
            sys.exit(0)   # the driver went away
        self._faults, self._since = minor_faults(), time.perf_counter()

    def mark(self) -> None:
        self.durations.append(time.perf_counter() - self._since)
        self.faults.append(minor_faults() - self._faults)
        n = len(self.durations)
        if n % self.block == 0 and n < self.total_steps:
            self._rep.write("done\n")
            self._wait()
        else:
            self._faults, self._since = minor_faults(), time.perf_counter()

    def run(self, loop: Callable[[Callable[[], None]], None]) -> None:
        self._rep.write("ready\n")
        self._wait()
        loop(self.mark)
        if len(self.durations) != self.total_steps:
            raise RuntimeError(f"ran {len(self.durations)} steps, expected {self.total_steps}")
        result = {"durations": self.durations, "faults": self.faults, "optimizer": getattr(loop, "optimizer", "")}
        self._rep.write("result " + json.dumps(result) + "\n")


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def run_interleaved(loops: list[LoopProcess], total_steps: int, block: int,
                    between_rounds: Callable[[], None] = lambda: None) -> None:
    """Every loop runs one block per round, in an order shuffled anew each round (seeded).

    A fixed rotation would give each loop the same predecessor every round, so whatever the
    previous loop leaves in the caches would always favour or hurt the same loop (not shown to
    matter, but not left to chance). Shuffled, every loop follows every other one about equally
    often."""
    for loop in loops:
        loop.wait_ready()
    rounds = -(-total_steps // block)
    order = random.Random(SEED)
    for _ in range(rounds):
        for loop in order.sample(loops, len(loops)):
            loop.resume()
        between_rounds()


# --------------------------------------------------------------------------- the three loops


def run_config(args: argparse.Namespace, data: str, precision: str, ds_config: str, work: Path, peak: float):
    """The `RunConfig` our trainer runs (and the others copy): no eval, checkpoint only at the end."""
    from continual_pt import config

    raw = {
        "name": f"cpt-{Path(ds_config).stem}", "out_dir": str(work / "runs"),
        "model": {"config": model_fields(args), "fused_loss": args.fused_loss},
        "data": {"train": {"bench": {"path": data}}, "seq_len": args.seq, "seed": SEED},
        "schedule": {"name": "cosine", "max_lr": MAX_LR, "warmup": args.warmup},
        "train": {"max_steps": args.warmup + args.steps, "micro_batch_size": args.micro_batch,
                  "grad_accum": args.grad_accum, "precision": precision, "ds_config": ds_config,
                  "log_every": args.log_every, "seed": SEED},
        "eval": {"sets": {}, "at_start": False},
        "checkpoint": {"resume": "never", "every_steps": 0},
        "log": {"progress": False, "tensorboard": True, "peak_tflops": peak / 1e12},
    }
    return config.from_dict(raw, origin="bench_train")


def model_fields(args: argparse.Namespace) -> dict:
    return {"hidden_size": args.hidden, "num_hidden_layers": args.layers, "num_attention_heads": args.heads,
            "intermediate_size": args.ffn or 4 * args.hidden}


def build_model(cfg):
    """The same from-scratch model `engine.build_model` makes (same seed, so same weights)."""
    from continual_pt.data.dataset import PreparedDataset
    from continual_pt.model import causal_lm as models

    vocab = PreparedDataset(cfg.data.train["bench"].path).vocab_size
    return models.build(models.architecture(cfg.model, vocab, cfg.data.seq_len), cfg.model, cfg.train.seed)


def sampled_batches(cfg, count: int) -> list[dict]:
    """The first `count` micro-batches our sampler gives (the tokens every loop trains on)."""
    from continual_pt.data.dataset import PackedSequences, PreparedDataset
    from continual_pt.data.sampler import MixtureSampler

    packed = {"bench": PackedSequences(PreparedDataset(cfg.data.train["bench"].path), cfg.data.seq_len)}
    sampler = MixtureSampler(packed, {"bench": 1.0}, cfg.data.seed, cfg.train.micro_batch_size)
    return [{k: v for k, v in sampler.next_batch().items() if k in ("input_ids", "labels")} for _ in range(count)]


def cpt_loop(cfg, env) -> Callable:
    """Our `Trainer.train()`, marking the end of each step right after its `log_step`."""
    from continual_pt.training.loop import Trainer
    from continual_pt.training.session import open_session

    trainer = Trainer(cfg, open_session(cfg, env))
    log_step = trainer.log_step

    def loop(mark: Callable[[], None]) -> None:
        def log_step_then_mark(loss) -> None:
            log_step(loss)
            mark()

        trainer.log_step = log_step_then_mark
        trainer.train()

    engine = trainer.session.engine
    loop.optimizer = f"{type(engine.optimizer).__name__} over {optimizer_name(engine.basic_optimizer)}"
    return loop


def optimizer_name(optimizer) -> str:
    """`AdamW fused`, `AdamW foreach`, ...: the implementation matters as much as the class on a CPU."""
    flags = getattr(optimizer, "defaults", {})
    kind = "fused" if flags.get("fused") else "foreach" if flags.get("foreach") else "for-loop"
    return f"{type(optimizer).__name__} {kind}"


def plain_loop(cfg, batches: list[dict], master_weights: bool) -> Callable:
    """A bare PyTorch loop; in bf16 with `master_weights` it keeps DeepSpeed's bf16 model + fp32 master
    copy, otherwise bf16 means torch.autocast over fp32 weights."""
    import copy

    import torch

    from continual_pt import schedules
    from continual_pt.model import causal_lm as models
    from continual_pt.schedules.scheduler import ScheduleLR
    from continual_pt.training.session import make_optimizer

    bf16 = cfg.train.precision == "bf16"
    master = build_model(cfg)
    net = copy.deepcopy(master).to(torch.bfloat16) if bf16 and master_weights else master
    loss_fn = models.CausalLMLoss(net, fused_loss="off").train()   # full logits, as a plain loop has them
    lr_at = schedules.build(cfg.schedule, cfg.train.max_steps)
    optimizer = make_optimizer(master, cfg.optim, False, lr_at(0))
    scheduler = ScheduleLR(optimizer, lr_at)
    params, master_params = list(net.parameters()), list(master.parameters())
    accum, autocast = cfg.train.grad_accum, bf16 and not master_weights

    def step(micro_batches: list[dict]) -> None:
        for b in micro_batches:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = loss_fn(b["input_ids"], b["labels"])
            (loss / accum).backward()
        if net is not master:
            for p, m in zip(params, master_params):
                m.grad = p.grad.float()
        torch.nn.utils.clip_grad_norm_(master_params, cfg.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if net is not master:
            net.zero_grad(set_to_none=True)
            with torch.no_grad():
                torch._foreach_copy_(params, master_params)

    def loop(mark: Callable[[], None]) -> None:
        for i in range(cfg.train.max_steps):
            step(batches[i * accum:(i + 1) * accum])
            mark()

    loop.optimizer = optimizer_name(optimizer)
    return loop


def hf_loop(cfg, batches: list[dict]) -> Callable:
    """`transformers.Trainer` on the same windows (as input_ids = labels, the model shifts them)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    rows = [{"input_ids": ids, "labels": ids} for b in batches for ids in b["input_ids"]]
    targs = TrainingArguments(
        output_dir=str(Path(cfg.out_dir) / "hf"), use_cpu=True, bf16=cfg.train.precision == "bf16",
        per_device_train_batch_size=cfg.train.micro_batch_size, gradient_accumulation_steps=cfg.train.grad_accum,
        max_steps=cfg.train.max_steps, learning_rate=MAX_LR, lr_scheduler_type="cosine",
        warmup_steps=int(cfg.schedule.warmup), weight_decay=cfg.optim.weight_decay,
        adam_beta1=cfg.optim.betas[0], adam_beta2=cfg.optim.betas[1], adam_epsilon=cfg.optim.eps,
        max_grad_norm=cfg.optim.grad_clip, logging_steps=cfg.train.log_every, report_to=[],
        save_strategy="no", eval_strategy="no", dataloader_num_workers=0, disable_tqdm=True, seed=SEED)
    hf = Trainer(model=build_model(cfg), args=targs, train_dataset=rows)
    if hf.accelerator.distributed_type != "NO":
        raise RuntimeError(f"the Trainer chose {hf.accelerator.distributed_type}; build it before torch.distributed")

    def loop(mark: Callable[[], None]) -> None:
        class Mark(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                mark()

        hf.add_callback(Mark())
        hf.train()
        optimizer = getattr(hf.optimizer, "optimizer", hf.optimizer)  # unwrap accelerate's wrapper
        loop.optimizer = f"{optimizer_name(optimizer)} (optim={getattr(targs.optim, 'value', targs.optim)})"

    return loop


# --------------------------------------------------------------------------- one precision (subprocess)


def loop_main(args: argparse.Namespace) -> None:
    """One loop's process: build the loop named by --loop, then run it block by block as the driver says."""
    import torch

    torch.set_num_threads(args.threads)
    name = args.loop
    cfg = run_config(args, args.data, args.precision, args.ds_config, Path(args.work), args.peak)
    if args.same_malloc and not name.startswith("cpt-"):   # cpt train sets it itself (on a CPU device)
        from continual_pt.runtime import host_malloc

        host_malloc.keep_freed_memory()
    if name.startswith("cpt-"):
        from continual_pt.runtime import distributed

        loop = cpt_loop(cfg, distributed.init())
    else:
        batches = sampled_batches(cfg, cfg.train.max_steps * cfg.train.grad_accum)
        loop = hf_loop(cfg, batches) if name == "hf" else plain_loop(cfg, batches, master_weights=name != "plain-amp")
    Stepper(args.control, cfg.train.max_steps, args.block).run(loop)


# --------------------------------------------------------------------------- driver


def matmul_size(dtype_name: str, seconds: float = 0.5, largest: int = 2048) -> int:
    """The square size (a multiple of 256, at most `largest`) whose matmul takes about `seconds` here.

    A CPU without bf16 instructions runs bf16 matmuls ~50x slower than fp32: a 2048^3 one would
    take ~10 s, and one runs between every round."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a = torch.randn(256, 256, dtype=dtype)
    torch.matmul(a, a)
    start = time.perf_counter()
    torch.matmul(a, a)
    rate = 2 * 256**3 / max(time.perf_counter() - start, 1e-9)
    return max(256, min(largest, int((seconds * rate / 2) ** (1 / 3)) // 256 * 256))


def matmul_peak(dtype_name: str, n: int = 2048, reps: int = 5) -> float:
    """Best FLOP/s of an n^3 matmul in this dtype over a few repetitions."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def prepare_data(work: Path, vocab: int) -> str:
    """A BPE tokenizer trained on the built-in King James Bible source and the same text prepared."""
    from continual_pt.cli import main as cpt

    tok, data = work / "tokenizer", work / "kjv"
    if cpt(["tokenizer", "train", "-s", "kjv", "--vocab-size", str(vocab), "-o", str(tok), "-q"]) != 0:
        sys.exit("cpt tokenizer train failed")
    if cpt(["prepare", "-s", "kjv", "-t", str(tok), "-o", str(data), "--workers", "1", "-q"]) != 0:
        sys.exit("cpt prepare failed")
    return str(data)


def loop_names(args: argparse.Namespace, precision: str) -> list[tuple[str, str]]:
    """(loop name, the DeepSpeed config its run config names) for every loop of one precision."""
    ds_configs = [d.strip() for d in args.ds_config.split(",") if d.strip()]
    names = [("hf", ds_configs[0])] if args.hf else []
    names += [(f"cpt-{Path(ds).stem}", ds) for ds in ds_configs] + [("plain", ds_configs[0])]
    names += [("plain-amp", ds_configs[0])] if precision == "bf16" and args.plain_amp else []
    return names + ([("plain-aa", ds_configs[0])] if args.aa else [])


def run_precision(args: argparse.Namespace, precision: str, data: str, work: Path, peak: float) -> dict:
    """Start one process per loop, run them interleaved, and gather their step times and faults."""
    from continual_pt.model import causal_lm as models

    work = work / precision
    work.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, str(Path(__file__).resolve()), "--precision", precision, "--data", data,
            "--work", str(work), "--peak", repr(peak)]
    for key in ("steps", "warmup", "block", "hidden", "layers", "heads", "ffn", "seq", "micro_batch",
                "grad_accum", "log_every", "threads", "fused_loss", "peak_size"):
        argv += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    argv += ["--same-malloc"] if args.same_malloc else []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO),
           "TOKENIZERS_PARALLELISM": "false"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    loops = [LoopProcess(name, argv + ["--ds-config", ds], env, work / f"{name}.log")
             for name, ds in loop_names(args, precision)]
    peaks = [peak]  # the matmul peak again after every round: the best sample is the least disturbed
    try:
        run_interleaved(loops, args.warmup + args.steps, args.block,
                        lambda: peaks.append(matmul_peak(precision, args.peak_size, reps=2)))
    finally:
        for loop in loops:
            if loop.proc.poll() is None:
                loop.proc.kill()
    base = run_config(args, data, precision, loop_names(args, precision)[0][1], work, peak)
    net = build_model(base)
    results = {loop.name: loop.result for loop in loops}
    return {"precision": precision, "tokens_per_step": base.train.micro_batch_size * base.train.grad_accum
            * base.data.seq_len, "flops_per_token": models.flops_per_token(net.config, models.num_params(net),
                                                                           base.data.seq_len),
            "params": models.num_params(net), "vocab": net.config.vocab_size, "peak": max(peaks),
            "optimizers": {name: r["optimizer"] for name, r in results.items()},
            "warmup": args.warmup, "block": args.block,
            "durations": {name: r["durations"] for name, r in results.items()},
            "faults": {name: r["faults"] for name, r in results.items()}}


LABELS = {"plain": "plain PyTorch", "plain-amp": "plain PyTorch, autocast", "hf": "HF Trainer",
          "plain-aa": "plain PyTorch again (A/A)"}


def describe(name: str, precision: str) -> str:
    if name.startswith("cpt-"):
        return f"cpt train ({name[4:]})"
    if name == "plain" and precision == "bf16":
        return "plain PyTorch, bf16 + fp32 master"
    return LABELS.get(name, name)


def paired_ratio(ours: list[float], ref: list[float], block: int, warmup: int) -> float:
    """Median over rounds of (reference block time / our block time): each pair ran seconds apart,
    so slow drifts of the machine's load cancel."""
    ratios = [sum(ref[i:i + block]) / sum(ours[i:i + block])
              for i in range(0, len(ours), block) if i >= warmup and len(ours[i:i + block]) == block]
    return statistics.median(ratios) if ratios else float("nan")


def report(result: dict, peak: float) -> list[str]:
    """Table rows for one precision, then the ratios of every cpt row against plain and the Trainer."""
    precision, tokens, warmup, block = (result[k] for k in ("precision", "tokens_per_step", "warmup", "block"))
    timed = {name: d[warmup:] for name, d in result["durations"].items()}
    medians = {name: statistics.median(d) for name, d in timed.items()}
    lines, mfus = [], []
    for name, d in timed.items():
        q = statistics.quantiles(d, n=4)
        tps = tokens / medians[name]
        mfus.append(tps * result["flops_per_token"] / peak)
        faults = statistics.median(result["faults"][name][warmup:])
        lines.append(f"{precision:<6}{describe(name, precision):<36}{medians[name] * 1e3:>9.1f}{q[0] * 1e3:>8.1f}"
                     f"{q[2] * 1e3:>8.1f}{tps:>11,.0f}{mfus[-1]:>8.1%}{faults:>9,.0f}  "
                     f"{result['optimizers'].get(name, '')}")
    if max(mfus) > 1:
        lines.append(f"      (MFU above 100%: the square {precision} matmul timed here is no peak; a CPU without "
                     f"{precision} instructions runs it slower than the model's own products: trust the ratios only)")
    pairs = [(n, ref, goal) for n in timed if n.startswith("cpt-")
             for ref, goal in (("plain", 0.95), ("plain-amp", None), ("hf", 1.0))]
    for name, ref, goal in pairs + [("plain-aa", "plain", None)]:
        if name not in timed or ref not in timed:
            continue
        ratio = medians[ref] / medians[name]
        paired = paired_ratio(result["durations"][name], result["durations"][ref], block, warmup)
        verdict = "" if goal is None else f"   goal >= {goal:.2f}: {'met' if min(ratio, paired) >= goal else 'NOT met'}"
        lines.append(f"      {describe(name, precision)} / {describe(ref, precision)}: {ratio:.3f} "
                     f"(paired by round {paired:.3f}){verdict}")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--precision", default="fp32,bf16", help="comma-separated: fp32, bf16 (default both)")
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps per loop (default 30)")
    p.add_argument("--warmup", type=int, default=6, help="untimed steps at the start of each loop (default 6)")
    p.add_argument("--block", type=int, default=1, help="steps a loop runs before the next one's turn (default 1)")
    p.add_argument("--hidden", type=int, default=256, help="GPT-NeoX hidden size (default 256)")
    p.add_argument("--layers", type=int, default=4, help="layers (default 4)")
    p.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    p.add_argument("--ffn", type=int, default=0, help="MLP width (default 4 x hidden)")
    p.add_argument("--seq", type=int, default=256, help="sequence length (default 256)")
    p.add_argument("--micro-batch", type=int, default=2, help="sequences per micro-batch (default 2)")
    p.add_argument("--grad-accum", type=int, default=2, help="micro-batches per optimizer step (default 2)")
    p.add_argument("--vocab", type=int, default=4096, help="BPE vocabulary trained for the default data (default 4096)")
    p.add_argument("--data", default=None, help="a dataset dir written by `cpt prepare` (default: KJV, built here)")
    p.add_argument("--ds-config", default="zero1,zero0",
                   help="comma-separated DeepSpeed configs, one cpt row each (default zero1,zero0; zero1 is "
                        "the run config's default)")
    p.add_argument("--log-every", type=int, default=10, help="train.log_every of cpt, logging_steps of HF (default 10)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="torch threads for every loop (default: all CPUs)")
    p.add_argument("--fused-loss", default="auto", choices=("auto", "on", "off"),
                   help="cpt train's model.fused_loss (default auto, as cpt train's default)")
    p.add_argument("--no-hf", dest="hf", action="store_false", help="leave out the Hugging Face Trainer")
    p.add_argument("--no-plain-amp", dest="plain_amp", action="store_false",
                   help="in bf16, leave out the autocast variant of the plain loop")
    p.add_argument("--aa", action="store_true",
                   help="also run the plain loop a second time: their ratio shows the noise of this machine")
    p.add_argument("--same-malloc", action="store_true",
                   help="give every loop the malloc thresholds cpt train sets on a CPU (shows how much of a "
                        "difference is the allocator's)")
    p.add_argument("--loop", default=None, help=argparse.SUPPRESS)
    p.add_argument("--control", default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    p.add_argument("--peak", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--peak-size", type=int, default=2048, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 4 or args.block < 1:
        p.error("--steps must be >= 4 and --block >= 1")
    return args


def main() -> None:
    args = parse_args()
    if args.loop:
        loop_main(args)
        return
    import torch

    torch.set_num_threads(args.threads)
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    if args.hf:
        try:
            import accelerate  # noqa: F401  (the Trainer needs it)
        except ImportError:
            print("accelerate is not installed (pip install accelerate): leaving out the HF Trainer", file=sys.stderr)
            args.hf = False
    sizes = {p: matmul_size(p) for p in precisions}
    peaks = {p: matmul_peak(p, sizes[p]) for p in precisions}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        work = Path(tmp)
        data = args.data or prepare_data(work, args.vocab)
        for i, precision in enumerate(precisions):
            started = time.perf_counter()
            args.peak_size = sizes[precision]
            result = run_precision(args, precision, data, work, peaks[precision])
            print(f"{precision}: done in {time.perf_counter() - started:.0f} s; matmul {sizes[precision]}^3 peak (best "
                  f"sample, before and between rounds) {result['peak'] / 1e9:.1f} GFLOP/s", flush=True)
            if i == 0:
                print_header(args, result)
            for line in report(result, result["peak"]):   # each precision as it ends: a slow one loses nothing
                print(line, flush=True)


def print_header(args: argparse.Namespace, r0: dict) -> None:
    import torch

    print(f"\n{torch.get_num_threads()} threads")
    print(f"\nmodel: GPT-NeoX hidden {args.hidden}, {args.layers} layers, {args.heads} heads, vocab {r0['vocab']}, "
          f"{r0['params'] / 1e6:.2f}M params (non-embedding), {r0['flops_per_token'] / 1e6:.1f} MFLOP/token; "
          f"seq {args.seq} x micro batch {args.micro_batch} x accum {args.grad_accum} = {r0['tokens_per_step']} "
          f"tokens/step; {args.steps} timed steps after {args.warmup}, blocks of {args.block}")
    print(f"\n{'prec':<6}{'loop':<36}{'step ms':>9}{'p25':>8}{'p75':>8}{'tokens/s':>11}{'MFU':>8}{'faults':>9}"
          "  optimizer", flush=True)

if __name__ == "__main__":
    main()
