"""MqttLink and OutboxSender against a real mosquitto started per test on a free port."""

from __future__ import annotations

import json
import logging
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgefl.edge_agent import mqtt_link
from edgefl.edge_agent.mqtt_link import MqttLink, MqttLinkConfig, OutboxSender, status_topic
from edgefl.edge_agent.outbox import Outbox, OutboxPolicy
from edgefl.process import ManagedProcess
from edgefl.server.fleet_ca import FleetCA
from edgefl.testing import Mosquitto, free_port, wait_for

pytestmark = pytest.mark.slow

SUB = ("sub", "sub-pw")
AGENT = ("agent", "agent-pw")
TIMEOUT = 30.0


@pytest.fixture
def prefix() -> str:
    """A topic prefix no other test (or the shared broker) uses."""
    return f"edgefl/test-{uuid.uuid4().hex[:12]}"


class Subscriber:
    """A plain paho client that records every message on ``topic`` (QoS 0 on purpose).

    QoS 0 to an online subscriber means mosquitto writes each message to the socket as it
    routes it, before its PUBACK to the publisher, so nothing the agent saw acknowledged
    can still be queued inside the broker when the broker is killed.
    """

    def __init__(
        self,
        broker: Mosquitto,
        topic: str,
        sink: list[mqtt.MQTTMessage] | None = None,
        user: tuple[str, str] | None = None,
    ) -> None:
        self.messages: list[mqtt.MQTTMessage] = sink if sink is not None else []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._topic = topic
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"sub-{uuid.uuid4().hex[:8]}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        if user is not None:
            self.client.username_pw_set(*user)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        if not self._subscribed.wait(TIMEOUT):
            raise TimeoutError(f"subscriber never subscribed to {topic}")

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if not reason_code.is_failure:
            client.subscribe(self._topic, qos=0)

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        if not any(rc.is_failure for rc in reason_codes):
            self._subscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append(msg)

    def seqs(self) -> list[int]:
        with self._lock:
            return [json.loads(m.payload)["seq"] for m in self.messages]

    def payloads(self) -> list[bytes]:
        with self._lock:
            return [bytes(m.payload) for m in self.messages]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def link_config(broker_port: int, **overrides: object) -> MqttLinkConfig:
    values: dict[str, object] = {
        "host": "127.0.0.1",
        "port": broker_port,
        "client_id": f"agent-{uuid.uuid4().hex[:8]}",
        "reconnect_min_s": 0.05,
        "reconnect_max_s": 0.5,
        "flush_rate_per_s": None,
    }
    values.update(overrides)
    return MqttLinkConfig.model_validate(values)


def fill(outbox: Outbox, topic: str, n: int) -> None:
    for _ in range(n):
        outbox.put(topic, lambda seq: json.dumps({"seq": seq}).encode())


class Agent:
    """Outbox + link + sender, as the agent daemon wires them."""

    def __init__(self, tmp_path: Path, prefix: str, config: MqttLinkConfig) -> None:
        self.outbox = Outbox(tmp_path / "outbox.db", "dev-1", OutboxPolicy())
        self.link = MqttLink(config, status_topic=f"{prefix}/status")
        self.sender = OutboxSender(self.outbox, self.link, retry_after_s=0.2)

    def start(self) -> None:
        self.link.start()
        self.sender.start()

    def stop(self) -> None:
        self.sender.stop(drain_timeout_s=2.0)
        self.link.close()
        self.outbox.close()


@pytest.fixture
def agents() -> Iterator[list[Agent]]:
    started: list[Agent] = []
    yield started
    for agent in started:
        agent.stop()


def test_delivers_every_record_and_empties_the_outbox(
    tmp_path: Path, broker: Mosquitto, prefix: str, agents: list[Agent]
) -> None:
    n = 500
    sub = Subscriber(broker, f"{prefix}/data")
    agent = Agent(tmp_path, prefix, link_config(broker.port, flush_rate_per_s=5000.0))
    agents.append(agent)
    fill(agent.outbox, f"{prefix}/data", n)
    agent.start()
    wait_for(lambda: agent.outbox.stats().depth == 0, TIMEOUT, "outbox to empty")
    wait_for(lambda: set(sub.seqs()) >= set(range(1, n + 1)), TIMEOUT, "every seq")
    assert agent.link.protocol == MQTTProtocolVersion.MQTTv5
    assert agent.sender.acked == n
    assert agent.sender.failed == 0
    sub.close()


