"""Enrollment: one row per admitted (or revoked) device, its certificate and Flower node.

Additive only: the tables of 0001 and 0002 are untouched.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create the ``enrollments`` table."""
    op.create_table(
        "enrollments",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("fleet", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("cert_serial", sa.String(length=40), nullable=False),
        sa.Column("cert_pem", sa.Text(), nullable=False),
        sa.Column("node_public_key", sa.Text(), nullable=False),
        # Flower node ids are unsigned 64-bit: above BIGINT's range, so stored as text.
        sa.Column("node_id", sa.String(length=20), nullable=False),
        sa.Column("admitted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoke_reason", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("device_id", name=op.f("pk_enrollments")),
        sa.UniqueConstraint("cert_serial", name=op.f("uq_enrollments_cert_serial")),
        sa.UniqueConstraint("node_id", name=op.f("uq_enrollments_node_id")),
    )
    op.create_index(op.f("ix_enrollments_fleet"), "enrollments", ["fleet"])
    op.create_index(op.f("ix_enrollments_status"), "enrollments", ["status"])


def downgrade() -> None:
    """Drop the ``enrollments`` table."""
    op.drop_index(op.f("ix_enrollments_status"), table_name="enrollments")
    op.drop_index(op.f("ix_enrollments_fleet"), table_name="enrollments")
    op.drop_table("enrollments")
