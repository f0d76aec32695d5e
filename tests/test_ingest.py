"""The MQTT ingest against a real mosquitto, on SQLite and on PostgreSQL."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import paho.mqtt.client as mqtt
import pytest
import sqlalchemy as sa
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy.exc import IntegrityError, OperationalError

from edgefl.config import TlsFiles
from edgefl.errors import ConfigError
from edgefl.process import ManagedProcess
from edgefl.proto.serde import ENVELOPE_VERSION, Envelope, encode_envelope, new_incarnation
from edgefl.server import ingest as ingest_module
from edgefl.server.fleet_ca import SERVER_IDENTITY, FleetCA
from edgefl.server.ingest import (
    DEAD_LETTER_REASONS,
    BrokerAddress,
    Ingest,
    IngestConfig,
    subscription_topics,
)
from edgefl.server.registry import (
    DEAD_LETTER_PAYLOAD_CAP,
    DeadLetter,
    Device,
    Enrollment,
    Record,
    make_engine,
    upgrade,
)
from edgefl.server.serve import (
    BrokerConfig,
    MosquittoBroker,
    Server,
    ServerConfig,
    ServerIngestConfig,
)
from edgefl.testing import Mosquitto, wait_for

TIMEOUT = 30.0


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture
def registry(db_url: str) -> Iterator[sa.Engine]:
    """An engine for the test's own queries (the ingest has its own)."""
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


class Publisher:
    """A device-side paho client that waits for each PUBACK."""

    def __init__(self, broker: Mosquitto) -> None:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"pub-{uuid.uuid4().hex[:10]}",
            protocol=mqtt.MQTTv5,
        )
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(timeout=10)
        assert info.is_published(), f"no PUBACK for {topic}"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def publisher(broker: Mosquitto) -> Iterator[Publisher]:
    pub = Publisher(broker)
    yield pub
    pub.close()


def _config(broker: Mosquitto, db_url: str, fleet: str, **extra: Any) -> IngestConfig:
    return IngestConfig.model_validate(
        {
            "broker": {"host": broker.host, "port": broker.port},
            "client_id": f"ingest-{fleet}",
            "db_url": db_url,
            "fleet": fleet,
            **extra,
        }
    )


@pytest.fixture
def ingest(broker: Mosquitto, db_url: str, fleet: str) -> Iterator[Ingest]:
    service = Ingest(_config(broker, db_url, fleet, max_payload_bytes=4096))
    service.start()
    try:
        assert service.wait_ready(TIMEOUT), "ingest did not subscribe"
        yield service
    finally:
        service.stop()


# -- helpers ----------------------------------------------------------------------------


def envelope(
    device: str,
    seq: int,
    encoding: Literal["json", "protobuf"] = "json",
    *,
    body: Any = None,
    kind: str = "telemetry",
    incarnation: str = "",
) -> bytes:
    """Version 2 with an incarnation, version 1 (as an agent not yet upgraded) without."""
    payload = json.dumps(body if body is not None else {"seq": seq}).encode()
    version = ENVELOPE_VERSION if incarnation else 1
    env = Envelope(
        version,
        device,
        seq,
        1_700_000_000_000 + seq,
        kind,
        "application/json",
        payload,
        incarnation,
    )
    return encode_envelope(env, encoding)


def stored_seqs(engine: sa.Engine, device: str) -> list[int]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(Record.seq).where(Record.device_id == device).order_by(Record.seq)
        )
        return [int(seq) for seq in rows.scalars()]


def record_count(engine: sa.Engine, device: str) -> int:
    with engine.connect() as conn:
        count = conn.scalar(
            sa.select(sa.func.count()).select_from(Record).where(Record.device_id == device)
        )
        return int(count or 0)


def dead_letters(engine: sa.Engine) -> list[tuple[str, str, str, int, int]]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(
                DeadLetter.topic,
                DeadLetter.reason,
                DeadLetter.detail,
                DeadLetter.payload_size,
                sa.func.length(DeadLetter.payload),
            ).order_by(DeadLetter.id)
        )
        return [(t, r, d, int(s), int(n)) for t, r, d, s, n in rows]


