"""The store's writes of runs and of a finished cycle: plain functions of a SQLAlchemy Core `Connection` inside the
caller's transaction (`repo.Transaction` runs them through `AsyncConnection.run_sync`).

A cycle is written set-based: for each chunk of disks the stored rows it is compared with are read with one query
(`queries`), the differences are worked out in Python, and each kind of change is one statement of a fixed shape
(new rows, changed rows, closed intervals, the per-poll timestamps): on PostgreSQL one statement per chunk whose rows
or ids travel as arrays (`statements.insert_rows`, `update_rows`, `clauses.among`), on SQLite an executemany or an
IN list. Memory stays bounded by the chunk size.

The disk row carries a read model of the disk's history (`policies_digest`, `verdict`, written in the same
transaction): a disk whose policies hash as when its policy states were last written, and whose verdict is the one
stored, has nothing to compare in `policy_states` or `disk_states`, so an unchanged cycle reads only the disks.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from sqlalchemy import delete, insert, update
from sqlalchemy.engine import Connection

from auditor.domain.alerts import AlertState, OutboxEntry, notification_to_dict
from auditor.domain.invocations import Invocation, PolicySchedule
from auditor.domain.lifecycle import Change, Transition
from auditor.domain.models import DiskSnapshot, ReadOutcome, TrackedFinding
from auditor.domain.records import RunConfig, RunError, RunStats, RunStatus, policy_settings
from auditor.store import queries
from auditor.store.clauses import among, batch
from auditor.store.queries import DISK_FACTS, chunks
from auditor.store.statements import insert_if_absent, insert_rows, rowcount, update_rows, upsert_rows
from auditor.store.tables import (
    alert_states,
    disk_states,
    disks,
    drift_events,
    finding_events,
    findings,
    invocations,
    outbox,
    policy_schedules,
    policy_states,
    remediations,
    revoked_sessions,
    run_configs,
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
    # What was observed of the policies' runs (`invocations.observe`): the schedules that changed or are new, those
    # of policies that no longer cover their disk (disk id, policy id), and the invocations seen.
    schedules: list[PolicySchedule] = field(default_factory=list)
    schedules_gone: list[tuple[str, str]] = field(default_factory=list)
    invocations: list[Invocation] = field(default_factory=list)


def revoke_session(conn: Connection, sid: str, *, expires: datetime, now: datetime) -> int:
    """Records a dashboard session as revoked until it would have expired, and deletes the revocations of sessions
    that have expired by `now` (their cookies are refused anyway); returns how many were deleted."""
    insert_if_absent(conn, revoked_sessions, {"sid": sid, "expires_at": expires, "revoked_at": now})
    return rowcount(conn.execute(delete(revoked_sessions).where(revoked_sessions.c.expires_at <= now)))


def new_run_id() -> str:
    """Returns a new run id (the caller creates it, so it is known before the run is recorded)."""
    return uuid.uuid4().hex


# ---- runs ------------------------------------------------------------------------------------------------------


def record_config(conn: Connection, config: RunConfig | None) -> str | None:
    """Stores a run's configuration unless stored already (each distinct one once); returns its fingerprint."""
    if config is None:
        return None
    insert_if_absent(conn, run_configs, {"fingerprint": config.fingerprint, "config": config.settings})
    return config.fingerprint


