"""The store's writes of runs and of a finished cycle: plain functions of a SQLAlchemy Core `Connection` inside the
caller's transaction (`repo.Transaction` runs them through `AsyncConnection.run_sync`).

A cycle is written set-based: for each chunk of disks the stored rows are read with one query (`queries`), the
differences are worked out in Python, and each kind of change is one executemany of one fixed statement (new rows,
changed rows, closed intervals), so drivers prepare each statement once. Memory stays bounded by the chunk size.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, delete, insert, update
from sqlalchemy.engine import Connection

from auditor.domain.alerts import AlertState, OutboxEntry, notification_to_dict
from auditor.domain.lifecycle import Change, Transition
from auditor.domain.models import DiskSnapshot, ReadOutcome, TrackedFinding
from auditor.domain.records import RunError, RunStats, RunStatus
from auditor.store import queries
from auditor.store.queries import chunks
from auditor.store.statements import insert_if_absent, rowcount
from auditor.store.tables import (
    alert_states,
    disk_states,
    disks,
    drift_events,
    finding_events,
    findings,
    outbox,
    policy_states,
    revoked_sessions,
    run_summaries,
    runs,
)
from auditor.vocabulary import DiskVerdict


@dataclass(frozen=True, slots=True)
class DiskWrite:
    """One disk's outcome in a run, with where it came from (`config` or `org:<ref>`)."""

    snapshot: DiskSnapshot
    source: str


@dataclass(slots=True)
class CycleWrite:
    """Everything one finished cycle writes, in one transaction."""

    run_id: str
    now: datetime
    status: RunStatus
    targets_checked: int
    stats: RunStats
    errors: list[RunError]
    disks: list[DiskWrite]
    changes: list[Change]
    retired_disks: set[str] = field(default_factory=set)
    finished_at: datetime | None = None
    # The verdict of every disk of the run after it (compliant, waived, noncompliant, unknown) and the open
    # findings after it by severity and by rule: the run's history (disk_states by change, run_summaries).
    disk_statuses: dict[str, str] = field(default_factory=dict)
    open_by_severity: dict[str, int] = field(default_factory=dict)
    open_by_rule: dict[str, int] = field(default_factory=dict)


def revoke_session(conn: Connection, sid: str, *, expires: datetime, now: datetime) -> int:
    """Records a dashboard session as revoked until it would have expired, and deletes the revocations of sessions
    that have expired by `now` (their cookies are refused anyway); returns how many were deleted."""
    insert_if_absent(conn, revoked_sessions, {"sid": sid, "expires_at": expires, "revoked_at": now})
    return rowcount(conn.execute(delete(revoked_sessions).where(revoked_sessions.c.expires_at <= now)))


def new_run_id() -> str:
    """Returns a new run id (the caller creates it, so it is known before the run is recorded)."""
    return uuid.uuid4().hex


# ---- runs ------------------------------------------------------------------------------------------------------


def start_run(conn: Connection, *, run_id: str, now: datetime, trigger: str, owner: str | None) -> None:
    """Records a new running run.

    Runs are numbered by max(seq) + 1: safe because only the holder of the cycle lease starts runs (and the
    unique index turns a race into an error rather than two runs with one number).
    """
    conn.execute(insert(runs).values(
        id=run_id, seq=queries.next_run_seq(conn), trigger=trigger, status=RunStatus.RUNNING.value,
        started_at=now, finished_at=None, targets_checked=0, disks_ok=0, disks_unknown=0, api_requests=0,
        api_retries=0, api_rate_limited=0, api_by_status={}, findings_opened=0, findings_resolved=0, errors=[],
        owner=owner))


def _failed_summary(run_id: str, *, started_at: datetime, finished_at: datetime, stats: RunStats) -> dict[str, Any]:
    return {"run_id": run_id, "started_at": started_at, "finished_at": finished_at,
            "status": RunStatus.FAILED.value, "disks_total": 0, "disks_compliant": 0, "disks_noncompliant": 0,
            "disks_unknown": 0, "disks_exempt": 0, "open_by_severity": {}, "open_by_rule": {},
            "requests": stats.requests, "duration_seconds": max((finished_at - started_at).total_seconds(), 0.0)}


