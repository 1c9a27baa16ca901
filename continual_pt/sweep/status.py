"""`cpt sweep --status`."""

from __future__ import annotations

from continual_pt.errors import UserError
from continual_pt.sweep.grid import Sweep


def show_status(sweep: Sweep) -> int:
    """Print each run's state."""
    raise UserError("cpt sweep --status: not available in this version")
