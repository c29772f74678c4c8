"""The repository: every database read and write, taking and returning domain objects."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import and_, case, delete, func, or_, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from auditor.domain.alerts import AlertState, AlertStatus, OutboxEntry, notification_to_dict
from auditor.domain.lifecycle import Change, Transition
from auditor.domain.listings import FindingQuery, decode_cursor, encode_cursor
from auditor.domain.models import (
    DiskSnapshot,
    FindingStatus,
    ReadOutcome,
    TrackedFinding,
)
from auditor.domain.records import (
    DiskRecord,
    DriftRecord,
    FindingEventRecord,
    PolicyStateRecord,
    RunError,
    RunRecord,
    RunStats,
    RunStatus,
)
from auditor.errors import LeaseLostError, StoreError
from auditor.store.engine import create_engine_for, ping, safe_url
from auditor.store.leases import CYCLE, Holder, Lease, insert_if_absent, read_in, renew_in
from auditor.store.reads import _disk, _drift, _event, _finding, _run, _state
from auditor.store.tables import (
    AlertStateRow,
    DiskRow,
    DiskState,
    DriftEvent,
    FindingEvent,
    FindingRow,
    OutboxRow,
    PolicyState,
    Run,
    RunSummary,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
CHUNK = 500  # stays under SQLite's bound-parameter limit and keeps PostgreSQL statements small


def _chunks(items: Sequence[T], size: int = CHUNK) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


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


def _finding_values(f: TrackedFinding) -> dict[str, Any]:
    return {
        "fingerprint": f.fingerprint,
        "rule": f.rule,
        "disk_id": f.disk_id,
        "policy_id": f.policy_id,
        "severity": f.severity.value,
        "status": f.status.value,
        "message": f.message,
        "observed": f.observed,
        "expected": f.expected,
        "first_seen": f.first_seen,
        "last_seen": f.last_seen,
        "opened_at": f.opened_at,
        "resolved_at": f.resolved_at,
        "waiver": f.waiver,
        "tier": f.tier,
    }




class Store:
    """Async repository over one engine. SQLAlchemy stays inside; callers see domain objects."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)

    @classmethod
    def from_url(cls, url: str) -> Store:
        """Returns a Store on a new engine for the URL."""
        return cls(create_engine_for(url))

    def __repr__(self) -> str:
        return f"Store({safe_url(self.engine.url.render_as_string(hide_password=True))})"

    async def close(self) -> None:
        """Disposes of the engine's connections."""
        await self.engine.dispose()

    async def ping(self) -> None:
        """Raises StoreError unless the database answers."""
        await ping(self.engine)

    def _error(self, exc: Exception) -> StoreError:
        reason = getattr(exc, "orig", None) or exc
        text = str(reason).strip().splitlines()[0] if str(reason).strip() else type(reason).__name__
        return StoreError(f"database {self.engine.url.render_as_string(hide_password=True)}: {text[:300]}")

    async def _read(self, fn: Any) -> Any:
        try:
            async with self._sessions() as session:
                return await fn(session)
        except (SQLAlchemyError, OSError) as exc:
            raise self._error(exc) from None

    async def _write(self, fn: Any) -> Any:
        try:
            async with self._sessions() as session, session.begin():
                return await fn(session)
        except (SQLAlchemyError, OSError) as exc:
            raise self._error(exc) from None

    # ---- runs -------------------------------------------------------------------------------------------

    async def start_run(self, *, now: datetime, trigger: str, run_id: str | None = None,
                        owner: str | None = None) -> str:
        """Records a new running run (the caller's id, else a new one) and returns its id.

        Runs are numbered by max(seq) + 1: safe because only the holder of the cycle lease starts runs (and the
        unique index turns a race into an error rather than two runs with one number).
        """
        run_id = run_id or new_run_id()

        async def go(s: AsyncSession) -> str:
            seq = (await s.execute(select(func.coalesce(func.max(Run.seq), 0)))).scalar_one() + 1
            s.add(Run(id=run_id, seq=seq, trigger=trigger, status=RunStatus.RUNNING.value, started_at=now,
                      finished_at=None, targets_checked=0, disks_ok=0, disks_unknown=0, api_requests=0,
                      api_retries=0, api_rate_limited=0, api_by_status={}, findings_opened=0,
                      findings_resolved=0, errors=[], owner=owner))
            return run_id

        result: str = await self._write(go)
        return result

    async def fail_run(self, run_id: str, *, now: datetime, errors: Sequence[RunError], stats: RunStats) -> None:
        """Marks a run failed in its own transaction (nothing of its findings is written)."""
        async with self.transaction() as tx:
            await tx.fail_run(run_id, now=now, errors=errors, stats=stats)

    async def abandon_orphaned_runs(self, *, now: datetime, reason: str) -> list[str]:
        """Marks failed the runs left `running` whose owner is gone; returns their ids.

        A run is orphaned when the cycle lease is not live for it: expired, released, taken by another run, or
        held by a process on this host that no longer exists. A live holder's run is never touched.
        """
        async with self.transaction() as tx:
            return await tx.abandon_orphaned_runs(now=now, reason=reason)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        """Yields a Transaction: everything done through it commits together, or nothing does."""
        try:
            async with self._sessions() as session, session.begin():
                yield Transaction(session)
        except (SQLAlchemyError, OSError) as exc:
            raise self._error(exc) from None

    async def latest_run(self, *, finished: bool = True) -> RunRecord | None:
        """Returns the most recent run (finished ones only unless `finished` is false)."""

        async def go(s: AsyncSession) -> RunRecord | None:
            q = select(Run).order_by(Run.seq.desc()).limit(1)
            if finished:
                q = q.where(Run.status != RunStatus.RUNNING.value)
            row = (await s.execute(q)).scalar_one_or_none()
            return _run(row) if row else None

        result: RunRecord | None = await self._read(go)
        return result

    async def last_successful_run(self) -> RunRecord | None:
        """Returns the latest run that was complete or partial."""

        async def go(s: AsyncSession) -> RunRecord | None:
            q = (select(Run).where(Run.status.in_([RunStatus.COMPLETE.value, RunStatus.PARTIAL.value]))
                 .order_by(Run.seq.desc()).limit(1))
            row = (await s.execute(q)).scalar_one_or_none()
            return _run(row) if row else None

        result: RunRecord | None = await self._read(go)
        return result

    async def list_runs(self, *, limit: int = 20) -> list[RunRecord]:
        """Returns recent runs, newest first."""

        async def go(s: AsyncSession) -> list[RunRecord]:
            rows = (await s.execute(select(Run).order_by(Run.seq.desc()).limit(limit))).scalars()
            return [_run(r) for r in rows]

        result: list[RunRecord] = await self._read(go)
        return result

    # ---- cycle inputs -----------------------------------------------------------------------------------

    async def load_disks(self, *, targets_only: bool = False) -> dict[str, DiskRecord]:
        """Returns stored disks by id."""

        async def go(s: AsyncSession) -> dict[str, DiskRecord]:
            q = select(DiskRow)
            if targets_only:
                q = q.where(DiskRow.is_target.is_(True))
            return {r.id: _disk(r) for r in (await s.execute(q)).scalars()}

        result: dict[str, DiskRecord] = await self._read(go)
        return result

    async def target_sources(self) -> dict[str, str]:
        """Returns the source (`config` or `org:<ref>`) of every disk audited as a target, by id (ids only)."""

        async def go(s: AsyncSession) -> dict[str, str]:
            q = select(DiskRow.id, DiskRow.source).where(DiskRow.is_target.is_(True))
            return {disk_id: source for disk_id, source in (await s.execute(q)).all()}

        result: dict[str, str] = await self._read(go)
        return result

    # ---- the cycle's one write ------------------------------------------------------------------------

    # ---- reports ----------------------------------------------------------------------------------------

    async def list_findings(self, query: FindingQuery) -> tuple[list[TrackedFinding], str | None]:
        """Returns one page of findings ordered by (disk_id, fingerprint) and the cursor of the next page."""

        async def go(s: AsyncSession) -> tuple[list[TrackedFinding], str | None]:
            q = select(FindingRow).where(FindingRow.status.in_(query.statuses))
            if query.rule:
                q = q.where(FindingRow.rule == query.rule)
            if query.severity:
                q = q.where(FindingRow.severity == query.severity)
            if query.disk_id:
                q = q.where(FindingRow.disk_id == query.disk_id)
            if query.tier:
                q = q.where(FindingRow.disk_id.in_(select(DiskRow.id).where(DiskRow.tier == query.tier)))
            if query.cursor:
                disk_id, fp = decode_cursor(query.cursor)
                q = q.where(or_(FindingRow.disk_id > disk_id,
                                and_(FindingRow.disk_id == disk_id, FindingRow.fingerprint > fp)))
            q = q.order_by(FindingRow.disk_id, FindingRow.fingerprint).limit(query.limit + 1)
            rows = list((await s.execute(q)).scalars())
            more = len(rows) > query.limit
            rows = rows[: query.limit]
            nxt = encode_cursor((rows[-1].disk_id, rows[-1].fingerprint)) if more and rows else None
            return [_finding(r) for r in rows], nxt

        result: tuple[list[TrackedFinding], str | None] = await self._read(go)
        return result

    async def all_findings(self, *, statuses: Sequence[str]) -> list[TrackedFinding]:
        """Returns every finding with one of the statuses, ordered by disk and fingerprint."""

        async def go(s: AsyncSession) -> list[TrackedFinding]:
            q = (select(FindingRow).where(FindingRow.status.in_(list(statuses)))
                 .order_by(FindingRow.disk_id, FindingRow.fingerprint))
            return [_finding(r) for r in (await s.execute(q)).scalars()]

        result: list[TrackedFinding] = await self._read(go)
        return result

    async def current_policy_ids(self) -> dict[str, list[str]]:
        """Returns the current policy ids of every disk."""

        async def go(s: AsyncSession) -> dict[str, list[str]]:
            q = (select(PolicyState.disk_id, PolicyState.policy_id).where(PolicyState.valid_to.is_(None))
                 .order_by(PolicyState.disk_id, PolicyState.policy_id))
            out: dict[str, list[str]] = {}
            for disk_id, policy_id in (await s.execute(q)).all():
                out.setdefault(disk_id, []).append(policy_id)
            return out

        result: dict[str, list[str]] = await self._read(go)
        return result

    async def disk_history(
        self, disk_id: str
    ) -> tuple[DiskRecord | None, list[PolicyStateRecord], list[DriftRecord], list[TrackedFinding],
               list[FindingEventRecord]]:
        """Returns a disk with all its policy states, drift events, findings and finding events, oldest first."""

        async def go(s: AsyncSession) -> Any:
            disk_row = await s.get(DiskRow, disk_id)
            states = (await s.execute(select(PolicyState).where(PolicyState.disk_id == disk_id)
                                      .order_by(PolicyState.valid_from, PolicyState.id))).scalars()
            drift = (await s.execute(select(DriftEvent).where(DriftEvent.disk_id == disk_id)
                                     .order_by(DriftEvent.at, DriftEvent.id))).scalars()
            findings = (await s.execute(select(FindingRow).where(FindingRow.disk_id == disk_id)
                                        .order_by(FindingRow.first_seen, FindingRow.fingerprint))).scalars()
            events = (await s.execute(select(FindingEvent).where(FindingEvent.disk_id == disk_id)
                                      .order_by(FindingEvent.at, FindingEvent.id))).scalars()
            return (
                _disk(disk_row) if disk_row else None,
                [_state(r) for r in states],
                [_drift(d) for d in drift],
                [_finding(f) for f in findings],
                [_event(e) for e in events],
            )

        result: Any = await self._read(go)
        return result  # type: ignore[no-any-return]

    async def recent_drift(self, *, since: datetime, limit: int = 200) -> list[DriftRecord]:
        """Returns drift events since `since`, newest first."""

        async def go(s: AsyncSession) -> list[DriftRecord]:
            q = select(DriftEvent).where(DriftEvent.at >= since).order_by(DriftEvent.at.desc(),
                                                                          DriftEvent.id.desc()).limit(limit)
            return [DriftRecord(d.disk_id, d.policy_id, d.run_id, d.at, d.kind, d.before, d.after)
                    for d in (await s.execute(q)).scalars()]

        result: list[DriftRecord] = await self._read(go)
        return result

    async def finding_counts(self) -> list[tuple[str, str, str, int]]:
        """Returns (status, rule, severity, count) for every finding group (metrics)."""

        async def go(s: AsyncSession) -> list[tuple[str, str, str, int]]:
            q = select(FindingRow.status, FindingRow.rule, FindingRow.severity, func.count()).group_by(
                FindingRow.status, FindingRow.rule, FindingRow.severity)
            return [(a, b, c, int(n)) for a, b, c, n in (await s.execute(q)).all()]

        result: list[tuple[str, str, str, int]] = await self._read(go)
        return result

    async def disk_status_counts(self) -> dict[str, int]:
        """Returns the number of target disks per report status (compliant / noncompliant / unknown)."""

        async def go(s: AsyncSession) -> dict[str, int]:
            has_open = (select(FindingRow.disk_id).where(FindingRow.status == FindingStatus.OPEN.value)
                        .distinct().subquery())
            status = case(
                (DiskRow.outcome == ReadOutcome.UNKNOWN.value, "unknown"),
                (DiskRow.id.in_(select(has_open.c.disk_id)), "noncompliant"),
                else_="compliant",
            )
            q = select(status, func.count()).where(DiskRow.is_target.is_(True)).group_by(status)
            out = {"compliant": 0, "noncompliant": 0, "unknown": 0}
            out.update({str(k): int(v) for k, v in (await s.execute(q)).all()})
            return out

        result: dict[str, int] = await self._read(go)
        return result