def test_sender_keeps_in_flight_within_the_broker_receive_maximum(
    tmp_path: Path, prefix: str, agents: list[Agent]
) -> None:
    # paho re-sends everything it holds at once after a reconnect (and its own in-flight
    # limit is off), so the sender must never hold more than the broker accepts, whatever
    # its own window, and it leaves one place for the link's status message.
    broker = Mosquitto(tmp_path, extra_lines=["max_inflight_messages 7"])
    broker.start()
    try:
        sub = Subscriber(broker, f"{prefix}/data")
        agent = Agent(tmp_path, prefix, link_config(broker.port, max_inflight=20))
        agents.append(agent)
        assert agent.sender.window == 20
        # Count what paho holds unacknowledged, at the paho client itself: the sender
        # publishes part of the window and paho's own thread publishes fed records in
        # on_publish, and both must stay within the Receive Maximum.
        client = agent.link._client
        data_topic = f"{prefix}/data"
        lock = threading.Lock()
        held: dict[str, int] = {"now": 0}
        held_after_publish: list[int] = []
        mids: set[int] = set()
        acked_early: set[int] = set()
        real_publish = client.publish
        real_on_publish: Any = client.on_publish
        assert real_on_publish is not None

        def counting_publish(topic: str, payload: Any = None, qos: int = 0, **kw: Any) -> Any:
            info = real_publish(topic, payload, qos, **kw)
            if topic == data_topic:
                with lock:
                    if info.mid in acked_early:  # its PUBACK came before we got here
                        acked_early.discard(info.mid)
                    else:
                        mids.add(info.mid)
                        held["now"] += 1
                    held_after_publish.append(held["now"])
            return info

        def counting_on_publish(c: Any, u: Any, mid: int, rc: Any, props: Any) -> None:
            with lock:  # the test's lock, released before the callback runs
                if mid in mids:
                    mids.discard(mid)
                    held["now"] -= 1
                else:
                    acked_early.add(mid)
            real_on_publish(c, u, mid, rc, props)

        client.publish = counting_publish  # type: ignore[method-assign,assignment]
        client.on_publish = counting_on_publish
        fill(agent.outbox, data_topic, 300)
        agent.start()
        wait_for(lambda: agent.outbox.stats().depth == 0, TIMEOUT, "outbox to empty")
        wait_for(lambda: set(sub.seqs()) >= set(range(1, 301)), TIMEOUT, "every seq")
        assert agent.link.receive_maximum == 7
        assert len(held_after_publish) >= 300
        assert max(held_after_publish) <= 6
        sub.close()
    finally:
        broker.kill()


def test_feed_follows_the_puback_rate(
    tmp_path: Path, broker: Mosquitto, prefix: str, agents: list[Agent]
) -> None:
    # A fast stream lets the feed hold more than a window (fewer wake-ups of the sender);
    # once the link is idle it is back to one window, so a slow link holds few leased
    # records that a new one of higher priority would wait behind.
    topic = f"{prefix}/data"
    agent = Agent(tmp_path, prefix, link_config(broker.port, max_inflight=20))
    agents.append(agent)
    assert agent.sender.feed_capacity == agent.sender.window == 20
    agent.start()
    assert agent.link.wait_connected(TIMEOUT)
    seen = [agent.sender.feed_capacity]
    deadline = time.monotonic() + TIMEOUT
    while max(seen) <= agent.sender.window and time.monotonic() < deadline:
        agent.outbox.put_many([(topic, b"x")] * 500)
        agent.sender.wake()
        seen.append(agent.sender.feed_capacity)
        time.sleep(0.01)
    assert max(seen) > agent.sender.window
    wait_for(lambda: agent.outbox.stats().depth == 0, TIMEOUT, "outbox to empty")
    wait_for(lambda: agent.sender.feed_capacity == 20, TIMEOUT, "the feed to shrink")


def test_paho_packet_lines_are_logged_only_at_debug(
    tmp_path: Path,
    broker: Mosquitto,
    prefix: str,
    agents: list[Agent],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # paho's per-packet DEBUG lines cost the link's own thread two calls into logging each;
    # below DEBUG they do not reach the logger at all, and at DEBUG they come back.
    topic = f"{prefix}/data"
    paho_logger = f"{mqtt_link.__name__}.paho"
    caplog.set_level(logging.INFO, logger=paho_logger)
    reached: list[int] = []  # levels paho handed the logger (a spy: the real log runs)
    real_log = logging.getLogger(paho_logger).log

    def spy(level: int, msg: object, *args: object, **kwargs: Any) -> None:
        reached.append(level)
        real_log(level, msg, *args, **kwargs)

    monkeypatch.setattr(logging.getLogger(paho_logger), "log", spy)
    agent = Agent(tmp_path, prefix, link_config(broker.port))
    agents.append(agent)
    agent.start()
    fill(agent.outbox, topic, 5)
    agent.sender.wake()
    wait_for(lambda: agent.sender.acked == 5, TIMEOUT, "5 records acked")

    def packet_lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == paho_logger]

    assert logging.DEBUG not in reached
    assert not any("PUBLISH" in line for line in packet_lines())
    caplog.set_level(logging.DEBUG, logger=paho_logger)
    fill(agent.outbox, topic, 5)
    agent.sender.wake()
    wait_for(lambda: agent.sender.acked == 10, TIMEOUT, "5 more records acked")
    lines = packet_lines()
    assert sum("Sending PUBLISH" in line for line in lines) >= 5
    assert sum("Received PUBACK" in line for line in lines) >= 5


