"""Every read of the store, defined once: plain functions of a SQLAlchemy Core `Connection` that return domain objects.

The one-shot commands run them on a synchronous connection (`repo.Reader`); the daemon, the API and the dashboard
run the same functions on the async engine through `AsyncConnection.run_sync` (`repo.Store.read`); the writers
(`writes`, `leases`, `outbox`) call them inside their own transactions. No other module of the auditor builds a
SELECT (tests/test_store_queries.py checks it).

Runs left `running` by a process that is gone are shown as failed ("abandoned") when they are read: a reader never
writes to say so (`run_view`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, case, exists, func, inspect, null, or_, select, text
from sqlalchemy.engine import Connection, Row
from sqlalchemy.sql.elements import ColumnElement

from auditor.domain.alerts import (
    AlertState,
    AlertStatus,
    Delivery,
    DeliveryState,
    DiskContext,
    notification_from_dict,
)
from auditor.domain.invocations import (
    RECENT,
    RPO_WINDOW,
    DiskObservation,
    Invocation,
    PolicySchedule,
    RpoFacts,
    disk_observation,
    period_observation,
)
from auditor.domain.listings import (
    FindingListing,
    FindingQuery,
    FindingSearch,
    RunPoint,
    SortKey,
    decode_cursor,
    encode_cursor,
)
from auditor.domain.models import Attachment, FindingStatus, ReadOutcome, Severity, TrackedFinding
from auditor.domain.periods import LifecycleEvent, Verdict
from auditor.domain.records import (
    DiskRecord,
    DiskStatus,
    DriftRecord,
    FindingEventRecord,
    PolicyStateRecord,
    RemediationRecord,
    RunConfig,
    RunError,
    RunRecord,
    RunStats,
    RunStatus,
)
from auditor.store.clauses import among, batch
from auditor.store.holders import CYCLE, Lease, Term
from auditor.store.tables import (
    alert_states,
    disk_states,
    disks,
    drift_events,
    finding_events,
    findings,
    invocations,
    leases,
    outbox,
    policy_schedules,
    policy_states,
    remediations,
    revoked_sessions,
    run_configs,
    run_summaries,
    runs,
)

CHUNK = 500  # ids per IN (...): under SQLite's bound-parameter limit, and PostgreSQL statements stay small
ABANDONED = "abandoned"  # the error code of a run whose process stopped before it finished
ABANDONED_REASON = "its process stopped before it finished"
REPORTED_STATUSES = (FindingStatus.OPEN.value, FindingStatus.WAIVED.value)
# A disk's history: the disk, its policy states, drift events, findings and finding events, oldest first.
DiskHistory = tuple[DiskRecord | None, list[PolicyStateRecord], list[DriftRecord], list[TrackedFinding],
                    list[FindingEventRecord]]


def chunks(items: Sequence[Any], size: int = CHUNK) -> Iterable[Sequence[Any]]:
    """Yields `items` in slices of at most `size`."""
    for i in range(0, len(items), size):
        yield items[i : i + size]


# ---- rows to domain objects ------------------------------------------------------------------------------------


def run_record(row: Any) -> RunRecord:
    """Returns a run row as a RunRecord."""
    return RunRecord(
        id=row.id,
        trigger=row.trigger,
        status=RunStatus(row.status),
        started_at=row.started_at,
        finished_at=row.finished_at,
        targets_checked=row.targets_checked,
        disks_ok=row.disks_ok,
        disks_unknown=row.disks_unknown,
        stats=RunStats(row.api_requests, row.api_retries, row.api_rate_limited, dict(row.api_by_status or {})),
        findings_opened=row.findings_opened,
        findings_resolved=row.findings_resolved,
        errors=tuple(RunError(str(e.get("target", "")), str(e.get("code", "")), str(e.get("message", "")))
                     for e in (row.errors or [])),
        config_fingerprint=row.config_fingerprint,
    )


def disk_record(row: Any) -> DiskRecord:
    """Returns a disk row as a DiskRecord."""
    return DiskRecord(
        id=row.id, name=row.name, vm_id=row.vm_id, vm_fqdn=row.vm_fqdn, source=row.source, is_target=row.is_target,
        outcome=row.outcome, error_code=row.error_code, error_message=row.error_message,
        first_seen_at=row.first_seen_at, last_checked_at=row.last_checked_at, last_read_at=row.last_read_at,
        tier=row.tier, tier_detail=row.tier_detail, attachment=_attachment(row),
    )


def _attachment(row: Any) -> Attachment | None:
    """Returns the stored attachment of a disk row when it was read for the VM the disk is assigned to now."""
    if row.attachment_state is None or row.vm_id is None or row.attachment_vm_id != row.vm_id:
        return None
    return Attachment(row.attachment_state, row.attach_on_boot, row.attachment_verified_at)


def finding_record(row: Any) -> TrackedFinding:
    """Returns a finding row as a TrackedFinding."""
    return TrackedFinding(
        fingerprint=row.fingerprint, rule=row.rule, disk_id=row.disk_id, policy_id=row.policy_id,
        severity=Severity(row.severity), status=FindingStatus(row.status), message=row.message,
        observed=dict(row.observed or {}), expected=dict(row.expected or {}), first_seen=row.first_seen,
        last_seen=row.last_seen, opened_at=row.opened_at, resolved_at=row.resolved_at, waiver=row.waiver,
        tier=row.tier,
    )


def drift_record(row: Any) -> DriftRecord:
    """Returns a drift event row as a DriftRecord."""
    return DriftRecord(row.disk_id, row.policy_id, row.run_id, row.at, row.kind, row.before, row.after)


def state_record(row: Any) -> PolicyStateRecord:
    """Returns a policy state row as a PolicyStateRecord."""
    return PolicyStateRecord(
        disk_id=row.disk_id, policy_id=row.policy_id, retention=row.retention, interval=row.interval,
        target_type=row.target_type, target_id=row.target_id, target_name=row.target_name,
        next_invocation_at=row.next_invocation_at, total_size=row.total_size, valid_from=row.valid_from,
        valid_to=row.valid_to, settings_hash=row.settings_hash,
    )


def lease_record(row: Any) -> Lease:
    """Returns a lease row as a Lease."""
    return Lease(row.name, row.holder, row.host, row.pid, row.process_started_at, row.acquired_at, row.expires_at,
                 row.run_id, row.epoch)


def delivery_record(row: Any) -> Delivery:
    """Returns an outbox row as a Delivery."""
    return Delivery(
        id=row.id, notifier=row.notifier, kind=row.kind, state=DeliveryState(row.state), attempts=row.attempts,
        created_at=row.created_at, next_attempt_at=row.next_attempt_at, delivered_at=row.delivered_at,
        last_status=row.last_status, last_error=row.last_error, notification=notification_from_dict(row.payload),
    )


def abandoned_errors(now: datetime, reason: str = ABANDONED_REASON) -> list[dict[str, str]]:
    """Returns the `errors` of a run whose process stopped before it finished."""
    return [{"target": "*", "code": ABANDONED, "message": f"{reason} (noticed {now.isoformat(timespec='seconds')})"}]


# ---- schema ----------------------------------------------------------------------------------------------------


def schema_revision(conn: Connection) -> str | None:
    """Returns the database's Alembic revision (None before the first migration): Alembic's own table, read with
    SQL, so a read-only command does not load Alembic."""
    if not inspect(conn).has_table("alembic_version"):
        return None
    row = conn.execute(text("SELECT version_num FROM alembic_version")).first()
    return str(row[0]) if row else None


# ---- dashboard sessions -----------------------------------------------------------------------------------------


def revoked_session_ids(conn: Connection, sids: Sequence[str], *, now: datetime) -> set[str]:
    """Returns which of the session ids were revoked (logged out) and would not have expired yet at `now`."""
    if not sids:
        return set()
    c = revoked_sessions.c
    return set(conn.execute(select(c.sid).where(c.sid.in_(list(sids)), c.expires_at > now)).scalars())


# ---- leases and runs -------------------------------------------------------------------------------------------


def lease(conn: Connection, name: str) -> Lease | None:
    """Returns the named lease, live or not."""
    row = conn.execute(select(leases).where(leases.c.name == name)).first()
    return lease_record(row) if row else None


def term_holds(term: Term, *, now: datetime) -> ColumnElement[bool]:
    """The condition that `term` still holds at `now` (its lease names its holder and epoch and has not expired),
    for a statement that must be refused, in the same statement, once the term is over."""
    c = leases.c
    return exists().where(c.name == term.name, c.holder == term.holder, c.epoch == term.epoch, c.expires_at > now)


def live_cycle_run(conn: Connection, *, now: datetime) -> str | None:
    """Returns the run the cycle lease is live for (its owner still holds it), if any."""
    held = lease(conn, CYCLE)
    return held.run_id if held is not None and held.is_live(now) else None


def _now(now: datetime | None) -> datetime:
    # Whether a running run's owner still holds the cycle lease is decided at the moment of reading.
    return now if now is not None else datetime.now(UTC)


def orphaned_runs(conn: Connection, *, now: datetime) -> list[str]:
    """Returns the runs left `running` whose owner is gone: every running run but the live cycle lease's."""
    running = list(conn.execute(select(runs.c.id).where(runs.c.status == RunStatus.RUNNING.value)
                                 .order_by(runs.c.seq)).scalars())
    if not running:
        return []
    live = live_cycle_run(conn, now=now)
    return [run_id for run_id in running if run_id != live]


