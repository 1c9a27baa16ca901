"""Lengths of schedule phases: optimizer steps (int), a fraction of the run (float in [0, 1]) or "N%"."""

from __future__ import annotations

from typing import Protocol

# A length in optimizer steps: an int (steps), a float in [0, 1] (fraction of the run) or "N%".
Length = int | float | str


class ProblemSink(Protocol):
    """Where checks record what is wrong (the config's `Problems` gathers them with their origin)."""

    def add(self, key: str, message: str) -> None: ...


def resolve_length(value: Length | None, total_steps: int, *, default: int = 0) -> int:
    """Steps from a length given as steps (int), fraction of the run (float) or "N%"."""
    if value is None:
        return default
    if isinstance(value, bool):
        raise ValueError(f"expected steps, a fraction or 'N%', got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        text = value.strip()
        if not text.endswith("%"):
            raise ValueError(f"expected steps, a fraction or 'N%', got {value!r}")
        return int(round(float(text[:-1]) / 100.0 * total_steps))
    return int(round(float(value) * total_steps))


def check_length(problems: ProblemSink, key: str, value: Length | None, total_steps: int) -> int | None:
    """Validate a Length field and return its value in steps (None if unset or invalid)."""
    if value is None:
        return None
    if isinstance(value, float) and not 0.0 <= value <= 1.0:
        problems.add(key, f"a fraction of the run must lie in [0, 1], got {value!r} "
                          "(write an int for a number of steps, or 'N%')")
        return None
    try:
        steps = resolve_length(value, total_steps)
    except ValueError as exc:
        problems.add(key, str(exc))
        return None
    if steps < 0:
        problems.add(key, f"must not be negative, got {value!r}")
        return None
    return steps
