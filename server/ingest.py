"""MQTT ingest: validate fleet envelopes and store each ``(device_id, seq)`` exactly once.

Data flow::

    mosquitto --(QoS 1, persistent MQTT 5 session)--> paho network thread
        --queue--> worker thread: validate, one DB transaction per batch, commit
        --> PUBACK (manual ack) for every message of the batch

Acknowledging only after the commit means a crash (even ``kill -9``) between receipt and
commit leaves the message unacknowledged, and the broker redelivers it when the ingest
reconnects with the same client id; the unique ``(device_id, seq)`` key turns those
redeliveries (and the device outbox's own wire duplicates) into counted duplicates
instead of extra rows. Messages published while the ingest is down are kept by the broker
for the persistent session (up to mosquitto's ``max_queued_messages``, 1000 by default:
raise it in production).

Nothing a device sends can crash the ingest: bad topics, oversized payloads, malformed
envelopes, a device id that differs from the topic and unusable status payloads go to the
``dead_letters`` table with a reason code and a detail.
"""

from __future__ import annotations

import logging
import queue
import signal
import ssl
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, Final, cast

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions
from pydantic import Field, model_validator
from sqlalchemy import Engine, Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

from edgefl.config import StrictModel
from edgefl.errors import ConfigError
from edgefl.proto.serde import Envelope, EnvelopeError, decode_envelope
from edgefl.server.registry.db import default_database_url, make_engine, session_factory
from edgefl.server.registry.db import upgrade as upgrade_registry
from edgefl.server.registry.models import DEAD_LETTER_PAYLOAD_CAP, DeadLetter, Device, Record

__all__ = ["DEAD_LETTER_REASONS", "Ingest", "IngestConfig", "subscription_topics"]

logger = logging.getLogger(__name__)

_SEGMENT = r"[A-Za-z0-9_-]{1,64}"
_SEGMENT_CHARS: Final = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"
)
_STREAM_KINDS: Final = frozenset({"telemetry", "data", "result"})
_INT64_MAX: Final = 2**63 - 1
# The hot path writes through the tables (SQLAlchemy Core), not the ORM classes: the ORM's
# bulk-insert machinery costs more per row than the INSERT itself.
_DEVICES: Final = cast(Table, Device.__table__)
_RECORDS: Final = cast(Table, Record.__table__)

DEAD_LETTER_REASONS: Final = (
    "bad_status",
    "bad_topic",
    "device_mismatch",
    "malformed_envelope",
    "oversized",
    "seq_out_of_range",
    "store_failed",
)
"""Every reason code the ingest writes to ``dead_letters.reason``."""


class IngestConfig(StrictModel):
    """Settings of the MQTT ingest (validated once, unknown keys are errors)."""

    broker_host: str = Field("127.0.0.1", min_length=1, description="MQTT broker host name.")
    broker_port: int = Field(1883, ge=1, le=65535, description="MQTT broker TCP port.")
    client_id: str = Field(
        "edgefl-ingest",
        pattern=rf"^{_SEGMENT}$",
        description="MQTT client id; the broker keeps the persistent session under it, so "
        "a restarted ingest must reuse it to receive what was published meanwhile.",
    )
    username: str | None = Field(None, description="Broker user name, if the broker wants one.")
    password: str | None = Field(None, description="Broker password (with username).")
    ca_file: Path | None = Field(
        None, description="CA certificate that signed the broker's certificate: enables TLS."
    )
    cert_file: Path | None = Field(
        None,
        description="Client certificate for mutual TLS (the fleet CA's edgefl-server "
        "service certificate; the broker takes its CN as the user name).",
    )
    key_file: Path | None = Field(None, description="Private key of cert_file.")
    db_url: str = Field(
        default_factory=default_database_url,
        description="Registry database URL; default sqlite:///<state dir>/edgefl.db.",
    )
    migrate: bool = Field(True, description="Run the alembic migrations to head at start.")
    fleet: str = Field(
        "+",
        pattern=rf"^(\+|{_SEGMENT})$",
        description="Fleet to subscribe to, or '+' for every fleet.",
    )
    max_payload_bytes: int = Field(
        256 * 1024, ge=1, description="Larger payloads are dead-lettered as 'oversized'."
    )
    session_expiry_s: int = Field(
        7 * 24 * 3600,
        ge=0,
        le=2**32 - 1,
        description="MQTT 5 session expiry: how long the broker keeps queueing for a "
        "disconnected ingest.",
    )
    keepalive_s: int = Field(30, ge=5, le=3600, description="MQTT keepalive in seconds.")
    receive_maximum: int = Field(
        1000,
        ge=1,
        le=65535,
        description="Most unacknowledged QoS 1 messages the broker may send at once.",
    )
    batch_max: int = Field(
        500, ge=1, le=10_000, description="Most messages stored in one DB transaction."
    )

    @model_validator(mode="after")
    def _tls_files(self) -> IngestConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        if self.cert_file is not None and self.ca_file is None:
            raise ValueError("cert_file needs ca_file (the CA of the broker's certificate)")
        return self


