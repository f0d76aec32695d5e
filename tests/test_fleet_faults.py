"""Fleet fault tests: real mosquitto, real ``edgefl server ingest``, real ``edgefl agent run``.

Every scenario ends the same way: the replay source reaches its ``limit``, the agent's
outbox drains (``agent status --json`` → ``outbox.depth == 0``), the registry's row count
stops changing, and then the rows are counted exactly:

* rows in ``records`` for the device == records the outbox committed (``next_seq - 1``)
  minus the ones the ``drop_oldest`` policy counted as dropped;
* the stored seqs are exactly ``{1..N}`` (0 lost) or, after drops, a subset of that size;
* no duplicate rows (the UNIQUE ``(device_id, seq)`` key makes that structural; the query
  checks it anyway). Wire duplicates are allowed (the ingest counts them, stores nothing);
* nothing dead-lettered: the registry's ``dead_letters`` table is empty once the ingest
  has stopped (a conflicting duplicate or a refused envelope would land there).

The agent reaches the broker through :class:`tests.netproxy.TcpProxy` where a test needs
to cut it off; the ingest always connects to the broker directly.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import sqlalchemy as sa
import yaml
from paho.mqtt.enums import CallbackAPIVersion
from typer.testing import CliRunner

from edgefl.cli import app
from edgefl.process import ManagedProcess, read_tail
from edgefl.proto.serde import Envelope, encode_envelope
from edgefl.server.registry import DeadLetter, Record, make_engine, upgrade
from edgefl.testing import Mosquitto, wait_for

try:
    from tests.netproxy import TcpProxy
except ImportError:  # plain `pytest` puts only tests/ (not the repository root) on sys.path
    from netproxy import TcpProxy  # type: ignore[import-not-found,no-redef]

pytestmark = pytest.mark.slow

EDGEFL = Path(sys.executable).parent / "edgefl"
DEVICE = "dev-f"
PROBE = "probe"
KEEPALIVE_S = 5
TIMEOUT = 60.0


# -- processes ------------------------------------------------------------------------------


class Proc:
    """A child process (its own process group) with its output in a log file."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self.argv = argv
        self.log = log
        self.proc: ManagedProcess | None = None

    def start(self) -> None:
        assert not self.alive(), "already running"
        self.proc = ManagedProcess(self.argv, self.log)
        self.proc.start()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.running()

    def kill9(self) -> None:
        """SIGKILL (no clean shutdown of any kind) and reap."""
        assert self.proc is not None
        self.proc.kill()
        self.proc = None

    def terminate(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, wait, SIGKILL if needed; return the exit code of a clean exit."""
        if self.proc is None:
            return None
        code = self.proc.stop(timeout)
        self.proc = None
        return None if code == -signal.SIGKILL else code

    def tail(self, chars: int = 3000) -> str:
        return read_tail(self.log)[-chars:]


@dataclass
class Rig:
    """One fleet under test: broker, proxy, registry, ingest and agent (not started)."""

    tmp: Path
    broker: Mosquitto
    proxy: TcpProxy
    db_url: str
    engine: sa.Engine
    fleet: str
    ingest: Proc
    agent: Proc
    agent_config: Path
    limit: int
    probes: int = 0
    notes: dict[str, Any] = field(default_factory=dict)

    # -- agent side -------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """``edgefl agent status --json`` (in-process CLI, same code as the console script)."""
        result = CliRunner().invoke(
            app, ["agent", "status", "--config", str(self.agent_config), "--json"]
        )
        assert result.exit_code == 0, result.output
        report: dict[str, Any] = json.loads(result.stdout)
        return report

    def committed(self) -> int:
        """Records the outbox accepted over its whole life (``next_seq - 1``)."""
        return int(self.status()["outbox"]["next_seq"]) - 1

    def outbox_seqs(self) -> tuple[int, set[int]]:
        """``(next_seq, seqs still stored)`` read in one snapshot of the agent's outbox."""
        path = self.tmp / "state" / "outbox.db"
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
        try:
            db.execute("BEGIN")
            next_seq = int(db.execute("SELECT next_seq FROM counters").fetchone()[0])
            stored = {int(r[0]) for r in db.execute("SELECT seq FROM records")}
            db.execute("COMMIT")
        finally:
            db.close()
        return next_seq, stored

    # -- registry side ----------------------------------------------------------------

    def seqs(self, device: str = DEVICE) -> list[int]:
        with self.engine.connect() as conn:
            return [
                int(s)
                for s in conn.scalars(
                    sa.select(Record.seq).where(Record.device_id == device).order_by(Record.seq)
                )
            ]

    def row_count(self, device: str = DEVICE) -> int:
        with self.engine.connect() as conn:
            count = conn.scalar(
                sa.select(sa.func.count()).select_from(Record).where(Record.device_id == device)
            )
            return int(count or 0)

    def wait_ingest_ready(self, timeout: float = TIMEOUT) -> None:
        """Publish a fresh probe record (own device) until the ingest has stored it.

        Proves the ingest is connected *and subscribed* on the broker as it is now (the
        subscription is what makes the broker route the agent's messages to it).
        """
        self.probes += 1
        seq = self.probes
        payload = encode_envelope(
            Envelope(
                1, PROBE, seq, 1_700_000_000_000 + seq, "telemetry", "application/json", b"{}"
            ),
            "json",
        )
        topic = f"edgefl/{self.fleet}/{PROBE}/telemetry/probe"
        deadline = time.monotonic() + timeout

        def stored() -> bool:
            with self.engine.connect() as conn:
                return bool(
                    conn.scalar(
                        sa.select(sa.func.count())
                        .select_from(Record)
                        .where(Record.device_id == PROBE, Record.seq == seq)
                    )
                )

        while not stored():
            assert self.ingest.alive(), self.ingest.tail()
            assert time.monotonic() < deadline, f"ingest never stored probe {seq}"
            _publish_once(self.broker.port, topic, payload)
            try:
                wait_for(stored, 1.0, f"probe {seq}")
            except TimeoutError:
                continue

    def drain(self, committed: int, timeout: float = 90.0) -> list[int]:
        """Wait for an empty outbox and a registry that stopped changing; return its seqs."""
        wait_for(lambda: self.committed() == committed, timeout, f"{committed} committed")
        wait_for(
            lambda: self.status()["outbox"]["depth"] == 0,
            timeout,
            "agent outbox drained (every record PUBACKed)",
        )
        _wait_stable(self.row_count, quiet_s=1.0, timeout=timeout)
        return self.seqs()

    def duplicate_rows(self) -> int:
        with self.engine.connect() as conn:
            total, distinct = conn.execute(
                sa.select(sa.func.count(), sa.func.count(sa.distinct(Record.seq))).where(
                    Record.device_id == DEVICE
                )
            ).one()
            return int(total) - int(distinct)

    def dead_letters(self) -> list[tuple[str, str]]:
        """``(reason, detail)`` of every message the ingest dead-lettered, from the registry."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(DeadLetter.reason, DeadLetter.detail)).all()
            return [(str(reason), str(detail)) for reason, detail in rows]

    def stop_ingest_cleanly(self) -> None:
        """SIGTERM the ingest, which must exit 0 and leave the registry's dead letters empty."""
        code = self.ingest.terminate()
        assert code == 0, self.ingest.tail()
        assert self.dead_letters() == []

    def start_agent_and_wait_flowing(self, rows: int) -> None:
        self.agent.start()
        wait_for(lambda: self.row_count() >= rows, TIMEOUT, f"first {rows} rows")
        assert self.agent.alive(), self.agent.tail()


def _publish_once(port: int, topic: str, payload: bytes) -> None:
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"probe-{uuid.uuid4().hex[:10]}",
        protocol=mqtt.MQTTv5,
    )
    try:
        client.connect("127.0.0.1", port)
    except OSError:
        return  # broker not up (yet): the caller retries
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1).wait_for_publish(timeout=5)
    except (RuntimeError, ValueError):
        pass
    finally:
        client.disconnect()
        client.loop_stop()


