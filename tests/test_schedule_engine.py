"""ScheduleLR on a plain optimizer and inside a real DeepSpeed engine on the CPU: the LR used by
optimizer step k is lr_at(k), it holds still between accumulation boundaries, and a checkpoint
restores the step (and only it).

DeepSpeed keeps process-global state (the process group, the accelerator), so the engine runs in
a subprocess that prints what it saw as JSON; the assertions are made here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from continual_pt import schedules
from continual_pt.config import ScheduleConfig
from continual_pt.schedules.scheduler import ScheduleLR, make_scheduler
from tests.helpers import REPO, free_port

TOTAL_STEPS = 14
GRAD_ACCUM = 4
# A schedule whose LR differs at every step, so an off-by-one cannot pass.
OLD = dict(name="cosine", max_lr=1e-3, warmup=3)
# A new phase on the same step counter: its values, not the checkpoint's, must be used.
NEW = dict(name="wsd", max_lr=5e-4, warmup=0, cooldown=6, cooldown_shape="linear")

SCRIPT = r"""
import json, sys
import torch, deepspeed
from continual_pt.config import deepspeed as ds_config
from continual_pt.schedules.scheduler import make_scheduler
from continual_pt.config import ScheduleConfig

total, accum, old, new, ckpt = json.loads(sys.argv[1])
deepspeed.init_distributed(dist_backend="gloo")


def engine(stage, fields):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    params = dict(model.named_parameters())
    groups = [{"params": [p for n, p in params.items() if n.endswith("weight")], "weight_decay": 0.1},
              {"params": [p for n, p in params.items() if n.endswith("bias")], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=0.0)
    scheduler = make_scheduler(optimizer, ScheduleConfig(**fields), total)
    ds = ds_config.fill(ds_config.load(f"zero{stage}"), micro_batch_size=1, grad_accum=accum, dp_size=1,
                        precision="fp32", grad_clip=1.0)
    eng, _, _, eng_scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=ds)
    assert eng_scheduler is scheduler
    # Registered after ScheduleLR's own pre-hook: the LR each update really uses. ZeRO steps the
    # base optimizer once per param group, the others once for all: both give one entry per group.
    used = []
    optimizer.register_step_pre_hook(lambda opt, *_: used.extend(g["lr"] for g in opt.param_groups))
    return eng, optimizer, scheduler, used


def train(eng, optimizer, micro_batches):
    # (LR before, LR after, boundary) of every micro-batch
    seen = []
    for _ in range(micro_batches):
        before = optimizer.param_groups[0]["lr"]
        boundary = eng.is_gradient_accumulation_boundary()
        loss = eng(torch.randn(1, 4)).pow(2).mean()
        eng.backward(loss)
        eng.step()
        seen.append((before, optimizer.param_groups[0]["lr"], boundary))
    return seen


out = {}
for stage in (0, 1):
    eng, optimizer, scheduler, used = engine(stage, old)
    seen = train(eng, optimizer, 10 * accum)
    eng.save_checkpoint(f"{ckpt}/zero{stage}", tag="t")
    result = {"used": used, "seen": seen, "global_steps": eng.global_steps, "state": scheduler.state_dict()}
    for name, fields in (("resumed", old), ("new_phase", new)):
        eng, optimizer, scheduler, used = engine(stage, fields)
        eng.load_checkpoint(f"{ckpt}/zero{stage}", tag="t")
        state, lr_loaded = scheduler.state_dict(), optimizer.param_groups[0]["lr"]
        scheduler.apply()
        lr_applied = optimizer.param_groups[0]["lr"]
        train(eng, optimizer, accum)
        result[name] = {"state": state, "lr_loaded": lr_loaded, "lr_applied": lr_applied, "used": used,
                        "global_steps": eng.global_steps}
    out[stage] = result