def fail_run(conn: Connection, run_id: str, *, now: datetime, errors: Sequence[RunError], stats: RunStats) -> bool:
    """Marks a run failed unless it finished otherwise; returns whether the row was there to mark."""
    started = queries.run_started_at(conn, run_id)
    if started is not None:
        insert_if_absent(conn, run_summaries, _failed_summary(run_id, started_at=started, finished_at=now,
                                                              stats=stats))
    r = conn.execute(
        update(runs).where(runs.c.id == run_id, runs.c.status.in_([RunStatus.RUNNING.value, RunStatus.FAILED.value]))
        .values(status=RunStatus.FAILED.value, finished_at=now, errors=[e.as_dict() for e in errors],
                api_requests=stats.requests, api_retries=stats.retries, api_rate_limited=stats.rate_limited,
                api_by_status=dict(stats.by_status)))
    return rowcount(r) == 1


def record_failed_run(conn: Connection, run_id: str, *, trigger: str, started_at: datetime, finished_at: datetime,
                      errors: Sequence[RunError], stats: RunStats, owner: str | None) -> None:
    """Marks a run failed, creating its row if the run never got recorded (the database was down at start)."""
    if fail_run(conn, run_id, now=finished_at, errors=errors, stats=stats):
        return
    if queries.run_started_at(conn, run_id) is not None:
        return  # it finished otherwise (e.g. complete): nothing to overwrite
    conn.execute(insert(run_summaries).values(**_failed_summary(run_id, started_at=started_at,
                                                                 finished_at=finished_at, stats=stats)))
    conn.execute(insert(runs).values(
        id=run_id, seq=queries.next_run_seq(conn), trigger=trigger, status=RunStatus.FAILED.value,
        started_at=started_at, finished_at=finished_at, targets_checked=0, disks_ok=0, disks_unknown=0,
        api_requests=stats.requests, api_retries=stats.retries, api_rate_limited=stats.rate_limited,
        api_by_status=dict(stats.by_status), findings_opened=0, findings_resolved=0,
        errors=[e.as_dict() for e in errors], owner=owner))


def abandon_orphaned_runs(conn: Connection, *, now: datetime, reason: str = queries.ABANDONED_REASON) -> list[str]:
    """Records as failed the runs left `running` whose owner is gone (`queries.orphaned_runs`); returns their
    ids. Readers already see them failed (`queries.run_view`); the daemon writes it down once."""
    orphans = queries.orphaned_runs(conn, now=now)
    for chunk in chunks(orphans):
        # finished_at stays empty: the run never finished, so readiness does not count it as a cycle.
        conn.execute(update(runs).where(runs.c.id.in_(chunk), runs.c.status == RunStatus.RUNNING.value)
                     .values(status=RunStatus.FAILED.value, errors=queries.abandoned_errors(now, reason)))
    return orphans


# ---- alerts ----------------------------------------------------------------------------------------------------


def enqueue(conn: Connection, entries: Sequence[OutboxEntry], states: Sequence[AlertState | tuple[str, str]], *,
            run_id: str | None, now: datetime) -> None:
    """Adds outbox entries and applies alert-state changes; a (notifier, fingerprint) tuple forgets a state."""
    for e in entries:
        n = e.notification
        # Ids are derived from the transition (see notification_key): an entry planned twice is written once.
        insert_if_absent(conn, outbox, {
            "id": n.id, "notifier": n.notifier, "group_key": n.group_key, "kind": e.kind,
            "payload": notification_to_dict(n), "run_id": run_id, "created_at": now, "state": "pending",
            "attempts": 0, "next_attempt_at": now, "claimed_by": None, "claimed_at": None, "delivered_at": None,
            "last_status": None, "last_error": None})
    a = alert_states.c
    for st in states:
        if isinstance(st, tuple):
            conn.execute(delete(alert_states).where(a.notifier == st[0], a.fingerprint == st[1]))
            continue
        values = {"status": st.status.value, "last_sent_at": st.last_sent_at, "starts_at": st.starts_at}
        if queries.alert_state_row(conn, st.notifier, st.fingerprint) is None:
            conn.execute(insert(alert_states).values(notifier=st.notifier, fingerprint=st.fingerprint, **values))
        else:
            conn.execute(update(alert_states).where(a.notifier == st.notifier, a.fingerprint == st.fingerprint)
                         .values(**values))


# ---- the cycle's one write -------------------------------------------------------------------------------------