def start_run(conn: Connection, *, run_id: str, now: datetime, trigger: str, owner: str | None,
              config: RunConfig | None = None) -> None:
    """Records a new running run, with the configuration it runs with.

    Runs are numbered by max(seq) + 1: safe because only the holder of the cycle lease starts runs (and the
    unique index turns a race into an error rather than two runs with one number).
    """
    conn.execute(insert(runs).values(
        id=run_id, seq=queries.next_run_seq(conn), trigger=trigger, status=RunStatus.RUNNING.value,
        started_at=now, finished_at=None, targets_checked=0, disks_ok=0, disks_unknown=0, api_requests=0,
        api_retries=0, api_rate_limited=0, api_by_status={}, findings_opened=0, findings_resolved=0, errors=[],
        owner=owner, config_fingerprint=record_config(conn, config)))


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
                      errors: Sequence[RunError], stats: RunStats, owner: str | None,
                      config: RunConfig | None = None) -> None:
    """Marks a run failed, creating its row (with its configuration) if the run never got recorded (the database
    was down at start)."""
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
        errors=[e.as_dict() for e in errors], owner=owner, config_fingerprint=record_config(conn, config)))


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
    """Adds outbox entries and applies alert-state changes, set-based (an upsert per chunk of states, a delete per
    chunk of forgotten ones); a (notifier, fingerprint) tuple forgets a state."""
    for e in entries:
        n = e.notification
        # Ids are derived from the transition (see notification_key): an entry planned twice is written once.
        insert_if_absent(conn, outbox, {
            "id": n.id, "notifier": n.notifier, "group_key": n.group_key, "kind": e.kind,
            "payload": notification_to_dict(n), "run_id": run_id, "created_at": now, "state": "pending",
            "attempts": 0, "next_attempt_at": now, "claimed_by": None, "claimed_at": None, "delivered_at": None,
            "last_status": None, "last_error": None})
    # Applied as if one after another: the last change of each (notifier, fingerprint) is the one that stands.
    last: dict[tuple[str, str], AlertState | None] = {}
    for st in states:
        if isinstance(st, tuple):
            last[st] = None
        else:
            last[(st.notifier, st.fingerprint)] = st
    forgotten: dict[str, list[str]] = {}
    kept: list[dict[str, Any]] = []
    for (notifier, fingerprint), state in last.items():
        if state is None:
            forgotten.setdefault(notifier, []).append(fingerprint)
        else:
            kept.append({"notifier": notifier, "fingerprint": fingerprint, "status": state.status.value,
                         "last_sent_at": state.last_sent_at, "starts_at": state.starts_at})
    a = alert_states.c
    for notifier, fingerprints in forgotten.items():
        for chunk in chunks(fingerprints, batch(conn)):
            conn.execute(delete(alert_states).where(a.notifier == notifier, among(conn, a.fingerprint, chunk)))
    for part in chunks(kept, batch(conn)):
        upsert_rows(conn, alert_states, part, keys=("notifier", "fingerprint"))


# ---- the cycle's one write -------------------------------------------------------------------------------------


def write_cycle(conn: Connection, cycle: CycleWrite) -> None:
    """Writes a finished cycle: disks, policy states, drift, findings, events, history and the run row."""
    unchanged = _Unchanged()
    new_disks = _write_disks(conn, cycle, unchanged)
    _write_states(conn, cycle, new_disks=new_disks, unchanged=unchanged.policies)
    _write_findings(conn, cycle)
    _write_history(conn, cycle, unchanged=unchanged.verdicts)
    _write_observations(conn, cycle)
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


def _close(conn: Connection, table: Any, ids: list[Any], *, at: datetime) -> None:
    """Sets `valid_to` on the rows of `table` among `ids` (intervals that ended at `at`)."""
    for chunk in chunks(ids, batch(conn)):
        conn.execute(update(table).where(among(conn, table.c.id, chunk)).values(valid_to=at))


def _tier_of(snap: DiskSnapshot) -> tuple[str | None, dict[str, Any] | None]:
    """Returns the disk row's tier and tier_detail for a snapshot (None, None for the defaults)."""
    decision = snap.tier
    if decision.tier is None:
        return None, None
    return decision.tier.name, {"exempt": decision.tier.exempt, "reason": decision.tier.reason or None,
                                "because": dict(decision.because)}


_FACTS_END = 1 + len(DISK_FACTS)
_ATTACHMENT_FACTS = ("attachment_state", "attach_on_boot", "attachment_vm_id", "attachment_verified_at")


def _attachment_of(snap: DiskSnapshot, *, now: datetime) -> tuple[Any, Any, Any, Any]:
    """Returns the disk row's attachment columns for what this run read (all None when it read none)."""
    attachment, vm_id = snap.disk.attachment, snap.disk.vm_id
    if snap.outcome is not ReadOutcome.OK or attachment is None or vm_id is None:
        return None, None, None, None
    return attachment.state, attachment.attach_on_boot, vm_id, attachment.verified_at or now


@dataclass(slots=True)
class _Unchanged:
    """What `_write_disks` found needs no comparing: disks whose policy states and whose verdict are as stored."""

    policies: set[str] = field(default_factory=set)
    verdicts: set[str] = field(default_factory=set)


