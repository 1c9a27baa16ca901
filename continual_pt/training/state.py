"""The trainer's mutable state: what a checkpoint records of the loop and what a resume restores;
and the failure that ends a run without saving it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class TrainState:
    """Where the run stands: optimizer steps taken, tokens trained on, non-finite batches skipped."""

    step: int = 0
    tokens_seen: int = 0
    nonfinite_skips: int = 0

    def advance(self, tokens: int) -> None:
        """One optimizer step over `tokens` tokens (all ranks together) is done."""
        self.step += 1
        self.tokens_seen += tokens

    def state_dict(self) -> dict[str, int]:
        """The keys a checkpoint's client state stores (readers of old checkpoints rely on them)."""
        return {"step": self.step, "tokens_seen": self.tokens_seen, "nonfinite_skips": self.nonfinite_skips}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from a checkpoint's client state."""
        self.step = state["step"]
        self.tokens_seen = state["tokens_seen"]
        # Checkpoints written before skipping existed have no count: none were skipped.
        self.nonfinite_skips = state.get("nonfinite_skips", 0)


class NonFiniteLoss(RuntimeError):
    """The loss (beyond train.max_nonfinite_skips) or the gradient norm went non-finite: the run stops
    without saving, the last committed checkpoint intact."""