def write_cycle(conn: Connection, cycle: CycleWrite) -> None:
    """Writes a finished cycle: disks, policy states, drift, findings, events, history and the run row."""
    new_disks = _write_disks(conn, cycle)
    _write_states(conn, cycle, new_disks=new_disks)
    _write_findings(conn, cycle)
    _write_history(conn, cycle)
    opened = sum(1 for c in cycle.changes if c.kind in (Transition.OPENED, Transition.REOPENED,
                                                         Transition.UNWAIVED))
    resolved = sum(1 for c in cycle.changes if c.kind is Transition.RESOLVED)
    ok = sum(1 for d in cycle.disks if d.snapshot.outcome is not ReadOutcome.UNKNOWN)
    conn.execute(update(runs).where(runs.c.id == cycle.run_id).values(
        status=cycle.status.value, finished_at=cycle.finished_at or cycle.now,
        targets_checked=cycle.targets_checked, disks_ok=ok, disks_unknown=len(cycle.disks) - ok,
        api_requests=cycle.stats.requests, api_retries=cycle.stats.retries,
        api_rate_limited=cycle.stats.rate_limited, api_by_status=dict(cycle.stats.by_status),
        findings_opened=opened, findings_resolved=resolved, errors=[e.as_dict() for e in cycle.errors]))


def _insert(conn: Connection, table: Any, rows: list[dict[str, Any]]) -> None:
    if rows:
        conn.execute(insert(table), rows)


def _close(conn: Connection, table: Any, ids: list[Any], *, at: datetime) -> None:
    """Sets `valid_to` on the rows of `table` among `ids` (intervals that ended at `at`)."""
    for chunk in chunks(ids):
        conn.execute(update(table).where(table.c.id.in_(chunk)).values(valid_to=at))


_DISK_FACTS = ("name", "vm_id", "vm_fqdn", "source", "is_target", "outcome", "error_code", "error_message", "tier",
               "tier_detail")
# Changed disks are written with one fixed statement: every fact column, by id.
_UPDATE_DISK = (update(disks).where(disks.c.id == bindparam("b_id"))
                .values({name: bindparam(f"b_{name}") for name in _DISK_FACTS}))


def _tier_of(snap: DiskSnapshot) -> tuple[str | None, dict[str, Any] | None]:
    """Returns the disk row's tier and tier_detail for a snapshot (None, None for the defaults)."""
    decision = snap.tier
    if decision.tier is None:
        return None, None
    return decision.tier.name, {"exempt": decision.tier.exempt, "reason": decision.tier.reason or None,
                                "because": dict(decision.because)}


def _write_disks(conn: Connection, cycle: CycleWrite) -> set[str]:
    """Upserts the run's disks; returns the ids never read before this run (first seen, or only unknown)."""
    now = cycle.now
    new_disks: set[str] = set()
    drift: list[dict[str, Any]] = []
    for part in chunks(cycle.disks):
        existing = queries.disks_by_id(conn, [d.snapshot.disk_id for d in part])
        inserts: list[dict[str, Any]] = []
        changed: list[dict[str, Any]] = []
        read_ok: list[str] = []
        unknown: list[str] = []
        for d in part:
            snap = d.snapshot
            disk = snap.disk
            definite = snap.outcome is not ReadOutcome.UNKNOWN
            row = existing.get(disk.id)
            if row is None or row.last_read_at is None:
                # No earlier definite reading: this run's policies are the disk's baseline, not drift.
                new_disks.add(disk.id)
            tier, tier_detail = _tier_of(snap)
            if row is None:
                inserts.append({"id": disk.id, "name": disk.name, "vm_id": disk.vm_id, "vm_fqdn": disk.vm_fqdn,
                                "source": d.source, "is_target": True, "outcome": snap.outcome.value,
                                "error_code": snap.error_code, "error_message": snap.error_message,
                                "first_seen_at": now, "last_checked_at": now,
                                "last_read_at": now if definite else None, "last_run_id": cycle.run_id,
                                "tier": tier, "tier_detail": tier_detail})
                continue
            if snap.outcome is not ReadOutcome.OK:
                tier, tier_detail = row.tier, row.tier_detail  # no tier was decided: keep what we knew
            elif row.tier != tier and row.last_read_at is not None:
                # A disk moving between tiers is judged by new rules from this run on: that is drift.
                drift.append({"disk_id": disk.id, "policy_id": "", "run_id": cycle.run_id, "at": now,
                              "kind": "tier-changed", "before": {"tier": row.tier}, "after": {"tier": tier}})
            if definite:
                read_ok.append(disk.id)
                name = disk.name or row.name
                vm_id, vm_fqdn = (disk.vm_id, disk.vm_fqdn) if snap.outcome is ReadOutcome.OK else (None, None)
                if snap.outcome is ReadOutcome.OK and disk.vm_id is None and row.vm_id and not disk.name:
                    vm_id, vm_fqdn = row.vm_id, row.vm_fqdn  # per-disk mode without a lookup: keep what we knew
            else:
                unknown.append(disk.id)
                name, vm_id, vm_fqdn = row.name, row.vm_id, row.vm_fqdn
            new = (name, vm_id, vm_fqdn, d.source, True, snap.outcome.value, snap.error_code, snap.error_message,
                   tier, tier_detail)
            if new != tuple(getattr(row, c) for c in _DISK_FACTS):
                changed.append({"b_id": disk.id, **{f"b_{c}": v for c, v in zip(_DISK_FACTS, new, strict=True)}})
        _insert(conn, disks, inserts)
        if changed:
            conn.execute(_UPDATE_DISK, changed)
        # The per-poll timestamps of rows whose facts did not change go in bulk.
        if read_ok:
            conn.execute(update(disks).where(disks.c.id.in_(read_ok)).values(
                last_checked_at=now, last_read_at=now, last_run_id=cycle.run_id))
        if unknown:
            conn.execute(update(disks).where(disks.c.id.in_(unknown)).values(last_checked_at=now,
                                                                            last_run_id=cycle.run_id))
    _insert(conn, drift_events, drift)
    for chunk in chunks(sorted(cycle.retired_disks)):
        conn.execute(update(disks).where(disks.c.id.in_(chunk)).values(is_target=False))
    return new_disks


