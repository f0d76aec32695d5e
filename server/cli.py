"""``edgefl server``: the typer app and its commands, wired to the modules doing the work.

This module only parses options and prints; each job lives where it can be typed and
tested on its own:

- :mod:`edgefl.server.config`: the one server config file (server.yaml), whose sections
  every command with ``-c`` reads (``start``, ``ingest``, ``devices``, ``inference`` and
  the admin commands);
- :mod:`edgefl.server.admin`: the typed :class:`~edgefl.server.admin.AdminContext` (fleet CA,
  registry, SuperLink) the admin commands open, the ingest's settings, the device listing;
- :mod:`edgefl.server.runs`: submitting, following (with a deadline) and reporting a
  federated run for ``train``;
- :func:`edgefl.clikit.print_table`: the tables printed for people (``--json`` for programs).

The commands themselves are grouped by job too: the processes and the registry (``start``,
``ingest``, ``devices``) here, ``inference`` in :mod:`edgefl.server.cli_inference`, the
enrollment commands in :mod:`edgefl.server.cli_enroll`, ``train`` in
:mod:`edgefl.server.cli_train`, ``release`` and ``releases`` in
:mod:`edgefl.server.cli_release`, ``deploy`` in :mod:`edgefl.server.cli_deploy`, the staged
``rollout``, ``rollouts``, ``rollout-status`` and ``results`` in
:mod:`edgefl.server.cli_rollout`; each
is a typer app whose commands join this one at the
top level (``add_typer`` without a name), and the shared ``-c`` options are in
:mod:`edgefl.server.cli_common`.

Imports of heavy modules happen inside the commands, so ``edgefl --help`` stays quick.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from edgefl.clikit import JSON_OPTION, emit_json, exits_on_error
from edgefl.server import (
    cli_admin,
    cli_deploy,
    cli_enroll,
    cli_fleet,
    cli_inference,
    cli_jobs,
    cli_maintenance,
    cli_release,
    cli_rollout,
    cli_train,
)
from edgefl.server.cli_common import RegistryConfigOption, ServerConfigOption, server_config
from edgefl.server.cli_ops import RemoteOptions, remote_options

__all__ = ["app"]

app = typer.Typer(
    help="Cloud side: the supervised server (broker, SuperLink, ingest), device enrollment, "
    "federated runs, the device registry and the gRPC inference service.",
    no_args_is_help=True,
)


@app.command()
@exits_on_error
def ingest(
    config: RegistryConfigOption = None,
    broker_port: Annotated[int | None, typer.Option(help="Override broker.port.")] = None,
    db_url: Annotated[str | None, typer.Option(help="Override db_url (SQLAlchemy URL).")] = None,
) -> None:
    """Consume fleet messages into the registry until SIGTERM (defaults: local broker, SQLite).

    With server.yaml, the ingest dials the server's broker with the edgefl-ingest service
    certificate and stores into the server's registry, like `server start` does.
    """
    from edgefl.server.admin import ingest_settings
    from edgefl.server.ingest import Ingest

    Ingest(ingest_settings(config, {"broker_port": broker_port, "db_url": db_url})).run()


@app.command()
@exits_on_error
@remote_options
def devices(
    remote: RemoteOptions,
    config: RegistryConfigOption = None,
    db_url: Annotated[str | None, typer.Option(help="Override db_url (SQLAlchemy URL).")] = None,
    fleet: Annotated[str | None, typer.Option(help="Only devices of this fleet.")] = None,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """List devices: presence, last seen (UTC), records, the model each reports, agent, ε, outbox.

    The model columns come from the device's retained state/reported (model, version,
    state, rollbacks, last failure); `-` for a device that has not reported one. `agent`
    is the edgefl version it reports, `ε` what it spent over every run (the sum of its
    ledger ε per run; `server privacy` composes them tighter), `outbox` the records its
    outbox held at its newest report (telemetry/agent, every agent_report_s while
    connected, or an answer to `server command DEVICE status`).
    """
    from edgefl.clikit import print_table
    from edgefl.server.cli_fleet import call_op

    args: dict[str, Any] = {"fleet": fleet} if fleet is not None else {}
    rows = call_op(
        "devices", args, config=config, remote=remote, db_url=db_url, registry_file=True
    )["devices"]
    if as_json:
        emit_json({"devices": rows})
        return
    if not rows:
        typer.echo("no devices in the registry (the ingest adds each as it reports)")
        return
    print_table(
        [
            ("device", "left"),
            ("fleet", "left"),
            ("presence", "left"),
            ("last seen", "left"),
            ("records", "right"),
            ("model", "left"),
            ("version", "right"),
            ("state", "left"),
            ("rollbacks", "right"),
            ("last failure", "left"),
            ("agent", "left"),
            ("ε", "right"),
            ("outbox", "right"),
        ],
        [
            (
                row["device_id"],
                row["fleet"],
                "online" if row["online"] else "offline",
                row["last_seen"],
                row["records"],
                row["model"],
                row["version"],
                row["state"],
                row["rollbacks"],
                _last_failure_cell(row["last_failure"]),
                row.get("agent_version"),
                None if row.get("epsilon") is None else f"{row['epsilon']:.3f}",
                None if not row.get("outbox") else row["outbox"]["depth"],
            )
            for row in rows
        ],
    )


def _last_failure_cell(failure: dict[str, Any] | None) -> str | None:
    """``v4 golden_mismatch at 2026-12-06T08:00:00+00:00`` (the detail is in --json)."""
    if failure is None:
        return None
    version = f"v{failure['version']} " if failure["version"] is not None else ""
    at = f" at {failure['at']}" if failure["at"] else ""
    return f"{version}{failure['reason']}{at}"


@app.command()
@exits_on_error
def start(
    config: ServerConfigOption = None,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="Print one JSON line when ready (addresses, ports, PIDs)."),
    ] = False,
) -> None:
    """Run the fleet CA, registry, mosquitto, flower-superlink and the ingest until SIGTERM.

    Children that die are restarted with backoff; the broker restarts when the CRL
    changes (a revocation). Start-up progress goes to stderr.
    """
    import json

    from edgefl.clikit import error_console_print
    from edgefl.server.serve import Server

    server = Server(server_config(config), progress=error_console_print, config_path=config)

    def ready(srv: Server) -> None:
        info = srv.info()
        if as_json:
            # One line, so a supervisor can read it with readline() while we keep running.
            typer.echo(json.dumps(info, sort_keys=True))
            return
        broker = info["broker"]
        typer.echo(
            f"edgefl server ready: SuperLink {info['superlink']}, "
            f"broker {broker['host']}:{broker['port']}"
            f"{'' if broker['managed'] else ' (external)'}, registry {info['db_url']}, "
            f"CA {info['ca_dir']}"
            + (f", admin API {info['admin']['url']}" if info.get("admin") else "")
        )

    server.run(on_ready=ready)


@app.command("validate-config")
@exits_on_error
def validate_config(
    config: Annotated[
        Path, typer.Option("--config", "-c", help="Server config file (YAML, TOML or JSON).")
    ],
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Check a server config file; exits 3 naming each bad key, and reports each renamed key."""
    from edgefl.config import config_renames
    from edgefl.server.registry.db import display_url

    cfg = server_config(config)
    renames = config_renames(cfg)
    if as_json:
        shown = cfg.model_dump(mode="json")  # SecretStr values come out masked
        # Database URLs are plain strings: their passwords are masked here.
        for section in (shown, shown["ingest"]):
            if section.get("db_url"):
                section["db_url"] = display_url(section["db_url"])
        for section in (shown["inference"], shown["models"]):
            if section.get("registry_url"):
                section["registry_url"] = display_url(section["registry_url"])
        emit_json(
            {
                "valid": True,
                "config": shown,
                "renamed_keys": [{"old": r.old, "new": r.new} for r in renames],
            }
        )
        return
    typer.echo(f"{config}: valid (state_dir {cfg.state_dir})")
    for rename in renames:
        typer.echo(f"  {rename.message()}")


# The other commands, by job (see the module docstring), in the order `--help` lists them.
app.add_typer(cli_enroll.app)
app.add_typer(cli_train.app)
app.add_typer(cli_inference.app)
app.add_typer(cli_deploy.app)
app.add_typer(cli_release.app)
app.add_typer(cli_rollout.app)
app.add_typer(cli_fleet.app)
app.add_typer(cli_admin.app)
app.add_typer(cli_maintenance.app)
app.add_typer(cli_jobs.app)
