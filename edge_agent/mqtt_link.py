"""The device's MQTT link (paho-mqtt 2.2) and the single thread that drains the outbox.

:class:`MqttLink` owns the paho client: callback API v2, MQTT 5 with a fallback to 3.1.1,
a persistent session, a retained ``online`` status on every connect and a retained
``offline`` last will, TLS (mutual TLS with a per-device certificate) and
username/password, and a reconnect backoff with jitter. It boots without a broker
(``connect_async`` + ``loop_start``).

:class:`OutboxSender` is the only thread that publishes outbox records. It publishes with
QoS 1 and acks a record in the outbox only after a successful PUBACK. paho calls
``on_publish`` while holding its own ``_out_message_mutex``, so that callback takes no lock
of ours: it only puts ``(mid, status)`` on a :class:`queue.SimpleQueue` (and, once a
batch of them is waiting, a wake-up on a second one), which the sender thread drains.
Records in flight when the connection drops stay in paho's memory and paho re-sends them
after the reconnect, all at once (paho 2.2 ignores its own ``max_inflight`` there), so
the sender never hands paho more than the broker's Receive Maximum; records still in the
outbox after a process restart are replayed from SQLite. Either way the receiver may see a
sequence number twice, so ingest must be idempotent on ``(device_id, incarnation, seq)``.

Throughput: the sender thread is the only one that leases records from the outbox and
deletes them, but it does not have to be on the GIL for every record to go out. It hands
paho a window of leased records (``max_inflight``, all of them on the wire: the bound is
the sender's, paho's own limit is off, see :meth:`MqttLink._build_client`), and it stages
the next ones on :attr:`MqttLink.feed`, a deque that paho's own thread drains in
``on_publish``: each PUBACK publishes one staged record in its place (``deque.popleft``
needs no lock and paho's mutex is re-entrant), so what paho holds never grows and the
link stays full while the sender waits for the GIL.
The sender wakes when half the feed is gone rather than per PUBACK (every wake-up takes
the GIL from paho's thread), leases records a window at a time (from memory when they
were just put, see :class:`Outbox`) and deletes acknowledged ones a batch per transaction.
The feed is used only while streaming: after a reconnect the sender takes it back and
replays the backlog itself at the flush rate.

Inbound messages: topics registered with :meth:`MqttLink.subscribe` are subscribed on
every (re)connect. ``on_message`` only puts an :class:`InboundMessage` on
:attr:`MqttLink.messages`; a consumer thread does the work and then calls
:meth:`MqttLink.ack`. The client runs with paho's ``manual_ack``, so the broker keeps a
QoS 1 message un-acknowledged (and redelivers it after a reconnect) until the consumer
has durably handled it.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, cast

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import Field, SecretStr, model_validator

from edgefl.backoff import backoff_delay  # moved to the shared layer; kept importable here
from edgefl.config import RenameMap, StrictModel, TlsFiles
from edgefl.edge_agent.outbox import Outbox, Record
from edgefl.mqtt_client import build_client

__all__ = [
    "InboundMessage",
    "MqttLink",
    "MqttLinkConfig",
    "OutboxSender",
    "TokenBucket",
    "backoff_delay",
    "status_topic",
]

_log = logging.getLogger(__name__)

# CONNACK codes that mean "this broker does not speak that protocol version": 132 is
# MQTT 5's Unsupported Protocol Version, 1 is what a 3.1.1 broker answers a v5 CONNECT.
_PROTOCOL_REFUSALS = frozenset({1, 132})
# A mid paho never hands out (it uses 1..65535): wakes the sender without an ack.
_WAKE = 0
# The mid reported for a fed record that paho did not queue (see MqttLink.feed).
_NOT_QUEUED = -1
# The status of a publish result on MqttLink.publish_results; a negative status -seq means
# "paho's thread published fed record seq under this mid".
_ACK_OK = 1
_ACK_FAILED = 0


_PAHO_LOG = logging.getLogger(f"{__name__}.paho")


def status_topic(fleet: str, device_id: str) -> str:
    """The retained presence topic of a device: ``edgefl/{fleet}/{device}/status``."""
    return f"edgefl/{fleet}/{device_id}/status"


class TokenBucket:
    """A token bucket: ``rate`` tokens per second, holding at most ``burst``.

    Args:
        rate: Tokens added per second.
        burst: Capacity; also the number of tokens right after :meth:`reset`.
        clock: Monotonic clock in seconds; tests inject their own.
    """

    def __init__(
        self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = burst
        self._stamp = clock()

    def reset(self) -> None:
        """Fill the bucket to its burst size."""
        self._tokens = self.burst
        self._stamp = self._clock()

    def take(self, wanted: int) -> int:
        """Take up to ``wanted`` whole tokens; return how many were taken."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        got = min(wanted, int(self._tokens))
        self._tokens -= got
        return max(got, 0)

    def give_back(self, count: int) -> None:
        """Return tokens taken but not used."""
        self._tokens = min(self.burst, self._tokens + count)

    def wait_s(self) -> float:
        """Seconds until one whole token is available (``0.0`` if one is)."""
        return max(0.0, (1.0 - self._tokens) / self.rate)


