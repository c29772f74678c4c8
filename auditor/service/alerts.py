"""Alert planning: what each notifier is told after a cycle (written with the cycle into the outbox), and the
test notifications of `auditor notify test`. Pure: no I/O, `now` given. `delivery` sends what is planned.

Planning compares what each notifier was last told (its alert states) with the findings after the run, the way
Alertmanager's notification pipeline does: new or reopened findings fire, still-open ones repeat after
`repeat_interval`, fixed ones resolve; waived findings and findings of disks that could not be read say nothing.

Receivers that expire alerts (Alertmanager) are different: its client contract is that active alerts are re-sent
before their endsAt, so every open alert is re-posted to them every cycle, whatever `repeat_interval` says (that
option is for human channels), with a keep-alive derived from the audit interval (`keep_alive_for`).
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from auditor.config import NotifierCommon
from auditor.domain.alerts import (
    AUDIT_INCOMPLETE,
    DEFAULT_INTERVAL,
    KEEP_ALIVE_KINDS,
    Alert,
    AlertState,
    AlertStatus,
    DiskContext,
    Notification,
    OutboxEntry,
    keep_alive_for,
    runbook_link,
)
from auditor.domain.lifecycle import Change
from auditor.domain.models import FindingStatus, Severity, TrackedFinding, fingerprint
from auditor.domain.records import RunError, RunStatus
from auditor.notify.policy import group_alerts, is_repeat_due, wants

log = logging.getLogger(__name__)

StateChange = AlertState | tuple[str, str]  # a tuple forgets the (notifier, fingerprint) state


def is_kept_alive(n: NotifierCommon) -> bool:
    """Returns whether the notifier's receiver expires alerts, so open ones are re-posted every cycle."""
    return getattr(n, "kind", None) in KEEP_ALIVE_KINDS


def incomplete_fingerprint(disks: Sequence[str], organizations: Sequence[str]) -> str:
    """Returns the `audit-incomplete` fingerprint of a target set (stable across restarts)."""
    key = "\n".join(sorted(f"d:{d}" for d in disks) + sorted(f"o:{o}" for o in organizations))
    return fingerprint(AUDIT_INCOMPLETE, "targets:" + hashlib.sha256(key.encode()).hexdigest()[:16], None)


def finding_summary(f: TrackedFinding, disk: DiskContext) -> str:
    """Returns an alert's one-line summary: the rule, then the disk by name and id, its organization and the
    policy ("retention-below-minimum on disk web-1-system (disk_…) of organization acme, policy dbp_…")."""
    named = f"{disk.name} ({f.disk_id})" if disk.name else f.disk_id
    org = f"organization {disk.organization}" if disk.organization else "organization unknown"
    return f"{f.rule} on disk {named} of {org}" + (f", policy {f.policy_id}" if f.policy_id else "")


def finding_alert(f: TrackedFinding, *, status: AlertStatus, disk: DiskContext | None = None,
                  runbook_url: str = "") -> Alert:
    """Returns the alert for a finding (its `tier` label is the one the finding opened with); `disk` names the
    disk and its organization, `runbook_url` is [notify] runbook_url."""
    disk = disk or DiskContext()
    return Alert(
        fingerprint=f.fingerprint,
        rule=f.rule,
        severity=f.severity,
        status=status,
        summary=finding_summary(f, disk),
        description=f.message,
        starts_at=f.opened_at,
        ends_at=f.resolved_at if status is AlertStatus.RESOLVED else None,
        disk_id=f.disk_id,
        policy_id=f.policy_id,
        tier=f.tier,
        disk_name=disk.name,
        organization=disk.organization,
        runbook_url=runbook_link(runbook_url, f.rule),
    )


def incomplete_alert(
    fp: str, *, status: RunStatus, errors: Sequence[RunError], starts_at: datetime, now: datetime,
    runbook_url: str = "",
) -> Alert:
    """Returns the `audit-incomplete` alert: firing while runs are partial or failed, resolved by a complete one."""
    firing = status is not RunStatus.COMPLETE
    lines = [f"{e.target}: {e.code}: {e.message}" for e in errors[:10]]
    if len(errors) > 10:
        lines.append(f"... and {len(errors) - 10} more")
    return Alert(
        fingerprint=fp,
        rule=AUDIT_INCOMPLETE,
        severity=Severity.HIGH,
        status=AlertStatus.FIRING if firing else AlertStatus.RESOLVED,
        summary=(f"audit {status.value}: {len(errors)} target(s) could not be read; their compliance is unknown"
                 if firing else "audits complete again: every target was read"),
        description="\n".join(lines) if firing else "The last audit run read every target.",
        starts_at=starts_at,
        ends_at=None if firing else now,
        runbook_url=runbook_link(runbook_url, AUDIT_INCOMPLETE),
    )


@dataclass(slots=True)
class Plan:
    """A cycle's outbox entries and alert-state changes."""

    entries: list[OutboxEntry] = field(default_factory=list)
    states: list[StateChange] = field(default_factory=list)


