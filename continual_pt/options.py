"""One declaration per command-line option.

Each `cpt` command takes one options dataclass, declared beside the stage that does the work
(`data/options.py`, `evaluation/options.py`, ...), whose fields are declared with `option()`:
the default and the type are the field's own, the help, flags and choices its metadata. `cpt`'s
parser is built from these fields (`cli.py`), so a default, a type or a choice cannot disagree
between the command line and the code that receives it; the parser adds "(default: X)" to the help
of a field whose default is a value, so no help text spells a default either.

No argparse here (only `cli.py` knows it) and no torch: the parser reads every command's options.
"""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING, dataclass
from typing import Any

REST = "..."
"""`nargs` of a positional that takes the rest of the command line (argparse.REMAINDER)."""


@dataclass(frozen=True)
class Option:
    """How a dataclass field appears on the command line."""

    help: str
    flags: tuple[str, ...] = ()
    """Its names, e.g. ("--source", "-s"); default: --<field-name> with dashes. Empty for a positional."""
    positional: bool = False
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    nargs: str | None = None
    """For a positional list: "+" (one or more), "*" (any) or REST."""
    group: str | None = None
    """The title of the group it is listed under in --help (the dataclass's GROUPS describe them)."""
    exclusive: str | None = None
    """Options with the same name here are mutually exclusive."""


def option(default: Any = MISSING, *, help: str, flags: tuple[str, ...] = (), positional: bool = False,
           metavar: str | None = None, choices: tuple[str, ...] | None = None, nargs: str | None = None,
           group: str | None = None, exclusive: str | None = None) -> Any:
    """A dataclass field that is also a command-line option (no default: a required one).

    A list default (always empty) becomes a fresh list per instance."""
    meta = {"option": Option(help, tuple(flags), positional, metavar, choices, nargs, group, exclusive)}
    if isinstance(default, list):
        if default:
            raise ValueError("a list option's default is empty: it collects what the command line gives")
        return dataclasses.field(default_factory=list, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def declared(field: dataclasses.Field) -> Option | None:
    """The command-line declaration of a dataclass field, if it has one."""
    return field.metadata.get("option")


def default_of(field: dataclasses.Field) -> Any:
    """A field's default value (a fresh one for a factory), MISSING for a required field."""
    if field.default_factory is not MISSING:
        return field.default_factory()
    return field.default


def shows_default(value: Any) -> bool:
    """Whether --help states this default: a value, not None, False or an empty list."""
    return value is not MISSING and value is not None and value is not False and value != []


@dataclass(kw_only=True)
class ConfigSource:
    """Where a run config comes from: a YAML file (optional) and dotted overrides, applied in order
    (the options of `cpt train` and `cpt config`; `config.load_source` resolves them)."""

    config: str | None = option(None, help="run config YAML (see configs/)", flags=("--config", "-c"))
    overrides: list[str] = option([], help="dotted overrides applied after the file, e.g. schedule.max_lr=6e-4 "
                                  "train.max_steps=100", positional=True, nargs="*", metavar="key=value")
