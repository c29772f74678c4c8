"""The durable alert outbox and per-notifier alert state.

Entries are written in the same transaction as the finding changes that cause them (`Transaction.enqueue`),
then claimed and delivered. A claim is a compare-and-set `UPDATE` checked by row count, so two deliverers never
send the same entry; a claim left by a crashed process expires and exactly one deliverer retries it with the same
id (the `Idempotency-Key`; PagerDuty `dedup_key`), so a send cut mid-flight is repeated, never renamed.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from auditor.domain.alerts import (
    AlertState,
    Delivery,
    DeliveryState,
    OutboxEntry,
    notification_from_dict,
)
from auditor.store.repo import Store
from auditor.store.tables import OutboxRow

CLAIM_TIMEOUT = timedelta(minutes=5)


def _delivery(row: OutboxRow) -> Delivery:
    return Delivery(
        id=row.id,
        notifier=row.notifier,
        kind=row.kind,
        state=DeliveryState(row.state),
        attempts=row.attempts,
        created_at=row.created_at,
        next_attempt_at=row.next_attempt_at,
        delivered_at=row.delivered_at,
        last_status=row.last_status,
        last_error=row.last_error,
        notification=notification_from_dict(row.payload),
    )


class Outbox:
    """Outbox reads and delivery bookkeeping on a Store's database."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def enqueue(self, entries: Sequence[OutboxEntry], states: Sequence[AlertState | tuple[str, str]],
                      *, run_id: str | None, now: datetime) -> None:
        """Writes entries and state changes in their own transaction (used outside a cycle)."""
        async with self.store.transaction() as tx:
            await tx.enqueue(entries, states, run_id=run_id, now=now)

    async def claim_due(self, *, now: datetime, worker: str, limit: int = 100) -> list[Delivery]:
        """Claims up to `limit` due entries (pending and due, or claimed by a deliverer that vanished).

        A claim is a compare-and-set on the (state, claimed_by, claimed_at) the deliverer read, checked by row
        count, so of two deliverers reclaiming one stale entry exactly one wins. PostgreSQL also locks the
        candidates with `FOR UPDATE SKIP LOCKED`, so concurrent deliverers take disjoint batches.
        """

        async def go(s: AsyncSession) -> list[Delivery]:
            due = or_(
                and_(OutboxRow.state == DeliveryState.PENDING.value, OutboxRow.next_attempt_at <= now),
                and_(OutboxRow.state == DeliveryState.DELIVERING.value, OutboxRow.claimed_at < now - CLAIM_TIMEOUT),
            )
            q = (select(OutboxRow.id, OutboxRow.state, OutboxRow.claimed_by, OutboxRow.claimed_at).where(due)
                 .order_by(OutboxRow.created_at, OutboxRow.id).limit(limit))
            if s.get_bind().dialect.name == "postgresql":
                q = q.with_for_update(skip_locked=True)
            candidates = (await s.execute(q)).all()
            claimed: list[str] = []
            for entry_id, state, claimed_by, claimed_at in candidates:
                r = await s.execute(
                    update(OutboxRow)
                    .where(OutboxRow.id == entry_id, OutboxRow.state == state,
                           OutboxRow.claimed_by.is_(None) if claimed_by is None else OutboxRow.claimed_by == claimed_by,
                           OutboxRow.claimed_at.is_(None) if claimed_at is None else OutboxRow.claimed_at == claimed_at)
                    .values(state=DeliveryState.DELIVERING.value, claimed_by=worker, claimed_at=now)
                    .execution_options(synchronize_session=False)
                )
                if getattr(r, "rowcount", 0) == 1:
                    claimed.append(entry_id)
            if not claimed:
                return []
            rows = (await s.execute(select(OutboxRow).where(OutboxRow.id.in_(claimed))
                                    .order_by(OutboxRow.created_at, OutboxRow.id))).scalars()
            return [_delivery(r) for r in rows]

        result: list[Delivery] = await self.store._write(go)
        return result

    async def mark_delivered(self, entry_id: str, *, now: datetime, status: int | None, detail: str,
                             worker: str | None = None) -> bool:
        """Records a successful delivery; False if the claim was no longer this worker's."""
        return await self._set(entry_id, worker, state=DeliveryState.DELIVERED.value, delivered_at=now,
                               last_status=status, last_error=None, attempts=OutboxRow.attempts + 1,
                               claimed_by=None)

    async def mark_retry(self, entry_id: str, *, next_at: datetime, status: int | None, error: str,
                         worker: str | None = None) -> bool:
        """Records a failed attempt that will be retried at `next_at`."""
        return await self._set(entry_id, worker, state=DeliveryState.PENDING.value, next_attempt_at=next_at,
                               last_status=status, last_error=error[:1000], attempts=OutboxRow.attempts + 1,
                               claimed_by=None)

    async def release(self, entry_id: str, *, next_at: datetime, worker: str | None = None) -> bool:
        """Puts a claimed entry back untried, due at `next_at`."""
        return await self._set(entry_id, worker, state=DeliveryState.PENDING.value, next_attempt_at=next_at,
                               claimed_by=None)

    async def mark_failed(self, entry_id: str, *, status: int | None, error: str, worker: str | None = None) -> bool:
        """Records that delivery was given up (a permanent error or too many attempts)."""
        return await self._set(entry_id, worker, state=DeliveryState.FAILED.value, last_status=status,
                               last_error=error[:1000], attempts=OutboxRow.attempts + 1, claimed_by=None)

    async def _set(self, entry_id: str, worker: str | None, **values: Any) -> bool:
        async def go(s: AsyncSession) -> int:
            q = update(OutboxRow).where(OutboxRow.id == entry_id)
            if worker is not None:  # only the deliverer that holds the claim records its outcome
                q = q.where(OutboxRow.claimed_by == worker)
            r = await s.execute(q.values(**values).execution_options(synchronize_session=False))
            return int(getattr(r, "rowcount", 0) or 0)

        result: int = await self.store._write(go)
        return result == 1

    async def recent(self, *, limit: int = 50, state: str | None = None) -> list[Delivery]:
        """Returns recent outbox entries, newest first."""

        async def go(s: AsyncSession) -> list[Delivery]:
            q = select(OutboxRow).order_by(OutboxRow.created_at.desc(), OutboxRow.id.desc()).limit(limit)
            if state:
                q = q.where(OutboxRow.state == state)
            return [_delivery(r) for r in (await s.execute(q)).scalars()]

        result: list[Delivery] = await self.store._read(go)
        return result

    async def counts(self) -> list[tuple[str, str, int]]:
        """Returns (notifier, state, count) for metrics."""

        async def go(s: AsyncSession) -> list[tuple[str, str, int]]:
            q = select(OutboxRow.notifier, OutboxRow.state, func.count()).group_by(OutboxRow.notifier,
                                                                                   OutboxRow.state)
            return [(a, b, int(n)) for a, b, n in (await s.execute(q)).all()]

        result: list[tuple[str, str, int]] = await self.store._read(go)
        return result

    async def pending_count(self, *, run_id: str | None = None) -> int:
        """Returns how many entries are not yet delivered or given up (optionally of one run)."""

        async def go(s: AsyncSession) -> int:
            q = select(func.count()).select_from(OutboxRow).where(
                OutboxRow.state.in_([DeliveryState.PENDING.value, DeliveryState.DELIVERING.value]))
            if run_id:
                q = q.where(OutboxRow.run_id == run_id)
            return int((await s.execute(q)).scalar_one())

        result: int = await self.store._read(go)
        return result
