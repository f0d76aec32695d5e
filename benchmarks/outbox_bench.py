"""Outbox, MQTT link and ingest benchmark (issue 3): throughput, chaos and a 500-device fleet.

Run from the repository root with the venv active::

    python benchmarks/outbox_bench.py --json

Everything talks to processes this script starts on 127.0.0.1 only: its own mosquitto
(free port, killed by PID at the end), a PostgreSQL at 127.0.0.1:5432 (a schema of its
own, dropped afterwards) and child processes of this same file (``--child ...``) for the
agents that get killed. Progress goes to stderr; the result to stdout.

Sections (one run, same machine, same broker build):

* ``raw_paho_qos1_msgs_per_s``: one paho client publishes N payloads of ~200 B with QoS 1
  and ``max_inflight`` 50; time until every PUBACK arrived. The broker announces a Receive
  Maximum of 100 (``max_inflight_messages 100``), which both fit in. The outbox link has
  the same ``max_inflight``, kept by its sender rather than by paho (see
  ``MqttLink._build_client``), so both put the same number of messages on the wire at once.
* ``outbox_end_to_end_msgs_per_s``: the same N payloads, committed by a producer thread
  the way the agent daemon commits them: one :meth:`Outbox.put_many` (one transaction) per
  tick, with as many records per call as a 10 ms tick at the raw rate brings
  (``e2e_tick_batch``), while :class:`OutboxSender` publishes them
  (``flush_rate_per_s=None``, same ``max_inflight``, same broker, QoS 1); time from the first
  commit until every record was PUBACKed *and* deleted from the outbox. ``ratios`` divides
  it by the raw figure.
* ``outbox_end_to_end_put_per_record_msgs_per_s``: the same, but one :meth:`Outbox.put`
  (one commit) per record, as a device producing a record at a time does; reported with
  its ratio, it is not the target figure.
* These three are measured ``--rounds`` times (default 3), interleaved, and the medians
  are reported; ``throughput_rounds`` lists every round with its ratios (the spread).
  ``--only throughput`` runs just them.
* ``enqueue_per_s``: durable enqueue only (no broker), ``synchronous=NORMAL``, WAL: one
  commit per record, and :meth:`Outbox.put_many` in batches of 500.
* ``backlog_flush_msgs_per_s``: 50k records stored first; time to drain after the sender
  starts (link already connected).
* ``ingest_msgs_per_s``: :class:`Ingest` into SQLite and PostgreSQL, from the first publish
  to the last row stored; 10k envelopes of 20 devices, published by a child process (one
  paho client, QoS 1, ``max_inflight`` 200) so that it does not share the ingest's GIL.
* ``chaos``: ~300 msg/s for ~6 s; the broker is ``kill -9``-ed for ~3 s mid-stream and
  restarted on the same port (with persistence, so the ingest's session survives); the
  agents that crash are ``kill -9``-ed while the broker is down and restarted. ``lost``
  counts sequence numbers the agent generated that never reached the registry;
  ``duplicate_rows`` counts extra rows for a ``(device_id, seq)``; ``wire_duplicates`` is
  what the ingest received twice and deduplicated.
* ``fleet_500``: 500 paho clients in one child process (one selector-driven thread, paho's
  external-loop API), each publishing 2 envelopes/s for 10 s into the ingest (SQLite);
  lag = row ``received_at`` minus the envelope's ``ts_ms``.
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import json
import os
import random
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import sqlalchemy as sa
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from sqlalchemy.orm import Session

from edgefl.edge_agent.mqtt_link import MqttLink, MqttLinkConfig, OutboxSender
from edgefl.edge_agent.outbox import Outbox, OutboxItem, OutboxPolicy
from edgefl.process import ManagedProcess, ProcessNotReadyError
from edgefl.proto.serde import ENVELOPE_VERSION, Envelope, encode_envelope
from edgefl.proto.topics import record_topic, status_topic
from edgefl.server.ingest import BrokerAddress, Ingest, IngestConfig
from edgefl.server.registry.models import Record
from edgefl.testing import Mosquitto

HOST = "127.0.0.1"
# mosquitto silently drops past max_queued_messages (1000 by default) for offline sessions.
# The broker's Receive Maximum for publishers; both clients' max_inflight fits in it.
BROKER_RECEIVE_MAXIMUM = 100
BROKER_LINES = [
    "max_queued_messages 1000000",
    f"max_inflight_messages {BROKER_RECEIVE_MAXIMUM}",
]
PG_ADMIN_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
MAX_INFLIGHT = 50
# The agent daemon's loop: every tick it commits the records due in one put_many.
DAEMON_TICK_S = 0.01
BODY = bytes(range(140))  # an envelope of ~200 B on the wire
THIS = Path(__file__).resolve()
_T0 = time.monotonic()


def log(message: str) -> None:
    print(f"[outbox-bench +{time.monotonic() - _T0:6.1f}s] {message}", file=sys.stderr, flush=True)


def envelope(device: str, seq: int, body: bytes = BODY, incarnation: str = "") -> bytes:
    """A telemetry envelope; version 2 with an outbox's ``incarnation``, else version 1."""
    env = Envelope(
        ENVELOPE_VERSION if incarnation else 1,
        device,
        seq,
        int(time.time() * 1000),
        "telemetry",
        "application/octet-stream",
        body,
        incarnation,
    )
    return encode_envelope(env, "protobuf")