def _policies_digest(snap: DiskSnapshot) -> str | None:
    """Returns a digest of everything `_write_states` compares of a disk's policies (None: always compare them):
    each one's id, the settings its `settings_hash` covers, next invocation, size and target name."""
    policies = snap.policies
    if len(policies) > 1:
        policies = tuple(sorted(policies, key=lambda p: p.id))
        if len({p.id for p in policies}) != len(policies):
            return None  # one policy listed twice is written as two states: not worth a digest
    # repr of a list of tuples of str, int, float and None is exact and the same in every process.
    key = repr([(p.id, p.retention, p.schedule.interval.value, p.target_type.value, p.target_id,
                 p.schedule.next_invocation_at.timestamp() if p.schedule.next_invocation_at else None,
                 p.total_size, p.target_name) for p in policies])
    return hashlib.blake2b(key.encode(), digest_size=16).hexdigest()


def _write_disks(conn: Connection, cycle: CycleWrite, unchanged: _Unchanged) -> set[str]:
    """Upserts the run's disks; returns the ids never read before this run (first seen, or only unknown), and notes
    in `unchanged` the disks whose policy states and verdict need no comparing (their read model matches)."""
    now = cycle.now
    new_disks: set[str] = set()
    drift: list[dict[str, Any]] = []
    for part in chunks(cycle.disks, batch(conn)):
        existing = queries.disk_facts(conn, [d.snapshot.disk_id for d in part])
        inserts: list[dict[str, Any]] = []
        changed: list[dict[str, Any]] = []
        read_ok: list[str] = []
        unknown: list[str] = []
        for d in part:
            snap = d.snapshot
            disk = snap.disk
            definite = snap.outcome is not ReadOutcome.UNKNOWN
            row = existing.get(disk.id)
            if row is None or not row.was_read:
                # No earlier definite reading: this run's policies are the disk's baseline, not drift.
                new_disks.add(disk.id)
            tier, tier_detail = _tier_of(snap)
            # Only a definite reading writes policy states; a disk without a verdict in the run keeps its interval.
            digest = _policies_digest(snap) if definite else None
            verdict = cycle.disk_statuses.get(disk.id)
            if row is None:
                inserts.append({"id": disk.id, "name": disk.name, "vm_id": disk.vm_id, "vm_fqdn": disk.vm_fqdn,
                                "source": d.source, "is_target": True, "outcome": snap.outcome.value,
                                "error_code": snap.error_code, "error_message": snap.error_message,
                                "first_seen_at": now, "last_checked_at": now,
                                "last_read_at": now if definite else None, "last_run_id": cycle.run_id,
                                "tier": tier, "tier_detail": tier_detail, "policies_digest": digest,
                                "verdict": verdict,
                                **dict(zip(_ATTACHMENT_FACTS, _attachment_of(snap, now=now), strict=True))})
                continue
            if definite and digest is not None and digest == row.policies_digest:
                unchanged.policies.add(disk.id)
            elif not definite:
                digest = row.policies_digest  # its policy states are not written: what they were written from stays
            if verdict is None:
                verdict = row.verdict
            elif verdict == row.verdict:
                unchanged.verdicts.add(disk.id)
            if snap.outcome is not ReadOutcome.OK:
                tier, tier_detail = row.tier, row.tier_detail  # no tier was decided: keep what we knew
            elif row.tier != tier and row.was_read:
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
            attachment = _attachment_of(snap, now=now)
            if attachment[0] is None and (snap.outcome is not ReadOutcome.OK or row.attachment_vm_id == vm_id):
                # Not read in this run: what was read stays while the disk is on the VM it was read for.
                attachment = (row.attachment_state, row.attach_on_boot, row.attachment_vm_id,
                              row.attachment_verified_at)
            new = (name, vm_id, vm_fqdn, d.source, True, snap.outcome.value, snap.error_code, snap.error_message,
                   tier, tier_detail, digest, verdict, *attachment)
            if new != row[1:_FACTS_END]:  # the row is (id, *DISK_FACTS, was_read)
                changed.append({"id": disk.id, **dict(zip(DISK_FACTS, new, strict=True))})
        insert_rows(conn, disks, inserts)
        # Changed facts by id, every fact column (one statement shape); the per-poll timestamps of every disk read
        # go in bulk, as one value for all.
        update_rows(conn, disks, changed, key="id")
        if read_ok:
            conn.execute(update(disks).where(among(conn, disks.c.id, read_ok)).values(
                last_checked_at=now, last_read_at=now, last_run_id=cycle.run_id))
        if unknown:
            conn.execute(update(disks).where(among(conn, disks.c.id, unknown)).values(last_checked_at=now,
                                                                                     last_run_id=cycle.run_id))
    insert_rows(conn, drift_events, drift)
    for chunk in chunks(sorted(cycle.retired_disks), batch(conn)):
        # Its verdict interval is closed (`_write_history`): the disk has no current verdict.
        conn.execute(update(disks).where(among(conn, disks.c.id, chunk)).values(is_target=False, verdict=None))
    return new_disks