def new_run_id() -> str:
    """Returns a new run id (the caller creates it, so it is known before the run is recorded)."""
    return uuid.uuid4().hex


class Transaction:
    """One database transaction, typed: a use case reads and writes through it and it commits as one."""

    def __init__(self, session: AsyncSession) -> None:
        self._s = session

    async def check_lease(self, holder: Holder, *, now: datetime, ttl: timedelta, name: str = CYCLE) -> None:
        """Renews our lease inside this transaction, or raises LeaseLostError (the fence before a commit)."""
        if await renew_in(self._s, name, holder, now=now, ttl=ttl) != 1:
            current = await read_in(self._s, name)
            who = current.describe() if current else "nobody"
            raise LeaseLostError(f"the {name} lease is no longer ours (now held by {who}); nothing was written")

    async def lease(self, name: str = CYCLE) -> Lease | None:
        """Returns the lease row as this transaction sees it."""
        return await read_in(self._s, name)

    async def active_findings(self, *, extra: Iterable[str] = ()) -> dict[str, TrackedFinding]:
        """Returns open and waived findings, plus the stored state of the `extra` fingerprints (to reopen)."""
        wanted = sorted(set(extra))
        q = select(FindingRow).where(FindingRow.status.in_([FindingStatus.OPEN.value, FindingStatus.WAIVED.value]))
        out = {r.fingerprint: _finding(r) for r in (await self._s.execute(q)).scalars()}
        missing = [fp for fp in wanted if fp not in out]
        for chunk in _chunks(missing):
            rows = (await self._s.execute(select(FindingRow).where(FindingRow.fingerprint.in_(chunk)))).scalars()
            out.update({r.fingerprint: _finding(r) for r in rows})
        return out

    async def alert_states(self) -> dict[tuple[str, str], AlertState]:
        """Returns every notifier's alert states by (notifier, fingerprint)."""
        rows = (await self._s.execute(select(AlertStateRow))).scalars()
        return {(r.notifier, r.fingerprint): AlertState(r.notifier, r.fingerprint, AlertStatus(r.status),
                                                        r.last_sent_at, r.starts_at) for r in rows}

    async def write_cycle(self, cycle: CycleWrite) -> None:
        """Writes a finished cycle: disks, policy states, drift, findings, events and the run row."""
        s = self._s
        new_disks = await _write_disks(s, cycle)
        await _write_states(s, cycle, new_disks=new_disks)
        await _write_findings(s, cycle)
        await _write_history(s, cycle)
        opened = sum(1 for c in cycle.changes if c.kind in (Transition.OPENED, Transition.REOPENED,
                                                             Transition.UNWAIVED))
        resolved = sum(1 for c in cycle.changes if c.kind is Transition.RESOLVED)
        ok = sum(1 for d in cycle.disks if d.snapshot.outcome is not ReadOutcome.UNKNOWN)
        await s.execute(
            update(Run).where(Run.id == cycle.run_id).values(
                status=cycle.status.value, finished_at=cycle.finished_at or cycle.now,
                targets_checked=cycle.targets_checked, disks_ok=ok, disks_unknown=len(cycle.disks) - ok,
                api_requests=cycle.stats.requests, api_retries=cycle.stats.retries,
                api_rate_limited=cycle.stats.rate_limited, api_by_status=dict(cycle.stats.by_status),
                findings_opened=opened, findings_resolved=resolved,
                errors=[e.as_dict() for e in cycle.errors],
            )
        )

    async def fail_run(self, run_id: str, *, now: datetime, errors: Sequence[RunError], stats: RunStats) -> bool:
        """Marks a run failed unless it finished otherwise; returns whether the row was there to mark."""
        started = (await self._s.execute(select(Run.started_at).where(Run.id == run_id))).scalar_one_or_none()
        if started is not None:
            await insert_if_absent(self._s, RunSummary, {
                "run_id": run_id, "started_at": started, "finished_at": now, "status": RunStatus.FAILED.value,
                "disks_total": 0, "disks_compliant": 0, "disks_noncompliant": 0, "disks_unknown": 0,
                "open_by_severity": {}, "open_by_rule": {}, "requests": stats.requests,
                "duration_seconds": max((now - started).total_seconds(), 0.0)})
        r = await self._s.execute(
            update(Run).where(Run.id == run_id, Run.status.in_([RunStatus.RUNNING.value, RunStatus.FAILED.value]))
            .values(status=RunStatus.FAILED.value, finished_at=now, errors=[e.as_dict() for e in errors],
                    api_requests=stats.requests, api_retries=stats.retries, api_rate_limited=stats.rate_limited,
                    api_by_status=dict(stats.by_status))
        )
        return int(getattr(r, "rowcount", 0) or 0) == 1

    async def record_failed_run(self, run_id: str, *, trigger: str, started_at: datetime, finished_at: datetime,
                                errors: Sequence[RunError], stats: RunStats, owner: str | None) -> None:
        """Marks a run failed, creating its row if the run never got recorded (the database was down at start)."""
        if await self.fail_run(run_id, now=finished_at, errors=errors, stats=stats):
            return
        if (await self._s.execute(select(Run.id).where(Run.id == run_id))).scalar_one_or_none() is not None:
            return  # it finished otherwise (e.g. complete): nothing to overwrite
        seq = (await self._s.execute(select(func.coalesce(func.max(Run.seq), 0)))).scalar_one() + 1
        self._s.add(RunSummary(run_id=run_id, started_at=started_at, finished_at=finished_at,
                               status=RunStatus.FAILED.value, disks_total=0, disks_compliant=0, disks_noncompliant=0,
                               disks_unknown=0, open_by_severity={}, open_by_rule={}, requests=stats.requests,
                               duration_seconds=max((finished_at - started_at).total_seconds(), 0.0)))
        self._s.add(Run(id=run_id, seq=seq, trigger=trigger, status=RunStatus.FAILED.value, started_at=started_at,
                        finished_at=finished_at, targets_checked=0, disks_ok=0, disks_unknown=0,
                        api_requests=stats.requests, api_retries=stats.retries, api_rate_limited=stats.rate_limited,
                        api_by_status=dict(stats.by_status), findings_opened=0, findings_resolved=0,
                        errors=[e.as_dict() for e in errors], owner=owner))
        await self._s.flush()

    async def abandon_orphaned_runs(self, *, now: datetime, reason: str) -> list[str]:
        """Marks failed the runs left `running` whose owner is gone (see Store.abandon_orphaned_runs)."""
        running = list((await self._s.execute(select(Run.id).where(Run.status == RunStatus.RUNNING.value)))
                       .scalars())
        if not running:
            return []
        lease = await read_in(self._s, CYCLE)
        live = lease.run_id if lease is not None and lease.is_live(now) else None
        orphans = [run_id for run_id in running if run_id != live]
        for chunk in _chunks(orphans):
            # finished_at stays empty: the run never finished, so readiness does not count it as a cycle.
            await self._s.execute(
                update(Run).where(Run.id.in_(chunk), Run.status == RunStatus.RUNNING.value).values(
                    status=RunStatus.FAILED.value,
                    errors=[{"target": "*", "code": "abandoned",
                             "message": f"{reason} (noticed {now.isoformat(timespec='seconds')})"}],
                ).execution_options(synchronize_session=False))
        return orphans

    async def enqueue(self, entries: Sequence[OutboxEntry], states: Sequence[AlertState | tuple[str, str]],
                      *, run_id: str | None, now: datetime) -> None:
        """Adds outbox entries and applies alert-state changes; a (notifier, fingerprint) tuple forgets a state."""
        s = self._s
        for e in entries:
            n = e.notification
            # Ids are derived from the transition (see notification_key): an entry planned twice is written once.
            await insert_if_absent(s, OutboxRow, {
                "id": n.id, "notifier": n.notifier, "group_key": n.group_key, "kind": e.kind,
                "payload": notification_to_dict(n), "run_id": run_id, "created_at": now, "state": "pending",
                "attempts": 0, "next_attempt_at": now, "claimed_by": None, "claimed_at": None,
                "delivered_at": None, "last_status": None, "last_error": None})
        for st in states:
            if isinstance(st, tuple):
                await s.execute(delete(AlertStateRow).where(AlertStateRow.notifier == st[0],
                                                            AlertStateRow.fingerprint == st[1]))
                continue
            row = await s.get(AlertStateRow, (st.notifier, st.fingerprint))
            if row is None:
                s.add(AlertStateRow(notifier=st.notifier, fingerprint=st.fingerprint, status=st.status.value,
                                    last_sent_at=st.last_sent_at, starts_at=st.starts_at))
            else:
                row.status, row.last_sent_at, row.starts_at = st.status.value, st.last_sent_at, st.starts_at
        await s.flush()