def device_row(engine: sa.Engine, device: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(sa.select(Device).where(Device.device_id == device)).first()


# -- tests ------------------------------------------------------------------------------


def test_subscriptions_cover_the_fleet_contract() -> None:
    assert subscription_topics("fleet1") == [
        "edgefl/fleet1/+/telemetry/#",
        "edgefl/fleet1/+/data/#",
        "edgefl/fleet1/+/result/#",
        "edgefl/fleet1/+/status",
        "edgefl/fleet1/+/cmd-resp/#",
        "edgefl/fleet1/+/state/reported",
    ]


def test_config_is_strict() -> None:
    with pytest.raises(ValueError, match="extra"):
        IngestConfig.model_validate({"nope": 1})
    with pytest.raises(ValueError, match="fleet"):
        IngestConfig(fleet="a/b")
    assert IngestConfig().max_payload_bytes == 256 * 1024


@pytest.mark.slow
def test_valid_envelopes_are_stored_once_and_duplicates_counted(
    ingest: Ingest, publisher: Publisher, registry: sa.Engine, fleet: str
) -> None:
    device = f"d{uuid.uuid4().hex[:8]}"
    base = f"edgefl/{fleet}/{device}"
    topics = [
        f"{base}/telemetry/temp",
        f"{base}/data/samples",
        f"{base}/result/classifier",
        f"{base}/cmd-resp/corr-1",
    ]  # state/reported carries a JSON ReportedState, not envelopes (test_reported_state.py)
    for seq in range(1, 21):
        encoding: Literal["json", "protobuf"] = "json" if seq % 2 else "protobuf"
        publisher.publish(topics[seq % len(topics)], envelope(device, seq, encoding))
    # wire duplicates: same (device, seq) again, in both encodings
    publisher.publish(topics[0], envelope(device, 5, "json"))
    publisher.publish(topics[1], envelope(device, 10, "protobuf"))
    publisher.publish(topics[2], envelope(device, 10, "json"))

    wait_for(
        lambda: ingest.metrics()["stored"] + ingest.metrics()["duplicates"] == 23,
        TIMEOUT,
        "23 messages processed",
    )
    metrics = ingest.metrics()
    assert metrics["stored"] == 20
    assert metrics["duplicates"] == 3
    assert metrics["dead_lettered"] == 0
    assert metrics["received"] == 23
    wait_for(lambda: ingest.metrics()["acked"] == 23, TIMEOUT, "23 acks")
    assert stored_seqs(registry, device) == list(range(1, 21))
    with registry.connect() as conn:
        row = conn.execute(
            sa.select(Record.body, Record.topic, Record.kind, Record.ts_ms).where(
                Record.device_id == device, Record.seq == 4
            )
        ).one()
    assert json.loads(row.body) == {"seq": 4}
    assert row.topic == topics[4 % len(topics)]
    assert (row.kind, row.ts_ms) == ("telemetry", 1_700_000_000_004)
    seen = device_row(registry, device)
    assert seen.fleet == fleet
    assert seen.last_seen >= seen.first_seen
    assert seen.online is False  # no status message yet


@pytest.mark.slow
def test_bad_payloads_are_dead_lettered_and_good_ones_around_them_stored(
    ingest: Ingest, publisher: Publisher, registry: sa.Engine, fleet: str
) -> None:
    device = f"d{uuid.uuid4().hex[:8]}"
    topic = f"edgefl/{fleet}/{device}/telemetry/t"
    big = b"\x08" + os.urandom(DEAD_LETTER_PAYLOAD_CAP + 1000)  # > 4096 and > the cap
    bad: list[tuple[str, bytes, str]] = [
        (topic, b'{"v":1,"device_id":', "malformed_envelope"),
        (topic, b"\x08\x01\x12\xff\xff", "malformed_envelope"),
        (topic, big, "oversized"),
        (topic, envelope("someone-else", 99), "device_mismatch"),
        (f"edgefl/{fleet}/{device}/status", b"sleepy", "bad_status"),
        (f"edgefl/{fleet}/{device}/telemetry", envelope(device, 98), "bad_topic"),
        (topic, envelope(device, 1)[:-1] + b"", "malformed_envelope"),
    ]
    seq = 0
    for bad_topic, payload, _reason in bad:
        seq += 1
        publisher.publish(topic, envelope(device, seq, "protobuf"))
        publisher.publish(bad_topic, payload)
    seq += 1
    publisher.publish(topic, envelope(device, seq))

    wait_for(
        lambda: ingest.metrics()["stored"] == seq and ingest.metrics()["dead_lettered"] == len(bad),
        TIMEOUT,
        "good messages stored and bad ones dead-lettered",
    )
    metrics = ingest.metrics()
    assert metrics["duplicates"] == 0
    assert metrics["dead_lettered.malformed_envelope"] == 3
    assert metrics["dead_lettered.oversized"] == 1
    assert metrics["dead_lettered.device_mismatch"] == 1
    assert metrics["dead_lettered.bad_status"] == 1
    assert metrics["dead_lettered.bad_topic"] == 1
    assert set(DEAD_LETTER_REASONS) <= {k.split(".", 1)[1] for k in metrics if "." in k}
    assert stored_seqs(registry, device) == list(range(1, seq + 1))

    letters = dead_letters(registry)
    assert [(t, r) for t, r, *_ in letters] == [(t, r) for t, _p, r in bad]
    details = {reason: detail for _t, reason, detail, _s, _n in letters}
    assert "invalid JSON" in details["malformed_envelope"]
    assert "exceeds the limit of 4096" in details["oversized"]
    assert "someone-else" in details["device_mismatch"]
    oversized = next(letter for letter in letters if letter[1] == "oversized")
    assert oversized[3] == len(big)  # original size kept
    assert oversized[4] == DEAD_LETTER_PAYLOAD_CAP  # payload truncated to the cap

    # still alive and storing
    publisher.publish(topic, envelope(device, seq + 1))
    wait_for(lambda: record_count(registry, device) == seq + 1, TIMEOUT, "one more record")


@pytest.mark.slow
def test_presence_of_many_devices_written_together(
    ingest: Ingest, publisher: Publisher, registry: sa.Engine, fleet: str
) -> None:
    # Published without waiting, so batches hold many devices, some with a status message
    # and some with records only: each gets its own presence, none another's.
    devices = [f"m{uuid.uuid4().hex[:6]}{i:02d}" for i in range(30)]
    with_status = set(devices[::2])

    def burst(status: bytes, seq: int) -> None:
        infos = []
        for device in devices:
            topic = f"edgefl/{fleet}/{device}/data/s"
            infos.append(publisher.client.publish(topic, envelope(device, seq), qos=1))
            if device in with_status:
                status_topic = f"edgefl/{fleet}/{device}/status"
                infos.append(publisher.client.publish(status_topic, status, qos=1))
        for info in infos:
            info.wait_for_publish(timeout=10)

    burst(b"online", 1)
    wait_for(lambda: ingest.metrics()["stored"] == 30, TIMEOUT, "30 records")
    wait_for(lambda: ingest.metrics()["status_updates"] == 15, TIMEOUT, "15 status updates")
    first = {device: device_row(registry, device) for device in devices}
    for device, row in first.items():
        assert row.fleet == fleet
        assert row.online is (device in with_status)
        assert (row.status_changed_at is not None) is (device in with_status)

    burst(b"offline", 2)
    wait_for(lambda: ingest.metrics()["stored"] == 60, TIMEOUT, "60 records")
    wait_for(lambda: ingest.metrics()["status_updates"] == 30, TIMEOUT, "30 status updates")
    for device in devices:
        row = device_row(registry, device)
        assert row.online is False
        assert row.first_seen == first[device].first_seen
        assert row.last_seen >= first[device].last_seen
        if device in with_status:
            assert row.status_changed_at >= first[device].status_changed_at
        else:
            assert row.status_changed_at is None


@pytest.mark.slow
def test_status_topic_sets_presence(
    ingest: Ingest, publisher: Publisher, registry: sa.Engine, fleet: str
) -> None:
    device = f"d{uuid.uuid4().hex[:8]}"
    status = f"edgefl/{fleet}/{device}/status"
    publisher.publish(status, b"online", retain=True)
    wait_for(
        lambda: (row := device_row(registry, device)) is not None and row.online,
        TIMEOUT,
        "device online",
    )
    first = device_row(registry, device)
    assert first.status_changed_at is not None
    assert first.fleet == fleet

    publisher.publish(f"edgefl/{fleet}/{device}/data/s", envelope(device, 1, kind="data"))
    wait_for(lambda: record_count(registry, device) == 1, TIMEOUT, "record stored")
    after_record = device_row(registry, device)
    assert after_record.online is True
    assert after_record.last_seen >= first.last_seen

    publisher.publish(status, b"offline", retain=True)
    wait_for(lambda: not device_row(registry, device).online, TIMEOUT, "device offline")
    offline = device_row(registry, device)
    assert offline.status_changed_at >= first.status_changed_at
    assert offline.last_seen >= after_record.last_seen
    assert offline.first_seen == first.first_seen
    wait_for(lambda: ingest.metrics()["status_updates"] == 2, TIMEOUT, "2 status updates")
    publisher.publish(status, b"", retain=True)  # clear the retained status


_INGEST_MAIN = """
import sys
from edgefl.logs import configure_logging
from edgefl.server.ingest import Ingest, IngestConfig
configure_logging("INFO")
Ingest(IngestConfig.model_validate_json(sys.argv[1])).run()
"""


class IngestProcess:
    """``Ingest.run`` in a child process (its own group), so it can be killed with SIGKILL."""

    def __init__(self, config: IngestConfig, log: Path) -> None:
        self.config = config
        self.log = log
        self.proc: ManagedProcess | None = None

    def start(self) -> None:
        argv = [sys.executable, "-c", _INGEST_MAIN, self.config.model_dump_json()]
        self.proc = ManagedProcess(argv, self.log, name="ingest")
        self.proc.start()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc = None

    def terminate(self) -> None:
        if self.proc is None:
            return
        self.proc.stop(15.0)
        self.proc = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.running()


@pytest.mark.slow
def test_ingest_killed_mid_stream_stores_every_seq_exactly_once(
    broker: Mosquitto,
    publisher: Publisher,
    registry: sa.Engine,
    db_url: str,
    fleet: str,
    tmp_path: Path,
) -> None:
    total = 1200
    device = f"d{uuid.uuid4().hex[:8]}"
    topic = f"edgefl/{fleet}/{device}/telemetry/t"
    upgrade(db_url)  # so the probe below can query before the child has migrated
    process = IngestProcess(_config(broker, db_url, fleet), tmp_path / "ingest.log")
    process.start()
    try:
        # The persistent session starts at the first subscription: probe with seq 1 until
        # the ingest stores it (re-sending the same seq is harmless by design).
        deadline = time.monotonic() + 60
        while record_count(registry, device) == 0:
            assert process.alive(), process.log.read_text()[-3000:]
            assert time.monotonic() < deadline, "ingest never stored the probe"
            publisher.publish(topic, envelope(device, 1))
            with contextlib.suppress(TimeoutError):
                wait_for(lambda: record_count(registry, device) > 0, 1.0, "probe")

        published = 1
        lock = threading.Lock()
        stop = threading.Event()

        def publish_rest() -> None:
            nonlocal published
            for seq in range(2, total + 1):
                if stop.is_set():
                    return
                encoding: Literal["json", "protobuf"] = "json" if seq % 3 else "protobuf"
                publisher.publish(topic, envelope(device, seq, encoding))
                with lock:
                    published = seq
                time.sleep(0.002)

        sender = threading.Thread(target=publish_rest, daemon=True)
        sender.start()
        try:
            wait_for(lambda: record_count(registry, device) >= total // 4, 60, "a quarter stored")
            process.kill()
            killed_at = record_count(registry, device)
            with lock:
                published_at_kill = published
            # the stream goes on while the ingest is dead
            wait_for(lambda: published >= published_at_kill + 200, 60, "200 published meanwhile")
            process.start()
            sender.join(timeout=120)
            assert not sender.is_alive(), "publisher did not finish"
        finally:
            stop.set()
        assert published == total
        wait_for(
            lambda: record_count(registry, device) == total,
            90,
            f"all {total} records stored (log: {process.log})",
        )
    finally:
        process.terminate()
    assert stored_seqs(registry, device) == list(range(1, total + 1))
    with registry.connect() as conn:
        rows = conn.scalar(sa.select(sa.func.count()).select_from(Record))
        dead = conn.scalar(sa.select(sa.func.count()).select_from(DeadLetter))
    assert rows == total  # 0 lost, 0 duplicate rows
    assert dead == 0
    assert killed_at < total


# -- mutual TLS --------------------------------------------------------------------------


def test_tls_options_are_checked() -> None:
    with pytest.raises(ValueError, match=r"tls\.cert_file and tls\.key_file go together"):
        IngestConfig(tls=TlsFiles(ca_file=Path("/ca.pem"), cert_file=Path("/c.pem")))
    with pytest.raises(ValueError, match=r"tls\.cert_file needs tls\.ca_file"):
        IngestConfig(tls=TlsFiles(cert_file=Path("/c.pem"), key_file=Path("/k.pem")))
    with pytest.raises(ConfigError, match="ingest TLS files unusable"):
        Ingest(IngestConfig(tls=TlsFiles(ca_file=Path("/nonexistent/ca.pem"))))


@pytest.mark.slow
def test_ingest_over_mutual_tls_with_the_service_certificate(
    tmp_path: Path, db_url: str, fleet: str
) -> None:
    """The shipped broker config (mutual TLS + ACL): the ingest authenticates as
    ``edgefl-server`` with the CA's service certificate and stores a device's envelopes."""
    ca = FleetCA.create(tmp_path / "ca")
    ca.issue_server_cert(["localhost"], ["127.0.0.1"])
    service = ca.issue_service_cert(SERVER_IDENTITY)
    device_cert = ca.issue_device_cert("tls-dev")
    assert service.key_path is not None
    assert device_cert.key_path is not None
    broker = MosquittoBroker(
        tmp_path / "broker",
        ca,
        ca.directory / "server" / "cert.pem",
        ca.directory / "server" / "key.pem",
        BrokerConfig(port=0),
        devices=lambda: {"tls-dev": fleet},  # admitted to the test's fleet
    )
    broker.start()
    ingest = Ingest(
        IngestConfig(
            broker=BrokerAddress(host="127.0.0.1", port=broker.port),
            client_id=f"ingest-{fleet}",
            db_url=db_url,
            fleet=fleet,
            tls=TlsFiles(
                ca_file=ca.cert_path, cert_file=service.cert_path, key_file=service.key_path
            ),
        )
    )
    device = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="tls-dev", protocol=mqtt.MQTTv5)
    device.tls_set(
        ca_certs=str(ca.cert_path),
        certfile=str(device_cert.cert_path),
        keyfile=str(device_cert.key_path),
    )
    try:
        ingest.start()
        assert ingest.wait_ready(TIMEOUT), "ingest did not subscribe over TLS"
        device.connect("127.0.0.1", broker.port)
        device.loop_start()
        for seq in (1, 2, 3):
            device.publish(
                f"edgefl/{fleet}/tls-dev/telemetry/t", envelope("tls-dev", seq), qos=1
            ).wait_for_publish(TIMEOUT)
        wait_for(lambda: ingest.metrics()["acked"] == 3, TIMEOUT, "3 messages stored and acked")
        engine = make_engine(db_url)
        try:
            assert stored_seqs(engine, "tls-dev") == [1, 2, 3]
        finally:
            engine.dispose()
    finally:
        device.disconnect()
        device.loop_stop()
        ingest.stop()
        broker.stop()


# -- idempotency key, conflicts, fleets ---------------------------------------------------


def stored_keys(engine: sa.Engine, device: str) -> list[tuple[str, int]]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(Record.incarnation, Record.seq)
            .where(Record.device_id == device)
            .order_by(Record.incarnation, Record.seq)
        )
        return [(str(i), int(q)) for i, q in rows]


