"""Helpers every edgefl CLI command uses: error mapping and ``--json`` output.

Commands raise :class:`~edgefl.errors.EdgeflError`; :func:`exits_on_error` prints the
message (and what to do about it) on stderr and exits with the error's documented code,
both under ``typer``'s test runner and as a real process.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import typer

from edgefl.errors import EdgeflError, ExitCode

__all__ = ["JSON_OPTION", "emit_json", "error_console_print", "exits_on_error"]

P = ParamSpec("P")
R = TypeVar("R")

logger = logging.getLogger(__name__)

JSON_OPTION = typer.Option("--json", help="Print one JSON object on stdout instead of text.")


def error_console_print(message: str) -> None:
    """Print a message for humans on stderr."""
    print(message, file=sys.stderr, flush=True)


def exits_on_error(func: Callable[P, R]) -> Callable[P, R]:
    """Map edgefl errors to their exit codes and a readable message; never a traceback."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except EdgeflError as exc:
            error_console_print(f"error: {exc.message}")
            if exc.hint:
                error_console_print(f"hint: {exc.hint}")
            raise typer.Exit(int(exc.exit_code)) from exc
        except KeyboardInterrupt as exc:
            error_console_print("interrupted")
            raise typer.Exit(int(ExitCode.INTERRUPTED)) from exc

    return wrapper


def emit_json(payload: Any) -> None:
    """Write one JSON document to stdout (the only thing a ``--json`` command prints there)."""
    sys.stdout.write(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()
