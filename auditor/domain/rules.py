"""Compliance rules: pure functions over one disk snapshot, its rule parameters and `now`.

Rule ids are a public contract (waivers, alerts and reports use them): never rename one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from auditor.domain.invocations import PolicySchedule
from auditor.domain.models import (
    BackupPolicy,
    DiskSnapshot,
    Finding,
    Interval,
    ReadOutcome,
    Severity,
    TargetType,
    utc_from_epoch,
)
from auditor.domain.tiers import DEFAULTS, Tier, TierDecision

# The ids are defined in the vocabulary (the config checks rule ids too) and importable from here as before.
from auditor.vocabulary import DETACHED_FROM_COVERING_VM as DETACHED_FROM_COVERING_VM
from auditor.vocabulary import DISK_IN_TRASH as DISK_IN_TRASH
from auditor.vocabulary import DISK_NOT_FOUND as DISK_NOT_FOUND
from auditor.vocabulary import INTERVAL_TOO_INFREQUENT as INTERVAL_TOO_INFREQUENT
from auditor.vocabulary import NO_BACKUP_DATA as NO_BACKUP_DATA
from auditor.vocabulary import OBSERVED_INTERVAL_LIMIT, format_duration, format_instant
from auditor.vocabulary import OBSERVED_INTERVAL_TOO_LONG as OBSERVED_INTERVAL_TOO_LONG
from auditor.vocabulary import RETENTION_BELOW_MINIMUM as RETENTION_BELOW_MINIMUM
from auditor.vocabulary import RETENTION_WINDOW_TOO_SHORT as RETENTION_WINDOW_TOO_SHORT
from auditor.vocabulary import SCHEDULE_STALE as SCHEDULE_STALE
from auditor.vocabulary import UNPROTECTED_DISK as UNPROTECTED_DISK


@dataclass(frozen=True, slots=True)
class RuleParams:
    """The thresholds one disk is judged against."""

    min_retention: int = 7
    min_retention_days: float = 7
    max_interval: Interval = Interval.DAILY
    stale_grace: timedelta = timedelta(hours=1)


@dataclass(frozen=True, slots=True)
class Applied:
    """What one disk is judged by: parameters, per-rule severities and disabled rules."""

    params: RuleParams = RuleParams()
    severity: Mapping[str, Severity] = field(default_factory=dict)
    disabled: frozenset[str] = frozenset()

    def severity_of(self, rule: str) -> Severity:
        """Returns the configured severity of `rule`, else its default."""
        return self.severity.get(rule) or RULES[rule].severity


@dataclass(frozen=True, slots=True)
class RuleSet:
    """Default parameters, per-disk overrides, per-rule severities, disabled rules and tiers.

    Precedence for one disk: its `[[rules.overrides]]` entry, then its tier (`tier_rules[name]`), then the
    defaults. Severities and disabled rules of an override are those of `[rules]`.
    """

    default: RuleParams = RuleParams()
    overrides: Mapping[str, RuleParams] = field(default_factory=dict)
    severity: Mapping[str, Severity] = field(default_factory=dict)
    disabled: frozenset[str] = frozenset()
    tiers: tuple[Tier, ...] = ()
    tier_rules: Mapping[str, Applied] = field(default_factory=dict)

    def severity_of(self, rule: str) -> Severity:
        """Returns the configured severity of `rule`, else its default."""
        return self.severity.get(rule) or RULES[rule].severity

    def has_override(self, disk_id: str) -> bool:
        """Returns whether `[[rules.overrides]]` names the disk (it then ignores tiers)."""
        return disk_id in self.overrides

    def applied(self, disk_id: str, decision: TierDecision = DEFAULTS) -> Applied:
        """Returns what `disk_id` is judged by, given the tier decided for it."""
        override = self.overrides.get(disk_id)
        if override is None and decision.tier is not None:
            found = self.tier_rules.get(decision.tier.name)
            if found is not None:
                return found
        return Applied(override or self.default, self.severity, self.disabled)


def _days(delta: timedelta) -> float:
    return delta.total_seconds() / 86400


PolicyCheck = Callable[[BackupPolicy, RuleParams, datetime], tuple[str, dict[str, Any], dict[str, Any]] | None]


def check_retention_below_minimum(
    policy: BackupPolicy, params: RuleParams, now: datetime
) -> tuple[str, dict[str, Any], dict[str, Any]] | None:
    """Returns (message, observed, expected) when the policy keeps fewer backups than `min_retention`."""
    if policy.retention >= params.min_retention:
        return None
    return (
        f"policy {policy.id} keeps {policy.retention} backup{'' if policy.retention == 1 else 's'}, fewer than the "
        f"required {params.min_retention}",
        {"retention": policy.retention},
        {"min_retention": params.min_retention},
    )


def _count_days(days: float, spec: str) -> str:
    """Returns "1 day", "0.5 days", "14 days": the number as `spec` formats it, and the noun that agrees."""
    text = format(days, spec)
    return f"{text} day" if text == "1" else f"{text} days"


def check_retention_window(
    policy: BackupPolicy, params: RuleParams, now: datetime
) -> tuple[str, dict[str, Any], dict[str, Any]] | None:
    """Returns a violation when retention × interval length is shorter than `min_retention_days`."""
    # In float days, not `retention * timedelta`: a timedelta overflows past ~2.7 million years, which a large (but
    # well-formed) retention of monthly backups reaches.
    window_days = policy.retention * _days(policy.schedule.interval.length)
    if window_days >= params.min_retention_days:
        return None
    return (
        f"policy {policy.id} covers {_count_days(window_days, '.3g')} ({policy.retention} × "
        f"{policy.schedule.interval.value}), less than the required {_count_days(params.min_retention_days, 'g')}",
        {"retention": policy.retention, "interval": policy.schedule.interval.value, "window_days": window_days},
        {"min_retention_days": params.min_retention_days},
    )


def check_interval(
    policy: BackupPolicy, params: RuleParams, now: datetime
) -> tuple[str, dict[str, Any], dict[str, Any]] | None:
    """Returns a violation when the policy runs less often than `max_interval`."""
    if policy.schedule.interval.rank <= params.max_interval.rank:
        return None
    return (
        f"policy {policy.id} runs {policy.schedule.interval.value}, less often than the required"
        f" {params.max_interval.value}",
        {"interval": policy.schedule.interval.value},
        {"max_interval": params.max_interval.value},
    )


def check_schedule_stale(
    policy: BackupPolicy, params: RuleParams, now: datetime
) -> tuple[str, dict[str, Any], dict[str, Any]] | None:
    """Returns a violation when `next_invocation_at` is before `now - stale_grace` (or missing)."""
    due = policy.schedule.next_invocation_at
    grace_s = params.stale_grace.total_seconds()
    if due is None:
        # No planned run at all is the same failure as a missed one: nothing will back this disk up.
        return (
            f"policy {policy.id} has no next scheduled run",
            {"next_invocation_at": None},
            {"next_invocation_at_after": format_instant(now - params.stale_grace), "stale_grace_seconds": grace_s},
        )
    if due >= now - params.stale_grace:
        return None
    late = now - due
    overdue = format_duration(late, style="overdue")
    return (
        f"policy {policy.id} was due at {format_instant(due)} and has not run ({overdue} overdue)",
        {"next_invocation_at": format_instant(due), "overdue_seconds": late.total_seconds()},
        {"next_invocation_at_after": format_instant(now - params.stale_grace), "stale_grace_seconds": grace_s},
    )


ObservedCheck = Callable[[BackupPolicy, PolicySchedule, RuleParams, datetime],
                         tuple[str, dict[str, Any], dict[str, Any]] | None]


def check_observed_interval(
    policy: BackupPolicy, schedule: PolicySchedule, params: RuleParams, now: datetime
) -> tuple[str, dict[str, Any], dict[str, Any]] | None:
    """Returns a violation when one of the policy's last two observed steps of `next_invocation_at` is longer than
    `max_interval`'s limit plus `stale_grace` (so it resolves after two consecutive steps within it)."""
    limit = OBSERVED_INTERVAL_LIMIT[params.max_interval] + params.stale_grace
    longest = max(schedule.recent[-2:], key=lambda i: i.step, default=None)
    if longest is None or longest.step <= limit:
        return None
    step = longest.step
    return (
        f"policy {policy.id} ran at {format_instant(longest.due_at)} and next at {format_instant(longest.next_at)}:"
        f" {format_duration(step, style='alert')} between runs, longer than the"
        f" {format_duration(limit, style='alert')} a {params.max_interval.value} schedule allows",
        {"step_seconds": step.total_seconds(), "due_at": format_instant(longest.due_at),
         "next_at": format_instant(longest.next_at), "observed_at": format_instant(longest.observed_at),
         "interval": policy.schedule.interval.value},
        {"max_step_seconds": limit.total_seconds(), "max_interval": params.max_interval.value,
         "stale_grace_seconds": params.stale_grace.total_seconds()},
    )


