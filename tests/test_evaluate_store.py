"""The scores store on its own: keys, the CSV view, and many processes appending at once."""

from __future__ import annotations

import csv
import json
import multiprocessing as mp

from continual_pt.evaluation.store import ScoreStore, read_scores, score_key


def row(i: int, set_name: str = "pile", pad: int = 0) -> dict:
    return {"run": "r", "checkpoint": f"/runs/r/checkpoints/global_step{i}", "kind": "checkpoint",
            "tag": f"global_step{i}", "step": i, "tokens_seen": 64 * i, "set": set_name, "set_path": "/d",
            "split": "val", "set_fingerprint": "f" * 16, "budget": 512, "seq_len": 16, "dtype": "fp32",
            "loss": 1.0 + i, "ppl": 2.0, "tokens": 512, "note": "x" * pad}


def test_rows_with_a_known_key_are_not_written_again(tmp_path):
    store = ScoreStore(tmp_path / "scores.jsonl")
    assert store.append([row(1), row(2)]) == 2
    assert store.append([row(2), row(3), row(1, "sp")]) == 2
    assert [(r["step"], r["set"]) for r in store.rows()] == [(1, "pile"), (2, "pile"), (3, "pile"), (1, "sp")]
    other_budget = {**row(1), "budget": None}
    assert store.append([other_budget]) == 1          # another budget is another measurement
    assert score_key(other_budget) != score_key(row(1))
    with open(store.csv_path, newline="") as f:
        view = list(csv.DictReader(f))
    assert [(v["step"], v["set"], v["budget"]) for v in view] == [
        ("1", "pile", "512"), ("2", "pile", "512"), ("3", "pile", "512"), ("1", "sp", "512"), ("1", "pile", "")]
    assert float(view[2]["loss"]) == 4.0


def test_nan_is_stored_as_null_and_a_torn_line_is_skipped(tmp_path, capsys):
    store = ScoreStore(tmp_path / "scores.jsonl")
    store.append([{**row(1), "loss": float("nan")}])
    with open(store.path, "a") as f:
        f.write('{"run": "torn", "loss"')            # what a writer killed mid-line would leave
    assert [r["loss"] for r in read_scores(store.path)] == [None]
    assert "unreadable row skipped" in capsys.readouterr().err


def test_a_row_appended_after_a_torn_line_is_kept_and_the_warning_comes_once(tmp_path, capsys):
    store = ScoreStore(tmp_path / "scores.jsonl")
    store.append([row(1)])
    with open(store.path, "a") as f:
        f.write('{"run": "torn", "loss"')            # a writer killed mid-line
    assert store.append([row(2)]) == 1
    assert store.rows() == [row(1), row(2)]
    assert store.path.read_text().splitlines()[1:] == ['{"run": "torn", "loss"', json.dumps(row(2))]
    assert store.append([row(2), row(3)]) == 1 and read_scores(store.path) == [row(1), row(2), row(3)]
    with open(store.csv_path, newline="") as f:
        assert [v["step"] for v in csv.DictReader(f)] == ["1", "2", "3"]
    err = capsys.readouterr().err
    assert err == f"warning: {store.path}:2: unreadable row skipped (a line torn by a writer that was killed " \
                  "mid-write?)\n"


def _append_many(path: str, worker: int, n: int) -> None:
    store = ScoreStore(path)
    # Overlapping keys in different orders, one row per call: many lock round trips, and rows
    # far larger than PIPE_BUF so that unlocked appends would interleave.
    order = list(range(n)) if worker % 2 else list(reversed(range(n)))
    for i in order:
        store.append([row(i, set_name=f"s{i % 3}", pad=20000 + worker)])


def test_concurrent_appends_keep_every_row_once_and_whole(tmp_path):
    path = tmp_path / "scores.jsonl"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(str(path), w, 40)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    lines = path.read_text().splitlines()
    rows = [json.loads(line) for line in lines]           # every line parses
    keys = [score_key(r) for r in rows]
    assert len(keys) == len(set(keys)) == 40
    assert {r["step"] for r in rows} == set(range(40))
    assert all(len(r["note"]) >= 20000 for r in rows)
    with open(ScoreStore(path).csv_path, newline="") as f:
        assert len(list(csv.DictReader(f))) == 40
