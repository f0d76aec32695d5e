"""The shipped mosquitto config + ACL, run for real with certificates from the fleet CA.

Each test starts its own mosquitto (config rendered from ``deploy/mosquitto/``) on a free
loopback port and stops it by PID. Clients are paho-mqtt 2.2, MQTT 5, mutual TLS.
"""

from __future__ import annotations

import contextlib
import getpass
import queue
import shutil
import ssl
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from edgefl.netutil import free_port
from edgefl.process import ManagedProcess
from edgefl.server.broker_config import render_acl, render_mosquitto_config
from edgefl.server.fleet_ca import COMMANDS_IDENTITY, INGEST_IDENTITY, FleetCA, IssuedCert
from edgefl.testing import mosquitto_executable

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(mosquitto_executable() is None, reason="mosquitto is not installed"),
]

TIMEOUT = 10.0
NOT_AUTHORIZED = 0x87


def _mosquitto_exe() -> str:
    return shutil.which("mosquitto") or "/usr/sbin/mosquitto"


@dataclass
class Pki:
    ca: FleetCA
    server: IssuedCert
    service: IssuedCert
    commands: IssuedCert
    dev_a: IssuedCert
    dev_b: IssuedCert
    dev_c: IssuedCert
    foreign: IssuedCert


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = FleetCA.create(tmp_path / "ca")
    foreign_ca = FleetCA.create(tmp_path / "foreign-ca", common_name="some other CA")
    return Pki(
        ca=ca,
        server=ca.issue_server_cert(["localhost"], ["127.0.0.1"]),
        service=ca.issue_service_cert(),
        commands=ca.issue_service_cert(COMMANDS_IDENTITY),
        dev_a=ca.issue_device_cert("dev-a"),
        dev_b=ca.issue_device_cert("dev-b"),
        dev_c=ca.issue_device_cert("dev-c"),
        # Same CN as a real device, but signed by another CA.
        foreign=foreign_ca.issue_device_cert("dev-a"),
    )


class Broker:
    """mosquitto running the shipped config; started and stopped as a managed process."""

    def __init__(self, workdir: Path, pki: Pki) -> None:
        self.port = free_port()
        data = workdir / "broker-data"
        data.mkdir()
        assert pki.server.key_path is not None
        self.conf = workdir / "mosquitto.conf"
        acl = workdir / "acl"
        acl.write_text(render_acl(devices=_ADMITTED), encoding="utf-8")
        self.log = workdir / "mosquitto.log"
        self.conf.write_text(
            render_mosquitto_config(
                port=self.port,
                cafile=pki.ca.cert_path,
                certfile=pki.server.cert_path,
                keyfile=pki.server.key_path,
                crlfile=pki.ca.crl_path,
                data_dir=data,
                acl_file=acl,
                bind_address="127.0.0.1",
                run_as_user=getpass.getuser(),
            ),
            encoding="utf-8",
        )
        self.proc: ManagedProcess | None = None

    def start(self) -> None:
        self.proc = ManagedProcess([_mosquitto_exe(), "-c", str(self.conf)], self.log)
        self.proc.start()
        self.proc.wait_for_port("127.0.0.1", self.port, TIMEOUT, interval=0.02)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.stop(TIMEOUT)
        self.proc = None

    def wait_for_log(self, text: str) -> None:
        """Wait (bounded) until the broker's log contains ``text``."""
        deadline = time.monotonic() + TIMEOUT
        while text not in self.log.read_text(encoding="utf-8", errors="replace"):
            assert time.monotonic() < deadline, f"broker never logged {text!r}"
            time.sleep(0.05)

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def tls_broker(tmp_path: Path, pki: Pki) -> Iterator[Broker]:
    b = Broker(tmp_path, pki)
    b.start()
    try:
        yield b
    finally:
        b.stop()