def reasons(engine: sa.Engine) -> Counter[str]:
    with engine.connect() as conn:
        return Counter(conn.scalars(sa.select(DeadLetter.reason)))


@pytest.mark.slow
def test_each_outbox_incarnation_is_stored_and_a_changed_body_is_dead_lettered(
    ingest: Ingest, publisher: Publisher, registry: sa.Engine, fleet: str
) -> None:
    device = f"d{uuid.uuid4().hex[:8]}"
    topic = f"edgefl/{fleet}/{device}/data/s"
    old, new = sorted([new_incarnation(), new_incarnation()])
    for seq in (1, 2, 3):
        publisher.publish(topic, envelope(device, seq))  # an agent not yet upgraded
        publisher.publish(topic, envelope(device, seq, incarnation=old))
        publisher.publish(topic, envelope(device, seq, "protobuf", incarnation=new))  # reset
    # A true redelivery (the same envelope, in the other encoding) is a duplicate ...
    publisher.publish(topic, envelope(device, 2, "protobuf", incarnation=old))
    # ... the same key with another body is not: dead-lettered, counted, logged.
    publisher.publish(topic, envelope(device, 2, incarnation=old, body={"forged": True}))
    publisher.publish(topic, envelope(device, 3, body={"forged": True}))
    wait_for(lambda: ingest.metrics()["acked"] == 12, TIMEOUT, "12 messages acknowledged")
    metrics = ingest.metrics()
    assert (metrics["stored"], metrics["duplicates"]) == (9, 1)
    assert metrics["dead_lettered.conflicting_duplicate"] == 2
    assert metrics["dead_lettered"] == 2
    assert stored_keys(registry, device) == sorted(
        (inc, seq) for inc in ("", old, new) for seq in (1, 2, 3)
    )
    letters = [(r, d) for _t, r, d, _s, _n in dead_letters(registry)]
    assert [r for r, _d in letters] == ["conflicting_duplicate"] * 2
    assert f"incarnation {old!r}, seq 2" in letters[0][1]


