"""``edgefl server``: cloud-side processes and registry queries."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from edgefl.clikit import JSON_OPTION, emit_json, exits_on_error

__all__ = ["app"]

app = typer.Typer(
    help="Cloud side: the supervised server (broker, SuperLink, ingest), device enrollment, "
    "federated runs, the device registry and the gRPC inference service.",
    no_args_is_help=True,
)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Ingest config file (YAML, TOML or JSON)."),
]
ServerConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="Server config file (YAML, TOML or JSON), the one `edgefl server start` uses. "
        "[default: built-in defaults, state in ./edgefl-server]",
    ),
]


def _ingest_config(config: Path | None, overrides: dict[str, Any]) -> Any:
    from edgefl.config import load_config, validate_config
    from edgefl.server.ingest import IngestConfig

    base: dict[str, Any] = {}
    if config is not None:
        base = load_config(IngestConfig, config).model_dump(exclude_unset=True)
    base.update({k: v for k, v in overrides.items() if v is not None})
    return validate_config(IngestConfig, base, source=str(config or "command line"))


@app.command()
@exits_on_error
def ingest(
    config: ConfigOption = None,
    broker_port: Annotated[int | None, typer.Option(help="Override broker_port.")] = None,
    db_url: Annotated[str | None, typer.Option(help="Override db_url (SQLAlchemy URL).")] = None,
) -> None:
    """Consume fleet messages into the registry until SIGTERM (defaults: local broker, SQLite)."""
    from edgefl.server.ingest import Ingest

    Ingest(_ingest_config(config, {"broker_port": broker_port, "db_url": db_url})).run()


@app.command()
@exits_on_error
def devices(
    config: ConfigOption = None,
    db_url: Annotated[str | None, typer.Option(help="Override db_url (SQLAlchemy URL).")] = None,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """List devices with presence, last seen and stored record counts."""
    from sqlalchemy import func, select
    from sqlalchemy.exc import SQLAlchemyError

    from edgefl.errors import BadInputError
    from edgefl.server.registry import Device, Record, make_engine, session_factory
    from edgefl.server.registry.db import display_url

    cfg = _ingest_config(config, {"db_url": db_url})
    engine = make_engine(cfg.db_url)
    try:
        with session_factory(engine)() as session:
            counts = dict(
                session.execute(
                    select(Record.device_id, func.count()).group_by(Record.device_id)
                ).all()
            )
            rows = [
                {
                    "device_id": d.device_id,
                    "fleet": d.fleet,
                    "online": d.online,
                    "last_seen": d.last_seen.isoformat() if d.last_seen else None,
                    "records": int(counts.get(d.device_id, 0)),
                }
                for d in session.scalars(select(Device).order_by(Device.device_id))
            ]
    except SQLAlchemyError as exc:
        raise BadInputError(
            f"cannot read the registry at {display_url(cfg.db_url)}: {str(exc).splitlines()[0]}",
            hint="start `edgefl server ingest` once to create it, or pass --db-url",
        ) from exc
    finally:
        engine.dispose()
    if as_json:
        emit_json({"devices": rows})
        return
    for row in rows:
        state = "online " if row["online"] else "offline"
        typer.echo(
            f"{row['device_id']:<24} {state} last seen {row['last_seen']}  {row['records']} records"
        )


@app.command()
@exits_on_error
def inference(
    config: ServerConfigOption = None,
    model: Annotated[
        str | None, typer.Option(help="Heavy model to serve. [default: digits]")
    ] = None,
    host: Annotated[
        str | None, typer.Option(help="Address to listen on. [default: 127.0.0.1]")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port; 0 picks a free one. [default: 0]")] = None,
    weights: Annotated[
        Path | None,
        typer.Option(help="Weights cache folder (trained once if empty). [default: ~/.cache]"),
    ] = None,
    train_epochs: Annotated[
        int | None, typer.Option(help="Epochs if the model must be trained.")
    ] = None,
    max_batch: Annotated[
        int | None, typer.Option(help="Most samples per forward pass. [default: 32]")
    ] = None,
    max_wait_ms: Annotated[
        float | None, typer.Option(help="Longest wait to fill a batch. [default: 2.0]")
    ] = None,
    no_batching: Annotated[
        bool, typer.Option("--no-batching", help="One request per forward pass.")
    ] = False,
    max_concurrency: Annotated[
        int | None,
        typer.Option(help="In-flight requests before RESOURCE_EXHAUSTED. [default: 256]"),
    ] = None,
    max_samples_per_request: Annotated[
        int | None,
        typer.Option(help="Most samples in one request (INVALID_ARGUMENT past it). [default: 256]"),
    ] = None,
    max_message_bytes: Annotated[
        int | None, typer.Option(help="Largest request/response in bytes. [default: 4 MiB]")
    ] = None,
    torch_threads: Annotated[
        int | None, typer.Option(help="torch intra-op threads. [default: 1]")
    ] = None,
    cert: Annotated[
        Path | None,
        typer.Option("--cert", "--tls-cert", help="Server certificate (PEM): tls.cert_file."),
    ] = None,
    key: Annotated[
        Path | None,
        typer.Option("--key", "--tls-key", help="Server private key (PEM): tls.key_file."),
    ] = None,
    ca: Annotated[
        Path | None,
        typer.Option(
            "--ca",
            "--client-ca",
            help="Require client certificates from this CA (mutual TLS): tls.ca_file.",
        ),
    ] = None,
    crl: Annotated[
        Path | None, typer.Option(help="The client CA's CRL: revoked devices are refused.")
    ] = None,
    registry_url: Annotated[
        str | None, typer.Option(help="Device registry URL: unlisted devices are refused.")
    ] = None,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Serve the heavy model over gRPC (edgefl.v1.Inference + health) until SIGINT/SIGTERM.

    Settings come from the ``inference:`` section of the server config (-c), then the
    flags. Prints the bound address once the model is SERVING (one JSON line with --json).
    (``--tls-cert``, ``--tls-key`` and ``--client-ca`` are the old names of ``--cert``,
    ``--key`` and ``--ca``.)
    """
    import json

    from edgefl.clikit import error_console_print
    from edgefl.config import validate_config
    from edgefl.server.inference.service import InferenceServer, InferenceServerConfig, serve

    base = _server_config(config).inference.model_dump(exclude_unset=True)
    flags: dict[str, Any] = {
        "host": host,
        "port": port,
        "model": model,
        "weights": weights,
        "train_epochs": train_epochs,
        "max_batch": 1 if no_batching else max_batch,
        "max_wait_ms": max_wait_ms,
        "max_concurrency": max_concurrency,
        "max_samples_per_request": max_samples_per_request,
        "max_message_bytes": max_message_bytes,
        "crl": crl,
        "registry_url": registry_url,
    }
    base.update({k: v for k, v in flags.items() if v is not None})
    tls = {"cert_file": cert, "key_file": key, "ca_file": ca}
    base["tls"] = {**base.get("tls", {}), **{k: v for k, v in tls.items() if v is not None}}
    settings = validate_config(
        InferenceServerConfig, base, source=f"{config or 'command line'} (inference)"
    )

    def ready(server: InferenceServer) -> None:
        served = server.models[settings.model]
        info = {
            "address": server.address,
            "host": settings.host,
            "port": server.port,
            "model": served.name,
            "version": served.version,
            "heldout_accuracy": served.heldout_accuracy,
            "max_batch": settings.max_batch,
            "max_samples_per_request": settings.max_samples_per_request,
            "tls": settings.tls.cert_file is not None,
            "mutual_tls": settings.tls.ca_file is not None,
        }
        if as_json:
            # One line, so a supervisor can read it with readline() while we keep running.
            typer.echo(json.dumps(info, sort_keys=True))
        else:
            typer.echo(
                f"serving {served.name} version {served.version} on {server.address} "
                f"(held-out accuracy {served.heldout_accuracy:.4f}, "
                f"{'mutual TLS' if info['mutual_tls'] else 'TLS' if info['tls'] else 'plaintext'})"
            )

    serve(
        settings,
        on_ready=ready,
        progress=lambda what, done, total: error_console_print(f"[{done}/{total}] {what}"),
    )


