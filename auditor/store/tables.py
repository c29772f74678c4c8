"""SQLAlchemy tables: the Alembic `target_metadata`. Rows map to domain objects in `repo`.

Snapshots are stored by change, not by poll: `policy_states` holds one row per distinct policy setting a disk
has had, with the time range it was seen (`valid_from` .. `valid_to`, NULL while current). A poll that finds
the same settings writes nothing there; the moving parts of a policy (`next_invocation_at`, `total_size`) are
updated in place on the current row only when they change.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from auditor.store.types import UTCDateTime

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base with a stable constraint naming convention."""

    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON, list[Any]: JSON}


class Run(Base):
    """One audit cycle."""

    __tablename__ = "audit_runs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, unique=True)  # monotonic order for "latest"
    trigger: Mapped[str] = mapped_column(String(16), default="schedule")
    status: Mapped[str] = mapped_column(String(16), index=True)  # running | complete | partial | failed
    started_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]
    targets_checked: Mapped[int] = mapped_column(Integer, default=0)
    disks_ok: Mapped[int] = mapped_column(Integer, default=0)
    disks_unknown: Mapped[int] = mapped_column(Integer, default=0)
    api_requests: Mapped[int] = mapped_column(Integer, default=0)
    api_retries: Mapped[int] = mapped_column(Integer, default=0)
    api_rate_limited: Mapped[int] = mapped_column(Integer, default=0)
    api_by_status: Mapped[dict[str, Any]] = mapped_column(default=dict)
    findings_opened: Mapped[int] = mapped_column(Integer, default=0)
    findings_resolved: Mapped[int] = mapped_column(Integer, default=0)
    errors: Mapped[list[Any]] = mapped_column(default=list)
    # The process that ran it (`Holder.id`): a run left `running` is abandoned only once its owner is gone.
    owner: Mapped[str | None] = mapped_column(String(120))


class DiskRow(Base):
    """A disk the auditor has audited, with its latest verdict."""

    __tablename__ = "disks"

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    name: Mapped[str | None] = mapped_column(Text)
    vm_id: Mapped[str | None] = mapped_column(Text)
    vm_fqdn: Mapped[str | None] = mapped_column(Text)
    source: Mapped[str] = mapped_column(Text)  # "config" or "org:<ref>"
    is_target: Mapped[bool] = mapped_column(Boolean, default=True)
    outcome: Mapped[str] = mapped_column(String(16))  # ok | not_found | in_trash | unknown (latest read)
    error_code: Mapped[str | None] = mapped_column(Text)
    error_message: Mapped[str | None] = mapped_column(Text)
    first_seen_at: Mapped[datetime]
    last_checked_at: Mapped[datetime]
    last_read_at: Mapped[datetime | None]  # last time the read gave a definite answer
    last_run_id: Mapped[str | None] = mapped_column(String(32))
    # The tier the latest definite reading put the disk in (NULL: the defaults), and what made it so:
    # {"exempt": bool, "reason": str, "because": {...}}.
    tier: Mapped[str | None] = mapped_column(Text)
    tier_detail: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class PolicyState(Base):
    """One distinct setting of one policy as seen on one disk, with when it was seen."""

    __tablename__ = "policy_states"
    __table_args__ = (Index("ix_policy_states_disk_current", "disk_id", "valid_to"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    disk_id: Mapped[str] = mapped_column(Text)
    policy_id: Mapped[str] = mapped_column(Text, index=True)
    settings_hash: Mapped[str] = mapped_column(String(32))
    retention: Mapped[int] = mapped_column(Integer)
    interval: Mapped[str] = mapped_column(String(16))
    target_type: Mapped[str] = mapped_column(String(32))
    target_id: Mapped[str] = mapped_column(Text)
    target_name: Mapped[str | None] = mapped_column(Text)
    next_invocation_at: Mapped[datetime | None]
    total_size: Mapped[float | None] = mapped_column(Float)
    valid_from: Mapped[datetime]
    valid_to: Mapped[datetime | None]
    first_run_id: Mapped[str] = mapped_column(String(32))


class DriftEvent(Base):
    """A change in a disk's protection: a policy added, removed or with changed settings."""

    __tablename__ = "drift_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    disk_id: Mapped[str] = mapped_column(Text, index=True)
    policy_id: Mapped[str] = mapped_column(Text)
    run_id: Mapped[str] = mapped_column(String(32))
    at: Mapped[datetime]
    kind: Mapped[str] = mapped_column(String(32))  # policy-added | policy-removed | policy-changed
    before: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    after: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class FindingRow(Base):
    """A finding's current state, keyed by its fingerprint."""

    __tablename__ = "findings"
    __table_args__ = (Index("ix_findings_status_rule", "status", "rule"),)

    fingerprint: Mapped[str] = mapped_column(String(32), primary_key=True)
    rule: Mapped[str] = mapped_column(String(64))
    disk_id: Mapped[str] = mapped_column(Text, index=True)
    policy_id: Mapped[str | None] = mapped_column(Text)
    severity: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))  # open | waived | resolved
    message: Mapped[str] = mapped_column(Text)
    observed: Mapped[dict[str, Any]] = mapped_column(default=dict)
    expected: Mapped[dict[str, Any]] = mapped_column(default=dict)
    first_seen: Mapped[datetime]
    last_seen: Mapped[datetime]
    opened_at: Mapped[datetime]
    resolved_at: Mapped[datetime | None]
    waiver: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    tier: Mapped[str | None] = mapped_column(Text)  # the disk's tier when the finding last opened (alert label)