@pytest.mark.slow
def test_conflict_inside_one_batch_is_dead_lettered(
    broker: Mosquitto, publisher: Publisher, db_url: str, registry: sa.Engine, fleet: str
) -> None:
    # Published while the ingest is down, so both arrive in one batch when it starts.
    device = f"d{uuid.uuid4().hex[:8]}"
    topic = f"edgefl/{fleet}/{device}/data/s"
    config = _config(broker, db_url, fleet)
    first = Ingest(config)
    first.start()
    assert first.wait_ready(TIMEOUT)
    first.stop()  # the persistent session now queues for it
    publisher.publish(topic, envelope(device, 1, body={"a": 1}))
    publisher.publish(topic, envelope(device, 1, body={"a": 2}))
    publisher.publish(topic, envelope(device, 1, body={"a": 1}))
    second = Ingest(config)
    second.start()
    try:
        wait_for(lambda: second.metrics()["acked"] == 3, TIMEOUT, "3 messages acknowledged")
        metrics = second.metrics()
    finally:
        second.stop()
    assert (metrics["stored"], metrics["duplicates"]) == (1, 1)
    assert metrics["dead_lettered.conflicting_duplicate"] == 1
    assert reasons(registry) == {"conflicting_duplicate": 1}


def _enroll(engine: sa.Engine, device: str, fleet: str) -> None:
    with engine.begin() as conn:
        conn.execute(
            sa.insert(Enrollment).values(
                device_id=device,
                fleet=fleet,
                status="admitted",
                cert_serial=uuid.uuid4().hex,
                cert_pem="",
                node_public_key="",
                node_id=str(uuid.uuid4().int % 10**18),
                admitted_at=datetime.now(UTC),
                revoke_reason="",
            )
        )


