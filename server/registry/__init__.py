"""The cloud registry: devices, stored records and dead letters (SQLAlchemy + alembic)."""

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
    Base,
    DeadLetter,
    Device,
    Record,
)

__all__ = [
    "DEAD_LETTER_PAYLOAD_CAP",
    "DEFAULT_DB_FILENAME",
    "Base",
    "DeadLetter",
    "Device",
    "Record",
    "default_database_url",
    "default_state_dir",
    "make_engine",
    "session_factory",
    "upgrade",
]
