"""The cloud registry: devices and their model state, enrollments, records, dead letters."""

from __future__ import annotations

from edgefl.server.registry.db import (
    DEFAULT_DB_FILENAME,
    default_database_url,
    default_state_dir,
    make_engine,
    session_factory,
    upgrade,
)
from edgefl.server.registry.models import (
    DEAD_LETTER_PAYLOAD_CAP,
    ENROLLMENT_STATUSES,
    Base,
    DeadLetter,
    Device,
    DeviceState,
    Enrollment,
    Record,
)

__all__ = [
    "DEAD_LETTER_PAYLOAD_CAP",
    "DEFAULT_DB_FILENAME",
    "ENROLLMENT_STATUSES",
    "Base",
    "DeadLetter",
    "Device",
    "DeviceState",
    "Enrollment",
    "Record",
    "default_database_url",
    "default_state_dir",
    "make_engine",
    "session_factory",
    "upgrade",
]
