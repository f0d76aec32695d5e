"""Durable store-and-forward outbox: every record is committed to SQLite before it is sent.

The outbox is one SQLite file per device in WAL mode (stdlib :mod:`sqlite3` only). A record
gets a per-device sequence number that only ever grows: the next value lives in a counter
table, so it survives deletes and restarts and is never reused. Triggers keep it: an insert
advances it in the same statement, and an insert below it is refused, so a connection
that caches the value (as :class:`Outbox` does) can never reuse a number unnoticed. The
sender takes records with :meth:`Outbox.next_batch`, publishes them and calls
:meth:`Outbox.ack` once the broker confirmed them; anything not acked is replayed after a
restart.

A record's payload is the envelope the sender publishes, and the broker refuses one over
the wire contract's :data:`~edgefl.proto.serde.MAX_ENVELOPE_BYTES` (mosquitto 2.0 answers
with a PUBACK paho 2.2 cannot parse: the client drops the connection and sends the record
again on every reconnect, so one such record would block the outbox for good). So
:meth:`Outbox.put` refuses a record over :attr:`OutboxPolicy.max_record_bytes` (at most
that limit) with :class:`RecordTooLargeError`, and :meth:`Outbox.next_batch` sets aside,
never hands out, one that an older version stored: it is deleted with an ERROR naming it.
Both are counted in the file (:attr:`OutboxStats.oversized_refused`,
:attr:`OutboxStats.oversized_set_aside`).

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
  milliseconds each; batch writes (:meth:`Outbox.put_many`) if you need both rate and
  ``FULL``.

Every outbox file has an *incarnation* (:attr:`Outbox.incarnation`): 128 random bits,
written as 32 lowercase hex digits when the file is created (or first opened by this
version) and kept in it. It travels in every envelope (version 2), and the server
deduplicates on ``(device_id, incarnation, seq)``. So a new file, whether the old one
was deleted, quarantined or the device reflashed, can start its seqs again without
colliding with seqs already stored, and without trusting any clock.

A file that is not a usable outbox at start-up (not an SQLite database, a malformed
schema, ``PRAGMA quick_check`` not ``ok``) is *quarantined*: it is renamed, with its
``-wal`` and ``-shm`` files, to ``<name>.corrupt-<UTC timestamp>`` (``-wal``/``-shm``
appended, so the three still open together for forensics), an ERROR is logged naming it,
and a fresh outbox, with a new incarnation, starts in its place
(:attr:`Outbox.quarantined`). The records in the quarantined file were not sent. The
fresh file's seqs still continue from the quarantined file's counter when that can be
read, and otherwise from ``wall-clock milliseconds * 1000``, so that the numbers stay
increasing for a reader of the device's records; correctness rests on the incarnation
alone.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import chain
from pathlib import Path
from typing import Final, Literal, NamedTuple, TypeAlias

from pydantic import Field

from edgefl.config import StrictModel
from edgefl.errors import BadInputError, ExitCode
from edgefl.proto.serde import MAX_ENVELOPE_BYTES, new_incarnation

__all__ = [
    "Body",
    "Outbox",
    "OutboxFullError",
    "OutboxItem",
    "OutboxPolicy",
    "OutboxStats",
    "Record",
    "RecordTooLargeError",
    "read_stats",
]

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
CREATE TABLE IF NOT EXISTS imports (
    key TEXT PRIMARY KEY,
    first_seq INTEGER NOT NULL,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS identity (
    incarnation TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS refusals (
    reason TEXT PRIMARY KEY,
    count INTEGER NOT NULL
);
CREATE TRIGGER IF NOT EXISTS records_seq_is_new BEFORE INSERT ON records
WHEN NEW.seq < (SELECT next_seq FROM counters)
BEGIN SELECT RAISE(ABORT, 'outbox seq reused'); END;
CREATE TRIGGER IF NOT EXISTS records_seq_counter AFTER INSERT ON records
BEGIN UPDATE counters SET next_seq = NEW.seq + 1 WHERE next_seq <= NEW.seq; END;
"""


class OutboxFullError(BadInputError):
    """The outbox cannot take a record without breaking its byte bound."""

    exit_code = ExitCode.BAD_INPUT


class RecordTooLargeError(BadInputError):
    """A record's payload (the envelope) is over the largest the fleet carries.

    Attributes:
        size: The payload's bytes.
        limit: :attr:`OutboxPolicy.max_record_bytes`.
        index: Position of the record in the refused call's items, so a producer can
            store the others without offering (and counting) this one again.
    """

    exit_code = ExitCode.BAD_INPUT

    def __init__(self, size: int, limit: int, index: int = 0) -> None:
        super().__init__(
            f"record of {size} bytes is over the largest payload the fleet carries "
            f"({limit} bytes); refused",
            hint="send smaller records (split the data or lower the rate of a batched source)",
        )
        self.size = size
        self.limit = limit
        self.index = index


