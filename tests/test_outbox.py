from __future__ import annotations

import contextlib
import logging
import re
import sqlite3
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgefl.edge_agent.mqtt_link import TokenBucket, backoff_delay
from edgefl.edge_agent.outbox import Outbox, OutboxFullError, OutboxItem, OutboxPolicy
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


def test_incarnation_is_made_with_the_file_and_kept_in_it(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with make(path) as ob:
        first = ob.incarnation
        assert re.fullmatch(r"[0-9a-f]{32}", first)
        ob.put("t", b"a")
    with make(path) as ob:
        assert ob.incarnation == first  # a restart keeps it
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    with make(path) as ob:  # a deleted (reset, reflashed) outbox is a new incarnation
        assert ob.incarnation != first
        assert ob.put("t", b"b").seq == 1


def test_file_from_before_incarnations_gets_one_and_keeps_its_seqs(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with make(path) as ob:
        ob.put_many([("t", b"x")] * 3)
    db = sqlite3.connect(path)
    db.execute("DROP TABLE identity")  # as an outbox written by an older agent
    db.commit()
    db.close()
    with make(path) as ob:
        assert re.fullmatch(r"[0-9a-f]{32}", ob.incarnation)
        assert [r.seq for r in ob.next_batch(10)] == [1, 2, 3]
        assert ob.put("t", b"y").seq == 4


def test_quarantined_file_is_replaced_by_a_new_incarnation(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "o.db"
    with make(path) as ob:
        old = ob.incarnation
    db = sqlite3.connect(path)
    db.execute("UPDATE identity SET incarnation = 'not hex'")
    db.commit()
    db.close()
    ob, _ = _reopen_quarantined(path, caplog)
    with ob:
        assert ob.incarnation not in (old, "not hex")


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


_lease_ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.integers(1, 12), st.integers(-1, 2)),
        st.tuples(st.just("put_many"), st.integers(1, 4), st.integers(-1, 2)),
        st.tuples(st.just("lease"), st.integers(1, 6), st.just(0)),
        st.tuples(st.just("ack_leased"), st.integers(0, 5), st.just(0)),
        st.tuples(st.just("ack_any"), st.integers(1, 40), st.just(0)),
        st.tuples(st.just("release"), st.integers(0, 5), st.just(0)),
        st.tuples(st.just("release_all"), st.just(0), st.just(0)),
        st.tuples(st.just("tick"), st.integers(1, 3), st.just(0)),
    ),
    max_size=80,
)


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=_lease_ops, when_full=st.sampled_from(["reject_new", "drop_oldest"]))
def test_next_batch_hands_out_unleased_records_in_send_order(
    tmp_path: Path, ops: list[tuple[str, int, int]], when_full: str
) -> None:
    """The in-memory tail and the send-order cursor never change what next_batch returns:
    the first unleased, unexpired records by priority then seq, each handed out once."""
    path = tmp_path / f"lease-{when_full}.db"
    path.unlink(missing_ok=True)
    clock = FakeClock(1000.0)
    with make(path, clock, max_bytes=120, when_full=when_full) as ob:
        leased: list[int] = []
        handed: set[int] = set()
        for op, n, prio in ops:
            if op in ("put", "put_many"):
                ttl = 2.0 if prio == 2 else None
                items = [OutboxItem("t", b"p" * n, priority=prio, ttl_s=ttl)]
                if op == "put_many":
                    items = [OutboxItem("t", b"q" * 5, priority=(prio + i) % 3) for i in range(n)]
                with contextlib.suppress(OutboxFullError):
                    ob.put_many(items)
            elif op == "lease":
                rows = ob._db.execute(
                    "SELECT seq FROM records WHERE expires_at IS NULL OR expires_at > ? "
                    "ORDER BY priority DESC, seq",
                    (clock.now,),
                ).fetchall()
                expected = [seq for (seq,) in rows if seq not in leased][:n]
                got = [r.seq for r in ob.next_batch(n)]
                assert got == expected
                leased += got
            elif op == "ack_leased" and leased:
                seq = leased.pop(n % len(leased))
                ob.ack(seq)
                handed.add(seq)
            elif op == "ack_any":
                # An ack of a record never leased (or already gone) is taken as it comes.
                stored = ob._db.execute("SELECT 1 FROM records WHERE seq = ?", (n,)).fetchone()
                ob.ack(n)
                if n in leased:
                    leased.remove(n)
                if stored:
                    handed.add(n)
            elif op == "release" and leased:
                ob.release(leased.pop(n % len(leased)))
            elif op == "release_all":
                ob.release_all()
                leased.clear()
            elif op == "tick":
                clock.now += n
        # Whatever is left comes out exactly once, and none of it was acked before.
        ob.release_all()
        rest = [r.seq for r in ob.next_batch(1000)]
        assert len(rest) == len(set(rest))
        assert not set(rest) & handed
        assert ob.next_batch(1000) == []
        assert ob._bytes == ob.stats().bytes


