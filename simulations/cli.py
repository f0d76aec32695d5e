"""``edgefl simulate``: run a scenario on Flower's simulation engine.

Registered on the root command by ``edgefl.cli``. Flower, torch and Ray are imported
only when the command runs, so ``edgefl --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from edgefl.clikit import JSON_OPTION, emit_json, exits_on_error

__all__ = ["simulate", "stdout_to_stderr"]


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send everything written to fd 1 (Ray, Flower, native libraries) to stderr.

    ``--json`` promises one JSON document on stdout; the simulation engine and its worker
    processes print there on their own, so fd 1 points at stderr until the run ends.
    """
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


@exits_on_error
def simulate(
    scenario: Annotated[
        Path,
        typer.Option(
            "--scenario",
            help="Scenario TOML file: a federation plan plus a simulation table (shipped: "
            "simulations/scenarios/*.toml; keys: README 'Laptop simulation').",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Output folder: reports, plots, registry.db.")],
    registry_url: Annotated[
        str | None,
        typer.Option(
            "--registry-url", help="Registry database URL (default: sqlite:///OUT/registry.db)."
        ),
    ] = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", help="Flower debug logs and Ray worker output.")
    ] = False,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Run a simulation scenario; write report.json, report.md and PNG plots to OUT.

    Exits 9 (after writing the reports) when fewer rounds trained than planned.
    """
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from edgefl.simulations.runner import RoundProgress, run_scenario
    from edgefl.simulations.scenario import load_scenario

    spec = load_scenario(scenario)
    rounds = spec.rounds * (2 if spec.simulation.compare_no_dp and spec.dp.enabled else 1)
    console = Console(stderr=True)
    with (
        Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} rounds"),
            TimeElapsedColumn(),
            console=console,
            transient=as_json,
        ) as bar,
        stdout_to_stderr(),
    ):
        task = bar.add_task(f"{spec.name}: starting the simulation engine", total=rounds)

        def on_round(p: RoundProgress) -> None:
            bar.update(
                task,
                completed=p.done,
                description=f"{spec.name} [{p.label}] round {p.round}: "
                f"acc {p.accuracy:.1%}, ε max {p.epsilon_max:.2f}",
            )

        report = run_scenario(
            spec, out, registry_url=registry_url, progress=on_round, verbose=verbose
        )
    if as_json:
        emit_json(report)
    else:
        typer.echo((out / "report.md").read_text(encoding="utf-8"))
    shortfalls = [
        f"{label}{run['shortfall']}"
        for label, run in (("", report), ("without DP: ", report.get("no_dp") or {}))
        if run.get("shortfall")
    ]
    if shortfalls:
        from edgefl.errors import RunFailedError

        raise RunFailedError(
            f"simulation {spec.name} did not complete: " + "; ".join(shortfalls),
            hint=f"the reasons per device are in {out / 'report.json'}",
        )