# -- the supervised server and enrollment --------------------------------------------------


def _server_config(config: Path | None) -> Any:
    from edgefl.config import load_config
    from edgefl.server.config import ServerConfig

    return load_config(ServerConfig, config) if config is not None else ServerConfig()


@dataclass
class _Admin:
    """What the admin commands need from a server's config: CA, registry, SuperLink."""

    config: Any
    ca: Any
    engine: Any
    admin: Any
    superlink_address: str

    def close(self) -> None:
        self.engine.dispose()


def _connect(config: Path | None, *, need_superlink: bool = True) -> _Admin:
    """Open the CA, the registry and a ``flwr`` wrapper from the server's config."""
    from edgefl.errors import ConfigError
    from edgefl.server.fl.superlink import FlowerAdmin
    from edgefl.server.fleet_ca import FleetCA
    from edgefl.server.registry import make_engine, upgrade
    from edgefl.server.serve import read_runtime

    cfg = _server_config(config)
    where = f"--config {config}" if config is not None else "the default config"
    ca_dir = cfg.resolved_ca_dir
    if not (ca_dir / "ca.pem").exists():
        raise ConfigError(
            f"no fleet CA in {ca_dir} ({where})",
            hint="start the server once with `edgefl server start"
            + (f" --config {config}`" if config is not None else "`")
            + ", or pass the --config it runs with",
        )
    ca = FleetCA.load(ca_dir)
    upgrade(cfg.resolved_db_url)
    engine = make_engine(cfg.resolved_db_url)
    runtime = read_runtime(cfg.resolved_state_dir) or {}
    sl = cfg.superlink
    admin_address = runtime.get("superlink_admin")
    public = runtime.get("superlink")
    if admin_address is None:
        if sl.port == 0 and need_superlink:
            engine.dispose()
            raise ConfigError(
                f"the server of {where} is not running (no {cfg.resolved_state_dir}/server.json) "
                "and superlink.port is 0, so its SuperLink cannot be found",
                hint="start it with `edgefl server start`",
            )
        host = "127.0.0.1" if sl.host in ("0.0.0.0", "::") else sl.host
        admin_address = f"{host}:{sl.port}"
        public = sl.public_address or f"{sl.host}:{sl.port}"
    admin = FlowerAdmin(
        str(admin_address),
        cfg.resolved_state_dir / "admin-flwr-home",
        root_certificates=None if sl.insecure else ca.cert_path,
        insecure=sl.insecure,
    )
    return _Admin(cfg, ca, engine, admin, str(public))


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

    server = Server(_server_config(config), progress=error_console_print)

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
        )

    server.run(on_ready=ready)