def wait_until(condition: Callable[[], bool], timeout: float, poll: float = 0.005) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(poll)
    return True


def uid() -> str:
    return uuid.uuid4().hex[:8]


class PahoCounter:
    """A plain paho client (MQTT 5, callback API v2) that counts PUBACKs and CONNACKs."""

    def __init__(self, port: int, client_id: str, max_inflight: int = MAX_INFLIGHT) -> None:
        self.acked = 0
        self.connected = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5
        )
        self.client.max_inflight_messages_set(max_inflight)
        self.client.max_queued_messages_set(0)
        self.client.on_publish = self._on_publish
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.port = port

    def _on_publish(self, _c: Any, _u: Any, _mid: int, _rc: Any, _p: Any) -> None:
        self.acked += 1  # runs on paho's thread only: no lock needed for a counter

    def _on_connect(self, _c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        if not rc.is_failure:
            self.connected.set()

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, _rc: Any, _p: Any) -> None:
        self.connected.clear()

    def start(self, timeout: float = 10.0) -> None:
        self.client.connect_async(HOST, self.port)
        self.client.loop_start()
        if not self.connected.wait(timeout):
            raise TimeoutError(f"paho client could not connect to port {self.port}")

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# -- throughput ----------------------------------------------------------------------------


def bench_raw_paho(port: int, payloads: list[bytes]) -> float:
    client = PahoCounter(port, f"raw-{uid()}")
    client.start()
    topic = record_topic("bench", f"raw-{uid()}", "data", "x")
    t0 = time.perf_counter()
    for payload in payloads:
        client.client.publish(topic, payload, qos=1)
    if not wait_until(lambda: client.acked >= len(payloads), 120):
        raise TimeoutError("raw paho: PUBACKs missing")
    elapsed = time.perf_counter() - t0
    client.stop()
    return len(payloads) / elapsed


@contextlib.contextmanager
def running_sender(
    port: int, outbox: Outbox, device: str, start_sender: bool = True
) -> Iterator[tuple[MqttLink, OutboxSender]]:
    config = MqttLinkConfig(
        host=HOST, port=port, client_id=device, flush_rate_per_s=None, max_inflight=MAX_INFLIGHT
    )
    link = MqttLink(config, status_topic=status_topic("bench", device))
    link.start()
    if not link.wait_connected(10):
        raise TimeoutError("outbox link could not connect")
    sender = OutboxSender(outbox, link)
    if start_sender:
        sender.start()
    try:
        yield link, sender
    finally:
        sender.stop(drain_timeout_s=2.0)
        link.close()


def bench_outbox_e2e(port: int, workdir: Path, payloads: list[bytes], batch: int) -> float:
    """Records committed ``batch`` per transaction (one put per record if 1) while sent."""
    device = f"e2e-{uid()}"
    topic = record_topic("bench", device, "data", "x")
    with (
        Outbox(workdir / f"{device}.db", device, OutboxPolicy()) as outbox,
        running_sender(port, outbox, device) as (_link, sender),
    ):
        t0 = time.perf_counter()
        if batch <= 1:
            for i, payload in enumerate(payloads):
                outbox.put(topic, payload)
                if i % 20 == 0:
                    sender.wake()
        else:
            for start in range(0, len(payloads), batch):
                outbox.put_many([(topic, p) for p in payloads[start : start + batch]])
                sender.wake()
        if not wait_until(lambda: sender.acked >= len(payloads), 120):
            raise TimeoutError(f"outbox e2e: only {sender.acked} of {len(payloads)} acked")
        elapsed = time.perf_counter() - t0
    return len(payloads) / elapsed