# refusals.reason of a record refused by put() and of a stored one set aside unsent.
_OVERSIZED_REFUSED: Final = "oversized"
_OVERSIZED_SET_ASIDE: Final = "oversized_stored"


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
    max_record_bytes: int = Field(
        default=MAX_ENVELOPE_BYTES,
        gt=0,
        le=MAX_ENVELOPE_BYTES,
        description=(
            "Largest record payload (the encoded envelope) accepted; larger ones are "
            "refused with RecordTooLargeError. At most the wire contract's "
            f"MAX_ENVELOPE_BYTES ({MAX_ENVELOPE_BYTES}), which the broker enforces."
        ),
    )
    synchronous: Literal["NORMAL", "FULL"] = Field(
        default="NORMAL",
        description=(
            "SQLite synchronous mode. NORMAL survives a process crash; FULL also survives "
            "power loss at the cost of one fsync per commit."
        ),
    )


class Record(NamedTuple):
    """One stored record (immutable; a named tuple, so building one per record is cheap).

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
        oversized_refused: Records :meth:`Outbox.put` refused as larger than
            ``max_record_bytes``, over the life of the file.
        oversized_set_aside: Stored records (from an older version) found larger than
            ``max_record_bytes`` and deleted unsent, over the life of the file.
    """

    depth: int
    bytes: int
    oldest_age_s: float
    dropped: int
    expired: int
    next_seq: int
    oversized_refused: int = 0
    oversized_set_aside: int = 0


Body: TypeAlias = bytes | Callable[[int], bytes]
"""A payload, or a function that builds it from the record's sequence number."""


@dataclass(frozen=True, slots=True)
class OutboxItem:
    """One record to store with :meth:`Outbox.put_many` (the arguments of :meth:`Outbox.put`).

    Attributes:
        topic: MQTT topic to publish on.
        body: Payload bytes, or a function that builds them from the sequence number.
        priority: Higher is sent first and dropped last.
        ttl_s: Seconds the record may wait; ``None`` uses the policy's ``default_ttl_s``.
        kind: Record kind, stored for the caller's use.
    """

    topic: str
    body: Body
    priority: int = 0
    ttl_s: float | None = None
    kind: str = "data"


_COLUMNS = "seq, topic, payload, priority, kind, created_at, expires_at"
# The first ?3 records after a send-order cursor (priority ?1, seq ?2): the rest of its
# priority, then the lower priorities; each part is one range scan of records_send_order.
_AFTER_CURSOR: Final = (
    f"SELECT * FROM (SELECT {_COLUMNS} FROM records WHERE priority = ?1 AND seq > ?2 "
    "ORDER BY seq LIMIT ?3) "
    f"UNION ALL SELECT * FROM (SELECT {_COLUMNS} FROM records WHERE priority < ?1 "
    "ORDER BY priority DESC, seq LIMIT ?3) ORDER BY priority DESC, seq LIMIT ?3"
)
_EXPECTED_COLUMNS: Final = {
    "records": {"seq", "topic", "payload", "priority", "kind", "created_at", "expires_at"},
    "counters": {"device_id", "next_seq", "dropped", "expired"},
}
# Rows per INSERT statement (7 bound parameters each, far below SQLite's limit).
_ROWS_PER_INSERT: Final = 500
# Sequence numbers per DELETE statement.
_ROWS_PER_DELETE: Final = 500
# SQLite result codes that mean "this file is damaged", as opposed to busy, locked,
# read-only or out of disk space, which must never cost the records in the file.
_CORRUPTION_CODES: Final = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})
_SIDE_FILES: Final = ("-wal", "-shm")
_INCARNATION: Final = re.compile(r"[0-9a-f]{32}")
# How long put_once() remembers a key (its producers delete their copy right after).
_IMPORT_KEY_TTL_S: Final = 30 * 24 * 3600.0
# Most records, and payload bytes, the in-memory tail of unleased records may hold (see
# Outbox._tail): enough that a sender a few seconds behind its producers still takes
# records from memory; a longer backlog is read back from the file.
_TAIL_MAX: Final = 32768
_TAIL_MAX_BYTES: Final = 8 * 1024 * 1024


class _CorruptOutboxError(Exception):
    """The outbox file cannot be used; the message says why."""


class _StaleSeqError(Exception):
    """The cached next sequence number is behind the file (another connection wrote)."""


# tuple.__new__(Record, row): a Record from a row without NamedTuple's Python __new__.
_new_record: Final = tuple.__new__


@functools.lru_cache(maxsize=64)
def _insert_sql(rows: int) -> str:
    """The multi-row INSERT of ``rows`` records."""
    return f"INSERT INTO records ({_COLUMNS}) VALUES " + ", ".join(["(?, ?, ?, ?, ?, ?, ?)"] * rows)


