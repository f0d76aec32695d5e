"""Initial registry schema: devices, records, dead_letters.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY.
_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    """Create the three registry tables."""
    op.create_table(
        "devices",
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("fleet", sa.String(64), nullable=False),
        sa.Column("first_seen", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=False),
        sa.Column("online", sa.Boolean(create_constraint=False), nullable=False),
        sa.Column("status_changed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("device_id", name=op.f("pk_devices")),
    )
    op.create_index(op.f("ix_devices_fleet"), "devices", ["fleet"])
    op.create_table(
        "records",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("topic", sa.Text(), nullable=False),
        sa.Column("ts_ms", sa.BigInteger(), nullable=False),
        sa.Column("content_type", sa.String(255), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.device_id"], name=op.f("fk_records_device_id_devices")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_records")),
        sa.UniqueConstraint("device_id", "seq", name=op.f("uq_records_device_id_seq")),
    )
    op.create_index(op.f("ix_records_received_at"), "records", ["received_at"])
    op.create_table(
        "dead_letters",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("topic", sa.Text(), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("payload_size", sa.Integer(), nullable=False),
        sa.Column("reason", sa.String(64), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dead_letters")),
    )
    op.create_index(op.f("ix_dead_letters_reason"), "dead_letters", ["reason"])
    op.create_index(op.f("ix_dead_letters_received_at"), "dead_letters", ["received_at"])


def downgrade() -> None:
    """Drop the three registry tables."""
    op.drop_index(op.f("ix_dead_letters_received_at"), table_name="dead_letters")
    op.drop_index(op.f("ix_dead_letters_reason"), table_name="dead_letters")
    op.drop_table("dead_letters")
    op.drop_index(op.f("ix_records_received_at"), table_name="records")
    op.drop_table("records")
    op.drop_index(op.f("ix_devices_fleet"), table_name="devices")
    op.drop_table("devices")
