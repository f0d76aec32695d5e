"""``edgefl server backup``, ``restore``, ``retention`` and ``forget``: keeping a server for years.

``backup``, ``retention`` and ``forget`` are operations (:mod:`edgefl.server.ops.maintenance`:
role admin, audited), run here or on a remote server (``--server``); ``restore`` runs only
on the host it restores onto, with its server stopped (:mod:`edgefl.server.backup`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from edgefl.clikit import JSON_OPTION, emit_json, exits_on_error
from edgefl.server.cli_common import ServerConfigOption
from edgefl.server.cli_ops import AdminServerOption, RemoteOptions, run_op

__all__ = ["app"]

app = typer.Typer()


@app.command()
@exits_on_error
def backup(
    dest: Annotated[Path, typer.Argument(help="New (or empty) folder to write the backup into.")],
    config: ServerConfigOption = None,
    server: AdminServerOption = None,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Back up the CA and signing keys, registry, SuperLink database, releases and config.

    The fleet CA folder includes the admin CA and the release-signing keys; the app-signing
    key is in state_dir. Consistent while the server runs: SQLite's online backup,
    pg_dump for PostgreSQL, the CA copied under its lock. manifest.json holds every
    file's sha256. With --server, DEST is an absolute folder on the server host.
    """
    from edgefl.clikit import error_console_print

    if server is None:
        error_console_print(f"backing up into {dest} ...")
    out = run_op("backup", {"dest": str(dest)}, config=config, remote=RemoteOptions(server))
    if as_json:
        emit_json(out)
        return
    typer.echo(
        f"backup written to {out['path']}: {out['file_count']} files, {out['bytes']} bytes, "
        f"registry {out['registry']['dialect']}, SuperLink database "
        f"{'included' if out['superlink'] else 'absent'}, config "
        f"{out['config'] or 'not given (-c)'}"
    )
    typer.echo(f"manifest sha256 {out['manifest_sha256']} (keep it apart from the backup)")
    typer.echo(
        f"restore it with: edgefl server restore {out['path']} -c SERVER_CONFIG "
        f"--manifest-sha256 {out['manifest_sha256']}"
    )


@app.command()
@exits_on_error
def restore(
    src: Annotated[Path, typer.Argument(help="A folder `edgefl server backup` wrote.")],
    config: ServerConfigOption = None,
    force: Annotated[
        bool,
        typer.Option("--force", help="Replace a CA, registry or SuperLink database already there."),
    ] = False,
    manifest_sha256: Annotated[
        str | None,
        typer.Option(
            "--manifest-sha256",
            help="The sha256 `backup` printed: refuse a backup whose manifest was rewritten.",
        ),
    ] = None,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Restore a backup where the server config (-c) keeps its state (its server stopped).

    Every file is checked against the backup's manifest first: a changed, missing or added
    file refuses the whole restore. An existing CA, registry or SuperLink database is
    refused unless --force. The restore is written to the restored audit log.
    """
    from edgefl.clikit import error_console_print
    from edgefl.server import audit
    from edgefl.server.backup import restore as do_restore
    from edgefl.server.cli_common import server_config
    from edgefl.server.registry.db import make_engine

    cfg = server_config(config)
    out = do_restore(
        src, cfg, force=force, manifest_sha256=manifest_sha256, progress=error_console_print
    )
    engine = make_engine(cfg.resolved_db_url)
    try:
        audit.append(
            engine,
            audit.Principal.local(),
            "restore",
            target=str(src),
            arguments={"src": str(src), "force": force},
            outcome="ok",
            detail=f"backup of {out['backup_created_at']}",
        )
    finally:
        engine.dispose()
    if as_json:
        emit_json(out)
        return
    typer.echo(
        f"restored {out['files']} files from {out['restored_from']} into {out['state_dir']} "
        f"(CA {out['ca_dir']}, registry {out['registry']})"
    )
    typer.echo(f"next: {out['next']}")


@app.command()
@exits_on_error
def retention(
    apply: Annotated[
        bool,
        typer.Option("--apply/--dry-run", help="Delete now, or only count what would go."),
    ] = False,
    config: ServerConfigOption = None,
    server: AdminServerOption = None,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Apply the retention: section of the server config now (--apply), or count (--dry-run).

    The running server applies it by itself every retention.interval_s.
    """
    from edgefl.clikit import print_table

    out = run_op("retention", {"apply": apply}, config=config, remote=RemoteOptions(server))
    if as_json:
        emit_json(out)
        return
    rows: list[tuple[Any, ...]] = []
    for table, rules in out["deleted"].items():
        for rule, count in rules.items():
            rows.append((table, rule, count))
    print_table(
        [("table", "left"), ("rule", "left"), ("deleted" if apply else "would delete", "right")],
        rows,
        title=("retention applied" if apply else "retention dry run (nothing deleted)")
        + f" in {out['seconds']} s",
    )


@app.command()
@exits_on_error
def forget(
    device: Annotated[str, typer.Argument(help="The device id (revoked first).")],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would be erased; erase nothing.")
    ] = False,
    config: ServerConfigOption = None,
    server: AdminServerOption = None,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Erase a revoked device's records, results, telemetry, state and enrollment.

    Also its rollout rows and the dead letters on its topics; its privacy-ledger rows
    stay (they prove each run's cap held and make up its lifetime ε). The device must be
    revoked first (`edgefl server revoke DEVICE`). Audited.
    """
    out = run_op(
        "forget",
        {"device": device, "dry_run": dry_run},
        config=config,
        remote=RemoteOptions(server),
    )
    if as_json:
        emit_json(out)
        return
    verb = "would erase" if dry_run else "erased"
    erased = ", ".join(f"{n} {table}" for table, n in out["erased"].items())
    typer.echo(f"{device}: {verb} {erased}")
    typer.echo(f"kept {out['kept']['privacy_ledger']} privacy_ledger rows: {out['kept_why']}")