_MOVE_STATE = (update(policy_states).where(policy_states.c.id == bindparam("b_id"))
               .values(next_invocation_at=bindparam("b_next"), total_size=bindparam("b_size"),
                       target_name=bindparam("b_name")))


def _write_states(conn: Connection, cycle: CycleWrite, *, new_disks: set[str]) -> None:
    """Writes policy states by change and drift events, a chunk of disks at a time."""
    now = cycle.now
    settled = [d.snapshot for d in cycle.disks if d.snapshot.outcome is not ReadOutcome.UNKNOWN]
    for part in chunks(settled):
        current = queries.current_policy_rows(conn, [snap.disk_id for snap in part])
        inserts: list[dict[str, Any]] = []
        closed: list[int] = []
        moving: list[dict[str, Any]] = []
        drift: list[dict[str, Any]] = []
        for snap in part:
            states = dict(current.get(snap.disk_id, {}))
            # A disk's first definite reading is its baseline, not drift.
            is_new_disk = snap.disk_id in new_disks
            for policy in snap.policies:
                h = policy.settings_hash()
                after = {"retention": policy.retention, "interval": policy.schedule.interval.value,
                         "target_type": policy.target_type.value, "target_id": policy.target_id}
                row = states.pop(policy.id, None)
                if row is not None and row.settings_hash == h:
                    nxt, size = policy.schedule.next_invocation_at, policy.total_size
                    if row.next_invocation_at != nxt or row.total_size != size or (
                            policy.target_name and row.target_name != policy.target_name):
                        moving.append({"b_id": row.id, "b_next": nxt, "b_size": size,
                                       "b_name": policy.target_name or row.target_name})
                    continue
                if row is not None:
                    closed.append(row.id)
                    before: dict[str, Any] | None = queries.state_record(row).settings()
                    kind = "policy-changed"
                else:
                    before, kind = None, "policy-added"
                inserts.append({
                    "disk_id": snap.disk_id, "policy_id": policy.id, "settings_hash": h,
                    "retention": policy.retention, "interval": policy.schedule.interval.value,
                    "target_type": policy.target_type.value, "target_id": policy.target_id,
                    "target_name": policy.target_name, "next_invocation_at": policy.schedule.next_invocation_at,
                    "total_size": policy.total_size, "valid_from": now, "valid_to": None,
                    "first_run_id": cycle.run_id})
                if not is_new_disk:
                    drift.append({"disk_id": snap.disk_id, "policy_id": policy.id, "run_id": cycle.run_id,
                                  "at": now, "kind": kind, "before": before, "after": after})
            for policy_id, old_row in states.items():
                closed.append(old_row.id)
                drift.append({"disk_id": snap.disk_id, "policy_id": policy_id, "run_id": cycle.run_id, "at": now,
                              "kind": "policy-removed", "before": queries.state_record(old_row).settings(),
                              "after": None})
        _close(conn, policy_states, closed, at=now)
        _insert(conn, policy_states, inserts)
        if moving:
            conn.execute(_MOVE_STATE, moving)
        _insert(conn, drift_events, drift)


