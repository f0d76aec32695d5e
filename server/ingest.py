"""MQTT ingest: validate fleet envelopes and store each idempotency key exactly once.

Data flow::

    mosquitto --(QoS 1, persistent MQTT 5 session)--> paho network thread
        --queue--> worker thread: validate, one DB transaction per batch, commit
        --> PUBACK (manual ack) for every message of the batch

Acknowledging only after the commit means a crash (even ``kill -9``) between receipt and
commit leaves the message unacknowledged, and the broker redelivers it when the ingest
reconnects with the same client id; the unique ``(device_id, incarnation, seq)`` key
turns those redeliveries (and the device outbox's own wire duplicates) into counted
duplicates instead of extra rows. The incarnation is the sending outbox's identity
(envelope version 2; empty for version 1), so a deleted or reflashed outbox, whose seqs
start again at 1, is stored in full. A key that comes back with a *different* envelope is
not a redelivery: it is dead-lettered as ``conflicting_duplicate`` with a warning.
Messages published while the ingest is down are kept by the broker for the persistent
session (up to mosquitto's ``max_queued_messages``).

A ``result`` record also gets the model that computed it (``records.model``,
``model_version``, ``model_variant``, from its JSON body's ``model``, ``version`` and
``variant``), so the registry knows which model version produced each stored result;
a body that does not name one leaves them NULL and is stored all the same.

Reported model state: a device's retained ``state/reported`` document (JSON
:class:`~edgefl.proto.desired.ReportedState`, not an envelope) replaces the device's row of
``device_states`` when it differs from the stored one; the newest message wins (MQTT keeps
one publisher's order on a topic, and a retained copy sent again on a re-subscription is
the newest one). An empty retained payload (the device's report cleared) changes nothing.

Per-message isolation: what one message holds can cost that message only. Anything
wrong with it (bad topic, oversized payload, malformed envelope or reported state, a device
id that differs from the topic, a topic fleet other than the device's enrolled fleet, a
retained message on a stream topic, a status payload that is neither ``online`` nor
``offline``) sends it to the ``dead_letters`` table with a reason code and a detail, and
it is acknowledged with its batch. A batch whose transaction fails for another reason is
split in halves until the failing message is alone, and that one is dead-lettered as
``store_failed``.
Only a database outage (an error that says "try again": connection lost, locked, I/O)
holds a batch back unacknowledged, retrying with backoff, because then nothing could be
stored anyway. :meth:`Ingest.progress` tells a supervisor whether acknowledgements still
flow while messages wait (``edgefl server start`` restarts an ingest that stalls).
"""

from __future__ import annotations

import json
import logging
import queue
import signal
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import FrameType
from typing import TYPE_CHECKING, Any, ClassVar, Final, cast

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions
from pydantic import Field, SecretStr, model_validator
from sqlalchemy import Engine, Table, func, select, tuple_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session

from edgefl.config import Address, RenameMap, StrictModel, TlsFiles
from edgefl.errors import BadInputError, ConfigError
from edgefl.mqtt_client import build_client
from edgefl.proto.desired import MAX_STATE_BYTES, ReportedState, parse_reported
from edgefl.proto.ids import ID_PATTERN, ID_REGEX, is_id
from edgefl.proto.serde import (
    JSON_CONTENT_TYPE,
    MAX_ENVELOPE_BYTES,
    Envelope,
    EnvelopeError,
    decode_envelope,
)
from edgefl.proto.topics import ANY, RECORD_KINDS, ROOT, device_prefix
from edgefl.server.registry.db import default_database_url, make_engine, session_factory
from edgefl.server.registry.db import upgrade as upgrade_registry
from edgefl.server.registry.models import (
    DEAD_LETTER_PAYLOAD_CAP,
    DeadLetter,
    Device,
    DeviceState,
    Enrollment,
    Record,
)

__all__ = [
    "DEAD_LETTER_REASONS",
    "DEFAULT_MAX_PAYLOAD_BYTES",
    "BrokerAddress",
    "Ingest",
    "IngestConfig",
    "IngestProgress",
    "subscription_topics",
]

if TYPE_CHECKING:
    from edgefl.server.metrics import IngestMetrics

logger = logging.getLogger(__name__)

_STREAM_KINDS: Final = RECORD_KINDS
_INT64_MAX: Final = 2**63 - 1
# The hot path writes through the tables (SQLAlchemy Core), not the ORM classes: the ORM's
# bulk-insert machinery costs more per row than the INSERT itself.
_DEVICES: Final = cast(Table, Device.__table__)
_RECORDS: Final = cast(Table, Record.__table__)
_DEAD_LETTERS: Final = cast(Table, DeadLetter.__table__)
_ENROLLMENTS: Final = cast(Table, Enrollment.__table__)
_DEVICE_STATES: Final = cast(Table, DeviceState.__table__)
# The widest name the registry keeps of a reported state (model, variant, sha256, reason).
_STATE_NAME_MAX: Final = 64
# Keys per "(device_id, incarnation, seq) IN (...)" lookup: 3 bound parameters each.
_KEYS_PER_LOOKUP: Final = 300
_DETAIL_MAX: Final = 2000
# Backoff while the database is unavailable.
_DB_RETRY_MIN_S: Final = 0.2
_DB_RETRY_MAX_S: Final = 5.0