def plan_notifications(
    *,
    notifiers: Sequence[NotifierCommon],
    changes: Sequence[Change],
    run_status: RunStatus,
    errors: Sequence[RunError],
    incomplete_fp: str,
    states: Mapping[tuple[str, str], AlertState],
    now: datetime,
    new_id: Callable[[], str] | None = None,
    interval: timedelta = DEFAULT_INTERVAL,
    untouched: Iterable[TrackedFinding] = (),
    disks: Mapping[str, DiskContext] | None = None,
    runbook_url: str = "",
) -> Plan:
    """Returns what to tell each notifier after a run (pure: no I/O, `now` given).

    `interval` is the audit interval (it sets Alertmanager's keep-alive); `untouched` may hold stored findings
    the run did not change (open findings of a disk that could not be read): open ones still count as firing.
    `disks` names the findings' disks and their organizations; `runbook_url` is [notify] runbook_url.
    """
    disks = disks or {}

    def alert(f: TrackedFinding, status: AlertStatus) -> Alert:
        return finding_alert(f, status=status, disk=disks.get(f.disk_id), runbook_url=runbook_url)

    # (alert, is_open, forget): waived findings resolve silently; an expiring waiver later fires them as new.
    candidates: list[tuple[Alert, bool, bool]] = []
    changed: set[str] = set()
    for c in changes:
        f = c.finding
        changed.add(f.fingerprint)
        if f.status is FindingStatus.OPEN:
            candidates.append((alert(f, AlertStatus.FIRING), True, False))
        else:
            candidates.append((alert(f, AlertStatus.RESOLVED), False, f.status is FindingStatus.WAIVED))
    for f in untouched:
        if f.status is FindingStatus.OPEN and f.fingerprint not in changed:
            changed.add(f.fingerprint)
            candidates.append((alert(f, AlertStatus.FIRING), True, False))
    keep_alive = keep_alive_for(interval)
    plan = Plan()
    for n in notifiers:
        prior = states.get((n.name, incomplete_fp))
        inc = incomplete_alert(incomplete_fp, status=run_status, errors=errors,
                               starts_at=prior.starts_at if prior and prior.status is AlertStatus.FIRING else now,
                               now=now, runbook_url=runbook_url)
        _plan_notifier(n, [*candidates, (inc, inc.status is AlertStatus.FIRING, False)], states=states, now=now,
                       new_id=new_id, plan=plan, keep_alive=keep_alive if is_kept_alive(n) else None)
    return plan


def _plan_notifier(
    n: NotifierCommon,
    candidates: Sequence[tuple[Alert, bool, bool]],
    *,
    states: Mapping[tuple[str, str], AlertState],
    now: datetime,
    new_id: Callable[[], str] | None,
    plan: Plan,
    keep_alive: timedelta | None,
) -> None:
    fresh: list[Alert] = []
    repeat: list[Alert] = []
    resolved: list[Alert] = []
    for alert, is_open, forget in candidates:
        st = states.get((n.name, alert.fingerprint))
        if is_open:
            if not wants(n, alert):
                continue
            if st is None or st.status is AlertStatus.RESOLVED:
                fresh.append(alert)
                plan.states.append(AlertState(n.name, alert.fingerprint, AlertStatus.FIRING, now, alert.starts_at))
            elif keep_alive is not None or is_repeat_due(st.last_sent_at, n.repeat_interval, now=now):
                # Alertmanager's contract: re-send active alerts before endsAt, so every cycle for those.
                repeat.append(alert)
                plan.states.append(AlertState(n.name, alert.fingerprint, AlertStatus.FIRING, now, st.starts_at))
            continue
        if st is None or st.status is not AlertStatus.FIRING:
            continue
        plan.states.append((n.name, alert.fingerprint))
        if not forget and wants(n, alert):
            resolved.append(alert)
    for kind, alerts in (("firing", fresh), ("repeat", repeat), ("resolved", resolved)):
        severity_map = {str(k): v for k, v in n.severity_map.items()}
        for key, labels, group in group_alerts(n.name, alerts, n.group_by, severity_map=severity_map):
            entry_id = new_id() if new_id is not None else notification_key(n.name, kind, key, group, now=now)
            note = Notification(id=entry_id, notifier=n.name, group_key=key, group_labels=labels, alerts=group,
                                created_at=now, is_repeat=kind == "repeat",
                                keep_alive=keep_alive if kind != "resolved" else None)
            plan.entries.append(OutboxEntry(note, kind))


def notification_key(notifier: str, kind: str, group_key: str, alerts: Sequence[Alert], *, now: datetime) -> str:
    """Returns the notification's id and `Idempotency-Key`, derived from the transition it announces.

    One transition of one alert (fired at `starts_at`, resolved at `ends_at`) always gets the same key, whichever
    process or leader plans it and however often it is retried; a repeat is a new message, keyed by its time.
    """
    parts = [notifier, kind, group_key]
    for a in sorted(alerts, key=lambda a: a.fingerprint):
        parts.append(f"{a.fingerprint}|{a.status.value}|{a.starts_at.isoformat()}|"
                     f"{a.ends_at.isoformat() if a.ends_at else ''}")
    if kind == "repeat":
        parts.append(now.isoformat())
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]


def test_notification(notifier: str, *, now: datetime) -> Notification:
    """Returns the clearly-marked test message `auditor notify test` sends."""
    alert = Alert(
        fingerprint=fingerprint("notifier-test", notifier, None),
        rule="notifier-test",
        severity=Severity.LOW,
        status=AlertStatus.FIRING,
        summary="TEST: the Katapult backup auditor can reach this channel",
        description="This is a test message sent by `auditor notify test`. No action is needed.",
        starts_at=now,
    )
    return Notification(id=uuid.uuid4().hex, notifier=notifier, group_key='{}:{alertname="notifier-test"}',
                        group_labels={"alertname": "notifier-test"}, alerts=(alert,), created_at=now, is_test=True)


def resolved_test_notification(test: Notification, *, now: datetime) -> Notification:
    """Returns the message that resolves a test notification on a stateful receiver (same fingerprint, so the
    same Alertmanager alert and the same PagerDuty dedup_key)."""
    alerts = tuple(replace(a, status=AlertStatus.RESOLVED, ends_at=now) for a in test.alerts)
    return replace(test, id=uuid.uuid4().hex, alerts=alerts, created_at=now)
