"""Registry tables: ``devices``, ``records`` and ``dead_letters``.

Timestamps are timezone-aware UTC on PostgreSQL. SQLite has no time zone type, so
values read back there are naive and mean UTC.

Schema changes go through an alembic revision in ``migrations/versions/``; a test checks
that the migrations and these models agree.
"""

from __future__ import annotations

from datetime import datetime
from typing import Final

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = ["DEAD_LETTER_PAYLOAD_CAP", "Base", "DeadLetter", "Device", "Record"]

DEAD_LETTER_PAYLOAD_CAP: Final = 64 * 1024
"""Dead letters keep at most this many leading payload bytes (``payload_size`` keeps the
original length)."""

# Explicit constraint names so alembic migrations are stable across databases.
_NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY.
_ID = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    """Declarative base of the registry tables."""

    metadata = MetaData(naming_convention=_NAMING)


class Device(Base):
    """A device the cloud has heard from, with its presence.

    Attributes:
        device_id: The device identity (``{device}`` topic segment).
        fleet: The fleet of the topic it last published on.
        first_seen: When the ingest first heard from it.
        last_seen: When the ingest last accepted anything from it.
        online: Presence from the retained ``status`` topic (``online``/``offline``).
        status_changed_at: When ``online`` was last set from a status message.
    """

    __tablename__ = "devices"

    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    fleet: Mapped[str] = mapped_column(String(64), index=True)
    first_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    online: Mapped[bool] = mapped_column(Boolean(create_constraint=False), default=False)
    status_changed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Record(Base):
    """One accepted envelope, stored at most once per ``(device_id, seq)``.

    Attributes:
        id: Surrogate key, in insertion order.
        device_id: Sender.
        seq: Per-device sequence number (the idempotency key with ``device_id``).
        kind: Envelope kind.
        topic: The MQTT topic it arrived on.
        ts_ms: Device time, Unix milliseconds.
        content_type: MIME type of ``body``.
        body: The envelope body.
        received_at: When the ingest stored it.
    """

    __tablename__ = "records"
    __table_args__ = (UniqueConstraint("device_id", "seq"),)

    id: Mapped[int] = mapped_column(_ID, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(64), ForeignKey("devices.device_id"))
    seq: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(64))
    topic: Mapped[str] = mapped_column(Text)
    ts_ms: Mapped[int] = mapped_column(BigInteger)
    content_type: Mapped[str] = mapped_column(String(255))
    body: Mapped[bytes] = mapped_column(LargeBinary)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class DeadLetter(Base):
    """A payload the ingest refused, kept with the reason instead of being lost.

    Attributes:
        id: Surrogate key, in arrival order.
        topic: The MQTT topic it arrived on.
        payload: The first :data:`DEAD_LETTER_PAYLOAD_CAP` bytes of the payload.
        payload_size: The original payload length in bytes.
        reason: A short code (``malformed_envelope``, ``oversized``, ``device_mismatch``,
            ``bad_topic``, ``bad_status``, ``seq_out_of_range``, ``store_failed``).
        detail: A human-readable explanation.
        received_at: When the ingest refused it.
    """

    __tablename__ = "dead_letters"

    id: Mapped[int] = mapped_column(_ID, primary_key=True, autoincrement=True)
    topic: Mapped[str] = mapped_column(Text)
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    payload_size: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(String(64), index=True)
    detail: Mapped[str] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
