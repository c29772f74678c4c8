"""run configurations: each distinct configuration a run ran with (secrets redacted), stored once by fingerprint

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06 19:10:00.000000

`audit_runs.config_fingerprint` names the configuration a run ran with; `run_configs` holds each one once. Runs
recorded before this revision have none (NULL): the evidence export says so rather than guessing.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "run_configs",
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("fingerprint", name=op.f("pk_run_configs")),
    )
    with op.batch_alter_table("audit_runs") as batch:
        batch.add_column(sa.Column("config_fingerprint", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("audit_runs") as batch:
        batch.drop_column("config_fingerprint")
    op.drop_table("run_configs")
