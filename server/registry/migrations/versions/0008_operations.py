"""Operating a fleet: the audit log, admin API tokens and admin certificates, agent versions.

- ``audit_log``: one append-only row per mutating admin action (who, what, arguments with
  secrets redacted, when, outcome). Rows are only ever inserted.
- ``admin_tokens``: API tokens for the admin API, stored as a hash of the secret, with a
  role, an expiry and a revocation time.
- ``admin_certs``: the certificates the admin CA issued (serial, name, role, expiry,
  revocation time), so a revoked admin certificate is refused.
- ``devices`` gains ``agent_version`` and ``envelope_version`` (what the device last
  reported), so the server can show a fleet mid-upgrade.

Additive only: the tables of 0001 to 0007 are untouched.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    """Create ``audit_log``, ``admin_tokens``, ``admin_certs``; add the version columns."""
    op.create_table(
        "audit_log",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=255), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("via", sa.String(length=16), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("target", sa.String(length=255), nullable=False),
        sa.Column("arguments_json", sa.Text(), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_log")),
    )
    op.create_index(op.f("ix_audit_log_at"), "audit_log", ["at"])
    op.create_index(op.f("ix_audit_log_action"), "audit_log", ["action"])
    op.create_table(
        "admin_tokens",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("secret_hash", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_admin_tokens")),
    )
    op.create_index(op.f("ix_admin_tokens_name"), "admin_tokens", ["name"])
    op.create_table(
        "admin_certs",
        sa.Column("serial", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("serial", name=op.f("pk_admin_certs")),
    )
    op.create_index(op.f("ix_admin_certs_name"), "admin_certs", ["name"])
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("agent_version", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("envelope_version", sa.Integer(), nullable=True))


def downgrade() -> None:
    """Drop what :func:`upgrade` added."""
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("envelope_version")
        batch.drop_column("agent_version")
    op.drop_index(op.f("ix_admin_certs_name"), table_name="admin_certs")
    op.drop_table("admin_certs")
    op.drop_index(op.f("ix_admin_tokens_name"), table_name="admin_tokens")
    op.drop_table("admin_tokens")
    op.drop_index(op.f("ix_audit_log_action"), table_name="audit_log")
    op.drop_index(op.f("ix_audit_log_at"), table_name="audit_log")
    op.drop_table("audit_log")