def check_no_backup_data(
    policy: BackupPolicy, schedule: PolicySchedule, params: RuleParams, now: datetime
) -> tuple[str, dict[str, Any], dict[str, Any]] | None:
    """Returns a violation when `total_size` is 0 (or missing) for a policy whose first run has been observed, or
    that was first seen more than its interval plus `stale_grace` ago."""
    size = policy.total_size
    if size is not None and size > 0:
        return None
    waited = now - schedule.first_seen_at
    allowed = policy.schedule.interval.length + params.stale_grace
    if schedule.invoked:
        why = f"a run was observed at {format_instant(schedule.recent[-1].due_at)}"
    elif waited > allowed:
        why = f"it was first seen {format_duration(waited, style='alert')} ago"
    else:
        return None
    shown = "missing" if size is None else f"{size:g}"
    return (
        f"policy {policy.id} holds no backup data (total_size {shown}) although {why}",
        {"total_size": size, "invoked": schedule.invoked, "first_seen_at": format_instant(schedule.first_seen_at)},
        {"total_size": "> 0", "within_seconds": allowed.total_seconds()},
    )


@dataclass(frozen=True, slots=True)
class Rule:
    """A rule's id, default severity, one-line description and (for per-policy rules) its check: of the policy
    alone (`check`) or of the policy and what has been observed of its runs (`observed`)."""

    id: str
    severity: Severity
    description: str
    check: PolicyCheck | None = None
    observed: ObservedCheck | None = None


