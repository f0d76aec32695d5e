"""The model each device reports it runs, read from the registry's ``device_states``.

The ingest fills the table from the devices' retained ``state/reported`` documents
(:mod:`edgefl.server.ingest`); this module reads it back as typed values for the admin
commands (``edgefl server devices``) and anything else that wants to know which model a
device runs and how its last update went.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from edgefl.server.registry.models import DeviceState

__all__ = ["LastFailure", "ReportedModelState", "read_model_states"]


@dataclass(frozen=True, slots=True)
class LastFailure:
    """A device's last refused or rolled-back update.

    Attributes:
        version: The version it refused or rolled back.
        reason: The machine reason (``edgefl.releasesign.REASONS``).
        detail: The human-readable detail.
        at: When it failed (the device's clock), or None.
    """

    version: int | None
    reason: str
    detail: str
    at: datetime | None

    def to_json(self) -> dict[str, Any]:
        """A JSON object; times are ISO 8601 with their UTC offset."""
        return {
            "version": self.version,
            "reason": self.reason,
            "detail": self.detail,
            "at": _iso(self.at),
        }


@dataclass(frozen=True, slots=True)
class ReportedModelState:
    """What a device last reported on ``state/reported``, as the registry keeps it.

    Attributes:
        device_id: The device.
        fleet: The fleet of the topic it reported on.
        model: The model it runs (None: none).
        version: Its release version.
        variant: Its variant.
        sha256: The running artifact's sha256.
        state: ``running``, ``downloading``, ``verifying``, ``rolled_back``, ``failed``
            or ``none``.
        since: When the running model was swapped in (the device's clock).
        rollbacks: How many updates it rolled back.
        last_failure: Its last failure, or None.
        reported_at: When the ingest stored this report.
    """

    device_id: str
    fleet: str
    model: str | None
    version: int | None
    variant: str | None
    sha256: str | None
    state: str
    since: datetime | None
    rollbacks: int
    last_failure: LastFailure | None
    reported_at: datetime

    def to_json(self) -> dict[str, Any]:
        """A JSON object (without ``device_id`` and ``fleet``, which a listing has)."""
        return {
            "model": self.model,
            "version": self.version,
            "variant": self.variant,
            "sha256": self.sha256,
            "state": self.state,
            "since": _iso(self.since),
            "rollbacks": self.rollbacks,
            "last_failure": self.last_failure.to_json() if self.last_failure else None,
            "reported_at": _iso(self.reported_at),
        }


def read_model_states(
    session: Session, device_ids: Iterable[str] | None = None
) -> dict[str, ReportedModelState]:
    """The reported model state of each device that has one, by device id.

    Args:
        session: A registry session.
        device_ids: Only these devices (``None``: every device).

    Returns:
        Device id -> its state; a device that never reported is absent.
    """
    query = select(DeviceState)
    if device_ids is not None:
        query = query.where(DeviceState.device_id.in_(sorted(set(device_ids))))
    return {row.device_id: _of(row) for row in session.scalars(query)}


def _of(row: DeviceState) -> ReportedModelState:
    failure = None
    if row.last_failure_reason is not None:
        failure = LastFailure(
            version=row.last_failure_version,
            reason=row.last_failure_reason,
            detail=row.last_failure_detail or "",
            at=_utc(row.last_failure_at),
        )
    reported_at = _utc(row.reported_at)
    assert reported_at is not None  # the column is NOT NULL
    return ReportedModelState(
        device_id=row.device_id,
        fleet=row.fleet,
        model=row.model,
        version=row.version,
        variant=row.variant,
        sha256=row.sha256,
        state=row.state,
        since=_utc(row.since),
        rollbacks=row.rollbacks,
        last_failure=failure,
        reported_at=reported_at,
    )


def _utc(value: datetime | None) -> datetime | None:
    """SQLite gives naive datetimes back; they mean UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None
