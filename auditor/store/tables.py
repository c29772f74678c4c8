"""The schema as SQLAlchemy Core tables: the Alembic `target_metadata`, and what every statement of the store is
written against (`queries` for reads, `writes` for the cycle's writes). Core only — no ORM mapping — so a
one-shot command loads SQLAlchemy's SQL layer and nothing more.

Snapshots are stored by change, not by poll: `policy_states` holds one row per distinct policy setting a disk
has had, with the time range it was seen (`valid_from` .. `valid_to`, NULL while current). A poll that finds
the same settings writes nothing there; the moving parts of a policy (`next_invocation_at`, `total_size`) are
updated in place on the current row only when they change.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

from auditor.store.types import UTCDateTime

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING)


def _utc(name: str, *, nullable: bool = False, index: bool = False) -> Column[object]:
    return Column(name, UTCDateTime(), nullable=nullable, index=index)


# One audit cycle.
runs = Table(
    "audit_runs", metadata,
    Column("id", String(32), primary_key=True),
    Column("seq", BigInteger, nullable=False, unique=True),  # monotonic order for "latest"
    Column("trigger", String(16), nullable=False, default="schedule"),
    Column("status", String(16), nullable=False, index=True),  # running | complete | partial | failed
    _utc("started_at"),
    _utc("finished_at", nullable=True),
    Column("targets_checked", Integer, nullable=False, default=0),
    Column("disks_ok", Integer, nullable=False, default=0),
    Column("disks_unknown", Integer, nullable=False, default=0),
    Column("api_requests", Integer, nullable=False, default=0),
    Column("api_retries", Integer, nullable=False, default=0),
    Column("api_rate_limited", Integer, nullable=False, default=0),
    Column("api_by_status", JSON, nullable=False, default=dict),
    Column("findings_opened", Integer, nullable=False, default=0),
    Column("findings_resolved", Integer, nullable=False, default=0),
    Column("errors", JSON, nullable=False, default=list),
    # The process that ran it (`Holder.id`): a run left `running` is abandoned only once its owner is gone.
    Column("owner", String(120)),
    # The configuration it ran with (`run_configs`; NULL for runs recorded before configurations were kept).
    Column("config_fingerprint", String(64)),
)

# Each distinct configuration a run ran with, stored once: its redacted settings (`config.redacted_config`) by
# their fingerprint, the SHA-256 of their canonical JSON (`config.config_fingerprint`).
run_configs = Table(
    "run_configs", metadata,
    Column("fingerprint", String(64), primary_key=True),
    Column("config", JSON, nullable=False),
)

# A disk the auditor has audited, with its latest verdict.
disks = Table(
    "disks", metadata,
    Column("id", Text, primary_key=True),
    Column("name", Text),
    Column("vm_id", Text),
    Column("vm_fqdn", Text),
    Column("source", Text, nullable=False),  # "config" or "org:<ref>"
    Column("is_target", Boolean, nullable=False, default=True),
    Column("outcome", String(16), nullable=False),  # ok | not_found | in_trash | unknown (latest read)
    Column("error_code", Text),
    Column("error_message", Text),
    _utc("first_seen_at"),
    _utc("last_checked_at"),
    _utc("last_read_at", nullable=True),  # last time the read gave a definite answer
    Column("last_run_id", String(32)),
    # The tier the latest definite reading put the disk in (NULL: the defaults), and what made it so:
    # {"exempt": bool, "reason": str, "because": {...}}.
    Column("tier", Text),
    Column("tier_detail", JSON),
    # A read model of the disk's history, written with it by the cycle (`writes`): a digest of the policies its
    # current policy states were written from, and the status of its current verdict interval (`disk_states`).
    # While both match what a cycle finds, that cycle reads neither table for the disk; NULL means "compare".
    Column("policies_digest", String(32)),
    Column("verdict", String(16)),
    # Whether the disk is attached to the VM it is assigned to (`virtual_machine_disk.state`), as last read for
    # VM `attachment_vm_id` at `attachment_verified_at`: in organization mode it is read per VM, at most once per
    # `audit.attachment_refresh`, so the cycles between trust what was read. NULL: never read.
    Column("attachment_state", String(16)),
    Column("attach_on_boot", Boolean),
    Column("attachment_vm_id", Text),
    _utc("attachment_verified_at", nullable=True),
)

# One distinct setting of one policy as seen on one disk, with when it was seen.
policy_states = Table(
    "policy_states", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("disk_id", Text, nullable=False),
    Column("policy_id", Text, nullable=False, index=True),
    Column("settings_hash", String(32), nullable=False),
    Column("retention", Integer, nullable=False),
    Column("interval", String(16), nullable=False),
    Column("target_type", String(32), nullable=False),
    Column("target_id", Text, nullable=False),
    Column("target_name", Text),
    _utc("next_invocation_at", nullable=True),
    Column("total_size", Float),
    _utc("valid_from"),
    _utc("valid_to", nullable=True),
    Column("first_run_id", String(32), nullable=False),
    Index("ix_policy_states_disk_current", "disk_id", "valid_to"),
)

# A change in a disk's protection: a policy added, removed or with changed settings; a disk changing tier.
drift_events = Table(
    "drift_events", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("disk_id", Text, nullable=False, index=True),
    Column("policy_id", Text, nullable=False),
    Column("run_id", String(32), nullable=False),
    _utc("at"),
    Column("kind", String(32), nullable=False),  # policy-added | policy-removed | policy-changed | tier-changed
    Column("before", JSON),
    Column("after", JSON),
)

# A finding's current state, keyed by its fingerprint.
findings = Table(
    "findings", metadata,
    Column("fingerprint", String(32), primary_key=True),
    Column("rule", String(64), nullable=False),
    Column("disk_id", Text, nullable=False, index=True),
    Column("policy_id", Text),
    Column("severity", String(16), nullable=False),
    Column("status", String(16), nullable=False),  # open | waived | resolved
    Column("message", Text, nullable=False),
    Column("observed", JSON, nullable=False, default=dict),
    Column("expected", JSON, nullable=False, default=dict),
    _utc("first_seen"),
    _utc("last_seen"),
    _utc("opened_at"),
    _utc("resolved_at", nullable=True),
    Column("waiver", JSON),
    Column("tier", Text),  # the disk's tier when the finding last opened (alert label)
    Index("ix_findings_status_rule", "status", "rule"),
)

# A lifecycle transition of a finding (opened, resolved, reopened, waived, unwaived).
finding_events = Table(
    "finding_events", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("fingerprint", String(32), nullable=False, index=True),
    Column("disk_id", Text, nullable=False, index=True),
    Column("run_id", String(32), nullable=False),
    _utc("at"),
    Column("kind", String(16), nullable=False),
)

# A notification waiting for (or done with) delivery: written in the same transaction as its cause.
outbox = Table(
    "outbox", metadata,
    Column("id", String(40), primary_key=True),  # the idempotency key
    Column("notifier", String(120), nullable=False, index=True),
    Column("group_key", Text, nullable=False),
    Column("kind", String(16), nullable=False),  # firing | resolved | repeat | test
    Column("payload", JSON, nullable=False, default=dict),  # the domain Notification, no secrets
    Column("run_id", String(32)),
    _utc("created_at"),
    Column("state", String(16), nullable=False),  # pending | delivering | delivered | failed
    Column("attempts", Integer, nullable=False, default=0),
    _utc("next_attempt_at"),
    Column("claimed_by", String(120)),
    _utc("claimed_at", nullable=True),
    Column("claim_epoch", BigInteger),  # the leader epoch the claim was made in (none outside a daemon)
    _utc("delivered_at", nullable=True),
    Column("last_status", Integer),
    Column("last_error", Text),
    Index("ix_outbox_due", "state", "next_attempt_at"),
)

# Per notifier and fingerprint: what the channel was last told, for dedup, repeat and resolve.
alert_states = Table(
    "alert_states", metadata,
    Column("notifier", String(120), primary_key=True),
    Column("fingerprint", String(32), primary_key=True),
    Column("status", String(16), nullable=False),  # firing | resolved
    _utc("last_sent_at"),
    _utc("starts_at"),
)

# A named lease ("cycle", "leader"): who holds it and until when; taken and renewed by conditional updates.
leases = Table(
    "leases", metadata,
    Column("name", String(32), primary_key=True),
    Column("holder", String(120), nullable=False),  # Holder.id: host, pid and a per-process nonce
    Column("host", Text, nullable=False),
    Column("pid", Integer, nullable=False),
    _utc("process_started_at"),
    _utc("acquired_at"),
    _utc("expires_at"),
    Column("run_id", String(32)),
    # Grows by one with every new holding (a takeover, or a holder taking back its own expired lease); a released
    # lease keeps its row (expired) so the number never goes back.
    Column("epoch", BigInteger, nullable=False, default=1, server_default="1"),
)

# One row per finished run: the fleet as it stood after it (history for trends and period reports).
run_summaries = Table(
    "run_summaries", metadata,
    Column("run_id", String(32), primary_key=True),
    _utc("started_at", index=True),
    _utc("finished_at", nullable=True),
    Column("status", String(16), nullable=False),  # complete | partial | failed
    Column("disks_total", Integer, nullable=False, default=0),
    Column("disks_compliant", Integer, nullable=False, default=0),
    Column("disks_noncompliant", Integer, nullable=False, default=0),
    Column("disks_unknown", Integer, nullable=False, default=0),
    Column("disks_exempt", Integer, nullable=False, default=0, server_default="0"),
    Column("open_by_severity", JSON, nullable=False, default=dict),
    Column("open_by_rule", JSON, nullable=False, default=dict),
    Column("requests", Integer, nullable=False, default=0),
    Column("duration_seconds", Float, nullable=False, default=0.0),
)

# A disk's verdict over time, stored by change: compliant, waived, noncompliant or unknown from valid_from until
# valid_to (NULL while current). Time between runs counts only as far as the period report allows.
disk_states = Table(
    "disk_states", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("disk_id", Text, nullable=False),
    Column("status", String(16), nullable=False),
    _utc("valid_from"),
    _utc("valid_to", nullable=True),
    Column("run_id", String(32), nullable=False),
    Index("ix_disk_states_disk_current", "disk_id", "valid_to"),
    Index("ix_disk_states_window", "valid_from", "valid_to"),
)

# What the auditor has observed of each policy's runs on each disk (a read model the cycle reads before judging and
# writes by change): when it first saw the policy there, the latest `next_invocation_at` it saw, and the latest
# invocations ({"runs": [[due, next, observed], ...]} in epoch seconds, oldest first, at most `invocations.RECENT`;
# an object, not a bare list: PostgreSQL's bulk writes pass a column as an array, and a list would nest in it). A row
# goes when its policy no longer covers the disk, or the disk is no longer audited.
policy_schedules = Table(
    "policy_schedules", metadata,
    Column("disk_id", Text, primary_key=True),
    Column("policy_id", Text, primary_key=True),
    _utc("first_seen_at"),
    _utc("next_invocation_at", nullable=True),
    Column("recent", JSON, nullable=False, default=dict),
)

# Every observed invocation: a policy's `next_invocation_at` moved forward from a time that had passed, so the run
# due then happened. Times in epoch seconds (as Katapult sends them); `gap_seconds` is the time since the disk's
# previous observed run (NULL for its first), worked out when the run is observed, so the observed RPO of any
# window is one plain aggregate (the index on disk and due time covers it).
invocations = Table(
    "invocations", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("disk_id", Text, nullable=False),
    Column("policy_id", Text, nullable=False),
    Column("due_at", BigInteger, nullable=False),
    Column("next_at", BigInteger, nullable=False),
    Column("observed_at", BigInteger, nullable=False),
    Column("gap_seconds", BigInteger),
    Column("run_id", String(32), nullable=False),
    Index("ix_invocations_disk_due", "disk_id", "due_at", "gap_seconds"),
)

# Dashboard sessions ended before their expiry (logged out): a signed cookie would otherwise stay valid until then.
# One row per session id, kept until the session would have expired anyway (then pruned: the cookie is dead).
revoked_sessions = Table(
    "revoked_sessions", metadata,
    Column("sid", String(64), primary_key=True),
    _utc("expires_at", index=True),
    _utc("revoked_at"),
)

# Every change `auditor apply` attempted, one row per disk it concerns: the intent is written before the write is
# sent, the outcome over it once known (a row left at `intent` is a write whose process stopped). Who and when, the
# request as sent and Katapult's answer (never a token: requests carry none, answers are bodies only).
remediations = Table(
    "remediations", metadata,
    Column("attempt_id", String(40), primary_key=True),
    Column("disk_id", Text, primary_key=True, index=True),
    Column("change_id", String(40), nullable=False, index=True),
    Column("plan_hash", String(80), nullable=False),
    Column("kind", String(32), nullable=False),  # create-policy | raise-retention | shorten-interval
    Column("status", String(16), nullable=False),  # vocabulary.RemediationStatus
    Column("actor_user", Text, nullable=False),
    Column("actor_host", Text, nullable=False),
    _utc("requested_at", index=True),
    _utc("finished_at", nullable=True),
    Column("request", JSON, nullable=False),
    Column("response", JSON),
    Column("error_code", Text),
    Column("errors", JSON),
    Column("reason", Text),
    Column("fixes", JSON, nullable=False),
    Column("before", JSON),
    Column("after", JSON),
)