class Client:
    """A paho MQTT 5 client over mutual TLS whose callbacks only feed queues."""

    def __init__(
        self, broker: Broker | _BrokerAt, ca: FleetCA, cert: IssuedCert | None, name: str
    ) -> None:
        self.broker = broker
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"{name}-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        self.client.tls_set(
            ca_certs=str(ca.cert_path),
            certfile=str(cert.cert_path) if cert else None,
            keyfile=str(cert.key_path) if cert and cert.key_path else None,
        )
        self.connects: queue.Queue[ReasonCode] = queue.Queue()
        self.disconnects: queue.Queue[ReasonCode] = queue.Queue()
        self.pubacks: queue.Queue[tuple[int, ReasonCode]] = queue.Queue()
        self.subacks: queue.Queue[list[ReasonCode]] = queue.Queue()
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.started = False

    def _on_connect(self, c: Any, u: Any, flags: Any, rc: ReasonCode, props: Any) -> None:
        self.connects.put(rc)

    def _on_disconnect(self, c: Any, u: Any, flags: Any, rc: ReasonCode, props: Any) -> None:
        self.disconnects.put(rc)

    def _on_publish(self, c: Any, u: Any, mid: int, rc: ReasonCode, props: Any) -> None:
        # Runs under paho's lock: hand over, never lock here.
        self.pubacks.put((mid, rc))

    def _on_subscribe(self, c: Any, u: Any, mid: int, rcs: list[ReasonCode], props: Any) -> None:
        self.subacks.put(rcs)

    def _on_message(self, c: Any, u: Any, msg: mqtt.MQTTMessage) -> None:
        self.messages.put((msg.topic, bytes(msg.payload)))

    def try_connect(self) -> str:
        """Return ``connected``, ``tls-error``, ``refused`` or ``timeout``."""
        try:
            self.client.connect("127.0.0.1", self.broker.port, keepalive=30)
        except (ssl.SSLError, ConnectionError, OSError):
            return "tls-error"
        self.client.loop_start()
        self.started = True
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            try:
                rc = self.connects.get(timeout=0.05)
                return "refused" if rc.is_failure else "connected"
            except queue.Empty:
                pass
            if not self.disconnects.empty():
                return "refused"
        return "timeout"

    def connect(self) -> Client:
        outcome = self.try_connect()
        assert outcome == "connected", outcome
        return self

    def subscribe(self, topic: str) -> None:
        self.client.subscribe(topic, qos=1)
        rcs = self.subacks.get(timeout=TIMEOUT)
        assert not any(rc.is_failure for rc in rcs), rcs

    def publish(self, topic: str, payload: bytes) -> ReasonCode:
        info = self.client.publish(topic, payload, qos=1)
        mid, rc = self.pubacks.get(timeout=TIMEOUT)
        assert mid == info.mid
        return rc

    def expect_message(self, topic: str) -> bytes:
        got_topic, payload = self.messages.get(timeout=TIMEOUT)
        assert got_topic == topic
        return payload

    def close(self) -> None:
        if self.started:
            self.client.disconnect()
            self.client.loop_stop()
            self.started = False


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    made: list[Client] = []
    yield made
    for c in made:
        c.close()


# The fleet the devices are admitted to: the ACL pins each device to its enrolled fleet.
_FLEET = f"t{uuid.uuid4().hex[:10]}"
_ADMITTED = {"dev-a": _FLEET, "dev-b": _FLEET, "dev-c": _FLEET}


def _fleet() -> str:
    return _FLEET


def _client(
    clients: list[Client], broker: Broker, pki: Pki, cert: IssuedCert | None, name: str
) -> Client:
    c = Client(broker, pki.ca, cert, name)
    clients.append(c)
    return c


