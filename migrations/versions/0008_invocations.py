"""observed invocations: each policy's observed schedule per disk, and every invocation seen

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 19:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "policy_schedules",
        sa.Column("disk_id", sa.Text(), nullable=False),
        sa.Column("policy_id", sa.Text(), nullable=False),
        sa.Column("first_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("next_invocation_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("recent", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("disk_id", "policy_id", name=op.f("pk_policy_schedules")),
    )
    op.create_table(
        "invocations",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("disk_id", sa.Text(), nullable=False),
        sa.Column("policy_id", sa.Text(), nullable=False),
        sa.Column("due_at", sa.BigInteger(), nullable=False),
        sa.Column("next_at", sa.BigInteger(), nullable=False),
        sa.Column("observed_at", sa.BigInteger(), nullable=False),
        sa.Column("gap_seconds", sa.BigInteger(), nullable=True),
        sa.Column("run_id", sa.String(32), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_invocations")),
    )
    op.create_index("ix_invocations_disk_due", "invocations", ["disk_id", "due_at", "gap_seconds"])


def downgrade() -> None:
    op.drop_index("ix_invocations_disk_due", table_name="invocations")
    op.drop_table("invocations")
    op.drop_table("policy_schedules")
