"""The run directory's and checkpoint's names and the exit statuses are spelled once, in
`continual_pt/layout.py`: a second literal anywhere else in the package is a rename waiting to
break a reader (`cpt sweep --status` once read markers by a copy of their name)."""

from __future__ import annotations

import argparse
import ast
import re

import pytest

from continual_pt import cli, layout
from tests.helpers import REPO

PACKAGE = REPO / "continual_pt"
NAMES = {value: name for name, value in vars(layout).items()
         if name.isupper() and isinstance(value, str)}
# Spelled inside a longer text (a message, a path, a pattern) they still name the protocol.
DISTINCT = [value for value in NAMES if not value.isalpha() or value == layout.TAG_PREFIX]
STATUSES = {value: name for name, value in vars(layout).items()
            if name.startswith("EXIT_") and isinstance(value, int)}
ALWAYS_STATUS = {v for v in STATUSES if v > 2}   # 75, 130: no other meaning in this package
STATUS_NAME = re.compile(r"(^|_)(status|exit|exitcode|rc)$", re.I)   # a subprocess's returncode may be any program's


def modules() -> dict[str, ast.Module]:
    return {str(p.relative_to(REPO)): ast.parse(p.read_text(encoding="utf-8"), str(p))
            for p in sorted(PACKAGE.rglob("*.py")) if p != PACKAGE / "layout.py"}


def docstrings(tree: ast.Module) -> set[int]:
    """ids of the string constants that are docstrings (of modules, classes, functions, attributes)."""
    found = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list):
            for stmt in body:
                if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) \
                        and isinstance(stmt.value.value, str):
                    found.add(id(stmt.value))
    return found


def field_names(tree: ast.Module) -> set[int]:
    """ids of the string constants that name a field of a record (dict keys, subscripts), not a file."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            found |= {id(k) for k in node.keys if k is not None}
        elif isinstance(node, ast.Subscript):
            found.add(id(node.slice))
    return found


def protocol_literals(path: str, tree: ast.Module) -> list[str]:
    skip = docstrings(tree) | field_names(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Constant) or id(node) in skip:
            continue
        value = node.value
        if isinstance(value, str) and (value in NAMES or any(name in value for name in DISTINCT)):
            hit = NAMES.get(value) or next(NAMES[n] for n in DISTINCT if n in value)
            found.append(f"{path}:{node.lineno}: {value!r} (layout.{hit})")
        elif type(value) is int and value in ALWAYS_STATUS:
            found.append(f"{path}:{node.lineno}: {value} (layout.{STATUSES[value]})")
    return found


def command_functions() -> set[str]:
    """The qualified names of the functions the `cpt` subcommands call (their results are exit statuses)."""
    targets = set()

    def walk(parser):
        if parser.get_default("target"):
            targets.add(parser.get_default("target").replace(":", "."))
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    walk(sub)

    walk(cli.build_parser())
    return targets


def returns_a_status(func: ast.FunctionDef) -> bool:
    """A function that returns a layout.EXIT_* name somewhere: all its int returns are statuses."""
    return any(isinstance(node, ast.Return) and isinstance(node.value, (ast.Name, ast.Attribute))
               and (getattr(node.value, "id", None) or getattr(node.value, "attr", "")) in STATUSES.values()
               for node in ast.walk(func))


def status_literals(path: str, tree: ast.Module, commands: set[str]) -> list[str]:
    """0/1/2 where they are exit statuses: returned by a command or a status-returning function,
    compared (==, !=, in) with a status, or given to sys.exit."""
    module = path.removesuffix(".py").replace("/", ".")
    found = []
    for func in ast.walk(tree):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if f"{module}.{func.name}" in commands or func.name == "main" or returns_a_status(func):
            found += [f"{path}:{n.lineno}: return {n.value.value} in {func.name}()" for n in ast.walk(func)
                      if isinstance(n, ast.Return) and isinstance(n.value, ast.Constant)
                      and type(n.value.value) is int]
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and all(isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn))
                                                 for op in node.ops):
            sides = [node.left, *node.comparators]
            named = [s for s in sides if STATUS_NAME.search(getattr(s, "id", None) or getattr(s, "attr", "") or "")]
            ints = [c for s in sides for c in (s.elts if isinstance(s, ast.Tuple) else [s])
                    if isinstance(c, ast.Constant) and type(c.value) is int]
            if named and ints:
                found.append(f"{path}:{node.lineno}: a status compared with {ints[0].value}")
        if isinstance(node, ast.Call) and ast.unparse(node.func) in ("sys.exit", "exit") \
                and node.args and isinstance(node.args[0], ast.Constant):
            found.append(f"{path}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_the_layout_names_what_every_room_agrees_on():
    assert {"COMMITTED.json", "latest", "run.lock", "STOP", "STOP.done", "universal", "branches"} <= set(NAMES)
    assert STATUSES == {0: "EXIT_OK", 1: "EXIT_FAILED", 2: "EXIT_USAGE", 75: "EXIT_RESUMABLE",
                        130: "EXIT_INTERRUPTED"}
    assert layout.tag_for(1200) == "global_step1200" and layout.step_of("global_step1200") == 1200
    assert layout.step_of("global_step12.tmp") is None and layout.step_of("universal") is None


def test_no_protocol_name_is_spelled_outside_the_layout():
    offences = [line for path, tree in modules().items() for line in protocol_literals(path, tree)]
    assert not offences, "use the names in continual_pt/layout.py:\n" + "\n".join(offences)


def test_no_exit_status_is_spelled_outside_the_layout():
    commands = command_functions()
    assert len(commands) >= 15, commands
    offences = [line for path, tree in modules().items() for line in status_literals(path, tree, commands)]
    assert not offences, "use the EXIT_* names in continual_pt/layout.py:\n" + "\n".join(offences)


@pytest.mark.parametrize("source, expected", [
    ('MARKER = "COMMITTED.json"\n', 1),
    ('def f(root):\n    return root / "latest"\n', 1),
    ('def f(n):\n    return f"global_step{n}"\n', 1),
    ('def f(d):\n    """The run.lock of d."""\n    return d\n', 0),            # prose in a docstring
    ('def f(record):\n    return record["checkpoints"], {"checkpoints": 3}\n', 0),   # a record's field
    ("def f():\n    return 75\n", 1),
    ("def f(x):\n    return x * 1.75\n", 0),
])
def test_the_name_scan_catches_a_second_spelling(source, expected):
    assert len(protocol_literals("m.py", ast.parse(source))) == expected


@pytest.mark.parametrize("source, expected", [
    ("def run_x(options):\n    return 0\n", 1),                                # a command's status
    ("def f():\n    if x:\n        return EXIT_OK\n    return 1\n", 1),       # beside a named status
    ("def f(status):\n    return status != 0\n", 1),
    ("def f(status):\n    return status < 0\n", 0),                           # killed by a signal: not a status
    ("def f(status):\n    return status in (0, 75)\n", 1),
    ("import sys\nsys.exit(2)\n", 1),
    ("def count(xs):\n    return 0 if not xs else len(xs)\n", 0),            # a number, not a status
])
def test_the_status_scan_catches_a_literal_status(source, expected):
    assert len(status_literals("m.py", ast.parse(source), {"m.run_x"})) == expected
