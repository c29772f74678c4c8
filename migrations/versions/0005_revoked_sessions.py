"""revoked dashboard sessions: logged-out session ids until they would have expired

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 09:00:00.000000

A dashboard session is a signed cookie with its expiry inside; logging out records its id here so every replica
refuses the cookie until then. Rows past their expiry are deleted when the next session is revoked.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "revoked_sessions",
        sa.Column("sid", sa.String(64), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("sid", name=op.f("pk_revoked_sessions")),
    )
    op.create_index(op.f("ix_revoked_sessions_expires_at"), "revoked_sessions", ["expires_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_revoked_sessions_expires_at"), table_name="revoked_sessions")
    op.drop_table("revoked_sessions")
