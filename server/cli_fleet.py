"""``edgefl server`` commands that read and act on the fleet through its operations.

``device-show``, ``dead-letters``, ``runs``, ``run-show``, ``stop``, ``command`` and
``audit``. Each runs its operation (:mod:`edgefl.server.ops`) through
:func:`call_op`: on this host against the server's registry (``-c server.yaml``), or on a
remote server's admin API with ``--server`` (and an admin certificate or token). The
other command modules call :func:`call_op` too.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from edgefl.clikit import JSON_OPTION, emit_json, exits_on_error
from edgefl.server.cli_common import ServerConfigOption
from edgefl.server.cli_ops import RemoteOptions, remote_options, run_op

__all__ = ["app", "call_op", "local_audit"]

app = typer.Typer()


def call_op(
    name: str,
    arguments: Mapping[str, Any],
    *,
    config: Path | None,
    remote: RemoteOptions | None,
    db_url: str | None = None,
    registry_file: bool = False,
) -> Any:
    """Run operation ``name`` here or on the remote server (see :func:`run_op`).

    Args:
        name: The operation.
        arguments: Its arguments (JSON-ready).
        config: ``-c``: the server config file (here only).
        remote: The remote flags.
        db_url: ``--db-url``: read this registry instead of the config's (here only).
        registry_file: ``-c`` may also be a bare ingest config file (``devices``,
            ``privacy``): only its registry is used.

    Raises:
        BadInputError: ``--db-url`` with a remote server, or the registry cannot be read.
    """
    from edgefl.errors import BadInputError

    if remote is not None and remote.remote:
        if db_url is not None:
            raise BadInputError(
                "--db-url reads this host's registry; a remote server reads its own",
                hint="drop --db-url, or drop --server to read the registry here",
            )
        return run_op(name, arguments, config=config, remote=remote)
    if db_url is None and not registry_file:
        return run_op(name, arguments, config=config, remote=None)

    from sqlalchemy.exc import SQLAlchemyError

    from edgefl.server.admin import registry_url
    from edgefl.server.audit import Principal
    from edgefl.server.ops import OpContext, invoke
    from edgefl.server.registry import make_engine
    from edgefl.server.registry.db import display_url

    url = registry_url(config, db_url) if registry_file else str(db_url)
    engine = make_engine(url)
    try:
        with OpContext(
            Principal.local(), config_path=None if registry_file else config, engine=engine
        ) as ctx:
            return invoke(name, arguments, ctx)
    except SQLAlchemyError as exc:
        raise BadInputError(
            f"cannot read the registry at {display_url(url)}: {str(exc).splitlines()[0]}",
            hint="start `edgefl server ingest` once to create it, or pass --db-url",
        ) from exc
    finally:
        engine.dispose()


@contextmanager
def local_audit(
    action: str,
    arguments: Mapping[str, Any],
    *,
    config: Path | None,
    target: str = "",
    db_url: str | None = None,
) -> Iterator[None]:
    """Write the audit log entry of a command run on this host (``release``, ``rollout``).

    With ``--server`` those commands run as a job on the remote server, whose operation
    writes the entry; this is for their local run.

    The entry is written when the block ends: outcome ``ok``, or ``error`` with the
    error (a non-zero exit included), as the host's user.
    """
    from edgefl.server import audit
    from edgefl.server.audit import Principal
    from edgefl.server.cli_common import server_config
    from edgefl.server.registry import make_engine, upgrade

    outcome, detail = "ok", ""
    try:
        yield
    except typer.Exit as exc:
        if exc.exit_code:
            outcome, detail = "error", f"exit {exc.exit_code}"
        raise
    except BaseException as exc:
        outcome, detail = "error", str(exc) or type(exc).__name__
        raise
    finally:
        url = db_url or server_config(config).resolved_db_url
        upgrade(url)
        engine = make_engine(url)
        try:
            audit.append(
                engine,
                Principal.local(),
                action,
                target=target,
                arguments=dict(arguments),
                outcome=outcome,
                detail=detail,
            )
        finally:
            engine.dispose()


def _cell(value: Any, pattern: str = "") -> str | None:
    if value is None:
        return None
    return format(value, pattern) if pattern else str(value)


def _short(value: Any, width: int = 60) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text if len(text) <= width else text[: width - 1] + "…"


@app.command("device-show")
@exits_on_error
@remote_options
def device_show(
    remote: RemoteOptions,
    device: Annotated[str, typer.Argument(help="The device id.")],
    limit: Annotated[int, typer.Option(help="Newest this many of each list.", min=1)] = 10,
    config: ServerConfigOption = None,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Show one device: status, recent telemetry, results and commands with their answers."""
    from edgefl.clikit import print_table

    doc = call_op("device-show", {"device": device, "limit": limit}, config=config, remote=remote)
    if as_json:
        emit_json(doc)
        return
    row, enrollment = doc["device"], doc["enrollment"]
    if row is not None:
        box = row["outbox"]
        typer.echo(
            f"{device} (fleet {row['fleet']}): {row['presence']}, last seen {row['last_seen']}; "
            f"agent {row['agent_version'] or '-'}, envelope v{row['envelope_version'] or '-'}; "
            f"model {row['model'] or '-'} v{row['version'] or '-'} ({row['state'] or '-'}); "
            f"ε spent {_cell(row['epsilon'], '.3f') or '-'}; "
            + (
                f"outbox {box['depth']} records, {box['bytes']} bytes (at {box['at']})"
                if box
                else "outbox unknown (`edgefl server command DEVICE status` asks)"
            )
        )
    else:
        typer.echo(f"{device}: enrolled, never seen by the ingest")
    if enrollment is not None:
        typer.echo(
            f"enrollment: {enrollment['status']}, node {enrollment['node_id']}, serial "
            f"{enrollment['cert_serial']}, admitted {enrollment['admitted_at']}"
        )
    for title, key in (("telemetry", "telemetry"), ("results", "results")):
        if doc[key]:
            print_table(
                [("received", "left"), ("topic", "left"), ("body", "left")],
                [
                    (r["received_at"], r["topic"].split("/", 3)[-1], _short(r["body"]))
                    for r in doc[key]
                ],
                title=title,
            )
    if doc["commands"]:
        print_table(
            [
                ("at", "left"),
                ("by", "left"),
                ("command", "left"),
                ("args", "left"),
                ("outcome", "left"),
                ("answer", "left"),
            ],
            [
                (
                    c["at"],
                    c["actor"],
                    c["name"],
                    _short(c["args"] or {}, 30),
                    c["outcome"],
                    _short(c["response"], 50) if c["response"] else None,
                )
                for c in doc["commands"]
            ],
            title="commands",
        )


