"""Metrics sinks of a run (rank 0 only): metrics.jsonl, TensorBoard, Weights & Biases, a progress bar."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from continual_pt.config import LogConfig
from continual_pt.files import json_line


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
        self.file = open(Path(run_dir) / "metrics.jsonl", "a", buffering=1)
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
        """One JSON line; numeric fields also go to TensorBoard / W&B under kind/name."""
        if not self.enabled:
            return
        self.file.write(json_line(record))
        kind = record.get("kind", "train")
        step = record.get("step", 0)
        numeric = {f"{kind}/{k}": v for k, v in record.items()
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