# ---- the cycle's writers ------------------------------------------------------------------------------------

async def _write_disks(s: AsyncSession, cycle: CycleWrite) -> set[str]:
    """Upserts the run's disks; returns the ids never read before this run (first seen, or only unknown).

    Works a chunk of disks at a time and flushes each, so the session never holds every row of a large fleet
    (written, unmodified rows are only weakly referenced by the session): 100,000 disks stay in a few MB.
    """
    now = cycle.now
    new_disks: set[str] = set()
    for part in _chunks(cycle.disks):
        ids = [d.snapshot.disk_id for d in part]
        existing = {r.id: r for r in (await s.execute(select(DiskRow).where(DiskRow.id.in_(ids)))).scalars()}
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
                s.add(DiskRow(id=disk.id, name=disk.name, vm_id=disk.vm_id, vm_fqdn=disk.vm_fqdn, source=d.source,
                              is_target=True, outcome=snap.outcome.value, error_code=snap.error_code,
                              error_message=snap.error_message, first_seen_at=now, last_checked_at=now,
                              last_read_at=now if definite else None, last_run_id=cycle.run_id,
                              tier=tier, tier_detail=tier_detail))
                continue
            if snap.outcome is not ReadOutcome.OK:
                tier, tier_detail = row.tier, row.tier_detail  # no tier was decided: keep what we knew
            elif row.tier != tier and row.last_read_at is not None:
                # A disk moving between tiers is judged by new rules from this run on: that is drift.
                s.add(DriftEvent(disk_id=disk.id, policy_id="", run_id=cycle.run_id, at=now, kind="tier-changed",
                                 before={"tier": row.tier}, after={"tier": tier}))
            # Only rows whose facts changed are written one by one; the per-poll timestamps go in bulk below.
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
            old = (row.name, row.vm_id, row.vm_fqdn, row.source, row.is_target, row.outcome, row.error_code,
                   row.error_message, row.tier, row.tier_detail)
            if new != old:
                (row.name, row.vm_id, row.vm_fqdn, row.source, row.is_target, row.outcome, row.error_code,
                 row.error_message, row.tier, row.tier_detail) = new
        if read_ok:
            await s.execute(update(DiskRow).where(DiskRow.id.in_(read_ok)).values(
                last_checked_at=now, last_read_at=now, last_run_id=cycle.run_id
            ).execution_options(synchronize_session=False))
        if unknown:
            await s.execute(update(DiskRow).where(DiskRow.id.in_(unknown)).values(
                last_checked_at=now, last_run_id=cycle.run_id).execution_options(synchronize_session=False))
        await s.flush()
    for chunk in _chunks(sorted(cycle.retired_disks)):
        await s.execute(update(DiskRow).where(DiskRow.id.in_(chunk)).values(is_target=False)
                        .execution_options(synchronize_session=False))
    await s.flush()
    return new_disks


