"""Probes of the broker identities and of readmission.

Attacks (names as ``benchmarks/security_probe.py`` reports them), each from the position
of an enrolled device that holds only its own certificate and key:

- ``clientid_takeover_ingest``: the device connects again and again with the ingest's
  client id (``edgefl-ingest``, and the old ``edgefl-server``), asking for a clean
  session, while an honest device sends records. Held when the ingest keeps its
  connection (the broker never closes it) and stores every record.
- ``clientid_takeover_device``: the same with another device's id. Held when that device
  is never disconnected.
- ``device_writes_own_desired_state``: the device publishes, retained, on its own
  ``cmd/...`` and ``state/desired``. Held when both are refused (MQTT 5 PUBACK 0x87) and
  a subscriber on those topics, before and after, receives nothing.
- ``oversized_payload``: a payload one byte over the broker's ``message_size_limit``
  (the ingest's ``max_payload_bytes``). Held when the broker refuses it and a subscriber
  receives nothing, while a payload of exactly the limit still passes.
- ``readmit_old_tls_key``: a revoked device's old enrollment request with only the node
  key replaced, readmitted. Held when the admission is refused (naming the reused TLS
  key) and no certificate is issued and no node registered.

The broker is mosquitto started by :class:`edgefl.server.serve.MosquittoBroker` on the
shipped configuration (what ``edgefl server start`` runs), the ingest is the real
:class:`~edgefl.server.ingest.Ingest`, readmission runs against a real SuperLink with
TLS and node authentication. ``tests/security/test_broker_identity.py`` runs these same
functions.
"""

from __future__ import annotations

import contextlib
import json
import queue
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from edgefl.config import TlsFiles
from edgefl.proto.serde import MAX_ENVELOPE_BYTES, Envelope, encode_envelope
from edgefl.proto.topics import device_prefix
from edgefl.server.fleet_ca import (
    COMMANDS_IDENTITY,
    INGEST_IDENTITY,
    FleetCA,
    IssuedCert,
)
from edgefl.server.ingest import BrokerAddress, Ingest, IngestConfig
from edgefl.server.serve import BrokerConfig, MosquittoBroker

__all__ = [
    "BrokerLab",
    "MqttProbe",
    "broker_lab",
    "probe_clientid_takeover_device",
    "probe_clientid_takeover_ingest",
    "probe_device_writes_own_desired_state",
    "probe_oversized_payload",
    "probe_readmit_old_tls_key",
    "run_probes",
]

TIMEOUT: Final = 10.0
NOT_AUTHORIZED: Final = 0x87
Result = dict[str, object]


class MqttProbe:
    """A paho MQTT 5 client over mutual TLS whose callbacks only feed queues."""

    def __init__(self, port: int, ca: FleetCA, cert: IssuedCert, client_id: str) -> None:
        assert cert.key_path is not None
        self.port = port
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        self.client.tls_set(
            ca_certs=str(ca.cert_path), certfile=str(cert.cert_path), keyfile=str(cert.key_path)
        )
        self.connects: queue.Queue[ReasonCode] = queue.Queue()
        self.disconnects: queue.Queue[ReasonCode] = queue.Queue()
        self.pubacks: queue.Queue[tuple[int, ReasonCode]] = queue.Queue()
        self.subacks: queue.Queue[list[ReasonCode]] = queue.Queue()
        self.messages: queue.Queue[tuple[str, bytes, bool]] = queue.Queue()
        self.client.on_connect = lambda c, u, f, rc, p: self.connects.put(rc)
        self.client.on_disconnect = lambda c, u, f, rc, p: self.disconnects.put(rc)
        # on_publish runs under paho's lock: hand over, never lock there.
        self.client.on_publish = lambda c, u, mid, rc, p: self.pubacks.put((mid, rc))
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.subacks.put(rcs)
        self.client.on_message = lambda c, u, m: self.messages.put(
            (m.topic, bytes(m.payload), bool(m.retain))
        )
        self.started = False

    def connect(self, *, clean_start: bool = False) -> MqttProbe:
        self.client.connect("127.0.0.1", self.port, keepalive=30, clean_start=clean_start)
        self.client.loop_start()
        self.started = True
        rc = self.connects.get(timeout=TIMEOUT)
        if rc.is_failure:
            raise RuntimeError(f"connection refused: {rc}")
        return self

    def subscribe(self, *topics: str) -> None:
        self.client.subscribe([(t, 1) for t in topics])
        rcs = self.subacks.get(timeout=TIMEOUT)
        if any(rc.is_failure for rc in rcs):
            raise RuntimeError(f"subscription refused: {rcs}")

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> ReasonCode:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        while True:
            mid, rc = self.pubacks.get(timeout=TIMEOUT)
            if mid == info.mid:
                return rc

    def drain(self, until_topic: str) -> list[tuple[str, bytes, bool]]:
        """Everything received up to and including a message on ``until_topic``."""
        got: list[tuple[str, bytes, bool]] = []
        deadline = time.monotonic() + TIMEOUT
        while not any(t == until_topic for t, _, _ in got):
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing on {until_topic}; got {[t for t, _, _ in got]}")
            with contextlib.suppress(queue.Empty):
                got.append(self.messages.get(timeout=0.1))
        return got

    def close(self) -> None:
        if self.started:
            self.client.disconnect()
            self.client.loop_stop()
            self.started = False