def test_device_publishes_to_own_subtree_and_server_receives(
    tls_broker: Broker, pki: Pki, clients: list[Client]
) -> None:
    fleet = _fleet()
    server = _client(clients, tls_broker, pki, pki.service, INGEST_IDENTITY).connect()
    server.subscribe("edgefl/#")
    dev_a = _client(clients, tls_broker, pki, pki.dev_a, "dev-a").connect()
    topic = f"edgefl/{fleet}/dev-a/telemetry/temp"
    rc = dev_a.publish(topic, b"21.5")
    assert not rc.is_failure, rc
    assert server.expect_message(topic) == b"21.5"


def test_device_cannot_publish_as_another_device(
    tls_broker: Broker, pki: Pki, clients: list[Client]
) -> None:
    fleet = _fleet()
    server = _client(clients, tls_broker, pki, pki.service, INGEST_IDENTITY).connect()
    server.subscribe("edgefl/#")
    dev_a = _client(clients, tls_broker, pki, pki.dev_a, "dev-a").connect()

    spoofed = f"edgefl/{fleet}/dev-b/telemetry/temp"
    rc = dev_a.publish(spoofed, b"forged")
    assert rc.is_failure
    assert rc.value == NOT_AUTHORIZED, rc

    # mosquitto keeps one publisher's messages in order: once a later, allowed message
    # has reached the subscriber, the refused one can no longer be on its way.
    sentinel = f"edgefl/{fleet}/dev-a/telemetry/temp"
    assert not dev_a.publish(sentinel, b"after").is_failure
    received: list[tuple[str, bytes]] = []
    deadline = time.monotonic() + TIMEOUT
    while (sentinel, b"after") not in received:
        assert time.monotonic() < deadline, f"sentinel never arrived: {received}"
        with contextlib.suppress(queue.Empty):
            received.append(server.messages.get(timeout=0.1))
    assert all(topic != spoofed for topic, _ in received), received
    assert dev_a.disconnects.empty()  # refused, not kicked off


def test_device_only_reads_its_own_commands(
    tls_broker: Broker, pki: Pki, clients: list[Client]
) -> None:
    fleet = _fleet()
    dev_a = _client(clients, tls_broker, pki, pki.dev_a, "dev-a").connect()
    dev_b = _client(clients, tls_broker, pki, pki.dev_b, "dev-b").connect()
    dev_a.subscribe(f"edgefl/{fleet}/dev-a/cmd/#")
    # Subscribing to the whole fleet is allowed, but the ACL filters what is delivered.
    dev_b.subscribe(f"edgefl/{fleet}/+/cmd/#")
    server = _client(clients, tls_broker, pki, pki.commands, COMMANDS_IDENTITY).connect()
    cmd_a = f"edgefl/{fleet}/dev-a/cmd/reboot"
    cmd_b = f"edgefl/{fleet}/dev-b/cmd/reboot"
    assert not server.publish(cmd_a, b"for a").is_failure
    assert not server.publish(cmd_b, b"for b").is_failure
    assert dev_a.expect_message(cmd_a) == b"for a"
    # dev-b's own command arrives after dev-a's (same publisher, in order), so by then
    # dev-a's would have arrived too had the ACL let it through.
    assert dev_b.expect_message(cmd_b) == b"for b"
    assert dev_b.messages.empty()
    # A device cannot send commands to another device.
    assert dev_b.publish(cmd_a, b"forged").value == NOT_AUTHORIZED


def test_client_without_certificate_is_refused(
    tls_broker: Broker, pki: Pki, clients: list[Client]
) -> None:
    anon = _client(clients, tls_broker, pki, None, "anonymous")
    assert anon.try_connect() in {"tls-error", "refused"}
    tls_broker.wait_for_log("peer did not return a certificate")


def test_certificate_from_another_ca_is_refused(
    tls_broker: Broker, pki: Pki, clients: list[Client]
) -> None:
    impostor = _client(clients, tls_broker, pki, pki.foreign, "impostor")
    assert impostor.try_connect() in {"tls-error", "refused"}
    tls_broker.wait_for_log("certificate verify failed")


