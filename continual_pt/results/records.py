"""Reading a run's metrics.jsonl: one JSON record per training log line or evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from continual_pt.files import read_json_lines


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl; when a resumed run logged a step again, the later record wins.
    A line torn by a kill mid-write is skipped with one warning."""
    records: dict[tuple[str, str, str, int], dict[str, Any]] = {}
    for rec in read_json_lines(path):
        if "step" in rec:
            records[(rec.get("kind", "train"), rec.get("set", ""), rec.get("domain", ""), rec["step"])] = rec
    return sorted(records.values(), key=lambda r: (r["step"], r.get("kind", "train") != "eval"))
