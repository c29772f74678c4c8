"""Response models: they make the OpenAPI document precise; the JSON itself comes from `auditor.service.reports`.

Routes return the reporting layer's dicts as they are (the report is a public contract shared with
`auditor report --format json`), and these models describe them; a test validates real responses against them.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from auditor.domain.rules import RULES
from auditor.vocabulary import (
    ChangeKindName,
    DiskStatusName,
    DiskVerdict,
    FindingStatusName,
    RemediationStatusName,
    RunStatusName,
)
from auditor.vocabulary import SeverityName as SeverityName

# The enum of rule ids comes from the one registry, so a new rule shows up in the API without another list.
RuleId = StrEnum("RuleId", {rule_id.upper().replace("-", "_"): rule_id for rule_id in RULES})  # type: ignore[misc]

FindingStatusFilter = Literal[FindingStatusName, "all"]
DeliveryStateName = Literal["pending", "delivering", "delivered", "failed"]
# A disk's status at the end of a period, in the order the API has always documented it (a response field only,
# so the Literal's members are the enum's: the schema lists their values).
# `no_data`: no complete or partial run covered that instant (never compliant).
StatusAtEnd = Literal[DiskVerdict.COMPLIANT, DiskVerdict.WAIVED, DiskVerdict.NONCOMPLIANT, DiskVerdict.UNKNOWN,
                      DiskVerdict.EXEMPT, "no_data"]


class Model(BaseModel):
    """A response object: every field documented, nothing else expected."""

    model_config = ConfigDict(extra="forbid")


class ErrorDetail(Model):
    """An error: what went wrong, in one line."""

    detail: str


class RunError(Model):
    """A target a run could not read."""

    target: str
    code: str
    message: str


class Run(Model):
    """An audit run with its traffic counters and errors."""

    id: str
    started_at: str | None
    finished_at: str | None
    status: RunStatusName
    trigger: str
    targets_checked: int
    disks_read: int
    disks_unknown: int
    api_requests: int
    api_retries: int
    api_rate_limited: int
    findings_opened: int
    findings_resolved: int
    errors: list[RunError]
    config_fingerprint: str | None = Field(
        default=None, description="SHA-256 of the configuration the run ran with (secrets redacted; the evidence "
                                  "bundle's configs.json holds each one); null for runs recorded before it was kept")


class Finding(Model):
    """A finding as the report lists it."""

    fingerprint: str
    rule: str
    severity: SeverityName
    status: FindingStatusName
    disk_id: str
    policy_id: str | None
    message: str
    observed: dict[str, Any]
    expected: dict[str, Any]
    first_seen: str | None
    last_seen: str | None
    waiver: dict[str, Any] | None


class TrackedFinding(Finding):
    """A finding with its lifecycle times."""

    opened_at: str | None
    resolved_at: str | None


class ObservedRpo(Model):
    """The fleet's observed RPO over the disks that have one (nearest rank); null when none has."""

    disks: int = Field(description="disks with an observed RPO (at least two observed runs)")
    p50_seconds: int | None
    p95_seconds: int | None
    max_seconds: int | None


class Observed(Model):
    """What was observed of a disk's policies' runs (`next_invocation_at` moving on between polls)."""

    last_invocation_at: str | None = Field(description="the latest observed run's due time")
    observed_rpo_seconds: int | None = Field(
        description="the longest gap between consecutive observed runs in the window, and from the last one to its "
                    "end; null (never 0) with fewer than two observed runs")
    observed_since: str | None = Field(description="since when the disk's current policies are observed")


class Summary(Model):
    """Counts over the audited disks."""

    disks_total: int
    compliant: int
    noncompliant: int
    unknown: int
    open_findings: int
    waived_findings: int
    by_rule: dict[str, int]
    by_severity: dict[str, int]
    exempt: int = Field(description="disks their tier exempts (never counted as compliant)")
    by_tier: dict[str, int] = Field(description="disks by tier name; the defaults are counted under \"\"")
    observed_rpo: ObservedRpo = Field(description="over the last 30 days")