def run_view(row: Row[Any], *, live: str | None, now: datetime) -> RunRecord:
    """Returns a run as a reader should see it: a run left `running` by a process that is gone is failed."""
    record = run_record(row)
    if record.status is not RunStatus.RUNNING or record.id == live:
        return record
    errors = tuple(RunError(e["target"], e["code"], e["message"]) for e in abandoned_errors(now))
    # finished_at stays empty: the run never finished, so readiness does not count it as a cycle.
    return replace(record, status=RunStatus.FAILED, errors=errors)


def latest_run(conn: Connection, *, now: datetime | None = None, finished: bool = True) -> RunRecord | None:
    """Returns the most recent run (with `finished`, the most recent one no longer running: an abandoned run
    counts as finished, failed)."""
    now = _now(now)
    q = select(runs).order_by(runs.c.seq.desc()).limit(1)
    live = live_cycle_run(conn, now=now)
    if finished:
        q = q.where(or_(runs.c.status != RunStatus.RUNNING.value, runs.c.id != live) if live is not None
                    else runs.c.status.is_not(None))
    row = conn.execute(q).first()
    return run_view(row, live=live, now=now) if row else None


def last_successful_run(conn: Connection) -> RunRecord | None:
    """Returns the latest run that was complete or partial."""
    row = conn.execute(select(runs).where(runs.c.status.in_([RunStatus.COMPLETE.value, RunStatus.PARTIAL.value]))
                       .order_by(runs.c.seq.desc()).limit(1)).first()
    return run_record(row) if row else None


def list_runs(conn: Connection, *, now: datetime | None = None, limit: int = 20) -> list[RunRecord]:
    """Returns recent runs, newest first."""
    now = _now(now)
    live = live_cycle_run(conn, now=now)
    return [run_view(r, live=live, now=now) for r in conn.execute(select(runs).order_by(runs.c.seq.desc())
                                                                  .limit(limit))]


def runs_between(conn: Connection, *, start: datetime, end: datetime,
                 now: datetime | None = None) -> list[RunRecord]:
    """Returns the runs polled in [start, end), oldest first (ties by run number)."""
    now = _now(now)
    live = live_cycle_run(conn, now=now)
    q = select(runs).where(runs.c.started_at >= start, runs.c.started_at < end).order_by(runs.c.started_at,
                                                                                          runs.c.seq)
    return [run_view(r, live=live, now=now) for r in conn.execute(q)]


