"""Frozen domain objects shared by every layer: disks, backup policies, snapshots, findings."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from enum import StrEnum
from typing import Any

from auditor.domain.tiers import DEFAULTS, TierDecision

# Defined in the vocabulary (the config validates against them too) and importable from here as before.
from auditor.vocabulary import FindingStatus as FindingStatus
from auditor.vocabulary import Interval as Interval
from auditor.vocabulary import Severity as Severity


class TargetType(StrEnum):
    """What a backup policy is attached to (`target.type` on the wire)."""

    DISK = "Disk"
    VIRTUAL_MACHINE = "VirtualMachine"


@dataclass(frozen=True, slots=True)
class Schedule:
    """When a policy runs: its interval and the next planned run (None if Katapult sent none)."""

    interval: Interval
    next_invocation_at: datetime | None


@dataclass(frozen=True, slots=True)
class BackupPolicy:
    """One disk backup policy as listed by Katapult."""

    id: str
    retention: int
    target_type: TargetType
    target_id: str
    schedule: Schedule
    target_name: str | None = None
    total_size: float | None = None

    def settings_hash(self) -> str:
        """Returns a hash of the settings that define the policy (not its moving schedule or size)."""
        raw = f"{self.retention}|{self.schedule.interval.value}|{self.target_type.value}|{self.target_id}"
        return hashlib.sha256(raw.encode()).hexdigest()[:32]


ATTACHED = "attached"
DETACHED = "detached"


@dataclass(frozen=True, slots=True)
class Attachment:
    """Whether a disk assigned to a VM is attached to it (`virtual_machine_disk.state`), and when that was read.

    A disk can stay assigned to a VM while `detached`: a policy on the VM then does not back it up.
    """

    state: str  # "attached" | "detached" (anything else Katapult sends is kept as sent, and never "attached")
    attach_on_boot: bool | None = None
    verified_at: datetime | None = None  # None: read by this cycle (the cycle stamps it)

    @property
    def is_attached(self) -> bool:
        """Returns whether the disk is attached to its VM."""
        return self.state == ATTACHED


@dataclass(frozen=True, slots=True)
class Disk:
    """A disk as Katapult describes it; `vm_id` is the VM it is assigned to, if any, and `attachment` whether it is
    attached to it (None: not known)."""

    id: str
    name: str | None = None
    vm_id: str | None = None
    vm_fqdn: str | None = None
    state: str | None = None
    size_in_gb: int | None = None
    # The disk's annotations when the response carried them (None: not in the response, so not known).
    annotations: tuple[tuple[str, str], ...] | None = None
    attachment: Attachment | None = None


@dataclass(frozen=True, slots=True)
class VirtualMachine:
    """A virtual machine as far as tiers need it: its organization and annotations (None: not in the response)."""

    id: str
    fqdn: str | None = None
    organization_id: str | None = None
    organization_sub_domain: str | None = None
    annotations: tuple[tuple[str, str], ...] | None = None

    @property
    def organization_refs(self) -> frozenset[str]:
        """Returns the id and sub-domain naming the VM's organization (those known)."""
        return frozenset(r for r in (self.organization_id, self.organization_sub_domain) if r)


class ReadOutcome(StrEnum):
    """How reading one disk's policies went in one run."""

    OK = "ok"  # policies were read completely
    NOT_FOUND = "not_found"  # 404 disk_not_found: a definite answer
    IN_TRASH = "in_trash"  # 406 object_in_trash: a definite answer
    UNKNOWN = "unknown"  # could not be read (5xx, timeout, 403, malformed): no verdict


@dataclass(frozen=True, slots=True)
class DiskSnapshot:
    """What one run learned about one disk: the policies covering it, or why it could not be read."""

    disk: Disk
    outcome: ReadOutcome
    policies: tuple[BackupPolicy, ...] = ()
    error_code: str | None = None
    error_message: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    tier: TierDecision = DEFAULTS  # the tier the disk was judged by (see domain.tiers)

    @property
    def disk_id(self) -> str:
        """Returns the disk's id."""
        return self.disk.id


def utc_from_epoch(seconds: int) -> datetime | None:
    """Returns Unix epoch seconds as an aware UTC datetime, or None when outside datetime's range (years 1-9999)."""
    # Katapult sends every time as Unix epoch seconds (a JSON integer of any size).
    try:
        return datetime.fromtimestamp(seconds, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return None


def fingerprint(rule: str, disk_id: str, policy_id: str | None) -> str:
    """Returns the stable identity of a finding: 16 hex chars of sha256(rule, disk, policy).

    This derivation is a public contract (alerts dedup on it): never change it.
    """
    raw = f"{rule}\x1f{disk_id}\x1f{policy_id or ''}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class Finding:
    """One rule violation produced by evaluating one disk snapshot."""

    rule: str
    disk_id: str
    policy_id: str | None
    severity: Severity
    message: str
    observed: dict[str, Any] = field(default_factory=dict)
    expected: dict[str, Any] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        """Returns the finding's stable fingerprint."""
        return fingerprint(self.rule, self.disk_id, self.policy_id)


@dataclass(frozen=True, slots=True)
class Waiver:
    """An accepted finding: applies to `rule` on `disk_id` (and `policy_id` if set) until `expires` (inclusive)."""

    rule: str
    disk_id: str
    reason: str
    owner: str
    expires: date
    policy_id: str | None = None

    def matches(self, finding: Finding | TrackedFinding) -> bool:
        """Returns whether this waiver covers the finding (ignoring expiry)."""
        if finding.rule != self.rule or finding.disk_id != self.disk_id:
            return False
        return self.policy_id is None or self.policy_id == finding.policy_id

    def is_valid(self, *, now: datetime) -> bool:
        """Returns whether the waiver still applies at `now` (it lasts through its expiry day, UTC)."""
        return now.date() <= self.expires

    def as_dict(self) -> dict[str, Any]:
        """Returns the waiver as a JSON-ready dict (the report's `waiver` object)."""
        return {
            "rule": self.rule,
            "disk_id": self.disk_id,
            "policy_id": self.policy_id,
            "reason": self.reason,
            "owner": self.owner,
            "expires": self.expires.isoformat(),
        }


@dataclass(frozen=True, slots=True)
class WaiverProblem:
    """A configured waiver that does not apply (malformed or expired), with why."""

    index: int
    problem: str
    raw: dict[str, Any]


@dataclass(frozen=True, slots=True)
class TrackedFinding:
    """A finding as stored: the last evaluation plus its lifecycle state."""

    fingerprint: str
    rule: str
    disk_id: str
    policy_id: str | None
    severity: Severity
    status: FindingStatus
    message: str
    observed: dict[str, Any]
    expected: dict[str, Any]
    first_seen: datetime
    last_seen: datetime
    opened_at: datetime
    resolved_at: datetime | None = None
    waiver: dict[str, Any] | None = None
    # The disk's tier when the finding last opened: its alerts' `tier` label, kept until it resolves so that the
    # firing and the resolving alert carry the same labels even when the disk changes tier meanwhile.
    tier: str | None = None
