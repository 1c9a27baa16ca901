"""How far the scoring of a run has got: which of its committed checkpoints still lack a row, for
the sets, budget, window and dtype a job would score them with. No torch: `cpt sweep --status`
and `--submit` ask it for every run of a sweep.
"""

from __future__ import annotations

from pathlib import Path

from continual_pt.evaluation.sets import EvalSet, measurement
from continual_pt.evaluation.store import ScoreStore, score_key
from continual_pt.layout import CHECKPOINTS, SCORES, is_committed, list_tags


def unscored(run_dir: Path, sets: list[EvalSet], budget: int | None, seq_len: int, dtype: str = "fp32",
             store: Path | None = None) -> tuple[list[Path], list[Path]]:
    """(committed checkpoints, those lacking a row on any of `sets`) of a run, oldest first; rows are
    read from `store`, by default the run's own scores.jsonl."""
    run_dir = Path(run_dir)
    committed = [p for p in list_tags(run_dir / CHECKPOINTS) if is_committed(p)]
    keys = ScoreStore(store or run_dir / SCORES).keys() if committed else set()
    missing = [p for p in committed
               if any(score_key(measurement(str(p.resolve()), s, budget, seq_len, dtype)) not in keys for s in sets)]
    return committed, missing
