"""The package's shape holds: light modules stay light, imports go down the floors without circles,
only cli.py imports lazily or knows argparse, modules and functions stay short, and every parsed
option reaches the function that does the work."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import subprocess
import sys
import typing
from dataclasses import MISSING
from pathlib import Path

import pytest

from continual_pt import cli
from continual_pt.options import declared, default_of, shows_default
from tests.helpers import REPO

PACKAGE = REPO / "continual_pt"
HEAVY = ("torch", "deepspeed", "matplotlib")
# Lowest first: a module may import from its own floor and the floors below it.
FLOORS = (("errors", "files", "layout", "options", "__init__"), ("schedules",), ("config",), ("data",), ("runtime",),
          ("model",), ("checkpoint",), ("evaluation",), ("results",), ("training",), ("sweep",), ("demo",),
          ("cli", "train", "evaluate"))
LAZY_ALLOWED = ("wandb", "mpi4py", "lm_eval")   # optional packages that may be absent
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 50


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
TREES = {name: ast.parse(path.read_text(encoding="utf-8"), str(path)) for name, path in MODULES.items()}


def where(name: str, node: ast.AST) -> str:
    return f"{MODULES[name].relative_to(REPO)}:{node.lineno}"


def floor(name: str) -> int:
    parts = name.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    return next(i for i, keys in enumerate(FLOORS) if key in keys)


def imported(name: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The continual_pt modules an import statement of module `name` loads by name."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "continual_pt"]
    base = node.module or ""
    if node.level:   # relative: from the module's package, one level up per extra dot
        package = name.split(".") if MODULES[name].name == "__init__.py" else name.split(".")[:-1]
        base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
    if base.split(".")[0] != "continual_pt":
        return []
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def import_edges() -> dict[str, dict[str, str]]:
    """module -> {imported module: file:line of the first statement importing it}."""
    edges: dict[str, dict[str, str]] = {name: {} for name in MODULES}
    for name, tree in TREES.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in imported(name, node):
                    if target in MODULES and target != name:
                        edges[name].setdefault(target, where(name, node))
    return edges


def reachable(edges: dict[str, dict[str, str]], start: str) -> set[str]:
    """Every module that `start` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for target in edges[todo.pop()]:
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def shortest_cycle(edges: dict[str, dict[str, str]], start: str) -> list[str]:
    """The shortest circle of imports from `start` back to itself (breadth first)."""
    paths, todo = {start: [start]}, [start]
    for node in todo:
        for target in edges[node]:
            if target == start:
                return paths[node]
            if target not in paths:
                paths[target] = paths[node] + [target]
                todo.append(target)
    raise AssertionError(f"{start} is on no circle")


def find_cycles(edges: dict[str, dict[str, str]]) -> list[list[str]]:
    """One circle per group of modules that import each other, directly or not."""
    reach = {name: reachable(edges, name) for name in edges}
    cycles, covered = [], set()
    for name in sorted(edges):
        if name in reach[name] and name not in covered:
            covered |= {other for other in reach[name] if name in reach[other]}
            cycles.append(shortest_cycle(edges, name))
    return cycles


def inner_imports(tree: ast.AST) -> dict[ast.AST, str]:
    """Every import statement inside a function or method body -> the innermost function's name."""
    found = {}
    for func in ast.walk(tree):   # breadth first: an inner function overwrites its outer one
        if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for stmt in func.body:
                for node in ast.walk(stmt):
                    if isinstance(node, (ast.Import, ast.ImportFrom)):
                        found[node] = func.name
    return found


