"""The ``edgefl`` command: one Typer root with a sub-app per component.

Sub-apps import their heavy dependencies (torch, converters, runtimes) inside the
commands, so ``edgefl --help`` stays fast on a device.
"""

from __future__ import annotations

from typing import Annotated

import typer

from edgefl import __version__
from edgefl.demo.cli import demo
from edgefl.edge_agent.cli import app as agent_app
from edgefl.logs import configure_logging
from edgefl.quantize.cli import app as quantize_app
from edgefl.server.cli import app as server_app
from edgefl.simulations.cli import simulate

__all__ = ["app", "main"]

app = typer.Typer(
    name="edgefl",
    help=(
        "Edge-cloud federated learning with a device agent.\n\n"
        "Exit codes: 0 ok, 1 internal error, 2 usage, 3 invalid config, 4 bad input, "
        "5 corrupt artifact, 6 verification failed, 7 runtime unavailable, 8 service "
        "unavailable, 9 run failed, 130 interrupted."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(quantize_app, name="quantize")
app.add_typer(agent_app, name="agent")
app.add_typer(server_app, name="server")
app.command("simulate")(simulate)
app.command("demo")(demo)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"edgefl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    log_level: Annotated[
        str, typer.Option("--log-level", envvar="EDGEFL_LOG_LEVEL", help="DEBUG, INFO, WARNING…")
    ] = "WARNING",
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    configure_logging(log_level)


def main() -> None:
    """Console-script entry point."""
    app()
