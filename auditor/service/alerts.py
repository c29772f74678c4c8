"""Use cases for alerts: plan a cycle's notifications (written with the cycle) and deliver the outbox.

Planning compares what each notifier was last told (its alert states) with the findings after the run, the way
Alertmanager's notification pipeline does: new or reopened findings fire, still-open ones repeat after
`repeat_interval`, fixed ones resolve; waived findings and findings of disks that could not be read say nothing.

Receivers that expire alerts (Alertmanager) are different: its client contract is that active alerts are re-sent
before their endsAt, so every open alert is re-posted to them every cycle, whatever `repeat_interval` says (that
option is for human channels), with a keep-alive derived from the audit interval (`keep_alive_for`).
"""

from __future__ import annotations

import asyncio
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
    Delivery,
    Notification,
    OutboxEntry,
    keep_alive_for,
)
from auditor.domain.lifecycle import Change
from auditor.domain.models import FindingStatus, Severity, TrackedFinding, fingerprint
from auditor.domain.records import RunError, RunStatus
from auditor.domain.retry import backoff
from auditor.errors import NotifyError, StoreError
from auditor.notify.dispatch import Dispatcher
from auditor.notify.policy import BACKOFF_BASE, BACKOFF_CAP, group_alerts, is_repeat_due, wants
from auditor.store.outbox import Outbox

log = logging.getLogger(__name__)

StateChange = AlertState | tuple[str, str]  # a tuple forgets the (notifier, fingerprint) state
MAX_ATTEMPTS = 25  # with the 15-minute backoff cap, about five hours of trying before giving up
def is_kept_alive(n: NotifierCommon) -> bool:
    """Returns whether the notifier's receiver expires alerts, so open ones are re-posted every cycle."""
    return getattr(n, "kind", None) in KEEP_ALIVE_KINDS


def incomplete_fingerprint(disks: Sequence[str], organizations: Sequence[str]) -> str:
    """Returns the `audit-incomplete` fingerprint of a target set (stable across restarts)."""
    key = "\n".join(sorted(f"d:{d}" for d in disks) + sorted(f"o:{o}" for o in organizations))
    return fingerprint(AUDIT_INCOMPLETE, "targets:" + hashlib.sha256(key.encode()).hexdigest()[:16], None)


def finding_alert(f: TrackedFinding, *, status: AlertStatus) -> Alert:
    """Returns the alert for a finding (its `tier` label is the one the finding opened with)."""
    where = f"{f.disk_id}" + (f" / {f.policy_id}" if f.policy_id else "")
    return Alert(
        fingerprint=f.fingerprint,
        rule=f.rule,
        severity=f.severity,
        status=status,
        summary=f"{f.rule} on {where}",
        description=f.message,
        starts_at=f.opened_at,
        ends_at=f.resolved_at if status is AlertStatus.RESOLVED else None,
        disk_id=f.disk_id,
        policy_id=f.policy_id,
        tier=f.tier,
    )


def incomplete_alert(
    fp: str, *, status: RunStatus, errors: Sequence[RunError], starts_at: datetime, now: datetime
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
) -> Plan:
    """Returns what to tell each notifier after a run (pure: no I/O, `now` given).

    `interval` is the audit interval (it sets Alertmanager's keep-alive); `untouched` may hold stored findings
    the run did not change (open findings of a disk that could not be read): open ones still count as firing.
    """
    # (alert, is_open, forget): waived findings resolve silently; an expiring waiver later fires them as new.
    candidates: list[tuple[Alert, bool, bool]] = []
    changed: set[str] = set()
    for c in changes:
        f = c.finding
        changed.add(f.fingerprint)
        if f.status is FindingStatus.OPEN:
            candidates.append((finding_alert(f, status=AlertStatus.FIRING), True, False))
        else:
            candidates.append((finding_alert(f, status=AlertStatus.RESOLVED), False,
                               f.status is FindingStatus.WAIVED))
    for f in untouched:
        if f.status is FindingStatus.OPEN and f.fingerprint not in changed:
            changed.add(f.fingerprint)
            candidates.append((finding_alert(f, status=AlertStatus.FIRING), True, False))
    keep_alive = keep_alive_for(interval)
    plan = Plan()
    for n in notifiers:
        prior = states.get((n.name, incomplete_fp))
        inc = incomplete_alert(incomplete_fp, status=run_status, errors=errors,
                               starts_at=prior.starts_at if prior and prior.status is AlertStatus.FIRING else now,
                               now=now)
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