DEFAULT_MAX_PAYLOAD_BYTES: Final = MAX_ENVELOPE_BYTES
"""The default of :attr:`IngestConfig.max_payload_bytes`: larger payloads are refused.

It is the wire contract's :data:`~edgefl.proto.serde.MAX_ENVELOPE_BYTES`. The broker's
``message_size_limit`` is set to the same number, so a larger PUBLISH is refused at the
broker and never reaches the ingest's memory; the ingest checks again because an external
broker may not be configured that way."""

DEAD_LETTER_REASONS: Final = (
    "bad_status",
    "bad_topic",
    "conflicting_duplicate",
    "device_mismatch",
    "fleet_mismatch",
    "ingest_error",
    "malformed_envelope",
    "malformed_state",
    "oversized",
    "retained",
    "seq_out_of_range",
    "store_failed",
)
"""Every reason code the ingest writes to ``dead_letters.reason``.

* ``bad_topic``: not a topic of the fleet contract;
* ``oversized``: payload above ``max_payload_bytes`` (a reported state: above
  :data:`~edgefl.proto.desired.MAX_STATE_BYTES`);
* ``retained``: a retained message on a telemetry, data or result topic (records are a
  stream: a retained one would come back on every new subscription);
* ``bad_status``: a status payload other than ``online``/``offline``;
* ``malformed_envelope``: the envelope does not decode (the detail says why);
* ``malformed_state``: a ``state/reported`` payload that is not a
  :class:`~edgefl.proto.desired.ReportedState` (:func:`~edgefl.proto.desired.parse_reported`),
  or holds a value the registry cannot keep (a name over 64 characters, an integer beyond
  64 bits, a time outside years 1 to 9999, a NUL character);
* ``device_mismatch``: the envelope's device id (or the reported state's ``device``) is
  not the topic's;
* ``fleet_mismatch``: the topic's fleet is not the device's enrolled fleet (or, for a
  device without enrollment, the fleet it was first seen in);
* ``seq_out_of_range``: a seq above the stored range ``2**63-1``;
* ``conflicting_duplicate``: an idempotency key already stored (or earlier in the same
  batch) with a different envelope: a device reusing seqs, or a forged replay;
* ``store_failed``: the database refused this one message (the detail has its error);
* ``ingest_error``: the ingest itself failed on the message (a bug; logged with a
  traceback)."""


class BrokerAddress(Address):
    """The broker the ingest dials (``broker: {host, port}``)."""

    host: str = Field("127.0.0.1", min_length=1, description="MQTT broker host name.")
    port: int = Field(1883, ge=1, le=65535, description="MQTT broker TCP port.")


