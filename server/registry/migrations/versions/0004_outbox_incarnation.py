"""Outbox incarnation: records are unique per ``(device_id, incarnation, seq)``.

Envelope version 2 carries the incarnation of the sending outbox (128 random bits made
with the outbox file). A deleted, reset or reflashed outbox starts its seqs at 1 again
under a new incarnation; with the old key ``(device_id, seq)`` those records were
silently dropped as duplicates. Existing rows came from version-1 envelopes and get the
empty incarnation, which is what version 1 still means.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add ``records.incarnation`` and widen the unique key to include it."""
    with op.batch_alter_table("records") as batch:
        batch.add_column(
            sa.Column("incarnation", sa.String(length=32), server_default="", nullable=False)
        )
        batch.drop_constraint(op.f("uq_records_device_id_seq"), type_="unique")
        batch.create_unique_constraint(
            op.f("uq_records_device_id_incarnation_seq"), ["device_id", "incarnation", "seq"]
        )


def downgrade() -> None:
    """Go back to the ``(device_id, seq)`` key.

    Raises:
        RuntimeError: Two incarnations of a device stored the same seq; the old key cannot
            hold both, and a downgrade does not choose which records to delete.
    """
    clashes = (
        op.get_bind()
        .execute(
            sa.text(
                "SELECT COUNT(*) FROM (SELECT device_id, seq FROM records "
                "GROUP BY device_id, seq HAVING COUNT(*) > 1) AS clashes"
            )
        )
        .scalar()
    )
    if clashes:
        raise RuntimeError(
            f"cannot downgrade below 0004: {clashes} (device_id, seq) pairs are stored under "
            "more than one outbox incarnation"
        )
    with op.batch_alter_table("records") as batch:
        batch.drop_constraint(op.f("uq_records_device_id_incarnation_seq"), type_="unique")
        batch.create_unique_constraint(op.f("uq_records_device_id_seq"), ["device_id", "seq"])
        batch.drop_column("incarnation")