def test_records_put_while_sending_keep_priority_expiry_and_drops(tmp_path: Path) -> None:
    # Once the sender has leased everything, new records are handed out from memory
    # (no read back from SQLite); that path must follow the same rules.
    clock = FakeClock(1000.0)
    with make(tmp_path / "o.db", clock, max_bytes=30, when_full="drop_oldest") as ob:
        first = ob.put("t", b"a")
        assert ob.next_batch(10) == [first]
        low = ob.put("t", b"low")
        high = ob.put("t", b"high", priority=5)
        assert [r.seq for r in ob.next_batch(10)] == [high.seq, low.seq]
        # Expiry: a record past its TTL is deleted and counted, not handed out.
        short = ob.put("t", b"short", ttl_s=1.0)
        keep = ob.put("t", b"keep")
        clock.now += 2
        assert [r.seq for r in ob.next_batch(10)] == [keep.seq]
        assert ob.stats().expired == 1
        assert short.seq not in [r.seq for r in ob.next_batch(10)]
        # Drop: a record dropped to make room is not handed out either.
        ob.ack_many([first.seq, low.seq, high.seq, keep.seq])
        assert ob.next_batch(10) == []
        old = ob.put("t", b"o" * 20)
        new = ob.put("t", b"n" * 20)  # drops old
        assert ob.stats().dropped == 1
        assert [r.seq for r in ob.next_batch(10)] == [new.seq]
        assert old.seq != new.seq


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


# -- put_many ----------------------------------------------------------------------------


def test_put_many_assigns_consecutive_seqs_in_one_commit(tmp_path: Path) -> None:
    clock = FakeClock(2000.0)
    with make(tmp_path / "o.db", clock, default_ttl_s=60.0) as ob:
        ob.put("t", b"first")
        records = ob.put_many(
            [
                ("t/a", b"a"),
                OutboxItem("t/b", lambda seq: f"seq={seq}".encode(), priority=3, kind="x"),
                OutboxItem("t/c", b"c", ttl_s=5.0),
            ]
        )
        assert [r.seq for r in records] == [2, 3, 4]
        assert records[1].payload == b"seq=3"
        assert (records[1].priority, records[1].kind) == (3, "x")
        assert records[0].expires_at == pytest.approx(2060.0)
        assert records[2].expires_at == pytest.approx(2005.0)
        assert ob.put_many([]) == []
        stats = ob.stats()
        assert (stats.depth, stats.bytes, stats.next_seq) == (4, 5 + 1 + 5 + 1, 5)
        assert [r.seq for r in ob.next_batch(10)] == [3, 1, 2, 4]  # priority, then seq
        assert ob._bytes == stats.bytes


