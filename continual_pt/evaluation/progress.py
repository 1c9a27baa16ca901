"""How far the scoring of a run has got: which of its committed checkpoints still lack a row, for
the sets, budget, window and dtype a job would score them with, and for the lm-eval tasks it would
score. No torch, no lm_eval: `cpt sweep --status` and `--submit` ask it for every run of a sweep.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from continual_pt.evaluation.sets import EvalSet, measurement
from continual_pt.evaluation.store import ScoreStore, score_key
from continual_pt.layout import CHECKPOINTS, SCORES, is_committed, list_tags

Request = tuple[str, int | None, int | float | None]
"""An lm-eval request as a job scores it: (task name given to --lm-eval, --num-fewshot, --lm-eval-limit)."""


def _request_done(row: dict) -> tuple:
    """What of a task row tells its request apart here: checkpoint, request, few-shot count, limit, dtype.
    An approximation of the harness's REQUEST_FIELDS: the request's and the harness's versions need the
    harness's task index (lm_eval itself), so a row of another version counts as scored here, whereas
    `cpt eval` scores it again after an upgrade of the harness or a task."""
    return row.get("checkpoint"), row.get("request"), row.get("num_fewshot"), row.get("limit"), row.get("dtype")


def unscored(run_dir: Path, sets: list[EvalSet], budget: int | None, seq_len: int, dtype: str = "fp32",
             store: Path | None = None, requests: Sequence[Request] = ()) -> tuple[list[Path], list[Path]]:
    """(committed checkpoints, those lacking a row on any of `sets` or of `requests`) of a run, oldest
    first; rows are read from `store`, by default the run's own scores.jsonl."""
    run_dir = Path(run_dir)
    committed = [p for p in list_tags(run_dir / CHECKPOINTS) if is_committed(p)]
    rows = ScoreStore(store or run_dir / SCORES).rows() if committed else []
    keys = {score_key(r) for r in rows}
    done = {_request_done(r) for r in rows if "request" in r}

    def lacks(path: Path) -> bool:
        identity = str(path.resolve())
        return (any(score_key(measurement(identity, s, budget, seq_len, dtype)) not in keys for s in sets) or
                any((identity, name, shots, limit, dtype) not in done for name, shots, limit in requests))

    return committed, [p for p in committed if lacks(p)]
