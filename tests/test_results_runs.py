"""What cpt plot and cpt report read from a run directory, on hand-made runs (no training): the LR
drawn from the saved schedule, and forgetting only for a run that started from a checkpoint."""

from __future__ import annotations

import json

import yaml

from continual_pt.cli import main
from continual_pt.config import CheckpointConfig, RunConfig, ScheduleConfig, TrainConfig, to_dict
from continual_pt.results.plots import draw_runs
from continual_pt.results.report import load_run, load_runs
from continual_pt.schedules import build

COSINE = ScheduleConfig(name="cosine", max_lr=2.0e-3, warmup=4)
TOKENS_PER_STEP = 64


def make_run(root, name, records, schedule=COSINE, init=None, max_steps=20, config=True):
    """A run directory as training leaves it: config.yaml (a full dump) and metrics.jsonl."""
    run = root / name
    run.mkdir(parents=True)
    cfg = RunConfig(name=name, schedule=schedule, train=TrainConfig(max_steps=max_steps),
                    checkpoint=CheckpointConfig(init=init))
    if config:
        (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


def trained(steps, lr_at, evals=()):
    """Train records as the loop logs them (the LR of the step just taken) and eval records."""
    records = [{"kind": "train", "step": s, "tokens": TOKENS_PER_STEP * s, "lr": lr_at(s - 1), "loss": 3.0}
               for s in steps]
    return records + [{"kind": "eval", "set": name, "step": s, "tokens": TOKENS_PER_STEP * s, "loss": loss,
                       "ppl": 2.0 ** loss} for name, s, loss in evals]


def test_the_lr_panel_draws_the_schedule_from_step_0(tmp_path):
    lr_at = build(COSINE, 20)
    run = make_run(tmp_path, "warm", trained([5, 10, 15], lr_at, [("code", 0, 4.0), ("code", 15, 3.0)]))
    curves = load_run(run)
    expected = [(TOKENS_PER_STEP * s, lr_at(s)) for s in range(16)]    # to step 15, the last one reached
    assert curves.lr == expected
    assert expected[0] == (0, 0.0) and expected[4] == (256, 2.0e-3)   # the whole warmup is there
    lr_line = draw_runs([curves], ["code"]).axes[1].lines[0]
    assert list(lr_line.get_xdata()) == [t for t, _ in expected]
    assert list(lr_line.get_ydata()) == [v for _, v in expected]
    for r in trained([5, 10, 15], lr_at):   # every logged LR lies on the line, at the start of its step
        assert lr_line.get_ydata()[r["step"] - 1] == r["lr"]


def test_without_a_usable_schedule_the_lr_panel_shows_the_logged_lr(tmp_path, capsys):
    lr_at = build(COSINE, 20)
    records = trained([5, 10], lr_at)
    logged = [(TOKENS_PER_STEP * 5, lr_at(4)), (TOKENS_PER_STEP * 10, lr_at(9))]
    assert load_run(make_run(tmp_path, "bare", records, config=False)).lr == logged
    broken = make_run(tmp_path, "broken", records, schedule=ScheduleConfig(name="cosin"))
    assert load_run(broken).lr == logged
    err = capsys.readouterr().err
    assert f"warning: the LR panel shows the logged LR of {broken}: " in err
    assert f"{broken / 'config.yaml'}: schedule.name" in err


def parse_table(text):
    lines = [line for line in text.splitlines() if line.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(head, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def test_forgetting_is_reported_only_for_runs_started_from_a_checkpoint(tmp_path, capsys):
    lr_at = build(COSINE, 20)
    evals = [("code", 0, 4.0), ("prose", 0, 5.0), ("code", 20, 4.25), ("prose", 20, 3.5)]
    scratch = make_run(tmp_path, "scratch", trained([10, 20], lr_at, evals))
    warm = make_run(tmp_path, "warm", trained([10, 20], lr_at, evals), init=str(tmp_path / "pre"))
    assert [r.init for r in load_runs([str(scratch), str(warm)])] == [None, str(tmp_path / "pre")]
    assert main(["report", str(scratch), str(warm), "--upstream", "code", "--downstream", "prose"]) == 0
    rows = {r["run"]: r for r in parse_table(capsys.readouterr().out)}
    assert rows["scratch"]["forgetting (Δ code loss from step 0)"] == "n/a"
    assert rows["warm"]["forgetting (Δ code loss from step 0)"] == "+0.2500"
    assert rows["scratch"]["code final loss"] == rows["warm"]["code final loss"] == "4.2500"