@dataclass(frozen=True, slots=True)
class InboundMessage:
    """A message received on a subscribed topic, handed from paho to a consumer thread.

    Attributes:
        topic: The topic it was published on.
        payload: The payload bytes.
        qos: The QoS it was delivered with.
        mid: paho's packet id, needed to acknowledge a QoS 1/2 message.
        client_epoch: :attr:`MqttLink.client_epoch` when it arrived.
        generation: :attr:`MqttLink.generation` (connection) when it arrived.
    """

    topic: str
    payload: bytes
    qos: int
    mid: int
    client_epoch: int
    generation: int


class MqttLinkConfig(StrictModel):
    """Broker connection settings of a device (the agent's ``mqtt:`` section)."""

    renamed_keys: ClassVar[RenameMap] = {
        "ca_file": "tls.ca_file",
        "cert_file": "tls.cert_file",
        "key_file": "tls.key_file",
        "keepalive": "keepalive_s",
    }

    host: str = Field(default="127.0.0.1", description="Broker host name or address.")
    port: int = Field(default=1883, ge=1, le=65535, description="Broker TCP port.")
    client_id: str = Field(
        min_length=1,
        description="MQTT client id; the device id is usual. The shipped broker ignores it "
        "and uses the certificate's CN (use_username_as_clientid), which is the device id.",
    )
    keepalive_s: int = Field(
        default=30,
        ge=5,
        description="MQTT keepalive: the link pings after this long without traffic, and "
        "the broker drops it (publishing the offline last will) after 1.5 times this "
        "long without any packet.",
    )
    protocol: Literal["5", "3.1.1", "auto"] = Field(
        default="auto",
        description="MQTT version; auto tries 5 and falls back to 3.1.1 if the broker refuses.",
    )
    session_expiry_s: int = Field(
        default=3600,
        ge=0,
        description="MQTT 5 session expiry; the broker keeps the session this long offline.",
    )
    username: str | None = Field(default=None, description="User name, if the broker wants one.")
    password: SecretStr | None = Field(default=None, description="Password for username.")
    tls: TlsFiles = Field(
        default_factory=lambda: TlsFiles(),
        description="ca_file: the fleet CA, setting it enables TLS; cert_file/key_file: the "
        "device certificate and key (mutual TLS).",
    )
    reconnect_min_s: float = Field(default=1.0, gt=0, description="First reconnect delay.")
    reconnect_max_s: float = Field(default=60.0, gt=0, description="Cap on reconnect delays.")
    flush_rate_per_s: float | None = Field(
        default=500.0,
        gt=0,
        description="Records per second replayed after a (re)connect; None is unlimited.",
    )
    max_inflight: int = Field(
        default=20,
        ge=1,
        description="Outbox records published with QoS 1 and awaiting PUBACK; the sender "
        "also stays below the broker's Receive Maximum.",
    )

    @model_validator(mode="after")
    def _check_pairs(self) -> MqttLinkConfig:
        tls = self.tls
        if (tls.cert_file is None) != (tls.key_file is None):
            raise ValueError("tls.cert_file and tls.key_file go together")
        if tls.cert_file is not None and tls.ca_file is None:
            raise ValueError("a client certificate needs tls.ca_file (TLS)")
        if self.password is not None and self.username is None:
            raise ValueError("password needs username")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be >= reconnect_min_s")
        return self