@pytest.mark.parametrize("module", ["continual_pt.config", "continual_pt.cli", "continual_pt.schedules"])
def test_light_modules_import_no_torch_deepspeed_or_matplotlib(module):
    code = (f"import json, sys, {module}\n"
            f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    heavy = json.loads(proc.stdout.strip().splitlines()[-1])
    assert heavy == [], f"import {module} loads {', '.join(heavy)}"


def test_the_package_imports_have_no_circle():
    edges = import_edges()
    cycles = find_cycles(edges)
    described = [" -> ".join(f"{a} ({edges[a][b]})" for a, b in zip(c, c[1:] + c[:1])) + f" -> {c[0]}"
                 for c in cycles]
    assert not described, "import circles:\n" + "\n".join(described)


def test_imports_go_down_the_floors():
    offences = []
    for name, targets in import_edges().items():
        for target, at in targets.items():
            if floor(target) > floor(name):
                offences.append(f"{at}: {name} imports {target}, a higher floor")
    assert not offences, "\n".join(offences)


def test_only_cli_knows_argparse():
    offences = []
    for name, tree in TREES.items():
        if name == "continual_pt.cli":
            continue
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            if any(n.split(".")[0] == "argparse" for n in names):
                offences.append(f"{where(name, node)}: imports argparse")
    assert not offences, "\n".join(offences)


def test_no_imports_inside_functions_but_optional_packages():
    offences = []
    for name, tree in TREES.items():
        if name == "continual_pt.cli":
            continue
        for node, func in inner_imports(tree).items():
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                names = ["." * node.level + (node.module or "")]
            if any(n.split(".")[0] not in LAZY_ALLOWED for n in names):
                offences.append(f"{where(name, node)}: {', '.join(names)} imported inside {func}()")
    assert not offences, "\n".join(offences)


def test_modules_stay_short():
    long = [f"{MODULES[name].relative_to(REPO)}: {n} lines" for name in MODULES
            if (n := len(MODULES[name].read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES]
    assert not long, f"modules over {MAX_MODULE_LINES} lines:\n" + "\n".join(long)


def test_functions_stay_short():
    long = []
    for name, tree in TREES.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{where(name, node)}: {node.name}() has {n} lines")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


def subcommands(parser: argparse.ArgumentParser, path: tuple[str, ...] = (), dests: tuple[str, ...] = ()):
    """(words, parser, its dests and those of its parent subcommands) for every subcommand with a target."""
    own = [a for a in parser._actions if not isinstance(a, argparse._SubParsersAction)]
    dests = dests + tuple(a.dest for a in own if path and a.dest not in ("help", "target"))
    if parser.get_default("target"):
        yield path, parser, dests
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for word, sub in action.choices.items():
                yield from subcommands(sub, path + (word,), dests)


def test_every_parsed_option_reaches_its_function():
    found, problems = [], []
    for words, parser, dests in subcommands(cli.build_parser()):
        command = "cpt " + " ".join(words)
        found.append(command)
        func = cli.target_function(parser.get_default("target"))
        params = list(inspect.signature(func).parameters)
        options = typing.get_type_hints(func).get(params[0]) if len(params) == 1 else None
        if not (isinstance(options, type) and dataclasses.is_dataclass(options)):
            problems.append(f"{command}: {func.__qualname__} does not take one options dataclass")
            continue
        if parser.get_default("options") is not options:
            problems.append(f"{command}: parsed into {parser.get_default('options')}, but {func.__qualname__} "
                            f"takes {options.__name__}")
        fields = dataclasses.fields(options)
        names = {f.name for f in fields}
        dropped = [d for d in dests if d not in names]
        if dropped:
            problems.append(f"{command}: {options.__name__} has no field for {', '.join(dropped)}")
        unfilled = [f.name for f in fields if f.name not in dests and f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING]
        if unfilled:
            problems.append(f"{command}: required field(s) {', '.join(unfilled)} are no option")
    assert {"cpt train", "cpt schedule plot", "cpt schedule show", "cpt tokenizer train"} <= set(found), found
    assert not problems, "\n".join(problems)


def test_every_option_is_declared_once_and_the_parser_agrees_with_it():
    """The parser is built from the options dataclasses: its defaults, types and choices are the fields'
    own, and no help text spells a default the parser states itself."""
    problems = []
    for words, parser, _ in subcommands(cli.build_parser()):
        command, cls = "cpt " + " ".join(words), parser.get_default("options")
        actions = {a.dest: a for a in parser._actions}
        for field in dataclasses.fields(cls):
            opt, default = declared(field), default_of(field)
            if opt is None:
                problems.append(f"{command}: {cls.__name__}.{field.name} is not declared with option()")
                continue
            action = actions[field.name]
            parsed = MISSING if action.required and default is MISSING else action.default
            if parsed != default or (default is MISSING and not action.required):
                problems.append(f"{command}: {field.name} defaults to {parsed!r} on the command line, "
                                f"{default!r} in {cls.__name__}")
            if tuple(action.choices or ()) != tuple(opt.choices or ()):
                problems.append(f"{command}: {field.name} choices {action.choices} vs {opt.choices}")
            kind = str(field.type).removesuffix(" | None")
            if kind in ("int", "float") and action.type is not eval(kind):
                problems.append(f"{command}: {field.name} is {kind} but parsed as {action.type}")
            if shows_default(default) and "default" in opt.help:
                problems.append(f"{command}: the help of {field.name} spells a default; the parser adds it")
            if shows_default(default) and not opt.positional and f"(default: {default})" not in action.help:
                problems.append(f"{command}: --help does not state {field.name}'s default {default!r}")
    assert not problems, "\n".join(problems)


def test_a_changed_dataclass_default_changes_the_command_line(monkeypatch):
    """What the test above relies on: the parser reads the default from the field, at build time."""
    from continual_pt.data.options import TokenizerOptions

    field = next(f for f in dataclasses.fields(TokenizerOptions) if f.name == "vocab_size")
    monkeypatch.setattr(field, "default", 1234)
    args = cli.build_parser().parse_args(["tokenizer", "train", "--source", "x", "--out", "y"])
    assert cli.options_from(args).vocab_size == 1234