def test_failed_puback_keeps_the_record_for_retry(
    tmp_path: Path, prefix: str, agents: list[Agent]
) -> None:
    acl = tmp_path / "acl"
    acl.write_text(f"topic write {prefix}/ok/#\n", encoding="utf-8")
    broker = Mosquitto(tmp_path, extra_lines=[f"acl_file {acl}"])
    broker.start()
    try:
        agent = Agent(tmp_path, prefix, link_config(broker.port))
        agents.append(agent)
        agent.outbox.put(f"{prefix}/denied/x", b'{"seq": 1}')
        agent.outbox.put(f"{prefix}/ok/x", b'{"seq": 2}')
        agent.start()
        # MQTT 5: mosquitto answers the denied publish with PUBACK "Not authorized".
        wait_for(lambda: agent.sender.failed >= 1, TIMEOUT, "a failed PUBACK")
        wait_for(lambda: agent.sender.acked == 1, TIMEOUT, "the allowed record acked")
        assert agent.outbox.stats().depth == 1  # the denied record is kept
        # Allow it: the record is re-sent after retry_after_s and now acked.
        acl.write_text(f"topic write {prefix}/#\n", encoding="utf-8")
        assert broker.proc is not None
        broker.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: agent.outbox.stats().depth == 0, TIMEOUT, "the retried record acked")
        assert agent.sender.acked == 2
    finally:
        broker.kill()


def test_mqtt_311_delivers(
    tmp_path: Path, broker: Mosquitto, prefix: str, agents: list[Agent]
) -> None:
    sub = Subscriber(broker, f"{prefix}/data")
    agent = Agent(tmp_path, prefix, link_config(broker.port, protocol="3.1.1"))
    agents.append(agent)
    agent.start()
    fill(agent.outbox, f"{prefix}/data", 50)
    agent.sender.wake()
    wait_for(lambda: agent.outbox.stats().depth == 0, TIMEOUT, "outbox to empty")
    wait_for(lambda: set(sub.seqs()) >= set(range(1, 51)), TIMEOUT, "every seq")
    assert agent.link.protocol == MQTTProtocolVersion.MQTTv311
    sub.close()


def test_broker_killed_mid_stream_loses_nothing(
    tmp_path: Path, prefix: str, agents: list[Agent], record_property: object
) -> None:
    n = 500
    topic = f"{prefix}/data"
    broker = Mosquitto(tmp_path, users=dict([SUB, AGENT]))
    broker.start()
    try:
        received: list[mqtt.MQTTMessage] = []
        sub = Subscriber(broker, topic, received, user=SUB)
        # The flush rate stretches the stream over ~1.7 s so the kill lands mid-stream.
        config = link_config(broker.port, username=AGENT[0], password=AGENT[1])
        config = config.model_copy(update={"flush_rate_per_s": 300.0})
        agent = Agent(tmp_path, prefix, config)
        agents.append(agent)
        fill(agent.outbox, topic, n)
        agent.start()
        wait_for(lambda: len(sub.seqs()) >= 100, TIMEOUT, "the stream to start")
        broker.kill()
        sub.close()
        assert agent.outbox.stats().depth > 0, "the kill must land mid-stream"
        # Restart with only the subscriber allowed in, so it is subscribed again before
        # the agent can publish; a QoS 1 message routed to nobody would be gone.
        broker.set_users(dict([SUB]))
        broker.start()
        sub = Subscriber(broker, topic, received, user=SUB)
        broker.set_users(dict([SUB, AGENT]))
        wait_for(lambda: agent.outbox.stats().depth == 0, TIMEOUT, "outbox to empty")
        wait_for(lambda: set(sub.seqs()) >= set(range(1, n + 1)), TIMEOUT, "every seq")
        seqs = sub.seqs()
        duplicates = len(seqs) - len(set(seqs))
        record_property("duplicates", duplicates)  # type: ignore[operator]
        assert set(seqs) == set(range(1, n + 1))
        assert agent.outbox.stats().dropped == 0
        sub.close()
    finally:
        broker.kill()


