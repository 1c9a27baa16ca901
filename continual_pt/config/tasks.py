"""`eval.lm_eval` of a run config: the downstream tasks its eval array scores besides the held-out sets."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from continual_pt.config.typed import Problems


@dataclass
class LmEvalConfig:
    """Downstream tasks of lm-evaluation-harness scored on each committed checkpoint by the run's eval array
    (`cpt eval --claim`: launch/slurm/eval.sbatch, chained to the training job by `cpt sweep --submit`),
    never in the training loop. The fields are `cpt eval`'s --lm-eval, --lm-eval-limit, --num-fewshot,
    --lm-eval-batch-size and --include-path."""

    tasks: list[str] = field(default_factory=list)
    """Tasks, groups or tags of the harness or of `include_path`, e.g. [hellaswag, arc_easy]."""
    limit: int | float | None = None
    """Documents per task: a count, or a fraction below 1; unset scores them all (a limited score is
    another measurement than the full one)."""
    num_fewshot: int | None = None
    """Few-shot examples per document; unset: each task's own."""
    batch_size: int | str = 1
    """Documents per forward pass: a count, auto or auto:N."""
    include_path: list[str] = field(default_factory=list)
    """Folders of task YAML files of your own (local data files need no network)."""

    def requests(self) -> list[str]:
        """The task names, once each (an entry may list several, comma-separated, as --lm-eval does)."""
        return list(dict.fromkeys(n.strip() for t in self.tasks for n in t.split(",")))

    def check(self, p: Problems) -> None:
        key = "eval.lm_eval"
        if not self.tasks:
            p.add(f"{key}.tasks", "empty: name the tasks to score, or leave eval.lm_eval out")
        elif "" in self.requests():
            p.add(f"{key}.tasks", f"an empty task name in {self.tasks}")
        if isinstance(self.limit, float) and self.limit >= 1 and self.limit.is_integer():
            self.limit = int(self.limit)
        if self.limit is not None and (self.limit <= 0 or isinstance(self.limit, float) and self.limit >= 1):
            p.add(f"{key}.limit", f"expected a count of documents (e.g. 100) or a fraction below 1 (e.g. 0.1), "
                  f"got {self.limit}")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            p.add(f"{key}.num_fewshot", f"must be >= 0, got {self.num_fewshot}")
        if isinstance(self.batch_size, str) and self.batch_size.isdigit():
            self.batch_size = int(self.batch_size)
        if not re.fullmatch(r"[1-9][0-9]*|auto(:[0-9]+)?", str(self.batch_size)):
            p.add(f"{key}.batch_size", f"expected a count >= 1, auto or auto:N, got {self.batch_size!r}")
        if "" in self.include_path:
            p.add(f"{key}.include_path", "an empty folder name")
