"""metrics.jsonl and the other sinks of a run: torn lines, the steps a resumed start redoes, and
one TensorBoard / W&B key per held-out set."""

from __future__ import annotations

import json
import os
import sys
import types

from continual_pt.config import LogConfig
from continual_pt.files import open_append
from continual_pt.results import metrics
from continual_pt.results.metrics import MetricsLogger
from continual_pt.results.records import read_metrics

QUIET = LogConfig(tensorboard=False, progress=False)
TORN_3 = '{"kind": "train", "step": 3, "tokens": 19'      # what a kill mid-write leaves


def rec(step: int, kind: str = "train", **more) -> dict:
    base = {"kind": kind, "step": step, "tokens": 64 * step}
    return {**base, **({"loss": 2.0 + step, "lr": 1e-3} if kind == "train" else {"loss": 3.0, "ppl": 20.0}),
            **more}


def write_lines(path, records, tail: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def lines_of(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def log_all(run_dir, start_step: int, records, cfg: LogConfig = QUIET) -> None:
    logger = MetricsLogger(run_dir, cfg, True, "r", 10, start_step, {})
    for r in records:
        logger.log(r)
    logger.close()


def test_an_append_after_a_torn_line_starts_a_new_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n{"a": 2, "b')
    fd = open_append(path)
    os.write(fd, b'{"a": 3}\n')
    os.close(fd)
    assert path.read_text() == '{"a": 1}\n{"a": 2, "b\n{"a": 3}\n'
    fd = open_append(path)                          # already on a line boundary: nothing added
    os.close(fd)
    assert path.read_text() == '{"a": 1}\n{"a": 2, "b\n{"a": 3}\n'


def test_a_resume_after_a_torn_line_keeps_the_step_it_logs_again(tmp_path, capsys):
    """Killed while writing step 3, resumed from the step-2 checkpoint: step 3 is not swallowed."""
    path = tmp_path / "metrics.jsonl"
    write_lines(path, [rec(1), rec(2)], tail=TORN_3)
    log_all(tmp_path, 2, [rec(3, loss=9.5)])
    assert lines_of(path) == [rec(1), rec(2), rec(3, loss=9.5)]
    assert read_metrics(path) == [rec(1), rec(2), rec(3, loss=9.5)]
    assert f"{path}: dropped 1 line(s) after step 2" in capsys.readouterr().err


def test_a_resume_drops_the_records_logged_after_its_checkpoint(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    code = {"set": "code"}
    before = [rec(0, "eval", **code), rec(1), rec(2), rec(2, "eval", **code), rec(3), rec(4), rec(4, "eval", **code)]
    write_lines(path, before)
    again = [rec(3, loss=7.0), rec(4, loss=7.5), rec(4, "eval", loss=2.5, **code)]
    log_all(tmp_path, 2, again)
    assert lines_of(path) == before[:4] + again        # one record per step, in the file itself
    assert f"{path}: dropped 3 line(s) after step 2, which this run logs again" in capsys.readouterr().err


def test_a_start_at_step_0_redoes_every_step_and_a_clean_resume_rewrites_nothing(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    write_lines(path, [rec(0, "eval", set="code"), rec(1)])
    log_all(tmp_path, 0, [rec(0, "eval", set="code", loss=5.0)])
    assert lines_of(path) == [rec(0, "eval", set="code", loss=5.0)]
    assert f"{path}: dropped 2 line(s) logged by an earlier start" in capsys.readouterr().err
    write_lines(path, [rec(1), rec(2)])
    inode = path.stat().st_ino
    log_all(tmp_path, 2, [rec(3)])
    assert path.stat().st_ino == inode and lines_of(path) == [rec(1), rec(2), rec(3)]
    assert capsys.readouterr().err == ""
    MetricsLogger(tmp_path, QUIET, False, "r", 10, 0, {}).close()    # not rank 0: touches nothing
    assert lines_of(path) == [rec(1), rec(2), rec(3)]


def test_readers_skip_a_torn_line_with_one_warning(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    write_lines(path, [rec(1)], tail=TORN_3 + "\n" + json.dumps(rec(4)) + "\n")
    for _ in range(3):
        assert read_metrics(path) == [rec(1), rec(4)]
    err = capsys.readouterr().err
    assert err.count("unreadable row skipped") == 1 and f"warning: {path}:2: unreadable row skipped" in err


class FakeWriter:
    scalars: list[tuple[str, float, int]] = []

    def __init__(self, log_dir: str, purge_step: int | None = None):
        FakeWriter.scalars = []

    def add_scalar(self, key: str, value: float, step: int) -> None:
        FakeWriter.scalars.append((key, value, step))

    def close(self) -> None:
        pass


def test_each_held_out_set_has_its_own_tensorboard_and_wandb_keys(tmp_path, monkeypatch):
    logged: list[tuple[dict, int]] = []
    run = types.SimpleNamespace(log=lambda values, step: logged.append((values, step)), finish=lambda: None)
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: run))
    monkeypatch.setattr(metrics, "SummaryWriter", FakeWriter)
    records = [{"kind": "train", "step": 4, "tokens": 256, "lr": 1e-3, "loss": 2.0, "grad_norm": None},
               {"kind": "eval", "set": "code", "step": 4, "tokens": 256, "loss": 1.5, "ppl": 4.5, "eval_tokens": 512},
               {"kind": "eval", "set": "prose", "step": 4, "tokens": 256, "loss": 2.5, "ppl": 12.0, "eval_tokens": 64},
               {"kind": "eval", "set": "prose", "domain": "Github", "step": 4, "tokens": 256, "loss": 2.7}]
    log_all(tmp_path, 0, records, LogConfig(tensorboard=True, wandb=True, progress=False))
    expected = [{"train/tokens": 256, "train/lr": 1e-3, "train/loss": 2.0},
                {"eval/code/tokens": 256, "eval/code/loss": 1.5, "eval/code/ppl": 4.5, "eval/code/eval_tokens": 512},
                {"eval/prose/tokens": 256, "eval/prose/loss": 2.5, "eval/prose/ppl": 12.0,
                 "eval/prose/eval_tokens": 64},
                {"eval/prose/Github/tokens": 256, "eval/prose/Github/loss": 2.7}]   # a domain of a set
    assert FakeWriter.scalars == [(k, v, 4) for values in expected for k, v in values.items()]
    assert logged == [(values, 4) for values in expected]