def _wait_stable(value: Callable[[], int], quiet_s: float, timeout: float) -> int:
    """Poll until ``value()`` has not changed for ``quiet_s`` seconds; return it."""
    deadline = time.monotonic() + timeout
    last = value()
    since = time.monotonic()
    while time.monotonic() - since < quiet_s:
        assert time.monotonic() < deadline, f"value never settled (last {last})"
        time.sleep(0.1)
        now = value()
        if now != last:
            last, since = now, time.monotonic()
    return last


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """SQLite in tmp_path by default; ``postgresql`` (indirect param) gets its own schema."""
    kind = getattr(request, "param", "sqlite")
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'registry' / 'edgefl.db'}"
        return
    yield str(request.getfixturevalue("pg_url"))


@pytest.fixture
def proxy(broker: Mosquitto) -> Iterator[TcpProxy]:
    with TcpProxy(broker.port) as relay:
        yield relay


@pytest.fixture
def make_rig(
    tmp_path: Path, broker: Mosquitto, proxy: TcpProxy, db_url: str
) -> Iterator[Callable[..., Rig]]:
    """Build the rig; every process it starts is stopped by PID at teardown."""
    rigs: list[Rig] = []

    def build(
        *,
        rate_hz: float,
        limit: int,
        via_proxy: bool,
        outbox: dict[str, Any] | None = None,
        max_inflight: int | None = None,
    ) -> Rig:
        fleet = f"f{uuid.uuid4().hex[:10]}"
        ingest_config = tmp_path / "server.yaml"
        ingest_config.write_text(
            yaml.safe_dump(
                {
                    "state_dir": str(tmp_path / "server"),
                    "ingest": {
                        "broker": {"host": broker.host},
                        "client_id": f"ingest-{fleet}",
                        "fleet": fleet,
                        "keepalive_s": KEEPALIVE_S,
                        "tls": {"ca_file": None},  # the test broker is plaintext
                    },
                }
            )
        )
        mqtt_cfg: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": proxy.port if via_proxy else broker.port,
            "keepalive_s": KEEPALIVE_S,
            "reconnect_min_s": 0.2,
            "reconnect_max_s": 1.0,
        }
        if max_inflight is not None:
            mqtt_cfg["max_inflight"] = max_inflight
        agent_cfg: dict[str, Any] = {
            "device_id": DEVICE,
            "fleet": fleet,
            "state_dir": str(tmp_path / "state"),
            "mqtt": mqtt_cfg,
            "sources": [{"type": "dataset-replay", "rate_hz": rate_hz, "limit": limit}],
            "status_interval_s": 0.2,
        }
        if outbox is not None:
            agent_cfg["outbox"] = outbox
        agent_config = tmp_path / "agent.yaml"
        agent_config.write_text(yaml.safe_dump(agent_cfg))
        upgrade(db_url)  # so the test can query before the ingest's own migration ran
        rig = Rig(
            tmp=tmp_path,
            broker=broker,
            proxy=proxy,
            db_url=db_url,
            engine=make_engine(db_url),
            fleet=fleet,
            ingest=Proc(
                [
                    str(EDGEFL),
                    "--log-level",
                    "INFO",
                    "server",
                    "ingest",
                    "--config",
                    str(ingest_config),
                    "--broker-port",
                    str(broker.port),
                    "--db-url",
                    db_url,
                ],
                tmp_path / "ingest.log",
            ),
            agent=Proc(
                [str(EDGEFL), "agent", "run", "--config", str(agent_config)],
                tmp_path / "agent.log",
            ),
            agent_config=agent_config,
            limit=limit,
        )
        rigs.append(rig)
        return rig

    try:
        yield build
    finally:
        for rig in rigs:
            rig.agent.terminate()
            rig.ingest.terminate()
            rig.engine.dispose()


