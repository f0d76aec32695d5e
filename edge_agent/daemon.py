"""The agent daemon: sources → outbox → MQTT, with a status file for ``agent status``.

Every record a source produces is wrapped in the fleet envelope and committed to the
SQLite outbox *before* anything is sent; the single sender thread publishes with QoS 1
and deletes a record only on a successful PUBACK. The daemon writes
``<state_dir>/agent-status.json`` every ``status_interval_s`` so that ``edgefl agent
status`` can report on a running (or dead) agent from another process.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from edgefl.config import StrictModel
from edgefl.edge_agent.mqtt_link import MqttLink, MqttLinkConfig, OutboxSender, status_topic
from edgefl.edge_agent.outbox import Outbox, OutboxFullError, OutboxPolicy
from edgefl.edge_agent.sources import DataSource, SourceConfig, SourceRecord, build_source
from edgefl.files import write_text_atomic

__all__ = ["STATUS_FILE", "Agent", "AgentConfig", "read_status"]

logger = logging.getLogger(__name__)

STATUS_FILE = "agent-status.json"
OUTBOX_FILE = "outbox.db"
_ID = r"^[A-Za-z0-9_-]{1,64}$"


class AgentConfig(StrictModel):
    """The agent's one config file (YAML). Unknown keys are errors."""

    device_id: str = Field(pattern=_ID, description="This device's id (its certificate CN).")
    fleet: str = Field("default", pattern=_ID, description="Fleet the device belongs to.")
    state_dir: Path = Field(description="Where the outbox and status file live.")
    encoding: Literal["json", "protobuf"] = Field(
        "json", description="Envelope encoding on the wire (json is readable by mosquitto_sub)."
    )
    mqtt: MqttLinkConfig
    outbox: OutboxPolicy = Field(default_factory=lambda: OutboxPolicy())
    sources: list[SourceConfig] = Field(default_factory=list)
    status_interval_s: float = Field(1.0, gt=0, le=3600)

    @model_validator(mode="before")
    @classmethod
    def _client_id_defaults_to_device_id(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("mqtt"), dict):
            mqtt = data["mqtt"]
            if "client_id" not in mqtt and isinstance(data.get("device_id"), str):
                data = {**data, "mqtt": {**mqtt, "client_id": data["device_id"]}}
        return data


class Agent:
    """Runs the data sources, the outbox and the MQTT link until stopped."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self.outbox = Outbox(config.state_dir / OUTBOX_FILE, config.device_id, config.outbox)
        self.link = MqttLink(config.mqtt, status_topic=status_topic(config.fleet, config.device_id))
        self.sender = OutboxSender(self.outbox, self.link)
        self.sources: list[DataSource] = [build_source(s) for s in config.sources]
        self.rejected = 0
        self._started_at = time.time()

    def topic_for(self, record: SourceRecord) -> str:
        """``edgefl/{fleet}/{device}/{kind}/{stream}``."""
        return f"edgefl/{self.config.fleet}/{self.config.device_id}/{record.kind}/{record.stream}"

    def submit(self, record: SourceRecord) -> int | None:
        """Commit one record to the outbox; returns its seq, or None if the outbox refused it."""
        from edgefl.proto.serde import Envelope, encode_envelope

        ts_ms = int(time.time() * 1000)

        def encode(seq: int) -> bytes:
            env = Envelope(
                version=1,
                device_id=self.config.device_id,
                seq=seq,
                ts_ms=ts_ms,
                kind=record.kind,
                content_type=record.content_type,
                body=record.body,
            )
            return encode_envelope(env, self.config.encoding)

        try:
            stored = self.outbox.put(self.topic_for(record), encode, kind=record.kind)
        except OutboxFullError as exc:
            self.rejected += 1
            logger.warning("outbox refused a %s record: %s", record.kind, exc)
            return None
        self.sender.wake()
        return stored.seq

    def run(self, stop: threading.Event) -> None:
        """Block until ``stop`` is set; always closes cleanly (retained ``offline``)."""
        self.link.start()
        self.sender.start()
        next_status = 0.0
        try:
            while not stop.is_set():
                now = time.monotonic()
                for source in self.sources:
                    for record in source.due(now):
                        self.submit(record)
                if now >= next_status:
                    self.write_status(running=True)
                    next_status = now + self.config.status_interval_s
                stop.wait(0.01)
        finally:
            self.sender.stop()
            self.link.close()
            self.write_status(running=False)
            self.outbox.close()

    def status(self, *, running: bool) -> dict[str, Any]:
        """The document ``agent status`` shows."""
        stats = self.outbox.stats()
        return {
            "device_id": self.config.device_id,
            "fleet": self.config.fleet,
            "pid": os.getpid(),
            "running": running,
            "started_at": self._started_at,
            "updated_at": time.time(),
            "connected": self.link.connected,
            "outbox": {
                "depth": stats.depth,
                "bytes": stats.bytes,
                "oldest_age_s": stats.oldest_age_s,
                "dropped": stats.dropped,
                "expired": stats.expired,
                "rejected": self.rejected,
                "next_seq": stats.next_seq,
            },
            "sender": {
                "published": self.sender.published,
                "acked": self.sender.acked,
                "failed": self.sender.failed,
            },
        }

    def write_status(self, *, running: bool) -> None:
        """Atomically rewrite the status file."""
        path = self.config.state_dir / STATUS_FILE
        write_text_atomic(path, json.dumps(self.status(running=running), indent=2) + "\n")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_status(config: AgentConfig) -> dict[str, Any]:
    """Status for ``agent status``: the daemon's last report plus the outbox as it is now.

    Works whether or not the agent runs: the outbox is read from its SQLite file (WAL
    allows a reader beside the running writer).
    """
    path = config.state_dir / STATUS_FILE
    report: dict[str, Any] = {}
    if path.is_file():
        try:
            report = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            report = {}
    stale_after = max(5 * config.status_interval_s, 5.0)
    alive = bool(report.get("running")) and _pid_alive(int(report.get("pid", 0)))
    fresh = time.time() - float(report.get("updated_at", 0.0)) < stale_after
    state = "running" if alive and fresh else ("stalled" if alive else "stopped")
    outbox: dict[str, Any] = {}
    if (config.state_dir / OUTBOX_FILE).is_file():
        with Outbox(config.state_dir / OUTBOX_FILE, config.device_id, config.outbox) as box:
            stats = box.stats()
        outbox = {
            "depth": stats.depth,
            "bytes": stats.bytes,
            "oldest_age_s": stats.oldest_age_s,
            "dropped": stats.dropped,
            "expired": stats.expired,
            "next_seq": stats.next_seq,
        }
    return {
        "device_id": config.device_id,
        "fleet": config.fleet,
        "state": state,
        "connected": bool(report.get("connected")) if state == "running" else False,
        "pid": report.get("pid"),
        "updated_at": report.get("updated_at"),
        "outbox": outbox or report.get("outbox", {}),
        "rejected": report.get("outbox", {}).get("rejected", 0),
        "sender": report.get("sender", {}),
    }
