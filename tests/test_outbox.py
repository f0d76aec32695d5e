from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgefl.edge_agent.mqtt_link import TokenBucket, backoff_delay
from edgefl.edge_agent.outbox import Outbox, OutboxFullError, OutboxPolicy
from edgefl.errors import BadInputError, ExitCode


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make(
    path: Path, clock: FakeClock | None = None, device: str = "dev-1", **policy: object
) -> Outbox:
    return Outbox(path, device, OutboxPolicy.model_validate(policy), clock=clock or FakeClock())


def test_policy_defaults_and_strictness() -> None:
    policy = OutboxPolicy()
    assert policy.when_full == "reject_new"
    assert policy.synchronous == "NORMAL"
    with pytest.raises(ValueError, match="extra"):
        OutboxPolicy.model_validate({"max_bytes": 10, "bogus": 1})
    with pytest.raises(ValueError, match="when_full"):
        OutboxPolicy.model_validate({"when_full": "drop_newest"})


def test_wal_mode_and_synchronous(tmp_path: Path) -> None:
    with make(tmp_path / "o.db", synchronous="FULL") as ob:
        assert ob._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert ob._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    with make(tmp_path / "p.db") as ob:
        assert ob._db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL


def test_seq_monotonic_across_deletes_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with make(path) as ob:
        seqs = [ob.put("t/a", b"x").seq for _ in range(5)]
        assert seqs == [1, 2, 3, 4, 5]
        for s in seqs:
            ob.ack(s)
        assert ob.stats().depth == 0
        assert ob.put("t/a", b"y").seq == 6
    with make(path) as ob:
        # Everything was deleted: a MAX(seq)+1 scheme would hand out 1 (or 7 after 6 is
        # acked) again; the counter table must not.
        ob.ack(6)
        assert ob.put("t/a", b"z").seq == 7
        assert ob.stats().next_seq == 8