def subscription_topics(fleet: str = "+") -> list[str]:
    """The topic filters the ingest subscribes to (all QoS 1).

    Args:
        fleet: A fleet name, or ``"+"`` for every fleet.

    Returns:
        The MQTT topic filters.
    """
    base = f"edgefl/{fleet}/+"
    return [
        f"{base}/telemetry/#",
        f"{base}/data/#",
        f"{base}/result/#",
        f"{base}/status",
        f"{base}/cmd-resp/#",
        f"{base}/state/reported",
    ]


@dataclass(frozen=True, slots=True)
class _Incoming:
    topic: str
    payload: bytes
    mid: int
    qos: int


@dataclass(slots=True)
class _Batch:
    """What one batch of messages turns into, before it is written."""

    records: list[dict[str, Any]]
    record_keys: list[tuple[str, int]]
    in_batch_duplicates: int
    devices: dict[str, tuple[str, bool | None]]
    dead: list[dict[str, Any]]
    dead_reasons: Counter[str]
    status_updates: int


class _RejectedError(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _is_segment(text: str) -> bool:
    return 1 <= len(text) <= 64 and all(c in _SEGMENT_CHARS for c in text)


def _parse_topic(topic: str) -> tuple[str, str, list[str]]:
    """Split ``edgefl/{fleet}/{device}/...`` and check it is a topic the ingest reads."""
    parts = topic.split("/")
    if len(parts) < 4 or parts[0] != "edgefl":
        raise _RejectedError("bad_topic", f"topic {topic!r} is not edgefl/{{fleet}}/{{device}}/...")
    fleet, device, rest = parts[1], parts[2], parts[3:]
    if not _is_segment(fleet) or not _is_segment(device):
        raise _RejectedError("bad_topic", f"fleet/device segments of {topic!r} must be {_SEGMENT}")
    head = rest[0]
    valid = (
        (head in _STREAM_KINDS and len(rest) >= 2 and all(rest[1:]))
        or (head == "cmd-resp" and len(rest) == 2 and rest[1] != "")
        or rest in (["status"], ["state", "reported"])
    )
    if not valid:
        raise _RejectedError("bad_topic", f"topic {topic!r} is not part of the fleet contract")
    return fleet, device, rest


class Ingest:
    """The MQTT consumer that fills the registry.

    Use :meth:`run` in a process (blocks until SIGTERM/SIGINT), or :meth:`start` and
    :meth:`stop` around it in tests.

    Args:
        config: Validated settings.
    """

    def __init__(self, config: IngestConfig) -> None:
        self.config = config
        self._queue: queue.Queue[_Incoming | None] = queue.Queue(
            maxsize=max(2 * config.receive_maximum, config.batch_max)
        )
        self._counters: Counter[str] = Counter()
        self._counters_lock = threading.Lock()
        self._subscribed = threading.Event()
        self._accepting = threading.Event()
        self._stop_requested = threading.Event()
        self._worker: threading.Thread | None = None
        self._engine: Engine | None = None
        self._client = self._make_client()

    # -- public API -------------------------------------------------------------------

    def start(self) -> None:
        """Migrate the registry, start the worker thread and connect in the background.

        Returns once the network loop runs; the first connection is retried until the
        broker answers. Use :meth:`wait_ready` to wait for the subscriptions.

        Raises:
            ConfigError: The database URL is unusable or the migration failed.
        """
        if self._worker is not None:
            raise RuntimeError("Ingest.start() called twice")
        if self.config.migrate:
            upgrade_registry(self.config.db_url)
        self._engine = make_engine(self.config.db_url)
        if self._engine.dialect.name not in ("sqlite", "postgresql"):
            raise ConfigError(
                f"unsupported registry database {self._engine.dialect.name!r} "
                "(use sqlite or postgresql)"
            )
        self._stop_requested.clear()
        self._accepting.set()
        self._worker = threading.Thread(target=self._work, name="edgefl-ingest-db", daemon=True)
        self._worker.start()
        properties = _properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = self.config.session_expiry_s
        properties.ReceiveMaximum = self.config.receive_maximum
        self._client.connect_async(
            self.config.broker_host,
            self.config.broker_port,
            keepalive=self.config.keepalive_s,
            clean_start=False,
            properties=properties,
        )
        self._client.loop_start()
        logger.info(
            "ingest %s connecting to %s:%d, storing into %s",
            self.config.client_id,
            self.config.broker_host,
            self.config.broker_port,
            self._engine.url.render_as_string(hide_password=True),
        )

    def wait_ready(self, timeout: float) -> bool:
        """Wait until the broker has confirmed every subscription.

        Args:
            timeout: Seconds to wait at most.

        Returns:
            Whether the ingest is subscribed.
        """
        return self._subscribed.wait(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Store and acknowledge what was already received, then disconnect.

        Messages that arrive while stopping are not acknowledged; the broker redelivers
        them on the next start (same client id), so nothing is lost.

        Args:
            timeout: Seconds to wait for the worker to drain its queue.
        """
        self._accepting.clear()
        self._stop_requested.set()
        worker = self._worker
        if worker is not None:
            try:
                self._queue.put(None, timeout=timeout)
            except queue.Full:
                logger.warning(
                    "ingest queue still full at stop; unstored messages will be "
                    "redelivered by the broker"
                )
            worker.join(timeout)
            if worker.is_alive():
                logger.warning("ingest worker did not finish within %.0f s", timeout)
        properties = _properties(PacketTypes.DISCONNECT)
        properties.SessionExpiryInterval = self.config.session_expiry_s
        self._client.disconnect(properties=properties)
        self._client.loop_stop()
        self._worker = None
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
        logger.info("ingest stopped: %s", self.metrics())

    def run(self) -> None:
        """Run until SIGTERM or SIGINT (when called from the main thread) or :meth:`stop`.

        Raises:
            ConfigError: The database URL is unusable or the migration failed.
        """
        if threading.current_thread() is threading.main_thread():

            def _on_signal(signum: int, _frame: FrameType | None) -> None:
                logger.info("ingest got signal %d, stopping", signum)
                self._stop_requested.set()

            signal.signal(signal.SIGTERM, _on_signal)
            signal.signal(signal.SIGINT, _on_signal)
        self.start()
        try:
            while not self._stop_requested.wait(1.0):
                pass
        finally:
            self.stop()

    def metrics(self) -> dict[str, int]:
        """A snapshot of the counters.

        Keys: ``received``, ``stored``, ``duplicates``, ``dead_lettered``,
        ``dead_lettered.<reason>`` for each reason in :data:`DEAD_LETTER_REASONS`,
        ``status_updates``, ``acked``, ``db_retries`` and ``queued`` (current queue
        depth).
        """
        with self._counters_lock:
            snapshot = dict(self._counters)
        result = {
            "received": 0,
            "stored": 0,
            "duplicates": 0,
            "dead_lettered": 0,
            "status_updates": 0,
            "acked": 0,
            "db_retries": 0,
        }
        result.update({f"dead_lettered.{reason}": 0 for reason in DEAD_LETTER_REASONS})
        result.update(snapshot)
        result["queued"] = self._queue.qsize()
        return dict(sorted(result.items()))

    # -- MQTT callbacks (paho network thread) -----------------------------------------

    def _make_client(self) -> mqtt.Client:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.config.client_id,
            protocol=mqtt.MQTTv5,
            manual_ack=True,
        )
        if self.config.username is not None:
            client.username_pw_set(self.config.username, self.config.password)
        if self.config.ca_file is not None:
            try:
                client.tls_set(
                    ca_certs=str(self.config.ca_file),
                    certfile=str(self.config.cert_file) if self.config.cert_file else None,
                    keyfile=str(self.config.key_file) if self.config.key_file else None,
                )
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    f"ingest TLS files unusable ({self.config.ca_file}, "
                    f"{self.config.cert_file}, {self.config.key_file}): {exc}",
                    hint="point ca_file/cert_file/key_file at the fleet CA and the "
                    "edgefl-server service certificate",
                ) from exc
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        return client

    def _on_connect(
        self,
        client: mqtt.Client,
        _userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            logger.error("broker refused the ingest connection: %s", reason_code)
            return
        logger.info("ingest connected (session present: %s)", flags.session_present)
        topics = [(t, SubscribeOptions(qos=1)) for t in subscription_topics(self.config.fleet)]
        result, _mid = client.subscribe(topics)
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS:
            logger.error("ingest subscribe failed: %s", mqtt.error_string(result))

    def _on_subscribe(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        _mid: int,
        reason_codes: list[ReasonCode],
        _properties: Properties | None,
    ) -> None:
        failed = [str(code) for code in reason_codes if code.is_failure]
        if failed:
            logger.error("broker refused ingest subscriptions: %s", failed)
            return
        self._subscribed.set()

    def _on_disconnect(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        _flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        self._subscribed.clear()
        if self._stop_requested.is_set():
            return
        logger.warning("ingest disconnected (%s); reconnecting", reason_code)

    def _on_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if not self._accepting.is_set():
            return  # not acknowledged: the broker redelivers it next session
        with self._counters_lock:
            self._counters["received"] += 1
        # Blocking here when the worker is behind is the back-pressure we want: paho stops
        # reading the socket and the broker holds the rest.
        self._queue.put(_Incoming(msg.topic, bytes(msg.payload), msg.mid, msg.qos))

    # -- worker thread ----------------------------------------------------------------

    def _work(self) -> None:
        stopping = False
        while not stopping:
            try:
                item = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            if item is None:
                break
            batch = [item]
            while len(batch) < self.config.batch_max:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                    break
                batch.append(nxt)
            try:
                self._handle(batch)
            except Exception:  # the worker must survive anything; messages stay unacked
                logger.exception("ingest failed on a batch of %d messages", len(batch))

    def _handle(self, batch: Sequence[_Incoming]) -> None:
        """Store one batch (retrying while the database is unreachable), then ack it."""
        planned = self._plan(batch, datetime.now(UTC))
        delay = 0.2
        while True:
            try:
                stored, duplicates = self._write(planned)
                break
            except (OperationalError, DBAPIError) as exc:
                if not _is_transient(exc):
                    logger.error("storing a batch failed (%s); storing one by one", exc)
                    stored, duplicates = self._write_one_by_one(batch)
                    planned = self._plan([], datetime.now(UTC))
                    break
                if self._stop_requested.is_set():
                    logger.error(
                        "database unavailable while stopping; %d messages left "
                        "unacknowledged for redelivery",
                        len(batch),
                    )
                    return
                with self._counters_lock:
                    self._counters["db_retries"] += 1
                logger.warning("database unavailable (%s); retrying in %.1f s", exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
            except SQLAlchemyError as exc:
                logger.error("storing a batch failed (%s); storing one by one", exc)
                stored, duplicates = self._write_one_by_one(batch)
                planned = self._plan([], datetime.now(UTC))
                break
        self._ack(batch)
        with self._counters_lock:
            self._counters["stored"] += stored
            self._counters["duplicates"] += duplicates + planned.in_batch_duplicates
            self._counters["status_updates"] += planned.status_updates
            for reason, count in planned.dead_reasons.items():
                self._counters["dead_lettered"] += count
                self._counters[f"dead_lettered.{reason}"] += count

    def _write_one_by_one(self, batch: Sequence[_Incoming]) -> tuple[int, int]:
        """Fallback after a non-transient batch failure: isolate the offending message."""
        stored = duplicates = 0
        for item in batch:
            planned = self._plan([item], datetime.now(UTC))
            try:
                s, d = self._write(planned)
            except SQLAlchemyError as exc:
                logger.error("cannot store message on %s: %s", item.topic, exc)
                planned = self._plan([], datetime.now(UTC))
                planned.dead.append(_dead_row(item, "store_failed", str(exc), datetime.now(UTC)))
                planned.dead_reasons["store_failed"] += 1
                try:
                    s, d = self._write(planned)
                except SQLAlchemyError:
                    logger.exception("cannot dead-letter message on %s; dropping it", item.topic)
                    continue
            stored += s
            duplicates += d + planned.in_batch_duplicates
            with self._counters_lock:
                self._counters["status_updates"] += planned.status_updates
                for reason, count in planned.dead_reasons.items():
                    self._counters["dead_lettered"] += count
                    self._counters[f"dead_lettered.{reason}"] += count
        return stored, duplicates

    def _ack(self, batch: Sequence[_Incoming]) -> None:
        acked = 0
        for item in batch:
            if item.qos > 0:
                result = self._client.ack(item.mid, item.qos)
                if result == MQTTErrorCode.MQTT_ERR_SUCCESS:
                    acked += 1
                else:  # the broker redelivers it; the unique key absorbs the duplicate
                    logger.debug("ack of mid %d failed: %s", item.mid, mqtt.error_string(result))
        with self._counters_lock:
            self._counters["acked"] += acked

    def _plan(self, batch: Sequence[_Incoming], now: datetime) -> _Batch:
        planned = _Batch([], [], 0, {}, [], Counter(), 0)
        seen: set[tuple[str, int]] = set()
        for item in batch:
            try:
                fleet, device, rest = _parse_topic(item.topic)
                if len(item.payload) > self.config.max_payload_bytes:
                    raise _RejectedError(
                        "oversized",
                        f"payload of {len(item.payload)} bytes exceeds the limit of "
                        f"{self.config.max_payload_bytes}",
                    )
                if rest == ["status"]:
                    online = _parse_status(item.payload)
                    if online is None:
                        continue  # an empty retained message clears the status: nothing to do
                    planned.devices[device] = (fleet, online)
                    planned.status_updates += 1
                    continue
                envelope = _decode(item.payload)
                if envelope.device_id != device:
                    raise _RejectedError(
                        "device_mismatch",
                        f"envelope device_id {envelope.device_id!r} differs from topic "
                        f"device {device!r}",
                    )
                if envelope.seq > _INT64_MAX:
                    raise _RejectedError(
                        "seq_out_of_range", f"seq {envelope.seq} exceeds the stored range 2**63-1"
                    )
            except _RejectedError as rejected:
                logger.warning("dead letter from %s: %s", item.topic, rejected)
                planned.dead.append(_dead_row(item, rejected.reason, rejected.detail, now))
                planned.dead_reasons[rejected.reason] += 1
                continue
            status = planned.devices.get(device, (fleet, None))[1]
            planned.devices[device] = (fleet, status)
            key = (envelope.device_id, envelope.seq)
            if key in seen:
                planned.in_batch_duplicates += 1
                continue
            seen.add(key)
            planned.record_keys.append(key)
            planned.records.append(
                {
                    "device_id": envelope.device_id,
                    "seq": envelope.seq,
                    "kind": envelope.kind,
                    "topic": item.topic,
                    "ts_ms": envelope.ts_ms,
                    "content_type": envelope.content_type,
                    "body": envelope.body,
                    "received_at": now,
                }
            )
        return planned

    def _write(self, planned: _Batch) -> tuple[int, int]:
        """One transaction: upsert devices, insert dead letters and records.

        Returns:
            ``(stored, duplicates)`` for the records.
        """
        assert self._engine is not None
        now = datetime.now(UTC)
        dialect = self._engine.dialect.name
        factory = session_factory(self._engine)
        with factory() as session, session.begin():
            for statement, rows in _upsert_devices(dialect, planned.devices, now):
                session.execute(statement, rows)
            if planned.dead:
                session.add_all(DeadLetter(**row) for row in planned.dead)
                session.flush()
            inserted = 0
            if planned.records:
                inserted = _insert_records(session, dialect, planned.records)
        return inserted, len(planned.records) - inserted


def _properties(packet_type: int) -> Properties:
    return Properties(packet_type)  # type: ignore[no-untyped-call]  # paho leaves it untyped


def _decode(payload: bytes) -> Envelope:
    try:
        return decode_envelope(payload)
    except EnvelopeError as exc:
        raise _RejectedError("malformed_envelope", exc.message) from exc


def _parse_status(payload: bytes) -> bool | None:
    text = payload.strip()
    if text == b"":
        return None
    if text == b"online":
        return True
    if text == b"offline":
        return False
    raise _RejectedError(
        "bad_status", f"status payload must be 'online' or 'offline', got {text[:40]!r}"
    )


def _dead_row(item: _Incoming, reason: str, detail: str, now: datetime) -> dict[str, Any]:
    return {
        "topic": item.topic,
        "payload": item.payload[:DEAD_LETTER_PAYLOAD_CAP],
        "payload_size": len(item.payload),
        "reason": reason,
        "detail": detail,
        "received_at": now,
    }


def _is_transient(exc: DBAPIError) -> bool:
    """Whether a database error means "try again later" rather than "bad data"."""
    return bool(exc.connection_invalidated) or isinstance(exc, OperationalError)


def _upsert_devices(
    dialect: str, devices: dict[str, tuple[str, bool | None]], now: datetime
) -> list[tuple[Any, list[dict[str, Any]]]]:
    """The device upserts of a batch: at most two statements, each run once for many rows.

    Devices seen only through records get ``last_seen``; those with a status message in the
    batch also get ``online`` and ``status_changed_at``. A new device is inserted with both
    timestamps ``now`` (``online`` false until its status says otherwise).
    """
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    groups: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    for device_id, (fleet, online) in devices.items():
        groups[online is not None].append(
            {
                "device_id": device_id,
                "fleet": fleet,
                "first_seen": now,
                "last_seen": now,
                "online": bool(online),
                "status_changed_at": now if online is not None else None,
            }
        )
    planned: list[tuple[Any, list[dict[str, Any]]]] = []
    for with_status, rows in groups.items():
        if not rows:
            continue
        statement = insert(_DEVICES)
        update: dict[str, Any] = {
            "fleet": statement.excluded.fleet,
            "last_seen": statement.excluded.last_seen,
        }
        if with_status:
            update["online"] = statement.excluded.online
            update["status_changed_at"] = statement.excluded.status_changed_at
        upsert = statement.on_conflict_do_update(index_elements=["device_id"], set_=update)
        planned.append((upsert, rows))
    return planned


def _insert_records(session: Session, dialect: str, rows: list[dict[str, Any]]) -> int:
    """Insert records, skipping existing ``(device_id, seq)``; returns how many were new."""
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = insert(_RECORDS).on_conflict_do_nothing(index_elements=["device_id", "seq"])
    result = session.execute(statement.returning(_RECORDS.c.id), rows)
    return len(result.all())
