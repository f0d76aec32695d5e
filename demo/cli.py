"""``edgefl demo``: the typer command (registered on the root by ``edgefl.cli``).

The heavy imports (the registry, torch for the cloud model) happen inside the command,
so ``edgefl --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgefl.clikit import JSON_OPTION, emit_json, exits_on_error

__all__ = ["demo"]


@exits_on_error
def demo(
    devices: Annotated[
        int, typer.Option("--devices", min=2, max=16, help="Agents to enroll, one process each.")
    ] = 4,
    rounds: Annotated[
        int, typer.Option("--rounds", min=1, max=50, help="DP federated rounds.")
    ] = 5,
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            help="Output folder: logs, state, report.md, plots (a previous demo's "
            "folder is replaced).",
        ),
    ] = Path("runs/demo"),
    keep_running: Annotated[
        bool,
        typer.Option(
            "--keep-running", help="After the report, keep everything running until Ctrl-C."
        ),
    ] = False,
    chaos: Annotated[
        bool,
        typer.Option(
            "--chaos",
            help="While results flow: kill -9 an agent and the broker, cut one agent's "
            "network; then show that nothing was lost or stored twice.",
        ),
    ] = False,
    broker_port: Annotated[
        int, typer.Option("--broker-port", min=0, max=65535, help="The broker's port (0: free).")
    ] = 0,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Run the whole system on this machine: server, agents, DP training, release, serving.

    Real components on loopback with embedded defaults (no config to write): SQLite
    registry, mosquitto with the shipped TLS config, SuperLink behind its proxy, ingest,
    model service, admin API and dashboard, and the cloud inference service. Stages:
    start the server, enroll the agents through the admit path, collect samples, train
    with DP-SGD, release (float + pruned int8, signed), roll out with a canary, serve with
    offload, report (OUT/report.md + plots), stop with no process left behind.

    Exits 9 naming the failed stage's component, its log's last line and the log's path.
    """
    from edgefl.demo.run import DemoOptions, run_demo

    summary = run_demo(
        DemoOptions(
            devices=devices,
            rounds=rounds,
            out=out,
            keep_running=keep_running,
            chaos=chaos,
            quiet=as_json,
            broker_port=broker_port,
        )
    )
    if as_json:
        emit_json(summary)
    else:
        typer.echo(
            f"report: {summary.get('out')}/report.md; final accuracy "
            f"{summary.get('final_accuracy', 0.0):.1%}, release v{summary.get('release_version')} "
            f"on {summary.get('agents_on_release')}/{summary.get('devices')} agents, records "
            f"sent {summary['records']['sent']} stored {summary['records']['stored']} "
            f"duplicates {summary['records']['duplicate_rows']}, leftover processes "
            f"{summary.get('leftover_processes')}, {summary.get('wall_s', 0.0):.0f} s"
        )
