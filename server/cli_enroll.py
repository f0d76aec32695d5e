"""The enrollment commands of ``edgefl server``: admit, revoke, operator-cert and the rest.

``admit``, ``revoke``, ``operator-cert``, ``enrollments``, ``app-key`` and ``release-key``.

They act on a deployment's fleet CA, registry and SuperLink through the typed
:class:`~edgefl.server.admin.AdminContext`; this module only parses options and prints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from edgefl.clikit import JSON_OPTION, emit_json, exits_on_error
from edgefl.server.cli_common import ServerConfigOption, server_config
from edgefl.server.cli_ops import RemoteOptions, remote_options

__all__ = ["app"]

app = typer.Typer()


@app.command()
@exits_on_error
@remote_options
def admit(
    remote: RemoteOptions,
    request: Annotated[
        Path, typer.Argument(help="The enrollment request `edgefl agent enroll` wrote.")
    ],
    out: Annotated[
        Path | None,
        typer.Option(help="Where to write the bundle. (default: <device_id>.bundle.json)"),
    ] = None,
    readmit: Annotated[
        bool,
        typer.Option("--readmit", help="Admit a revoked device again (it must have new keys)."),
    ] = False,
    config: ServerConfigOption = None,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Admit a device: sign its CSR, register its node key, record both; write its bundle.

    Give the bundle to the device: `edgefl agent enroll --install BUNDLE`.
    """
    from edgefl.enrollment import EnrollmentBundle, read_request, write_json_document
    from edgefl.server.cli_fleet import call_op

    req = read_request(request)  # a bad file fails here, before the server is asked
    doc = call_op(
        "admit",
        {"request": req.model_dump(mode="json"), "readmit": readmit},
        config=config,
        remote=remote,
    )
    bundle = EnrollmentBundle.model_validate(doc["bundle"])
    target = out if out is not None else Path(f"{req.device_id}.bundle.json")
    write_json_document(target, bundle)
    summary = {**doc["summary"], "bundle": str(target)}
    if as_json:
        emit_json(summary)
        return
    typer.echo(
        f"admitted {bundle.device_id} (fleet {bundle.fleet}): node {bundle.node_id}, "
        f"certificate serial {bundle.cert_serial}; bundle written to {target}"
        + (" with the fleet's app-signing key" if bundle.app_signing_keys else "")
        + (" and release-signing keys" if bundle.release_signing_keys else "")
        + "\n"
        f"on the device: edgefl agent enroll --install {target.name}"
    )