@dataclass
class BrokerLab:
    """A fleet CA, the shipped broker and clients made from its certificates."""

    workdir: Path
    ca: FleetCA
    broker: MosquittoBroker
    certs: dict[str, IssuedCert]
    fleet: str
    clients: list[MqttProbe] = field(default_factory=list)

    def client(self, cert: str, client_id: str | None = None) -> MqttProbe:
        probe = MqttProbe(
            self.broker.port,
            self.ca,
            self.certs[cert],
            client_id or f"{cert}-{uuid.uuid4().hex[:6]}",
        )
        self.clients.append(probe)
        return probe

    def close_clients(self) -> None:
        """Close every client: two live connections with one CN would take turns."""
        for probe in self.clients:
            with contextlib.suppress(Exception):
                probe.close()
        self.clients.clear()

    def topic(self, device: str, rest: str) -> str:
        return f"{device_prefix(self.fleet, device)}/{rest}"

    def broker_log(self) -> str:
        return self.broker.log_path.read_text(encoding="utf-8", errors="replace")

    def ingest_config(self, db_url: str) -> IngestConfig:
        cert = self.certs[INGEST_IDENTITY]
        return IngestConfig(
            broker=BrokerAddress(host="127.0.0.1", port=self.broker.port),
            db_url=db_url,
            fleet=self.fleet,
            tls=TlsFiles(
                ca_file=self.ca.cert_path, cert_file=cert.cert_path, key_file=cert.key_path
            ),
        )


@contextlib.contextmanager
def broker_lab(workdir: Path) -> Iterator[BrokerLab]:
    """Start the shipped broker with a fresh CA; stop it and every client after."""
    workdir.mkdir(parents=True, exist_ok=True)
    ca = FleetCA.create(workdir / "ca")
    server = ca.issue_server_cert(["localhost"], ["127.0.0.1"])
    assert server.key_path is not None
    certs = {
        INGEST_IDENTITY: ca.issue_service_cert(INGEST_IDENTITY),
        COMMANDS_IDENTITY: ca.issue_service_cert(COMMANDS_IDENTITY),
        "dev-a": ca.issue_device_cert("dev-a"),
        "dev-b": ca.issue_device_cert("dev-b"),
        "op": ca.issue_operator_cert("probe"),
    }
    fleet = f"f{uuid.uuid4().hex[:8]}"
    # The devices are admitted to the lab's fleet: the broker's ACL pins each to it.
    admitted = {"dev-a": fleet, "dev-b": fleet}
    broker = MosquittoBroker(
        workdir / "broker",
        ca,
        server.cert_path,
        server.key_path,
        BrokerConfig(port=0),
        devices=lambda: admitted,
    )
    broker.start()
    lab = BrokerLab(workdir, ca, broker, certs, fleet=fleet)
    try:
        yield lab
    finally:
        lab.close_clients()
        broker.stop()


def _envelope(device: str, seq: int) -> bytes:
    env = Envelope(
        version=1,
        device_id=device,
        seq=seq,
        ts_ms=1_700_000_000_000 + seq,
        kind="telemetry",
        content_type="application/json",
        body=json.dumps({"seq": seq}).encode(),
    )
    return encode_envelope(env, "json")


def _kicked(log: str, client_id: str) -> int:
    """How often mosquitto closed ``client_id``'s connection for a newcomer with its id."""
    return len(re.findall(rf"Client {re.escape(client_id)} already connected", log))