@app.command()
@exits_on_error
def admit(
    request: Annotated[
        Path, typer.Argument(help="The enrollment request `edgefl agent enroll` wrote.")
    ],
    out: Annotated[
        Path | None,
        typer.Option(help="Where to write the bundle. [default: <device_id>.bundle.json]"),
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
    from edgefl.enrollment import read_request, write_json_document
    from edgefl.server.enrollment import admit as admit_device
    from edgefl.server.fl.app_signing import app_signing_public_keys

    req = read_request(request)
    ctx = _connect(config)
    try:
        bundle = admit_device(
            req,
            ca=ctx.ca,
            admin=ctx.admin,
            engine=ctx.engine,
            superlink_address=ctx.superlink_address,
            readmit=readmit,
            # Read before admitting: an unreadable key fails with nothing admitted.
            app_signing_keys=app_signing_public_keys(ctx.config.resolved_state_dir),
        )
    finally:
        ctx.close()
    target = out if out is not None else Path(f"{req.device_id}.bundle.json")
    write_json_document(target, bundle)
    summary = {
        "device_id": bundle.device_id,
        "fleet": bundle.fleet,
        "node_id": bundle.node_id,
        "cert_serial": bundle.cert_serial,
        "superlink": bundle.superlink,
        "app_signing_keys": len(bundle.app_signing_keys),
        "bundle": str(target),
    }
    if as_json:
        emit_json(summary)
        return
    typer.echo(
        f"admitted {bundle.device_id} (fleet {bundle.fleet}): node {bundle.node_id}, "
        f"certificate serial {bundle.cert_serial}; bundle written to {target}"
        + (" with the fleet's app-signing key" if bundle.app_signing_keys else "")
        + "\n"
        f"on the device: edgefl agent enroll --install {target.name}"
    )


@app.command()
@exits_on_error
def revoke(
    device: Annotated[str, typer.Argument(help="The device id to revoke.")],
    reason: Annotated[str, typer.Option(help="Why (kept in the registry).")] = "",
    config: ServerConfigOption = None,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Revoke a device: its certificate (CRL), its SuperLink node, its registry row.

    A running `edgefl server start` restarts its broker on the new CRL, which ends the
    device's MQTT access. Run it again if it failed half-way: it finishes the job.
    """
    from edgefl.server.enrollment import revoke as revoke_device

    ctx = _connect(config)
    try:
        result = revoke_device(device, reason, ca=ctx.ca, admin=ctx.admin, engine=ctx.engine)
    finally:
        ctx.close()
    info = result.enrollment.to_dict()
    if as_json:
        emit_json(
            {
                **info,
                "already_revoked": result.already_revoked,
                "node_was_registered": result.node_was_registered,
                "crl": str(ctx.ca.crl_path),
            }
        )
        return
    typer.echo(
        f"revoked {device}: certificate serial {info['cert_serial']} is in {ctx.ca.crl_path}, "
        f"node {info['node_id']} unregistered"
        + (" (it was already revoked; every step re-checked)" if result.already_revoked else "")
    )


@app.command("operator-cert")
@exits_on_error
def operator_cert(
    name: Annotated[str, typer.Argument(help="The operator's name ([A-Za-z0-9_-], 1-54).")],
    out: Annotated[
        Path | None,
        typer.Option(help="Folder for cert.pem, key.pem and ca.pem. [default: ./operator-NAME]"),
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
    from edgefl.errors import ConfigError
    from edgefl.files import write_bytes_atomic
    from edgefl.server.fleet_ca import OPERATOR_PREFIX, FleetCA
    from edgefl.server.serve import read_runtime

    cfg = _server_config(config)
    ca_dir = cfg.resolved_ca_dir
    if not (ca_dir / "ca.pem").exists():
        raise ConfigError(
            f"no fleet CA in {ca_dir}", hint="start the server once with `edgefl server start`"
        )
    ca = FleetCA.load(ca_dir)
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
def enrollments(
    config: ServerConfigOption = None,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """List enrolled devices: status, node id, certificate serial, dates, SuperLink view.

    ``superlink_status`` is the node's status on the SuperLink (``online``, ``offline``,
    ``registered`` = never connected, ``unregistered``), or ``unknown`` when the SuperLink
    cannot be asked. An admitted device that stays ``registered`` has never activated:
    on the device, `edgefl agent status` names the cause (wrong CA, unreachable SuperLink).
    """
    from edgefl.errors import ServiceUnavailableError
    from edgefl.server.enrollment import list_enrollments

    ctx = _connect(config, need_superlink=False)
    try:
        rows = [e.to_dict() for e in list_enrollments(ctx.engine)]
        try:
            nodes = {str(n.node_id): n.status for n in ctx.admin.list_nodes()} if rows else {}
        except ServiceUnavailableError:
            nodes = None
    finally:
        ctx.close()
    for row in rows:
        row["superlink_status"] = (
            "unknown" if nodes is None else nodes.get(str(row["node_id"]), "absent")
        )
    if as_json:
        emit_json({"enrollments": rows})
        return
    if not rows:
        typer.echo("no enrolled devices (admit one with `edgefl server admit REQUEST`)")
    for row in rows:
        extra = f"  revoked {row['revoked_at']} {row['revoke_reason']}" if row["revoked_at"] else ""
        typer.echo(
            f"{row['device_id']:<24} {row['status']:<9} fleet {row['fleet']:<12} "
            f"node {row['node_id']:<20} ({row['superlink_status']}) "
            f"serial {row['cert_serial']}  admitted {row['admitted_at']}{extra}"
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

    state_dir = _server_config(config).resolved_state_dir
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


@app.command()
@exits_on_error
def train(
    plan: Annotated[Path, typer.Option("--plan", help="Federation plan (TOML, YAML or JSON).")],
    config: ServerConfigOption = None,
    run_id: Annotated[
        str | None, typer.Option("--run-id", help="Our run id (an existing one resumes).")
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait for the run; print rounds and ε per device.")
    ] = False,
    poll_s: Annotated[float, typer.Option(help="Seconds between status checks.")] = 3.0,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Start a federated run of PLAN on the server's SuperLink (edgefl's ServerApp/ClientApp).

    Devices take part through their agents' SuperNodes. With --wait, follow it until it
    finishes, then print the registry's rounds and each device's ε from the ledger.
    """
    from edgefl.clikit import error_console_print
    from edgefl.config import load_config
    from edgefl.errors import BadInputError
    from edgefl.federation import FederationPlan
    from edgefl.files import check_safe_name
    from edgefl.server.fl.ledger import new_run_id
    from edgefl.server.fl.superlink import write_run_app
    from edgefl.server.registry.db import display_url

    if run_id is not None:
        # The run id names a folder under state_dir/runs: ".", ".." or "a/b" would write
        # the run's files somewhere else.
        try:
            check_safe_name(run_id, "run id")
        except BadInputError as exc:
            raise typer.BadParameter(str(exc), param_hint="--run-id") from exc
    fed_plan = load_config(FederationPlan, plan)
    budget = fed_plan.central_budget
    if budget is not None and budget.rounds_fit < fed_plan.rounds:
        error_console_print(f"warning: {budget.describe()}")
    rid = run_id or new_run_id()
    ctx = _connect(config)
    try:
        from edgefl.server.fl.app_signing import load_app_signing_key

        run_dir = ctx.config.resolved_state_dir / "runs" / rid
        # Signed when the server has an app-signing key (`edgefl server app-key`); devices
        # run edgefl's installed ClientApp either way.
        signing_key = load_app_signing_key(ctx.config.resolved_state_dir)
        app_dir = write_run_app(
            run_dir / "app",
            fed_plan,
            registry_url=ctx.config.resolved_db_url,
            run_id=rid,
            admitted_only=True,  # nodes not admitted with `edgefl server admit` never train
            signing_key=signing_key,
        )
        flower_run_id = ctx.admin.submit_run(app_dir)
        (run_dir / "flower-run-id").write_text(f"{flower_run_id}\n", encoding="utf-8")
        db_url = ctx.config.resolved_db_url
        submitted = {
            "run_id": rid,
            "flower_run_id": flower_run_id,
            "app_dir": str(app_dir),
            "db_url": display_url(db_url),  # shown: never with its password
        }
        if not wait:
            if as_json:
                emit_json(submitted)
            else:
                typer.echo(
                    f"submitted run {rid} (Flower run {flower_run_id}); follow it with "
                    f"`edgefl server train ... --wait` or `flwr ls`"
                )
            return
        error_console_print(f"submitted run {rid} (Flower run {flower_run_id}); waiting")
        status = _wait_for_run(ctx, flower_run_id, rid, fed_plan.rounds, poll_s)
    finally:
        ctx.close()
    _report_run(submitted, status, as_json, db_url=db_url)


def _rounds_done(db_url: str, run_id: str) -> int:
    from edgefl.errors import EdgeflError
    from edgefl.server.fl.ledger import FlStore

    try:
        store = FlStore(db_url)
    except EdgeflError:
        return 0
    try:
        return len(store.result(run_id).rounds)
    except EdgeflError:
        return 0
    finally:
        store.close()


def _wait_for_run(ctx: _Admin, flower_run_id: int, run_id: str, rounds: int, poll_s: float) -> str:
    import time

    from edgefl.clikit import error_console_print

    last = ""
    while True:
        info = ctx.admin.run_info(flower_run_id)
        status = str(info.get("status", "unknown"))
        done = _rounds_done(ctx.config.resolved_db_url, run_id)
        line = f"run {run_id}: {status}, round {done}/{rounds} committed"
        if line != last:
            error_console_print(line)
            last = line
        if status.startswith("finished"):
            return status
        time.sleep(poll_s)


def _report_run(
    submitted: dict[str, Any], status: str, as_json: bool, *, db_url: str | None = None
) -> None:
    """Print a finished run; raise RunFailedError (exit 9) unless it trained every round.

    ``db_url`` is the registry with its password; ``submitted["db_url"]`` is only shown.
    """
    from edgefl.errors import RunFailedError
    from edgefl.server.fl.ledger import load_result

    run_id = str(submitted["run_id"])
    url = db_url or str(submitted["db_url"])
    result = load_result(url, run_id) if _has_run(url, run_id) else None
    if as_json:
        emit_json(
            {
                **submitted,
                "flower_status": status,
                "result": result.to_dict() if result is not None else None,
            }
        )
    else:
        typer.echo(f"run {run_id} (Flower run {submitted['flower_run_id']}): {status}")
        if result is not None:
            typer.echo(
                f"{'round':>5} {'accuracy':>9} {'loss':>8} {'replies':>9} {'ε max':>7} {'s':>6}"
            )
            for r in result.rounds:
                typer.echo(
                    f"{r.round:>5} {r.accuracy:>9.4f} {r.loss:>8.4f} "
                    f"{r.num_replies:>4}/{r.num_selected:<4} {r.epsilon_max:>7.3f} {r.wall_s:>6.1f}"
                    + ("" if r.aggregated else f"  trained nobody: {r.why_nothing_trained()}")
                )
            for device, eps in result.epsilon_per_device.items():
                typer.echo(f"ε {device:<24} {eps:.4f}")
            if result.central_epsilon is not None:
                typer.echo(f"central ε {result.central_epsilon:.4f}")
    if status != "finished:completed":
        raise RunFailedError(
            f"Flower run {submitted['flower_run_id']} ended {status}",
            hint=f"see `flwr log {submitted['flower_run_id']}` and the SuperLink log in the "
            "server's state_dir/superlink/",
        )
    # Flower's "completed" only says the ServerApp returned: a run whose rounds trained
    # nobody, or that stopped early, did not do what was asked.
    shortfall = result.shortfall() if result is not None else "the registry has no such run"
    if shortfall is not None:
        raise RunFailedError(f"run {run_id} did not complete: {shortfall}")


def _has_run(db_url: str, run_id: str) -> bool:
    from edgefl.errors import EdgeflError
    from edgefl.server.fl.ledger import FlStore

    try:
        store = FlStore(db_url)
    except EdgeflError:
        return False
    try:
        store.result(run_id)
        return True
    except EdgeflError:
        return False
    finally:
        store.close()
