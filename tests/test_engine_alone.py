"""`lean_engine`: a DeepSpeed engine with no data-parallel peer skips its gradient all-reduce
(ZeRO 0 only), a plain fp32 engine keeps the norm it clips with, a ZeRO 1 engine gets a reduce
bucket sized to its model (`fit_reduce_bucket`), and either way the engine trains to bitwise the
same weights as one left as DeepSpeed made it.

DeepSpeed keeps process-global state, so the engines run in a subprocess that prints what it saw
as JSON; the assertions are made here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO, free_port

SCRIPT = r"""
import json
import torch, deepspeed
from continual_pt.config import deepspeed as ds_config
from continual_pt.runtime.lean_engine import KeptClipNorm, skip_lone_allreduce

deepspeed.init_distributed(dist_backend="gloo")
torch.manual_seed(1)
data = [torch.randn(2, 6) for _ in range(6)]


def run(stage, precision, skip):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.GELU(), torch.nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ds = ds_config.fill(ds_config.load(f"zero{stage}"), micro_batch_size=2, grad_accum=2, dp_size=1,
                        precision=precision, grad_clip=1.0)
    if skip:   # what build_engine does: the reduce bucket no larger than the gradients
        ds = ds_config.fit_reduce_bucket(ds, sum(p.numel() for p in model.parameters()))
    eng, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    skipped = skip_lone_allreduce(eng, stage) if skip else False
    kept = KeptClipNorm(eng) if skip and stage == 0 and precision == "fp32" else None
    norms = []
    calls, buffers = [], []
    reduce, fallback = eng.allreduce_gradients, eng.buffered_allreduce_fallback
    eng.allreduce_gradients = lambda *a, **k: (calls.append(1), reduce(*a, **k))[1]
    eng.buffered_allreduce_fallback = lambda *a, **k: (buffers.append(1), fallback(*a, **k))[1]
    for x in data:
        loss = eng(x.to(eng.module[0].weight.dtype)).float().pow(2).mean() * 50   # norms above the clip
        eng.backward(loss)
        before = None
        if kept is not None and eng.is_gradient_accumulation_boundary():
            before = torch.nn.utils.get_total_norm([p.grad for p in eng.module.parameters()]).item()
        eng.step()
        if kept is not None:
            norm = kept.take()
            norms.append(None if norm is None else [before, norm.item()])
    weights = [p.detach().float().flatten().tolist() for p in eng.module.parameters()]
    return {"skipped": skipped, "allreduce_calls": len(calls), "buffer_reductions": len(buffers), "norms": norms,
            "weights": weights, "bucket": getattr(eng.optimizer, "reduce_bucket_size", None)}


out = {}
for stage, precision in ((0, "fp32"), (0, "bf16"), (1, "fp32")):
    out[f"{stage}-{precision}"] = {"plain": run(stage, precision, False), "alone": run(stage, precision, True)}
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("alone")
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0",
               WORLD_SIZE="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=work, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.mark.parametrize("case", ["0-fp32", "0-bf16"])
def test_a_lone_zero0_engine_skips_the_all_reduce_and_trains_to_the_same_weights(runs, case):
    plain, alone = runs[case]["plain"], runs[case]["alone"]
    # asked after every backward (6 micro-batches), reduced once per optimizer step (accumulation 2)
    assert (plain["allreduce_calls"], plain["buffer_reductions"]) == (6, 3)
    assert alone["skipped"] and (alone["allreduce_calls"], alone["buffer_reductions"]) == (0, 0)
    assert alone["weights"] == plain["weights"]   # bitwise
    assert plain["weights"] != runs["0-fp32" if case == "0-bf16" else "0-bf16"]["plain"]["weights"]


def test_zero1_keeps_its_gradient_reduction_in_a_bucket_sized_to_the_model(runs):
    plain, alone = runs["1-fp32"]["plain"], runs["1-fp32"]["alone"]
    assert not alone["skipped"]
    assert alone["allreduce_calls"] == plain["allreduce_calls"] > 0
    # DeepSpeed's 5e8-element bucket (allocated every step) against the model's 129 parameters
    assert (plain["bucket"], alone["bucket"]) == (500_000_000, 6 * 16 + 16 + 16 + 1)
    assert alone["weights"] == plain["weights"]


def test_a_plain_fp32_engine_keeps_the_norm_it_clipped_with(runs):
    norms = runs["0-fp32"]["alone"]["norms"]
    assert [n is None for n in norms] == [True, False] * 3   # one per optimizer step, taken once
    for before, kept in filter(None, norms):
        assert kept == pytest.approx(before, rel=1e-6)        # the norm before clipping
    assert any(before > 1.0 for before, _ in filter(None, norms))   # so clipping did act
