"""Durable store-and-forward outbox: every record is committed to SQLite before it is sent.

The outbox is one SQLite file per device in WAL mode (stdlib :mod:`sqlite3` only). A record
gets a per-device sequence number that only ever grows: the next value lives in a counter
table, so it survives deletes and restarts and is never reused. The sender takes records
with :meth:`Outbox.next_batch`, publishes them and calls :meth:`Outbox.ack` once the broker
confirmed them; anything not acked is replayed after a restart.

The store is bounded by the total payload bytes. When a new record does not fit, the
:class:`OutboxPolicy` decides: ``reject_new`` raises :class:`OutboxFullError`, while
``drop_oldest`` deletes the lowest-priority, oldest records to make room. Every drop and
every expiry (records past their TTL) is counted in the same SQLite transaction that
deletes the record, so the counters survive a crash too.

Durability is :attr:`OutboxPolicy.synchronous`:

* ``NORMAL`` (WAL): a committed record survives a crash of the process, which is the
  failure an agent sees most. After a power loss or kernel panic the last transactions
  before the cut may be lost (the database stays consistent).
* ``FULL``: SQLite fsyncs the WAL on every commit, so a committed record also survives a
  power loss. The price is one fsync per commit, which on SD cards and cheap flash is
  milliseconds each; batch writes if you need both rate and ``FULL``.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field

from edgefl.config import StrictModel
from edgefl.errors import BadInputError, ExitCode

__all__ = ["Outbox", "OutboxFullError", "OutboxPolicy", "OutboxStats", "Record"]

_log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    priority INTEGER NOT NULL,
    kind TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL
);
CREATE INDEX IF NOT EXISTS records_send_order ON records (priority DESC, seq);
CREATE INDEX IF NOT EXISTS records_expiry ON records (expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS counters (
    device_id TEXT PRIMARY KEY,
    next_seq INTEGER NOT NULL,
    dropped INTEGER NOT NULL,
    expired INTEGER NOT NULL
);
"""


class OutboxFullError(BadInputError):
    """The outbox cannot take a record without breaking its byte bound."""

    exit_code = ExitCode.BAD_INPUT


class OutboxPolicy(StrictModel):
    """How the outbox bounds its size and how durable a commit is."""

    max_bytes: int = Field(
        default=64 * 1024 * 1024, gt=0, description="Bound on the total payload bytes stored."
    )
    default_ttl_s: float | None = Field(
        default=None,
        gt=0,
        description="Seconds a record lives when put() gives no ttl_s; None keeps it forever.",
    )
    when_full: Literal["reject_new", "drop_oldest"] = Field(
        default="reject_new",
        description=(
            "reject_new raises OutboxFullError; drop_oldest deletes the lowest-priority, "
            "oldest records (never ones of higher priority than the new record)."
        ),
    )
    synchronous: Literal["NORMAL", "FULL"] = Field(
        default="NORMAL",
        description=(
            "SQLite synchronous mode. NORMAL survives a process crash; FULL also survives "
            "power loss at the cost of one fsync per commit."
        ),
    )


@dataclass(frozen=True, slots=True)
class Record:
    """One stored record.

    Attributes:
        seq: Per-device sequence number, unique and increasing for the life of the file.
        topic: MQTT topic to publish on.
        payload: The exact bytes to publish.
        priority: Higher is sent first and dropped last.
        kind: Free-form record kind (``data``, ``telemetry`` ...).
        created_at: Wall-clock time of :meth:`Outbox.put` (seconds since the epoch).
        expires_at: Wall-clock time after which the record is discarded, or ``None``.
    """

    seq: int
    topic: str
    payload: bytes
    priority: int
    kind: str
    created_at: float
    expires_at: float | None


@dataclass(frozen=True, slots=True)
class OutboxStats:
    """A snapshot of the outbox.

    Attributes:
        depth: Records stored (including ones being sent).
        bytes: Total payload bytes stored.
        oldest_age_s: Age of the oldest stored record, or ``0.0`` when empty.
        dropped: Records deleted by ``drop_oldest`` over the life of the file.
        expired: Records deleted past their TTL over the life of the file.
        next_seq: The sequence number the next record will get.
    """

    depth: int
    bytes: int
    oldest_age_s: float
    dropped: int
    expired: int
    next_seq: int


_COLUMNS = "seq, topic, payload, priority, kind, created_at, expires_at"
_RecordRow = tuple[int, str, bytes, int, str, float, float | None]


def _check_topic(topic: str) -> None:
    # Refused here, not at publish time: a record stored with a topic paho rejects would
    # sit in the outbox forever.
    if not topic or "+" in topic or "#" in topic or "\0" in topic:
        raise BadInputError(f"invalid MQTT topic for a record: {topic!r}")
    if len(topic.encode("utf-8")) > 65535:
        raise BadInputError("MQTT topic longer than 65535 bytes")


