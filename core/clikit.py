"""Helpers every edgefl CLI command uses: error mapping, ``--json`` output and tables.

Commands raise :class:`~edgefl.errors.EdgeflError`; :func:`exits_on_error` prints the
message (and what to do about it) on stderr and exits with the error's documented code,
both under ``typer``'s test runner and as a real process. Listings for people go through
:func:`print_table` (``rich``), never through columns padded by hand.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, ParamSpec, TypeVar

import typer

from edgefl.errors import EdgeflError, ExitCode

__all__ = [
    "JSON_OPTION",
    "Column",
    "emit_json",
    "error_console_print",
    "exits_on_error",
    "print_table",
]

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


Column = tuple[str, Literal["left", "right"]]
"""A table column's header and justification."""


def print_table(
    columns: Sequence[Column], rows: Iterable[Sequence[object]], *, title: str | None = None
) -> None:
    """Print ``rows`` (one value per column, ``None`` shown as ``-``) as a table on stdout.

    A ``rich`` table; when stdout is not a terminal (a pipe, a log file, a test runner) it
    is never wrapped or cropped and has no colour codes, so every row stays whole. Values
    are printed as they are (never read as ``rich`` markup).
    """
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=1000, no_color=True)
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, title=title)
    if title is not None:
        table.title_justify = "left"
    for header, justify in columns:
        table.add_column(header, justify=justify, no_wrap=True)
    for row in rows:
        # Text, not markup: a value such as "[x]" is printed as it is.
        table.add_row(*(Text("-" if value is None else str(value)) for value in row))
    console.print(table)