# The registry: literal, greppable, ordered as reports list them.
RULES: dict[str, Rule] = {
    r.id: r
    for r in (
        Rule(UNPROTECTED_DISK, Severity.CRITICAL, "no backup policy covers the disk or its VM"),
        Rule(
            RETENTION_BELOW_MINIMUM,
            Severity.MEDIUM,
            "a policy keeps fewer backups than rules.min_retention",
            check_retention_below_minimum,
        ),
        Rule(
            RETENTION_WINDOW_TOO_SHORT,
            Severity.MEDIUM,
            "retention × interval is shorter than rules.min_retention_days",
            check_retention_window,
        ),
        Rule(
            INTERVAL_TOO_INFREQUENT,
            Severity.MEDIUM,
            "a policy runs less often than rules.max_interval",
            check_interval,
        ),
        Rule(
            SCHEDULE_STALE,
            Severity.HIGH,
            "next_invocation_at is older than rules.stale_grace: the scheduled backup did not run",
            check_schedule_stale,
        ),
        Rule(DISK_NOT_FOUND, Severity.HIGH, "a configured disk does not exist (404 disk_not_found)"),
        Rule(DISK_IN_TRASH, Severity.HIGH, "a configured disk is in the trash (406 object_in_trash)"),
        Rule(
            OBSERVED_INTERVAL_TOO_LONG,
            Severity.HIGH,
            "an observed step of next_invocation_at is longer than rules.max_interval plus rules.stale_grace",
            observed=check_observed_interval,
        ),
        Rule(
            NO_BACKUP_DATA,
            Severity.HIGH,
            "total_size is 0 after a run was observed, or interval plus rules.stale_grace after first seen",
            observed=check_no_backup_data,
        ),
        Rule(
            DETACHED_FROM_COVERING_VM,
            Severity.HIGH,
            "the disk's only backup policies are on a VM it is detached from (disable it if detached disks are "
            "backed up)",
        ),
    )
}

