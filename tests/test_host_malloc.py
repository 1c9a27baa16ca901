"""A CPU training step reuses the host memory the previous step freed (runtime/host_malloc.py)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest

from continual_pt.runtime import host_malloc
from tests import train_support as ts

# Trains a small GPT-NeoX the way a plain loop does and prints the process's minor page faults of
# steps 6-25 (the first steps grow the heap to its working size whatever the thresholds).
STEPS = r"""
import json, resource, sys, torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
from continual_pt.runtime import host_malloc
kept = host_malloc.keep_freed_memory() if sys.argv[1] == "keep" else False
torch.manual_seed(0)
torch.set_num_threads(1)
net = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=4096, hidden_size=128, num_hidden_layers=2,
                                       num_attention_heads=2, intermediate_size=512, max_position_embeddings=256))
opt = torch.optim.AdamW(net.parameters(), fused=True)
tokens = torch.randint(0, 4096, (2, 256))
faults = []
for step in range(26):
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    logits = net(input_ids=tokens, use_cache=False).logits   # 8 MiB of float32 logits a step
    torch.nn.functional.cross_entropy(logits.reshape(-1, 4096), tokens.reshape(-1)).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    del logits
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
print(json.dumps({"kept": kept, "applied": host_malloc.applied(), "faults": faults[6:]}))
"""


def clean_env() -> dict[str, str]:
    env = ts.env()
    for name in (*host_malloc.GLIBC_VARIABLES, "GLIBC_TUNABLES", "LD_PRELOAD"):
        env.pop(name, None)
    return env


def run_steps(mode: str, env: dict[str, str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", STEPS, mode], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_kept_memory_is_not_faulted_in_again_every_step():
    default, kept = run_steps("default", clean_env()), run_steps("keep", clean_env())
    assert kept["kept"] and kept["applied"] and not default["applied"]
    # glibc's defaults hand a step's freed memory back and fault it in again: thousands of 4 KiB
    # pages in most steps (23,000-57,000 in 14 steps when measured). Kept, the heap is reused:
    # most steps fault nothing, and the kernel's own reclaim refaults a few pages now and then
    # (0-3,300 in 14 steps measured).
    assert statistics.median(kept["faults"]) <= 2, kept
    assert sum(default["faults"]) > 4 * max(sum(kept["faults"]), 2048), (default, kept)


@pytest.mark.parametrize("variable, value", [("MALLOC_TRIM_THRESHOLD_", "131072"),
                                             ("MALLOC_MMAP_THRESHOLD_", "65536"),
                                             ("MALLOC_TOP_PAD_", "0"),
                                             ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0"),
                                             ("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")])
def test_the_users_own_malloc_settings_are_left_alone(monkeypatch, variable, value):
    monkeypatch.setattr(host_malloc, "_applied", False)
    monkeypatch.setenv(variable, value)
    assert host_malloc.user_choice() == variable
    assert not host_malloc.keep_freed_memory() and not host_malloc.applied()


def test_glibc_variables_in_a_process_leave_it_at_glibcs_thresholds():
    got = run_steps("keep", {**clean_env(), "MALLOC_TRIM_THRESHOLD_": "131072"})
    assert not got["kept"] and not got["applied"]


def test_unrelated_settings_do_not_count_as_a_choice():
    assert host_malloc.user_choice({}) is None
    assert host_malloc.user_choice({"GLIBC_TUNABLES": "glibc.pthread.rseq=0", "LD_PRELOAD": "libfoo.so"}) is None


@pytest.mark.slow
def test_cpu_training_keeps_freed_memory(world, tmp_path):
    """`open_session` (cpt train) fixes the thresholds on a CPU device (the eval job: test_evaluate.py)."""
    cfg = ts.write_config(tmp_path / "run.yaml", world, tmp_path / "runs", name="malloc")
    probe = ("import sys\nfrom continual_pt import config\nfrom continual_pt.runtime import distributed, host_malloc\n"
             "from continual_pt.training.session import open_session\n"
             "before = host_malloc.applied()\n"
             "open_session(config.load(sys.argv[1], []), distributed.init())\n"
             "print(before, host_malloc.applied())\n")
    proc = subprocess.run([sys.executable, "-c", probe, str(cfg)], env=clean_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.split()[-2:] == ["False", "True"]