def bench_enqueue(workdir: Path, single_n: int, batched_n: int, batch: int) -> dict[str, float]:
    payload = envelope("enq", 1)
    with Outbox(workdir / "enqueue-single.db", "enq", OutboxPolicy()) as outbox:
        topic = record_topic("bench", "enq", "data", "x")
        t0 = time.perf_counter()
        for _ in range(single_n):
            outbox.put(topic, payload)
        single = single_n / (time.perf_counter() - t0)
    with Outbox(workdir / "enqueue-batched.db", "enq", OutboxPolicy()) as outbox:
        items = [OutboxItem(record_topic("bench", "enq", "data", "x"), payload)] * batch
        t0 = time.perf_counter()
        for _ in range(batched_n // batch):
            outbox.put_many(items)
        batched = (batched_n // batch) * batch / (time.perf_counter() - t0)
    return {"single": single, "batched": batched}


def bench_backlog(port: int, workdir: Path, n: int) -> float:
    device = f"backlog-{uid()}"
    topic = record_topic("bench", device, "data", "x")
    with Outbox(workdir / f"{device}.db", device, OutboxPolicy()) as outbox:
        for start in range(0, n, 1000):
            outbox.put_many(
                [
                    (topic, lambda seq: envelope(device, seq, incarnation=outbox.incarnation))
                    for _ in range(min(1000, n - start))
                ]
            )
        with running_sender(port, outbox, device, start_sender=False) as (_link, sender):
            t0 = time.perf_counter()
            sender.start()
            if not wait_until(lambda: sender.acked >= n, 180, poll=0.02):
                raise TimeoutError(f"backlog: only {sender.acked} of {n} acked")
            elapsed = time.perf_counter() - t0
        assert outbox.stats().depth == 0
    return n / elapsed


# -- ingest ----------------------------------------------------------------------------------


@contextlib.contextmanager
def pg_schema_url() -> Iterator[str]:
    schema = f"bench_{uid()}"
    admin = sa.create_engine(PG_ADMIN_URL, connect_args={"connect_timeout": 3})
    try:
        with admin.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
        yield f"{PG_ADMIN_URL}?options=-csearch_path%3D{schema}"
    finally:
        with contextlib.suppress(sa.exc.SQLAlchemyError), admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


def start_ingest(port: int, db_url: str, fleet: str) -> Ingest:
    ingest = Ingest(
        IngestConfig(
            broker=BrokerAddress(port=port),
            client_id=f"ingest-{uid()}",
            db_url=db_url,
            fleet=fleet,
        )
    )
    ingest.start()
    if not ingest.wait_ready(15):
        ingest.stop()
        raise TimeoutError("ingest did not subscribe")
    return ingest


def bench_ingest(port: int, db_url: str, n: int, log: Path, devices: int = 20) -> float:
    """Rows stored per second by an :class:`Ingest` in this process, fed by a child process.

    The publisher is a child process (``--child publish``, its output in ``log``), as
    devices are in production: a paho client in this interpreter would take the GIL the
    ingest's own threads need. The clock starts when the child, connected and holding its
    payloads, is told to go (SIGUSR1).
    """
    fleet = f"ing{uid()}"
    ingest = start_ingest(port, db_url, fleet)
    publisher = ManagedProcess(
        [
            *(sys.executable, str(THIS), "--child", "publish", "--port", str(port)),
            *("--fleet", fleet, "--devices", str(devices), "--n", str(n)),
        ],
        log,
        name="ingest publisher",
    )
    try:
        publisher.start()
        try:
            publisher.wait_for_log(r"(?m)^READY$", 120)
        except ProcessNotReadyError as exc:
            raise RuntimeError(f"ingest publisher child did not get ready: {exc}") from None
        t0 = time.perf_counter()
        publisher.send_signal(signal.SIGUSR1)  # go
        if not wait_until(lambda: ingest.metrics()["stored"] >= n, 120, poll=0.01):
            raise TimeoutError(f"ingest stored {ingest.metrics()['stored']} of {n}")
        elapsed = time.perf_counter() - t0
        publisher.send_signal(signal.SIGUSR1)  # done: it disconnects and exits
        publisher.wait(30)
    finally:
        publisher.kill()  # if it still runs
        ingest.stop()
    return n / elapsed


# -- chaos -----------------------------------------------------------------------------------


class Child:
    """A child agent process of this file; its log lists the seqs it generated."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.proc = ManagedProcess([sys.executable, str(THIS), "--child", *args], log)
        self.proc.start()

    def wait_ready(self, timeout: float) -> bool:
        """Whether it printed READY within ``timeout`` seconds (if not, it is gone)."""
        try:
            self.proc.wait_for_log(r"(?m)^READY$", timeout)
        except ProcessNotReadyError:
            self.proc.kill()
            return False
        return True

    @property
    def seqs(self) -> set[int]:
        """The seqs it printed so far (one a line)."""
        lines = self.proc.output(max_bytes=1 << 30).splitlines()
        return {int(line) for line in lines if line.strip().isdigit()}

    def kill(self) -> None:
        self.proc.kill()

    def wait(self, timeout: float) -> None:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log(f"child {self.proc.pid} did not finish in {timeout:.0f} s; killing it")
            self.proc.kill()


def count_rows(db_url: str, device: str) -> tuple[set[int], int]:
    engine = sa.create_engine(db_url)
    try:
        with Session(engine) as session:
            seqs = [
                s
                for (s,) in session.execute(sa.select(Record.seq).where(Record.device_id == device))
            ]
    finally:
        engine.dispose()
    return set(seqs), len(seqs)


def chaos_run(workdir: Path, mode: str, rate: float, duration: float) -> dict[str, int]:
    """One broker-kill run; mode is naive_qos0, naive_qos1_agent_crash or outbox."""
    root = workdir / f"chaos-{mode}"
    broker = Mosquitto(root, BROKER_LINES, persistence=True)
    broker.start()
    fleet = f"chaos{uid()}"
    device = f"{mode.replace('_', '-')}-{uid()}"
    db_url = f"sqlite:///{root / 'registry.db'}"
    ingest = start_ingest(broker.port, db_url, fleet)
    time.sleep(1.3)  # let mosquitto autosave the ingest's session before it is killed
    common = ["--port", str(broker.port), "--fleet", fleet, "--device", device, "--rate", str(rate)]
    outbox_path = root / "agent-outbox.db"

    def spawn(seconds: float, start_seq: int) -> Child:
        if mode == "outbox":
            extra = ["--outbox", str(outbox_path)]
        else:
            extra = ["--qos", "0" if mode == "naive_qos0" else "1", "--start-seq", str(start_seq)]
        kind = "outbox" if mode == "outbox" else "naive"
        return Child(
            [kind, *common, *extra, "--duration", f"{seconds:.2f}"],
            root / f"agent-from-{start_seq}.log",
        )

    sent: set[int] = set()
    child = spawn(duration, 1)
    # The schedule starts when the agent is connected and producing (imports take a while).
    if not child.wait_ready(20):
        raise TimeoutError(f"chaos {mode}: agent did not connect")
    t0 = time.monotonic()
    try:
        time.sleep(1.5)
        broker.kill()
        log(f"chaos {mode}: broker killed (kill -9)")
        if mode != "naive_qos0":
            time.sleep(0.7)
            child.kill()
            sent |= child.seqs
            log(f"chaos {mode}: agent killed (kill -9) after {len(sent)} seqs")
            time.sleep(0.3)
            remaining = max(0.5, duration - (time.monotonic() - t0))
            child = spawn(remaining, max(sent, default=0) + 1)
        time.sleep(max(0.0, 4.5 - (time.monotonic() - t0)))
        broker.start()
        log(f"chaos {mode}: broker restarted on port {broker.port}")
        child.wait(60)
        sent |= child.seqs

        # The agent exits once the broker acked what it will ever ack; give the ingest
        # until its counters stop moving for 2 s (15 s at most).
        last = (-1, -1)
        stable_since = time.monotonic()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            m = ingest.metrics()
            now_counts = (m["stored"], m["duplicates"])
            if now_counts != last:
                last, stable_since = now_counts, time.monotonic()
            elif m["stored"] >= len(sent) or time.monotonic() - stable_since > 2.0:
                break
            time.sleep(0.1)
        time.sleep(0.3)  # late wire duplicates, if any
        wire_duplicates = ingest.metrics()["duplicates"]
    finally:
        with contextlib.suppress(Exception):
            child.kill()
        ingest.stop()
        broker.kill()
    stored, rows = count_rows(db_url, device)
    result = {
        "sent": len(sent),
        "lost": len(sent - stored),
        "duplicate_rows": rows - len(stored),
        "wire_duplicates": wire_duplicates,
    }
    log(f"chaos {mode}: {result}")
    return result


# -- fleet -----------------------------------------------------------------------------------


def bench_fleet(
    port: int, workdir: Path, devices: int, rate: float, seconds: float
) -> dict[str, Any]:
    fleet = f"fleet{uid()}"
    db_url = f"sqlite:///{workdir / 'fleet-registry.db'}"
    ingest = start_ingest(port, db_url, fleet)
    try:
        proc = subprocess.run(
            [
                sys.executable,
                str(THIS),
                "--child",
                "fleet",
                "--port",
                str(port),
                "--fleet",
                fleet,
                "--devices",
                str(devices),
                "--rate",
                str(rate),
                "--duration",
                str(seconds),
            ],
            capture_output=True,
            text=True,
            timeout=180,
            check=True,
        )
        summary = json.loads(proc.stdout.strip().splitlines()[-1])
        published = int(summary["published"])
        wait_until(lambda: ingest.metrics()["stored"] >= published, 30, poll=0.05)
    finally:
        ingest.stop()
    engine = sa.create_engine(db_url)
    try:
        with Session(engine) as session:
            rows = session.execute(
                sa.select(Record.device_id, Record.ts_ms, Record.received_at)
            ).all()
    finally:
        engine.dispose()
    lags = []
    for _device, ts_ms, received_at in rows:
        at = received_at if received_at.tzinfo else received_at.replace(tzinfo=UTC)
        lags.append(at.timestamp() - ts_ms / 1000)
    lags.sort()
    return {
        "devices": len({r[0] for r in rows}),
        "connected": int(summary["connected"]),
        "published": published,
        "stored": len(rows),
        "max_ingest_lag_s": lags[-1] if lags else float("nan"),
        "p50_ingest_lag_s": lags[len(lags) // 2] if lags else float("nan"),
        "p99_ingest_lag_s": lags[int(len(lags) * 0.99)] if lags else float("nan"),
        "connect_s": float(summary["connect_s"]),
    }


# -- children --------------------------------------------------------------------------------


def child_naive(args: argparse.Namespace) -> None:
    client = PahoCounter(args.port, args.device)
    client.client.reconnect_delay_set(1, 4)
    client.client.connect_async(HOST, args.port)
    client.client.loop_start()
    client.connected.wait(5)
    print("READY", flush=True)
    topic = record_topic(args.fleet, args.device, "telemetry", "x")
    expected = 0
    seq = args.start_seq
    t0 = time.monotonic()
    for i in range(int(args.rate * args.duration)):
        time.sleep(max(0.0, t0 + i / args.rate - time.monotonic()))
        # Printed before the publish: once it is generated, the agent owns it.
        print(seq, flush=True)
        info = client.client.publish(topic, envelope(args.device, seq), qos=args.qos)
        if args.qos == 1 or info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
            expected += 1
        seq += 1
    wait_until(lambda: client.acked >= expected, 30, poll=0.05)
    client.stop()


def child_outbox(args: argparse.Namespace) -> None:
    outbox = Outbox(Path(args.outbox), args.device, OutboxPolicy())
    incarnation = outbox.incarnation
    config = MqttLinkConfig(host=HOST, port=args.port, client_id=args.device, reconnect_max_s=4.0)
    link = MqttLink(config, status_topic=status_topic(args.fleet, args.device))
    link.start()
    sender = OutboxSender(outbox, link)
    sender.start()
    link.wait_connected(5)
    print("READY", flush=True)
    topic = record_topic(args.fleet, args.device, "telemetry", "x")
    t0 = time.monotonic()
    for i in range(int(args.rate * args.duration)):
        time.sleep(max(0.0, t0 + i / args.rate - time.monotonic()))
        record = outbox.put(topic, lambda seq: envelope(args.device, seq, incarnation=incarnation))
        print(record.seq, flush=True)  # committed: the outbox owns it now
        sender.wake()
    wait_until(lambda: outbox.stats().depth == 0, 40, poll=0.05)
    sender.stop(2.0)
    link.close()
    outbox.close()


def child_publish(args: argparse.Namespace) -> None:
    """Publish ``--n`` envelopes of ``--devices`` devices (QoS 1) once SIGUSR1 says go."""
    # Blocked before paho's thread starts (it inherits the mask), so sigwait() takes it.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    names = [f"d{i:02d}" for i in range(args.devices)]
    payloads = [
        (
            record_topic(args.fleet, names[i % args.devices], "telemetry", "x"),
            envelope(names[i % args.devices], i + 1),
        )
        for i in range(args.n)
    ]
    publisher = PahoCounter(args.port, f"pub-{uid()}", max_inflight=200)
    publisher.start()
    print("READY", flush=True)
    signal.sigwait({signal.SIGUSR1})
    for topic, payload in payloads:
        publisher.client.publish(topic, payload, qos=1)
    wait_until(lambda: publisher.acked >= len(payloads), 120, poll=0.01)
    signal.sigwait({signal.SIGUSR1})  # the parent's word that the ingest stored everything
    publisher.stop()


def child_fleet(args: argparse.Namespace) -> None:
    """Many paho clients on one thread with paho's external-loop API and a selector."""
    t_connect = time.monotonic()
    clients: list[mqtt.Client] = []
    sel = selectors.DefaultSelector()
    names = [f"dev{i:04d}" for i in range(args.devices)]
    for name in names:
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"{args.fleet}-{name}",
            protocol=MQTTProtocolVersion.MQTTv311,
        )
        c.max_inflight_messages_set(MAX_INFLIGHT)
        c.connect(HOST, args.port, keepalive=60)
        sock = c.socket()
        assert sock is not None
        sel.register(sock, selectors.EVENT_READ, c)
        clients.append(c)

    def pump(timeout: float) -> None:
        for key, _ in sel.select(timeout):
            client: mqtt.Client = key.data
            client.loop_read()
        for c in clients:
            if c.want_write():
                c.loop_write()

    deadline = time.monotonic() + 30
    while not all(c.is_connected() for c in clients) and time.monotonic() < deadline:
        pump(0.05)
    connected = sum(c.is_connected() for c in clients)
    connect_s = time.monotonic() - t_connect
    period = 1.0 / args.rate
    start = time.monotonic()
    end = start + args.duration
    due = [(start + random.random() * period, i) for i in range(len(clients))]
    heapq.heapify(due)
    seqs = [0] * len(clients)
    published = 0
    last_misc = start
    while True:
        now = time.monotonic()
        while due and due[0][0] <= now:
            when, i = heapq.heappop(due)
            if when >= end:
                continue
            seqs[i] += 1
            topic = record_topic(args.fleet, names[i], "telemetry", "x")
            info = clients[i].publish(topic, envelope(names[i], seqs[i]), qos=1)
            if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                published += 1
            heapq.heappush(due, (when + period, i))
        if not due and now >= end:
            break
        pump(min(0.01, max(0.0, (due[0][0] - now) if due else 0.01)))
        if now - last_misc > 1.0:
            for c in clients:
                c.loop_misc()
            last_misc = now
    drain = time.monotonic() + 10
    while any(c.want_write() for c in clients) and time.monotonic() < drain:
        pump(0.01)
    pump(0.2)
    for c in clients:
        c.disconnect()
    print(json.dumps({"published": published, "connected": connected, "connect_s": connect_s}))


# -- main ------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="outbox-bench-"))
    try:
        return measure(args, work)
    finally:
        if args.keep:
            log(f"work files kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def measure_throughput(
    args: argparse.Namespace, port: int, work: Path, payloads: list[bytes]
) -> dict[str, Any]:
    """Raw paho vs outbox end to end, interleaved over ``args.rounds`` rounds.

    The machine may be shared: one round's figures can be hit by someone else's burst.
    Each round measures raw, then the outbox (per tick), then the outbox (per record), back
    to back; the reported figures are the medians over the rounds, and ``throughput_rounds``
    keeps every round with its own ratios so the spread can be seen.
    """
    rounds: list[dict[str, float]] = []
    tick_batch = 0
    for i in range(args.rounds):
        log(
            f"round {i + 1}/{args.rounds}: raw paho QoS 1, {args.n} x {len(payloads[0])} B, "
            f"max_inflight {MAX_INFLIGHT}"
        )
        cpu0 = time.process_time()
        raw = bench_raw_paho(port, payloads)
        cpu_raw = time.process_time() - cpu0
        if not tick_batch:
            # The daemon commits what is due every 10 ms tick: at the raw rate, this many.
            tick_batch = max(1, round(raw * DAEMON_TICK_S))
        log(f"round {i + 1}: outbox end to end, put_many({tick_batch}) per tick")
        cpu0 = time.process_time()
        tick = bench_outbox_e2e(port, work, payloads, tick_batch)
        cpu_tick = time.process_time() - cpu0
        log(f"round {i + 1}: outbox end to end, one put (commit) per record")
        per_record = bench_outbox_e2e(port, work, payloads, 1)
        rounds.append(
            {
                "raw": raw,
                "outbox_tick": tick,
                "outbox_per_record": per_record,
                "ratio_tick": tick / raw,
                "ratio_per_record": per_record / raw,
                # CPU seconds of this process (every thread, SQLite included): what each
                # path costs, which other people's load on the machine does not change.
                "cpu_s_raw": cpu_raw,
                "cpu_s_outbox_tick": cpu_tick,
            }
        )
        log(f"round {i + 1}: {rounds[-1]}")
    return {
        "raw_paho_qos1_msgs_per_s": statistics.median(r["raw"] for r in rounds),
        "outbox_end_to_end_msgs_per_s": statistics.median(r["outbox_tick"] for r in rounds),
        "outbox_end_to_end_put_per_record_msgs_per_s": statistics.median(
            r["outbox_per_record"] for r in rounds
        ),
        "e2e_tick_batch": tick_batch,
        "throughput_rounds": rounds,
    }


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    result: dict[str, Any] = {}
    with Mosquitto(work / "broker", BROKER_LINES) as broker:
        port = broker.port
        log(f"mosquitto on {HOST}:{port} (pid {broker.proc.pid if broker.proc else '?'})")
        payloads = [envelope("bench", i + 1) for i in range(args.n)]
        result.update(measure_throughput(args, port, work, payloads))
        per_record = result["outbox_end_to_end_put_per_record_msgs_per_s"]
        tick_batch = result["e2e_tick_batch"]
        if args.only == "throughput":
            raw = result["raw_paho_qos1_msgs_per_s"]
            result["ratios"] = {
                "outbox_end_to_end_vs_raw": result["outbox_end_to_end_msgs_per_s"] / raw,
                "outbox_end_to_end_put_per_record_vs_raw": per_record / raw,
            }
            result["config"] = {"n": args.n, "max_inflight": MAX_INFLIGHT, "rounds": args.rounds}
            return result
        log("enqueue rates")
        result["enqueue_per_s"] = bench_enqueue(work, 10_000, 100_000, 500)
        log(f"backlog flush of {args.backlog}")
        result["backlog_flush_msgs_per_s"] = bench_backlog(port, work, args.backlog)
        log("ingest into SQLite")
        ingest_rates: dict[str, float] = {
            "sqlite": bench_ingest(
                port,
                f"sqlite:///{work / 'ingest-registry.db'}",
                args.ingest_n,
                work / "publisher-sqlite.log",
            )
        }
        log("ingest into PostgreSQL")
        try:
            with pg_schema_url() as url:
                ingest_rates["postgresql"] = bench_ingest(
                    port, url, args.ingest_n, work / "publisher-postgresql.log"
                )
        except sa.exc.OperationalError as exc:
            log(f"PostgreSQL unavailable: {str(exc).splitlines()[0]}")
            ingest_rates["postgresql"] = 0.0
            result["postgresql_error"] = str(exc).splitlines()[0]
        result["ingest_msgs_per_s"] = ingest_rates
        log(f"fleet of {args.devices} devices")
        result["fleet_500"] = bench_fleet(port, work, args.devices, 2.0, args.fleet_s)
    chaos: dict[str, dict[str, int]] = {}
    for mode in ("naive_qos0", "naive_qos1_agent_crash", "outbox"):
        log(f"chaos run: {mode}")
        chaos[mode] = chaos_run(work, mode, 300.0, 6.0)
    result["chaos"] = chaos
    raw = result["raw_paho_qos1_msgs_per_s"]
    result["ratios"] = {
        "outbox_end_to_end_vs_raw": result["outbox_end_to_end_msgs_per_s"] / raw,
        "outbox_end_to_end_put_per_record_vs_raw": per_record / raw,
        "backlog_flush_vs_raw": result["backlog_flush_msgs_per_s"] / raw,
    }
    fleet = result["fleet_500"]
    result["targets_met"] = {
        "outbox_ge_0_8_raw": result["ratios"]["outbox_end_to_end_vs_raw"] >= 0.8,
        "batched_enqueue_ge_10k": result["enqueue_per_s"]["batched"] >= 10_000,
        "sqlite_ingest_ge_3k": ingest_rates["sqlite"] >= 3000,
        # "Keeping up": every device connected, every message stored, lag under 2 s.
        "fleet_500_keeps_up": fleet["devices"] == args.devices
        and fleet["stored"] == fleet["published"]
        and fleet["max_ingest_lag_s"] < 2.0,
        "outbox_chaos_0_lost_0_duplicate_rows": chaos["outbox"]["lost"] == 0
        and chaos["outbox"]["duplicate_rows"] == 0,
    }
    result["config"] = {
        "n": args.n,
        "payload_bytes": len(payloads[0]),
        "max_inflight": MAX_INFLIGHT,
        "broker_receive_maximum": BROKER_RECEIVE_MAXIMUM,
        "e2e_tick_batch": tick_batch,
        "backlog": args.backlog,
        "ingest_n": args.ingest_n,
        "cpus": os.cpu_count(),
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    return result


def table(result: dict[str, Any]) -> str:
    ratios = result["ratios"]
    e2e = result["outbox_end_to_end_msgs_per_s"]
    per_record = result["outbox_end_to_end_put_per_record_msgs_per_s"]
    tick = f"outbox end to end (put_many {result['e2e_tick_batch']}/tick)"
    lines = [
        f"{'raw paho QoS 1':38} {result['raw_paho_qos1_msgs_per_s']:>10.0f} msg/s",
        f"{tick:38} {e2e:>10.0f} msg/s  ({ratios['outbox_end_to_end_vs_raw']:.2f}x raw)",
        f"{'outbox end to end (put per record)':38} {per_record:>10.0f} msg/s"
        f"  ({ratios['outbox_end_to_end_put_per_record_vs_raw']:.2f}x raw)",
        f"{'enqueue, one commit per record':38} {result['enqueue_per_s']['single']:>10.0f} rec/s",
        f"{'enqueue, put_many(500)':38} {result['enqueue_per_s']['batched']:>10.0f} rec/s",
        f"{'backlog flush':38} {result['backlog_flush_msgs_per_s']:>10.0f} msg/s",
        f"{'ingest SQLite':38} {result['ingest_msgs_per_s']['sqlite']:>10.0f} msg/s",
        f"{'ingest PostgreSQL':38} {result['ingest_msgs_per_s']['postgresql']:>10.0f} msg/s",
        f"{'fleet devices / max lag':38} {result['fleet_500']['devices']:>10d} / "
        f"{result['fleet_500']['max_ingest_lag_s']:.3f} s",
        "",
        f"{'chaos (broker kill -9)':28} {'sent':>6} {'lost':>6} {'dup rows':>9} {'wire dups':>10}",
    ]
    for mode, c in result["chaos"].items():
        lines.append(
            f"{mode:28} {c['sent']:>6} {c['lost']:>6} {c['duplicate_rows']:>9} "
            f"{c['wire_duplicates']:>10}"
        )
    lines += ["", "targets: " + ", ".join(f"{k}={v}" for k, v in result["targets_met"].items())]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--n", type=int, default=20_000, help="messages for raw vs outbox")
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved raw/outbox rounds (medians reported)"
    )
    parser.add_argument("--backlog", type=int, default=50_000)
    parser.add_argument("--ingest-n", type=int, default=10_000)
    parser.add_argument("--devices", type=int, default=500)
    parser.add_argument("--fleet-s", type=float, default=10.0)
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument(
        "--only",
        choices=["throughput"],
        help="run only the raw vs outbox end-to-end sections (for iterating)",
    )
    parser.add_argument(
        "--child", choices=["naive", "outbox", "fleet", "publish"], help=argparse.SUPPRESS
    )
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--fleet", help=argparse.SUPPRESS)
    parser.add_argument("--device", help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=float, default=300.0, help=argparse.SUPPRESS)
    parser.add_argument("--duration", type=float, default=6.0, help=argparse.SUPPRESS)
    parser.add_argument("--qos", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--start-seq", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--outbox", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "naive":
        child_naive(args)
    elif args.child == "outbox":
        child_outbox(args)
    elif args.child == "fleet":
        child_fleet(args)
    elif args.child == "publish":
        child_publish(args)
    else:
        result = run(args)
        print(json.dumps(result, indent=2) if args.json or args.only else table(result))


if __name__ == "__main__":
    main()