class ReadError(Model):
    """Why a disk has no verdict."""

    code: str | None
    message: str | None


class Exemption(Model):
    """Why a disk is exempt: its tier's reason and the annotations (or organization) that put it there."""

    reason: str | None
    because: dict[str, Any]


class AttachmentState(Model):
    """Whether a VM-assigned disk is attached to its VM (a VM's policies back up only its attached disks)."""

    state: str = Field(description="attached or detached, as Katapult's virtual_machine_disk.state says")
    verified_at: str | None = Field(description="when the auditor last read it (organization mode re-reads it "
                                                "once per audit.attachment_refresh, at once when the disk moves)")


class ReportDisk(Observed):
    """One audited disk in the report."""

    disk_id: str
    name: str | None
    status: DiskStatusName
    policies: list[str]
    findings: list[str]
    vm_id: str | None
    source: str
    last_read_at: str | None
    error: ReadError | None
    tier: str | None = Field(description="the [[tiers]] entry the disk was judged by; null for [rules]")
    exemption: Exemption | None
    attachment: AttachmentState | None = Field(
        description="whether the disk is attached to the VM it is assigned to, when known; null otherwise")


class WaiverProblem(Model):
    """A configured waiver that does not apply, and why."""

    index: int
    problem: str
    waiver: dict[str, Any]


class Waiver(Model):
    """A waiver that applies."""

    rule: str
    disk_id: str
    policy_id: str | None
    reason: str
    owner: str
    expires: str


class Drift(Model):
    """A change in a disk's protection."""

    disk_id: str
    policy_id: str
    at: str | None
    kind: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None


class Report(Model):
    """The compliance report: identical to `auditor report --format json`."""

    generated_at: str | None
    last_run: Run | None
    summary: Summary
    disks: list[ReportDisk]
    findings: list[Finding]
    waiver_problems: list[WaiverProblem]
    expiring_waivers: list[Waiver]
    drift: list[Drift]


class FindingsPage(Model):
    """One page of findings; pass `next_cursor` as `cursor` for the next (null on the last page)."""

    findings: list[TrackedFinding]
    next_cursor: str | None


class RunsPage(Model):
    """Recent audit runs, newest first."""

    runs: list[Run]


class DiskInfo(Observed):
    """What the auditor knows about a disk."""

    disk_id: str
    name: str | None
    vm_id: str | None
    vm_fqdn: str | None
    source: str
    is_target: bool
    outcome: str
    error: ReadError | None
    first_seen_at: str | None
    last_checked_at: str | None
    last_read_at: str | None
    tier: str | None
    exemption: Exemption | None
    attachment: AttachmentState | None = Field(
        description="whether the disk is attached to the VM it is assigned to, when known; null otherwise")


class PolicyState(Model):
    """One distinct setting of a policy on the disk and when it was seen (`valid_to` null while current)."""

    policy_id: str
    retention: int
    interval: str
    target_type: str
    target_id: str
    target_name: str | None
    next_invocation_at: str | None
    total_size: float | None
    valid_from: str | None
    valid_to: str | None


class DiskDrift(Model):
    """A change in the disk's protection, with the run that saw it."""

    policy_id: str
    run_id: str
    at: str | None
    kind: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None


class FindingEvent(Model):
    """A lifecycle transition of one of the disk's findings."""

    fingerprint: str
    run_id: str
    at: str | None
    kind: str


class Invocation(Model):
    """One observed run of a policy on the disk."""

    policy_id: str
    due_at: str | None = Field(description="when it was due: the next_invocation_at seen before it moved on")
    next_at: str | None = Field(description="the next run it planned")
    observed_at: str | None = Field(description="the poll that saw it")
    step_seconds: int = Field(description="the time to the next run the observations prove")


class WriteRequest(Model):
    """A Katapult write as sent: method, path and JSON body."""

    method: Literal["POST", "PATCH"]
    path: str
    body: dict[str, Any]


class Actor(Model):
    """Who applied: the OS user and host of `auditor apply`."""

    user: str
    host: str


