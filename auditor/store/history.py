"""History reads for period reports, and pruning of history older than `[history] keep`.

Reads are a few set-based queries in one session (never one per disk): the polls of the runs, the verdict
intervals that overlap the period (with the disks' names), and the findings' lifecycle events up to its end.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, delete, exists, or_, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute, aliased
from sqlalchemy.sql.elements import ColumnElement

from auditor.domain.periods import LifecycleEvent, Verdict
from auditor.domain.records import RunRecord, RunStatus
from auditor.store.reads import _run
from auditor.store.repo import CHUNK, Store, _chunks
from auditor.store.tables import (
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

PRUNE_BATCH = 5000  # ids selected per transaction; deleted CHUNK at a time (SQLite's bound-parameter limit)


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


async def load_period(store: Store, *, start: datetime, end: datetime, lookback: datetime) -> PeriodData:
    """Returns the runs polled in [lookback, end), the verdicts overlapping [start, end) and the lifecycle events
    before `end` (ordered by finding and time), read in one session."""

    async def go(s: AsyncSession) -> PeriodData:
        polls = [Poll(at, status) for at, status in (await s.execute(
            select(Run.started_at, Run.status).where(Run.started_at >= lookback, Run.started_at < end)
            .order_by(Run.started_at, Run.seq))).all()]
        rows = (await s.execute(
            select(DiskState.disk_id, DiskState.status, DiskState.valid_from, DiskState.valid_to, DiskRow.name)
            .outerjoin(DiskRow, DiskRow.id == DiskState.disk_id)
            .where(DiskState.valid_from < end, or_(DiskState.valid_to.is_(None), DiskState.valid_to > start))
            .order_by(DiskState.disk_id, DiskState.valid_from, DiskState.id))).all()
        verdicts = [Verdict(disk_id, status, valid_from, valid_to) for disk_id, status, valid_from, valid_to, _ in rows]
        names = {row[0]: row[4] for row in rows}
        events = [LifecycleEvent(fp, rule, disk_id, policy_id, at, kind) for fp, rule, disk_id, policy_id, at, kind in
                  (await s.execute(
                      select(FindingEvent.fingerprint, FindingRow.rule, FindingRow.disk_id, FindingRow.policy_id,
                             FindingEvent.at, FindingEvent.kind)
                      .join(FindingRow, FindingRow.fingerprint == FindingEvent.fingerprint)
                      .where(FindingEvent.at < end)
                      .order_by(FindingEvent.fingerprint, FindingEvent.at, FindingEvent.id))).all()]
        return PeriodData(polls, verdicts, names, events)

    result: PeriodData = await store._read(go)
    return result


async def runs_between(store: Store, *, start: datetime, end: datetime) -> list[RunRecord]:
    """Returns the runs polled in [start, end), oldest first (ties by run number)."""

    async def go(s: AsyncSession) -> list[RunRecord]:
        q = select(Run).where(Run.started_at >= start, Run.started_at < end).order_by(Run.started_at, Run.seq)
        return [_run(r) for r in (await s.execute(q)).scalars()]

    result: list[RunRecord] = await store._read(go)
    return result


async def prune_history(store: Store, before: datetime, *, batch: int = PRUNE_BATCH) -> dict[str, int]:
    """Deletes history older than `before` in batches (one transaction each); returns rows deleted per table.

    Deleted: run summaries and runs polled before it (never the latest run, the latest complete or partial run, or
    a running one), verdict intervals and policy states closed before it, drift events before it, finding events
    of episodes resolved before it (an open, waived or later-resolved finding keeps its whole episode, so its age
    and time to resolve stay known), and delivered or failed notifications created before it. Never touched:
    findings, disks, current verdicts and policy states, pending notifications, alert states, leases.
    """

    async def keep_runs(s: AsyncSession) -> list[str]:
        latest = (await s.execute(select(Run.id).order_by(Run.seq.desc()).limit(1))).scalar_one_or_none()
        good = (await s.execute(select(Run.id).where(Run.status.in_([RunStatus.COMPLETE.value,
                                                                     RunStatus.PARTIAL.value]))
                                .order_by(Run.seq.desc()).limit(1))).scalar_one_or_none()
        return sorted({r for r in (latest, good) if r is not None})

    kept: list[str] = await store._read(keep_runs)
    resolved = aliased(FindingEvent)
    plans: list[tuple[str, Any, InstrumentedAttribute[Any], ColumnElement[bool]]] = [
        ("run_summaries", RunSummary, RunSummary.run_id,
         and_(RunSummary.started_at < before, RunSummary.run_id.not_in(kept))),
        ("disk_states", DiskState, DiskState.id, and_(DiskState.valid_to.is_not(None), DiskState.valid_to < before)),
        ("finding_events", FindingEvent, FindingEvent.id, and_(FindingEvent.at < before, exists().where(
            resolved.fingerprint == FindingEvent.fingerprint, resolved.kind == "resolved",
            resolved.at >= FindingEvent.at, resolved.at < before))),
        ("drift_events", DriftEvent, DriftEvent.id, DriftEvent.at < before),
        ("policy_states", PolicyState, PolicyState.id,
         and_(PolicyState.valid_to.is_not(None), PolicyState.valid_to < before)),
        ("audit_runs", Run, Run.id, and_(Run.started_at < before, Run.status != RunStatus.RUNNING.value,
                                         Run.id.not_in(kept))),
        ("outbox", OutboxRow, OutboxRow.id, and_(OutboxRow.state.in_(["delivered", "failed"]),
                                                 OutboxRow.created_at < before)),
    ]
    counts: dict[str, int] = {}
    for name, table, key, condition in plans:
        counts[name] = 0
        last: Any = None
        while True:

            async def step(s: AsyncSession, key: Any = key, condition: Any = condition, table: Any = table,
                           last: Any = last) -> list[Any]:
                # Keyset over the primary key: each batch goes on where the last stopped, never rescanning.
                q = select(key).where(condition)
                if last is not None:
                    q = q.where(key > last)
                ids = list((await s.execute(q.order_by(key).limit(batch))).scalars())
                for chunk in _chunks(ids, CHUNK):
                    await s.execute(delete(table).where(key.in_(chunk)).execution_options(synchronize_session=False))
                return ids

            ids: list[Any] = await store._write(step)
            counts[name] += len(ids)
            if len(ids) < batch:
                break
            last = ids[-1]
    return counts