@pytest.mark.slow
def test_topic_fleet_must_be_the_enrolled_or_first_seen_fleet(
    broker: Mosquitto, publisher: Publisher, db_url: str, registry: sa.Engine
) -> None:
    upgrade(db_url)
    enrolled, unenrolled = f"e{uuid.uuid4().hex[:8]}", f"u{uuid.uuid4().hex[:8]}"
    home, other = f"h{uuid.uuid4().hex[:6]}", f"o{uuid.uuid4().hex[:6]}"
    _enroll(registry, enrolled, home)
    service = Ingest(_config(broker, db_url, "+", client_id=f"ing-{uuid.uuid4().hex[:8]}"))
    service.start()
    try:
        assert service.wait_ready(TIMEOUT)
        # The enrolled device's first message comes under another fleet: refused anyway.
        publisher.publish(f"edgefl/{other}/{enrolled}/data/s", envelope(enrolled, 1))
        publisher.publish(f"edgefl/{home}/{enrolled}/data/s", envelope(enrolled, 2))
        publisher.publish(f"edgefl/{other}/{enrolled}/status", b"online")
        # A device without enrollment keeps the fleet it was first seen in.
        publisher.publish(f"edgefl/{home}/{unenrolled}/data/s", envelope(unenrolled, 1))
        publisher.publish(f"edgefl/{other}/{unenrolled}/data/s", envelope(unenrolled, 2))
        wait_for(lambda: service.metrics()["acked"] == 5, TIMEOUT, "5 messages acknowledged")
        metrics = service.metrics()
    finally:
        service.stop()
    assert metrics["stored"] == 2
    assert metrics["dead_lettered.fleet_mismatch"] == 3
    assert stored_seqs(registry, enrolled) == [2]
    assert stored_seqs(registry, unenrolled) == [1]
    assert device_row(registry, enrolled).fleet == home
    assert device_row(registry, enrolled).online is False  # the spoofed status was refused
    assert device_row(registry, unenrolled).fleet == home
    details = [d for _t, r, d, _s, _n in dead_letters(registry) if r == "fleet_mismatch"]
    assert f"belongs to fleet {home!r}, but published under fleet {other!r}" in details[0]


