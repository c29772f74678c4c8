"""disk read model: each disk's policies digest and current verdict, so an unchanged cycle compares disks only

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06 17:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Both start empty: a disk without them is compared with its policy states and verdict intervals, as before.
    with op.batch_alter_table("disks") as batch:
        batch.add_column(sa.Column("policies_digest", sa.String(32), nullable=True))
        batch.add_column(sa.Column("verdict", sa.String(16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("disks") as batch:
        batch.drop_column("verdict")
        batch.drop_column("policies_digest")