def _assert_exactly_once(rig: Rig, seqs: list[int], committed: int) -> None:
    assert len(seqs) == committed, f"{committed - len(set(seqs))} lost"
    assert set(seqs) == set(range(1, committed + 1))
    assert rig.duplicate_rows() == 0
    assert rig.agent.alive(), rig.agent.tail()
    assert rig.agent.terminate() == 0
    rig.stop_ingest_cleanly()


def _report(name: str, **values: Any) -> None:
    print(f"\n[fleet-faults] {name}: " + ", ".join(f"{k}={v}" for k, v in values.items()))


# -- scenarios ------------------------------------------------------------------------------


def test_broker_killed_mid_stream_and_restarted(make_rig: Callable[..., Rig]) -> None:
    """kill -9 the broker mid-stream, restart it on the same port: every record exactly once.

    Why the agent is cut off (through the proxy) around the kill: the outbox deletes a
    record on the broker's PUBACK, and mosquitto PUBACKs as soon as it has routed the
    message into its memory; it has not reached the ingest yet. ``kill -9`` loses that
    memory (the helper runs ``persistence false``; even ``persistence true`` only saves
    every ``autosave_interval``, and the PUBACK can leave before the save), and a
    restarted broker has lost the ingest's persistent session, so messages published
    before the ingest re-subscribes are routed to nobody. Exactly-once across a broker
    ``kill -9`` therefore needs the window "PUBACKed but not yet delivered" to be empty at
    the kill and the ingest to be subscribed before the agent publishes again. The test
    arranges exactly that (what a deployment gets from a broker with synchronous
    persistence or a bridge), and checks what the agent and the ingest do guarantee:

    * the source keeps committing while the broker is gone (0 records refused);
    * the ingest reconnects to the restarted broker and re-subscribes on its own;
    * the agent reconnects (proxy restored = its held TCP connection is reset) and replays
      the backlog and what paho still had in flight, which the broker never PUBACKed;
    * the registry ends with every committed seq exactly once.
    """
    rig = make_rig(rate_hz=300, limit=1800, via_proxy=True)
    rig.ingest.start()
    rig.wait_ingest_ready()
    rig.start_agent_and_wait_flowing(150)

    rig.proxy.cut()

    # Nothing PUBACKed by the broker may be in limbo: wait until the registry holds every
    # record the agent has deleted from its outbox (committed minus still stored).
    def acked_all_stored() -> bool:
        next_seq, stored = rig.outbox_seqs()
        acked = set(range(1, next_seq)) - stored
        return acked <= set(rig.seqs())

    def acked_count() -> int:
        next_seq, stored = rig.outbox_seqs()
        return next_seq - 1 - len(stored)

    _wait_stable(acked_count, quiet_s=0.5, timeout=TIMEOUT)  # no PUBACK gets through
    wait_for(acked_all_stored, TIMEOUT, "every PUBACKed record stored")
    _wait_stable(rig.row_count, quiet_s=0.5, timeout=TIMEOUT)
    wait_for(acked_all_stored, TIMEOUT, "every PUBACKed record stored (settled)")
    rows_at_kill = rig.row_count()

    rig.broker.kill()
    outage_start = time.monotonic()
    time.sleep(2.0)  # the deliberate outage
    rig.broker.start()
    outage_s = time.monotonic() - outage_start
    rig.wait_ingest_ready()  # re-subscribed on the new broker (a fresh session)
    committed_before_restore = rig.committed()
    rig.proxy.restore()

    seqs = rig.drain(rig.limit)
    assert rig.status()["rejected"] == 0
    _assert_exactly_once(rig, seqs, rig.limit)
    _report(
        "broker_kill",
        committed=rig.limit,
        rows=len(seqs),
        rows_at_kill=rows_at_kill,
        committed_at_restore=committed_before_restore,
        outage_s=round(outage_s, 2),
        lost=0,
        duplicate_rows=0,
    )


