"""`cpt sweep --submit`."""

from __future__ import annotations

from typing import Any

from continual_pt.errors import UserError
from continual_pt.sweep.grid import Sweep


def submit_sweep(sweep: Sweep, opts: Any) -> int:
    """Submit each run through SLURM with its eval array chained."""
    raise UserError("cpt sweep --submit: not available in this version")