def probe_clientid_takeover_ingest(lab: BrokerLab, db_url: str, records: int = 60) -> Result:
    """See the module docstring."""
    lab.close_clients()
    ingest = Ingest(lab.ingest_config(db_url))
    ingest.start()
    try:
        if not ingest.wait_ready(TIMEOUT):
            return {"held": False, "detail": "the ingest did not subscribe"}
        honest = lab.client("dev-a").connect()
        attempts: list[str] = []
        for seq in range(1, records + 1):
            rc = honest.publish(lab.topic("dev-a", "telemetry/t"), _envelope("dev-a", seq))
            if rc.is_failure:
                return {"held": False, "detail": f"honest record {seq} refused: {rc}"}
            if seq % 20 == 0:
                for stolen in (INGEST_IDENTITY, "edgefl-server"):
                    attacker = lab.client("dev-b", client_id=stolen)
                    try:
                        attacker.connect(clean_start=True)
                        attacker.subscribe("edgefl/#")
                        attempts.append(f"{stolen}: connected")
                    except (RuntimeError, queue.Empty) as exc:
                        attempts.append(f"{stolen}: {exc}")
                    finally:
                        attacker.close()
        deadline = time.monotonic() + TIMEOUT
        while ingest.metrics()["stored"] < records and time.monotonic() < deadline:
            time.sleep(0.05)
        stored = ingest.metrics()["stored"]
        kicked = _kicked(lab.broker_log(), INGEST_IDENTITY)
        held = stored == records and kicked == 0
        return {
            "held": held,
            "detail": f"{stored}/{records} acknowledged records stored, the ingest's "
            f"connection closed {kicked} times by {len(attempts)} connections of a device "
            f"with the ingest's client id",
        }
    finally:
        ingest.stop()


def probe_clientid_takeover_device(lab: BrokerLab) -> Result:
    """See the module docstring."""
    lab.close_clients()
    victim = lab.client("dev-a", client_id="dev-a").connect()
    for _ in range(3):
        attacker = lab.client("dev-b", client_id="dev-a")
        with contextlib.suppress(RuntimeError, queue.Empty):
            attacker.connect(clean_start=True)
        attacker.close()
    rc = victim.publish(lab.topic("dev-a", "telemetry/t"), _envelope("dev-a", 1))
    dropped = victim.disconnects.qsize()
    kicked = _kicked(lab.broker_log(), "dev-a")
    held = dropped == 0 and kicked == 0 and not rc.is_failure
    return {
        "held": held,
        "detail": f"3 connections of dev-b with client id dev-a: dev-a disconnected "
        f"{dropped} times (broker closed it {kicked} times), its next publish: {rc}",
    }


def probe_device_writes_own_desired_state(lab: BrokerLab) -> Result:
    """See the module docstring."""
    lab.close_clients()
    desired = lab.topic("dev-a", "state/desired")
    command = lab.topic("dev-a", "cmd/reboot")
    # The device itself is the victim a forged retained command would reach.
    device = lab.client("dev-a").connect()
    device.subscribe(lab.topic("dev-a", "cmd/#"), desired)
    codes = {
        topic: device.publish(topic, b'{"forged": true}', retain=True)
        for topic in (desired, command)
    }
    # The command service publishes after the forged messages were answered, so once its
    # message has arrived a forged one would have arrived before it.
    sentinel = lab.topic("dev-a", "cmd/ping")
    sent = lab.client(COMMANDS_IDENTITY).connect().publish(sentinel, b"sentinel")
    received = device.drain(sentinel) if not sent.is_failure else []
    # A subscriber that comes later gets retained messages right after its SUBACK.
    later = lab.client("op").connect()
    later.subscribe(lab.topic("dev-a", "cmd/#"), desired)
    time.sleep(0.5)
    forged = [t for t, _, _ in received if t != sentinel]
    forged += [t for t, _, _ in list(later.messages.queue)]
    refused = all(rc.value == NOT_AUTHORIZED for rc in codes.values())
    return {
        "held": refused and not sent.is_failure and not forged,
        "detail": "PUBACKs "
        + ", ".join(f"{t.split('/', 3)[3]}: 0x{rc.value:02x}" for t, rc in codes.items())
        + f"; forged messages received: {forged or 'none'}",
    }