_POLICY_RULES = tuple(r for r in RULES.values() if r.check is not None or r.observed is not None)


def evaluate(snapshot: DiskSnapshot, rules: RuleSet, *, now: datetime,
             schedules: Mapping[str, PolicySchedule] | None = None) -> list[Finding]:
    """Returns the findings for one disk snapshot; an unknown snapshot yields none (it has no verdict).

    `schedules` (by policy id) is what has been observed of the disk's policies' runs (`invocations.observe`); a
    policy without one has not been observed yet, and the rules judged from observations say nothing of it.
    """
    disk_id = snapshot.disk_id
    if snapshot.outcome is ReadOutcome.UNKNOWN or (snapshot.tier.exempt and not rules.has_override(disk_id)):
        return []
    applied = rules.applied(disk_id, snapshot.tier)
    disabled = applied.disabled

    def make(rule: str, policy_id: str | None, message: str, obs: dict[str, Any], exp: dict[str, Any]) -> Finding:
        return Finding(rule, disk_id, policy_id, applied.severity_of(rule), message, obs, exp)

    if snapshot.outcome is ReadOutcome.NOT_FOUND:
        if DISK_NOT_FOUND in disabled:
            return []
        return [make(DISK_NOT_FOUND, None, f"disk {disk_id} does not exist", {"error": "disk_not_found"}, {})]
    if snapshot.outcome is ReadOutcome.IN_TRASH:
        if DISK_IN_TRASH in disabled:
            return []
        keep = format_instant(_trash_keep_until(snapshot.detail))
        msg = f"disk {disk_id} is in the trash" + (f" until {keep}" if keep else "")
        return [make(DISK_IN_TRASH, None, msg, {"error": "object_in_trash", "keep_until": keep}, {})]

    params = applied.params
    findings: list[Finding] = []
    policies, detached_from = covering(snapshot, honour_detached=honours_detached(applied))
    if not policies and detached_from:
        # Covered only through a VM it is detached from: the VM's policies back up the VM's attached disks.
        vm = snapshot.disk.vm_id
        attachment = snapshot.disk.attachment
        findings.append(make(
            DETACHED_FROM_COVERING_VM, None,
            f"disk {disk_id} is detached from virtual machine {vm}, whose backup "
            f"{'policy' if len(detached_from) == 1 else 'policies'} {', '.join(p.id for p in detached_from)} "
            f"{'is' if len(detached_from) == 1 else 'are'} its only coverage",
            {"vm_id": vm, "state": attachment.state if attachment else None,
             "attach_on_boot": attachment.attach_on_boot if attachment else None,
             "vm_policies": [p.id for p in detached_from]},
            {"state": "attached"}))
        return findings
    if not policies:
        if UNPROTECTED_DISK not in disabled:
            vm = snapshot.disk.vm_id
            where = f" or its VM {vm}" if vm else ""
            findings.append(
                make(
                    UNPROTECTED_DISK,
                    None,
                    f"no backup policy covers disk {disk_id}{where}",
                    {"policies": 0, "vm_id": vm},
                    {"policies": ">= 1"},
                )
            )
        return findings
    for policy in sorted(policies, key=lambda p: p.id):
        schedule = (schedules or {}).get(policy.id)
        for rule in _POLICY_RULES:
            if rule.id in disabled:
                continue
            if rule.check is not None:
                hit = rule.check(policy, params, now)
            elif rule.observed is not None and schedule is not None:
                hit = rule.observed(policy, schedule, params, now)
            else:
                continue
            if hit is not None:
                message, observed, expected = hit
                observed = {"target": f"{policy.target_type.value}:{policy.target_id}", **observed}
                findings.append(make(rule.id, policy.id, message, observed, expected))
    return findings