class MqttLink:
    """One paho client with presence, a persistent session and a jittered reconnect.

    Call :meth:`start` once; it returns at once even if the broker is down. Results of
    QoS 1 publishes arrive on :attr:`publish_results` as ``(mid, status)``: ``1`` for a
    successful PUBACK, ``0`` for a failed one, and ``-seq`` when paho's thread published fed
    record ``seq`` under ``mid`` (mid ``-1``: paho did not queue it); messages on
    topics registered with :meth:`subscribe` arrive on :attr:`messages` and must be
    acknowledged with :meth:`ack` once handled.

    Args:
        config: Connection settings.
        status_topic: Retained presence topic (see :func:`status_topic`).
    """

    def __init__(self, config: MqttLinkConfig, *, status_topic: str) -> None:
        self.config = config
        self.status_topic = status_topic
        self.publish_results: queue.SimpleQueue[tuple[int, int]] = queue.SimpleQueue()
        # on_publish puts None here when publish_results reaches signal_after entries (or
        # the feed drops to feed_low records), so a consumer can sleep until a batch of
        # results is there rather than wake per one.
        self.result_signal: queue.SimpleQueue[None] = queue.SimpleQueue()
        self.signal_after = 1
        self.feed: deque[Record] | None = None
        """Records paho's thread publishes itself, one per PUBACK (see :class:`OutboxSender`).

        Only on the connection :attr:`feed_generation` names, and ``result_signal`` gets a
        wake-up when the feed is down to :attr:`feed_low` records."""
        self.feed_generation = -1
        self.feed_low = 0
        self.messages: queue.SimpleQueue[InboundMessage] = queue.SimpleQueue()
        # Set before start(); read (never changed) by the paho thread in _on_connect.
        self._subscriptions: tuple[tuple[str, int], ...] = ()
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._closing = threading.Event()
        # Guards swapping the client (protocol fallback) against a concurrent publish. It is
        # never taken in a paho callback.
        self._client_lock = threading.Lock()
        self._attempt = 0
        # Bumped on every successful CONNACK / new client; plain ints are read racily on
        # purpose, a stale value only delays the sender by one poll.
        self.generation = 0
        self.client_epoch = 0
        self.receive_maximum = 65535
        """The broker's Receive Maximum (MQTT 5 CONNACK; 65535 when it sends none)."""
        v311 = config.protocol == "3.1.1"
        # "auto" starts with MQTT 5; _on_connect falls back if the broker refuses it.
        self._client = self._build_client(
            MQTTProtocolVersion.MQTTv311 if v311 else MQTTProtocolVersion.MQTTv5
        )

    @property
    def protocol(self) -> MQTTProtocolVersion:
        """The MQTT version in use (after any fallback)."""
        return self._client.protocol

    @property
    def connected(self) -> bool:
        """Whether the broker accepted the connection and it has not dropped since."""
        return self._connected.is_set()

    @property
    def subscribed(self) -> bool:
        """Whether the broker acknowledged every :meth:`subscribe` topic on this connection."""
        return self._subscribed.is_set()

    def wait_subscribed(self, timeout: float) -> bool:
        """Block until :attr:`subscribed` or ``timeout`` seconds passed; return it."""
        return self._subscribed.wait(timeout)

    def wait_connected(self, timeout: float) -> bool:
        """Block until connected or ``timeout`` seconds passed; return :attr:`connected`."""
        return self._connected.wait(timeout)

    def start(self) -> None:
        """Start the network thread; it keeps trying to connect until :meth:`close`."""
        with self._client_lock:
            self._connect_async(self._client)

    def subscribe(self, topic: str, qos: int = 1) -> None:
        """Register a subscription, made on every (re)connect. Call before :meth:`start`.

        Args:
            topic: Topic filter (wildcards allowed).
            qos: Maximum QoS to receive with.
        """
        self._subscriptions = (*self._subscriptions, (topic, qos))

    def ack(self, message: InboundMessage) -> bool:
        """Acknowledge a received message (PUBACK) once it has been handled durably.

        A message that arrived on an earlier connection is not acknowledged: the broker
        redelivers it on the current one (packet ids belong to a connection), and the
        consumer must treat the redelivery as a duplicate.

        Args:
            message: A message taken from :attr:`messages`.

        Returns:
            Whether an acknowledgement was handed to paho.
        """
        if message.qos == 0:
            return True
        with self._client_lock:
            if message.client_epoch != self.client_epoch or message.generation != self.generation:
                return False
            rc = self._client.ack(message.mid, message.qos)
        return rc == MQTTErrorCode.MQTT_ERR_SUCCESS

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> tuple[int, MQTTErrorCode]:
        """Hand a message to paho; return its mid and paho's return code.

        ``MQTT_ERR_NO_CONN`` with QoS 1 still means queued: paho sends it after reconnect.
        """
        with self._client_lock:
            info = self._client.publish(topic, payload, qos=qos)
        return info.mid, info.rc

    def close(self, timeout: float = 5.0) -> None:
        """Publish a retained ``offline`` (a clean exit sends no will), disconnect, stop."""
        self._closing.set()
        with self._client_lock:
            client = self._client
        if self._connected.is_set():
            info = client.publish(self.status_topic, b"offline", qos=1, retain=True)
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError) as exc:
                _log.warning("could not publish offline status: %s", exc)
        client.disconnect()
        client.loop_stop()
        self._connected.clear()

    # -- client set-up -------------------------------------------------------------------

    def _build_client(self, protocol: MQTTProtocolVersion) -> mqtt.Client:
        cfg = self.config
        # manual_ack: an inbound QoS 1 message is acknowledged by ack() after the consumer
        # handled it, not by paho when on_message returns (which only queues it).
        client = build_client(
            cfg.client_id,
            protocol="5" if protocol == MQTTProtocolVersion.MQTTv5 else "3.1.1",
            tls=cfg.tls,
            username=cfg.username,
            password=cfg.password,
            manual_ack=True,
            logger=_PAHO_LOG,
            what="MQTT link",
        )
        # paho's own in-flight limit is off (0): the outbox sender keeps the bound itself
        # (OutboxSender.window), counting what it handed paho. paho's limit would cost a
        # scan of every message it holds on every PUBACK, on the thread that bounds the
        # link's rate, and it does not hold after a reconnect anyway (paho 2.2 re-sends all
        # it holds at once).
        client.max_inflight_messages_set(0)
        self._set_reconnect_delay(client, 0)
        # The will must be registered before connecting; the broker publishes it when the
        # connection dies without a DISCONNECT (crash, power cut, network loss).
        client.will_set(self.status_topic, b"offline", qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        return client

    def _connect_async(self, client: mqtt.Client) -> None:
        cfg = self.config
        if client.protocol == MQTTProtocolVersion.MQTTv5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = cfg.session_expiry_s
            # clean_start=False also on the first connect of a process: a restarted agent
            # resumes its session and gets the commands queued while it was down.
            client.connect_async(
                cfg.host,
                cfg.port,
                cfg.keepalive_s,
                clean_start=False,
                properties=props,
            )
        else:
            client.connect_async(cfg.host, cfg.port, cfg.keepalive_s)
        client.loop_start()

    def _set_reconnect_delay(self, client: mqtt.Client, attempt: int) -> None:
        delay = backoff_delay(attempt, self.config.reconnect_min_s, self.config.reconnect_max_s)
        # paho has no jitter of its own. Setting min == max to a fresh jittered delay before
        # each wait gives jitter with paho's own reconnect loop. paho annotates the delays
        # as int but does float arithmetic with them, so sub-second delays work.
        client.reconnect_delay_set(cast(int, delay), cast(int, delay))

    def _fall_back_to_311(self) -> None:
        # Runs on its own thread: loop_stop() joins paho's network thread, which is the
        # thread that noticed the refusal.
        with self._client_lock:
            old = self._client
            old.loop_stop()
            if self._closing.is_set():
                return
            _log.warning(
                "broker %s:%d refused MQTT 5; falling back to MQTT 3.1.1",
                self.config.host,
                self.config.port,
            )
            self._client = self._build_client(MQTTProtocolVersion.MQTTv311)
            self.client_epoch += 1
            self._connect_async(self._client)

    def reload_tls(self) -> None:
        """Reconnect with the TLS files read again (a renewed certificate was installed).

        paho reads the certificate once, when the client is built, so a new client is
        built and connected like after a protocol fallback (same protocol, same session:
        the broker keys it by the certificate's CN). What paho held in flight is handed
        over by the outbox sender as after any new client (:attr:`client_epoch`).
        """
        with self._client_lock:
            old = self._client
            old.disconnect()
            old.loop_stop()
            if self._closing.is_set():
                return
            self._connected.clear()
            self._client = self._build_client(old.protocol)
            self.client_epoch += 1
            self._connect_async(self._client)
        _log.info("reconnecting with the renewed certificate %s", self.config.tls.cert_file)

    # -- paho callbacks (network thread; no locks of ours) --------------------------------

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            # A refused CONNACK is not a connection: stay disconnected and let paho retry.
            self._connected.clear()
            if (
                self.config.protocol == "auto"
                and client.protocol == MQTTProtocolVersion.MQTTv5
                and reason_code.value in _PROTOCOL_REFUSALS
            ):
                client.disconnect()
                threading.Thread(
                    target=self._fall_back_to_311, name="mqtt-fallback", daemon=True
                ).start()
                return
            _log.warning("broker refused the connection: %s", reason_code)
            self._attempt += 1
            self._set_reconnect_delay(client, self._attempt)
            return
        self._attempt = 0
        self._set_reconnect_delay(client, 0)
        receive_maximum = getattr(properties, "ReceiveMaximum", None)
        self.receive_maximum = int(receive_maximum) if receive_maximum else 65535
        _log.info(
            "connected to %s:%d (session present: %s)",
            self.config.host,
            self.config.port,
            flags.session_present,
        )
        client.publish(self.status_topic, b"online", qos=1, retain=True)
        # Re-subscribing is cheap and covers a broker that lost the session; paho's
        # subscribe() only queues a packet, so it is safe in this callback. One SUBSCRIBE
        # for all topics, so one SUBACK tells that all of them are in place.
        self._subscribed.clear()
        if self._subscriptions:
            client.subscribe(list(self._subscriptions))
        else:
            self._subscribed.set()
        self.generation += 1
        self._connected.set()

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        self._attempt += 1
        self._set_reconnect_delay(client, self._attempt)

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        self._subscribed.clear()
        if was_connected and not self._closing.is_set():
            _log.warning("disconnected from broker: %s", reason_code)
        self._set_reconnect_delay(client, self._attempt)

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties,
    ) -> None:
        # Runs under paho's _out_message_mutex: a lock of ours here could deadlock with a
        # thread that holds it while calling publish(). Hand over and return.
        results = self.publish_results
        feed = self.feed
        if feed and self.feed_generation == self.generation:
            # A PUBACK freed a place: fill it from the feed right here, so the link never
            # waits for the sender thread to get the GIL. deque.popleft is atomic (no lock),
            # and paho's mutex is re-entrant, so publish() may be called in this callback.
            # The fed record is reported before this PUBACK, so a reader of the queue never
            # counts fewer records handed to paho than paho holds. Not on a connection the
            # sender has not seen yet: after a reconnect the flush is the sender's, rate-
            # limited, and it takes the feed back first.
            try:
                record = feed.popleft()
            except IndexError:
                pass
            else:
                self._publish_fed(client, record)
                if len(feed) == self.feed_low:
                    self.result_signal.put(None)
        results.put((mid, _ACK_FAILED if reason_code.is_failure else _ACK_OK))
        if results.qsize() == self.signal_after:
            self.result_signal.put(None)

    def _publish_fed(self, client: mqtt.Client, record: Record) -> None:
        # In paho's callback: nothing may escape into paho's loop.
        mid = _NOT_QUEUED
        try:
            info = client.publish(record.topic, record.payload, qos=1)
            if info.rc in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                mid = info.mid
        except Exception:
            _log.exception("paho refused fed record seq=%d", record.seq)
        self.publish_results.put((mid, -record.seq))

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties,
    ) -> None:
        refused = [rc for rc in reason_codes if rc.is_failure]
        if refused:
            _log.error("broker refused subscription(s) %s: %s", self._subscriptions, refused)
            return
        self._subscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        # Runs under paho's callback mutex: hand over and return; the consumer acks.
        self.messages.put(
            InboundMessage(
                topic=msg.topic,
                payload=bytes(msg.payload),
                qos=msg.qos,
                mid=msg.mid,
                client_epoch=self.client_epoch,
                generation=self.generation,
            )
        )


