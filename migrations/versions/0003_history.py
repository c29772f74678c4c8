"""history: run summaries and per-disk verdicts by change

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29 21:35:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "run_summaries",
        sa.Column("run_id", sa.String(length=32), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("disks_total", sa.Integer(), nullable=False),
        sa.Column("disks_compliant", sa.Integer(), nullable=False),
        sa.Column("disks_noncompliant", sa.Integer(), nullable=False),
        sa.Column("disks_unknown", sa.Integer(), nullable=False),
        sa.Column("open_by_severity", sa.JSON(), nullable=False),
        sa.Column("open_by_rule", sa.JSON(), nullable=False),
        sa.Column("requests", sa.Integer(), nullable=False),
        sa.Column("duration_seconds", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("run_id", name=op.f("pk_run_summaries")),
    )
    op.create_index(op.f("ix_run_summaries_started_at"), "run_summaries", ["started_at"], unique=False)
    op.create_table(
        "disk_states",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("disk_id", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("valid_from", sa.DateTime(timezone=True), nullable=False),
        sa.Column("valid_to", sa.DateTime(timezone=True), nullable=True),
        sa.Column("run_id", sa.String(length=32), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_disk_states")),
    )
    op.create_index("ix_disk_states_disk_current", "disk_states", ["disk_id", "valid_to"], unique=False)
    op.create_index("ix_disk_states_window", "disk_states", ["valid_from", "valid_to"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_disk_states_window", table_name="disk_states")
    op.drop_index("ix_disk_states_disk_current", table_name="disk_states")
    op.drop_table("disk_states")
    op.drop_index(op.f("ix_run_summaries_started_at"), table_name="run_summaries")
    op.drop_table("run_summaries")