@pytest.mark.parametrize("broker", ["persistent"], indirect=True)
def test_persistent_broker_killed_mid_stream_without_gating(
    make_rig: Callable[..., Rig], broker: Mosquitto
) -> None:
    """kill -9 a broker with persistence while the agent streams to it directly.

    With ``persistence true`` the ingest's subscription and session survive the restart
    (they were saved before the kill), so whatever the agent replays to the restarted
    broker, even before the ingest is back, is queued for the ingest instead of being
    routed to nobody. The helper's in-memory broker lost 77 and 452 records in two runs
    of this same scenario. What remains unguaranteed is only a message that mosquitto
    PUBACKed after its last save and had not yet written to the ingest's socket; it
    routes a message to its subscribers before it sends the PUBACK, so with an ingest
    that keeps up that window is usually empty, but not always: a loaded machine lost one
    such record once. So the test checks what is guaranteed: every record lost was
    PUBACKed before the kill and not stored (the window), nothing the agent sent after
    it is lost (its replays and new records reach the ingest through its saved
    session), and no row is stored twice. ``test_broker_killed_mid_stream_and_restarted``
    closes the window and checks exactly-once.
    """
    rig = make_rig(rate_hz=300, limit=1800, via_proxy=False)
    rig.ingest.start()
    rig.wait_ingest_ready()
    rig.start_agent_and_wait_flowing(150)
    saved = rig.tmp / "mosquitto-data" / "mosquitto.db"
    subscribed_at = time.time()
    wait_for(
        lambda: saved.exists() and saved.stat().st_mtime > subscribed_at + 0.1,
        10,
        "an autosave after the ingest subscribed",
    )
    rows_at_kill = rig.row_count()
    assert rows_at_kill < rig.limit
    broker.kill()
    time.sleep(2.0)  # the deliberate outage, agent and ingest both retrying
    # What the broker PUBACKed before it died: what the agent deleted from its outbox (no
    # PUBACK comes during the outage; 2 s let the agent act on the last ones).
    next_seq, unsent = rig.outbox_seqs()
    acked_at_kill = set(range(1, next_seq)) - unsent
    broker.start()

    seqs = rig.drain(rig.limit)
    assert rig.status()["rejected"] == 0
    lost = set(range(1, rig.limit + 1)) - set(seqs)
    assert lost <= acked_at_kill, f"lost outside the window: {sorted(lost - acked_at_kill)[:20]}"
    assert len(seqs) == len(set(seqs))
    assert rig.duplicate_rows() == 0
    assert rig.agent.alive(), rig.agent.tail()
    assert rig.agent.terminate() == 0
    rig.stop_ingest_cleanly()
    _report(
        "persistent_broker_kill",
        committed=rig.limit,
        rows=len(seqs),
        rows_at_kill=rows_at_kill,
        acked_at_kill=len(acked_at_kill),
        lost_in_window=len(lost),
        duplicate_rows=0,
    )