def honours_detached(applied: Applied) -> bool:
    """Returns whether VM policies cover only the disks attached to the VM for a disk judged by `applied`: yes,
    unless it disables `detached-from-covering-vm` (a Katapult that backs up detached disks too)."""
    return DETACHED_FROM_COVERING_VM not in applied.disabled


def covering(snapshot: DiskSnapshot, *, honour_detached: bool = True, unknown_is_attached: bool = True
             ) -> tuple[tuple[BackupPolicy, ...], tuple[BackupPolicy, ...]]:
    """Returns (the policies that cover the disk, the VM policies that do not because it is detached from the VM).

    A policy on a VM covers the disks attached to it: a disk assigned to the VM but `detached` is not covered by
    it (unless `honour_detached` is off: a Katapult that backs up detached disks). An unknown attachment counts as
    attached when judging (`unknown_is_attached`; the collection makes a disk whose only coverage is its VM unknown
    when it cannot verify that), and as not attached where only what is known may count (`observed_coverage`).
    """
    attachment = snapshot.disk.attachment
    if not honour_detached or snapshot.disk.vm_id is None or (
            attachment.is_attached if attachment is not None else unknown_is_attached):
        return snapshot.policies, ()
    own = tuple(p for p in snapshot.policies if p.target_type is not TargetType.VIRTUAL_MACHINE)
    return own, tuple(p for p in snapshot.policies if p.target_type is TargetType.VIRTUAL_MACHINE)


def observed_coverage(snapshot: DiskSnapshot, rules: RuleSet) -> tuple[BackupPolicy, ...]:
    """Returns the policies whose runs, when observed, are runs of this disk: those covering it under the rules
    of its tier (`covering`), a VM's only while the disk is known to be attached to that VM.

    A VM's policy backs up the disks attached to it when it runs: its run says nothing of a detached disk, nor of
    one whose attachment is not known (unless the disk's rules disable `detached-from-covering-vm`: then VM
    policies cover detached disks too, for its runs as for its verdict).
    """
    applied = rules.applied(snapshot.disk_id, snapshot.tier)
    policies, _ = covering(snapshot, honour_detached=honours_detached(applied), unknown_is_attached=False)
    return policies


def _trash_keep_until(detail: object) -> datetime | None:
    """Returns `detail.trash_object.keep_until` as a datetime; anything else (any JSON at all) gives None."""
    # README: a 406 object_in_trash carries {"trash_object": {id, keep_until, object_id, object_type}}, keep_until in
    # Unix seconds. The wire parser already drops malformed values; this never raises on whatever it is given.
    trash = detail.get("trash_object") if isinstance(detail, dict) else None
    keep = trash.get("keep_until") if isinstance(trash, dict) else None
    if not isinstance(keep, int) or isinstance(keep, bool):
        return None
    return utc_from_epoch(keep)


def build_ruleset(
    *,
    default: RuleParams,
    overrides: Sequence[tuple[Sequence[str], Mapping[str, Any]]] = (),
    severity: Mapping[str, Severity] | None = None,
    disabled: Sequence[str] = (),
    tiers: Sequence[tuple[Tier, Mapping[str, Any], Mapping[str, Severity], Sequence[str] | None]] = (),
) -> RuleSet:
    """Returns a RuleSet; each override is (disk ids, changed params) applied over the defaults, later wins.

    Each tier is (tier, changed params, severities, disabled rules or None): its parameters are the defaults with
    its changes, its severities `[rules].severity` with its own on top, its disabled rules its own list when given,
    else `[rules].disabled`.
    """
    per_disk: dict[str, RuleParams] = {}
    for disks, changes in overrides:
        for disk_id in disks:
            per_disk[disk_id] = replace(per_disk.get(disk_id, default), **dict(changes))
    base_severity = dict(severity or {})
    tier_rules = {
        tier.name: Applied(replace(default, **dict(changes)), {**base_severity, **tier_severity},
                           frozenset(disabled if tier_disabled is None else tier_disabled))
        for tier, changes, tier_severity, tier_disabled in tiers
    }
    return RuleSet(default, per_disk, base_severity, frozenset(disabled), tuple(t[0] for t in tiers), tier_rules)