# The feed holds about this much sending at the PUBACK rate measured over the last
# _RATE_INTERVAL_S, between one window and _STAGE_MAX_WINDOWS windows (see OutboxSender).
_STAGE_SECONDS = 0.05
_STAGE_MAX_WINDOWS = 16
_RATE_INTERVAL_S = 0.2


class OutboxSender:
    """The single thread that publishes outbox records with QoS 1 and acks them.

    The thread keeps at most ``window`` records handed to paho and not yet acknowledged,
    and fewer than the broker's Receive Maximum (one place is left for the link's status
    message); paho puts each on the wire at once. More leased records are staged on the
    link's feed, which paho's thread publishes one per PUBACK, so the link stays full while
    this thread is elsewhere (never during the rate-limited flush after a reconnect). The
    feed holds about :data:`_STAGE_SECONDS` of sending at the PUBACK rate measured, at
    least ``window`` and at most :data:`_STAGE_MAX_WINDOWS` windows, so that a fast link
    wakes this thread (which takes the GIL from paho's) rarely while a slow one holds few
    records. A new record of higher priority may wait behind the records already leased:
    the window, the feed, and up to a window more leased for the next refill.

    A record is deleted from the outbox only after a successful PUBACK; deletions are
    batched (one transaction per ``ack_batch`` PUBACKs, or as soon as the link goes quiet,
    or after ``ack_delay_s``): an acknowledged record stays leased until then, so it is
    never sent again by this process, and one that a crash leaves undeleted is sent again
    after the restart (a duplicate the ingest drops). A failed PUBACK, such as 0x87 "Not
    authorized" for a device the broker's ACL does not name yet (admitted moments before
    the server reloaded it), deletes nothing: the record is sent again after
    ``retry_after_s``. A record over the largest payload the fleet carries never reaches
    this thread: the outbox refuses it at put, and sets aside one an older version stored
    (a PUBACK 0x95 for it would drop the connection on every attempt).

    Args:
        outbox: Where records come from; acked there on a successful PUBACK.
        link: The MQTT link to publish on.
        window: Records handed to paho and not yet acknowledged; the link's
            ``max_inflight`` by default.
        poll_s: Longest idle wait before looking at the outbox again (see :meth:`wake`).
        retry_after_s: Wait before re-sending a record whose PUBACK reported failure.
        ack_batch: PUBACKs collected before their records are deleted in one transaction.
        ack_delay_s: Longest time a PUBACK waits for its deletion while the link is busy.
    """

    def __init__(
        self,
        outbox: Outbox,
        link: MqttLink,
        *,
        window: int | None = None,
        poll_s: float = 0.05,
        retry_after_s: float = 1.0,
        ack_batch: int = 200,
        ack_delay_s: float = 0.05,
    ) -> None:
        self.outbox = outbox
        self.link = link
        self.window = window if window is not None else link.config.max_inflight
        self.poll_s = poll_s
        self.retry_after_s = retry_after_s
        self.ack_batch = ack_batch
        self.ack_delay_s = ack_delay_s
        self.published = 0
        self.acked = 0
        self.failed = 0
        self._in_flight: dict[int, int] = {}  # mid -> seq
        self._cooling: dict[int, float] = {}  # seq -> monotonic time it may be re-sent
        self._pending: deque[Record] = deque()  # leased, not yet handed to paho
        # Leased records paho's own thread publishes, one per PUBACK (MqttLink.feed), so
        # that the window stays full while this thread waits for the GIL; refilled when
        # half of it is gone. Fed only while streaming (never during the rate-limited
        # flush after a reconnect), and taken back whenever the connection changes. Its
        # size follows the PUBACK rate (see _resize_stage).
        self._staged: deque[Record] = deque()
        self._stage_max = self.window
        self._rate_since = time.monotonic()
        self._rate_acks = 0  # PUBACKs counted at _rate_since
        self._done: list[int] = []  # PUBACKed, not yet deleted
        self._done_since = 0.0  # monotonic time of the oldest entry of _done
        # Under load (and without a feed, as during the rate-limited flush), refill once
        # half the window is free (one wake-up per refill), so the link never goes quiet
        # (which, with a broker that leaves Nagle on, would hold PUBACKs back until a
        # delayed TCP ACK).
        self._refill_min = max(1, self.window // 2)
        self._stop = threading.Event()
        self._drain_s = 0.0
        rate = link.config.flush_rate_per_s
        self._bucket = (
            TokenBucket(rate, burst=max(1.0, min(float(self.window), rate)))
            if rate is not None
            else None
        )
        self._thread = threading.Thread(target=self._run, name="outbox-sender", daemon=True)

    @property
    def in_flight(self) -> int:
        """Records published and waiting for their PUBACK."""
        return len(self._in_flight)

    @property
    def feed_capacity(self) -> int:
        """Leased records the feed may hold now: ``window`` when idle, more on a fast link."""
        return self._stage_max

    def start(self) -> None:
        """Start the sender thread."""
        self._thread.start()

    def wake(self) -> None:
        """Look at the outbox now instead of after up to ``poll_s`` (call after a put)."""
        self.link.publish_results.put((_WAKE, _ACK_OK))
        self.link.result_signal.put(None)

    def stop(self, drain_timeout_s: float = 5.0) -> None:
        """Stop publishing, wait up to ``drain_timeout_s`` for PUBACKs, join the thread.

        Records without a PUBACK stay in the outbox and are sent again on the next start.
        """
        self._drain_s = drain_timeout_s
        self._stop.set()
        self.wake()
        if self._thread.ident is not None:  # started
            self._thread.join()

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            self._unstage()
            self._flush_acks()
            if self._pending:
                # Leased but never handed to paho: give them back to the outbox.
                self.outbox.release_many(r.seq for r in self._pending)
                self._pending.clear()

    def _loop(self) -> None:
        seen_generation = -1
        seen_epoch = self.link.client_epoch
        flushing = False
        link = self.link
        staged = self._staged
        while not self._stop.is_set():
            self._drain_results(0.0)
            self._resize_stage()
            low = self._stage_max // 2
            if self._cooling:
                self._end_cooling()
            if link.client_epoch != seen_epoch:
                # A new paho client (protocol fallback) never knew the old mids.
                seen_epoch = link.client_epoch
                self._unstage()
                self._in_flight.clear()
                self._pending.clear()
                self._flush_acks()
                self.outbox.release_all()
            if not link.connected:
                self._unstage()
                self._flush_acks()
                self._await_results(1, self.poll_s)
                continue
            if link.generation != seen_generation:
                # (Re)connected: paho re-sends what it held; the backlog is replayed from
                # the outbox at a bounded rate so it does not swamp the broker or the link.
                seen_generation = link.generation
                self._unstage()
                flushing = self._bucket is not None
                if self._bucket is not None:
                    self._bucket.reset()
            # Fewer than the broker's Receive Maximum awaiting PUBACK (one place is the
            # status message's), also right after a reconnect, when paho re-sends all it
            # holds at once. The feed does not add to it: paho's thread publishes one fed
            # record per PUBACK.
            window = min(self.window, max(1, link.receive_maximum - 1))
            room = window - len(self._in_flight)
            need = min(self._refill_min, window)
            # Results until the feed is down to low: each staged record brings two
            # (published, then PUBACKed).
            feed_drained = 2 * max(window, len(staged) - low)
            if room < need and (flushing or len(staged) > low):
                # Busy: sleep until the feed is half gone (or, without one, a whole
                # refill's worth of room is free), instead of waking (and taking the GIL
                # from paho's thread) for every PUBACK.
                self._await_results(feed_drained if staged else need - room, self.poll_s)
                continue
            stage_room = 0 if flushing else max(0, self._stage_max - len(staged))
            wanted = room + stage_room
            if flushing and self._bucket is not None:
                wanted = self._bucket.take(room)
                if wanted == 0:
                    self._await_results(1, min(self.poll_s, self._bucket.wait_s()))
                    continue
            pending = self._pending
            if len(pending) < wanted:
                pending.extend(self.outbox.next_batch(max(window, wanted - len(pending))))
            if flushing and len(pending) < wanted:
                # The backlog is drained: new records go out at the link's pace.
                flushing = False
                if self._bucket is not None:
                    self._bucket.give_back(wanted - len(pending))
            if not pending:
                if not staged:
                    # Idle: this is when acknowledged records are deleted without delay.
                    self._flush_acks()
                    self._await_results(1, self.poll_s)
                else:
                    self._await_results(feed_drained, self.poll_s)
                continue
            # Straight to paho: what the window has room for, and while flushing only what
            # the bucket allowed (wanted is then at most room).
            for _ in range(min(room, wanted, len(pending))):
                record = pending.popleft()
                self._publish(record.seq, record.topic, record.payload)
            if not flushing and pending:
                for _ in range(min(self._stage_max - len(staged), len(pending))):
                    staged.append(pending.popleft())
                link.feed_low = low
                link.feed_generation = seen_generation
                link.feed = staged
        self._unstage()
        deadline = time.monotonic() + self._drain_s
        while self._in_flight and time.monotonic() < deadline:
            self._drain_results(min(self.poll_s, max(0.0, deadline - time.monotonic())))

    def _unstage(self) -> None:
        """Take the feed back from paho's thread; its records go back to the front of pending."""
        self.link.feed = None
        taken: list[Record] = []
        with contextlib.suppress(IndexError):
            while True:  # paho's thread may pop concurrently: each record goes one way
                taken.append(self._staged.popleft())
        self._pending.extendleft(reversed(taken))

    def _publish(self, seq: int, topic: str, payload: bytes) -> None:
        try:
            mid, rc = self.link.publish(topic, payload, qos=1)
        except ValueError as exc:
            # paho refuses the topic itself (wildcards, too long): retrying cannot help.
            _log.error("record seq=%d cannot be published on %r: %s", seq, topic, exc)
            self._cool(seq)
            return
        if rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            _log.warning("paho did not queue seq=%d: %s", seq, mqtt.error_string(rc))
            self._cool(seq)
            return
        self._in_flight[mid] = seq
        self.published += 1

    def _drain_results(self, block_s: float) -> None:
        results: list[tuple[int, int]] = []
        get = self.link.publish_results.get_nowait
        try:
            if block_s > 0:
                results.append(self.link.publish_results.get(timeout=block_s))
            while True:
                results.append(get())
        except queue.Empty:
            pass
        in_flight = self._in_flight
        done = self._done
        for mid, status in results:
            if status < 0:
                # A fed record paho's thread published (or could not queue).
                if mid == _NOT_QUEUED:
                    _log.warning("paho did not queue fed seq=%d", -status)
                    self._cool(-status)
                else:
                    in_flight[mid] = -status
                    self.published += 1
                continue
            seq = in_flight.pop(mid, None)
            if seq is None:
                continue  # the status message, a wake-up, or a mid of a replaced client
            if status == _ACK_OK:
                if not done:
                    self._done_since = time.monotonic()
                done.append(seq)
            else:
                self.failed += 1
                _log.warning("broker refused seq=%d (failed PUBACK); will retry", seq)
                self._cool(seq)
        if done and (
            len(done) >= self.ack_batch
            or not in_flight
            or time.monotonic() - self._done_since >= self.ack_delay_s
        ):
            self._flush_acks()

    def _resize_stage(self) -> None:
        """Size the feed to :data:`_STAGE_SECONDS` of sending at the recent PUBACK rate."""
        now = time.monotonic()
        elapsed = now - self._rate_since
        if elapsed < _RATE_INTERVAL_S:
            return
        acks = self.acked + len(self._done)
        rate = (acks - self._rate_acks) / elapsed
        self._rate_since, self._rate_acks = now, acks
        cap = _STAGE_MAX_WINDOWS * self.window
        self._stage_max = max(self.window, min(cap, int(rate * _STAGE_SECONDS)))

    def _await_results(self, count: int, timeout: float) -> None:
        """Sleep until ``count`` publish results are waiting (or a wake-up, or ``timeout``).

        Every wait of the loop comes here, so the signal queue never grows unread.
        """
        link = self.link
        link.signal_after = count
        if link.publish_results.qsize() < count:
            with contextlib.suppress(queue.Empty):
                link.result_signal.get(timeout=timeout)
        with contextlib.suppress(queue.Empty):
            while True:  # signals that are stale by now
                link.result_signal.get_nowait()
        self._drain_results(0.0)

    def _flush_acks(self) -> None:
        """Delete the records whose PUBACK arrived, in one transaction."""
        if self._done:
            done, self._done = self._done, []
            self.outbox.ack_many(done)
            self.acked += len(done)

    def _cool(self, seq: int) -> None:
        # Keep the lease for a while so a record the broker refuses is not re-sent in a
        # tight loop; _end_cooling releases it.
        self._cooling[seq] = time.monotonic() + self.retry_after_s

    def _end_cooling(self) -> None:
        now = time.monotonic()
        ready = [s for s, t in self._cooling.items() if t <= now]
        for seq in ready:
            del self._cooling[seq]
        if ready:
            self.outbox.release_many(ready)
