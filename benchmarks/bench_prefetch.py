"""Does reading ahead hide a slow reader? Step times with batches drawn in the step vs read ahead.

    python benchmarks/bench_prefetch.py [--read-ms 20] [--steps 30] [--hidden 256] [--layers 4]

A small GPT-NeoX trains (forward, backward, AdamW) on batches of our `MixtureSampler` whose
windows take --read-ms per batch to read (a sleep, like a slow file system). Drawn in the step
(`Synchronous`, as before read-ahead) every step pays the read; read ahead on the background
thread (`Prefetcher`, what `Trainer` uses) the read overlaps the step, so the step should cost
what the compute costs, as long as the compute is the slower of the two.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


class SlowWindows:
    """Windows of random tokens; each read sleeps `delay` seconds."""

    def __init__(self, n: int, seq_len: int, vocab: int, delay: float):
        self.n, self.seq_len, self.delay = n, seq_len, delay
        self.tokens = np.random.default_rng(0).integers(0, vocab, (n, seq_len + 1))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> np.ndarray:
        time.sleep(self.delay)
        return self.tokens[index]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--read-ms", type=float, default=20.0, help="time to read one micro-batch")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from continual_pt.data.sampler import MixtureSampler
    from continual_pt.model.causal_lm import CausalLMLoss
    from continual_pt.training.prefetch import Prefetcher, Synchronous

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("gpt_neox", vocab_size=args.vocab, hidden_size=args.hidden,
                               num_hidden_layers=args.layers, num_attention_heads=4,
                               intermediate_size=4 * args.hidden, max_position_embeddings=args.seq)
    loss_fn = CausalLMLoss(AutoModelForCausalLM.from_config(cfg, dtype=torch.float32))
    optimizer = torch.optim.AdamW(loss_fn.parameters(), lr=1e-4, fused=True)
    delay = args.read_ms / 1000 / args.micro_batch
    cpu = torch.device("cpu")

    def sampler(delay: float) -> MixtureSampler:
        return MixtureSampler({"slow": SlowWindows(10_000, args.seq, args.vocab, delay)}, {"slow": 1.0}, 1,
                              args.micro_batch)

    def run(batches) -> list[float]:
        times = []
        for i in range(args.steps + 2):
            started = time.perf_counter()
            batch = batches.next_batch()
            loss_fn(batch["input_ids"], batch["labels"]).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if i >= 2:   # the first steps warm up (and the first batch cannot be hidden)
                times.append(time.perf_counter() - started)
        batches.close()
        return times

    rows = {"no slow reader": run(Synchronous(sampler(0.0), cpu)),
            "drawn in the step": run(Synchronous(sampler(delay), cpu)),
            "read ahead": run(Prefetcher(sampler(delay), cpu).start())}
    print(f"micro batch {args.micro_batch} x seq {args.seq}, hidden {args.hidden}, {args.layers} layers; "
          f"reading a batch takes {args.read_ms:.0f} ms")
    for name, times in rows.items():
        print(f"  {name:<18} median step {statistics.median(times) * 1e3:7.1f} ms (min {min(times) * 1e3:.1f})")
    saved = statistics.median(rows["drawn in the step"]) - statistics.median(rows["read ahead"])
    print(f"  read ahead saves {saved * 1e3:.1f} ms of the {args.read_ms:.0f} ms read per step")


if __name__ == "__main__":
    main()
