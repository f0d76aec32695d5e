"""``edgefl server`` access commands: admin certificates and API tokens for the admin API.

``admin-cert``, ``admin-certs``, ``admin-token``, ``admin-tokens`` and ``admin-revoke``;
each runs its operation (:mod:`edgefl.server.ops.access`, role admin) here or, with
``--server``, on a remote server (:mod:`edgefl.server.cli_ops`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from edgefl.clikit import JSON_OPTION, emit_json, exits_on_error
from edgefl.server.cli_common import ServerConfigOption
from edgefl.server.cli_ops import RemoteOptions, remote_options, run_op

__all__ = ["app"]

app = typer.Typer()

RoleOption = Annotated[
    str,
    typer.Option(
        "--role",
        help="viewer (reads), operator (trains, releases, rolls out, commands) "
        "or admin (also admits, revokes, manages access).",
    ),
]


def _admin_url(config: Path | None, remote: RemoteOptions) -> str | None:
    """The admin API's address for a client config: the remote one, or this host's server."""
    if remote.remote:
        return remote.server
    from edgefl.server.cli_common import server_config
    from edgefl.server.runtime import read_runtime

    running = read_runtime(server_config(config).resolved_state_dir) or {}
    admin = running.get("admin")
    return admin.get("url") if isinstance(admin, dict) else None


@app.command("admin-cert")
@exits_on_error
@remote_options
def admin_cert(
    remote: RemoteOptions,
    name: Annotated[str, typer.Argument(help="Who it is for (its CN): [A-Za-z0-9_.@-], 1-64.")],
    role: RoleOption,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Folder for cert.pem, key.pem, ca.pem, admin.yaml. (default: ./admin-NAME)"
        ),
    ] = None,
    days: Annotated[float, typer.Option(help="Validity in days.", min=0.001)] = 365.0,
    config: ServerConfigOption = None,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Issue an admin client certificate of the separate admin CA, with its role in it.

    Writes cert.pem, key.pem (0600, the only copy), ca.pem (to check the server's
    certificate) and admin.yaml, a client config: `edgefl server devices --client-config
    DIR/admin.yaml` then works from any host that reaches the admin API.
    """
    from edgefl.files import write_bytes_atomic, write_text_atomic

    result = run_op(
        "admin-cert", {"name": name, "role": role, "days": days}, config=config, remote=remote
    )
    folder = out if out is not None else Path(f"admin-{name}")
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_bytes_atomic(folder / "key.pem", result["key_pem"].encode("ascii"), mode=0o600)
    write_bytes_atomic(folder / "cert.pem", result["cert_pem"].encode("ascii"), mode=0o644)
    lines = ["# edgefl admin client config (edgefl server ... --client-config THIS_FILE)"]
    url = _admin_url(config, remote)
    lines.append(f"server: {url}" if url else "# server: https://HOST:PORT")
    if result.get("server_ca_pem"):
        write_bytes_atomic(folder / "ca.pem", result["server_ca_pem"].encode("ascii"), mode=0o644)
        lines.append("ca_file: ca.pem")
    lines += ["cert_file: cert.pem", "key_file: key.pem"]
    write_text_atomic(folder / "admin.yaml", "\n".join(lines) + "\n")
    summary = {k: result[k] for k in ("name", "role", "serial", "expires_at")}
    summary["folder"] = str(folder)
    summary["client_config"] = str(folder / "admin.yaml")
    if as_json:
        emit_json(summary)
        return
    typer.echo(
        f"issued admin certificate {name} ({role}, serial {result['serial']}, until "
        f"{result['expires_at']}) into {folder}/\n"
        f"use it: edgefl server devices --client-config {folder}/admin.yaml"
        + ("" if url else " (add `server: https://HOST:PORT` to it)")
    )


@app.command("admin-certs")
@exits_on_error
@remote_options
def admin_certs(
    remote: RemoteOptions,
    config: ServerConfigOption = None,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """List the admin certificates issued: name, role, state, dates."""
    from edgefl.clikit import print_table

    certs = run_op("admin-certs", {}, config=config, remote=remote)["certs"]
    if as_json:
        emit_json({"certs": certs})
        return
    if not certs:
        typer.echo("no admin certificates (edgefl server admin-cert NAME --role ROLE)")
        return
    print_table(
        [
            ("name", "left"),
            ("role", "left"),
            ("state", "left"),
            ("serial", "left"),
            ("expires", "left"),
            ("revoked", "left"),
        ],
        [
            (c["name"], c["role"], c["state"], c["serial"], c["expires_at"], c["revoked_at"])
            for c in certs
        ],
    )


@app.command("admin-token")
@exits_on_error
@remote_options
def admin_token(
    remote: RemoteOptions,
    name: Annotated[str, typer.Argument(help="Who it is for: [A-Za-z0-9_.@-], 1-64.")],
    role: RoleOption,
    expires: Annotated[str, typer.Option(help="Lifetime: 45s, 90m, 12h, 30d, 2w.")] = "30d",
    config: ServerConfigOption = None,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Make an API token (printed once; only its hash is kept). Use it as EDGEFL_ADMIN_TOKEN."""
    args = {"name": name, "role": role, "expires": expires}
    result = run_op("admin-token", args, config=config, remote=remote)
    if as_json:
        emit_json(result)
        return
    typer.echo(result["token"])
    from edgefl.clikit import error_console_print

    error_console_print(
        f"token {result['id']} for {name} ({role}) until {result['expires_at']}: shown once, "
        "store it now (export EDGEFL_ADMIN_TOKEN=...)"
    )


@app.command("admin-tokens")
@exits_on_error
@remote_options
def admin_tokens(
    remote: RemoteOptions,
    config: ServerConfigOption = None,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """List the API tokens: id, name, role, state, dates (never a secret)."""
    from edgefl.clikit import print_table

    tokens = run_op("admin-tokens", {}, config=config, remote=remote)["tokens"]
    if as_json:
        emit_json({"tokens": tokens})
        return
    if not tokens:
        typer.echo("no API tokens (edgefl server admin-token NAME --role ROLE)")
        return
    print_table(
        [
            ("id", "left"),
            ("name", "left"),
            ("role", "left"),
            ("state", "left"),
            ("expires", "left"),
            ("last used", "left"),
        ],
        [
            (t["id"], t["name"], t["role"], t["state"], t["expires_at"], t["last_used_at"])
            for t in tokens
        ],
    )


@app.command("admin-revoke")
@exits_on_error
@remote_options
def admin_revoke(
    remote: RemoteOptions,
    name: Annotated[
        str | None, typer.Argument(help="Revoke every admin certificate of NAME.")
    ] = None,
    serial: Annotated[str | None, typer.Option(help="Revoke one certificate (hex serial).")] = None,
    token_id: Annotated[
        str | None, typer.Option("--token-id", help="Revoke an API token (its id).")
    ] = None,
    config: ServerConfigOption = None,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Revoke admin certificates or an API token; the API refuses them at once."""
    args: dict[str, Any] = {}
    if name is not None:
        args["name"] = name
    if serial is not None:
        args["serial"] = serial
    if token_id is not None:
        args["token_id"] = token_id
    result = run_op("admin-revoke", args, config=config, remote=remote)
    if as_json:
        emit_json(result)
        return
    for cert in result["certs"]:
        typer.echo(f"revoked admin certificate {cert['name']} (serial {cert['serial']})")
    for tok in result["tokens"]:
        typer.echo(f"revoked token {tok['id']} ({tok['name']})")
