"""The results store of `cpt eval`: scores.jsonl (the record) and scores.csv (a view of it).

One JSON line per (checkpoint, held-out set, token budget, sequence length, dtype). Several
jobs (a SLURM array) may append to one store at once: each append takes an exclusive
`fcntl.flock` on `scores.jsonl.lock`, re-reads the file, drops rows already present and
writes each new row with one `write()` on an O_APPEND descriptor, so no row is lost, torn
or written twice. Each row starts a line of its own: a line torn by a writer killed mid-write is
ended first, so it never swallows the row after it. The CSV is regenerated from the jsonl under
the same lock.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from continual_pt.files import atomic_write_text, json_line, open_append, read_json_lines

KEY_FIELDS = ("checkpoint", "set", "split", "set_fingerprint", "budget", "selection", "seq_len", "dtype", "domain",
              "task", "request", "request_version", "harness", "task_version", "num_fewshot", "limit")
"""What makes two rows the same measurement; a row with an equal key is never scored again. `selection`
is how the budget's windows were chosen (rows before it was recorded took the first windows: another
measurement, scored again). `domain` is set on the rows of one domain of a set scored by domain. The
last seven are those of an lm-eval task's row (evaluation/harness.py), absent from loss rows."""
CSV_FIELDS = ("run", "checkpoint", "kind", "tag", "step", "tokens_seen", "set", "set_path", "split",
              "set_fingerprint", "budget", "selection", "windows", "seq_len", "dtype", "domain", "loss", "ppl",
              "macro_loss", "tokens", "task", "request", "harness", "task_version", "num_fewshot", "n_shot", "limit",
              "samples", "metrics", "stderr", "world_size", "seconds", "time")


def score_key(row: dict[str, Any]) -> tuple:
    """The identity of a measurement (see KEY_FIELDS)."""
    return tuple(row.get(k) for k in KEY_FIELDS)


def read_scores(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a scores.jsonl in file order; a line that does not parse is reported once and skipped."""
    return read_json_lines(path)


def _cell(value: Any) -> Any:
    """A CSV cell: empty for None, JSON for a task row's metrics and stderr."""
    if value is None:
        return ""
    return json.dumps(value, sort_keys=True) if isinstance(value, dict) else value


class ScoreStore:
    """A scores.jsonl file with its lock and CSV view."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.csv_path = self.path.with_suffix(".csv")

    def rows(self) -> list[dict[str, Any]]:
        return read_scores(self.path)

    def keys(self) -> set[tuple]:
        return {score_key(r) for r in self.rows()}

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def append(self, rows: list[dict[str, Any]]) -> int:
        """Append the rows whose key is not in the store yet; returns how many were written."""
        with self._locked():
            present = self.keys()
            fd = open_append(self.path)
            written = 0
            try:
                for row in rows:
                    key = score_key(row)
                    if key in present:
                        continue  # another job scored it meanwhile
                    # An empty set scores nan, stored as null.
                    data = json_line(row).encode("utf-8")
                    if os.write(fd, data) != len(data):
                        raise OSError(f"{self.path}: short write")
                    present.add(key)
                    written += 1
                os.fsync(fd)
            finally:
                os.close(fd)
            self._write_csv()
        return written

    def _write_csv(self) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in self.rows():
            writer.writerow({k: _cell(row.get(k)) for k in CSV_FIELDS})
        atomic_write_text(self.csv_path, buf.getvalue())
