"""Reading a run's metrics.jsonl: one JSON record per training log line or evaluation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl; when a resumed run logged a step again, the later record wins."""
    records: dict[tuple[str, str, int], dict[str, Any]] = {}
    path = Path(path)
    if not path.is_file():
        return []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a kill mid-write
        if "step" in rec:
            records[(rec.get("kind", "train"), rec.get("set", ""), rec["step"])] = rec
    return sorted(records.values(), key=lambda r: (r["step"], r.get("kind", "train") != "eval"))