def next_run_seq(conn: Connection) -> int:
    """Returns the number the next run takes (runs are numbered by max(seq) + 1)."""
    return int(conn.execute(select(func.coalesce(func.max(runs.c.seq), 0))).scalar_one()) + 1


def run_started_at(conn: Connection, run_id: str) -> datetime | None:
    """Returns when a run started (None when there is no such run)."""
    value: datetime | None = conn.execute(select(runs.c.started_at).where(runs.c.id == run_id)).scalar_one_or_none()
    return value


def runs_to_keep(conn: Connection) -> list[str]:
    """Returns the runs pruning never deletes: the latest run and the latest complete or partial one."""
    latest = conn.execute(select(runs.c.id).order_by(runs.c.seq.desc()).limit(1)).scalar_one_or_none()
    good = last_successful_run(conn)
    return sorted({r for r in (latest, good.id if good else None) if r is not None})


# ---- disks and policies ----------------------------------------------------------------------------------------


def load_disks(conn: Connection, *, targets_only: bool = False) -> dict[str, DiskRecord]:
    """Returns stored disks by id (only those audited as targets with `targets_only`)."""
    q = select(disks)
    if targets_only:
        q = q.where(disks.c.is_target.is_(True))
    return {r.id: disk_record(r) for r in conn.execute(q)}


def disk_known(conn: Connection, disk_id: str) -> bool:
    """Returns whether the auditor has stored the disk (the disks `auditor history` and GET /api/v1/disks/{id}
    know)."""
    return conn.execute(select(disks.c.id).where(disks.c.id == disk_id).limit(1)).first() is not None


# The facts of a disk the cycle rewrites when they change (`writes`), its read model among them; the per-poll
# timestamps are written apart.
DISK_FACTS = ("name", "vm_id", "vm_fqdn", "source", "is_target", "outcome", "error_code", "error_message", "tier",
              "tier_detail", "policies_digest", "verdict", "attachment_state", "attach_on_boot", "attachment_vm_id",
              "attachment_verified_at")


def disk_facts(conn: Connection, ids: Sequence[str]) -> dict[str, Row[Any]]:
    """Returns the stored disks among `ids` by id, as what the cycle's write compares a disk with: `id`, the
    `DISK_FACTS` in that order, and `was_read` (whether it ever had a definite reading)."""
    # A disk in the default tier has no tier detail (the cycle writes both or neither): read as NULL, its JSON null is
    # not decoded once per disk.
    detail = case((disks.c.tier.is_(None), null()), else_=disks.c.tier_detail).label("tier_detail")
    columns = [disks.c.id, *(detail if name == "tier_detail" else disks.c[name] for name in DISK_FACTS),
               disks.c.last_read_at.is_not(None).label("was_read")]
    out: dict[str, Row[Any]] = {}
    for chunk in chunks(ids, batch(conn)):
        out.update({r.id: r for r in conn.execute(select(*columns).where(among(conn, disks.c.id, chunk))).all()})
    return out


def alert_disks(conn: Connection, ids: Iterable[str]) -> dict[str, DiskContext]:
    """Returns what alerts say about the stored disks among `ids`: name and organization (the `org:<ref>` the
    disk was listed through; None for disks named in audit.disks, whose organization a disk lookup does not give)."""
    out: dict[str, DiskContext] = {}
    for chunk in chunks(sorted(set(ids)), batch(conn)):
        q = select(disks.c.id, disks.c.name, disks.c.source).where(among(conn, disks.c.id, chunk))
        out.update({r.id: DiskContext(r.name or None, r.source.removeprefix("org:") if r.source.startswith("org:")
                                      else None) for r in conn.execute(q)})
    return out


def target_sources(conn: Connection) -> dict[str, str]:
    """Returns the source (`config` or `org:<ref>`) of every disk audited as a target, by id (ids only)."""
    q = select(disks.c.id, disks.c.source).where(disks.c.is_target.is_(True))
    return {disk_id: source for disk_id, source in conn.execute(q).all()}


def verified_attachments(conn: Connection) -> dict[str, tuple[str, Attachment]]:
    """Returns, by disk id, the VM each audited disk's attachment was last read for and that attachment."""
    d = disks.c
    q = select(d.id, d.attachment_vm_id, d.attachment_state, d.attach_on_boot, d.attachment_verified_at).where(
        d.is_target.is_(True), d.attachment_state.is_not(None), d.attachment_vm_id.is_not(None))
    return {r.id: (r.attachment_vm_id, Attachment(r.attachment_state, r.attach_on_boot, r.attachment_verified_at))
            for r in conn.execute(q).all()}


def current_policy_ids(conn: Connection) -> dict[str, list[str]]:
    """Returns the current policy ids of every disk."""
    p = policy_states.c
    q = select(p.disk_id, p.policy_id).where(p.valid_to.is_(None)).order_by(p.disk_id, p.policy_id)
    out: dict[str, list[str]] = {}
    for disk_id, policy_id in conn.execute(q).all():
        out.setdefault(disk_id, []).append(policy_id)
    return out


# What the cycle's write compares a current policy state with (and records as `before` when it changes).
_CURRENT_STATE = tuple(policy_states.c[name] for name in (
    "id", "disk_id", "policy_id", "settings_hash", "retention", "interval", "target_type", "target_id", "target_name",
    "next_invocation_at", "total_size"))


def current_policy_rows(conn: Connection, disk_ids: Sequence[str]) -> dict[str, dict[str, Row[Any]]]:
    """Returns the current policy states of the disks among `disk_ids` (id, disk_id, policy_id, settings_hash, the
    settings, target_name, next_invocation_at, total_size), by disk and policy id."""
    out: dict[str, dict[str, Row[Any]]] = {}
    for chunk in chunks(disk_ids, batch(conn)):
        q = select(*_CURRENT_STATE).where(policy_states.c.valid_to.is_(None),
                                          among(conn, policy_states.c.disk_id, chunk))
        for row in conn.execute(q).all():
            out.setdefault(row.disk_id, {})[row.policy_id] = row
    return out


