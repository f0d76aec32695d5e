"""An oversized record must not block a device's outbox.

mosquitto 2.0 answers a QoS 1 PUBLISH over its ``message_size_limit`` with PUBACK reason
0x95, which MQTT 5 does not allow in a PUBACK: paho 2.2 cannot parse it, drops the
connection and sends the message again on every reconnect. Before this fix the outbox took
a record of any size, so one record over the wire contract's ``MAX_ENVELOPE_BYTES`` made an
honest agent reconnect forever, and nothing behind it was ever sent.

Here a real agent (its outbox, sender and MQTT link) runs against mosquitto on the shipped
configuration. Its outbox already holds one oversized record, written by an older version
between honest ones, and a source produces another oversized record between honest ones.
Every honest record must arrive, once; the oversized ones are refused or set aside and
counted; the link connects once and never again.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from probes.broker import BrokerLab, broker_lab

from edgefl.edge_agent.daemon import OUTBOX_FILE, Agent, AgentConfig
from edgefl.edge_agent.outbox import Outbox, OutboxPolicy, RecordTooLargeError
from edgefl.edge_agent.sources import SourceRecord
from edgefl.proto.serde import ENVELOPE_VERSION, MAX_ENVELOPE_BYTES, Envelope, encode_envelope
from edgefl.testing import mosquitto_executable, wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(mosquitto_executable() is None, reason="mosquitto is not installed"),
]

TIMEOUT = 30.0
DEVICE = "dev-a"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerLab]:
    with broker_lab(tmp_path_factory.mktemp("oversized-lab")) as running:
        yield running


def _agent_config(lab: BrokerLab, state_dir: Path) -> AgentConfig:
    cert = lab.certs[DEVICE]
    return AgentConfig.model_validate(
        {
            "device_id": DEVICE,
            "fleet": lab.fleet,
            "state_dir": str(state_dir),
            "mqtt": {
                "host": "127.0.0.1",
                "port": lab.broker.port,
                "protocol": "5",
                "tls": {
                    "ca_file": str(lab.ca.cert_path),
                    "cert_file": str(cert.cert_path),
                    "key_file": str(cert.key_path),
                },
            },
        }
    )


def _envelope(outbox: Outbox, seq: int, body: bytes) -> bytes:
    env = Envelope(
        version=ENVELOPE_VERSION,
        device_id=DEVICE,
        incarnation=outbox.incarnation,
        seq=seq,
        ts_ms=int(time.time() * 1000),
        kind="data",
        content_type="application/octet-stream",
        body=body,
    )
    return encode_envelope(env, "json")


def _record(i: int, size: int = 16) -> SourceRecord:
    return SourceRecord(
        stream="s",
        kind="data",
        content_type="application/octet-stream",
        body=b"%08d" % i * (size // 8),
    )


def test_oversized_records_are_refused_and_set_aside_honest_ones_all_arrive(
    lab: BrokerLab, tmp_path: Path
) -> None:
    lab.close_clients()
    topic = lab.topic(DEVICE, "data/s")
    # An outbox written by an older version: honest, one over the limit, honest.
    path = tmp_path / OUTBOX_FILE
    with Outbox(path, DEVICE, OutboxPolicy()) as old:
        for _i in range(5):
            old.put(topic, lambda seq: _envelope(old, seq, b"old-%d" % seq))
        big = _envelope(old, old.stats().next_seq, b"x" * MAX_ENVELOPE_BYTES)
    assert len(big) > MAX_ENVELOPE_BYTES
    with sqlite3.connect(path) as db:  # what the older version's put() did: no size check
        db.execute(
            "INSERT INTO records (seq, topic, payload, priority, kind, created_at, expires_at) "
            "VALUES ((SELECT next_seq FROM counters), ?, ?, 0, 'data', ?, NULL)",
            (topic, big, time.time()),
        )
    with Outbox(path, DEVICE, OutboxPolicy()) as old:
        for _i in range(5):
            old.put(topic, lambda seq: _envelope(old, seq, b"old-%d" % seq))
        assert old.stats().depth == 11

    watcher = lab.client("op").connect()
    watcher.subscribe(lab.topic(DEVICE, "data/#"))
    agent = Agent(_agent_config(lab, tmp_path))
    stop = threading.Event()
    runner = threading.Thread(target=agent.run, args=(stop,), daemon=True)
    runner.start()
    try:
        assert agent.link.wait_connected(TIMEOUT)
        # A source's batch with one record whose envelope is over the limit: the others
        # are kept, the big one refused and counted.
        honest = [_record(i) for i in range(10)]
        batch = [*honest[:5], _record(99, size=MAX_ENVELOPE_BYTES), *honest[5:]]
        stored = agent.submit(batch)
        assert len(stored) == 10
        assert (agent.rejected, agent.oversized) == (1, 1)
        with pytest.raises(RecordTooLargeError):
            agent.outbox.put(topic, b"y" * (MAX_ENVELOPE_BYTES + 1))

        def arrived() -> int:
            return len(list(watcher.messages.queue))

        wait_for(lambda: arrived() >= 20, TIMEOUT, "20 honest records at the subscriber")
        wait_for(lambda: agent.outbox.stats().depth == 0, TIMEOUT, "an empty outbox")
        time.sleep(0.5)  # anything still in flight shows up now
        got = list(watcher.messages.queue)
        sizes = sorted(len(p) for _, p, _ in got)
        assert len(got) == 20, sizes
        assert max(sizes) < 1024
        bodies = {json.loads(p)["seq"] for _, p, _ in got}
        assert len(bodies) == 20  # each once
        stats = agent.outbox.stats()
        assert (stats.oversized_refused, stats.oversized_set_aside) == (2, 1)
        # One connection for the whole run: no drop on a 0x95 PUBACK, no reconnect loop.
        assert agent.link.generation == 1
        assert agent.sender.failed == 0
        status = agent.status(running=True)["outbox"]
        assert (status["oversized_refused"], status["oversized_set_aside"]) == (2, 1)
    finally:
        stop.set()
        runner.join(TIMEOUT)
        watcher.close()


def test_agent_config_allows_a_lower_limit_not_a_higher_one(tmp_path: Path) -> None:
    low = OutboxPolicy(max_record_bytes=1000)
    with Outbox(tmp_path / "o.db", DEVICE, low) as outbox:
        outbox.put("edgefl/f/dev-a/data/s", b"z" * 1000)
        with pytest.raises(RecordTooLargeError, match="1001 bytes"):
            outbox.put_many([("edgefl/f/dev-a/data/s", b"z" * 1001)])
        assert outbox.stats().depth == 1
        assert outbox.stats().oversized_refused == 1
    with pytest.raises(ValueError, match="max_record_bytes"):
        OutboxPolicy(max_record_bytes=MAX_ENVELOPE_BYTES + 1)
