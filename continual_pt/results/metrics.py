"""Metrics sinks of a run (rank 0 only): metrics.jsonl, TensorBoard, Weights & Biases, a progress bar.

metrics.jsonl holds one record per step (and per set, for evaluations) of the live run: a start
drops the records of the steps it will redo (logged after the checkpoint it resumes from, or
all of them when it starts at step 0), so that no reader ever sees two records for one step.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from continual_pt.config import LogConfig
from continual_pt.files import atomic_write_text, json_line, open_append, parse_json_line
from continual_pt.layout import METRICS


def _redone(line: str, start_step: int) -> bool:
    """Whether a metrics.jsonl line is unreadable (torn) or a record of a step a start at
    `start_step` logs again: every step after it; with a start at step 0, step 0 as well."""
    record = parse_json_line(line) if line.strip() else {}
    if record is None:
        return True
    step = record.get("step")
    return isinstance(step, int) and (step > start_step or step == start_step == 0)


def drop_redone_records(path: Path, start_step: int) -> int:
    """Rewrite metrics.jsonl atomically without the lines `_redone` names; returns how many went."""
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
    kept = [line for line in lines if not _redone(line, start_step)]
    if len(kept) < len(lines):
        if kept and not kept[-1].endswith("\n"):
            kept[-1] += "\n"
        atomic_write_text(path, "".join(kept))
    return len(lines) - len(kept)


def open_metrics(path: Path, start_step: int) -> int:
    """An append descriptor of metrics.jsonl for a run that starts at `start_step` (see the module
    docstring); says how many records of redone steps it dropped."""
    dropped = drop_redone_records(path, start_step)
    if dropped:
        after = "logged by an earlier start" if start_step == 0 else f"after step {start_step}"
        print(f"{path}: dropped {dropped} line(s) {after}, which this run logs again (a torn line counts "
              "as one)", file=sys.stderr, flush=True)
    return open_append(path)


class MetricsLogger:
    """Writes every record to metrics.jsonl and to whichever other sinks are enabled."""

    def __init__(self, run_dir: Path, cfg: LogConfig, enabled: bool, run_name: str,
                 total_steps: int, start_step: int, config_dict: dict[str, Any]):
        self.enabled = enabled
        self.file = None
        self.tb = None
        self.wandb = None
        self.bar = None
        if not enabled:
            return
        self.file = os.fdopen(open_metrics(Path(run_dir) / METRICS, start_step), "a", buffering=1,
                              encoding="utf-8")
        if cfg.tensorboard:
            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=start_step or None)
        if cfg.wandb:
            try:
                import wandb
            except ImportError:
                print("log.wandb is set but wandb is not installed (pip install wandb); skipping it",
                      file=sys.stderr)
            else:
                self.wandb = wandb.init(project=cfg.wandb_project or "continual-pt", name=run_name,
                                        id=run_name, resume="allow", config=config_dict, dir=str(run_dir))
        if cfg.progress:
            self.bar = tqdm(total=total_steps, initial=start_step, desc=run_name, unit="step",
                            dynamic_ncols=True, file=sys.stderr)

    def log(self, record: dict[str, Any]) -> None:
        """One JSON line; numeric fields also go to TensorBoard / W&B under kind/name, or under
        kind/set/name for a record of one held-out set and kind/set/domain/name for one of its domains
        (sets and domains must not overwrite each other)."""
        if not self.enabled:
            return
        self.file.write(json_line(record))
        prefix = "/".join(str(part) for part in (record.get("kind", "train"), record.get("set"), record.get("domain"))
                          if part)
        step = record.get("step", 0)
        numeric = {f"{prefix}/{k}": v for k, v in record.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "kind")}
        if self.tb is not None:
            for key, value in numeric.items():
                self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(numeric, step=step)

    def progress(self, step: int, postfix: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.refresh()

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.file is not None:
            self.file.close()