print("RESULT " + json.dumps(out))
"""


# --------------------------------------------------------------------------- the scheduler


def _optimizer(lr: float = 1.0) -> torch.optim.Optimizer:
    model = torch.nn.Linear(3, 2)
    decay = [model.weight]
    return torch.optim.AdamW([{"params": decay}, {"params": [model.bias], "weight_decay": 0.0}], lr=lr)


def _train(optimizer: torch.optim.Optimizer, scheduler, steps: int) -> list[float]:
    """LRs used by `steps` optimizer steps, read at step time."""
    used = []
    hook = optimizer.register_step_pre_hook(lambda opt, *_: used.append([g["lr"] for g in opt.param_groups]))
    for _ in range(steps):
        for p in (p for g in optimizer.param_groups for p in g["params"]):
            p.grad = torch.ones_like(p)
        optimizer.step()
        scheduler.step()
    hook.remove()
    assert all(a == b for a, b in used)  # every param group gets the same LR
    return [lrs[0] for lrs in used]


def test_scheduler_applies_lr_at_each_step():
    cfg = ScheduleConfig(name="wsd", max_lr=1e-3, warmup=4, cooldown=4)
    optimizer = _optimizer()
    scheduler = make_scheduler(optimizer, cfg, 12)
    assert isinstance(scheduler, ScheduleLR)
    assert isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler)
    lr_at = schedules.build(cfg, 12)
    assert _train(optimizer, scheduler, 12) == [lr_at(k) for k in range(12)]
    assert scheduler.state_dict() == {"step": 12}
    assert scheduler.get_last_lr() == [lr_at(12)] * 2


def test_scheduler_state_is_the_step_only_and_the_new_config_wins():
    old = ScheduleConfig(name="cosine", max_lr=3e-4, warmup=2)
    optimizer = _optimizer()
    scheduler = make_scheduler(optimizer, old, 20)
    _train(optimizer, scheduler, 7)
    state = scheduler.state_dict()
    assert state == {"step": 7}
    saved_optimizer = optimizer.state_dict()  # holds the old schedule's LR in its param groups

    new = ScheduleConfig(name="infinite", max_lr=6e-4, warmup=0, cooldown=0.5, anneal_start=0.8)
    lr_new = schedules.build(new, 20)
    optimizer2 = _optimizer()
    scheduler2 = make_scheduler(optimizer2, new, 20)
    scheduler2.load_state_dict(state)
    assert scheduler2.last_epoch == 7
    assert [g["lr"] for g in optimizer2.param_groups] == [lr_new(7)] * 2
    # Loading optimizer state afterwards (as ZeRO checkpoints do) brings back the old LR;
    # the step still runs with the new schedule's.
    optimizer2.load_state_dict(saved_optimizer)
    assert optimizer2.param_groups[0]["lr"] == schedules.build(old, 20)(7) != lr_new(7)
    assert _train(optimizer2, scheduler2, 13) == [lr_new(k) for k in range(7, 20)]
    assert scheduler2.state_dict() == {"step": 20}


@pytest.mark.parametrize("state", [{"last_epoch": 3}, {"step": -1}, {"step": 2.5}, None])
def test_scheduler_rejects_foreign_state(state):
    scheduler = make_scheduler(_optimizer(), ScheduleConfig(), 10)
    with pytest.raises(ValueError, match="not a ScheduleLR state"):
        scheduler.load_state_dict(state)


# --------------------------------------------------------------------------- inside DeepSpeed


@pytest.fixture(scope="module")
def engine_runs(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("ckpt")
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0",
               WORLD_SIZE="1", PYTHONPATH=str(REPO))
    args = json.dumps([TOTAL_STEPS, GRAD_ACCUM, OLD, NEW, str(ckpt)])
    proc = subprocess.run([sys.executable, "-c", SCRIPT, args], env=env, cwd=ckpt, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.mark.parametrize("stage", ["0", "1"])
def test_lr_used_at_each_optimizer_step_is_lr_at_step(engine_runs, stage):
    run = engine_runs[stage]
    lr_at = schedules.build(ScheduleConfig(**OLD), TOTAL_STEPS)
    assert run["used"] == [lr_at(k) for k in range(10) for _ in range(2)]  # both groups (decay, no decay)
    assert run["global_steps"] == 10
    assert run["state"] == {"step": 10}
    for i, (before, after, boundary) in enumerate(run["seen"]):
        k = i // GRAD_ACCUM  # optimizer steps taken before this micro-batch
        assert before == lr_at(k), f"micro-batch {i}"
        assert boundary == ((i + 1) % GRAD_ACCUM == 0), f"micro-batch {i}"
        assert after == (lr_at(k + 1) if boundary else before), f"micro-batch {i}"


@pytest.mark.parametrize("stage", ["0", "1"])
def test_checkpoint_restores_the_step_and_the_current_config_sets_the_lr(engine_runs, stage):
    resumed = engine_runs[stage]["resumed"]
    lr_at = schedules.build(ScheduleConfig(**OLD), TOTAL_STEPS)
    assert resumed["state"] == {"step": 10}
    assert resumed["lr_loaded"] == lr_at(10)
    assert resumed["used"] == [lr_at(10)] * 2
    assert resumed["global_steps"] == 11

    # Same checkpoint, another schedule: the step carries over, the LR values do not.
    new_phase = engine_runs[stage]["new_phase"]
    lr_new = schedules.build(ScheduleConfig(**NEW), TOTAL_STEPS)
    assert lr_new(10) != lr_at(10)
    assert new_phase["state"] == {"step": 10}
    assert new_phase["used"] == [lr_new(10)] * 2
    # ZeRO restores the param groups' LR from the checkpoint after the scheduler's state; the
    # pre-hook corrects it before the step, apply() at once (for whoever reads it earlier).
    assert new_phase["lr_loaded"] in (lr_new(10), lr_at(10))
    assert new_phase["lr_applied"] == lr_new(10)
