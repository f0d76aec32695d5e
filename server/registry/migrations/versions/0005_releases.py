"""Releases: a run's model made into signed, verified variants (``releases``, ``release_variants``).

Additive only: the tables of 0001 to 0004 are untouched.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY.
_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    """Create the ``releases`` and ``release_variants`` tables."""
    op.create_table(
        "releases",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.String(length=64), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("plan_hash", sa.String(length=64), nullable=False),
        sa.Column("epsilon_max", sa.Float(), nullable=True),
        sa.Column("delta", sa.Float(), nullable=True),
        sa.Column("dp_mode", sa.String(length=16), nullable=False),
        sa.Column("calibration", sa.String(length=16), nullable=False),
        sa.Column("float_accuracy", sa.Float(), nullable=True),
        sa.Column("device_class", sa.String(length=64), nullable=False),
        sa.Column("key_id", sa.String(length=16), nullable=True),
        sa.Column("created_by", sa.String(length=255), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("reasons_json", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_releases")),
        sa.UniqueConstraint("model", "version", name=op.f("uq_releases_model_version")),
    )
    op.create_index(op.f("ix_releases_run_id"), "releases", ["run_id"])
    op.create_index(op.f("ix_releases_status"), "releases", ["status"])
    op.create_table(
        "release_variants",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("release_id", _ID, nullable=False),
        sa.Column("variant", sa.String(length=64), nullable=False),
        sa.Column("recipe", sa.String(length=32), nullable=False),
        sa.Column("prune_ratio", sa.Float(), nullable=True),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size_bytes", sa.Integer(), nullable=False),
        sa.Column("accuracy", sa.Float(), nullable=True),
        sa.Column("float_accuracy", sa.Float(), nullable=True),
        sa.Column("latency_json", sa.Text(), nullable=False),
        sa.Column("device_class", sa.String(length=64), nullable=False),
        sa.Column("runtime", sa.String(length=64), nullable=False),
        sa.Column("path", sa.Text(), nullable=True),
        sa.Column("passed", sa.Boolean(create_constraint=False), nullable=False),
        sa.Column("reasons_json", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["release_id"],
            ["releases.id"],
            name=op.f("fk_release_variants_release_id_releases"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_release_variants")),
        sa.UniqueConstraint(
            "release_id", "variant", name=op.f("uq_release_variants_release_id_variant")
        ),
    )
    op.create_index(op.f("ix_release_variants_release_id"), "release_variants", ["release_id"])


def downgrade() -> None:
    """Drop the release tables."""
    op.drop_index(op.f("ix_release_variants_release_id"), table_name="release_variants")
    op.drop_table("release_variants")
    op.drop_index(op.f("ix_releases_status"), table_name="releases")
    op.drop_index(op.f("ix_releases_run_id"), table_name="releases")
    op.drop_table("releases")