class IngestConfig(StrictModel):
    """Settings of the MQTT ingest (validated once, unknown keys are errors)."""

    renamed_keys: ClassVar[RenameMap] = {
        "broker_host": "broker.host",
        "broker_port": "broker.port",
        "ca_file": "tls.ca_file",
        "cert_file": "tls.cert_file",
        "key_file": "tls.key_file",
    }

    broker: BrokerAddress = Field(
        default_factory=lambda: BrokerAddress(), description="The MQTT broker to dial."
    )
    client_id: str = Field(
        "edgefl-ingest",
        pattern=ID_REGEX,
        description="MQTT client id; the broker keeps the persistent session under it, so "
        "a restarted ingest must reuse it to receive what was published meanwhile.",
    )
    username: str | None = Field(None, description="Broker user name, if the broker wants one.")
    password: SecretStr | None = Field(
        None, description="Broker password (with username); never printed."
    )
    tls: TlsFiles = Field(
        default_factory=lambda: TlsFiles(),
        description="ca_file: the CA that signed the broker's certificate, setting it "
        "enables TLS; cert_file/key_file: the client certificate for mutual TLS (the fleet "
        "CA's edgefl-ingest service certificate; the broker takes its CN as the user name).",
    )
    db_url: str = Field(
        default_factory=default_database_url,
        description="Registry database URL; default sqlite:///<state dir>/edgefl.db.",
    )
    migrate: bool = Field(True, description="Run the alembic migrations to head at start.")
    fleet: str = Field(
        "+",
        pattern=rf"^(\+|{ID_PATTERN})$",
        description="Fleet to subscribe to, or '+' for every fleet.",
    )
    max_payload_bytes: int = Field(
        DEFAULT_MAX_PAYLOAD_BYTES,
        ge=1,
        le=MAX_ENVELOPE_BYTES,
        description="Larger payloads are dead-lettered as 'oversized'; the broker's "
        "message_size_limit should be the same number. At most the wire contract's "
        "MAX_ENVELOPE_BYTES (256 KiB): devices never send more.",
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
        tls = self.tls
        if (tls.cert_file is None) != (tls.key_file is None):
            raise ValueError("tls.cert_file and tls.key_file go together")
        if tls.cert_file is not None and tls.ca_file is None:
            raise ValueError("tls.cert_file needs tls.ca_file (the CA of the broker's certificate)")
        return self


def subscription_topics(fleet: str = "+") -> list[str]:
    """The topic filters the ingest subscribes to (all QoS 1).

    The first three are the record streams (see :data:`_STREAM_KINDS`).

    Args:
        fleet: A fleet name, or ``"+"`` for every fleet.

    Returns:
        The MQTT topic filters.
    """
    base = device_prefix(fleet, ANY)
    return [
        f"{base}/telemetry/#",
        f"{base}/data/#",
        f"{base}/result/#",
        f"{base}/status",
        f"{base}/cmd-resp/#",
        f"{base}/state/reported",
    ]


@dataclass(frozen=True, slots=True)
class IngestProgress:
    """Whether the ingest is keeping up, for a supervisor (see :meth:`Ingest.progress`).

    Attributes:
        pending: Messages received and not acknowledged yet.
        stalled_s: Seconds since the last acknowledgement while messages are pending
            (counted from when the first of them arrived, if that was later); ``0.0``
            when nothing is pending.
        waiting_for_database: The worker is retrying a batch because the database is
            unavailable (a restart of the ingest would not help).
        worker_alive: The worker thread runs.
    """

    pending: int
    stalled_s: float
    waiting_for_database: bool
    worker_alive: bool


@dataclass(frozen=True, slots=True)
class _Incoming:
    topic: str
    payload: bytes
    mid: int
    qos: int
    retain: bool = False


@dataclass(frozen=True, slots=True)
class _Plan:
    """What one message turns into before it is written.

    A dead letter has a ``reason``; a record has ``record`` (a row of ``records`` without
    ``received_at``); a status message has ``online``; a reported state has ``state`` (a
    row of ``device_states`` without ``reported_at``). A message with none of them (an
    empty retained status or reported state, which clears it) needs nothing written.
    """

    item: _Incoming
    fleet: str = ""
    device: str = ""
    record: dict[str, Any] | None = None
    online: bool | None = None
    state: dict[str, Any] | None = None
    reason: str = ""
    detail: str = ""
    agent_version: str | None = None
    envelope_version: int | None = None

    @property
    def writes(self) -> bool:
        """Whether the message has something to write besides a dead letter."""
        return self.record is not None or self.online is not None or self.state is not None


@dataclass(slots=True)
class _Written:
    """The counts of one committed transaction."""

    stored: int = 0
    duplicates: int = 0
    status_updates: int = 0
    state_updates: int = 0
    state_unchanged: int = 0
    dead: Counter[str] = field(default_factory=Counter)
    # reason -> (topic, detail) of its first dead letter in the transaction, for the log
    first_dead: dict[str, tuple[str, str]] = field(default_factory=dict)

    def dead_letter(self, rows: list[dict[str, Any]], row: dict[str, Any]) -> None:
        rows.append(row)
        self.dead[row["reason"]] += 1
        self.first_dead.setdefault(row["reason"], (row["topic"], row["detail"]))


@dataclass(slots=True)
class _Seen:
    """What a batch says of one device: its topic fleet, presence, and whether it was live.

    ``live`` is false when everything came from the broker's retained store (a reported
    state sent again because the ingest subscribed): the device's row is created if it is
    new, but its ``last_seen`` is not moved, since the device said nothing just now.
    """

    fleet: str
    online: bool | None = None
    live: bool = True
    agent_version: str | None = None
    envelope_version: int | None = None

    def merge(self, plan: _Plan, *, live: bool) -> None:
        self.fleet = plan.fleet
        if plan.online is not None:
            self.online = plan.online
        if plan.agent_version is not None:
            self.agent_version = plan.agent_version
        if plan.envelope_version is not None:
            self.envelope_version = plan.envelope_version
        self.live = self.live or live


class _RejectedError(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _parse_topic(topic: str) -> tuple[str, str, list[str]]:
    """Split ``edgefl/{fleet}/{device}/...`` and check it is a topic the ingest reads."""
    parts = topic.split("/")
    if len(parts) < 4 or parts[0] != ROOT:
        raise _RejectedError("bad_topic", f"topic {topic!r} is not edgefl/{{fleet}}/{{device}}/...")
    fleet, device, rest = parts[1], parts[2], parts[3:]
    if not is_id(fleet) or not is_id(device):
        raise _RejectedError(
            "bad_topic", f"fleet/device segments of {topic!r} must be {ID_PATTERN}"
        )
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
        metrics: Prometheus hooks (:class:`edgefl.server.metrics.IngestMetrics`), called
            once per committed transaction; ``None``: not counted (``metrics.enabled``).
    """

    def __init__(self, config: IngestConfig, *, metrics: IngestMetrics | None = None) -> None:
        self.config = config
        self._metrics = metrics
        self._queue: queue.Queue[_Incoming | None] = queue.Queue(
            maxsize=max(2 * config.receive_maximum, config.batch_max)
        )
        self._counters: Counter[str] = Counter()
        self._counters_lock = threading.Lock()
        # Progress, under _counters_lock: messages received and not yet acknowledged, when
        # the first of them arrived (monotonic) and when the last ack went out.
        self._pending = 0
        self._busy_since = time.monotonic()
        self._last_ack = time.monotonic()
        self._waiting_for_db = threading.Event()
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
            self.config.broker.host,
            self.config.broker.port,
            keepalive=self.config.keepalive_s,
            clean_start=False,
            properties=properties,
        )
        self._client.loop_start()
        logger.info(
            "ingest %s connecting to %s:%d, storing into %s",
            self.config.client_id,
            self.config.broker.host,
            self.config.broker.port,
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
        with self._counters_lock:
            self._pending = 0  # what was not acknowledged is redelivered next session
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
        ``status_updates``, ``state_updates`` (reported states stored: new or changed),
        ``state_unchanged`` (reported states equal to the one already stored: a redelivery,
        or the retained copy sent again on a re-subscription), ``acked``, ``db_retries``,
        ``batch_splits`` (transactions
        split to isolate a message the database refused), ``dead_letter_failed``
        (messages that could not even be dead-lettered: acknowledged and logged),
        ``queued`` (current queue depth) and ``pending`` (received, not acknowledged).
        """
        with self._counters_lock:
            snapshot = dict(self._counters)
        result = {
            "received": 0,
            "stored": 0,
            "duplicates": 0,
            "dead_lettered": 0,
            "status_updates": 0,
            "state_updates": 0,
            "state_unchanged": 0,
            "acked": 0,
            "db_retries": 0,
            "batch_splits": 0,
            "dead_letter_failed": 0,
        }
        result.update({f"dead_lettered.{reason}": 0 for reason in DEAD_LETTER_REASONS})
        result.update(snapshot)
        result["queued"] = self._queue.qsize()
        result["pending"] = self._pending
        return dict(sorted(result.items()))

    def progress(self) -> IngestProgress:
        """Whether acknowledgements still flow while messages wait (for a watchdog)."""
        now = time.monotonic()
        worker = self._worker
        with self._counters_lock:
            pending = self._pending
            since = max(self._last_ack, self._busy_since)
        return IngestProgress(
            pending=pending,
            stalled_s=max(0.0, now - since) if pending else 0.0,
            waiting_for_database=self._waiting_for_db.is_set(),
            worker_alive=worker is not None and worker.is_alive(),
        )

    # -- MQTT callbacks (paho network thread) -----------------------------------------

    def _make_client(self) -> mqtt.Client:
        client = build_client(
            self.config.client_id,
            tls=self.config.tls,
            username=self.config.username,
            password=self.config.password,
            manual_ack=True,
            what="ingest",
            tls_hint="point tls.ca_file/cert_file/key_file at the fleet CA and the "
            "edgefl-ingest service certificate",
        )
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
        topics = [
            (t, _subscribe_options(t.split("/")[3])) for t in subscription_topics(self.config.fleet)
        ]
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
        if not self._subscribed.is_set():
            logger.info("ingest subscribed to %d topic filters", len(reason_codes))
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
        try:
            topic = msg.topic
        except UnicodeDecodeError:  # MQTT forbids it; a broker that lets it through
            topic = bytes(msg._topic).decode("utf-8", "backslashreplace")
        item = _Incoming(topic, bytes(msg.payload), msg.mid, msg.qos, bool(msg.retain))
        with self._counters_lock:
            self._counters["received"] += 1
            if self._pending == 0:
                self._busy_since = time.monotonic()
            self._pending += 1
        # Blocking here when the worker is behind is the back-pressure we want: paho stops
        # reading the socket and the broker holds the rest. But never for good: stop()
        # must be able to end this thread even when the worker hangs.
        while self._accepting.is_set():
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue
        with self._counters_lock:  # not acknowledged: the broker redelivers it
            self._pending = max(0, self._pending - 1)

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
            except Exception:  # a bug: the worker survives; the watchdog sees the stall
                logger.exception("ingest failed on a batch of %d messages", len(batch))

    def _handle(self, batch: Sequence[_Incoming]) -> None:
        """Store one batch, then acknowledge every message of it.

        Nothing a message holds can keep the batch from being acknowledged: each message
        is planned on its own, and :meth:`_store` isolates one the database refuses. Only
        a database outage during :meth:`stop` leaves the batch unacknowledged (the broker
        redelivers it).
        """
        plans = [self._plan(item) for item in batch]
        if self._store(plans):
            self._ack(batch)

    def _store(self, plans: Sequence[_Plan]) -> bool:
        """Write ``plans``; split them while the database refuses the transaction.

        Returns:
            Whether every plan was written (stored, counted or dead-lettered); false only
            when the database was unavailable while stopping.
        """
        failure = self._write_retrying(plans)
        if failure is None:
            return True
        if isinstance(failure, _Stopping):
            return False
        if len(plans) > 1:
            # The data is the cause (an outage is retried, not split): halve the batch
            # until the message the database refuses is alone. log2(batch) extra
            # transactions per such message, and every other message still goes through.
            with self._counters_lock:
                self._counters["batch_splits"] += 1
            middle = len(plans) // 2
            return self._store(plans[:middle]) and self._store(plans[middle:])
        (plan,) = plans
        logger.error("the database refused the message on %s: %s", plan.item.topic, failure)
        dead = _Plan(plan.item, reason="store_failed", detail=_describe(failure))
        again = self._write_retrying([dead])
        if again is None:
            return True
        if isinstance(again, _Stopping):
            return False
        # Not even the dead letter fits: acknowledge anyway (holding the message would
        # stall the session), loudly.
        logger.error(
            "cannot dead-letter the message on %s (%d bytes); acknowledging it: %s",
            plan.item.topic,
            len(plan.item.payload),
            again,
        )
        with self._counters_lock:
            self._counters["dead_letter_failed"] += 1
        return True

    def _write_retrying(self, plans: Sequence[_Plan]) -> Exception | _Stopping | None:
        """:meth:`_write`, retried with backoff while the database is unavailable.

        Returns:
            ``None`` once written; the exception when the database refused the data;
            :class:`_Stopping` when the ingest stops while the database is unavailable.
        """
        delay = _DB_RETRY_MIN_S
        try:
            while True:
                try:
                    self._write(plans)
                    return None
                except _StoppedError:
                    return _Stopping()
                except Exception as exc:  # classified below: outage or bad data
                    if not _is_transient(exc):
                        return exc
                    if self._stop_requested.is_set():
                        logger.error(
                            "database unavailable while stopping; %d messages left "
                            "unacknowledged for redelivery",
                            len(plans),
                        )
                        return _Stopping()
                    self._waiting_for_db.set()
                    with self._counters_lock:
                        self._counters["db_retries"] += 1
                    logger.warning("database unavailable (%s); retrying in %.1f s", exc, delay)
                    self._stop_requested.wait(delay)
                    delay = min(delay * 2, _DB_RETRY_MAX_S)
        finally:
            self._waiting_for_db.clear()

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
            self._pending = max(0, self._pending - len(batch))
            self._last_ack = time.monotonic()

    def _plan(self, item: _Incoming) -> _Plan:
        """Validate one message (no database access); never raises."""
        try:
            fleet, device, rest = _parse_topic(item.topic)
            if len(item.payload) > self.config.max_payload_bytes:
                raise _RejectedError(
                    "oversized",
                    f"payload of {len(item.payload)} bytes exceeds the limit of "
                    f"{self.config.max_payload_bytes}",
                )
            if item.retain and rest[0] in _STREAM_KINDS:
                raise _RejectedError(
                    "retained",
                    f"retained message on the {rest[0]} topic {item.topic!r}: records are "
                    "never retained (it would come back on every new subscription)",
                )
            if rest == ["status"]:
                online = _parse_status(item.payload)
                if online is None:
                    return _Plan(item)  # an empty retained message clears the status
                return _Plan(item, fleet, device, online=online)
            if rest == ["state", "reported"]:
                if not item.payload.strip():
                    return _Plan(item)  # the device cleared its retained report
                state = _reported_row(item.payload, fleet, device)
                agent = state.pop("agent_version")
                return _Plan(item, fleet, device, state=state, agent_version=agent)
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
            return _Plan(item, reason=rejected.reason, detail=rejected.detail)
        except Exception as exc:  # a bug must cost this message, not the batch
            logger.exception("ingest failed on a message on %s", item.topic)
            return _Plan(item, reason="ingest_error", detail=_describe(exc))
        record = {
            "device_id": envelope.device_id,
            "incarnation": envelope.incarnation,
            "seq": envelope.seq,
            "kind": envelope.kind,
            "topic": item.topic,
            "ts_ms": envelope.ts_ms,
            "content_type": envelope.content_type,
            "body": envelope.body,
            **_answered_by(envelope),
        }
        return _Plan(item, fleet, device, record=record, envelope_version=envelope.version)

    def _count_metrics(
        self,
        plans: Sequence[_Plan],
        written: _Written,
        rows: list[dict[str, Any]],
        inserted: set[tuple[str, str, int]],
    ) -> None:
        """Tell the Prometheus hooks what one committed transaction did."""
        metrics = self._metrics
        if metrics is None:
            return
        outcomes = {
            "stored": written.stored,
            "duplicate": written.duplicates,
            "status": written.status_updates,
            "state_stored": written.state_updates,
            "state_unchanged": written.state_unchanged,
            "dead_lettered": sum(written.dead.values()),
        }
        try:
            metrics.record_batch(
                [plan.item.topic for plan in plans], outcomes, written.dead, _lags(rows, inserted)
            )
        except Exception:  # counting must never cost a stored batch its ack
            logger.exception("counting the ingest metrics failed")

    def _write(self, plans: Sequence[_Plan]) -> None:
        """One transaction: fleets, devices, reported states, records, dead letters.

        It checks fleets, upserts devices and reported states, and inserts records and
        dead letters.

        Duplicates are told apart from conflicting duplicates by comparing the envelope
        (kind, ts_ms, content_type, body) with the stored one. The counters change only
        after the commit.
        """
        engine = self._engine
        if engine is None:
            raise _StoppedError  # a worker abandoned by stop() writes nothing more
        now = datetime.now(UTC)
        dialect = engine.dialect.name
        written = _Written()
        dead: list[dict[str, Any]] = []
        devices: dict[str, _Seen] = {}
        # Every record plan by key, in arrival order; the first of each is inserted.
        by_key: dict[tuple[str, str, int], list[_Plan]] = {}
        # Every reported state by device, in arrival order; the last one is kept.
        states: dict[str, list[dict[str, Any]]] = {}
        factory = session_factory(engine)
        with factory() as session, session.begin():
            fleets = _expected_fleets(session, {p.device for p in plans if p.writes})
            for plan in plans:
                if plan.reason:
                    written.dead_letter(dead, _dead_row(plan.item, plan.reason, plan.detail, now))
                    continue
                if not plan.writes:
                    continue
                # A device without enrollment is pinned to the fleet it was first seen in.
                expected = fleets.setdefault(plan.device, plan.fleet)
                if plan.fleet != expected:
                    detail = (
                        f"device {plan.device!r} belongs to fleet {expected!r}, but published "
                        f"under fleet {plan.fleet!r}"
                    )
                    written.dead_letter(dead, _dead_row(plan.item, "fleet_mismatch", detail, now))
                    continue
                if plan.state is not None:
                    # A retained copy from the broker's store is not the device speaking.
                    _seen(devices, plan, live=not plan.item.retain)
                    states.setdefault(plan.device, []).append(plan.state)
                    continue
                _seen(devices, plan, live=True)
                if plan.record is None:
                    written.status_updates += 1
                    continue
                by_key.setdefault(_record_key(plan.record), []).append(plan)
            for statement, device_rows in _upsert_devices(dialect, devices, now):
                session.execute(statement, device_rows)
            if states:
                written.state_updates, written.state_unchanged = _write_states(
                    session, dialect, states, now
                )
            rows = [_record_of(plans[0]) | {"received_at": now} for plans in by_key.values()]
            inserted = _insert_records(session, dialect, rows) if rows else set()
            written.stored = len(inserted)
            again = [key for key in by_key if key not in inserted]
            stored = _stored_records(session, again) if again else {}
            for key, same_key in by_key.items():
                # What a later message with this key is held against: the stored record
                # when there was one, else the one this batch inserted.
                reference = stored.get(key) or _record_of(same_key[0])
                for index, plan in enumerate(same_key):
                    if index == 0 and key in inserted:
                        continue
                    if _same_record(reference, _record_of(plan)):
                        written.duplicates += 1
                    else:
                        where = "already stored" if key in stored else "earlier in the batch"
                        written.dead_letter(dead, _conflict_row(plan, where, now))
            if dead:
                session.execute(_DEAD_LETTERS.insert(), dead)
        with self._counters_lock:
            self._counters["stored"] += written.stored
            self._counters["duplicates"] += written.duplicates
            self._counters["status_updates"] += written.status_updates
            self._counters["state_updates"] += written.state_updates
            self._counters["state_unchanged"] += written.state_unchanged
            for reason, count in written.dead.items():
                self._counters["dead_lettered"] += count
                self._counters[f"dead_lettered.{reason}"] += count
        if self._metrics is not None:
            self._count_metrics(plans, written, rows, inserted)
        for reason, count in sorted(written.dead.items()):
            topic, detail = written.first_dead[reason]
            logger.warning(
                "dead-lettered %d message(s) as %s; the first on %s: %s",
                count,
                reason,
                topic,
                detail,
            )


def _lags(rows: list[dict[str, Any]], inserted: set[tuple[str, str, int]]) -> list[float]:
    """Seconds from each inserted record's device timestamp to now (its commit)."""
    now_ms = time.time() * 1000.0
    return [
        (now_ms - row["ts_ms"]) / 1000.0
        for row in rows
        if (row["device_id"], row["incarnation"], row["seq"]) in inserted
    ]


class _Stopping:
    """Returned instead of an error: the ingest stops while the database is down."""


class _StoppedError(Exception):
    """The ingest was stopped (its engine is gone) while a worker still ran."""


def _subscribe_options(head: str) -> SubscribeOptions:
    """QoS 1; on record streams, retained messages are seen as retained, and only once.

    ``retainAsPublished`` keeps the publisher's retain flag, so a retained record that
    arrives while the ingest is connected is told apart (and dead-lettered) too; the
    retain handling sends the retained ones only for a new subscription, not again on
    every reconnect of the persistent session. Status and reported-state topics are
    retained by design and keep the defaults.
    """
    if head in _STREAM_KINDS:
        return SubscribeOptions(
            qos=1,
            retainAsPublished=True,
            retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB,
        )
    return SubscribeOptions(qos=1)


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


def _reported_row(payload: bytes, fleet: str, device: str) -> dict[str, Any]:
    """The ``device_states`` row (without ``reported_at``) of a ``state/reported`` payload.

    Raises:
        _RejectedError: ``oversized``, ``malformed_state`` or ``device_mismatch``.
    """
    if len(payload) > MAX_STATE_BYTES:
        raise _RejectedError(
            "oversized",
            f"reported state of {len(payload)} bytes exceeds the limit of {MAX_STATE_BYTES}",
        )
    try:
        reported = parse_reported(payload)
    except BadInputError as exc:
        raise _RejectedError("malformed_state", exc.message) from exc
    if reported.device != device:
        raise _RejectedError(
            "device_mismatch",
            f"reported state names device {reported.device!r}, not the topic's device {device!r}",
        )
    return {
        "device_id": device,
        "fleet": fleet,
        **_state_columns(reported),
        # parse_reported read it as UTF-8 JSON, which never holds a raw NUL.
        "document": payload.decode("utf-8"),
        # Not a device_states column: devices.agent_version (taken off by _plan).
        "agent_version": reported.agent,
    }


def _state_columns(reported: ReportedState) -> dict[str, Any]:
    """The columns of a reported state, refusing what the registry cannot hold."""
    failure = reported.last_failure
    return {
        "model": _state_name(reported.model, "model"),
        "version": _state_int(reported.version, "version"),
        "variant": _state_name(reported.variant, "variant"),
        "sha256": _state_name(reported.sha256, "sha256"),
        "state": reported.state,
        "since": _state_time(reported.since, "since"),
        "rollbacks": _state_int(reported.rollbacks, "rollbacks"),
        "last_failure_version": _state_int(
            failure.version if failure else None, "last_failure.version"
        ),
        "last_failure_reason": _state_name(
            failure.reason if failure else None, "last_failure.reason"
        ),
        "last_failure_detail": _state_text(
            failure.detail if failure else None, "last_failure.detail"
        ),
        "last_failure_at": _state_time(failure.at if failure else None, "last_failure.at"),
    }


def _state_text(value: str | None, name: str) -> str | None:
    if value is not None and "\x00" in value:
        raise _RejectedError("malformed_state", f"reported state's {name} holds a NUL character")
    return value


def _state_name(value: str | None, name: str) -> str | None:
    if value is not None and len(value) > _STATE_NAME_MAX:
        raise _RejectedError(
            "malformed_state",
            f"reported state's {name} has {len(value)} characters, more than {_STATE_NAME_MAX}",
        )
    return _state_text(value, name)


def _state_int(value: int | None, name: str) -> int | None:
    if value is not None and not -_INT64_MAX - 1 <= value <= _INT64_MAX:
        raise _RejectedError(
            "malformed_state", f"reported state's {name} is outside the stored range of 64 bits"
        )
    return value


def _state_time(value: int | None, name: str) -> datetime | None:
    if value is None:
        return None
    try:
        return datetime.fromtimestamp(value, UTC)
    except (OverflowError, OSError, ValueError):
        raise _RejectedError(
            "malformed_state",
            f"reported state's {name} ({str(value)[:30]}) is no time between the years 1 "
            "and 9999 (Unix seconds)",
        ) from None


def _write_states(
    session: Session, dialect: str, states: dict[str, list[dict[str, Any]]], now: datetime
) -> tuple[int, int]:
    """Upsert each device's newest reported state; returns (updates, unchanged).

    A document equal to the one before it (the stored one, or the previous one in the
    batch) changes nothing and is counted as unchanged; a device whose documents end where
    they started is not written at all, so a redelivery leaves ``reported_at`` as it was.
    """
    stored = _stored_documents(session, sorted(states))
    updates = unchanged = 0
    rows: list[dict[str, Any]] = []
    for device, documents in states.items():
        before = current = stored.get(device)
        for document in documents:
            if document["document"] == current:
                unchanged += 1
            else:
                updates += 1
                current = document["document"]
        if current != before:
            rows.append(documents[-1] | {"reported_at": now})
    if rows:
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        statement = insert(_DEVICE_STATES)
        columns = [name for name in rows[0] if name != "device_id"]
        upsert = statement.on_conflict_do_update(
            index_elements=["device_id"],
            set_={name: statement.excluded[name] for name in columns},
        )
        session.execute(upsert, rows)
    return updates, unchanged


def _stored_documents(session: Session, device_ids: list[str]) -> dict[str, str]:
    """The stored reported-state document of each of ``device_ids`` that has one."""
    found: dict[str, str] = {}
    for start in range(0, len(device_ids), _KEYS_PER_LOOKUP):
        chunk = device_ids[start : start + _KEYS_PER_LOOKUP]
        rows = session.execute(
            select(_DEVICE_STATES.c.device_id, _DEVICE_STATES.c.document).where(
                _DEVICE_STATES.c.device_id.in_(chunk)
            )
        )
        found.update({str(device): str(document) for device, document in rows})
    return found


def _dead_row(item: _Incoming, reason: str, detail: str, now: datetime) -> dict[str, Any]:
    return {
        "topic": _storable(item.topic),
        "payload": item.payload[:DEAD_LETTER_PAYLOAD_CAP],
        "payload_size": len(item.payload),
        "reason": reason,
        "detail": _storable(detail)[:_DETAIL_MAX],
        "received_at": now,
    }


def _conflict_row(plan: _Plan, where: str, now: datetime) -> dict[str, Any]:
    assert plan.record is not None
    device, incarnation, seq = _record_key(plan.record)
    detail = (
        f"key (device {device!r}, incarnation {incarnation!r}, seq {seq}) is {where} with "
        "a different envelope: not a redelivery (a device reusing seqs, or a forged replay)"
    )
    return _dead_row(plan.item, "conflicting_duplicate", detail, now)


def _storable(text: str) -> str:
    """``text`` with anything UTF-8 cannot encode (lone surrogates) escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:_DETAIL_MAX]


def _is_transient(exc: Exception) -> bool:
    """Whether an error means "the database is unavailable, try again" (not "bad data").

    Connection loss, a locked or unreachable database, I/O and disk-full errors are
    ``OperationalError`` in both SQLite and PostgreSQL drivers; what a row holds raises
    ``IntegrityError``, ``DataError`` or (before the driver) ``StatementError``.
    """
    if not isinstance(exc, DBAPIError):
        return False
    return bool(exc.connection_invalidated) or isinstance(exc, OperationalError)


def _is_json_content(content_type: str) -> bool:
    return content_type.split(";", 1)[0].strip().lower() == JSON_CONTENT_TYPE


def _answered_by(envelope: Envelope) -> dict[str, Any]:
    """The ``records.model*`` columns: the model a ``result`` record says computed it.

    A result's JSON body names ``model``, ``version`` and ``variant`` (the device's
    inference loop writes them). Anything else, or a body that does not hold them in
    the registry's types, leaves the columns NULL: the record itself is stored either way,
    since its body is the device's data, not the fleet contract.
    """
    columns: dict[str, Any] = {"model": None, "model_version": None, "model_variant": None}
    if envelope.kind != "result" or not _is_json_content(envelope.content_type):
        return columns
    try:
        body = json.loads(envelope.body)
    except (ValueError, RecursionError):
        return columns
    if not isinstance(body, dict):
        return columns
    model, version, variant = body.get("model"), body.get("version"), body.get("variant")
    if not is_id(model) or type(version) is not int or not 0 <= version <= _INT64_MAX:
        return columns
    columns["model"] = model
    columns["model_version"] = version
    if isinstance(variant, str) and 0 < len(variant) <= _STATE_NAME_MAX:
        columns["model_variant"] = variant
    return columns


def _record_of(plan: _Plan) -> dict[str, Any]:
    assert plan.record is not None
    return plan.record


def _record_key(record: dict[str, Any]) -> tuple[str, str, int]:
    return (record["device_id"], record["incarnation"], record["seq"])


def _same_record(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two records with one key carry the same envelope (a true redelivery).

    JSON bodies are compared as JSON values: the JSON encoding of an envelope stores its
    body compact, the protobuf encoding as it was written.
    """
    if any(a[k] != b[k] for k in ("kind", "ts_ms", "content_type")):
        return False
    if a["body"] == b["body"]:
        return True
    if not _is_json_content(a["content_type"]):
        return False
    try:
        return bool(json.loads(a["body"]) == json.loads(b["body"]))
    except (ValueError, RecursionError):  # not JSON after all: the bytes differ
        return False


def _expected_fleets(session: Session, device_ids: set[str]) -> dict[str, str]:
    """The fleet each device must publish under: enrolled, else the one first seen."""
    if not device_ids:
        return {}
    ids = sorted(device_ids)
    fleets: dict[str, str] = {}
    for table in (_DEVICES, _ENROLLMENTS):  # enrollments last: they win
        rows = session.execute(
            select(table.c.device_id, table.c.fleet).where(table.c.device_id.in_(ids))
        )
        fleets.update({str(device): str(fleet) for device, fleet in rows})
    return fleets


def _seen(devices: dict[str, _Seen], plan: _Plan, *, live: bool) -> None:
    """Note what ``plan`` says of its device in the batch's ``devices``."""
    seen = devices.get(plan.device)
    if seen is None:
        devices[plan.device] = _Seen(
            plan.fleet, plan.online, live, plan.agent_version, plan.envelope_version
        )
    else:
        seen.merge(plan, live=live)


def _upsert_devices(
    dialect: str, devices: dict[str, _Seen], now: datetime
) -> list[tuple[Any, list[dict[str, Any]]]]:
    """The device upserts of a batch: at most three statements, each run once for many rows.

    Devices seen only through records (or live reported states) get ``last_seen``; those
    with a status message in the batch also get ``online`` and ``status_changed_at``;
    those known from a retained reported state alone keep their ``last_seen``. A new
    device is inserted with both timestamps ``now`` (``online`` false until its status
    says otherwise).
    """
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    # (with a status, live) -> rows
    groups: dict[tuple[bool, bool], list[dict[str, Any]]] = {}
    for device_id, seen in devices.items():
        groups.setdefault((seen.online is not None, seen.live), []).append(
            {
                "device_id": device_id,
                "fleet": seen.fleet,
                "first_seen": now,
                "last_seen": now,
                "online": bool(seen.online),
                "status_changed_at": now if seen.online is not None else None,
                "agent_version": seen.agent_version,
                "envelope_version": seen.envelope_version,
            }
        )
    planned: list[tuple[Any, list[dict[str, Any]]]] = []
    for (with_status, live), rows in sorted(groups.items()):
        statement = insert(_DEVICES)
        update: dict[str, Any] = {
            "fleet": statement.excluded.fleet,
            # What the batch did not say (None) keeps the stored version.
            "agent_version": func.coalesce(
                statement.excluded.agent_version, _DEVICES.c.agent_version
            ),
            "envelope_version": func.coalesce(
                statement.excluded.envelope_version, _DEVICES.c.envelope_version
            ),
        }
        if live:
            update["last_seen"] = statement.excluded.last_seen
        if with_status:
            update["online"] = statement.excluded.online
            update["status_changed_at"] = statement.excluded.status_changed_at
        upsert = statement.on_conflict_do_update(index_elements=["device_id"], set_=update)
        planned.append((upsert, rows))
    return planned


def _insert_records(
    session: Session, dialect: str, rows: list[dict[str, Any]]
) -> set[tuple[str, str, int]]:
    """Insert records, skipping keys already stored; returns the keys that were new."""
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = insert(_RECORDS).on_conflict_do_nothing(
        index_elements=["device_id", "incarnation", "seq"]
    )
    columns = (_RECORDS.c.device_id, _RECORDS.c.incarnation, _RECORDS.c.seq)
    result = session.execute(statement.returning(*columns), rows)
    return {(str(d), str(i), int(q)) for d, i, q in result.all()}


def _stored_records(
    session: Session, keys: list[tuple[str, str, int]]
) -> dict[tuple[str, str, int], dict[str, Any]]:
    """The stored envelopes (the fields :func:`_same_record` compares) of ``keys``."""
    key_columns = (_RECORDS.c.device_id, _RECORDS.c.incarnation, _RECORDS.c.seq)
    found: dict[tuple[str, str, int], dict[str, Any]] = {}
    for start in range(0, len(keys), _KEYS_PER_LOOKUP):
        chunk = keys[start : start + _KEYS_PER_LOOKUP]
        rows = session.execute(
            select(
                *key_columns,
                _RECORDS.c.kind,
                _RECORDS.c.ts_ms,
                _RECORDS.c.content_type,
                _RECORDS.c.body,
            ).where(tuple_(*key_columns).in_(chunk))
        )
        for row in rows:
            found[(str(row.device_id), str(row.incarnation), int(row.seq))] = {
                "kind": row.kind,
                "ts_ms": int(row.ts_ms),
                "content_type": row.content_type,
                "body": bytes(row.body),
            }
    return found