def test_flush_after_each_connect_is_rate_limited(
    tmp_path: Path, prefix: str, agents: list[Agent]
) -> None:
    # A backlog goes out at flush_rate_per_s after a connect, feed or not: 300 records at
    # 200/s after a burst of one window (20) take at least (300 - 20) / 200 = 1.4 s.
    topic = f"{prefix}/data"
    broker = Mosquitto(tmp_path)
    broker.start()
    try:
        agent = Agent(tmp_path, prefix, link_config(broker.port, flush_rate_per_s=200.0))
        agents.append(agent)
        assert agent.sender.window == 20
        fill(agent.outbox, topic, 300)
        agent.start()
        assert agent.link.wait_connected(TIMEOUT)
        t0 = time.monotonic()
        wait_for(lambda: agent.outbox.stats().depth == 0, TIMEOUT, "the first backlog")
        assert time.monotonic() - t0 >= 1.0
        broker.kill()
        wait_for(lambda: not agent.link.connected, TIMEOUT, "the link to notice")
        fill(agent.outbox, topic, 300)
        broker.start()
        assert agent.link.wait_connected(TIMEOUT)
        t1 = time.monotonic()
        wait_for(lambda: agent.outbox.stats().depth == 0, TIMEOUT, "the second backlog")
        assert time.monotonic() - t1 >= 1.0
        assert agent.sender.acked == 600
    finally:
        broker.kill()


def test_boots_without_broker_and_delivers_once_it_starts(
    tmp_path: Path, prefix: str, agents: list[Agent]
) -> None:
    port = free_port()
    topic = f"{prefix}/data"
    agent = Agent(tmp_path, prefix, link_config(port, username=AGENT[0], password=AGENT[1]))
    agents.append(agent)
    agent.start()  # no broker on that port: must not raise or block
    fill(agent.outbox, topic, 20)
    agent.sender.wake()
    assert not agent.link.connected
    broker = Mosquitto(tmp_path, port=port, users=dict([SUB]))
    broker.start()
    try:
        sub = Subscriber(broker, topic, user=SUB)
        # A refused CONNACK must not count as connected.
        assert not agent.link.connected
        broker.set_users(dict([SUB, AGENT]))
        wait_for(lambda: agent.outbox.stats().depth == 0, TIMEOUT, "outbox to empty")
        wait_for(lambda: set(sub.seqs()) >= set(range(1, 21)), TIMEOUT, "every seq")
        sub.close()
    finally:
        broker.kill()


def retained_status(broker: Mosquitto, topic: str) -> list[tuple[bytes, bool]]:
    sub = Subscriber(broker, topic)
    try:
        wait_for(lambda: bool(sub.payloads()), TIMEOUT, f"a retained message on {topic}")
        with sub._lock:
            return [(bytes(m.payload), m.retain) for m in sub.messages]
    finally:
        sub.close()


def test_online_retained_on_connect_and_offline_on_clean_close(
    tmp_path: Path, broker: Mosquitto, prefix: str
) -> None:
    agent = Agent(tmp_path, prefix, link_config(broker.port))
    agent.start()
    try:
        assert agent.link.wait_connected(TIMEOUT)
        wait_for(
            lambda: retained_status(broker, f"{prefix}/status")[-1] == (b"online", True),
            TIMEOUT,
            "retained online",
        )
    finally:
        agent.stop()
    assert retained_status(broker, f"{prefix}/status")[-1] == (b"offline", True)


def test_last_retained_value_is_published_again_after_a_reconnect(
    tmp_path: Path, prefix: str
) -> None:
    # A broker that lost the device's newest retained report (killed with -9 before its
    # autosave; here: no persistence at all) gets it again when the device reconnects.
    topic = f"{prefix}/state/reported"
    with Mosquitto(tmp_path / "broker") as broker:
        agent = Agent(tmp_path, prefix, link_config(broker.port))
        agent.start()
        try:
            assert agent.link.wait_connected(TIMEOUT)
            agent.link.publish(topic, b"old", qos=1, retain=True)
            agent.link.publish(topic, b"newest", qos=1, retain=True)
            wait_for(
                lambda: retained_status(broker, topic)[-1] == (b"newest", True),
                TIMEOUT,
                "the retained report",
            )
            broker.kill()
            broker.restart()
            assert agent.link.wait_connected(TIMEOUT)
            wait_for(
                lambda: retained_status(broker, topic) == [(b"newest", True)],
                TIMEOUT,
                "the retained report published again after the reconnect",
            )
        finally:
            agent.stop()


