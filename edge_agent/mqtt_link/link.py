"""The device's MQTT link: one paho client with presence, a session and a jittered reconnect.

:class:`MqttLink` owns the paho client: callback API v2, MQTT 5 with a fallback to 3.1.1,
a persistent session, a retained ``online`` status on every connect and a retained
``offline`` last will, TLS (mutual TLS with a per-device certificate) and
username/password, and a reconnect backoff with jitter. It boots without a broker
(``connect_async`` + ``loop_start``).

Inbound messages: topics registered with :meth:`MqttLink.subscribe` are subscribed on
every (re)connect. ``on_message`` only puts an :class:`InboundMessage` on
:attr:`MqttLink.messages`; a consumer thread does the work and then calls
:meth:`MqttLink.ack`. The client runs with paho's ``manual_ack``, so the broker keeps a
QoS 1 message un-acknowledged (and redelivers it after a reconnect) until the consumer
has durably handled it.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, cast

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgefl.backoff import backoff_delay
from edgefl.edge_agent.mqtt_link.config import MqttLinkConfig
from edgefl.edge_agent.outbox import Record
from edgefl.mqtt_client import build_client

__all__ = ["InboundMessage", "MqttLink"]

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

# paho's own log lines (named as before the link became a package).
_PAHO_LOG = logging.getLogger("edgefl.edge_agent.mqtt_link.paho")


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
        status_topic: Retained presence topic (see :func:`edgefl.proto.topics.status_topic`).
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
        # The last retained payload published per topic, published again on every connect:
        # a broker killed with -9 restores its retained store from its last autosave, which
        # can be older than what this device last reported (``state/reported``).
        self._retained: dict[str, bytes] = {}
        self._retained_lock = threading.Lock()
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

    def publish(
        self, topic: str, payload: bytes, qos: int = 1, *, retain: bool = False
    ) -> tuple[int, MQTTErrorCode]:
        """Hand a message to paho; return its mid and paho's return code.

        ``MQTT_ERR_NO_CONN`` with QoS 1 still means queued: paho sends it after reconnect.
        ``retain`` keeps it on the broker as the topic's last value (``state/reported``);
        the link publishes that last value again after each reconnect, so a broker that came
        back with an older retained copy (restored from its persistence file) is corrected.
        """
        if retain:
            with self._retained_lock:
                self._retained[topic] = payload
        with self._client_lock:
            info = self._client.publish(topic, payload, qos=qos, retain=retain)
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
        with self._retained_lock:
            retained = list(self._retained.items())
        for topic, payload in retained:
            client.publish(topic, payload, qos=1, retain=True)
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