def epoch(seconds: int) -> datetime:
    """Returns epoch seconds as stored in `invocations` as an aware UTC datetime."""
    return datetime.fromtimestamp(seconds, tz=UTC)


def _recent(disk_id: str, policy_id: str, raw: Any) -> tuple[Invocation, ...]:
    return tuple(Invocation(disk_id, policy_id, epoch(due), epoch(nxt), epoch(seen))
                 for due, nxt, seen in (raw or {}).get("runs", [])[-RECENT:])


def policy_schedules_of(conn: Connection, disk_ids: Sequence[str]) -> dict[str, dict[str, PolicySchedule]]:
    """Returns what has been observed of the policies' runs on the disks among `disk_ids`, by disk and policy id."""
    s = policy_schedules.c
    out: dict[str, dict[str, PolicySchedule]] = {}
    for chunk in chunks(disk_ids, batch(conn)):
        q = select(s.disk_id, s.policy_id, s.first_seen_at, s.next_invocation_at, s.recent).where(
            among(conn, s.disk_id, chunk))
        for disk_id, policy_id, first_seen, nxt, recent in conn.execute(q).all():
            out.setdefault(disk_id, {})[policy_id] = PolicySchedule(disk_id, policy_id, first_seen, nxt,
                                                                    _recent(disk_id, policy_id, recent))
    return out


def observation_starts(conn: Connection, *, disk_id: str | None = None) -> dict[str, tuple[datetime, datetime | None]]:
    """Returns, per disk with observed policies (or for `disk_id` only), since when its policies' runs are observed
    (the earliest first sighting of a current policy) and the latest observed run's due time (None: none yet)."""
    s = policy_schedules.c
    out: dict[str, tuple[datetime, datetime | None]] = {}
    q = select(s.disk_id, s.policy_id, s.first_seen_at, s.recent)
    if disk_id is not None:
        q = q.where(s.disk_id == disk_id)
    for disk_id, policy_id, first_seen, recent in conn.execute(q).all():
        last = max((i.due_at for i in _recent(disk_id, policy_id, recent)), default=None)
        since, latest = out.get(disk_id, (first_seen, None))
        out[disk_id] = (min(since, first_seen), max((t for t in (latest, last) if t is not None), default=None))
    return out


def rpo_facts(conn: Connection, *, start: datetime, end: datetime,
              disk_id: str | None = None) -> dict[str, RpoFacts]:
    """Returns, per disk, the observed invocations due in [start, end): how many, the first and the last one's due
    time and the longest gap ending in the window (one aggregate query: each run's gap was stored with it)."""
    i = invocations.c
    lo, hi = int(start.timestamp()), int(end.timestamp())
    where = [i.due_at >= lo, i.due_at < hi] + ([i.disk_id == disk_id] if disk_id is not None else [])
    q = select(i.disk_id, func.count(), func.max(i.due_at), func.max(i.gap_seconds), func.min(i.due_at)).where(
        *where).group_by(i.disk_id)
    return {d: RpoFacts(int(n), epoch(int(last)), None if longest is None else timedelta(seconds=int(longest)),
                        epoch(int(first)))
            for d, n, last, longest, first in conn.execute(q).all()}


def observations(conn: Connection, *, start: datetime, end: datetime,
                 disk_id: str | None = None) -> dict[str, DiskObservation]:
    """Returns what was observed of every disk's policies' runs (or of `disk_id`'s) over [start, end): since when,
    the latest run, and the observed RPO of the runs due in the window and from the last one to `end`."""
    starts = observation_starts(conn, disk_id=disk_id)
    facts = rpo_facts(conn, start=start, end=end, disk_id=disk_id)
    out: dict[str, DiskObservation] = {}
    for d in {*starts, *facts}:
        since, latest = starts.get(d, (None, None))
        out[d] = disk_observation(since, latest, facts.get(d), end=end)
    return out


def period_observations(conn: Connection, *, start: datetime, end: datetime) -> dict[str, DiskObservation]:
    """Returns what was observed of every disk's policies' runs due in [start, end), from those runs alone (see
    `invocations.period_observation`): a disk without one is not in it."""
    return {d: period_observation(f, end=end) for d, f in rpo_facts(conn, start=start, end=end).items()}


DiskDetail = tuple[DiskHistory, DiskObservation | None, list[Invocation]]


def disk_detail(conn: Connection, disk_id: str, *, now: datetime) -> DiskDetail:
    """Returns a disk's history, what was observed of its runs over the report's window to `now`, and its latest
    observed runs (newest first)."""
    seen = observations(conn, start=now - RPO_WINDOW, end=now, disk_id=disk_id).get(disk_id)
    return disk_history(conn, disk_id), seen, disk_invocations(conn, disk_id)


def disk_invocations(conn: Connection, disk_id: str, *, limit: int = 50) -> list[Invocation]:
    """Returns the disk's latest observed invocations, newest first."""
    i = invocations.c
    q = (select(i.policy_id, i.due_at, i.next_at, i.observed_at).where(i.disk_id == disk_id)
         .order_by(i.due_at.desc(), i.id.desc()).limit(limit))
    return [Invocation(disk_id, policy_id, epoch(due), epoch(nxt), epoch(seen))
            for policy_id, due, nxt, seen in conn.execute(q).all()]


def current_verdict_rows(conn: Connection, disk_ids: Sequence[str]) -> dict[str, Row[Any]]:
    """Returns the id, disk_id and status of the current verdict interval (`disk_states`) of the disks among
    `disk_ids`, by disk."""
    d = disk_states.c
    out: dict[str, Row[Any]] = {}
    for chunk in chunks(disk_ids, batch(conn)):
        q = select(d.id, d.disk_id, d.status).where(d.valid_to.is_(None), among(conn, d.disk_id, chunk))
        out.update({r.disk_id: r for r in conn.execute(q).all()})
    return out


def recent_drift(conn: Connection, *, since: datetime, limit: int = 200) -> list[DriftRecord]:
    """Returns drift events since `since`, newest first."""
    d = drift_events.c
    q = select(drift_events).where(d.at >= since).order_by(d.at.desc(), d.id.desc()).limit(limit)
    return [drift_record(r) for r in conn.execute(q)]