_CHILD = """
import sys, threading
from edgefl.edge_agent.mqtt_link import MqttLink, MqttLinkConfig
cfg = MqttLinkConfig(host="127.0.0.1", port=int(sys.argv[1]), client_id=sys.argv[2])
link = MqttLink(cfg, status_topic=sys.argv[3])
link.start()
threading.Event().wait()
"""


def test_will_marks_device_offline_when_agent_is_killed(
    tmp_path: Path, broker: Mosquitto, prefix: str
) -> None:
    fleet, device = prefix.rsplit("/", 1)[1], "dev-kill"
    topic = status_topic(fleet, device)
    child = ManagedProcess(
        [sys.executable, "-c", _CHILD, str(broker.port), f"c-{uuid.uuid4().hex[:8]}", topic],
        tmp_path / "link-child.log",
        name="link child",
    )
    child.start()
    try:
        wait_for(
            lambda: retained_status(broker, topic)[-1] == (b"online", True),
            TIMEOUT,
            "the child agent to come online",
        )
        child.kill()  # SIGKILL, reaped: no DISCONNECT, so the broker sends the will
        wait_for(
            lambda: retained_status(broker, topic)[-1] == (b"offline", True),
            TIMEOUT,
            "the will to mark it offline",
        )
    finally:
        child.kill()


class _V5RefusingBroker:
    """Fault-injection seam: answers an MQTT 5 CONNECT with "Unsupported Protocol Version"
    and accepts a 3.1.1 one (then just reads), like a broker that only speaks 3.1.1."""

    def __init__(self, refusal: bytes) -> None:
        self.refusal = refusal
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.levels: list[int] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while len(data) < 10:
                    chunk = conn.recv(1024)
                    if not chunk:
                        break
                    data += chunk
                # fixed header, remaining length (1 byte: CONNECTs here are short),
                # protocol name "MQTT" (2 + 4 bytes), then the protocol level.
                level = data[8] if len(data) > 8 else 0
                self.levels.append(level)
                if level == 5:
                    conn.sendall(self.refusal)
                    continue
                conn.sendall(bytes([0x20, 0x02, 0x00, 0x00]))
                while conn.recv(1024):
                    pass

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize(
    "refusal",
    [
        pytest.param(bytes([0x20, 0x03, 0x00, 0x84, 0x00]), id="v5-unsupported-version"),
        pytest.param(bytes([0x20, 0x02, 0x00, 0x01]), id="v311-unacceptable-protocol"),
    ],
)
def test_auto_falls_back_to_311_when_broker_refuses_v5(prefix: str, refusal: bytes) -> None:
    fake = _V5RefusingBroker(refusal)
    link = MqttLink(link_config(fake.port, protocol="auto"), status_topic=f"{prefix}/status")
    link.start()
    try:
        wait_for(lambda: link.connected, TIMEOUT, "the 3.1.1 connection")
        assert link.protocol == MQTTProtocolVersion.MQTTv311
        assert fake.levels[:2] == [5, 4]
    finally:
        link.close(timeout=1.0)
        fake.close()


def _write_pki(folder: Path, device_id: str) -> dict[str, Path]:
    """The fleet CA, a broker certificate for 127.0.0.1 and a device client certificate."""
    ca = FleetCA.create(folder / "ca")
    server = ca.issue_server_cert(["localhost"], ["127.0.0.1"])
    device = ca.issue_device_cert(device_id)
    assert server.key_path is not None
    assert device.key_path is not None
    return {
        "ca": ca.cert_path,
        "server": server.cert_path,
        "server_key": server.key_path,
        "device": device.cert_path,
        "device_key": device.key_path,
    }


def test_mutual_tls_with_device_certificate(tmp_path: Path, prefix: str) -> None:
    pki = _write_pki(tmp_path, "dev-tls")
    broker = Mosquitto(
        tmp_path,
        extra_lines=[
            f"cafile {pki['ca']}",
            f"certfile {pki['server']}",
            f"keyfile {pki['server_key']}",
            "require_certificate true",
            "use_identity_as_username true",
        ],
    )
    broker.start()
    agent = Agent(
        tmp_path,
        prefix,
        link_config(
            broker.port,
            tls={"ca_file": pki["ca"], "cert_file": pki["device"], "key_file": pki["device_key"]},
        ),
    )
    try:
        agent.start()
        fill(agent.outbox, f"{prefix}/data", 5)
        agent.sender.wake()
        wait_for(lambda: agent.outbox.stats().depth == 0, TIMEOUT, "records acked over mTLS")
        assert agent.sender.acked == 5
    finally:
        agent.stop()
        broker.kill()