def _tier_of(snap: DiskSnapshot) -> tuple[str | None, dict[str, Any] | None]:
    """Returns the disk row's tier and tier_detail for a snapshot (None, None for the defaults)."""
    decision = snap.tier
    if decision.tier is None:
        return None, None
    return decision.tier.name, {"exempt": decision.tier.exempt, "reason": decision.tier.reason or None,
                                "because": dict(decision.because)}


async def _write_states(s: AsyncSession, cycle: CycleWrite, *, new_disks: set[str]) -> None:
    """Writes policy states by change and drift events, a chunk of disks at a time (see _write_disks)."""
    now = cycle.now
    settled = [d.snapshot for d in cycle.disks if d.snapshot.outcome is not ReadOutcome.UNKNOWN]
    for part in _chunks(settled):
        current: dict[str, dict[str, PolicyState]] = {}
        q = select(PolicyState).where(PolicyState.valid_to.is_(None),
                                      PolicyState.disk_id.in_([snap.disk_id for snap in part]))
        for found_state in (await s.execute(q)).scalars():
            current.setdefault(found_state.disk_id, {})[found_state.policy_id] = found_state
        moving: list[dict[str, Any]] = []
        for snap in part:
            states = current.get(snap.disk_id, {})
            # A disk's first definite reading is its baseline, not drift.
            is_new_disk = snap.disk_id in new_disks
            for policy in snap.policies:
                h = policy.settings_hash()
                after = {"retention": policy.retention, "interval": policy.schedule.interval.value,
                         "target_type": policy.target_type.value, "target_id": policy.target_id}
                row: PolicyState | None = states.pop(policy.id, None)
                if row is not None and row.settings_hash == h:
                    nxt, size = policy.schedule.next_invocation_at, policy.total_size
                    if row.next_invocation_at != nxt or row.total_size != size or (
                            policy.target_name and row.target_name != policy.target_name):
                        moving.append({"id": row.id, "next_invocation_at": nxt, "total_size": size,
                                       "target_name": policy.target_name or row.target_name})
                    continue
                if row is not None:
                    row.valid_to = now
                    before: dict[str, Any] | None = _state(row).settings()
                    kind = "policy-changed"
                else:
                    before, kind = None, "policy-added"
                s.add(PolicyState(
                    disk_id=snap.disk_id, policy_id=policy.id, settings_hash=h, retention=policy.retention,
                    interval=policy.schedule.interval.value, target_type=policy.target_type.value,
                    target_id=policy.target_id, target_name=policy.target_name,
                    next_invocation_at=policy.schedule.next_invocation_at, total_size=policy.total_size,
                    valid_from=now, valid_to=None, first_run_id=cycle.run_id,
                ))
                if not is_new_disk:
                    s.add(DriftEvent(disk_id=snap.disk_id, policy_id=policy.id, run_id=cycle.run_id, at=now,
                                     kind=kind, before=before, after=after))
            for policy_id, old_row in states.items():
                old_row.valid_to = now
                s.add(DriftEvent(disk_id=snap.disk_id, policy_id=policy_id, run_id=cycle.run_id, at=now,
                                 kind="policy-removed", before=_state(old_row).settings(), after=None))
        if moving:
            await s.execute(update(PolicyState), moving)
        await s.flush()