def _settings_of(row: Any) -> dict[str, Any]:
    """Returns the settings of a current policy state row (`queries.current_policy_rows`), for drift events."""
    return policy_settings(row.retention, row.interval, row.target_type, row.target_id)


def _write_states(conn: Connection, cycle: CycleWrite, *, new_disks: set[str], unchanged: set[str]) -> None:
    """Writes policy states by change and drift events, a chunk of disks at a time (not for the `unchanged`)."""
    now = cycle.now
    settled = [d.snapshot for d in cycle.disks
               if d.snapshot.outcome is not ReadOutcome.UNKNOWN and d.snapshot.disk_id not in unchanged]
    for part in chunks(settled, batch(conn)):
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
                row = states.pop(policy.id, None)
                if row is not None and row.settings_hash == h:
                    nxt, size = policy.schedule.next_invocation_at, policy.total_size
                    if row.next_invocation_at != nxt or row.total_size != size or (
                            policy.target_name and row.target_name != policy.target_name):
                        moving.append({"id": row.id, "next_invocation_at": nxt, "total_size": size,
                                       "target_name": policy.target_name or row.target_name})
                    continue
                if row is not None:
                    closed.append(row.id)
                    before: dict[str, Any] | None = _settings_of(row)
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
                    after = policy_settings(policy.retention, policy.schedule.interval.value,
                                            policy.target_type.value, policy.target_id)
                    drift.append({"disk_id": snap.disk_id, "policy_id": policy.id, "run_id": cycle.run_id,
                                  "at": now, "kind": kind, "before": before, "after": after})
            for policy_id, old_row in states.items():
                closed.append(old_row.id)
                drift.append({"disk_id": snap.disk_id, "policy_id": policy_id, "run_id": cycle.run_id, "at": now,
                              "kind": "policy-removed", "before": _settings_of(old_row),
                              "after": None})
        _close(conn, policy_states, closed, at=now)
        insert_rows(conn, policy_states, inserts)
        update_rows(conn, policy_states, moving, key="id")
        insert_rows(conn, drift_events, drift)


def _epoch(t: datetime) -> int:
    return int(t.timestamp())


def _write_observations(conn: Connection, cycle: CycleWrite) -> None:
    """Writes the observed invocations and the policy schedules that changed, and deletes those that are gone."""
    seen = [{"disk_id": i.disk_id, "policy_id": i.policy_id, "due_at": _epoch(i.due_at),
             "next_at": _epoch(i.next_at), "observed_at": _epoch(i.observed_at), "gap_seconds": i.gap_seconds,
             "run_id": cycle.run_id}
            for i in cycle.invocations]
    for part in chunks(seen, batch(conn)):
        insert_rows(conn, invocations, part)
    rows = [{"disk_id": s.disk_id, "policy_id": s.policy_id, "first_seen_at": s.first_seen_at,
             "next_invocation_at": s.next_invocation_at,
             "recent": {"runs": [[_epoch(i.due_at), _epoch(i.next_at), _epoch(i.observed_at)] for i in s.recent]}}
            for s in cycle.schedules]
    for part in chunks(rows, batch(conn)):
        upsert_rows(conn, policy_schedules, part, keys=("disk_id", "policy_id"))
    p = policy_schedules.c
    by_disk: dict[str, list[str]] = {}
    for disk_id, policy_id in cycle.schedules_gone:
        by_disk.setdefault(disk_id, []).append(policy_id)
    for disk_id, policy_ids in by_disk.items():
        conn.execute(delete(policy_schedules).where(p.disk_id == disk_id, p.policy_id.in_(policy_ids)))
    for chunk in chunks(sorted(cycle.retired_disks), batch(conn)):
        # A disk no longer audited is no longer observed: if it comes back, its observation starts afresh.
        conn.execute(delete(policy_schedules).where(among(conn, p.disk_id, chunk)))