def probe_oversized_payload(lab: BrokerLab, limit: int = MAX_ENVELOPE_BYTES) -> Result:
    """See the module docstring.

    mosquitto 2.0.11 answers an oversized QoS 1 PUBLISH with PUBACK reason 0x95 (Packet
    too large), which MQTT 5 does not allow in a PUBACK: paho 2.2 cannot parse it and
    drops the connection. Either way the message is refused; what counts is that no
    subscriber ever receives it.
    """
    lab.close_clients()
    watcher = lab.client("op").connect()
    big = lab.topic("dev-a", "data/big")
    fits = lab.topic("dev-a", "data/fits")
    watcher.subscribe(big, fits)
    attacker = lab.client("dev-a").connect()
    info = attacker.client.publish(big, b"x" * (limit + 1), qos=1)
    try:
        mid, rc = attacker.pubacks.get(timeout=3.0)
        answer = f"PUBACK 0x{rc.value:02x}"
        accepted = mid == info.mid and not rc.is_failure
    except queue.Empty:
        dropped = attacker.disconnects.qsize()
        answer = f"no PUBACK, connection dropped {dropped} times"
        accepted = False
    attacker.close()  # paho would re-send it on every reconnect
    device = lab.client("dev-a").connect()
    at_limit = device.publish(fits, b"x" * limit)
    received = watcher.drain(fits) if not at_limit.is_failure else []
    leaked = [len(p) for t, p, _ in received if t == big]
    return {
        "held": not accepted and not at_limit.is_failure and not leaked,
        "detail": f"{limit + 1} bytes: {answer}, delivered {len(leaked)} times; "
        f"{limit} bytes: PUBACK 0x{at_limit.value:02x}",
    }


def probe_readmit_old_tls_key(workdir: Path) -> Result:
    """See the module docstring."""
    from edgefl.edge_agent.identity import prepare_enrollment
    from edgefl.enrollment import EnrollmentRequest
    from edgefl.server.enrollment import ReusedKeyError, admit, revoke
    from edgefl.server.fl.superlink import SuperLink, SuperLinkConfig
    from edgefl.server.registry import make_engine, upgrade

    workdir.mkdir(parents=True, exist_ok=True)
    ca = FleetCA.create(workdir / "ca")
    server = ca.issue_server_cert(["localhost"], ["127.0.0.1"])
    assert server.key_path is not None
    superlink = SuperLink(
        SuperLinkConfig(
            port=0,
            tls=TlsFiles(
                ca_file=ca.cert_path, cert_file=server.cert_path, key_file=server.key_path
            ),
        ),
        workdir / "superlink",
    )
    db_url = f"sqlite:///{workdir / 'registry.db'}"
    upgrade(db_url)
    engine = make_engine(db_url)
    superlink.start()
    try:
        admin = superlink.admin()
        device_dir = workdir / "device"
        first = prepare_enrollment("dev-r", "lab", device_dir)
        admit(first.request, ca=ca, admin=admin, engine=engine)
        revoke("dev-r", "stolen", ca=ca, admin=admin, engine=engine)
        # The attacker kept the old request (and device.key); only the node key is new.
        fresh = prepare_enrollment("dev-r", "lab", workdir / "attacker", force=True)
        forged = EnrollmentRequest(
            device_id="dev-r",
            fleet="lab",
            csr_pem=first.request.csr_pem,
            node_public_key=fresh.request.node_public_key,
        )
        nodes_before = len(admin.list_nodes())
        serials_before = ca.device_serials("dev-r")
        try:
            admit(forged, ca=ca, admin=admin, engine=engine, readmit=True)
        except ReusedKeyError as exc:
            refusal = str(exc)
        else:
            return {"held": False, "detail": "readmitted with the revoked TLS key"}
        unchanged = (
            len(admin.list_nodes()) == nodes_before and ca.device_serials("dev-r") == serials_before
        )
        return {
            "held": unchanged,
            "detail": f"refused: {refusal}"
            + ("" if unchanged else "; but a certificate or node was left behind"),
        }
    finally:
        superlink.stop()
        engine.dispose()


def run_probes(workdir: Path) -> dict[str, dict[str, Any]]:
    """Run every broker attack; ``{NAME: {"held": bool, "detail": str}}``."""
    from edgefl.server.registry import upgrade

    out: dict[str, dict[str, Any]] = {}
    db_url = f"sqlite:///{workdir / 'ingest.db'}"
    upgrade(db_url)
    with broker_lab(workdir / "lab") as lab:
        out["clientid_takeover_ingest"] = probe_clientid_takeover_ingest(lab, db_url)
        out["clientid_takeover_device"] = probe_clientid_takeover_device(lab)
        out["device_writes_own_desired_state"] = probe_device_writes_own_desired_state(lab)
        out["oversized_payload"] = probe_oversized_payload(lab)
    out["readmit_old_tls_key"] = probe_readmit_old_tls_key(workdir / "readmit")
    return out