class Remediation(Model):
    """One change `auditor apply` attempted for this disk and its outcome."""

    attempt_id: str
    disk_id: str
    change_id: str
    plan_hash: str
    kind: ChangeKindName
    status: RemediationStatusName
    actor: Actor
    requested_at: str
    finished_at: str | None
    request: WriteRequest
    response: dict[str, Any] | None
    error_code: str | None
    errors: list[str] | None
    reason: str | None
    fixes: list[str]
    before: dict[str, Any] | None
    after: dict[str, Any] | None


class DiskDetail(Model):
    """A disk's current policies, findings, snapshot history and drift, and the remediations applied to it."""

    disk: DiskInfo
    status: DiskStatusName
    policies: list[PolicyState]
    findings: list[TrackedFinding]
    snapshots: list[PolicyState]
    drift: list[DiskDrift]
    finding_events: list[FindingEvent]
    invocations: list[Invocation] = Field(description="the latest 50 observed runs, newest first")
    remediations: list[Remediation]


class PlannedChange(Model):
    """One change of a remediation plan."""

    id: str
    kind: ChangeKindName
    disk_id: str
    disks: list[str]
    tier: str | None
    fixes: list[str]
    rules: list[str]
    request: WriteRequest
    before: dict[str, Any]
    after: dict[str, Any]
    precondition: dict[str, Any]
    note: str | None = Field(default=None, description="why the change differs from its template (e.g. made on the "
                                                       "disk, not its VM, which holds an exempt or waived disk)")


class ManualItem(Model):
    """An open finding no change of the plan fixes, and why."""

    fingerprint: str
    rule: str
    disk_id: str
    policy_id: str | None
    reason: str


class PlanSummary(Model):
    """How many changes and manual items, and the changes by kind."""

    changes: int
    manual: int
    by_kind: dict[str, int]


class PlanFilters(Model):
    """What the plan was asked to cover (null: everything)."""

    tier: str | None
    rule: str | None
    disk: str | None


class RemediationPlan(Model):
    """A remediation plan: the same JSON as `auditor plan --format json`."""

    format: Literal["auditor-remediation-plan"]
    format_version: int
    auditor_version: str
    created_at: str
    expires_at: str
    filters: PlanFilters
    templates: dict[str, dict[str, Any]]
    summary: PlanSummary
    changes: list[PlannedChange]
    manual: list[ManualItem]
    hash: str


class NotificationAlert(Model):
    """One alert of a notification."""

    fingerprint: str
    rule: str
    severity: SeverityName
    status: Literal["firing", "resolved"]
    disk_id: str | None
    policy_id: str | None
    summary: str


class Notification(Model):
    """A message for one notifier and its delivery progress."""

    id: str
    notifier: str
    kind: str
    state: DeliveryStateName
    status: Literal["firing", "resolved"]
    attempts: int
    created_at: str | None
    next_attempt_at: str | None
    delivered_at: str | None
    last_status: int | None
    last_error: str | None
    is_test: bool
    is_repeat: bool
    group_labels: dict[str, str]
    alerts: list[NotificationAlert]


class NotificationsPage(Model):
    """Recent notifications, newest first."""

    notifications: list[Notification]


class AuditStarted(Model):
    """A cycle was started; follow it in /api/v1/runs."""

    status: Literal["started"]
    run: str = Field(description="the id of the started run")


class Health(Model):
    """The process is alive."""

    status: Literal["ok"]


class LastCycle(Model):
    """The last audit cycle (finished_at and age_seconds are null when it was cut short)."""

    id: str
    status: RunStatusName
    finished_at: str | None
    age_seconds: float | None


class Readiness(Model):
    """Whether the auditor can serve fresh reports; `reason` says why not."""

    status: Literal["ready", "not ready"]
    reason: str | None
    last_cycle: LastCycle | None
    leader: bool | None = Field(default=None, description="Whether this replica leads (runs the schedule and the "
                                "alert delivery); absent outside the daemon.")
    replica: str | None = Field(default=None, description="This replica as `host pid N`.")