def _check_topic(topic: str) -> None:
    # Refused here, not at publish time: a record stored with a topic paho rejects would
    # sit in the outbox forever.
    if not topic or "+" in topic or "#" in topic or "\0" in topic:
        raise BadInputError(f"invalid MQTT topic for a record: {topic!r}")
    if len(topic.encode("utf-8")) > 65535:
        raise BadInputError("MQTT topic longer than 65535 bytes")


class Outbox:
    """A durable, byte-bounded outbox for one device.

    Thread-safe: one SQLite connection guarded by a lock, so producers and the single
    sender thread can share an instance. Records handed out by :meth:`next_batch` are
    *leased* in memory until :meth:`ack` or :meth:`release`: a leased record is not handed
    out again, dropped or expired, because it may already be on the wire. Leases do not
    survive a restart, which is what makes start-up replay everything that is left.

    Cost per record matters: the agent's other threads (paho's network thread above all)
    want the GIL that every call into SQLite gives up and takes back. A put is a single
    multi-row INSERT (SQLite commits one statement atomically by itself) unless the bound
    forces a drop or expiry; records put while the sender has leased everything else are
    handed to it from memory, not read back; and an ack of leased records is one DELETE.

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
        self._leased: dict[int, int] = {}  # seq -> payload bytes
        # Send-order position (priority, seq) of the last record leased, while every stored
        # record at or before it is leased: next_batch() then continues after it instead of
        # reading (and skipping) every leased row again. None means "scan from the start".
        self._cursor: tuple[int, int] | None = None
        # The records committed by this instance that no one has leased yet, in send order,
        # while that is *every* such record in the file (None when unknown): next_batch()
        # then hands them out without reading them back from SQLite. Any drop, expiry,
        # release or out-of-order put resets it to None and next_batch() reads the file.
        self._tail: deque[Record] | None = None
        self._tail_bytes = 0  # payload bytes in self._tail
        self.quarantined: Path | None = None
        """Where a corrupt file found at start-up was moved to, or ``None``."""
        self.incarnation: str = ""
        """This file's identity, 32 lowercase hex digits (see the module docstring); it
        goes into every envelope built from its records."""
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = self._open(first_seq=1)
        except _CorruptOutboxError as exc:
            self.quarantined = _quarantine(path, clock())
            first_seq, source = _seq_after_corruption(self.quarantined, device_id, clock())
            _log.error(
                "OUTBOX CORRUPT: %s is not a usable outbox (%s). Moved it to %s; the records "
                "in it were NOT sent and will not be. Starting a fresh outbox at seq %d (%s).",
                path,
                exc,
                self.quarantined,
                first_seq,
                source,
            )
            self._db = self._open(first_seq=first_seq)
        self.incarnation = str(self._db.execute("SELECT incarnation FROM identity").fetchone()[0])
        # The byte total is cached so put() does not scan the table; it is recomputed
        # from the rows at open and only changed after a successful commit.
        row = self._db.execute(
            "SELECT COALESCE(SUM(LENGTH(payload)), 0), COUNT(expires_at) FROM records"
        ).fetchone()
        self._bytes: int = int(row[0])
        # Whether any stored record has a TTL; while not, next_batch() skips the expiry check.
        self._may_expire: bool = int(row[1]) > 0
        # The next seq, kept here so a put needs no read; the seq triggers refuse a stale
        # one (another connection wrote to the file), and put_many() then reloads it.
        self._next_seq = self._read_next_seq()

    def _open(self, first_seq: int) -> sqlite3.Connection:
        """Open, check and (if new) initialise the file.

        Raises:
            _CorruptOutboxError: The file is damaged or is not an outbox.
            BadInputError: The file belongs to another device.
            sqlite3.Error: Any other SQLite failure (locked, read-only, disk full ...).
        """
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT), so
        # a record and the counters that describe it are always committed together.
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={self.policy.synchronous}")
            # quick_check reads every page (O(file size), no index cross-checks): worth it
            # once at start-up so damage is found here and not by a failing put().
            problems = [str(r[0]) for r in db.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                raise _CorruptOutboxError("quick_check: " + "; ".join(problems[:3]))
            with _Transaction(db):
                for table, expected in _EXPECTED_COLUMNS.items():
                    found = {str(r[1]) for r in db.execute(f"PRAGMA table_info({table})")}
                    if found and not expected <= found:  # no columns: table not created yet
                        raise _CorruptOutboxError(
                            f"table {table} lacks columns {sorted(expected - found)}"
                        )
                for statement in _split_schema(_SCHEMA):
                    db.execute(statement)
                owners = [r[0] for r in db.execute("SELECT device_id FROM counters")]
                if owners and owners != [self.device_id]:
                    raise BadInputError(
                        f"outbox {self.path} belongs to device {owners[0]!r}, "
                        f"not {self.device_id!r}",
                        hint="give every device its own outbox file",
                    )
                if not owners:
                    db.execute(
                        "INSERT INTO counters (device_id, next_seq, dropped, expired) "
                        "VALUES (?, ?, 0, 0)",
                        (self.device_id, first_seq),
                    )
                incarnations = [str(r[0]) for r in db.execute("SELECT incarnation FROM identity")]
                if not incarnations:
                    # A new file, or one written before incarnations existed: its records
                    # already in it were encoded without one (envelope version 1), and
                    # their seqs stay unique under the empty incarnation.
                    db.execute(
                        "INSERT INTO identity (incarnation) VALUES (?)", (new_incarnation(),)
                    )
                elif len(incarnations) > 1 or not _INCARNATION.fullmatch(incarnations[0]):
                    raise _CorruptOutboxError(
                        f"identity table holds {incarnations[:2]!r}, not one incarnation"
                    )
        except sqlite3.DatabaseError as exc:
            db.close()
            if exc.sqlite_errorcode in _CORRUPTION_CODES:
                raise _CorruptOutboxError(f"{exc} ({exc.sqlite_errorname})") from exc
            raise
        except BaseException:
            db.close()
            raise
        return db

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
        body: Body,
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
            RecordTooLargeError: The payload is over ``max_record_bytes`` (counted).
            OutboxFullError: The record is bigger than the bound, or the store is full under
                ``reject_new``, or ``drop_oldest`` found nothing it may drop.
            BadInputError: The topic cannot be published on (empty, wildcards).
        """
        return self.put_many([OutboxItem(topic, body, priority, ttl_s, kind)])[0]

    def put_many(self, items: Sequence[OutboxItem | tuple[str, Body]]) -> list[Record]:
        """Commit several records in one transaction (one commit, one fsync under ``FULL``).

        Each record gets the same treatment as in :meth:`put`, in order: consecutive
        sequence numbers, TTL and the when-full policy. The call is atomic: if any record
        is refused, nothing of the call is stored, no sequence number is consumed and
        nothing is dropped. So under ``reject_new`` the whole batch must fit (after
        expired records are removed); under ``drop_oldest`` each record may displace
        older records of no higher priority exactly as a :meth:`put` would, including
        earlier records of the same batch (they are counted as dropped), and the call
        fails only if a record cannot be made room for.

        Args:
            items: :class:`OutboxItem` instances, or ``(topic, body)`` pairs that take the
                defaults of :meth:`put`.

        Returns:
            The stored records, in the order of ``items``.

        Raises:
            RecordTooLargeError: A payload is over ``max_record_bytes`` (counted; nothing of
                the call is stored).
            OutboxFullError: A record is bigger than the bound, or the batch does not fit
                under ``reject_new``, or ``drop_oldest`` cannot make room for a record.
            BadInputError: A topic cannot be published on (empty, wildcards).
        """
        batch = list(items)
        # A batch mostly shares one topic. (topic, body) pairs are taken as they are: no
        # OutboxItem is built per record.
        for topic in {it.topic if isinstance(it, OutboxItem) else it[0] for it in batch}:
            _check_topic(topic)
        if not batch:
            return []
        with self._lock:
            try:
                try:
                    return self._put_locked(batch)
                except _StaleSeqError:
                    # Another connection added records to this file: continue after them.
                    self._next_seq = self._read_next_seq()
                    self._tail = None
                    return self._put_locked(batch)
            except RecordTooLargeError:
                self._count_refusals(_OVERSIZED_REFUSED, 1)
                raise

    def put_once(self, key: str, items: Sequence[OutboxItem]) -> list[Record] | None:
        """Commit ``items`` unless a :meth:`put_once` with the same ``key`` committed before.

        The key and the records are committed in one transaction, so a producer that hands
        over records from elsewhere (a file another process wrote) and deletes its copy
        afterwards can crash between the two and retry without storing anything twice.
        Keys are kept for :data:`_IMPORT_KEY_TTL_S` seconds.

        Returns:
            The stored records, or ``None`` when the key was already committed.

        Raises:
            RecordTooLargeError: As :meth:`put_many` (nothing is stored, the key is not kept).
            OutboxFullError: As :meth:`put_many` (nothing is stored, the key is not kept).
            BadInputError: A topic cannot be published on.
        """
        batch = list(items)
        for topic in {item.topic for item in batch}:
            _check_topic(topic)
        with self._lock:
            try:
                with self._transaction():
                    if self._db.execute("SELECT 1 FROM imports WHERE key = ?", (key,)).fetchone():
                        return None
                    now = self._clock()
                    self._db.execute("DELETE FROM imports WHERE at < ?", (now - _IMPORT_KEY_TTL_S,))
                    records = self._put_locked(batch) if batch else []
                    self._db.execute(
                        "INSERT INTO imports (key, first_seq, at) VALUES (?, ?, ?)",
                        (key, records[0].seq if records else self._next_seq, now),
                    )
                    return records
            except RecordTooLargeError:
                # Counted after the rollback, in a transaction of its own.
                self._count_refusals(_OVERSIZED_REFUSED, 1)
                raise

    def _put_locked(self, batch: Sequence[OutboxItem | tuple[str, Body]]) -> list[Record]:
        default_ttl = self.policy.default_ttl_s
        max_bytes = self.policy.max_bytes
        max_record = self.policy.max_record_bytes
        now = self._clock()
        first = self._next_seq
        default_expiry = now + default_ttl if default_ttl is not None else None
        # The records are the INSERT's rows as they are (a Record is a tuple in column
        # order): one tuple per record, built by the C constructor.
        rows: list[Record] = []
        total = 0
        for seq, item in enumerate(batch, start=first):
            if isinstance(item, OutboxItem):
                topic, body, priority, kind = item.topic, item.body, item.priority, item.kind
                ttl = item.ttl_s
                expires_at = now + ttl if ttl is not None else default_expiry
            else:
                topic, body = item
                priority, kind, expires_at = 0, "data", default_expiry
            payload = body(seq) if callable(body) else body
            if type(payload) is not bytes:
                payload = bytes(payload)
            size = len(payload)
            if size > max_record:
                # The broker would refuse it in a way that blocks the outbox (see the
                # module docstring): refused here, before anything of the call is stored.
                raise RecordTooLargeError(size, max_record, seq - first)
            if size > max_bytes:
                raise OutboxFullError(
                    f"record of {size} bytes exceeds the outbox bound of {max_bytes} bytes",
                    hint="split the payload or raise outbox max_bytes",
                )
            rows.append(_new_record(Record, (seq, topic, payload, priority, kind, now, expires_at)))
            total += size
        freed = 0
        if self._bytes + total <= max_bytes and len(rows) <= _ROWS_PER_INSERT:
            # The common case: one INSERT statement, which SQLite commits atomically on its
            # own (the counter is advanced by a trigger in the same statement). One call
            # into SQLite per batch, which matters to a process whose other threads want
            # the GIL that every call gives up and takes back.
            self._insert(rows)
        else:
            with self._transaction():
                if self._bytes + total > max_bytes:
                    freed += self._expire(now)
                if self._bytes - freed + total <= max_bytes:
                    self._insert(rows)
                elif self.policy.when_full == "reject_new" or len(rows) == 1:
                    freed += self._make_room(self._bytes - freed + total, rows[0][3], len(rows))
                    self._insert(rows)
                else:
                    # drop_oldest, several records: room is made record by record so each
                    # one only displaces what a put() of it would have displaced.
                    stored = self._bytes - freed
                    for row in rows:
                        size = len(row[2])
                        if stored + size > max_bytes:
                            made = self._make_room(stored + size, row[3], 1)
                            freed += made
                            stored -= made
                        self._insert([row])
                        stored += size
        self._next_seq = first + len(rows)
        self._bytes += total - freed
        if default_expiry is not None or any(row[6] is not None for row in rows):
            self._may_expire = True
        cursor = self._cursor
        if cursor is not None and max(row[3] for row in rows) > cursor[0]:
            self._cursor = None  # a new record sorts before the cursor
        self._extend_tail(rows, total)
        return rows

    def _insert(self, rows: list[Record]) -> None:
        """INSERT ``rows``, a multi-row statement per chunk.

        Raises:
            _StaleSeqError: A sequence number is already used (see the seq triggers).
        """
        try:
            for start in range(0, len(rows), _ROWS_PER_INSERT):
                chunk = rows[start : start + _ROWS_PER_INSERT]
                self._db.execute(_insert_sql(len(chunk)), list(chain.from_iterable(chunk)))
        except sqlite3.IntegrityError as exc:
            if "outbox seq reused" in str(exc) or "records.seq" in str(exc):
                raise _StaleSeqError(str(exc)) from exc
            raise

    def _read_next_seq(self) -> int:
        row = self._db.execute(
            "SELECT next_seq FROM counters WHERE device_id = ?", (self.device_id,)
        ).fetchone()
        return int(row[0])

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
            if self._may_expire:
                now = self._clock()
                # A read first: a write transaction (and its commit) per batch only when
                # something did expire.
                if self._has_expired(now):
                    with self._transaction():
                        self._bytes -= self._expire(now)
            leased = self._leased
            tail = self._tail
            batch: list[Record] = []
            if tail is not None:
                batch = [tail.popleft() for _ in range(min(limit, len(tail)))]
                if batch:
                    self._cursor = (batch[-1].priority, batch[-1].seq)
                    sizes = {r.seq: len(r.payload) for r in batch}
                    leased.update(sizes)
                    self._tail_bytes -= sum(sizes.values())
                return batch
            cursor = self._cursor
            if cursor is None:
                # Fetch enough rows to skip every leased one without a parameter per seq.
                rows = self._db.execute(
                    f"SELECT {_COLUMNS} FROM records ORDER BY priority DESC, seq LIMIT ?",
                    (limit + len(leased),),
                ).fetchall()
            else:
                # Everything up to the cursor is leased: read on from there.
                rows = self._db.execute(_AFTER_CURSOR, (cursor[0], cursor[1], limit)).fetchall()
            unleased = [r for r in rows if r[0] not in leased]
            max_record = self.policy.max_record_bytes
            if any(len(r[2]) > max_record for r in unleased):
                unleased = self._set_aside_oversized(unleased, max_record)
            # Rows come back in column order, which is the Record's: no copy per field.
            batch = [_new_record(Record, r) for r in unleased[:limit]]
            fetched = limit if cursor is not None else limit + len(leased)
            if len(rows) < fetched and len(unleased) <= limit:
                # Every unleased record was read, and is now handed out: from here on the
                # records put by this instance are the only unleased ones.
                self._tail = deque()
                self._tail_bytes = 0
            if batch:
                # Rows are read in send order and every one skipped was leased, so all
                # records up to the last one handed out are now leased.
                self._cursor = (batch[-1].priority, batch[-1].seq)
                leased.update((r.seq, len(r.payload)) for r in batch)
        return batch

    def _set_aside_oversized(self, rows: list[Record], max_record: int) -> list[Record]:
        """Delete (and count) the stored records over ``max_record``; return the others.

        Only an older version, which did not check the size at put, stored such records.
        Publishing one would never end (see the module docstring), so it is dropped with
        an ERROR naming it, and every other record goes on.
        """
        big = [r for r in rows if len(r[2]) > max_record]
        with self._transaction():
            self._db.executemany("DELETE FROM records WHERE seq = ?", [(r[0],) for r in big])
            self._add_refusals(_OVERSIZED_SET_ASIDE, len(big))
        self._bytes -= sum(len(r[2]) for r in big)
        self._tail = None
        for r in big:
            _log.error(
                "outbox: record seq=%d on %s (%s) is %d bytes, over the %d the fleet carries: "
                "set aside unsent (the broker would refuse it and block the outbox)",
                r[0],
                r[1],
                r[4],
                len(r[2]),
                max_record,
            )
        return [r for r in rows if len(r[2]) <= max_record]

    def _count_refusals(self, reason: str, count: int) -> None:
        """Add ``count`` to the refusals of ``reason``; the caller holds the lock."""
        try:
            with self._transaction():
                self._add_refusals(reason, count)
        except sqlite3.Error as exc:  # the refusal itself matters more than its count
            _log.error("outbox: cannot count a refused record (%s): %s", reason, exc)

    def _add_refusals(self, reason: str, count: int) -> None:
        self._db.execute(
            "INSERT INTO refusals (reason, count) VALUES (?, ?) "
            "ON CONFLICT (reason) DO UPDATE SET count = count + excluded.count",
            (reason, count),
        )

    def ack(self, seq: int) -> None:
        """Delete a record the broker confirmed; unknown sequence numbers are ignored."""
        self.ack_many([seq])

    def ack_many(self, seqs: Iterable[int]) -> None:
        """Delete several confirmed records in one transaction (one commit, one fsync)."""
        seqs = list(seqs)
        if not seqs:
            return
        with self._lock:
            leased = self._leased
            if all(seq in leased for seq in seqs) and len(set(seqs)) == len(seqs):
                # The usual case: the sender acks what it leased, whose sizes are known, so
                # one DELETE per chunk does it; a single chunk needs no BEGIN/COMMIT (one
                # statement is one transaction). This runs for every batch of PUBACKs.
                freed = sum(leased[seq] for seq in seqs)
                chunks = [
                    seqs[i : i + _ROWS_PER_DELETE] for i in range(0, len(seqs), _ROWS_PER_DELETE)
                ]
                with contextlib.ExitStack() as stack:
                    if len(chunks) > 1:
                        stack.enter_context(self._transaction())
                    for chunk in chunks:
                        marks = ",".join("?" * len(chunk))
                        self._db.execute(f"DELETE FROM records WHERE seq IN ({marks})", chunk)
            else:
                # Unknown or unleased seqs: ask SQLite what was there.
                self._tail = None  # an unleased record may be deleted: it may be in the tail
                freed = 0
                with self._transaction():
                    for start in range(0, len(seqs), _ROWS_PER_DELETE):
                        chunk = seqs[start : start + _ROWS_PER_DELETE]
                        marks = ",".join("?" * len(chunk))
                        for (size,) in self._db.execute(
                            f"DELETE FROM records WHERE seq IN ({marks}) RETURNING LENGTH(payload)",
                            chunk,
                        ).fetchall():
                            freed += int(size)
            for seq in seqs:
                leased.pop(seq, None)
            self._bytes -= freed

    def release(self, seq: int) -> None:
        """Return a leased record so that a later :meth:`next_batch` hands it out again."""
        self.release_many([seq])

    def release_many(self, seqs: Iterable[int]) -> None:
        """Return several leased records (see :meth:`release`)."""
        with self._lock:
            for seq in seqs:
                self._leased.pop(seq, None)
            self._cursor = None
            self._tail = None

    def release_all(self) -> None:
        """Return every leased record (the sender gave up on what it had in flight)."""
        with self._lock:
            self._leased.clear()
            self._cursor = None
            self._tail = None

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
            refusals = _read_refusals(self._db)
        return OutboxStats(
            depth=int(depth),
            bytes=int(total),
            oldest_age_s=max(0.0, now - float(oldest)) if oldest is not None else 0.0,
            dropped=int(dropped),
            expired=int(expired),
            next_seq=int(next_seq),
            oversized_refused=refusals.get(_OVERSIZED_REFUSED, 0),
            oversized_set_aside=refusals.get(_OVERSIZED_SET_ASIDE, 0),
        )

    # -- helpers; the caller holds self._lock and an open transaction --------------------

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)

    def _extend_tail(self, records: list[Record], size: int) -> None:
        """Add just-committed records (``size`` payload bytes) to the tail, in send order."""
        tail = self._tail
        if tail is None:
            return
        if len(tail) + len(records) > _TAIL_MAX or self._tail_bytes + size > _TAIL_MAX_BYTES:
            self._tail = None  # nobody is sending: do not hold the backlog in memory too
            return
        last = tail[-1].priority if tail else None
        for record in records:
            if last is not None and record.priority > last:
                self._tail = None  # it must be sent before older records: read the file
                return
            last = record.priority
        tail.extend(records)
        self._tail_bytes += size

    def _has_expired(self, now: float) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM records WHERE expires_at IS NOT NULL AND expires_at <= ? LIMIT 1",
            (now,),
        ).fetchone()
        return row is not None

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
        self._tail = None
        self._db.executemany("DELETE FROM records WHERE seq = ?", [(s,) for s, _ in victims])
        self._db.execute(
            "UPDATE counters SET expired = expired + ? WHERE device_id = ?",
            (len(victims), self.device_id),
        )
        _log.info("outbox: %d record(s) expired", len(victims))
        return sum(int(size) for _, size in victims)

    def _make_room(self, needed_total: int, priority: int, count: int) -> int:
        """Apply the when-full policy so that ``needed_total`` bytes fit; return bytes freed.

        Raises:
            OutboxFullError: Under ``reject_new``, or when dropping every record of lower or
                equal priority still would not make room.
        """
        excess = needed_total - self.policy.max_bytes
        if self.policy.when_full == "reject_new":
            what = "record refused" if count == 1 else f"batch of {count} records refused"
            raise OutboxFullError(
                f"outbox full ({self._bytes} of {self.policy.max_bytes} bytes); {what}",
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
        self._tail = None
        self._db.executemany("DELETE FROM records WHERE seq = ?", [(s,) for s in victims])
        self._db.execute(
            "UPDATE counters SET dropped = dropped + ? WHERE device_id = ?",
            (len(victims), self.device_id),
        )
        _log.warning("outbox full: dropped %d oldest record(s) to make room", len(victims))
        return freed


def read_stats(
    path: Path, device_id: str, *, clock: Callable[[], float] = time.time
) -> OutboxStats:
    """:meth:`Outbox.stats` of a file, read without writing anything (``agent status``).

    It never creates, migrates, expires or quarantines: the file may belong to a running
    agent. Records past their TTL are counted as ``expired`` (the agent deletes them at
    its next put or batch), not in ``depth`` and ``bytes``.

    The file is opened ``mode=ro``. While the agent has it open, its ``-wal`` and ``-shm``
    exist and the reader takes part in the WAL protocol through them. Without a ``-wal``
    nobody has the file open and everything is in the main file; then it is opened
    ``immutable=1`` too, because a plain read-only open would create ``-wal`` and
    ``-shm`` that it cannot delete again, owned by whoever ran ``status``: an agent
    running as another user could then not open its own outbox. An agent that starts
    during that read writes to its new ``-wal``, not the main file, until a checkpoint.

    Raises:
        BadInputError: No file at ``path``, it is damaged or not an outbox, or it belongs
            to another device; the message says which.
    """
    if not path.is_file():
        raise BadInputError(f"no outbox at {path}")
    immutable = "" if Path(f"{path}-wal").exists() else "&immutable=1"
    uri = f"{path.resolve().as_uri()}?mode=ro{immutable}"
    now = clock()
    try:
        db = sqlite3.connect(uri, uri=True, isolation_level=None)
        try:
            problems = [str(r[0]) for r in db.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                raise BadInputError(
                    f"outbox {path} is damaged (quick_check: {'; '.join(problems[:3])})",
                    hint="the agent sets it aside and starts a fresh one when it next starts",
                )
            db.execute("BEGIN")  # one snapshot for both queries
            counters = db.execute(
                "SELECT device_id, next_seq, dropped, expired FROM counters"
            ).fetchall()
            depth, total, oldest, stale = db.execute(
                "SELECT COUNT(*) FILTER (WHERE live), "
                "COALESCE(SUM(LENGTH(payload)) FILTER (WHERE live), 0), "
                "MIN(created_at) FILTER (WHERE live), COUNT(*) FILTER (WHERE NOT live) "
                "FROM (SELECT payload, created_at, "
                "expires_at IS NULL OR expires_at > ? AS live FROM records)",
                (now,),
            ).fetchone()
            refusals = _read_refusals(db)
            db.execute("COMMIT")
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        raise BadInputError(
            f"outbox {path} is not a usable outbox: {exc}",
            hint="the agent sets a damaged file aside when it next starts",
        ) from exc
    if [str(r[0]) for r in counters] != [device_id]:
        owner = counters[0][0] if counters else None
        raise BadInputError(
            f"outbox {path} belongs to device {owner!r}, not {device_id!r}"
            if owner is not None
            else f"outbox {path} has no counters yet"
        )
    _, next_seq, dropped, expired = counters[0]
    return OutboxStats(
        depth=int(depth),
        bytes=int(total),
        oldest_age_s=max(0.0, now - float(oldest)) if oldest is not None else 0.0,
        dropped=int(dropped),
        expired=int(expired) + int(stale),
        next_seq=int(next_seq),
        oversized_refused=refusals.get(_OVERSIZED_REFUSED, 0),
        oversized_set_aside=refusals.get(_OVERSIZED_SET_ASIDE, 0),
    )


def _read_refusals(db: sqlite3.Connection) -> dict[str, int]:
    """Refused records per reason; none in a file written before the table existed."""
    try:
        return {str(r): int(n) for r, n in db.execute("SELECT reason, count FROM refusals")}
    except sqlite3.OperationalError:  # no such table (read-only look at an older file)
        return {}


def _split_schema(script: str) -> list[str]:
    """The statements of ``script`` (a trigger body holds ``;`` of its own)."""
    statements: list[str] = []
    current = ""
    for piece in script.split(";"):
        current += piece + ";"
        if sqlite3.complete_statement(current):
            if current.strip(" \n;"):
                statements.append(current.strip())
            current = ""
    return statements


def _quarantine(path: Path, now: float) -> Path:
    """Rename ``path`` and its ``-wal``/``-shm`` aside; return the new database path."""
    stamp = datetime.fromtimestamp(now, UTC).strftime("%Y%m%dT%H%M%SZ")
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while any(Path(f"{target}{s}").exists() for s in ("", *_SIDE_FILES)):
        target = path.with_name(f"{path.name}.corrupt-{stamp}.{n}")
        n += 1
    # The side files first: a -wal left next to a fresh database would be replayed into it.
    for suffix in _SIDE_FILES:
        side = Path(f"{path}{suffix}")
        if side.exists():
            os.replace(side, f"{target}{suffix}")
    os.replace(path, target)
    return target


def _seq_after_corruption(quarantined: Path, device_id: str, now: float) -> tuple[int, str]:
    """The first seq of the fresh outbox, and where it came from (for the log).

    The counter of the quarantined file (and its highest stored seq) when they can be
    read; otherwise ``now`` in milliseconds times 1000, see the module docstring.
    """
    counter: int | None = None
    highest: int | None = None
    try:
        db = sqlite3.connect(f"file:{quarantined}?mode=ro", uri=True)
        try:
            counter = _read_int(db, "SELECT next_seq FROM counters WHERE device_id = ?", device_id)
            highest = _read_int(db, "SELECT MAX(seq) FROM records")
        finally:
            db.close()
    except sqlite3.Error:
        pass
    if counter is not None:
        after_highest = highest + 1 if highest is not None else 1
        return max(counter, after_highest), "continuing the quarantined file's counter"
    time_based = int(now * 1000) * 1000
    if highest is not None:
        time_based = max(time_based, highest + 1)
    return time_based, "its counter is unreadable: milliseconds since the epoch x 1000"


def _read_int(db: sqlite3.Connection, query: str, *params: object) -> int | None:
    try:
        row = db.execute(query, params).fetchone()
    except sqlite3.Error:
        return None
    return row[0] if row is not None and isinstance(row[0], int) else None


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back if the block raises."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self._nested = False

    def __enter__(self) -> None:
        if self._db.in_transaction:
            # Inside an outer transaction (put_once around a put): a savepoint, so the
            # outer one still commits or rolls back everything together.
            self._nested = True
            self._db.execute("SAVEPOINT nested")
            return
        # IMMEDIATE takes the write lock up front, so a read-then-write never has to be
        # retried because another writer slipped in between.
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if self._nested:
            if exc_type is not None:
                self._db.execute("ROLLBACK TO nested")
            self._db.execute("RELEASE nested")
        elif exc_type is None:
            self._db.execute("COMMIT")
        else:
            self._db.execute("ROLLBACK")