def disk_history(conn: Connection, disk_id: str) -> DiskHistory:
    """Returns a disk with all its policy states, drift events, findings and finding events, oldest first."""

    def rows_of(t: Any, *order: Any) -> list[Any]:
        return list(conn.execute(select(t).where(t.c.disk_id == disk_id).order_by(*order)))

    disk = conn.execute(select(disks).where(disks.c.id == disk_id)).first()
    return (
        disk_record(disk) if disk else None,
        [state_record(r) for r in rows_of(policy_states, policy_states.c.valid_from, policy_states.c.id)],
        [drift_record(r) for r in rows_of(drift_events, drift_events.c.at, drift_events.c.id)],
        [finding_record(r) for r in rows_of(findings, findings.c.first_seen, findings.c.fingerprint)],
        [FindingEventRecord(r.fingerprint, r.disk_id, r.run_id, r.at, r.kind)
         for r in rows_of(finding_events, finding_events.c.at, finding_events.c.id)],
    )


# ---- findings --------------------------------------------------------------------------------------------------


def all_findings(conn: Connection, *, statuses: Sequence[str] = REPORTED_STATUSES) -> list[TrackedFinding]:
    """Returns every finding with one of the statuses, ordered by disk and fingerprint."""
    q = (select(findings).where(findings.c.status.in_(list(statuses)))
         .order_by(findings.c.disk_id, findings.c.fingerprint))
    return [finding_record(r) for r in conn.execute(q)]


def active_findings(conn: Connection, *, extra: Iterable[str] = ()) -> dict[str, TrackedFinding]:
    """Returns open and waived findings, plus the stored state of the `extra` fingerprints (to reopen)."""
    out = {f.fingerprint: f for f in all_findings(conn, statuses=REPORTED_STATUSES)}
    missing = [fp for fp in sorted(set(extra)) if fp not in out]
    for chunk in chunks(missing, batch(conn)):
        out.update({r.fingerprint: finding_record(r)
                    for r in conn.execute(select(findings).where(among(conn, findings.c.fingerprint, chunk)))})
    return out


def list_findings(conn: Connection, query: FindingQuery) -> tuple[list[TrackedFinding], str | None]:
    """Returns one page of findings ordered by (disk_id, fingerprint) and the cursor of the next page."""
    f = findings.c
    q = select(findings).where(f.status.in_(query.statuses))
    if query.rule:
        q = q.where(f.rule == query.rule)
    if query.severity:
        q = q.where(f.severity == query.severity)
    if query.disk_id:
        q = q.where(f.disk_id == query.disk_id)
    if query.tier:
        q = q.where(f.disk_id.in_(select(disks.c.id).where(disks.c.tier == query.tier)))
    if query.cursor:
        disk_id, fp = decode_cursor(query.cursor)
        q = q.where(or_(f.disk_id > disk_id, and_(f.disk_id == disk_id, f.fingerprint > fp)))
    rows = list(conn.execute(q.order_by(f.disk_id, f.fingerprint).limit(query.limit + 1)))
    more = len(rows) > query.limit
    rows = rows[: query.limit]
    nxt = encode_cursor((rows[-1].disk_id, rows[-1].fingerprint)) if more and rows else None
    return [finding_record(r) for r in rows], nxt


def finding_counts(conn: Connection) -> list[tuple[str, str, str, int]]:
    """Returns (status, rule, severity, count) for every finding group (metrics)."""
    f = findings.c
    q = select(f.status, f.rule, f.severity, func.count()).group_by(f.status, f.rule, f.severity)
    return [(a, b, c, int(n)) for a, b, c, n in conn.execute(q).all()]


def finding_status_counts(conn: Connection) -> dict[str, int]:
    """Returns how many findings are in each status (open, waived, resolved)."""
    q = select(findings.c.status, func.count()).group_by(findings.c.status)
    return {str(status): int(n) for status, n in conn.execute(q).all()}


def disk_status_counts(conn: Connection) -> dict[str, int]:
    """Returns the number of target disks per report status (compliant / noncompliant / unknown)."""
    has_open = select(findings.c.disk_id).where(findings.c.status == FindingStatus.OPEN.value).distinct().subquery()
    status = case(
        (disks.c.outcome == ReadOutcome.UNKNOWN.value, DiskStatus.UNKNOWN.value),
        (disks.c.id.in_(select(has_open.c.disk_id)), DiskStatus.NONCOMPLIANT.value),
        else_=DiskStatus.COMPLIANT.value,
    )
    q = select(status, func.count()).where(disks.c.is_target.is_(True)).group_by(status)
    out: dict[str, int] = dict.fromkeys((DiskStatus.COMPLIANT, DiskStatus.NONCOMPLIANT, DiskStatus.UNKNOWN), 0)
    out.update({str(k): int(v) for k, v in conn.execute(q).all()})
    return out


# The columns a findings list shows: `observed` and `expected` (JSON the list does not show) are not read.
_LISTED = (findings.c.fingerprint, findings.c.rule, findings.c.disk_id, findings.c.policy_id, findings.c.severity,
           findings.c.status, findings.c.message, findings.c.first_seen, findings.c.last_seen, findings.c.opened_at,
           findings.c.resolved_at, findings.c.waiver, disks.c.name, disks.c.source, disks.c.tier)


def _listing(row: Any) -> FindingListing:
    finding = TrackedFinding(
        fingerprint=row.fingerprint, rule=row.rule, disk_id=row.disk_id, policy_id=row.policy_id,
        severity=Severity(row.severity), status=FindingStatus(row.status), message=row.message, observed={},
        expected={}, first_seen=row.first_seen, last_seen=row.last_seen, opened_at=row.opened_at,
        resolved_at=row.resolved_at, waiver=row.waiver)
    return FindingListing(finding, row.name, row.source, row.tier)


