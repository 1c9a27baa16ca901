"""Peak memory of one training step with the full-logits loss and with model.fused_loss, on the CPU.

    python benchmarks/bench_loss_memory.py [--vocab 50304] [--hidden 64] [--layers 2] [--batch 4] [--seq 256]

A small GPT-NeoX with Pythia's 50k vocabulary: its logits are the largest tensors of the step. Each
mode runs in its own process: one step to allocate the optimizer state, then the peak resident
set size (VmHWM, reset before the step through /proc/self/clear_refs) over a second step of
forward, backward and AdamW, less the resident size just before it. Python's `tracemalloc` does
not see PyTorch's allocations, so the resident size is what is measured. The two losses are
printed too (they agree to float rounding).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def worker(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from continual_pt.model.causal_lm import CausalLMLoss

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("gpt_neox", vocab_size=args.vocab, hidden_size=args.hidden,
                               num_hidden_layers=args.layers, num_attention_heads=4,
                               intermediate_size=4 * args.hidden, max_position_embeddings=args.seq,
                               tie_word_embeddings=False)
    net = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    loss_fn = CausalLMLoss(net, args.worker)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(1))
    ids, labels = tokens[:, :-1], tokens[:, 1:]

    def step() -> float:
        loss = loss_fn(ids, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    step()
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")   # resets VmHWM to the current resident size
    loss = step()
    peak = _status_kib("VmHWM")
    return {"mode": args.worker, "loss": loss, "rss_before_mib": before / 1024, "peak_mib": peak / 1024,
            "step_peak_mib": (peak - before) / 1024,
            "full_fp32_logits_mib": args.batch * args.seq * args.vocab * 4 / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--worker", choices=("off", "on"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    rows = []
    for mode in ("off", "on"):
        cmd = [sys.executable, __file__, "--worker", mode] + [f"--{k}={getattr(args, k)}" for k in
                                                              ("vocab", "hidden", "layers", "batch", "seq", "threads")]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO).stdout
        rows.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
    print(f"vocab {args.vocab}, micro batch {args.batch} x seq {args.seq}, hidden {args.hidden}, "
          f"{args.layers} layers; full fp32 logits: {rows[0]['full_fp32_logits_mib']:.0f} MiB")
    for r in rows:
        print(f"  fused_loss={r['mode']:<3}  loss {r['loss']:.6f}  peak RSS over the step "
              f"+{r['step_peak_mib']:.0f} MiB (peak {r['peak_mib']:.0f} MiB)")
    print(f"  loss difference {abs(rows[0]['loss'] - rows[1]['loss']):.2e}; step peak "
          f"{rows[1]['step_peak_mib'] / rows[0]['step_peak_mib']:.2f}x")


if __name__ == "__main__":
    main()