@app.command()
@exits_on_error
@remote_options
def revoke(
    remote: RemoteOptions,
    device: Annotated[str, typer.Argument(help="The device id to revoke.")],
    reason: Annotated[str, typer.Option(help="Why (kept in the registry).")] = "",
    config: ServerConfigOption = None,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Revoke a device: its certificate (CRL), its SuperLink node, its registry row.

    A running `edgefl server start` restarts its broker on the new CRL, which ends the
    device's MQTT access. Run it again if it failed half-way: it finishes the job.
    """
    from edgefl.server.cli_fleet import call_op

    doc = call_op("revoke", {"device": device, "reason": reason}, config=config, remote=remote)
    if as_json:
        emit_json(doc)
        return
    typer.echo(
        f"revoked {device}: certificate serial {doc['cert_serial']} is in {doc['crl']}, "
        f"node {doc['node_id']} unregistered"
        + (" (it was already revoked; every step re-checked)" if doc["already_revoked"] else "")
    )


@app.command("operator-cert")
@exits_on_error
def operator_cert(
    name: Annotated[str, typer.Argument(help="The operator's name ([A-Za-z0-9_-], 1-54).")],
    out: Annotated[
        Path | None,
        typer.Option(help="Folder for cert.pem, key.pem and ca.pem. (default: ./operator-NAME)"),
    ] = None,
    revoke_it: Annotated[
        bool,
        typer.Option("--revoke", help="Revoke NAME's operator certificates instead."),
    ] = False,
    config: ServerConfigOption = None,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Issue a read-only operator certificate (CN edgefl-op-NAME) for mosquitto_sub.

    The broker lets it read edgefl/# and write nothing, so nobody watching the fleet
    needs a service's key. A running `edgefl server start` adds it to the broker's ACL
    within a second (and drops it again after --revoke).
    """
    from edgefl.files import write_bytes_atomic
    from edgefl.server.admin import open_ca
    from edgefl.server.fleet_ca import OPERATOR_PREFIX
    from edgefl.server.runtime import read_runtime

    cfg = server_config(config)
    ca = open_ca(cfg, config, name_config=False)
    cn = OPERATOR_PREFIX + name
    if revoke_it:
        serials = ca.live_serials(cn, kind="operator")
        for serial in serials:
            ca.revoke(serial)
        doc: dict[str, Any] = {"cn": cn, "revoked": [f"{s:x}" for s in serials]}
        if as_json:
            emit_json(doc)
            return
        typer.echo(f"revoked {len(serials)} certificate(s) of {cn}")
        return
    issued = ca.issue_operator_cert(name)
    folder = out if out is not None else Path(f"operator-{name}")
    folder.mkdir(parents=True, exist_ok=True)
    assert issued.key_pem is not None  # the CA made the key
    write_bytes_atomic(folder / "key.pem", issued.key_pem, mode=0o600)
    write_bytes_atomic(folder / "cert.pem", issued.cert_pem, mode=0o644)
    write_bytes_atomic(folder / "ca.pem", ca.cert_pem, mode=0o644)
    # The running server's broker port (broker.port 0 picks one at start).
    running = (read_runtime(cfg.resolved_state_dir) or {}).get("broker") or {}
    host = running.get("host", cfg.broker.host)
    port = running.get("port", cfg.broker.port)
    line = (
        f"mosquitto_sub -h {host} -p {port} --cafile {folder}/ca.pem "
        f"--cert {folder}/cert.pem --key {folder}/key.pem -t 'edgefl/#' -v"
    )
    doc = {"cn": cn, "serial": f"{issued.serial:x}", "folder": str(folder), "mosquitto_sub": line}
    if as_json:
        emit_json(doc)
        return
    typer.echo(f"issued {cn} (serial {issued.serial:x}) into {folder}/\nwatch the fleet: {line}")


@app.command()
@exits_on_error
@remote_options
def enrollments(
    remote: RemoteOptions,
    config: ServerConfigOption = None,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """List enrolled devices: status, node id, certificate serial, dates, SuperLink view.

    ``superlink_status`` is the node's status on the SuperLink (``online``, ``offline``,
    ``registered`` = never connected, ``unregistered``), or ``unknown`` when the SuperLink
    cannot be asked. An admitted device that stays ``registered`` has never activated:
    on the device, `edgefl agent status` names the cause (wrong CA, unreachable SuperLink).
    """
    from edgefl.clikit import print_table
    from edgefl.server.cli_fleet import call_op

    rows = call_op("enrollments", {}, config=config, remote=remote)["enrollments"]
    if as_json:
        emit_json({"enrollments": rows})
        return
    if not rows:
        typer.echo("no enrolled devices (admit one with `edgefl server admit REQUEST`)")
        return
    print_table(
        [
            ("device", "left"),
            ("status", "left"),
            ("fleet", "left"),
            ("node", "right"),
            ("superlink", "left"),
            ("serial", "left"),
            ("admitted", "left"),
            ("revoked", "left"),
        ],
        [
            (
                row["device_id"],
                row["status"],
                row["fleet"],
                row["node_id"],
                row["superlink_status"],
                row["cert_serial"],
                row["admitted_at"],
                f"{row['revoked_at']} {row['revoke_reason']}".rstrip()
                if row["revoked_at"]
                else None,
            )
            for row in rows
        ],
    )


@app.command("app-key")
@exits_on_error
def app_key(
    create: Annotated[
        bool, typer.Option("--create", help="Create the key when the server has none.")
    ] = False,
    config: ServerConfigOption = None,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Print the fleet's app-signing public key, for devices' training.app_signing_keys.

    The key (Ed25519, in <state_dir>/app-signing/, apart from the CA key) signs every app
    `server train` submits, and `server admit` puts it in the bundles it writes (devices
    admitted before it existed need it in training.app_signing_keys). Devices always run
    their installed edgefl ClientApp; an app's own ClientApp code runs only on devices
    that trust this key.
    """
    from edgefl.appsign import key_id, public_key_line
    from edgefl.errors import ConfigError
    from edgefl.server.fl.app_signing import (
        app_signing_key_path,
        create_app_signing_key,
        load_app_signing_key,
    )

    state_dir = server_config(config).resolved_state_dir
    key = load_app_signing_key(state_dir)
    if key is None:
        if not create:
            raise ConfigError(
                f"no app-signing key at {app_signing_key_path(state_dir)}",
                hint="create it with `edgefl server app-key --create`",
            )
        create_app_signing_key(state_dir)
        key = load_app_signing_key(state_dir)
        assert key is not None
    public = key.public_key()
    doc = {
        "public_key": public_key_line(public, "edgefl-app-signing"),
        "key_id": key_id(public),
        "path": str(app_signing_key_path(state_dir)),
    }
    if as_json:
        emit_json(doc)
        return
    typer.echo(doc["public_key"])


@app.command("release-key")
@exits_on_error
def release_key(
    create: Annotated[
        bool, typer.Option("--create", help="Create the first key when the server has none.")
    ] = False,
    rotate: Annotated[
        bool,
        typer.Option("--rotate", help="Sign with a new key; the old one stays trusted."),
    ] = False,
    revoke: Annotated[
        str | None,
        typer.Option("--revoke", metavar="KEY_ID", help="Revoke a key that no longer signs."),
    ] = None,
    config: ServerConfigOption = None,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """List the fleet's release-signing keys; create, rotate or revoke one.

    The keys (Ed25519, in <ca_dir>/release-signing/, apart from the CA key) sign every
    release manifest and desired state; `server admit` puts the trusted ones in the
    bundles it writes and devices pin them. Rotate, let devices learn the new key
    (enrollment bundles, or their models.release_signing_keys), then revoke the old
    one: signed desired states tell devices never to trust it again.
    """
    from edgefl.errors import BadInputError
    from edgefl.server.release_keys import (
        create_release_key,
        list_release_keys,
        release_key_dir,
        revoke_release_key,
        rotate_release_key,
    )

    if sum([create, rotate, revoke is not None]) > 1:
        raise BadInputError("give at most one of --create, --rotate and --revoke")
    ca_dir = server_config(config).resolved_ca_dir
    done: dict[str, Any] = {}
    if create:
        done = {"created": create_release_key(ca_dir)}
    elif rotate:
        new, old = rotate_release_key(ca_dir)
        done = {"created": new, "retired": old}
    elif revoke is not None:
        revoke_release_key(ca_dir, revoke)
        done = {"revoked": revoke}
    keys = list_release_keys(ca_dir)
    doc = {
        **done,
        "folder": str(release_key_dir(ca_dir)),
        "current": next((k.key_id for k in keys if k.current), None),
        "keys": [k.to_dict() for k in keys],
    }
    if as_json:
        emit_json(doc)
        return
    if not keys:
        typer.echo(
            f"no release-signing key in {doc['folder']}; "
            "create one with `edgefl server release-key --create`"
        )
        return
    for k in keys:
        status = "current" if k.current else "revoked" if k.revoked else "trusted"
        typer.echo(f"{k.key_id}  {status}")
    if rotate:
        typer.echo(
            f"now signing with {done['created']}; once devices have it, "
            f"`edgefl server release-key --revoke {done['retired']}`"
        )