def finding_listings(conn: Connection, *, statuses: Sequence[str]) -> list[FindingListing]:
    """Returns every finding in one of `statuses` with its disk's name, source and tier (the listed columns
    only), by disk and fingerprint."""
    q = (select(*_LISTED).outerjoin(disks, findings.c.disk_id == disks.c.id)
         .where(findings.c.status.in_(list(statuses))).order_by(findings.c.disk_id, findings.c.fingerprint))
    return [_listing(row) for row in conn.execute(q)]


def _sort_column(key: SortKey) -> Any:
    if key == "severity":
        # Severity sorts by rank (low < medium < high < critical), not alphabetically.
        return case(*((findings.c.severity == s.value, s.rank) for s in Severity), else_=-1)
    return {"rule": findings.c.rule, "disk": findings.c.disk_id, "status": findings.c.status,
            "first_seen": findings.c.first_seen, "last_seen": findings.c.last_seen}[key]


def search_findings(conn: Connection, search: FindingSearch, *,
                    total: int | None = None) -> tuple[list[FindingListing], int]:
    """Returns one page of findings matching the search, and how many match in all (counted unless given)."""
    f = findings.c
    where: list[ColumnElement[bool]] = [f.status.in_(list(search.statuses))]
    if search.rule:
        where.append(f.rule == search.rule)
    if search.severity:
        where.append(f.severity == search.severity)
    if search.org:
        where.append(disks.c.source == search.org)
    if search.tier:
        where.append(disks.c.tier == search.tier)
    if search.text:
        needle = search.text.lower()
        # autoescape: a % or _ typed in the box is matched literally, not as a LIKE wildcard.
        where.append(or_(func.lower(f.disk_id).contains(needle, autoescape=True),
                         func.lower(func.coalesce(disks.c.name, "")).contains(needle, autoescape=True)))
    joined = f.disk_id == disks.c.id
    count = total
    if count is None:
        count = conn.execute(select(func.count()).select_from(findings).outerjoin(disks, joined)
                             .where(*where)).scalar_one()
    primary = _sort_column(search.sort)
    q = (select(*_LISTED).outerjoin(disks, joined).where(*where)
         .order_by(primary.desc() if search.descending else primary.asc(), f.disk_id, f.fingerprint)
         .offset(search.offset).limit(search.limit))
    return [_listing(row) for row in conn.execute(q)], int(count)


def disk_sources(conn: Connection) -> list[str]:
    """Returns the distinct sources (`config`, `org:<ref>`) of the audited disks, sorted."""
    q = select(disks.c.source).where(disks.c.is_target.is_(True)).distinct().order_by(disks.c.source)
    return [str(v) for v in conn.execute(q).scalars()]


def disk_tiers(conn: Connection) -> list[str]:
    """Returns the distinct tiers of the audited disks (the defaults not included), sorted."""
    q = (select(disks.c.tier).where(disks.c.is_target.is_(True), disks.c.tier.is_not(None)).distinct()
         .order_by(disks.c.tier))
    return [str(v) for v in conn.execute(q).scalars()]


# ---- history ---------------------------------------------------------------------------------------------------


def run_points(conn: Connection, *, since: datetime) -> list[RunPoint]:
    """Returns the summaries of runs started at or after `since`, oldest first."""
    s = run_summaries.c
    q = (select(s.run_id, s.started_at, s.finished_at, s.status, s.disks_total, s.disks_compliant,
                s.disks_noncompliant, s.disks_unknown, s.open_by_severity, s.requests, s.duration_seconds)
         .where(s.started_at >= since).order_by(s.started_at, s.run_id))
    return [RunPoint(run_id=run_id, started_at=started_at, finished_at=finished_at, status=status,
                     disks_total=total, compliant=compliant, noncompliant=noncompliant, unknown=unknown,
                     open_by_severity={str(k): int(v) for k, v in (by_severity or {}).items()},
                     requests=requests, duration_seconds=duration)
            for (run_id, started_at, finished_at, status, total, compliant, noncompliant, unknown,
                 by_severity, requests, duration) in conn.execute(q).all()]


@dataclass(frozen=True, slots=True)
class Poll:
    """A run's poll time and status (what coverage needs of it)."""

    at: datetime
    status: str


@dataclass(frozen=True, slots=True)
class PeriodData:
    """What a period report reads: polls from `lookback` on, verdicts overlapping the period, events to its end."""

    polls: list[Poll]
    verdicts: list[Verdict]
    names: dict[str, str | None]
    events: list[LifecycleEvent]
    observed: dict[str, DiskObservation] = field(default_factory=dict)


def period_data(conn: Connection, *, start: datetime, end: datetime, lookback: datetime,
                now: datetime | None = None) -> PeriodData:
    """Returns the runs polled in [lookback, end), the verdicts overlapping [start, end), the lifecycle events
    before `end` (ordered by finding and time) and what was observed of the policies' runs in [start, min(end,
    now)): a few set-based queries, never one per disk."""
    polls = [Poll(at, status) for at, status in conn.execute(
        select(runs.c.started_at, runs.c.status).where(runs.c.started_at >= lookback, runs.c.started_at < end)
        .order_by(runs.c.started_at, runs.c.seq)).all()]
    d = disk_states.c
    rows = conn.execute(
        select(d.disk_id, d.status, d.valid_from, d.valid_to, disks.c.name)
        .outerjoin(disks, disks.c.id == d.disk_id)
        .where(d.valid_from < end, or_(d.valid_to.is_(None), d.valid_to > start))
        .order_by(d.disk_id, d.valid_from, d.id)).all()
    verdicts = [Verdict(disk_id, status, valid_from, valid_to) for disk_id, status, valid_from, valid_to, _ in rows]
    names = {row[0]: row[4] for row in rows}
    e = finding_events.c
    events = [LifecycleEvent(fp, rule, disk_id, policy_id, at, kind) for fp, rule, disk_id, policy_id, at, kind in
              conn.execute(select(e.fingerprint, findings.c.rule, findings.c.disk_id, findings.c.policy_id, e.at,
                                  e.kind)
                           .join(findings, findings.c.fingerprint == e.fingerprint)
                           .where(e.at < end).order_by(e.fingerprint, e.at, e.id)).all()]
    until = end if now is None else max(min(end, now), start)
    return PeriodData(polls, verdicts, names, events, period_observations(conn, start=start, end=until))