def test_agent_killed_mid_stream_and_restarted(make_rig: Callable[..., Rig]) -> None:
    """kill -9 the agent mid-stream; the restarted agent replays its outbox: exactly once.

    Each agent process runs the replay source up to ``limit`` again, so the outbox ends
    with ``first_run + limit`` committed records; seqs continue where the file left off.
    """
    rig = make_rig(rate_hz=300, limit=900, via_proxy=False)
    rig.ingest.start()
    rig.wait_ingest_ready()
    rig.start_agent_and_wait_flowing(150)
    rig.agent.kill9()
    first_run = rig.committed()
    rows_at_kill = rig.row_count()
    assert 150 <= first_run < rig.limit
    rig.agent.start()

    total = first_run + rig.limit
    seqs = rig.drain(total)
    _assert_exactly_once(rig, seqs, total)
    _report(
        "agent_kill",
        first_run=first_run,
        rows_at_kill=rows_at_kill,
        committed=total,
        rows=len(seqs),
        lost=0,
        duplicate_rows=0,
    )


@pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)
def test_ingest_killed_mid_stream_and_restarted(make_rig: Callable[..., Rig], db_url: str) -> None:
    """kill -9 the ingest mid-stream; the broker queues for its persistent session.

    The ingest acks a message only after its DB commit, so anything received but not
    committed is redelivered; the unique key absorbs what was committed but not acked.
    """
    rig = make_rig(rate_hz=300, limit=1200, via_proxy=False)
    rig.ingest.start()
    rig.wait_ingest_ready()
    rig.start_agent_and_wait_flowing(200)
    rig.ingest.kill9()
    rows_at_kill = rig.row_count()
    committed_at_kill = rig.committed()
    # The agent keeps publishing and the broker keeps PUBACKing while the ingest is down.
    wait_for(
        lambda: rig.committed() >= committed_at_kill + 300 and rig.status()["outbox"]["depth"] < 50,
        TIMEOUT,
        "300 more records PUBACKed by the broker while the ingest is down",
    )
    assert rig.row_count() == rows_at_kill
    rig.ingest.start()
    # drain() waits for the registry to stop changing; without this it could decide that
    # before the restarted ingest has even connected.
    rig.wait_ingest_ready()

    seqs = rig.drain(rig.limit)
    _assert_exactly_once(rig, seqs, rig.limit)
    _report(
        f"ingest_kill[{db_url.split(':')[0]}]",
        rows_at_kill=rows_at_kill,
        committed_at_kill=committed_at_kill,
        committed=rig.limit,
        rows=len(seqs),
        lost=0,
        duplicate_rows=0,
    )


