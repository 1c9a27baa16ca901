"""The schedule registry: each `ScheduleSpec` names only real config fields, and one spec is all a
new schedule needs to be built, validated, bounded and tabulated."""

from __future__ import annotations

import re

import pytest

from continual_pt import config, schedules
from continual_pt.config import ConfigError, Problems, ScheduleConfig

MINIMAL = ["train.max_steps=100", "model.config.hidden_size=8", "data.train.a.path=x"]


def test_every_spec_reads_schedule_config_fields_and_every_field_is_read():
    fields = set(ScheduleConfig.__dataclass_fields__) - {"name"}
    for name, spec in schedules.SCHEDULES.items():
        assert spec.name == name
        assert set(spec.reads) <= fields, name
        assert len(set(spec.reads)) == len(spec.reads), name
        assert (spec.default_shape in spec.cooldown_shapes) if spec.cooldown_shapes else spec.default_shape is None
    assert set().union(*(spec.reads for spec in schedules.SCHEDULES.values())) == fields


@pytest.mark.parametrize("fields, message", [
    (dict(params=("min_lr", "cooldwn")), "['cooldwn'] are not ScheduleConfig fields"),
    (dict(params=("max_lr",)), "['max_lr'] are not ScheduleConfig fields"),
    (dict(params=("cooldown",), cooldown_shapes=("linear",), default_shape="linear"), "go with the cooldown_shape"),
    (dict(params=("cooldown_shape",), cooldown_shapes=("linear",), default_shape="cosine"), "not in ('linear',)"),
    (dict(params=("min_lr",), default_cooldown=0.2), "default_cooldown goes with the cooldown param"),
])
def test_a_spec_naming_what_is_not_there_is_refused(fields, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        schedules.ScheduleSpec(name="odd", lr=schedules.constant_lr, resolve=lambda cfg, total: {}, **fields)


def step_lr(step: int, *, max_lr: float, min_lr: float, warmup_steps: int, warmup_start_lr: float,
            drop_step: int, shape: str) -> float:
    """Made up for the test: warmup, max_lr, then min_lr ("drop") or max_lr / 2 ("halve") from drop_step."""
    if step < warmup_steps:
        return schedules.warmup_lr(step, warmup_steps=warmup_steps, warmup_start_lr=warmup_start_lr, max_lr=max_lr)
    if step < drop_step:
        return max_lr
    return min_lr if shape == "drop" else max_lr / 2


STEP = schedules.ScheduleSpec(
    name="step", lr=step_lr, params=("min_lr", "cooldown", "cooldown_shape"),
    cooldown_shapes=("drop", "halve"), default_shape="drop", default_cooldown="25%",
    resolve=lambda cfg, total: {"min_lr": cfg.min_lr or 0.0, "shape": cfg.cooldown_shape,
                                "drop_step": total - schedules.resolve_length(cfg.cooldown, total)},
    phases=lambda kw, total: [(kw["drop_step"], "drop")])


def test_one_spec_is_all_a_new_schedule_needs(monkeypatch):
    unknown = Problems()
    schedules.check_config(ScheduleConfig(name="step"), unknown, 100)
    assert unknown.items == ["defaults: schedule.name: unknown schedule 'step'; accepted: "
                             "cosine, constant, linear, inverse_sqrt, wsd, infinite"]
    monkeypatch.setitem(schedules.SCHEDULES, "step", STEP)

    cfg = config.load(None, [*MINIMAL, "schedule.name=step", "schedule.max_lr=1e-3", "schedule.min_lr=1e-4",
                             "schedule.warmup=10"]).schedule
    lr_at = schedules.build(cfg, 100)  # the default cooldown, 25%, starts at step 75; the default shape drops
    assert [lr_at(t) for t in (0, 5, 10, 74, 75, 100)] == [0.0, 5e-4, 1e-3, 1e-3, 1e-4, 1e-4]
    assert schedules.boundaries(cfg, 100) == [(0, "start"), (10, "warmup end"), (75, "drop"), (100, "end")]
    halve = config.load(None, [*MINIMAL, "schedule.name=step", "schedule.max_lr=1e-3", "schedule.warmup=0",
                               "schedule.cooldown=10", "schedule.cooldown_shape=halve"]).schedule
    assert [schedules.build(halve, 100)(t) for t in (0, 89, 90, 99)] == [1e-3, 1e-3, 5e-4, 5e-4]
    assert schedules.lr_table([("halve", halve, 100)]) == [
        "step  halve         phase", "   0  0.001         start", "  45  0.001", "  90  0.0005        drop",
        "  95  0.0005", "  99  0.0005", " 100  0.0005        end"]

    with pytest.raises(ConfigError) as info:
        config.load(None, [*MINIMAL, "schedule.name=step", "schedule.decay_end=0.5", "schedule.cooldown_shape=halv"])
    assert info.value.problems == [
        "command line: schedule.decay_end: not used by the step schedule, which reads max_lr, warmup, "
        "warmup_start_lr, min_lr, cooldown, cooldown_shape; remove it",
        "command line: schedule.cooldown_shape: unknown shape 'halv' for step; did you mean 'halve'? "
        "accepted: drop, halve"]