_FINDING_COLUMNS = ("rule", "disk_id", "policy_id", "severity", "status", "message", "observed", "expected",
                    "first_seen", "last_seen", "opened_at", "resolved_at", "waiver", "tier")
_UPDATE_FINDING = (update(findings).where(findings.c.fingerprint == bindparam("b_fingerprint"))
                   .values({c: bindparam(f"b_{c}") for c in _FINDING_COLUMNS}))


def _finding_values(f: TrackedFinding) -> dict[str, Any]:
    return {"fingerprint": f.fingerprint, "rule": f.rule, "disk_id": f.disk_id, "policy_id": f.policy_id,
            "severity": f.severity.value, "status": f.status.value, "message": f.message, "observed": f.observed,
            "expected": f.expected, "first_seen": f.first_seen, "last_seen": f.last_seen, "opened_at": f.opened_at,
            "resolved_at": f.resolved_at, "waiver": f.waiver, "tier": f.tier}


def _write_findings(conn: Connection, cycle: CycleWrite) -> None:
    inserts: list[dict[str, Any]] = []
    updates: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    for change in cycle.changes:
        values = _finding_values(change.finding)
        if change.previous is None:
            inserts.append(values)
        else:
            updates.append({f"b_{k}": v for k, v in values.items()})
        if change.kind is not Transition.PERSISTING:
            events.append({"fingerprint": change.finding.fingerprint, "disk_id": change.finding.disk_id,
                           "run_id": cycle.run_id, "at": cycle.now, "kind": change.kind.value})
    for part in chunks(inserts):
        _insert(conn, findings, list(part))
    for part in chunks(updates):
        conn.execute(_UPDATE_FINDING, list(part))
    for part in chunks(events):
        _insert(conn, finding_events, list(part))


def _write_history(conn: Connection, cycle: CycleWrite) -> None:
    """Writes the run's summary row and each disk's verdict by change (a chunk of disks at a time)."""
    now = cycle.now
    counts = dict.fromkeys(DiskVerdict, 0)
    for status in cycle.disk_statuses.values():
        counts[DiskVerdict(status)] += 1
    finished = cycle.finished_at or now
    conn.execute(insert(run_summaries).values(
        run_id=cycle.run_id, started_at=now, finished_at=finished, status=cycle.status.value,
        disks_total=len(cycle.disk_statuses),
        # As in the report: a disk whose findings are all waived is compliant.
        disks_compliant=counts[DiskVerdict.COMPLIANT] + counts[DiskVerdict.WAIVED],
        disks_noncompliant=counts[DiskVerdict.NONCOMPLIANT], disks_unknown=counts[DiskVerdict.UNKNOWN],
        disks_exempt=counts[DiskVerdict.EXEMPT],
        open_by_severity=dict(cycle.open_by_severity), open_by_rule=dict(cycle.open_by_rule),
        requests=cycle.stats.requests, duration_seconds=max((finished - now).total_seconds(), 0.0)))
    for chunk in chunks(sorted(cycle.disk_statuses)):
        current = queries.current_verdict_rows(conn, chunk)
        closed: list[int] = []
        inserts: list[dict[str, Any]] = []
        for disk_id in chunk:
            status = cycle.disk_statuses[disk_id]
            row = current.get(disk_id)
            if row is not None and row.status == status:
                continue
            if row is not None:
                closed.append(row.id)
            inserts.append({"disk_id": disk_id, "status": status, "valid_from": now, "valid_to": None,
                            "run_id": cycle.run_id})
        _close(conn, disk_states, closed, at=now)
        _insert(conn, disk_states, inserts)
    for chunk in chunks(sorted(cycle.retired_disks)):
        # A disk no longer audited has no verdict from now on (not "compliant until further notice").
        conn.execute(update(disk_states).where(disk_states.c.valid_to.is_(None), disk_states.c.disk_id.in_(chunk))
                     .values(valid_to=now))