def test_agent_cut_off_for_ten_seconds(make_rig: Callable[..., Rig]) -> None:
    """Blackhole the agent's TCP connection for >= 10 s while its source keeps producing.

    paho notices a silent link through the keepalive: after ``keepalive`` s without
    input it sends PINGREQ, and after another ``keepalive`` s without PINGRESP it drops
    the connection, so ``connected`` goes false within ``2 * keepalive`` (+ the status
    file's refresh period).
    """
    cut_s = 10.5
    rig = make_rig(rate_hz=200, limit=3000, via_proxy=True)
    rig.ingest.start()
    rig.wait_ingest_ready()
    rig.start_agent_and_wait_flowing(50)
    assert rig.status()["connected"] is True

    committed_at_cut = rig.committed()
    cut_at = time.monotonic()
    rig.proxy.cut()
    wait_for(
        lambda: rig.status()["connected"] is False,
        2 * KEEPALIVE_S + 3,
        "agent status shows the link down",
    )
    detected_s = time.monotonic() - cut_at
    rows_when_detected = rig.row_count()
    remaining = cut_s - (time.monotonic() - cut_at)
    if remaining > 0:
        time.sleep(remaining)  # the deliberate >= 10 s cut
    during = rig.status()
    assert rig.row_count() == rows_when_detected, "records got through the cut"
    assert during["connected"] is False
    assert during["outbox"]["depth"] > 0
    assert rig.committed() > committed_at_cut + 1000, "the source stopped during the cut"
    cut_total_s = time.monotonic() - cut_at
    rig.proxy.restore()
    wait_for(lambda: rig.status()["connected"] is True, 20, "agent reconnected")

    seqs = rig.drain(rig.limit)
    assert rig.status()["rejected"] == 0
    _assert_exactly_once(rig, seqs, rig.limit)
    _report(
        "agent_cut",
        cut_s=round(cut_total_s, 1),
        disconnect_detected_after_s=round(detected_s, 1),
        committed=rig.limit,
        rows=len(seqs),
        lost=0,
        duplicate_rows=0,
    )


@pytest.mark.parametrize("policy", ["reject_new", "drop_oldest"])
def test_outbox_fills_to_its_byte_bound_while_cut_off(
    make_rig: Callable[..., Rig], policy: str
) -> None:
    """Fill a 20 KB outbox while the agent is cut off; every record is accounted for.

    produced == committed + rejected, and committed == rows + dropped, exactly. The
    in-flight window is kept small (max_inflight 5 → 10 leased records) so that records
    paho holds, which ``drop_oldest`` may not drop, fill only part of the bound.
    """
    max_bytes = 20_000
    rig = make_rig(
        rate_hz=200,
        limit=600,
        via_proxy=True,
        outbox={"max_bytes": max_bytes, "when_full": policy},
        max_inflight=5,
    )
    rig.ingest.start()
    rig.wait_ingest_ready()
    rig.start_agent_and_wait_flowing(20)
    rig.proxy.cut()

    def source_done() -> bool:
        report = rig.status()
        return int(report["outbox"]["next_seq"]) - 1 + int(report["rejected"]) == rig.limit

    wait_for(source_done, TIMEOUT, f"the source produced all {rig.limit} records")
    full = rig.status()
    assert full["outbox"]["bytes"] <= max_bytes
    assert full["outbox"]["bytes"] > max_bytes - 2_000, "the outbox never filled"
    rig.proxy.restore()

    committed = rig.committed()
    seqs = rig.drain(committed)
    final = rig.status()
    rejected = int(final["rejected"])
    dropped = int(final["outbox"]["dropped"])
    assert int(final["outbox"]["expired"]) == 0
    assert committed + rejected == rig.limit  # produced
    assert len(seqs) + dropped == committed
    assert set(seqs) <= set(range(1, committed + 1))
    assert rig.duplicate_rows() == 0
    if policy == "reject_new":
        assert rejected > 0
        assert dropped == 0
        assert set(seqs) == set(range(1, committed + 1))
    else:
        assert dropped > 0
        assert rejected == 0
        assert committed == rig.limit
    assert rig.agent.terminate() == 0
    rig.stop_ingest_cleanly()
    _report(
        f"outbox_full[{policy}]",
        produced=rig.limit,
        committed=committed,
        rejected=rejected,
        dropped=dropped,
        rows=len(seqs),
        duplicate_rows=0,
    )
