"""Federated training: runs, per-round metrics, the privacy ledger and checkpoints.

Additive only: the tables of 0001 are untouched.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create the federated-training tables."""
    op.create_table(
        "fl_runs",
        sa.Column("run_id", sa.String(length=64), nullable=False),
        sa.Column("plan_json", sa.Text(), nullable=False),
        sa.Column("plan_key", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("stop_reason", sa.Text(), nullable=False),
        sa.Column("rounds_done", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("run_id", name=op.f("pk_fl_runs")),
    )
    op.create_table(
        "fl_checkpoints",
        sa.Column("run_id", sa.String(length=64), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("model", sa.LargeBinary(), nullable=False),
        sa.Column("strategy_state", sa.LargeBinary(), nullable=False),
        sa.Column("accountants_json", sa.Text(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["fl_runs.run_id"],
            name=op.f("fk_fl_checkpoints_run_id_fl_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("run_id", "round", name=op.f("pk_fl_checkpoints")),
    )
    op.create_table(
        "fl_rounds",
        sa.Column("run_id", sa.String(length=64), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("accuracy", sa.Float(), nullable=False),
        sa.Column("loss", sa.Float(), nullable=False),
        sa.Column("federated_accuracy", sa.Float(), nullable=True),
        sa.Column("federated_loss", sa.Float(), nullable=True),
        sa.Column("train_loss", sa.Float(), nullable=True),
        sa.Column("num_selected", sa.Integer(), nullable=False),
        sa.Column("num_replies", sa.Integer(), nullable=False),
        sa.Column("num_failures", sa.Integer(), nullable=False),
        sa.Column("num_rejected", sa.Integer(), nullable=False),
        sa.Column("num_refused", sa.Integer(), nullable=False),
        sa.Column("num_flagged", sa.Integer(), nullable=False),
        sa.Column("epsilon_max", sa.Float(), nullable=False),
        sa.Column("central_epsilon", sa.Float(), nullable=True),
        sa.Column("wall_s", sa.Float(), nullable=False),
        sa.Column("detail_json", sa.Text(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["fl_runs.run_id"],
            name=op.f("fk_fl_rounds_run_id_fl_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("run_id", "round", name=op.f("pk_fl_rounds")),
    )
    op.create_table(
        "privacy_ledger",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("run_id", sa.String(length=64), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("epsilon_spent", sa.Float(), nullable=False),
        sa.Column("epsilon_total", sa.Float(), nullable=False),
        sa.Column("delta", sa.Float(), nullable=False),
        sa.Column("sigma", sa.Float(), nullable=False),
        sa.Column("sample_rate", sa.Float(), nullable=False),
        sa.Column("steps", sa.Integer(), nullable=False),
        sa.Column("history_json", sa.Text(), nullable=False),
        sa.Column("num_examples", sa.Integer(), nullable=False),
        sa.Column("train_time_s", sa.Float(), nullable=False),
        sa.Column("compute_speed", sa.Float(), nullable=False),
        sa.Column("flagged", sa.Boolean(create_constraint=False), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["fl_runs.run_id"],
            name=op.f("fk_privacy_ledger_run_id_fl_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_privacy_ledger")),
        sa.UniqueConstraint(
            "run_id", "device_id", "round", name=op.f("uq_privacy_ledger_run_id_device_id_round")
        ),
    )
    op.create_index(op.f("ix_privacy_ledger_device_id"), "privacy_ledger", ["device_id"])
    op.create_index(op.f("ix_privacy_ledger_run_id"), "privacy_ledger", ["run_id"])


def downgrade() -> None:
    """Drop the federated-training tables."""
    op.drop_index(op.f("ix_privacy_ledger_run_id"), table_name="privacy_ledger")
    op.drop_index(op.f("ix_privacy_ledger_device_id"), table_name="privacy_ledger")
    op.drop_table("privacy_ledger")
    op.drop_table("fl_rounds")
    op.drop_table("fl_checkpoints")
    op.drop_table("fl_runs")
