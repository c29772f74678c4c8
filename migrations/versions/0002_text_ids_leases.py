"""Katapult data as text, run owners, leases

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 21:10:00.000000

Ids, names and codes that come from Katapult become TEXT: PostgreSQL rejected values SQLite accepted (a disk name
over 255 characters failed every cycle). Runs record their owner, and the `leases` table holds the cycle and
leader leases that keep one writer per database.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# (table, column, old type, nullable)
TEXT_COLUMNS: list[tuple[str, str, sa.types.TypeEngine[str], bool]] = [
    ("disks", "id", sa.String(64), False),
    ("disks", "name", sa.String(255), True),
    ("disks", "vm_id", sa.String(64), True),
    ("disks", "vm_fqdn", sa.String(255), True),
    ("disks", "source", sa.String(160), False),
    ("disks", "error_code", sa.String(64), True),
    ("policy_states", "disk_id", sa.String(64), False),
    ("policy_states", "policy_id", sa.String(64), False),
    ("policy_states", "target_id", sa.String(64), False),
    ("policy_states", "target_name", sa.String(255), True),
    ("drift_events", "disk_id", sa.String(64), False),
    ("drift_events", "policy_id", sa.String(64), False),
    ("findings", "disk_id", sa.String(64), False),
    ("findings", "policy_id", sa.String(64), True),
    ("finding_events", "disk_id", sa.String(64), False),
]


def _retype(to_text: bool) -> None:
    tables: dict[str, list[tuple[str, sa.types.TypeEngine[str], bool]]] = {}
    for table, column, old, nullable in TEXT_COLUMNS:
        tables.setdefault(table, []).append((column, old, nullable))
    for table, columns in tables.items():
        with op.batch_alter_table(table) as batch:
            for column, old, nullable in columns:
                batch.alter_column(column, existing_type=old if to_text else sa.Text(),
                                   type_=sa.Text() if to_text else old, existing_nullable=nullable)


def upgrade() -> None:
    _retype(True)
    with op.batch_alter_table("audit_runs") as batch:
        batch.add_column(sa.Column("owner", sa.String(length=120), nullable=True))
    with op.batch_alter_table("outbox") as batch:
        batch.alter_column("claimed_by", existing_type=sa.String(64), type_=sa.String(120), existing_nullable=True)
    op.create_table(
        "leases",
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("holder", sa.String(length=120), nullable=False),
        sa.Column("host", sa.Text(), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("process_started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("acquired_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("run_id", sa.String(length=32), nullable=True),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_leases")),
    )


def downgrade() -> None:
    op.drop_table("leases")
    with op.batch_alter_table("outbox") as batch:
        batch.alter_column("claimed_by", existing_type=sa.String(120), type_=sa.String(64), existing_nullable=True)
    with op.batch_alter_table("audit_runs") as batch:
        batch.drop_column("owner")
    _retype(False)
