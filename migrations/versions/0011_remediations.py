"""remediations: every change `auditor apply` attempted, with who, when, the request, the response and the outcome

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06 19:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "remediations",
        sa.Column("attempt_id", sa.String(40), nullable=False),
        sa.Column("disk_id", sa.Text(), nullable=False),
        sa.Column("change_id", sa.String(40), nullable=False),
        sa.Column("plan_hash", sa.String(80), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("actor_user", sa.Text(), nullable=False),
        sa.Column("actor_host", sa.Text(), nullable=False),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("request", sa.JSON(), nullable=False),
        sa.Column("response", sa.JSON(), nullable=True),
        sa.Column("error_code", sa.Text(), nullable=True),
        sa.Column("errors", sa.JSON(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("fixes", sa.JSON(), nullable=False),
        sa.Column("before", sa.JSON(), nullable=True),
        sa.Column("after", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("attempt_id", "disk_id", name=op.f("pk_remediations")),
    )
    op.create_index(op.f("ix_remediations_disk_id"), "remediations", ["disk_id"])
    op.create_index(op.f("ix_remediations_change_id"), "remediations", ["change_id"])
    op.create_index(op.f("ix_remediations_requested_at"), "remediations", ["requested_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_remediations_requested_at"), table_name="remediations")
    op.drop_index(op.f("ix_remediations_change_id"), table_name="remediations")
    op.drop_index(op.f("ix_remediations_disk_id"), table_name="remediations")
    op.drop_table("remediations")
