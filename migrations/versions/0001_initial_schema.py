"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-28 07:41:08.486079
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "alert_states",
        sa.Column("notifier", sa.String(length=120), nullable=False),
        sa.Column("fingerprint", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("last_sent_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("starts_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("notifier", "fingerprint", name=op.f("pk_alert_states")),
    )
    op.create_table(
        "audit_runs",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("trigger", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("targets_checked", sa.Integer(), nullable=False),
        sa.Column("disks_ok", sa.Integer(), nullable=False),
        sa.Column("disks_unknown", sa.Integer(), nullable=False),
        sa.Column("api_requests", sa.Integer(), nullable=False),
        sa.Column("api_retries", sa.Integer(), nullable=False),
        sa.Column("api_rate_limited", sa.Integer(), nullable=False),
        sa.Column("api_by_status", sa.JSON(), nullable=False),
        sa.Column("findings_opened", sa.Integer(), nullable=False),
        sa.Column("findings_resolved", sa.Integer(), nullable=False),
        sa.Column("errors", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_runs")),
        sa.UniqueConstraint("seq", name=op.f("uq_audit_runs_seq")),
    )
    with op.batch_alter_table("audit_runs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_runs_status"), ["status"], unique=False)

    op.create_table(
        "disks",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=True),
        sa.Column("vm_id", sa.String(length=64), nullable=True),
        sa.Column("vm_fqdn", sa.String(length=255), nullable=True),
        sa.Column("source", sa.String(length=160), nullable=False),
        sa.Column("is_target", sa.Boolean(), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("error_code", sa.String(length=64), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("first_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_checked_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_read_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_run_id", sa.String(length=32), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_disks")),
    )
    op.create_table(
        "drift_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("disk_id", sa.String(length=64), nullable=False),
        sa.Column("policy_id", sa.String(length=64), nullable=False),
        sa.Column("run_id", sa.String(length=32), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("before", sa.JSON(), nullable=True),
        sa.Column("after", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_drift_events")),
    )
    with op.batch_alter_table("drift_events", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_drift_events_disk_id"), ["disk_id"], unique=False)

    op.create_table(
        "finding_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("fingerprint", sa.String(length=32), nullable=False),
        sa.Column("disk_id", sa.String(length=64), nullable=False),
        sa.Column("run_id", sa.String(length=32), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_finding_events")),
    )
    with op.batch_alter_table("finding_events", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_finding_events_disk_id"), ["disk_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_finding_events_fingerprint"), ["fingerprint"], unique=False)

    op.create_table(
        "findings",
        sa.Column("fingerprint", sa.String(length=32), nullable=False),
        sa.Column("rule", sa.String(length=64), nullable=False),
        sa.Column("disk_id", sa.String(length=64), nullable=False),
        sa.Column("policy_id", sa.String(length=64), nullable=True),
        sa.Column("severity", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("observed", sa.JSON(), nullable=False),
        sa.Column("expected", sa.JSON(), nullable=False),
        sa.Column("first_seen", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=False),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("waiver", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("fingerprint", name=op.f("pk_findings")),
    )
    with op.batch_alter_table("findings", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_findings_disk_id"), ["disk_id"], unique=False)
        batch_op.create_index("ix_findings_status_rule", ["status", "rule"], unique=False)

    op.create_table(
        "outbox",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("notifier", sa.String(length=120), nullable=False),
        sa.Column("group_key", sa.Text(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("run_id", sa.String(length=32), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("claimed_by", sa.String(length=64), nullable=True),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox")),
    )
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.create_index("ix_outbox_due", ["state", "next_attempt_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_outbox_notifier"), ["notifier"], unique=False)

    op.create_table(
        "policy_states",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("disk_id", sa.String(length=64), nullable=False),
        sa.Column("policy_id", sa.String(length=64), nullable=False),
        sa.Column("settings_hash", sa.String(length=32), nullable=False),
        sa.Column("retention", sa.Integer(), nullable=False),
        sa.Column("interval", sa.String(length=16), nullable=False),
        sa.Column("target_type", sa.String(length=32), nullable=False),
        sa.Column("target_id", sa.String(length=64), nullable=False),
        sa.Column("target_name", sa.String(length=255), nullable=True),
        sa.Column("next_invocation_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("total_size", sa.Float(), nullable=True),
        sa.Column("valid_from", sa.DateTime(timezone=True), nullable=False),
        sa.Column("valid_to", sa.DateTime(timezone=True), nullable=True),
        sa.Column("first_run_id", sa.String(length=32), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_policy_states")),
    )
    with op.batch_alter_table("policy_states", schema=None) as batch_op:
        batch_op.create_index("ix_policy_states_disk_current", ["disk_id", "valid_to"], unique=False)
        batch_op.create_index(batch_op.f("ix_policy_states_policy_id"), ["policy_id"], unique=False)


def downgrade() -> None:

    with op.batch_alter_table("policy_states", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_policy_states_policy_id"))
        batch_op.drop_index("ix_policy_states_disk_current")

    op.drop_table("policy_states")
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_outbox_notifier"))
        batch_op.drop_index("ix_outbox_due")

    op.drop_table("outbox")
    with op.batch_alter_table("findings", schema=None) as batch_op:
        batch_op.drop_index("ix_findings_status_rule")
        batch_op.drop_index(batch_op.f("ix_findings_disk_id"))

    op.drop_table("findings")
    with op.batch_alter_table("finding_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_finding_events_fingerprint"))
        batch_op.drop_index(batch_op.f("ix_finding_events_disk_id"))

    op.drop_table("finding_events")
    with op.batch_alter_table("drift_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_drift_events_disk_id"))

    op.drop_table("drift_events")
    op.drop_table("disks")
    with op.batch_alter_table("audit_runs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_runs_status"))

    op.drop_table("audit_runs")
    op.drop_table("alert_states")
