"""tiers: each disk's tier and what made it so, each finding's tier label; exempt disks in run summaries

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 00:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("disks") as batch:
        batch.add_column(sa.Column("tier", sa.Text(), nullable=True))
        batch.add_column(sa.Column("tier_detail", sa.JSON(), nullable=True))
    with op.batch_alter_table("run_summaries") as batch:
        batch.add_column(sa.Column("disks_exempt", sa.Integer(), nullable=False, server_default="0"))
    with op.batch_alter_table("findings") as batch:
        batch.add_column(sa.Column("tier", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("findings") as batch:
        batch.drop_column("tier")
    with op.batch_alter_table("run_summaries") as batch:
        batch.drop_column("disks_exempt")
    with op.batch_alter_table("disks") as batch:
        batch.drop_column("tier_detail")
        batch.drop_column("tier")
