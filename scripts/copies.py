#!/usr/bin/env python3
"""Count copies of code that should exist once, by walking the AST of a source tree.

Each figure is a heuristic written down here, so a before/after comparison measures two
trees the same way (``--root`` measures another checkout):

- ``process_copies``: modules that start a child with ``subprocess.Popen`` *and* stop it
  themselves with a signal (``os.killpg``, ``os.kill``, ``.terminate()``, ``.kill()``,
  ``.send_signal()``). A module that only starts a process and hands it to the toolkit
  does not count.
- ``backoff_curves``: functions that compute a capped exponential delay (``2 ** n`` with
  a variable ``n``, or a value doubled: ``x *= 2`` / ``x = x * 2``, and a ``min()`` cap).
- ``free_port_helpers``: functions that bind a socket to port 0 to learn a free port.
- ``log_line_pickers``: functions whose name says they pick a log line
  (``last``/``tail``/``meaningful`` together with ``line``/``log``) and that do not just
  call another such function (a thin wrapper is not a copy).
- ``supervisors``: classes named ``*Supervisor`` plus functions named ``*check_children``
  (restart loops), by name.
- ``restart_delay_sites``: functions that call ``backoff_delay`` themselves: each keeps its
  own restart or reconnect state on the one curve.
- ``id_patterns``: string literals that spell the device/fleet id character class
  ``[A-Za-z0-9_-]``.
- ``topic_builder_modules``: modules with a string or f-string literal that starts with
  the fleet contract's topic root ``edgefl/`` (or ``{ROOT}/``, the root held in a name).

Usage: ``python scripts/copies.py [--json] [--root DIR]``.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
from collections.abc import Iterator
from pathlib import Path

FOLDERS = (
    "core",
    "server",
    "edge_agent",
    "proto",
    "quantize",
    "simulations",
    "tests",
    "benchmarks",
)
TEST_FOLDERS = ("tests/", "benchmarks/")
"""Each figure is given twice: for the product code, and ``*_in_tests`` for these."""
_SIGNAL_CALLS = {"killpg", "kill", "terminate", "send_signal"}
_PICKER = re.compile(r"(last|tail|meaningful).*(line|log)|(line|log).*(last|tail)", re.I)
_ID_CLASS = "[A-Za-z0-9_-]"


def _files(root: Path) -> Iterator[Path]:
    for folder in FOLDERS:
        base = root / folder
        if base.is_dir():
            yield from sorted(p for p in base.rglob("*.py") if "_pb2" not in p.name)


def _call_name(node: ast.Call) -> str:
    func = node.func
    if isinstance(func, ast.Attribute):
        return func.attr
    if isinstance(func, ast.Name):
        return func.id
    return ""


def _is_two(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and node.value in (2, 2.0)


def _exponential(fn: ast.AST) -> bool:
    """An exponential delay: ``2 ** n`` with a variable ``n``, or a doubling, capped by min()."""
    capped = any(isinstance(n, ast.Call) and _call_name(n) == "min" for n in ast.walk(fn))
    if not capped:
        return False
    for node in ast.walk(fn):
        if (
            isinstance(node, ast.BinOp)
            and isinstance(node.op, ast.Pow)
            and _is_two(node.left)
            and not isinstance(node.right, ast.Constant)
        ):
            return True
        if (
            isinstance(node, ast.AugAssign)
            and isinstance(node.op, ast.Mult)
            and _is_two(node.value)
        ):
            return True
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.value, ast.BinOp)
            and isinstance(node.value.op, ast.Mult)
            and (_is_two(node.value.right) or _is_two(node.value.left))
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
            and any(
                isinstance(side, ast.Name) and side.id == node.targets[0].id
                for side in (node.value.left, node.value.right)
            )
        ):
            return True
    return False


def _binds_port_zero(fn: ast.AST) -> bool:
    for node in ast.walk(fn):
        if isinstance(node, ast.Call) and _call_name(node) == "bind" and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Tuple) and len(arg.elts) == 2:
                port = arg.elts[1]
                if isinstance(port, ast.Constant) and port.value == 0:
                    return True
    return False


def _topic_fstring(node: ast.JoinedStr) -> bool:
    """``f"edgefl/..."``, or ``f"{ROOT}/..."`` with the root held in a ``*ROOT*`` name."""
    first = node.values[0]
    if isinstance(first, ast.Constant) and isinstance(first.value, str):
        return first.value.startswith("edgefl/")
    if (
        isinstance(first, ast.FormattedValue)
        and isinstance(first.value, ast.Name)
        and "ROOT" in first.value.id
        and len(node.values) > 1
    ):
        second = node.values[1]
        return isinstance(second, ast.Constant) and str(second.value).startswith("/")
    return False


def _functions(tree: ast.AST) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def measure(root: Path) -> dict[str, object]:
    """Figures and where each copy is, for the tree at ``root``."""
    found: dict[str, list[str]] = {
        "process_copies": [],
        "backoff_curves": [],
        "free_port_helpers": [],
        "log_line_pickers": [],
        "supervisors": [],
        "restart_delay_sites": [],
        "id_patterns": [],
        "topic_builder_modules": [],
    }
    for path in _files(root):
        rel = path.relative_to(root).as_posix()
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except SyntaxError:
            continue
        calls = {_call_name(n) for n in ast.walk(tree) if isinstance(n, ast.Call)}
        if "Popen" in calls and calls & _SIGNAL_CALLS:
            found["process_copies"].append(rel)
        for fn in _functions(tree):
            inner = [n for n in ast.walk(fn) if n is not fn and isinstance(n, ast.FunctionDef)]
            where = f"{rel}:{fn.name}"
            if _exponential(fn) and not any(_exponential(n) for n in inner):
                found["backoff_curves"].append(where)
            if _binds_port_zero(fn) and not any(_binds_port_zero(n) for n in inner):
                found["free_port_helpers"].append(where)
            called = {_call_name(n) for n in ast.walk(fn) if isinstance(n, ast.Call)}
            if _PICKER.search(fn.name) and not any(_PICKER.search(c) for c in called):
                found["log_line_pickers"].append(where)
            if "backoff_delay" in called:
                found["restart_delay_sites"].append(where)
            if fn.name.endswith("check_children"):
                found["supervisors"].append(where)
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.name.endswith("Supervisor"):
                found["supervisors"].append(f"{rel}:{node.name}")
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and _ID_CLASS in node.value
            ):
                found["id_patterns"].append(f"{rel}:{node.lineno}")
        topic = False
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                topic = topic or node.value.startswith("edgefl/")
            elif isinstance(node, ast.JoinedStr) and node.values:
                topic = topic or _topic_fstring(node)
        if topic:
            found["topic_builder_modules"].append(rel)
    figures: dict[str, object] = {}
    for name, places in found.items():
        figures[name] = sum(1 for p in places if not p.startswith(TEST_FOLDERS))
        figures[f"{name}_in_tests"] = sum(1 for p in places if p.startswith(TEST_FOLDERS))
    figures["where"] = found
    return figures


def main() -> None:
    """Print the figures as JSON or as a short table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    args = parser.parse_args()
    figures = measure(args.root.resolve())
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    where = figures["where"]
    assert isinstance(where, dict)
    for name, places in where.items():
        print(f"{name}: {figures[name]} (tests and benchmarks: {figures[name + '_in_tests']})")
        for place in places:
            print(f"    {place}")


if __name__ == "__main__":
    main()