# ---- the evidence export's inputs ------------------------------------------------------------------------------


def stored_configs(conn: Connection, fingerprints: Sequence[str]) -> dict[str, RunConfig]:
    """Returns the stored run configurations among `fingerprints`, by fingerprint."""
    found: dict[str, RunConfig] = {}
    for chunk in chunks(sorted(set(fingerprints))):
        for fingerprint, config in conn.execute(select(run_configs.c.fingerprint, run_configs.c.config)
                                                .where(run_configs.c.fingerprint.in_(list(chunk)))).all():
            found[fingerprint] = RunConfig(fingerprint, dict(config))
    return found


@dataclass(frozen=True, slots=True)
class RegisterEntry:
    """A finding of the findings register with its disk's name and source (None: the disk is not stored)."""

    finding: TrackedFinding
    disk_name: str | None
    disk_source: str | None


def findings_register(conn: Connection, *, start: datetime, end: datetime) -> list[RegisterEntry]:
    """Returns the findings open at some time of [start, end) — seen before its end and not resolved before its
    start — with their disks' names and sources, by disk, rule and fingerprint."""
    f = findings.c
    q = (select(findings, disks.c.name.label("disk_name"), disks.c.source.label("disk_source"))
         .outerjoin(disks, disks.c.id == f.disk_id)
         .where(f.first_seen < end, or_(f.resolved_at.is_(None), f.resolved_at >= start))
         .order_by(f.disk_id, f.rule, f.fingerprint))
    return [RegisterEntry(finding_record(r), r.disk_name, r.disk_source) for r in conn.execute(q)]


def policy_states_during(conn: Connection, *, start: datetime, end: datetime) -> list[PolicyStateRecord]:
    """Returns the policy settings seen at some time of [start, end), by disk, policy and time."""
    p = policy_states.c
    q = (select(policy_states).where(p.valid_from < end, or_(p.valid_to.is_(None), p.valid_to > start))
         .order_by(p.disk_id, p.policy_id, p.valid_from, p.id))
    return [state_record(r) for r in conn.execute(q)]


def config_before(conn: Connection, *, at: datetime, judged: bool = False) -> RunConfig | None:
    """Returns the stored configuration of the latest run started before `at` that recorded one (None: none did);
    with `judged`, of the latest complete or partial one (a run that judged disks under it)."""
    q = (select(run_configs.c.fingerprint, run_configs.c.config)
         .join(runs, runs.c.config_fingerprint == run_configs.c.fingerprint)
         .where(runs.c.started_at < at).order_by(runs.c.started_at.desc(), runs.c.seq.desc()).limit(1))
    if judged:
        q = q.where(runs.c.status.in_([RunStatus.COMPLETE.value, RunStatus.PARTIAL.value]))
    row = conn.execute(q).first()
    return RunConfig(row.fingerprint, dict(row.config)) if row is not None else None


def tier_changes(conn: Connection, *, disk_ids: Sequence[str]) -> list[DriftRecord]:
    """Returns the `tier-changed` drift events of the disks, whenever they happened, oldest first."""
    d = drift_events.c
    found: list[DriftRecord] = []
    for chunk in chunks(sorted(set(disk_ids))):
        q = select(drift_events).where(d.kind == "tier-changed", d.disk_id.in_(list(chunk)))
        found += [drift_record(r) for r in conn.execute(q)]
    return sorted(found, key=lambda e: (e.at, e.disk_id))


def drift_between(conn: Connection, *, start: datetime, end: datetime) -> list[DriftRecord]:
    """Returns the drift events of [start, end), oldest first."""
    d = drift_events.c
    q = select(drift_events).where(d.at >= start, d.at < end).order_by(d.at, d.disk_id, d.policy_id, d.id)
    return [drift_record(r) for r in conn.execute(q)]


def deliveries_between(conn: Connection, *, start: datetime,
                       end: datetime) -> list[tuple[Delivery, str | None, str | None]]:
    """Returns the outbox entries created in [start, end), oldest first, each with the id and configuration
    fingerprint of the run that caused it (None: a test notification, or a run recorded before configurations
    were kept)."""
    o = outbox.c
    q = (select(outbox, runs.c.config_fingerprint).outerjoin(runs, runs.c.id == o.run_id)
         .where(o.created_at >= start, o.created_at < end).order_by(o.created_at, o.id))
    return [(delivery_record(r), r.run_id, r.config_fingerprint) for r in conn.execute(q)]


def keys_where(conn: Connection, key: Any, condition: ColumnElement[bool], *, after: Any, limit: int) -> list[Any]:
    """Returns up to `limit` primary keys matching `condition`, in key order after `after` (keyset paging)."""
    q = select(key).where(condition)
    if after is not None:
        q = q.where(key > after)
    return list(conn.execute(q.order_by(key).limit(limit)).scalars())


# ---- alerts and the outbox -------------------------------------------------------------------------------------


def alert_state_map(conn: Connection) -> dict[tuple[str, str], AlertState]:
    """Returns every notifier's alert states by (notifier, fingerprint)."""
    return {(r.notifier, r.fingerprint): AlertState(r.notifier, r.fingerprint, AlertStatus(r.status),
                                                    r.last_sent_at, r.starts_at)
            for r in conn.execute(select(alert_states))}


def deliveries(conn: Connection, *, limit: int = 50, state: str | None = None) -> list[Delivery]:
    """Returns recent outbox entries, newest first."""
    q = select(outbox).order_by(outbox.c.created_at.desc(), outbox.c.id.desc()).limit(limit)
    if state:
        q = q.where(outbox.c.state == state)
    return [delivery_record(r) for r in conn.execute(q)]