class CompliancePeriod(Model):
    """The period: [from, to), UTC."""

    from_: str = Field(alias="from", description="start, included")
    to: str = Field(description="end, excluded")
    seconds: int
    measured_to: str = Field(description="where the measured part ends: `to`, or now if earlier (never before "
                                         "`from`); time after now has not happened and counts as nothing")
    measured_seconds: int = Field(description="the measured part's length: what every share is taken of")


class Gap(Model):
    """A stretch of the period no complete or partial run covered ("no data")."""

    from_: str = Field(alias="from")
    to: str
    seconds: int


class Coverage(Model):
    """How much of the period was checked: cycles, covered time and the gaps."""

    interval_seconds: int = Field(description="audit.interval")
    scheduled_cycles: int = Field(description="the measured period divided by audit.interval")
    completed_cycles: int = Field(description="complete and partial runs polled in the period")
    complete_cycles: int
    partial_cycles: int
    failed_cycles: int
    completed_pct: float | None = Field(description="completed ÷ scheduled, capped at 100")
    covered_seconds: int
    no_data_seconds: int
    coverage_pct: float | None
    gaps: list[Gap]


class ComplianceDay(Model):
    """The fleet over one UTC day of the period (disk-seconds by verdict within the covered time)."""

    date: str
    seconds: int = Field(description="the part of the day inside the measured period")
    coverage_pct: float | None
    compliance_pct: float | None
    compliant_seconds: int
    waived_seconds: int
    noncompliant_seconds: int
    unknown_seconds: int
    exempt_seconds: int


class ComplianceFleet(Model):
    """Every disk's covered time summed (disk-seconds); compliance % is time-weighted."""

    disks: int
    compliance_pct: float | None
    compliant_seconds: int
    waived_seconds: int
    noncompliant_seconds: int
    unknown_seconds: int
    exempt_seconds: int = Field(description="exempt disk-time: in no verdict's denominator")
    by_day: list[ComplianceDay]
    observed_rpo: ObservedRpo = Field(description="over the period")


class ComplianceDisk(Observed):
    """One disk over the period; its observed runs are those due in the period alone."""

    last_invocation_at: str | None = Field(description="the latest observed run due in the period; null: none")
    observed_rpo_seconds: int | None = Field(
        description="the longest gap ending in the period between consecutive observed runs (the first run's gap "
                    "reaches back to the run before it), and from the last one to the period's end or now, whichever "
                    "is earlier; null (never 0) when no run in the period has an observed run before it")
    observed_since: str | None = Field(description="the first observed run due in the period; null: none")
    disk_id: str
    name: str | None
    compliance_pct: float | None = Field(description="compliant ÷ (compliant + noncompliant + unknown)")
    compliant_seconds: int = Field(description="compliant, waived included")
    waived_seconds: int
    noncompliant_seconds: int
    unknown_seconds: int
    no_data_seconds: int
    status_at_start: StatusAtEnd | None
    status_at_end: StatusAtEnd | None
    exempt_seconds: int


class ComplianceRule(Model):
    """One rule's findings over the period."""

    rule: str
    opened: int = Field(description="opened or reopened in the period")
    resolved: int
    waived: int
    unwaived: int
    mean_time_to_resolve_seconds: int | None
    p90_time_to_resolve_seconds: int | None
    open_at_end: int
    oldest_open_age_seconds: int | None
    mean_open_age_seconds: int | None
    waived_at_end: int


class PeriodWaiver(Waiver):
    """A configured waiver in force during the period."""

    in_force_until: str | None = Field(description="the midnight (UTC) after its expiry day")
    lapsed_in_period: bool


class Compliance(Model):
    """Compliance over a period: `auditor report --since … --format json` gives the same document."""

    generated_at: str | None
    period: CompliancePeriod
    coverage: Coverage
    fleet: ComplianceFleet
    disks: list[ComplianceDisk]
    rules: list[ComplianceRule]
    waivers: list[PeriodWaiver]
