"""Reported model state: ``device_states``, one row per device (its ``state/reported``).

Additive only: the tables of 0001 to 0005 are untouched.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create the ``device_states`` table."""
    op.create_table(
        "device_states",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("fleet", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=64), nullable=True),
        sa.Column("version", sa.BigInteger(), nullable=True),
        sa.Column("variant", sa.String(length=64), nullable=True),
        sa.Column("sha256", sa.String(length=64), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("since", sa.DateTime(timezone=True), nullable=True),
        sa.Column("rollbacks", sa.BigInteger(), nullable=False),
        sa.Column("last_failure_version", sa.BigInteger(), nullable=True),
        sa.Column("last_failure_reason", sa.String(length=64), nullable=True),
        sa.Column("last_failure_detail", sa.Text(), nullable=True),
        sa.Column("last_failure_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("reported_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("document", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.device_id"],
            name=op.f("fk_device_states_device_id_devices"),
        ),
        sa.PrimaryKeyConstraint("device_id", name=op.f("pk_device_states")),
    )
    op.create_index(op.f("ix_device_states_fleet"), "device_states", ["fleet"])


def downgrade() -> None:
    """Drop the ``device_states`` table."""
    op.drop_index(op.f("ix_device_states_fleet"), table_name="device_states")
    op.drop_table("device_states")