def test_put_many_is_one_transaction(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with make(path) as ob:
        before = ob._db.total_changes
        statements: list[str] = []
        ob._db.set_trace_callback(statements.append)
        ob.put_many([("t", b"x")] * 100)
        ob._db.set_trace_callback(None)
        # One INSERT statement, committed by SQLite on its own: 100 rows and 100 counter
        # bumps (the trigger) in one transaction, visible to another connection at once.
        # (The trace reports the statement again for each trigger step it runs.)
        assert len(set(statements)) == 1
        assert statements[0].startswith("INSERT INTO records")
        assert ob._db.total_changes - before == 200
        other = sqlite3.connect(path)
        try:
            assert other.execute("SELECT COUNT(*) FROM records").fetchone()[0] == 100
        finally:
            other.close()


def test_seq_stays_unique_when_another_connection_writes(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with make(path) as ob:
        assert ob.put("t", b"a").seq == 1
        other = sqlite3.connect(path, isolation_level=None)
        try:
            # A stale seq is refused by the file itself, even one no longer stored.
            with pytest.raises(sqlite3.IntegrityError, match="seq reused"):
                other.execute(
                    "INSERT INTO records (seq, topic, payload, priority, kind, created_at) "
                    "VALUES (1, 't', x'00', 0, 'data', 0)"
                )
            other.execute(
                "INSERT INTO records (seq, topic, payload, priority, kind, created_at) "
                "VALUES (2, 't', x'00', 0, 'data', 0)"
            )
        finally:
            other.close()
        assert [r.seq for r in ob.put_many([("t", b"b"), ("t", b"c")])] == [3, 4]
        assert ob.stats().next_seq == 5
        assert [r.seq for r in ob.next_batch(10)] == [1, 2, 3, 4]


def test_put_many_reject_new_is_all_or_nothing(tmp_path: Path) -> None:
    with make(tmp_path / "o.db", max_bytes=100, when_full="reject_new") as ob:
        ob.put_many([("t", b"a" * 10)] * 5)
        with pytest.raises(OutboxFullError, match="batch of 6 records refused"):
            ob.put_many([("t", b"b" * 10)] * 6)
        stats = ob.stats()
        # Nothing of the refused batch is stored and no seq was consumed.
        assert (stats.depth, stats.bytes, stats.dropped, stats.next_seq) == (5, 50, 0, 6)
        assert ob._bytes == 50
        assert [r.seq for r in ob.put_many([("t", b"c" * 10)] * 5)] == [6, 7, 8, 9, 10]


def test_put_many_refuses_whole_call_for_one_bad_record(tmp_path: Path) -> None:
    with make(tmp_path / "o.db", max_bytes=20) as ob:
        with pytest.raises(OutboxFullError, match="exceeds"):
            ob.put_many([("t", b"ok"), ("t", b"x" * 21)])
        with pytest.raises(BadInputError):
            ob.put_many([("t", b"ok"), ("a/#", b"x")])
        stats = ob.stats()
        assert (stats.depth, stats.next_seq) == (0, 1)


def test_put_many_drop_oldest_matches_sequential_puts(tmp_path: Path) -> None:
    items = [OutboxItem("t", bytes([i]) * (5 + i % 7), priority=i // 15) for i in range(40)]
    with make(tmp_path / "many.db", max_bytes=60, when_full="drop_oldest") as many:
        many.put_many(items[:10])
        many.put_many(items[10:])
        batched = [(r.seq, r.payload) for r in many.next_batch(100)]
        batched_stats = many.stats()
        assert many._bytes == batched_stats.bytes
    with make(tmp_path / "one.db", max_bytes=60, when_full="drop_oldest") as one:
        for it in items:
            one.put(it.topic, it.body, priority=it.priority)
        single = [(r.seq, r.payload) for r in one.next_batch(100)]
        single_stats = one.stats()
    assert batched == single
    assert batched_stats == single_stats


def test_put_many_drop_oldest_rolls_back_when_a_record_cannot_fit(tmp_path: Path) -> None:
    with make(tmp_path / "o.db", max_bytes=30, when_full="drop_oldest") as ob:
        ob.put("t", b"h" * 20, priority=5)
        ob.put("t", b"l" * 10, priority=0)
        # The first record evicts the low-priority one; the second would need 15 bytes
        # but may only evict the first (10 bytes), not the priority-5 record: the whole
        # call is undone, eviction included.
        with pytest.raises(OutboxFullError, match="higher priority"):
            ob.put_many([OutboxItem("t", b"n" * 10), OutboxItem("t", b"m" * 15)])
        stats = ob.stats()
        assert (stats.depth, stats.bytes, stats.dropped, stats.next_seq) == (2, 30, 0, 3)
        assert ob._bytes == 30


def test_put_many_expires_before_applying_the_policy(tmp_path: Path) -> None:
    clock = FakeClock()
    with make(tmp_path / "o.db", clock, max_bytes=20, when_full="reject_new") as ob:
        ob.put("t", b"x" * 20, ttl_s=1.0)
        clock.now += 2
        ob.put_many([("t", b"y" * 10)] * 2)
        stats = ob.stats()
        assert (stats.depth, stats.expired, stats.bytes) == (2, 1, 20)


# -- corrupt file at start-up ------------------------------------------------------------

CLOCK_S = 1_700_000_000.5
TIME_BASED_SEQ = int(CLOCK_S * 1000) * 1000


def _fill(path: Path, count: int, size: int = 300) -> int:
    """Store ``count`` records, ack the first half; return the next seq of the file."""
    with make(path) as ob:
        records = ob.put_many([("t", bytes([i % 251]) * size) for i in range(count)])
        ob.ack_many(r.seq for r in records[: count // 2])
        return ob.stats().next_seq


def _reopen_quarantined(path: Path, caplog: pytest.LogCaptureFixture) -> tuple[Outbox, Path]:
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="edgefl.edge_agent.outbox"):
        ob = make(path, FakeClock(CLOCK_S))
    assert ob.quarantined is not None
    quarantined = ob.quarantined
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    message = errors[0].getMessage()
    assert str(quarantined) in message
    assert "NOT sent" in message
    assert quarantined.name.startswith("o.db.corrupt-2023")
    assert quarantined.exists()
    stats = ob.stats()
    assert (stats.depth, stats.bytes) == (0, 0)
    return ob, quarantined


def test_garbage_file_is_quarantined_and_seq_becomes_time_based(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "o.db"
    path.write_bytes(b"this is not an sqlite database\x00" * 200)
    ob, quarantined = _reopen_quarantined(path, caplog)
    with ob:
        assert quarantined.read_bytes().startswith(b"this is not")
        assert ob.put("t", b"a").seq == TIME_BASED_SEQ
        assert ob.put("t", b"b").seq == TIME_BASED_SEQ + 1
    with make(path) as again:  # the fresh file is a normal outbox from now on
        assert again.quarantined is None
        assert again.stats().next_seq == TIME_BASED_SEQ + 2


def test_truncated_file_is_quarantined_and_seq_never_goes_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "o.db"
    next_seq = _fill(path, 400)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    ob, quarantined = _reopen_quarantined(path, caplog)
    with ob:
        seq = ob.put("t", b"a").seq
        # Either the counter survived the cut (continue after it) or it did not (time).
        assert seq in (next_seq, TIME_BASED_SEQ)
        assert seq >= next_seq
        assert quarantined.stat().st_size == len(data) // 2


def test_corrupt_page_is_quarantined_with_its_wal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "o.db"
    next_seq = _fill(path, 400)
    page_size = 4096
    with path.open("r+b") as f:
        # Page 2 is the root of the records table (created first); counters lives on a
        # later page. Smash the records root, as a bad flash block would.
        f.seek(1 * page_size)
        f.write(b"\xde\xad\xbe\xef" * 256)
    Path(f"{path}-wal").write_bytes(b"")  # a leftover WAL goes with the database
    ob, quarantined = _reopen_quarantined(path, caplog)
    with ob:
        assert Path(f"{quarantined}-wal").exists()
        # The counter page is intact: the fresh file continues right after it.
        assert ob.put("t", b"a").seq == next_seq


def test_file_with_wrong_schema_is_quarantined(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "o.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE records (id INTEGER PRIMARY KEY, junk TEXT)")
    db.commit()
    db.close()
    ob, _ = _reopen_quarantined(path, caplog)
    with ob:
        assert ob.put("t", b"a").seq == TIME_BASED_SEQ


def test_two_quarantines_in_the_same_second_keep_both_files(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "o.db"
    path.write_bytes(b"garbage" * 100)
    first, q1 = _reopen_quarantined(path, caplog)
    first.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    path.write_bytes(b"more garbage" * 100)
    second, q2 = _reopen_quarantined(path, caplog)
    second.close()
    assert q1 != q2
    assert q1.exists()
    assert q2.exists()


def test_healthy_file_is_not_quarantined(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "o.db"
    _fill(path, 50)
    with caplog.at_level(logging.ERROR), make(path) as ob:
        assert ob.quarantined is None
        assert ob.stats().depth == 25
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert list(tmp_path.glob("*.corrupt-*")) == []


@pytest.mark.slow
def test_locked_file_is_an_error_not_corruption(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE x (a)")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            Outbox(path, "dev-1", OutboxPolicy(), clock=FakeClock())
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    # A busy file may hold unsent records: it must never be moved aside.
    assert path.exists()
    assert list(tmp_path.glob("*.corrupt-*")) == []