async def _write_findings(s: AsyncSession, cycle: CycleWrite) -> None:
    inserts: list[dict[str, Any]] = []
    updates: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    for change in cycle.changes:
        values = _finding_values(change.finding)
        if change.previous is None:
            inserts.append(values)
        else:
            updates.append(values)
        if change.kind is not Transition.PERSISTING:
            events.append({"fingerprint": change.finding.fingerprint, "disk_id": change.finding.disk_id,
                           "run_id": cycle.run_id, "at": cycle.now, "kind": change.kind.value})
    for chunk in _chunks(inserts):
        s.add_all(FindingRow(**v) for v in chunk)
    await s.flush()
    if updates:
        await s.execute(update(FindingRow), updates)
    if events:
        s.add_all(FindingEvent(**e) for e in events)
    await s.flush()


async def _write_history(s: AsyncSession, cycle: CycleWrite) -> None:
    """Writes the run's summary row and each disk's verdict by change (a chunk of disks at a time)."""
    now = cycle.now
    counts = {"compliant": 0, "waived": 0, "noncompliant": 0, "unknown": 0, "exempt": 0}
    for status in cycle.disk_statuses.values():
        counts[status] = counts.get(status, 0) + 1
    finished = cycle.finished_at or now
    s.add(RunSummary(run_id=cycle.run_id, started_at=now, finished_at=finished, status=cycle.status.value,
                     disks_total=len(cycle.disk_statuses),
                     # As in the report: a disk whose findings are all waived is compliant.
                     disks_compliant=counts["compliant"] + counts["waived"],
                     disks_noncompliant=counts["noncompliant"], disks_unknown=counts["unknown"],
                     disks_exempt=counts["exempt"], open_by_severity=dict(cycle.open_by_severity),
                     open_by_rule=dict(cycle.open_by_rule),
                     requests=cycle.stats.requests,
                     duration_seconds=max((finished - now).total_seconds(), 0.0)))
    ids = sorted(cycle.disk_statuses)
    for chunk in _chunks(ids):
        current = {r.disk_id: r for r in (await s.execute(select(DiskState).where(
            DiskState.valid_to.is_(None), DiskState.disk_id.in_(chunk)))).scalars()}
        for disk_id in chunk:
            status = cycle.disk_statuses[disk_id]
            row = current.get(disk_id)
            if row is not None and row.status == status:
                continue
            if row is not None:
                row.valid_to = now
            s.add(DiskState(disk_id=disk_id, status=status, valid_from=now, valid_to=None, run_id=cycle.run_id))
        await s.flush()
    for chunk in _chunks(sorted(cycle.retired_disks)):
        # A disk no longer audited has no verdict from now on (not "compliant until further notice").
        await s.execute(update(DiskState).where(DiskState.valid_to.is_(None), DiskState.disk_id.in_(chunk))
                        .values(valid_to=now).execution_options(synchronize_session=False))
    await s.flush()