def _finding_values(f: TrackedFinding) -> dict[str, Any]:
    return {"fingerprint": f.fingerprint, "rule": f.rule, "disk_id": f.disk_id, "policy_id": f.policy_id,
            "severity": f.severity.value, "status": f.status.value, "message": f.message, "observed": f.observed,
            "expected": f.expected, "first_seen": f.first_seen, "last_seen": f.last_seen, "opened_at": f.opened_at,
            "resolved_at": f.resolved_at, "waiver": f.waiver, "tier": f.tier}


def _write_findings(conn: Connection, cycle: CycleWrite) -> None:
    """Writes the findings that changed (every column, by fingerprint), the `last_seen` of those seen again as they
    were, and the lifecycle events."""
    inserts: list[dict[str, Any]] = []
    updates: list[dict[str, Any]] = []
    seen_again: list[str] = []
    events: list[dict[str, Any]] = []
    for change in cycle.changes:
        f = change.finding
        if change.previous is None:
            inserts.append(_finding_values(f))
        elif f == replace(change.previous, last_seen=cycle.now):
            seen_again.append(f.fingerprint)  # a persisting finding as stored, but for when it was last seen
        else:
            updates.append(_finding_values(f))
        if change.kind is not Transition.PERSISTING:
            events.append({"fingerprint": f.fingerprint, "disk_id": f.disk_id, "run_id": cycle.run_id,
                           "at": cycle.now, "kind": change.kind.value})
    for part in chunks(inserts, batch(conn)):
        insert_rows(conn, findings, part)
    for part in chunks(updates, batch(conn)):
        update_rows(conn, findings, part, key="fingerprint")
    for part in chunks(seen_again, batch(conn)):
        conn.execute(update(findings).where(among(conn, findings.c.fingerprint, part)).values(last_seen=cycle.now))
    for part in chunks(events, batch(conn)):
        insert_rows(conn, finding_events, part)


def _write_history(conn: Connection, cycle: CycleWrite, *, unchanged: set[str]) -> None:
    """Writes the run's summary row and each disk's verdict by change (a chunk of disks at a time; the verdicts of
    the `unchanged` are the stored ones)."""
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
    for chunk in chunks(sorted(d for d in cycle.disk_statuses if d not in unchanged), batch(conn)):
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
        insert_rows(conn, disk_states, inserts)
    for chunk in chunks(sorted(cycle.retired_disks), batch(conn)):
        # A disk no longer audited has no verdict from now on (not "compliant until further notice").
        conn.execute(update(disk_states).where(disk_states.c.valid_to.is_(None),
                                               among(conn, disk_states.c.disk_id, chunk)).values(valid_to=now))


# ---- remediation -----------------------------------------------------------------------------------------------


def record_intent(conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
    """Inserts one attempt's rows (one per disk it concerns) at status `intent`, before the write is sent."""
    conn.execute(insert(remediations), [dict(row) for row in rows])


def record_outcome(conn: Connection, attempt_id: str, *, values: dict[str, Any]) -> None:
    """Writes the outcome of an attempt over its intent rows (status, answer, error, finished_at)."""
    conn.execute(update(remediations).where(remediations.c.attempt_id == attempt_id).values(**values))


def close_intents(conn: Connection, attempt_ids: Sequence[str], *, reason: str, now: datetime) -> None:
    """Marks attempts left at `intent` by a process that stopped as `interrupted`, saying what a re-read found."""
    if attempt_ids:
        conn.execute(update(remediations)
                     .where(remediations.c.attempt_id.in_(list(attempt_ids)), remediations.c.status == "intent")
                     .values(status="interrupted", reason=reason, finished_at=now))