@pytest.mark.slow
def test_retained_records_are_dead_lettered_but_retained_status_is_presence(
    ingest: Ingest, publisher: Publisher, registry: sa.Engine, fleet: str
) -> None:
    device = f"d{uuid.uuid4().hex[:8]}"
    base = f"edgefl/{fleet}/{device}"
    publisher.publish(f"{base}/telemetry/t", envelope(device, 1), retain=True)
    publisher.publish(f"{base}/result/r", envelope(device, 2), retain=True)
    publisher.publish(f"{base}/data/s", envelope(device, 3))
    publisher.publish(f"{base}/status", b"online", retain=True)
    wait_for(lambda: ingest.metrics()["acked"] == 4, TIMEOUT, "4 messages acknowledged")
    assert ingest.metrics()["dead_lettered.retained"] == 2
    assert stored_seqs(registry, device) == [3]
    assert device_row(registry, device).online is True
    for topic in (f"{base}/telemetry/t", f"{base}/result/r", f"{base}/status"):
        publisher.publish(topic, b"", retain=True)  # clear them


# -- per-message isolation and the database ---------------------------------------------


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'iso' / 'edgefl.db'}"


def _burst(publisher: Publisher, topic: str, payloads: list[bytes]) -> None:
    """Publish without waiting in between, so the messages share a batch."""
    infos = [publisher.client.publish(topic, p, qos=1) for p in payloads]
    for info in infos:
        info.wait_for_publish(10)