def _record(row: _RecordRow) -> Record:
    return Record(row[0], row[1], bytes(row[2]), row[3], row[4], row[5], row[6])


class Outbox:
    """A durable, byte-bounded outbox for one device.

    Thread-safe: one SQLite connection guarded by a lock, so producers and the single
    sender thread can share an instance. Records handed out by :meth:`next_batch` are
    *leased* in memory until :meth:`ack` or :meth:`release`: a leased record is not handed
    out again, dropped or expired, because it may already be on the wire. Leases do not
    survive a restart, which is what makes start-up replay everything that is left.

    Args:
        path: SQLite file; created with its parent folder if missing.
        device_id: The device that owns the sequence numbers in this file.
        policy: Size bound, TTL default, when-full behaviour and durability.
        clock: Wall-clock source (seconds since the epoch); tests inject their own.

    Raises:
        BadInputError: The file belongs to another device.
    """

    def __init__(
        self,
        path: Path,
        device_id: str,
        policy: OutboxPolicy,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.device_id = device_id
        self.policy = policy
        self._clock = clock
        self._lock = threading.Lock()
        self._leased: set[int] = set()
        path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT), so
        # a record and the counters that describe it are always committed together.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={policy.synchronous}")
        with self._transaction():
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._db.execute(statement)
            owners = [r[0] for r in self._db.execute("SELECT device_id FROM counters")]
            if owners and owners != [device_id]:
                raise BadInputError(
                    f"outbox {path} belongs to device {owners[0]!r}, not {device_id!r}",
                    hint="give every device its own outbox file",
                )
            if not owners:
                self._db.execute(
                    "INSERT INTO counters (device_id, next_seq, dropped, expired) "
                    "VALUES (?, 1, 0, 0)",
                    (device_id,),
                )
        # The byte total is cached so put() does not scan the table; it is recomputed
        # from the rows at open and only changed after a successful commit.
        row = self._db.execute("SELECT COALESCE(SUM(LENGTH(payload)), 0) FROM records").fetchone()
        self._bytes: int = int(row[0])

    def close(self) -> None:
        """Close the SQLite connection; the outbox cannot be used afterwards."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def put(
        self,
        topic: str,
        body: bytes | Callable[[int], bytes],
        *,
        priority: int = 0,
        ttl_s: float | None = None,
        kind: str = "data",
    ) -> Record:
        """Commit a record; it is durable (per the policy) when this returns.

        Args:
            topic: MQTT topic to publish on.
            body: Payload bytes, published unchanged; or a function that builds them from
                the record's sequence number, so that the payload can carry it (the
                envelope does). It runs under the outbox lock: keep it quick.
            priority: Higher is sent first and dropped last.
            ttl_s: Seconds the record may wait; defaults to the policy's ``default_ttl_s``.
            kind: Record kind, stored for the caller's use.

        Returns:
            The stored record with its sequence number.

        Raises:
            OutboxFullError: The record is bigger than the bound, or the store is full under
                ``reject_new``, or ``drop_oldest`` found nothing it may drop.
            BadInputError: The topic cannot be published on (empty, wildcards).
        """
        _check_topic(topic)
        ttl = ttl_s if ttl_s is not None else self.policy.default_ttl_s
        with self._lock:
            now = self._clock()
            expires_at = now + ttl if ttl is not None else None
            with self._transaction():
                seq = int(
                    self._db.execute(
                        "SELECT next_seq FROM counters WHERE device_id = ?", (self.device_id,)
                    ).fetchone()[0]
                )
                payload = bytes(body(seq)) if callable(body) else bytes(body)
                size = len(payload)
                if size > self.policy.max_bytes:
                    raise OutboxFullError(
                        f"record of {size} bytes exceeds the outbox bound of "
                        f"{self.policy.max_bytes} bytes",
                        hint="split the payload or raise outbox max_bytes",
                    )
                freed = 0
                if self._bytes + size > self.policy.max_bytes:
                    freed += self._expire(now)
                if self._bytes - freed + size > self.policy.max_bytes:
                    freed += self._make_room(self._bytes - freed + size, priority)
                self._db.execute(
                    f"INSERT INTO records ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (seq, topic, payload, priority, kind, now, expires_at),
                )
                self._db.execute(
                    "UPDATE counters SET next_seq = ? WHERE device_id = ?",
                    (seq + 1, self.device_id),
                )
            self._bytes += size - freed
        return Record(seq, topic, payload, priority, kind, now, expires_at)

    def next_batch(self, limit: int) -> list[Record]:
        """Lease up to ``limit`` records to send: highest priority first, then by seq.

        Expired records met on the way are deleted and counted. Records already leased are
        skipped.

        Args:
            limit: Maximum number of records returned.

        Returns:
            The leased records, possibly empty.
        """
        if limit <= 0:
            return []
        with self._lock:
            now = self._clock()
            with self._transaction():
                freed = self._expire(now)
            self._bytes -= freed
            # Fetch enough rows to skip every leased one without a parameter per seq.
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM records ORDER BY priority DESC, seq LIMIT ?",
                (limit + len(self._leased),),
            ).fetchall()
            batch = [_record(r) for r in rows if r[0] not in self._leased][:limit]
            self._leased.update(r.seq for r in batch)
        return batch

    def ack(self, seq: int) -> None:
        """Delete a record the broker confirmed; unknown sequence numbers are ignored."""
        self.ack_many([seq])

    def ack_many(self, seqs: Iterable[int]) -> None:
        """Delete several confirmed records in one transaction (one commit, one fsync)."""
        seqs = list(seqs)
        if not seqs:
            return
        with self._lock:
            freed = 0
            with self._transaction():
                for seq in seqs:
                    row = self._db.execute(
                        "DELETE FROM records WHERE seq = ? RETURNING LENGTH(payload)", (seq,)
                    ).fetchone()
                    if row is not None:
                        freed += int(row[0])
            self._leased.difference_update(seqs)
            self._bytes -= freed

    def release(self, seq: int) -> None:
        """Return a leased record so that a later :meth:`next_batch` hands it out again."""
        with self._lock:
            self._leased.discard(seq)

    def release_all(self) -> None:
        """Return every leased record (the sender gave up on what it had in flight)."""
        with self._lock:
            self._leased.clear()

    def stats(self) -> OutboxStats:
        """Count what is stored, after deleting (and counting) expired records."""
        with self._lock:
            now = self._clock()
            with self._transaction():
                self._bytes -= self._expire(now)
            depth, total, oldest = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0), MIN(created_at) FROM records"
            ).fetchone()
            next_seq, dropped, expired = self._db.execute(
                "SELECT next_seq, dropped, expired FROM counters WHERE device_id = ?",
                (self.device_id,),
            ).fetchone()
        return OutboxStats(
            depth=int(depth),
            bytes=int(total),
            oldest_age_s=max(0.0, now - float(oldest)) if oldest is not None else 0.0,
            dropped=int(dropped),
            expired=int(expired),
            next_seq=int(next_seq),
        )

    # -- helpers; the caller holds self._lock and an open transaction --------------------

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)

    def _expire(self, now: float) -> int:
        """Delete unleased records past their expiry; return the payload bytes freed."""
        rows = self._db.execute(
            "SELECT seq, LENGTH(payload) FROM records WHERE expires_at IS NOT NULL "
            "AND expires_at <= ?",
            (now,),
        ).fetchall()
        victims = [(seq, size) for seq, size in rows if seq not in self._leased]
        if not victims:
            return 0
        self._db.executemany("DELETE FROM records WHERE seq = ?", [(s,) for s, _ in victims])
        self._db.execute(
            "UPDATE counters SET expired = expired + ? WHERE device_id = ?",
            (len(victims), self.device_id),
        )
        _log.info("outbox: %d record(s) expired", len(victims))
        return sum(int(size) for _, size in victims)

    def _make_room(self, needed_total: int, priority: int) -> int:
        """Apply the when-full policy so that ``needed_total`` bytes fit; return bytes freed.

        Raises:
            OutboxFullError: Under ``reject_new``, or when dropping every record of lower or
                equal priority still would not make room.
        """
        excess = needed_total - self.policy.max_bytes
        if self.policy.when_full == "reject_new":
            raise OutboxFullError(
                f"outbox full ({self._bytes} of {self.policy.max_bytes} bytes); record refused",
                hint="the link is down or too slow; or use when_full=drop_oldest",
            )
        victims: list[int] = []
        freed = 0
        # A new record may only displace records that matter no more than itself, lowest
        # priority and oldest first, so a burst of bulk data never evicts alarms.
        for seq, size in self._db.execute(
            "SELECT seq, LENGTH(payload) FROM records WHERE priority <= ? ORDER BY priority, seq",
            (priority,),
        ):
            if freed >= excess:
                break
            if seq in self._leased:
                continue
            victims.append(int(seq))
            freed += int(size)
        if freed < excess:
            raise OutboxFullError(
                f"outbox full ({self._bytes} of {self.policy.max_bytes} bytes) with records "
                f"of higher priority than {priority} or in flight; record refused",
                hint="raise outbox max_bytes or the record's priority",
            )
        self._db.executemany("DELETE FROM records WHERE seq = ?", [(s,) for s in victims])
        self._db.execute(
            "UPDATE counters SET dropped = dropped + ? WHERE device_id = ?",
            (len(victims), self.device_id),
        )
        _log.warning("outbox full: dropped %d oldest record(s) to make room", len(victims))
        return freed


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back if the block raises."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        # IMMEDIATE takes the write lock up front, so a read-then-write never has to be
        # retried because another writer slipped in between.
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if exc_type is None:
            self._db.execute("COMMIT")
        else:
            self._db.execute("ROLLBACK")