def deliveries_by_id(conn: Connection, ids: Sequence[str]) -> list[Delivery]:
    """Returns the outbox entries among `ids`, oldest first."""
    q = select(outbox).where(outbox.c.id.in_(list(ids))).order_by(outbox.c.created_at, outbox.c.id)
    return [delivery_record(r) for r in conn.execute(q)]


def due_deliveries(conn: Connection, *, now: datetime, stale_before: datetime, epoch: int | None,
                   limit: int) -> list[tuple[str, str, str | None, datetime | None, int | None]]:
    """Returns (id, state, claimed_by, claimed_at, claim_epoch) of up to `limit` entries due for delivery: pending
    and due; claimed under a leader epoch older than `epoch` (that leader's term is over: at once); or claimed
    before `stale_before` (a deliverer outside the leadership, or one that vanished). On PostgreSQL the candidates
    are locked (`FOR UPDATE SKIP LOCKED`), so concurrent deliverers take disjoint batches."""
    o = outbox.c
    stale = o.claimed_at < stale_before
    if epoch is not None:
        stale = or_(stale, o.claim_epoch < epoch)
    due = or_(and_(o.state == DeliveryState.PENDING.value, o.next_attempt_at <= now),
              and_(o.state == DeliveryState.DELIVERING.value, stale))
    q = (select(o.id, o.state, o.claimed_by, o.claimed_at, o.claim_epoch).where(due)
         .order_by(o.created_at, o.id).limit(limit))
    if conn.dialect.name == "postgresql":
        q = q.with_for_update(skip_locked=True)
    return [(a, b, c, d, e) for a, b, c, d, e in conn.execute(q).all()]


def delivery_counts(conn: Connection) -> list[tuple[str, str, int]]:
    """Returns (notifier, state, count) for metrics."""
    q = select(outbox.c.notifier, outbox.c.state, func.count()).group_by(outbox.c.notifier, outbox.c.state)
    return [(a, b, int(n)) for a, b, n in conn.execute(q).all()]


def undelivered_count(conn: Connection, *, run_id: str | None = None) -> int:
    """Returns how many entries are not yet delivered or given up (optionally of one run)."""
    q = select(func.count()).select_from(outbox).where(
        outbox.c.state.in_([DeliveryState.PENDING.value, DeliveryState.DELIVERING.value]))
    if run_id:
        q = q.where(outbox.c.run_id == run_id)
    return int(conn.execute(q).scalar_one())


# ---- the compliance report's inputs ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReportInputs:
    """What the compliance report is assembled from, read on one connection."""

    run: RunRecord | None
    disks: dict[str, DiskRecord]
    findings: list[TrackedFinding]
    policies: dict[str, list[str]]
    drift: list[DriftRecord]
    observed: dict[str, DiskObservation] = field(default_factory=dict)


def report_inputs(conn: Connection, *, now: datetime, drift_since: datetime) -> ReportInputs:
    """Returns the latest finished run, the target disks, open and waived findings, current policy ids and the
    drift since `drift_since`."""
    return ReportInputs(latest_run(conn, now=now), load_disks(conn, targets_only=True),
                        all_findings(conn, statuses=REPORTED_STATUSES), current_policy_ids(conn),
                        recent_drift(conn, since=drift_since),
                        observations(conn, start=now - RPO_WINDOW, end=now))


# ---- remediation -----------------------------------------------------------------------------------------------


def remediation_record(row: Any) -> RemediationRecord:
    """Returns a remediations row as a RemediationRecord."""
    return RemediationRecord(
        attempt_id=row.attempt_id, disk_id=row.disk_id, change_id=row.change_id, plan_hash=row.plan_hash,
        kind=row.kind, status=row.status, actor_user=row.actor_user, actor_host=row.actor_host,
        requested_at=row.requested_at, finished_at=row.finished_at, request=dict(row.request or {}),
        response=row.response, error_code=row.error_code, errors=row.errors, reason=row.reason,
        fixes=list(row.fixes or []), before=row.before, after=row.after)


def disk_remediations(conn: Connection, disk_id: str) -> list[RemediationRecord]:
    """Returns every remediation attempt concerning a disk, oldest first."""
    r = remediations.c
    q = select(remediations).where(r.disk_id == disk_id).order_by(r.requested_at, r.attempt_id)
    return [remediation_record(row) for row in conn.execute(q)]


def remediations_between(conn: Connection, *, start: datetime, end: datetime) -> list[RemediationRecord]:
    """Returns the remediation attempts requested in [start, end), oldest first."""
    r = remediations.c
    q = (select(remediations).where(r.requested_at >= start, r.requested_at < end)
         .order_by(r.requested_at, r.attempt_id, r.disk_id))
    return [remediation_record(row) for row in conn.execute(q)]


def dangling_intents(conn: Connection, change_id: str) -> list[RemediationRecord]:
    """Returns the attempts of a change still at `intent`: writes whose process stopped before their outcome."""
    r = remediations.c
    q = select(remediations).where(r.change_id == change_id, r.status == "intent").order_by(r.requested_at)
    return [remediation_record(row) for row in conn.execute(q)]


def current_policy_states(conn: Connection) -> dict[str, list[PolicyStateRecord]]:
    """Returns the current policy states of every disk, by disk, ordered by policy id."""
    p = policy_states.c
    q = select(policy_states).where(p.valid_to.is_(None)).order_by(p.disk_id, p.policy_id)
    out: dict[str, list[PolicyStateRecord]] = {}
    for row in conn.execute(q):
        out.setdefault(row.disk_id, []).append(state_record(row))
    return out


@dataclass(frozen=True, slots=True)
class PlanInputs:
    """What a remediation plan is made from, read on one connection: the audited disks, their current policies and
    their open and waived findings."""

    disks: dict[str, DiskRecord]
    policies: dict[str, list[PolicyStateRecord]]
    findings: list[TrackedFinding]


def plan_inputs(conn: Connection) -> PlanInputs:
    """Returns the target disks, every disk's current policy states and the open and waived findings."""
    return PlanInputs(load_disks(conn, targets_only=True), current_policy_states(conn),
                      all_findings(conn, statuses=REPORTED_STATUSES))
