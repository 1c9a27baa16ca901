"""Errors a user can cause and fix: the `cpt` command prints them as one message and exits 2.

Input with several problems (a config, a sweep grid, a command's options) is judged whole: a
`Problems` gathers every problem, each naming where it is, and raises them at once.
"""

from __future__ import annotations

from collections.abc import Iterable


class UserError(Exception):
    """Bad input (a missing file, a corrupt shard, a mismatched tokenizer), named precisely."""


class InvalidInput(UserError):
    """Every problem found in one input, one per line."""

    def __init__(self, problems: Iterable[str], what: str = "input"):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid {what} ({len(self.problems)} problem(s)):\n{lines}")


class Problems:
    """Gathers the problems of one input, each as `origin: key: message`, and raises them together.

    `origins` maps a dotted key to where its value came from (a file, "command line"); a key without
    one, or a parent with one, is from `default_origin`. With `one_per_key`, a key keeps its first
    problem only (a value that failed to convert is not judged again by range checks)."""

    def __init__(self, what: str = "input", origins: dict[str, str] | None = None, default_origin: str = "",
                 one_per_key: bool = False, error: type[InvalidInput] = InvalidInput):
        self.what = what
        self.items: list[str] = []
        self.keys: set[str] = set()
        self.origins = origins or {}
        self.default_origin = default_origin
        self.one_per_key = one_per_key
        self.error = error

    def origin(self, key: str) -> str:
        """The most specific recorded origin of this key or of a parent of it."""
        parts = key.split(".")
        for n in range(len(parts), 0, -1):
            found = self.origins.get(".".join(parts[:n]))
            if found:
                return found
        return self.default_origin

    def add(self, key: str, message: str) -> None:
        """One problem of `key` (empty: the message names what it is about itself)."""
        if self.one_per_key and key in self.keys:
            return
        self.keys.add(key)
        self.items.append(": ".join(part for part in (self.origin(key), key, message) if part))

    def extend(self, items: Iterable[str]) -> None:
        """Problems already worded in full (e.g. those of an error raised by a nested check)."""
        self.items.extend(items)

    def __len__(self) -> int:
        return len(self.items)

    def raise_if_any(self) -> None:
        if self.items:
            raise self.error(self.items, self.what)
