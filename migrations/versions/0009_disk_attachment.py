"""disk attachment: whether each disk is attached to the VM it is assigned to, on which VM and when it was read

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06 19:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # All start empty: a disk without them has no verified attachment, and is read again when it needs one.
    with op.batch_alter_table("disks") as batch:
        batch.add_column(sa.Column("attachment_state", sa.String(16), nullable=True))
        batch.add_column(sa.Column("attach_on_boot", sa.Boolean(), nullable=True))
        batch.add_column(sa.Column("attachment_vm_id", sa.Text(), nullable=True))
        batch.add_column(sa.Column("attachment_verified_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("disks") as batch:
        batch.drop_column("attachment_verified_at")
        batch.drop_column("attachment_vm_id")
        batch.drop_column("attach_on_boot")
        batch.drop_column("attachment_state")
