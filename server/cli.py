"""``edgefl server``: cloud-side processes and registry queries."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from edgefl.clikit import JSON_OPTION, emit_json, exits_on_error

__all__ = ["app"]

app = typer.Typer(
    help="Cloud side: MQTT ingest, the device registry and the gRPC inference service.",
    no_args_is_help=True,
)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Ingest config file (YAML, TOML or JSON)."),
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
            f"cannot read the registry at {cfg.db_url}: {str(exc).splitlines()[0]}",
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
    model: Annotated[str, typer.Option(help="Heavy model to serve.")] = "digits",
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port; 0 picks a free one.")] = 0,
    weights: Annotated[
        Path | None,
        typer.Option(help="Weights cache folder (trained once if empty). [default: ~/.cache]"),
    ] = None,
    train_epochs: Annotated[
        int | None, typer.Option(help="Epochs if the model must be trained.")
    ] = None,
    max_batch: Annotated[int, typer.Option(help="Most samples per forward pass.")] = 32,
    max_wait_ms: Annotated[float, typer.Option(help="Longest wait to fill a batch.")] = 2.0,
    no_batching: Annotated[
        bool, typer.Option("--no-batching", help="One request per forward pass.")
    ] = False,
    max_concurrency: Annotated[
        int, typer.Option(help="In-flight requests before RESOURCE_EXHAUSTED.")
    ] = 256,
    max_message_bytes: Annotated[int, typer.Option(help="Largest request/response in bytes.")] = 4
    * 1024
    * 1024,
    torch_threads: Annotated[int, typer.Option(help="torch intra-op threads.")] = 1,
    tls_cert: Annotated[Path | None, typer.Option(help="Server certificate (PEM).")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="Server private key (PEM).")] = None,
    client_ca: Annotated[
        Path | None, typer.Option(help="Require client certificates from this CA (mTLS).")
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

    Prints the bound address once the model is SERVING (one JSON line with --json).
    """
    import json

    from edgefl.clikit import error_console_print
    from edgefl.config import validate_config
    from edgefl.server.inference.service import InferenceServer, InferenceServerConfig, serve

    config = validate_config(
        InferenceServerConfig,
        {
            "host": host,
            "port": port,
            "model": model,
            "weights": weights,
            "train_epochs": train_epochs,
            "max_batch": 1 if no_batching else max_batch,
            "max_wait_ms": max_wait_ms,
            "max_concurrency": max_concurrency,
            "max_message_bytes": max_message_bytes,
            "torch_threads": torch_threads,
            "tls_cert": tls_cert,
            "tls_key": tls_key,
            "client_ca": client_ca,
            "crl": crl,
            "registry_url": registry_url,
        },
        source="command line",
    )

    def ready(server: InferenceServer) -> None:
        served = server.models[config.model]
        info = {
            "address": server.address,
            "host": config.host,
            "port": server.port,
            "model": served.name,
            "version": served.version,
            "heldout_accuracy": served.heldout_accuracy,
            "max_batch": config.max_batch,
            "tls": config.tls_cert is not None,
            "mutual_tls": config.client_ca is not None,
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
        config,
        on_ready=ready,
        progress=lambda what, done, total: error_console_print(f"[{done}/{total}] {what}"),
    )