@pytest.mark.slow
def test_a_message_the_database_refuses_costs_only_that_message(
    broker: Mosquitto,
    publisher: Publisher,
    sqlite_url: str,
    fleet: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = ingest_module._insert_records

    def refuse_one(session: Any, dialect: str, rows: list[dict[str, Any]]) -> Any:
        # Fault injection: the database refuses one row (as a constraint or a driver
        # might), which fails the whole transaction it is in.
        if any(row["body"] == b'"refuse me"' for row in rows):
            raise IntegrityError("INSERT INTO records", {}, Exception("refused"))
        return real(session, dialect, rows)

    monkeypatch.setattr(ingest_module, "_insert_records", refuse_one)
    device = f"d{uuid.uuid4().hex[:8]}"
    payloads = [envelope(device, seq) for seq in range(1, 41)]
    payloads.insert(17, envelope(device, 99, body="refuse me"))
    service = Ingest(_config(broker, sqlite_url, fleet))
    service.start()
    try:
        assert service.wait_ready(TIMEOUT)
        _burst(publisher, f"edgefl/{fleet}/{device}/data/s", payloads)
        wait_for(lambda: service.metrics()["acked"] == 41, TIMEOUT, "41 acknowledged")
        metrics = service.metrics()
    finally:
        service.stop()
    engine = make_engine(sqlite_url)
    try:
        assert stored_seqs(engine, device) == list(range(1, 41))
        letters = dead_letters(engine)
    finally:
        engine.dispose()
    assert metrics["stored"] == 40
    assert metrics["dead_lettered.store_failed"] == 1
    assert [(r, "refused" in d) for _t, r, d, _s, _n in letters] == [("store_failed", True)]


@pytest.mark.slow
def test_database_outage_holds_messages_unacknowledged_until_it_ends(
    broker: Mosquitto,
    publisher: Publisher,
    sqlite_url: str,
    fleet: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = ingest_module._insert_records
    outage = threading.Event()
    outage.set()

    def unavailable(session: Any, dialect: str, rows: list[dict[str, Any]]) -> Any:
        if outage.is_set():
            raise OperationalError("INSERT INTO records", {}, Exception("database is locked"))
        return real(session, dialect, rows)

    monkeypatch.setattr(ingest_module, "_insert_records", unavailable)
    device = f"d{uuid.uuid4().hex[:8]}"
    service = Ingest(_config(broker, sqlite_url, fleet))
    service.start()
    try:
        assert service.wait_ready(TIMEOUT)
        _burst(publisher, f"edgefl/{fleet}/{device}/data/s", [envelope(device, s) for s in (1, 2)])
        wait_for(lambda: service.metrics()["db_retries"] >= 2, TIMEOUT, "retries")
        progress = service.progress()
        assert progress.pending == 2
        assert progress.waiting_for_database
        assert service.metrics()["acked"] == 0  # nothing acknowledged, nothing dead-lettered
        outage.clear()
        wait_for(lambda: service.metrics()["acked"] == 2, TIMEOUT, "2 acknowledged")
        assert service.metrics()["stored"] == 2
        assert service.metrics()["dead_lettered"] == 0
        assert service.progress() == ingest_module.IngestProgress(0, 0.0, False, True)
    finally:
        outage.clear()
        service.stop()


@pytest.mark.slow
def test_watchdog_restarts_an_ingest_that_stops_acknowledging(
    broker: Mosquitto,
    publisher: Publisher,
    sqlite_url: str,
    fleet: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = Server(
        ServerConfig(
            state_dir=tmp_path / "server",
            ingest=ServerIngestConfig(
                broker=BrokerAddress(host=broker.host, port=broker.port),
                client_id=f"ingest-{fleet}",
                db_url=sqlite_url,
                migrate=True,
                fleet=fleet,
                tls=TlsFiles(ca_file=None),
                stall_timeout_s=1.0,
            ),
        )
    )
    hang = threading.Event()
    real = Ingest._write

    def hung(self: Ingest, plans: Any) -> None:
        # Fault injection: the first ingest's worker hangs in its database call (as a
        # hung connection or a bug would); a new one must not.
        if self is stalled:
            hang.wait(60)
        real(self, plans)

    monkeypatch.setattr(Ingest, "_write", hung)
    stalled = Ingest(server._ingest_config())
    server.ingest = stalled
    stalled.start()
    device = f"d{uuid.uuid4().hex[:8]}"
    try:
        assert stalled.wait_ready(TIMEOUT)
        publisher.publish(f"edgefl/{fleet}/{device}/data/s", envelope(device, 1))
        wait_for(lambda: stalled.progress().stalled_s > 1.0, TIMEOUT, "a stall")
        server._check_ingest(time.monotonic())
        assert server.ingest is not stalled
        assert server.ingest_restarts == 1  # what server.json reports as ingest_restarts
        replacement = server.ingest
        assert replacement.wait_ready(TIMEOUT)
        # The broker redelivers what the stalled one never acknowledged.
        wait_for(lambda: replacement.metrics()["stored"] == 1, TIMEOUT, "the record stored")
        server._check_ingest(time.monotonic())  # healthy: no second restart
        assert server.ingest_restarts == 1
    finally:
        hang.set()
        if server.ingest is not None:
            server.ingest.stop()
    engine = make_engine(sqlite_url)
    try:
        assert stored_seqs(engine, device) == [1]
    finally:
        engine.dispose()


@pytest.mark.slow
def test_oversized_payload_through_a_broker_without_a_limit(tmp_path: Path) -> None:
    """An external broker that does not enforce ``message_size_limit``: the ingest still
    refuses a 10 MB payload (dead letter, original size kept), and honest records around it
    are stored."""
    db_url = f"sqlite:///{tmp_path / 'registry.db'}"
    with Mosquitto(tmp_path, extra_lines=["max_queued_messages 100000"]) as broker:
        ingest = Ingest(
            IngestConfig(
                broker=BrokerAddress(host=broker.host, port=broker.port),
                client_id="ingest-oversized",
                db_url=db_url,
            )
        )
        ingest.start()
        device = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="dev-big", protocol=mqtt.MQTTv5)
        try:
            assert ingest.wait_ready(30)
            device.connect(broker.host, broker.port)
            device.loop_start()
            topic = "edgefl/f1/dev-big/data/s"
            infos = [device.publish(topic, envelope("dev-big", 1), qos=1)]
            infos.append(device.publish(topic, b"{" + b" " * (10 * 1024 * 1024) + b"}", qos=1))
            infos.append(device.publish(topic, envelope("dev-big", 2), qos=1))
            for info in infos:
                info.wait_for_publish(30)
            wait_for(lambda: ingest.metrics()["acked"] == 3, 30, "3 acknowledged")
            assert ingest.metrics()["dead_lettered.oversized"] == 1
        finally:
            device.disconnect()
            device.loop_stop()
            ingest.stop()
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            seqs = sorted(conn.scalars(sa.select(Record.seq)))
            letters = Counter(conn.scalars(sa.select(DeadLetter.reason)))
            size = conn.scalar(sa.select(DeadLetter.payload_size))
    finally:
        engine.dispose()
    assert seqs == [1, 2]
    assert letters == {"oversized": 1}
    assert size == 10 * 1024 * 1024 + 2