def test_records_survive_reopen_and_are_replayed(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with make(path) as ob:
        for i in range(3):
            ob.put("t/a", f"{i}".encode())
        leased = ob.next_batch(10)
        assert len(leased) == 3  # leased, never acked: a crash happens here
    with make(path) as ob:
        replay = ob.next_batch(10)
        assert [r.payload for r in replay] == [b"0", b"1", b"2"]


def test_file_of_another_device_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    make(path, device="a").close()
    with pytest.raises(BadInputError, match="belongs to device 'a'"):
        make(path, device="b")


def test_reject_new_raises_and_keeps_what_was_accepted(tmp_path: Path) -> None:
    with make(tmp_path / "o.db", max_bytes=100, when_full="reject_new") as ob:
        accepted = [ob.put("t", bytes([i]) * 10).seq for i in range(10)]
        with pytest.raises(OutboxFullError) as info:
            ob.put("t", b"x")
        assert info.value.exit_code == ExitCode.BAD_INPUT
        stats = ob.stats()
        assert (stats.depth, stats.bytes, stats.dropped) == (10, 100, 0)
        assert [r.seq for r in ob.next_batch(100)] == accepted
        # The refused record did not consume a sequence number.
        assert stats.next_seq == 11


def test_drop_oldest_counts_drops_and_keeps_newest(tmp_path: Path) -> None:
    with make(tmp_path / "o.db", max_bytes=100, when_full="drop_oldest") as ob:
        for i in range(10):
            ob.put("t", bytes([i]) * 10)
        ob.put("t", b"n" * 25)  # needs 25 bytes: the three oldest go
        stats = ob.stats()
        assert stats.dropped == 3
        assert stats.bytes == 95
        assert [r.seq for r in ob.next_batch(100)] == [4, 5, 6, 7, 8, 9, 10, 11]


def test_drop_oldest_drops_lowest_priority_first_and_never_higher(tmp_path: Path) -> None:
    with make(tmp_path / "o.db", max_bytes=40, when_full="drop_oldest") as ob:
        alarm = ob.put("t", b"a" * 10, priority=5)
        bulk = [ob.put("t", b"b" * 10).seq for _ in range(3)]
        ob.put("t", b"c" * 10, priority=1)  # evicts the oldest bulk record, not the alarm
        remaining = [r.seq for r in ob.next_batch(100)]
        assert alarm.seq in remaining
        assert bulk[0] not in remaining
        assert ob.stats().dropped == 1
        ob.release_all()
        # A low-priority record may not evict higher-priority ones.
        with pytest.raises(OutboxFullError, match="higher priority"):
            ob.put("t", b"e" * 40, priority=0)
        assert ob.stats().dropped == 1


def test_drop_oldest_never_drops_records_in_flight(tmp_path: Path) -> None:
    with make(tmp_path / "o.db", max_bytes=20, when_full="drop_oldest") as ob:
        first = ob.put("t", b"a" * 10)
        ob.put("t", b"b" * 10)
        assert [r.seq for r in ob.next_batch(1)] == [first.seq]
        third = ob.put("t", b"c" * 10)
        assert [r.seq for r in ob.next_batch(10)] == [third.seq]  # first is still leased
        stats = ob.stats()
        assert (stats.depth, stats.dropped) == (2, 1)
        ob.ack(first.seq)
        assert ob.stats().depth == 1


def test_record_bigger_than_bound_is_always_refused(tmp_path: Path) -> None:
    for when_full in ("reject_new", "drop_oldest"):
        with make(tmp_path / f"{when_full}.db", max_bytes=10, when_full=when_full) as ob:
            ob.put("t", b"k" * 5)
            with pytest.raises(OutboxFullError, match="exceeds"):
                ob.put("t", b"x" * 11)
            stats = ob.stats()
            assert (stats.depth, stats.dropped) == (1, 0)


def test_invalid_topic_refused(tmp_path: Path) -> None:
    with make(tmp_path / "o.db") as ob:
        for topic in ("", "a/+/b", "a/#"):
            with pytest.raises(BadInputError):
                ob.put(topic, b"x")
        assert ob.stats().next_seq == 1


def test_ttl_expiry_is_counted(tmp_path: Path) -> None:
    clock = FakeClock()
    with make(tmp_path / "o.db", clock, default_ttl_s=10.0) as ob:
        ob.put("t", b"a")  # default TTL 10 s
        ob.put("t", b"b", ttl_s=100.0)
        keep = ob.put("t", b"c", ttl_s=1000.0)
        clock.now += 50
        batch = ob.next_batch(10)
        assert [r.payload for r in batch] == [b"b", b"c"]
        ob.release_all()
        clock.now += 100
        stats = ob.stats()
        assert (stats.depth, stats.expired, stats.bytes) == (1, 2, 1)
        assert stats.oldest_age_s == pytest.approx(150.0)
        assert keep.expires_at == pytest.approx(keep.created_at + 1000.0)


def test_expiry_frees_room_before_the_full_policy_applies(tmp_path: Path) -> None:
    clock = FakeClock()
    with make(tmp_path / "o.db", clock, max_bytes=10, when_full="reject_new") as ob:
        ob.put("t", b"x" * 10, ttl_s=1.0)
        clock.now += 2
        ob.put("t", b"y" * 10)
        stats = ob.stats()
        assert (stats.depth, stats.expired, stats.dropped) == (1, 1, 0)


def test_priority_order_then_seq(tmp_path: Path) -> None:
    with make(tmp_path / "o.db") as ob:
        ob.put("t", b"low1", priority=0)
        ob.put("t", b"high1", priority=9)
        ob.put("t", b"mid", priority=3)
        ob.put("t", b"high2", priority=9)
        ob.put("t", b"low2", priority=0)
        first = ob.next_batch(2)
        rest = ob.next_batch(10)
        assert [r.payload for r in first] == [b"high1", b"high2"]
        assert [r.payload for r in rest] == [b"mid", b"low1", b"low2"]
        assert ob.next_batch(10) == []  # everything is leased
        ob.release(first[0].seq)
        assert [r.payload for r in ob.next_batch(10)] == [b"high1"]


def test_stats_and_record_fields(tmp_path: Path) -> None:
    clock = FakeClock(5000.0)
    with make(tmp_path / "o.db", clock) as ob:
        empty = ob.stats()
        assert (empty.depth, empty.bytes, empty.oldest_age_s, empty.next_seq) == (0, 0, 0.0, 1)
        rec = ob.put("edgefl/f/d/data", b"hello", priority=2, kind="telemetry")
        assert (rec.topic, rec.payload, rec.priority, rec.kind) == (
            "edgefl/f/d/data",
            b"hello",
            2,
            "telemetry",
        )
        assert (rec.created_at, rec.expires_at) == (5000.0, None)
        clock.now += 7
        stats = ob.stats()
        assert (stats.depth, stats.bytes, stats.oldest_age_s) == (1, 5, 7.0)
        assert ob.next_batch(1) == [rec]


def test_counters_persist_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    clock = FakeClock()
    with make(path, clock, max_bytes=10, when_full="drop_oldest") as ob:
        ob.put("t", b"a" * 10)
        ob.put("t", b"b" * 10)
        ob.put("t", b"c" * 5, ttl_s=1)
        clock.now += 5
        ob.stats()
    with make(path, clock, max_bytes=10, when_full="drop_oldest") as ob:
        stats = ob.stats()
        assert (stats.dropped, stats.expired, stats.next_seq) == (2, 1, 4)


def test_body_built_from_seq(tmp_path: Path) -> None:
    with make(tmp_path / "o.db", max_bytes=20) as ob:
        rec = ob.put("t", lambda seq: f"seq={seq}".encode())
        assert rec.payload == b"seq=1"
        with pytest.raises(OutboxFullError, match="exceeds"):
            ob.put("t", lambda seq: b"x" * 21)
        assert ob.put("t", lambda seq: f"seq={seq}".encode()).payload == b"seq=2"


def test_ack_unknown_seq_is_ignored(tmp_path: Path) -> None:
    with make(tmp_path / "o.db") as ob:
        ob.put("t", b"a")
        ob.ack(99)
        ob.ack_many([])
        assert ob.stats().depth == 1


def test_committed_record_is_visible_to_another_connection(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with make(path) as ob:
        ob.put("t", b"a")
        # put() returned: the row is committed, not sitting in an open transaction.
        other = sqlite3.connect(path)
        try:
            assert other.execute("SELECT COUNT(*) FROM records").fetchone()[0] == 1
        finally:
            other.close()


_ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.integers(0, 40), st.integers(-2, 2)),
        st.tuples(st.just("ack"), st.integers(0, 30), st.just(0)),
        st.tuples(st.just("batch"), st.integers(0, 5), st.just(0)),
    ),
    max_size=60,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=_ops, when_full=st.sampled_from(["reject_new", "drop_oldest"]))
