"""``edgefl server``: cloud-side processes and registry queries."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from edgefl.clikit import JSON_OPTION, emit_json, exits_on_error

__all__ = ["app"]

app = typer.Typer(help="Cloud side: MQTT ingest and the device registry.", no_args_is_help=True)

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
