"""Stored facts as the rest of the program sees them: runs, disks, policy states, drift and finding events."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from auditor.domain.models import Attachment

# Defined in the vocabulary and importable from here as before.
from auditor.vocabulary import DiskStatus as DiskStatus
from auditor.vocabulary import RunStatus as RunStatus
from auditor.vocabulary import format_instant


@dataclass(frozen=True, slots=True)
class RunError:
    """One target that could not be read in a run: never carries a token."""

    target: str
    code: str
    message: str

    def as_dict(self) -> dict[str, str]:
        """Returns the report's error object."""
        return {"target": self.target, "code": self.code, "message": self.message}


@dataclass(frozen=True, slots=True)
class RunStats:
    """API traffic of one run."""

    requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    by_status: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RunConfig:
    """A configuration a run ran with: its fingerprint and its redacted settings as plain JSON values."""

    fingerprint: str
    settings: dict[str, Any]


@dataclass(frozen=True, slots=True)
class RunRecord:
    """A stored audit run."""

    id: str
    trigger: str
    status: RunStatus
    started_at: datetime
    finished_at: datetime | None
    targets_checked: int
    disks_ok: int
    disks_unknown: int
    stats: RunStats
    findings_opened: int
    findings_resolved: int
    errors: tuple[RunError, ...]
    config_fingerprint: str | None = None  # the configuration it ran with (None: recorded before they were kept)


@dataclass(frozen=True, slots=True)
class DiskRecord:
    """A stored disk with its latest read outcome."""

    id: str
    name: str | None
    vm_id: str | None
    vm_fqdn: str | None
    source: str
    is_target: bool
    outcome: str
    error_code: str | None
    error_message: str | None
    first_seen_at: datetime
    last_checked_at: datetime
    last_read_at: datetime | None
    tier: str | None = None  # the tier of the latest definite reading (None: the defaults)
    tier_detail: dict[str, Any] | None = None  # {"exempt", "reason", "because"} for that tier
    # Whether the disk is attached to the VM it is assigned to now, as last read (None: never read for that VM).
    attachment: Attachment | None = None


@dataclass(frozen=True, slots=True)
class PolicyStateRecord:
    """One distinct setting of a policy on a disk and when it was seen (`valid_to` None while current)."""

    disk_id: str
    policy_id: str
    retention: int
    interval: str
    target_type: str
    target_id: str
    target_name: str | None
    next_invocation_at: datetime | None
    total_size: float | None
    valid_from: datetime
    valid_to: datetime | None
    settings_hash: str

    def settings(self) -> dict[str, Any]:
        """Returns the settings that define the policy, for drift events."""
        return policy_settings(self.retention, self.interval, self.target_type, self.target_id)


def policy_settings(retention: int, interval: str, target_type: str, target_id: str) -> dict[str, Any]:
    """Returns the settings that define a policy as drift events record them (`before` and `after`)."""
    return {"retention": retention, "interval": interval, "target_type": target_type, "target_id": target_id}


@dataclass(frozen=True, slots=True)
class DriftRecord:
    """A change in a disk's protection."""

    disk_id: str
    policy_id: str
    run_id: str
    at: datetime
    kind: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class FindingEventRecord:
    """A lifecycle transition of a finding."""

    fingerprint: str
    disk_id: str
    run_id: str
    at: datetime
    kind: str


@dataclass(frozen=True, slots=True)
class RemediationRecord:
    """One change `auditor apply` attempted, as stored for one disk it concerns."""

    attempt_id: str
    disk_id: str
    change_id: str
    plan_hash: str
    kind: str
    status: str
    actor_user: str
    actor_host: str
    requested_at: datetime
    finished_at: datetime | None
    request: dict[str, Any]
    response: dict[str, Any] | None
    error_code: str | None
    errors: list[str] | None
    reason: str | None
    fixes: list[str]
    before: dict[str, Any] | None
    after: dict[str, Any] | None

    def as_dict(self) -> dict[str, Any]:
        """Returns the record as JSON (history, the API and the evidence bundle)."""
        return {"attempt_id": self.attempt_id, "disk_id": self.disk_id, "change_id": self.change_id,
                "plan_hash": self.plan_hash, "kind": self.kind, "status": self.status,
                "actor": {"user": self.actor_user, "host": self.actor_host},
                "requested_at": format_instant(self.requested_at), "finished_at": format_instant(self.finished_at),
                "request": self.request, "response": self.response, "error_code": self.error_code,
                "errors": self.errors, "reason": self.reason, "fixes": self.fixes, "before": self.before,
                "after": self.after}
