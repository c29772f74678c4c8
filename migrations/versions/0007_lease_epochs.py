"""lease epochs: every holding of a lease gets a number that only grows; outbox claims record the leader's

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06 19:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A lease row that exists already is its epoch 1; the next holding is 2.
    with op.batch_alter_table("leases") as batch:
        batch.add_column(sa.Column("epoch", sa.BigInteger(), nullable=False, server_default="1"))
    # Claims made before this revision carry no epoch: they are reclaimed after the claim timeout, as before.
    with op.batch_alter_table("outbox") as batch:
        batch.add_column(sa.Column("claim_epoch", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("outbox") as batch:
        batch.drop_column("claim_epoch")
    with op.batch_alter_table("leases") as batch:
        batch.drop_column("epoch")
