"""An index on ``records (device_id, kind, id)``.

A device's newest record of a kind (the newest outbox report ``edgefl server devices``
shows, the recent records of ``device-show``) is then a short backward scan of the index
instead of a scan of every stored record. Additive only.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create ``ix_records_device_id_kind_id``."""
    op.create_index(op.f("ix_records_device_id_kind_id"), "records", ["device_id", "kind", "id"])


def downgrade() -> None:
    """Drop ``ix_records_device_id_kind_id``."""
    op.drop_index(op.f("ix_records_device_id_kind_id"), table_name="records")