@dataclass(slots=True)
class DeliveryReport:
    """What one delivery round did."""

    delivered: int = 0
    retried: int = 0
    failed: int = 0
    released: int = 0
    errors: int = 0  # unexpected exceptions (logged whole; the entry was released for a later round)


ERROR_RETRY = timedelta(seconds=60)  # an entry whose delivery broke unexpectedly is tried again after this


def retry_at(now: datetime, seconds: float) -> datetime:
    """Returns now + seconds, never overflowing (a wait past the datetime range is capped at a day)."""
    try:
        return now + timedelta(seconds=min(max(seconds, 0.0), 86400.0))
    except (OverflowError, ValueError):
        return now + timedelta(days=1)


async def deliver_due(
    *,
    outbox: Outbox,
    dispatcher: Dispatcher,
    notifiers: Mapping[str, NotifierCommon],
    clock: Callable[[], datetime],
    worker: str,
    limit: int = 200,
    max_retry_after: timedelta = timedelta(hours=1),
) -> DeliveryReport:
    """Claims due outbox entries and delivers them, each notifier on its own so a failing one delays no other.

    Within a notifier entries go in order; after a temporary failure the notifier's other entries are put back
    for the same retry time instead of each waiting out its own timeout. An unexpected exception never vanishes:
    it is logged whole, counted, and the entry is released for a later round.
    """
    now = clock()
    claimed = await outbox.claim_due(now=now, worker=worker, limit=limit)
    report = DeliveryReport()
    by_notifier: dict[str, list[Delivery]] = {}
    for d in claimed:
        by_notifier.setdefault(d.notifier, []).append(d)

    async def send_one(name: str, settings: NotifierCommon | None, d: Delivery) -> datetime | None:
        """Delivers one entry; returns the retry time when the notifier failed temporarily."""
        if settings is None:
            await outbox.mark_failed(d.id, status=None, error=f"notifier {name!r} is no longer configured",
                                     worker=worker)
            report.failed += 1
            return None
        try:
            result = await dispatcher.send(d.notification, settings, now=clock())
        except NotifyError as exc:
            attempts = d.attempts + 1
            if exc.permanent or attempts >= MAX_ATTEMPTS:
                why = str(exc) if exc.permanent else f"gave up after {attempts} attempts: {exc}"
                log.error("notification %s to %s failed permanently: %s", d.id, name, why)
                await outbox.mark_failed(d.id, status=exc.status_code, error=why, worker=worker)
                report.failed += 1
                return None
            wait = backoff(attempts, base=BACKOFF_BASE, cap=BACKOFF_CAP, retry_after=exc.retry_after,
                           max_retry_after=max_retry_after)
            next_at = retry_at(clock(), wait)
            log.warning("notification %s to %s failed (attempt %d), retrying in %.0fs: %s", d.id, name,
                        attempts, wait, exc)
            await outbox.mark_retry(d.id, next_at=next_at, status=exc.status_code, error=str(exc), worker=worker)
            report.retried += 1
            return next_at
        if not await outbox.mark_delivered(d.id, now=clock(), status=result.status_code, detail=result.detail,
                                           worker=worker):
            log.warning("notification %s to %s was delivered after its claim expired", d.id, name)
        report.delivered += 1
        return None

    async def run(name: str, items: list[Delivery]) -> None:
        settings = notifiers.get(name)
        for index, d in enumerate(items):
            try:
                next_at = await send_one(name, settings, d)
            except StoreError:
                raise
            except Exception:  # a bug in delivery: log it whole, put the entry back, go on with the others
                log.exception("delivering notification %s to %s broke unexpectedly; it is retried later", d.id,
                              name)
                report.errors += 1
                await outbox.release(d.id, next_at=retry_at(clock(), ERROR_RETRY.total_seconds()), worker=worker)
                continue
            if next_at is not None:
                for rest in items[index + 1:]:
                    await outbox.release(rest.id, next_at=next_at, worker=worker)
                    report.released += 1
                return

    results = await asyncio.gather(*(run(name, items) for name, items in by_notifier.items()),
                                   return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r  # a StoreError: the round's remaining claims expire and are retried by exactly one deliverer
    if claimed:
        log.info("delivery round: %d delivered, %d to retry, %d failed, %d errors", report.delivered,
                 report.retried, report.failed, report.errors)
    return report
