"""Staged rollouts (``rollouts``, ``rollout_devices``) and the model version of each result.

``records`` gains three nullable columns, ``model``, ``model_version`` and
``model_variant``, which the ingest fills from a ``result`` record's JSON body (the model
that computed the answer); rows stored before stay NULL. Otherwise additive only: the
tables of 0001 to 0006 are untouched.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create ``rollouts`` and ``rollout_devices``; add the model columns to ``records``."""
    op.create_table(
        "rollouts",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("variant", sa.String(length=64), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("fleet", sa.String(length=64), nullable=True),
        sa.Column("canary_fraction", sa.Float(), nullable=False),
        sa.Column("canaries", sa.Integer(), nullable=False),
        sa.Column("soak_s", sa.Float(), nullable=False),
        sa.Column("max_failures", sa.Float(), nullable=False),
        sa.Column("min_accuracy", sa.Float(), nullable=True),
        sa.Column("max_accuracy_drop", sa.Float(), nullable=True),
        sa.Column("min_evaluated", sa.Integer(), nullable=False),
        sa.Column("install_timeout_s", sa.Float(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("phase", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("evidence_json", sa.Text(), nullable=False),
        sa.Column("created_by", sa.String(length=255), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rollouts")),
    )
    op.create_index(op.f("ix_rollouts_state"), "rollouts", ["state"])
    op.create_index(op.f("ix_rollouts_created_at"), "rollouts", ["created_at"])
    op.create_table(
        "rollout_devices",
        sa.Column("rollout_id", sa.String(length=32), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("fleet", sa.String(length=64), nullable=False),
        sa.Column("cohort", sa.String(length=8), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("online_at_start", sa.Boolean(create_constraint=False), nullable=False),
        sa.Column("previous_model", sa.String(length=64), nullable=True),
        sa.Column("previous_version", sa.BigInteger(), nullable=True),
        sa.Column("previous_variant", sa.String(length=64), nullable=True),
        sa.Column("previous_sha256", sa.String(length=64), nullable=True),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("evaluated", sa.Integer(), nullable=True),
        sa.Column("accuracy", sa.Float(), nullable=True),
        sa.Column("previous_evaluated", sa.Integer(), nullable=True),
        sa.Column("previous_accuracy", sa.Float(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["rollout_id"],
            ["rollouts.id"],
            name=op.f("fk_rollout_devices_rollout_id_rollouts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("rollout_id", "device_id", name=op.f("pk_rollout_devices")),
    )
    with op.batch_alter_table("records") as batch:
        batch.add_column(sa.Column("model", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("model_version", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("model_variant", sa.String(length=64), nullable=True))
    op.create_index(op.f("ix_records_model_model_version"), "records", ["model", "model_version"])


def downgrade() -> None:
    """Drop the rollout tables and the model columns of ``records``."""
    op.drop_index(op.f("ix_records_model_model_version"), table_name="records")
    with op.batch_alter_table("records") as batch:
        batch.drop_column("model_variant")
        batch.drop_column("model_version")
        batch.drop_column("model")
    op.drop_table("rollout_devices")
    op.drop_index(op.f("ix_rollouts_created_at"), table_name="rollouts")
    op.drop_index(op.f("ix_rollouts_state"), table_name="rollouts")
    op.drop_table("rollouts")
