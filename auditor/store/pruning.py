"""Pruning of history older than `[history] keep`, in batches of one transaction each."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, delete, exists
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import ColumnElement

from auditor.domain.alerts import DeliveryState
from auditor.domain.lifecycle import Transition
from auditor.domain.records import RunStatus
from auditor.store import queries
from auditor.store.queries import chunks
from auditor.store.tables import (
    disk_states,
    drift_events,
    finding_events,
    invocations,
    outbox,
    policy_states,
    remediations,
    run_summaries,
    runs,
)

if TYPE_CHECKING:
    from auditor.store.repo import Store

PRUNE_BATCH = 5000  # ids selected per transaction; deleted CHUNK at a time (SQLite's bound-parameter limit)


def _plans(before: datetime, kept: list[str]) -> list[tuple[str, Any, Any, ColumnElement[bool]]]:
    """Returns (table name, table, key column, condition) of what is deleted, in order."""
    resolved = finding_events.alias("resolved")
    e = finding_events.c
    return [
        ("run_summaries", run_summaries, run_summaries.c.run_id,
         and_(run_summaries.c.started_at < before, run_summaries.c.run_id.not_in(kept))),
        ("disk_states", disk_states, disk_states.c.id,
         and_(disk_states.c.valid_to.is_not(None), disk_states.c.valid_to < before)),
        ("finding_events", finding_events, e.id, and_(e.at < before, exists().where(
            resolved.c.fingerprint == e.fingerprint, resolved.c.kind == Transition.RESOLVED.value,
            resolved.c.at >= e.at, resolved.c.at < before))),
        ("drift_events", drift_events, drift_events.c.id, drift_events.c.at < before),
        ("policy_states", policy_states, policy_states.c.id,
         and_(policy_states.c.valid_to.is_not(None), policy_states.c.valid_to < before)),
        ("audit_runs", runs, runs.c.id,
         and_(runs.c.started_at < before, runs.c.status != RunStatus.RUNNING.value, runs.c.id.not_in(kept))),
        # Observed runs are kept in epoch seconds; a policy's latest two live on in its schedule (`policy_schedules`).
        ("invocations", invocations, invocations.c.id, invocations.c.due_at < int(before.timestamp())),
        ("outbox", outbox, outbox.c.id,
         and_(outbox.c.state.in_([DeliveryState.DELIVERED.value, DeliveryState.FAILED.value]),
              outbox.c.created_at < before)),
        # An attempt's rows share its id and time; one left at `intent` is kept for the next apply to settle.
        ("remediations", remediations, remediations.c.attempt_id,
         and_(remediations.c.requested_at < before, remediations.c.status != "intent")),
    ]


def delete_batch(conn: Connection, table: Any, key: Any, condition: ColumnElement[bool], *, after: Any,
                 limit: int) -> list[Any]:
    """Deletes up to `limit` rows matching `condition` after key `after` (keyset: never rescanning); returns their
    keys."""
    ids = queries.keys_where(conn, key, condition, after=after, limit=limit)
    for chunk in chunks(ids):
        conn.execute(delete(table).where(key.in_(chunk)))
    return ids


async def delete_history_before(store: Store, before: datetime, *, batch: int = PRUNE_BATCH) -> dict[str, int]:
    """Deletes history older than `before` in batches (one transaction each); returns rows deleted per table.

    Deleted: run summaries and runs polled before it (never the latest run, the latest complete or partial run, or
    a running one), verdict intervals and policy states closed before it, drift events and observed runs due before
    it, finding events of episodes resolved before it (an open, waived or later-resolved finding keeps its whole
    episode, so its age and time to resolve stay known), delivered or failed notifications created before it, and
    remediation attempts requested before it (except one whose outcome is still unknown). Never touched:
    findings, disks, current verdicts and policy states, policy schedules, pending notifications, alert states,
    leases.
    """
    kept = await store.read(queries.runs_to_keep)
    counts: dict[str, int] = {}
    for name, table, key, condition in _plans(before, kept):
        counts[name] = 0
        last: Any = None
        while True:
            ids = await store.write(delete_batch, table, key, condition, after=last, limit=batch)
            counts[name] += len(ids)
            if len(ids) < batch:
                break
            last = ids[-1]
    return counts
