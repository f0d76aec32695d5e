"""``edgefl agent``: run the device agent and inspect it."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer

from edgefl.clikit import JSON_OPTION, emit_json, exits_on_error

__all__ = ["app"]

app = typer.Typer(help="The device agent: data sources, outbox, MQTT link.", no_args_is_help=True)

ConfigOption = Annotated[
    Path, typer.Option("--config", "-c", help="Agent config file (YAML, TOML or JSON).")
]


def _load(config: Path) -> Any:
    from edgefl.config import load_config
    from edgefl.edge_agent.daemon import AgentConfig

    return load_config(AgentConfig, config)


@app.command("validate-config")
@exits_on_error
def validate_config(config: ConfigOption, as_json: Annotated[bool, JSON_OPTION] = False) -> None:
    """Check a config file; exits 3 naming each bad key."""
    cfg = _load(config)
    if as_json:
        emit_json({"valid": True, "config": cfg.model_dump(mode="json")})
    else:
        typer.echo(f"{config}: valid (device {cfg.device_id}, fleet {cfg.fleet})")


@app.command()
@exits_on_error
def run(config: ConfigOption) -> None:
    """Run the agent until SIGTERM or Ctrl-C; boots even when the broker is down."""
    from edgefl.edge_agent.daemon import Agent

    agent = Agent(_load(config))
    stop = threading.Event()

    def _stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    agent.run(stop)


@app.command()
@exits_on_error
def status(config: ConfigOption, as_json: Annotated[bool, JSON_OPTION] = False) -> None:
    """Connection state, outbox depth and bytes, age of the oldest record, drops."""
    from edgefl.edge_agent.daemon import read_status

    report = read_status(_load(config))
    if as_json:
        emit_json(report)
        return
    box = report["outbox"]
    age = box.get("oldest_age_s")
    typer.echo(
        f"agent {report['device_id']} ({report['fleet']}): {report['state']}, "
        f"{'connected' if report['connected'] else 'not connected'}\n"
        f"outbox: {box.get('depth', 0)} records, {box.get('bytes', 0)} bytes, oldest "
        f"{'-' if age is None else f'{age:.1f} s'}, dropped {box.get('dropped', 0)}, "
        f"expired {box.get('expired', 0)}, rejected {report['rejected']}"
    )