def test_stats_match_what_remains(
    tmp_path: Path, ops: list[tuple[str, int, int]], when_full: str
) -> None:
    path = tmp_path / f"prop-{when_full}.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    with make(path, max_bytes=100, when_full=when_full) as ob:
        accepted = 0
        last_seq = 0
        for op, n, prio in ops:
            if op == "put":
                try:
                    rec = ob.put("t", b"p" * n, priority=prio)
                except OutboxFullError:
                    continue
                assert rec.seq > last_seq
                last_seq = rec.seq
                accepted += 1
            elif op == "ack":
                ob.ack(n)
            else:
                ob.next_batch(n)
        stats = ob.stats()
        rows = ob._db.execute("SELECT seq, LENGTH(payload) FROM records").fetchall()
        assert stats.depth == len(rows)
        assert stats.bytes == sum(size for _, size in rows)
        assert stats.bytes <= 100
        assert ob._bytes == stats.bytes  # the cached total never drifts
        assert stats.next_seq == last_seq + 1
        if when_full == "reject_new":
            assert stats.dropped == 0
        # Every accepted record is either still stored, acked or counted as dropped.
        acked_max = accepted - stats.depth - stats.dropped
        assert acked_max >= 0


def test_backoff_delay_grows_caps_and_jitters() -> None:
    assert backoff_delay(0, 1.0, 60.0, rng=lambda: 0.0) == 0.5
    assert backoff_delay(0, 1.0, 60.0, rng=lambda: 0.999) == pytest.approx(0.9995)
    assert backoff_delay(3, 1.0, 60.0, rng=lambda: 0.0) == 4.0
    assert backoff_delay(50, 1.0, 60.0, rng=lambda: 1.0) == 60.0


def test_token_bucket_limits_rate() -> None:
    clock = FakeClock(0.0)
    bucket = TokenBucket(rate=10.0, burst=5.0, clock=clock)
    assert bucket.take(100) == 5
    assert bucket.take(1) == 0
    assert bucket.wait_s() == pytest.approx(0.1)
    clock.now += 0.35
    assert bucket.take(100) == 3
    bucket.give_back(2)
    assert bucket.take(100) == 2
    clock.now += 100
    assert bucket.take(100) == 5  # capped at the burst
    bucket.reset()
    assert bucket.take(1) == 1