class FindingEvent(Base):
    """A lifecycle transition of a finding (opened, resolved, reopened, waived, unwaived)."""

    __tablename__ = "finding_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    fingerprint: Mapped[str] = mapped_column(String(32), index=True)
    disk_id: Mapped[str] = mapped_column(Text, index=True)
    run_id: Mapped[str] = mapped_column(String(32))
    at: Mapped[datetime]
    kind: Mapped[str] = mapped_column(String(16))


class OutboxRow(Base):
    """A notification waiting for (or done with) delivery: written in the same transaction as its cause."""

    __tablename__ = "outbox"
    __table_args__ = (Index("ix_outbox_due", "state", "next_attempt_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # the idempotency key
    notifier: Mapped[str] = mapped_column(String(120), index=True)
    group_key: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(String(16))  # firing | resolved | repeat | test
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)  # the domain Notification, no secrets
    run_id: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime]
    state: Mapped[str] = mapped_column(String(16))  # pending | delivering | delivered | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime]
    claimed_by: Mapped[str | None] = mapped_column(String(120))
    claimed_at: Mapped[datetime | None]
    delivered_at: Mapped[datetime | None]
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)


class AlertStateRow(Base):
    """Per notifier and fingerprint: what the channel was last told, for dedup, repeat and resolve."""

    __tablename__ = "alert_states"

    notifier: Mapped[str] = mapped_column(String(120), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(32), primary_key=True)
    status: Mapped[str] = mapped_column(String(16))  # firing | resolved
    last_sent_at: Mapped[datetime]
    starts_at: Mapped[datetime]


class LeaseRow(Base):
    """A named lease ("cycle", "leader"): who holds it and until when; taken and renewed by conditional updates."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    holder: Mapped[str] = mapped_column(String(120))  # Holder.id: host, pid and a per-process nonce
    host: Mapped[str] = mapped_column(Text)
    pid: Mapped[int] = mapped_column(Integer)
    process_started_at: Mapped[datetime]
    acquired_at: Mapped[datetime]
    expires_at: Mapped[datetime]
    run_id: Mapped[str | None] = mapped_column(String(32))


class RunSummary(Base):
    """One row per finished run: the fleet as it stood after it (history for trends and period reports)."""

    __tablename__ = "run_summaries"

    run_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    started_at: Mapped[datetime] = mapped_column(index=True)
    finished_at: Mapped[datetime | None]
    status: Mapped[str] = mapped_column(String(16))  # complete | partial | failed
    disks_total: Mapped[int] = mapped_column(Integer, default=0)
    disks_compliant: Mapped[int] = mapped_column(Integer, default=0)
    disks_noncompliant: Mapped[int] = mapped_column(Integer, default=0)
    disks_unknown: Mapped[int] = mapped_column(Integer, default=0)
    disks_exempt: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    open_by_severity: Mapped[dict[str, Any]] = mapped_column(default=dict)
    open_by_rule: Mapped[dict[str, Any]] = mapped_column(default=dict)
    requests: Mapped[int] = mapped_column(Integer, default=0)
    duration_seconds: Mapped[float] = mapped_column(Float, default=0.0)


class DiskState(Base):
    """A disk's verdict over time, stored by change: compliant, waived, noncompliant or unknown from valid_from
    until valid_to (NULL while current). Time between runs counts only as far as the period report allows."""

    __tablename__ = "disk_states"
    __table_args__ = (Index("ix_disk_states_disk_current", "disk_id", "valid_to"),
                      Index("ix_disk_states_window", "valid_from", "valid_to"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    disk_id: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))
    valid_from: Mapped[datetime]
    valid_to: Mapped[datetime | None]
    run_id: Mapped[str] = mapped_column(String(32))