@app.command("dead-letters")
@exits_on_error
@remote_options
def dead_letters(
    remote: RemoteOptions,
    reason: Annotated[
        str | None, typer.Option(help="Only this reason (bad_envelope, unknown_device ...).")
    ] = None,
    limit: Annotated[int, typer.Option(help="Newest this many.", min=1)] = 50,
    config: ServerConfigOption = None,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """List messages the ingest refused (newest first), with their counts by reason."""
    from edgefl.clikit import print_table

    doc = call_op("dead-letters", {"reason": reason, "limit": limit}, config=config, remote=remote)
    if as_json:
        emit_json(doc)
        return
    if not doc["counts"]:
        typer.echo("no dead letters: the ingest stored every message it received")
        return
    typer.echo(", ".join(f"{n} {r}" for r, n in doc["counts"].items()))
    print_table(
        [
            ("id", "right"),
            ("received", "left"),
            ("reason", "left"),
            ("topic", "left"),
            ("bytes", "right"),
            ("detail", "left"),
        ],
        [
            (d["id"], d["received_at"], d["reason"], d["topic"], d["payload_size"], d["detail"])
            for d in doc["dead_letters"]
        ],
    )


@app.command()
@exits_on_error
@remote_options
def runs(
    remote: RemoteOptions,
    limit: Annotated[int, typer.Option(help="Newest this many.", min=1)] = 50,
    status: Annotated[
        str | None, typer.Option(help="Only runs in this state (running, completed, stopped).")
    ] = None,
    config: ServerConfigOption = None,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """List federated runs, newest first: state, rounds, last accuracy, ε max."""
    from edgefl.clikit import print_table

    doc = call_op("runs", {"limit": limit, "status": status}, config=config, remote=remote)
    if as_json:
        emit_json(doc)
        return
    if not doc["runs"]:
        typer.echo("no federated runs (start one with `edgefl server train --plan PLAN`)")
        return
    print_table(
        [
            ("run", "left"),
            ("status", "left"),
            ("rounds", "right"),
            ("accuracy", "right"),
            ("ε max", "right"),
            ("started", "left"),
            ("updated", "left"),
            ("stop reason", "left"),
        ],
        [
            (
                r["run_id"],
                r["status"],
                f"{r['rounds_done']}/{r['rounds_planned']}",
                _cell(r["accuracy"], ".4f"),
                _cell(r["epsilon_max"], ".3f"),
                r["created_at"],
                r["updated_at"],
                r["stop_reason"] or None,
            )
            for r in doc["runs"]
        ],
    )


@app.command("run-show")
@exits_on_error
@remote_options
def run_show(
    remote: RemoteOptions,
    run: Annotated[str, typer.Argument(metavar="RUN", help="The run id.")],
    config: ServerConfigOption = None,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Show one run: each round's accuracy and ε max, and each device's ε per round."""
    from edgefl.clikit import print_table
    from edgefl.server.runs import print_rounds

    doc = call_op("run-show", {"run": run}, config=config, remote=remote)
    if as_json:
        emit_json(doc)
        return
    typer.echo(
        f"run {run}: {doc['status']}"
        + (f" ({doc['stop_reason']})" if doc.get("stop_reason") else "")
        + f", {len(doc['rounds'])}/{doc.get('planned_rounds', '?')} rounds"
    )
    if doc["rounds"]:
        print_rounds(doc["rounds"])
    curves: dict[str, list[list[float]]] = doc["epsilon_curves"]
    if curves:
        rounds = sorted({int(p[0]) for points in curves.values() for p in points})
        print_table(
            [("device", "left"), *((f"ε r{n}", "right") for n in rounds)],
            [
                (
                    device,
                    *(
                        next((f"{p[1]:.3f}" for p in points if int(p[0]) == n), None)
                        for n in rounds
                    ),
                )
                for device, points in sorted(curves.items())
            ],
            title="ε per round (ledger)",
        )


@app.command()
@exits_on_error
@remote_options
def stop(
    remote: RemoteOptions,
    run: Annotated[str, typer.Argument(metavar="RUN", help="The run id.")],
    reason: Annotated[str, typer.Option(help="Why (kept as the run's stop reason).")] = "",
    config: ServerConfigOption = None,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Stop a running federated run on the SuperLink and mark it stopped in the registry."""
    doc = call_op("stop", {"run": run, "reason": reason}, config=config, remote=remote)
    if as_json:
        emit_json(doc)
        return
    typer.echo(f"stopped run {run} (Flower run {doc['flower_run_id']}): {doc['stop_reason']}")


@app.command()
@exits_on_error
@remote_options
def command(
    remote: RemoteOptions,
    device: Annotated[str, typer.Argument(help="The target device id.")],
    name: Annotated[str, typer.Argument(help="The command: ping, status, set-rate ...")],
    args: Annotated[
        str, typer.Option("--args", help="Its arguments, a JSON object: '{\"hz\": 2}'.")
    ] = "{}",
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the device's answer.")] = False,
    timeout_s: Annotated[
        float, typer.Option("--timeout", help="With --wait: seconds to wait at most.", min=0.1)
    ] = 30.0,
    ttl_s: Annotated[
        float,
        typer.Option(
            "--ttl",
            help="Seconds until the command expires: an offline device that reconnects later "
            "ignores it.",
            min=1.0,
        ),
    ] = 300.0,
    config: ServerConfigOption = None,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Send NAME to DEVICE over the fleet's command contract; with --wait, print its answer.

    An offline device gets the command when it reconnects (its MQTT session keeps it),
    unless it expired by then (--ttl): the command is reported `queued` with its expiry.
    Exits 9 when the device answered ok: false, or --wait got no answer in time.
    """
    from edgefl.errors import RunFailedError
    from edgefl.server.ops import InvalidError
    from edgefl.server.ops.fleet import new_correlation_id

    try:
        parsed = json.loads(args)
    except ValueError as exc:
        raise InvalidError(
            f"--args is not JSON: {exc}", hint="give an object: '{\"k\": 1}'"
        ) from exc
    if not isinstance(parsed, dict):
        raise InvalidError("--args must be a JSON object", hint="e.g. '{\"hz\": 2}'")
    doc = call_op(
        "command",
        {
            "device": device,
            "name": name,
            "args": parsed,
            "wait": wait,
            "timeout_s": timeout_s,
            "ttl_s": ttl_s,
            "correlation_id": new_correlation_id(name),
        },
        config=config,
        remote=remote,
    )
    answer = doc.get("response")
    if as_json:
        emit_json(doc)
    elif doc["status"] == "queued":
        typer.echo(
            f"{device} is offline: {name} ({doc['correlation_id']}) is queued for it until "
            f"{doc['expires_at']}; its answer will show in `edgefl server device-show {device}`"
        )
    elif answer is None:
        typer.echo(
            f"sent {name} to {device} ({doc['correlation_id']}, expires {doc['expires_at']})"
            + ("; no answer in time" if doc["status"] == "no_answer" else "")
        )
    elif answer.get("ok"):
        typer.echo(json.dumps(answer.get("result"), indent=2, sort_keys=True))
    else:
        typer.echo(f"{device} refused {name}: {answer.get('error')}")
    if doc["status"] == "no_answer":
        raise RunFailedError(
            f"{device} did not answer {name} within {timeout_s:g} s",
            hint="it may still answer: see `edgefl server device-show DEVICE`",
        )
    if answer is not None and not answer.get("ok"):
        raise RunFailedError(f"{device} answered {name} with an error: {answer.get('error')}")


@app.command()
@exits_on_error
@remote_options
def audit(
    remote: RemoteOptions,
    limit: Annotated[int, typer.Option(help="Newest this many.", min=1)] = 100,
    action: Annotated[
        str | None, typer.Option(help="Only this action (admit, revoke, command ...).")
    ] = None,
    actor: Annotated[
        str | None, typer.Option(help="Only this actor (certificate CN, token:NAME, local:USER).")
    ] = None,
    config: ServerConfigOption = None,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Show the audit log, newest first: who did what, when, its arguments and outcome."""
    from edgefl.clikit import print_table

    doc = call_op(
        "audit",
        {"limit": limit, "action": action, "actor": actor},
        config=config,
        remote=remote,
    )
    if as_json:
        emit_json(doc)
        return
    if not doc["entries"]:
        typer.echo("the audit log has no entries" + (" that match" if action or actor else ""))
        return
    print_table(
        [
            ("id", "right"),
            ("at", "left"),
            ("actor", "left"),
            ("role", "left"),
            ("via", "left"),
            ("action", "left"),
            ("target", "left"),
            ("outcome", "left"),
            ("arguments / detail", "left"),
        ],
        [
            (
                e["id"],
                e["at"],
                e["actor"],
                e["role"],
                e["via"],
                e["action"],
                e["target"] or None,
                e["outcome"],
                _short(e["detail"] or e["arguments"], 70),
            )
            for e in doc["entries"]
        ],
    )