def test_revoked_device_is_refused_after_broker_restart(
    tls_broker: Broker, pki: Pki, clients: list[Client]
) -> None:
    first = _client(clients, tls_broker, pki, pki.dev_c, "dev-c").connect()
    first.close()
    pki.ca.revoke(pki.dev_c.serial)
    tls_broker.restart()  # mosquitto reads crlfile at start-up only
    revoked = _client(clients, tls_broker, pki, pki.dev_c, "dev-c")
    assert revoked.try_connect() in {"tls-error", "refused"}
    tls_broker.wait_for_log("certificate verify failed")
    # The CRL refuses only what it lists.
    _client(clients, tls_broker, pki, pki.dev_a, "dev-a").connect()


def test_operator_certificate_reads_everything_and_writes_nothing(
    tmp_path: Path, pki: Pki, clients: list[Client]
) -> None:
    """`edgefl server operator-cert NAME`, the mosquitto_sub line it prints (and
    deploy/README.md shows), the ACL reload on SIGHUP, and --revoke."""
    import json
    import shlex

    from typer.testing import CliRunner

    from edgefl.cli import app as cli_app
    from edgefl.server.serve import BrokerConfig, MosquittoBroker

    if shutil.which("mosquitto_sub") is None:
        pytest.skip("mosquitto_sub (mosquitto-clients) is not installed")
    assert pki.server.key_path is not None
    broker = MosquittoBroker(
        tmp_path / "mb",
        pki.ca,
        pki.server.cert_path,
        pki.server.key_path,
        BrokerConfig(port=0),
        devices=lambda: _ADMITTED,
    )
    broker.start()
    try:
        config = tmp_path / "server.yaml"
        config.write_text(
            json.dumps(
                {
                    "state_dir": str(tmp_path / "state"),
                    "ca_dir": str(pki.ca.directory),
                    "broker": {"port": broker.port},
                }
            )
        )
        out = tmp_path / "alice"
        cli = [
            "server",
            "operator-cert",
            "alice",
            "--config",
            str(config),
            "--out",
            str(out),
            "--json",
        ]
        result = CliRunner().invoke(cli_app, cli)
        assert result.exit_code == 0, result.output
        doc = json.loads(result.output)
        assert doc["cn"] == "edgefl-op-alice"
        assert broker.reload_acl()  # what the running server does every second
        assert not broker.reload_acl()  # nothing changed since
        assert "user edgefl-op-alice" in broker.acl_path.read_text()

        fleet = _fleet()
        device = Client(_BrokerAt(broker.port), pki.ca, pki.dev_a, "dev-a")
        clients.append(device)
        device.connect()
        status = f"edgefl/{fleet}/dev-a/status"
        info = device.client.publish(status, b"online", qos=1, retain=True)
        info.wait_for_publish(TIMEOUT)
        # The documented line, bounded: one message, 10 s at most.
        sub = subprocess.run(
            [*shlex.split(doc["mosquitto_sub"]), "-C", "1", "-W", "10"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert sub.returncode == 0, sub.stderr
        assert sub.stdout.strip() == f"{status} online"

        operator = IssuedCert(
            (out / "cert.pem").read_bytes(), None, 0, out / "cert.pem", out / "key.pem"
        )
        watcher = Client(_BrokerAt(broker.port), pki.ca, operator, "op")
        clients.append(watcher)
        watcher.connect()
        for topic in (f"edgefl/{fleet}/dev-a/cmd/reboot", f"edgefl/{fleet}/dev-a/telemetry/t"):
            assert watcher.publish(topic, b"x").value == NOT_AUTHORIZED

        revoked = CliRunner().invoke(cli_app, [*cli[:3], "--config", str(config), "--revoke"])
        assert revoked.exit_code == 0, revoked.output
        assert broker.reload_acl()
        assert "edgefl-op-alice" not in broker.acl_path.read_text()
    finally:
        broker.stop()


@dataclass
class _BrokerAt:
    """What :class:`Client` needs of a broker: its port."""

    port: int
