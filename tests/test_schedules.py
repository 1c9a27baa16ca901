"""LR schedules: exact values at every phase boundary, validation, the CLI.

The step-only scheduler state is tested with the DeepSpeed engine in test_schedule_engine.py."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from continual_pt import config, schedules
from continual_pt.cli import main
from continual_pt.config import ConfigError, Problems, ScheduleConfig

MINIMAL = ["model.config.hidden_size=8", "data.train.a.path=x"]

# The follow-up paper's infinite schedule (Ibrahim et al. 2024).
PAPER_INFINITE = dict(name="infinite", max_lr=3e-4, min_lr=3e-5, const_lr=1.65e-4, warmup=0.01,
                      cooldown=0.6, anneal_start=0.85)


def lr_fn(total_steps: int, **fields) -> schedules.LRFunction:
    cfg = ScheduleConfig(**fields)
    p = Problems()
    schedules.check_config(cfg, p, total_steps)
    assert p.items == []
    return schedules.build(cfg, total_steps)


def cos_(x: float) -> float:
    return math.cos(math.pi * x)


# (id, total steps, ScheduleConfig fields, [(step, expected LR), ...]); each expected value
# is written from the schedule's formula, with the phase lengths resolved by hand.
CASES = [
    ("cosine-default", 1000, dict(name="cosine", max_lr=3e-4), [
        # warmup 1% = 10 steps from 0; min = 0.1 x max = 3e-5; decay ends at the end of the run.
        (0, 0.0), (1, 3e-5), (5, 1.5e-4), (10, 3e-4),
        (340, 3e-5 + 2.7e-4 * 0.75),                      # u = 1/3: (1 + cos(pi/3)) / 2 = 0.75
        (505, 1.65e-4),                                    # u = 1/2
        (999, 3e-5 + 2.7e-4 / 2 * (1 + cos_(989 / 990))),
        (1000, 3e-5), (2000, 3e-5)]),
    ("cosine-decay-end-80pc-no-warmup", 1000, dict(name="cosine", max_lr=6e-4, warmup=0, decay_end=0.8), [
        (0, 6e-4), (200, 6e-5 + 2.7e-4 * (1 + math.sqrt(0.5))), (400, 3.3e-4),
        (799, 6e-5 + 2.7e-4 * (1 + cos_(799 / 800))),
        (800, 6e-5), (900, 6e-5), (999, 6e-5), (1000, 6e-5)]),
    ("cosine-percent-lengths-warmup-start", 1000,
     dict(name="cosine", max_lr=1e-3, min_lr=1e-4, warmup="5%", decay_end="50%", warmup_start_lr=1e-5), [
         (0, 1e-5), (25, 5.05e-4), (49, 1e-5 + 9.9e-4 * 49 / 50), (50, 1e-3),
         (275, 5.5e-4), (500, 1e-4), (501, 1e-4)]),
    ("cosine-warmup-in-steps", 200, dict(name="cosine", max_lr=2e-4, min_lr_ratio=0.5, warmup=20), [
        (0, 0.0), (10, 1e-4), (20, 2e-4), (110, 1.5e-4), (200, 1e-4)]),
    ("linear", 1000, dict(name="linear", max_lr=1e-3, min_lr_ratio=0.0, warmup=100), [
        (0, 0.0), (50, 5e-4), (100, 1e-3), (325, 7.5e-4), (550, 5e-4), (999, 1e-3 / 900),
        (1000, 0.0), (1200, 0.0)]),
    ("linear-decay-end-60pc", 1000, dict(name="linear", max_lr=1e-3, warmup=0, decay_end=0.6), [
        (0, 1e-3), (300, 5.5e-4), (450, 3.25e-4), (600, 1e-4), (800, 1e-4)]),
    ("constant", 1000, dict(name="constant", max_lr=3e-5, warmup=0), [
        (0, 3e-5), (1, 3e-5), (500, 3e-5), (999, 3e-5), (5000, 3e-5)]),
    ("constant-warmup-start", 1000, dict(name="constant", max_lr=3e-5, warmup=10, warmup_start_lr=1e-5), [
        (0, 1e-5), (5, 2e-5), (9, 1e-5 + 2e-5 * 0.9), (10, 3e-5), (1000, 3e-5)]),
    ("inverse-sqrt-no-floor", 1000, dict(name="inverse_sqrt", max_lr=1e-3, warmup=100), [
        (0, 0.0), (50, 5e-4), (100, 1e-3), (400, 5e-4), (900, 1e-3 / 3), (10_000, 1e-4), (10**6, 1e-5)]),
    ("inverse-sqrt-floor", 1000, dict(name="inverse_sqrt", max_lr=1e-3, warmup=100, min_lr=2e-4), [
        (100, 1e-3), (400, 5e-4), (2500, 2e-4), (10_000, 2e-4)]),
    ("inverse-sqrt-floor-ratio-no-warmup", 1000, dict(name="inverse_sqrt", max_lr=1e-3, warmup=0,
                                                      min_lr_ratio=0.25), [
        (0, 1e-3), (1, 1e-3), (4, 5e-4), (16, 2.5e-4), (100, 2.5e-4)]),
    # wsd: warmup 10, cooldown 20% = 200 steps from step 800, min = 1e-4; s = (t - 800) / 200.
    *[(f"wsd-{shape}", 1000, dict(name="wsd", max_lr=1e-3, warmup=10, **({"cooldown_shape": shape} if shape else {})), [
        (0, 0.0), (5, 5e-4), (10, 1e-3), (500, 1e-3), (799, 1e-3), (800, 1e-3),
        (900, expected(0.5)), (950, expected(0.75)), (999, expected(199 / 200)),
        (1000, 1e-4), (1500, 1e-4)])
      for shape, expected in [
          ("linear", lambda s: 1e-4 + 9e-4 * (1 - s)),
          ("1-sqrt", lambda s: 1e-4 + 9e-4 * (1 - math.sqrt(s))),
          (None, lambda s: 1e-4 + 9e-4 * (1 - math.sqrt(s))),          # the default shape
          ("cosine", lambda s: 1e-4 + 9e-4 * (1 + cos_(s)) / 2),
          ("exponential", lambda s: 1e-3 * 0.1 ** s)]],
    ("wsd-cooldown-fraction-no-warmup", 1000, dict(name="wsd", max_lr=1e-3, min_lr=0.0, warmup=0, cooldown=0.1,
                                                   cooldown_shape="linear"), [
        (0, 1e-3), (899, 1e-3), (900, 1e-3), (950, 5e-4), (1000, 0.0)]),
    ("wsd-cooldown-percent", 1000, dict(name="wsd", max_lr=1e-3, warmup=0, cooldown="25%"), [
        (749, 1e-3), (750, 1e-3), (875, 1e-4 + 9e-4 * (1 - math.sqrt(0.5))), (1000, 1e-4)]),
    # The paper's infinite schedule, 1000 steps: warmup 10, cooldown 600 (to step 610),
    # constant 1.65e-4 until 850, exponential annealing to 3e-5 at 1000.
    ("infinite-paper", 1000, PAPER_INFINITE, [
        (0, 0.0), (5, 1.5e-4), (10, 3e-4),
        (160, 1.65e-4 + 0.675e-4 * (1 + math.sqrt(0.5))),    # u = 1/4
        (310, 2.325e-4),                                    # u = 1/2
        (609, 1.65e-4 + 0.675e-4 * (1 + cos_(599 / 600))),
        (610, 1.65e-4), (700, 1.65e-4), (849, 1.65e-4), (850, 1.65e-4),
        (925, math.sqrt(1.65e-4 * 3e-5)),                    # half-way: the geometric mean
        (999, 1.65e-4 * (3e-5 / 1.65e-4) ** (149 / 150)),
        (1000, 3e-5), (2000, 3e-5)]),
    ("infinite-default-const-never-anneals", 1000, dict(name="infinite", max_lr=3e-4, warmup=0.01), [
        # const = (max + 0.1 max) / 2 = 1.65e-4; no anneal_start: constant for ever.
        (10, 3e-4), (310, 2.325e-4), (610, 1.65e-4), (1000, 1.65e-4), (10**7, 1.65e-4)]),
    ("infinite-anneal-end", 1000, dict(PAPER_INFINITE, anneal_end=0.95), [
        (850, 1.65e-4), (900, math.sqrt(1.65e-4 * 3e-5)), (949, 1.65e-4 * (3e-5 / 1.65e-4) ** 0.99),
        (950, 3e-5), (999, 3e-5)]),
    ("infinite-inverse-sqrt", 1000, dict(PAPER_INFINITE, cooldown_shape="inverse_sqrt"), [
        (10, 3e-4),
        (160, 3e-4 - 1.35e-4 * (1 / math.sqrt(3.5) - 1) / (1 / math.sqrt(11) - 1)),   # a = 10, u = 1/4
        (310, 3e-4 - 1.35e-4 * (1 / math.sqrt(6) - 1) / (1 / math.sqrt(11) - 1)),
        (610, 1.65e-4), (850, 1.65e-4), (1000, 3e-5)]),
    ("infinite-inverse-sqrt-alpha", 1000, dict(name="infinite", max_lr=1e-3, min_lr_ratio=0.2, warmup=0,
                                               cooldown=500, cooldown_shape="inverse_sqrt", inv_sqrt_alpha=2.0), [
        # const = (1e-3 + 2e-4) / 2 = 6e-4
        (0, 1e-3), (125, 1e-3 - 4e-4 * (1 / math.sqrt(1.5) - 1) / (1 / math.sqrt(3) - 1)),
        (500, 6e-4), (999, 6e-4)]),
    ("infinite-no-warmup-cosine", 1000, dict(name="infinite", max_lr=1e-3, min_lr_ratio=0.2, warmup=0,
                                             cooldown=500), [
        (0, 1e-3), (250, 8e-4), (500, 6e-4), (999, 6e-4)]),
]


@pytest.mark.parametrize("total_steps, fields, table", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_lr_at_boundaries_and_interior(total_steps, fields, table):
    lr_at = lr_fn(total_steps, **fields)
    for step, expected in table:
        assert lr_at(step) == pytest.approx(expected, rel=1e-12, abs=1e-18), f"step {step}"


def test_every_schedule_and_shape_has_a_table():
    covered = {c[2]["name"] for c in CASES}
    assert covered == set(schedules.SCHEDULES)
    for name, spec in schedules.SCHEDULES.items():
        if not spec.cooldown_shapes:
            continue
        used = {c[2].get("cooldown_shape", spec.default_shape) for c in CASES if c[2]["name"] == name}
        assert used == set(spec.cooldown_shapes)


def test_paper_infinite_schedule_at_the_paper_run_length():
    # 131,296 steps: warmup 1% = 1313, cooldown 60% = 78778 steps, annealing from 85% = step 111602.
    cfg = ScheduleConfig(**PAPER_INFINITE)
    assert schedules.boundaries(cfg, 131_296) == [
        (0, "start"), (1313, "warmup end"), (80_091, "cooldown end"), (111_602, "anneal start"),
        (131_296, "anneal end, end")]
    lr_at = schedules.build(cfg, 131_296)
    assert lr_at(1313) == pytest.approx(3e-4, rel=1e-12)
    assert lr_at(80_091) == 1.65e-4
    assert lr_at(111_602) == 1.65e-4
    assert lr_at(131_296) == 3e-5
    assert all(3e-5 <= lr_at(t) <= 1.65e-4 for t in range(111_602, 131_297, 97))


def test_boundaries_name_each_phase():
    cfg = ScheduleConfig(name="wsd", warmup=10, cooldown=0.2)
    assert schedules.boundaries(cfg, 100) == [(0, "start"), (10, "warmup end"), (80, "cooldown start"),
                                              (100, "end")]
    cfg = ScheduleConfig(name="cosine", warmup=0, decay_end=0.5)
    assert schedules.boundaries(cfg, 100) == [(0, "start"), (50, "decay end"), (100, "end")]


def test_curve_keeps_both_sides_of_every_corner():
    cfg = ScheduleConfig(name="wsd", max_lr=1e-3, warmup=1313, cooldown=0.2)
    steps, lrs = schedules.curve(cfg, 131_296, max_points=1000)
    assert len(steps) < 1100
    assert {0, 1312, 1313, 105_036, 105_037, 131_295, 131_296} <= set(steps)
    assert lrs[steps.index(1313)] == 1e-3


# --------------------------------------------------------------------------- validation

BAD = [
    (["schedule.name=cosin"], "schedule.name", "did you mean 'cosine'"),
    (["schedule.max_lr=0"], "schedule.max_lr", "positive"),
    (["schedule.max_lr=-1e-3"], "schedule.max_lr", "positive"),
    (["schedule.min_lr=1e-3", "schedule.max_lr=1e-4"], "schedule.min_lr", "max_lr"),
    (["schedule.min_lr=-1e-5"], "schedule.min_lr", "[0, max_lr"),
    (["schedule.min_lr_ratio=1.5"], "schedule.min_lr_ratio", "[0, 1]"),
    (["schedule.min_lr=1e-5", "schedule.min_lr_ratio=0.1"], "schedule.min_lr_ratio", "give one"),
    (["schedule.warmup=200"], "schedule.warmup", "longer than the run"),
    (["schedule.warmup=101%"], "schedule.warmup", "longer than the run"),
    (["schedule.warmup=1.5"], "schedule.warmup", "[0, 1]"),
    (["schedule.warmup=-1"], "schedule.warmup", "negative"),
    (["schedule.warmup=0.5", "schedule.decay_end=0.3"], "schedule.decay_end", "before the end of the warmup"),
    (["schedule.decay_end=150"], "schedule.decay_end", "beyond the end of the run"),
    (["schedule.name=linear", "schedule.decay_end=150"], "schedule.decay_end", "beyond the end of the run"),
    (["schedule.warmup=0", "schedule.warmup_start_lr=1e-5"], "schedule.warmup_start_lr", "without a warmup"),
    (["schedule.warmup_start_lr=1"], "schedule.warmup_start_lr", "[0, max_lr"),
    (["schedule.name=wsd", "schedule.warmup=50", "schedule.cooldown=60"], "schedule.cooldown", "longer than the run"),
    (["schedule.name=wsd", "schedule.cooldown_shape=sqrt"], "schedule.cooldown_shape", "did you mean '1-sqrt'"),
    (["schedule.name=wsd", "schedule.cooldown_shape=exponential", "schedule.min_lr=0"], "schedule.min_lr",
     "min_lr > 0"),
    (["schedule.name=wsd", "schedule.cooldown_shape=exponential", "schedule.min_lr_ratio=0"],
     "schedule.min_lr_ratio", "min_lr > 0"),
    (["schedule.name=infinite", "schedule.anneal_start=0.5"], "schedule.anneal_start", "end of the cooldown"),
    (["schedule.name=infinite", "schedule.anneal_start=0.9", "schedule.anneal_end=0.8"], "schedule.anneal_end",
     "before it ends"),
    (["schedule.name=infinite", "schedule.anneal_start=1.0"], "schedule.anneal_start", "before it ends"),
    (["schedule.name=infinite", "schedule.anneal_start=0.9", "schedule.anneal_end=150"], "schedule.anneal_end",
     "beyond the end of the run"),
    (["schedule.name=infinite", "schedule.anneal_end=0.9"], "schedule.anneal_end", "without schedule.anneal_start"),
    (["schedule.name=infinite", "schedule.anneal_start=0.9", "schedule.min_lr=0"], "schedule.min_lr", "min_lr > 0"),
    (["schedule.name=infinite", "schedule.const_lr=1e-3"], "schedule.const_lr", "[min_lr=3e-05, max_lr=0.0003]"),
    (["schedule.name=infinite", "schedule.const_lr=1e-6"], "schedule.const_lr", "[min_lr"),
    (["schedule.name=infinite", "schedule.warmup=0.5", "schedule.cooldown=0.6"], "schedule.cooldown",
     "longer than the run"),
    (["schedule.name=infinite", "schedule.cooldown_shape=linear"], "schedule.cooldown_shape",
     "accepted: cosine, inverse_sqrt"),
    (["schedule.name=infinite", "schedule.inv_sqrt_alpha=5"], "schedule.inv_sqrt_alpha", "cooldown_shape=inverse_sqrt"),
    (["schedule.name=infinite", "schedule.cooldown_shape=inverse_sqrt", "schedule.inv_sqrt_alpha=0"],
     "schedule.inv_sqrt_alpha", "> 0"),
    (["schedule.cooldown=0.2"], "schedule.cooldown", "not used by the cosine schedule, which reads max_lr, warmup"),
    (["schedule.name=constant", "schedule.min_lr=1e-5"], "schedule.min_lr", "not used by the constant schedule"),
    (["schedule.const_lr=1e-4"], "schedule.const_lr", "not used by the cosine schedule"),
    (["schedule.name=inverse_sqrt", "schedule.decay_end=0.5"], "schedule.decay_end", "not used by the inverse_sqrt"),
    (["schedule.cooldown_shape=linear"], "schedule.cooldown_shape", "not used by the cosine schedule"),
    (["schedule.name=wsd", "schedule.anneal_start=0.9"], "schedule.anneal_start", "not used by the wsd schedule"),
]


@pytest.mark.parametrize("overrides, key, text", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_each_bad_schedule_is_reported_under_its_key(overrides, key, text):
    with pytest.raises(ConfigError) as info:
        config.load(None, ["train.max_steps=100", *MINIMAL, *overrides])
    mine = [p for p in info.value.problems if f": {key}: " in p]
    assert mine, info.value.problems
    assert text in mine[0]
    assert mine[0].startswith("command line: ")
    assert all(": schedule." in p for p in info.value.problems), info.value.problems


def test_several_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as info:
        config.load(None, ["train.max_steps=100", "schedule.warmup=200", "schedule.min_lr=1",
                           "schedule.max_lr=1e-3", *MINIMAL])
    problems = info.value.problems
    assert len(problems) == 2, problems
    assert any("schedule.warmup: 200 = 200 steps is longer than the run (100 steps)" in p for p in problems)
    assert any("schedule.min_lr: must lie in [0, max_lr=0.001], got 1.0" in p for p in problems)


@pytest.mark.parametrize("name", sorted(schedules.SCHEDULES))
def test_defaults_of_every_schedule_are_valid(name):
    cfg = config.load(None, ["train.max_steps=100", *MINIMAL, f"schedule.name={name}"])
    lr_at = schedules.build(cfg.schedule, 100)
    assert all(0 <= lr_at(t) <= cfg.schedule.max_lr for t in range(102))


def test_paper_configs_are_valid():
    config.load(None, ["train.max_steps=131296", *MINIMAL, *(f"schedule.{k}={v}" for k, v in PAPER_INFINITE.items())])
    config.load(None, ["train.max_steps=131296", *MINIMAL, "schedule.max_lr=6e-4", "schedule.decay_end=0.8"])
    config.load(None, ["train.max_steps=131296", *MINIMAL, "schedule.name=constant", "schedule.max_lr=3e-5",
                       "schedule.warmup=0"])


def test_check_config_never_raises():
    p = Problems()
    schedules.check_config(ScheduleConfig(name=None, max_lr=float("nan"), warmup="ten"), p, 100)  # type: ignore[arg-type]
    schedules.check_config(ScheduleConfig(name="wsd", warmup="ten", cooldown=2.0, min_lr=-1.0), p, 100)
    keys = {item.split(": ")[1] for item in p.items}
    assert {"schedule.name", "schedule.max_lr", "schedule.warmup", "schedule.cooldown"} <= keys


def test_config_validation_does_not_import_torch():
    code = ("import sys; from continual_pt import config; "
            "config.load(None, ['train.max_steps=10', 'model.config.hidden_size=8', 'data.train.a.path=x']); "
            "from continual_pt import schedules; schedules.build(config.ScheduleConfig(), 10)(3); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- cpt schedule


def _table(text: str) -> dict[int, list[str]]:
    rows = {}
    for line in text.splitlines()[1:]:
        step, *cells = line.split()
        rows[int(step)] = cells
    return rows


def test_show_prints_lr_at_boundaries_and_between(capsys):
    rc = main(["schedule", "show", "--spec", "name=cosine max_lr=3e-4 warmup=10 decay_end=0.8", "--steps", "100"])
    assert rc == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["step", "name=cosine", "max_lr=3e-4", "warmup=10", "decay_end=0.8",
                                           "phase"]
    rows = _table(out)
    assert sorted(rows) == [0, 5, 10, 45, 80, 90, 99, 100]
    expected = {0: 0.0, 5: 1.5e-4, 10: 3e-4, 45: 1.65e-4, 80: 3e-5, 90: 3e-5, 99: 3e-5, 100: 3e-5}
    for step, lr in expected.items():
        assert float(rows[step][0]) == pytest.approx(lr, rel=1e-6, abs=1e-12)
    assert rows[10][1:] == ["warmup", "end"]
    assert rows[80][1:] == ["decay", "end"]


def test_show_several_schedules_at_chosen_steps(tmp_path, capsys):
    path = tmp_path / "phase2.yaml"
    path.write_text("model: {config: {hidden_size: 8}}\ndata: {train: {a: x}}\ntrain: {max_steps: 1000}\n"
                    "schedule: {name: wsd, max_lr: 1.0e-3, cooldown: 0.2, cooldown_shape: linear}\n")
    spec = " ".join(f"{k}={v}" for k, v in PAPER_INFINITE.items())
    rc = main(["schedule", "show", "--config", str(path), "--spec", spec, "--at", "0,10,900,925,1000",
               "--steps", "1000", "--label", "wsd", "--label", "infinite", "schedule.warmup=0"])
    assert rc == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["step", "[1]", "wsd"]
    rows = _table(out)
    expected = {0: (1e-3, 0.0), 10: (1e-3, 3e-4), 900: (5.5e-4, 1.65e-4 * (3e-5 / 1.65e-4) ** (1 / 3)),
                925: (4.375e-4, math.sqrt(1.65e-4 * 3e-5)), 1000: (1e-4, 3e-5)}
    for step, (wsd, infinite) in expected.items():
        assert float(rows[step][0]) == pytest.approx(wsd, rel=1e-6, abs=1e-12)
        assert float(rows[step][1]) == pytest.approx(infinite, rel=1e-6, abs=1e-12)
    assert "start [1,2]" in out and "warmup end [2]" in out and "anneal end, end [2]" in out


@pytest.mark.parametrize("argv, message", [
    (["--spec", "name=cosine"], "--spec needs --steps"),
    ([], "no schedule given"),
    (["--spec", "name=cosine", "--steps", "0"], "--steps must be >= 1"),
    (["--spec", "name=cosine", "--steps", "10", "schedule.max_lr=1"], "apply to --config files only"),
    (["--spec", "name=cosine", "--steps", "10", "--label", "a", "--label", "b"], "2 --label for 1 schedule"),
    (["--spec", "name=cosine", "--steps", "10", "--at", "3,x"], "--at takes comma-separated"),
    (["--spec", "name=wsd cooldwn=0.2 max_lr=-1", "--steps", "10"], "schedule.cooldwn: unknown key; did you mean "
                                                                    "'cooldown'?"),
    (["--spec", "name=wsd max_lr=-1", "--steps", "10"], "--spec 'name=wsd max_lr=-1': schedule.max_lr: must be"),
    (["--config", "missing.yaml"], "config file not found"),
])
def test_show_reports_user_mistakes(argv, message, capsys):
    assert main(["schedule", "show", *argv]) == 2
    assert message in capsys.readouterr().err


def test_plot_writes_a_png(tmp_path, capsys):
    out = tmp_path / "figs" / "paper.png"
    specs = [f"name=cosine max_lr={lr} decay_end=0.8" for lr in ("1.5e-4", "3e-4", "6e-4")]
    specs += ["name=constant max_lr=3e-5 warmup=0", " ".join(f"{k}={v}" for k, v in PAPER_INFINITE.items())]
    argv = ["schedule", "plot", "--steps", "131296", "--out", str(out), "--title", "re-warming"]
    for spec in specs:
        argv += ["--spec", spec]
    assert main(argv) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000
    assert f"wrote {out}" in capsys.readouterr().out
    assert not list(tmp_path.glob("figs/*.tmp"))


def test_plot_writes_nothing_for_an_invalid_schedule(tmp_path):
    out = tmp_path / "bad.png"
    assert main(["schedule", "plot", "--steps", "100", "--spec", "name=cosine warmup=200", "--out", str(out)]) == 2
    assert not out.exists()
