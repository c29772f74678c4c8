"""The durable alert outbox and per-notifier alert state.

Entries are written in the same transaction as the finding changes that cause them (see `Store.commit_cycle`),
then claimed and delivered. A claim is an atomic `UPDATE … WHERE state = 'pending'` checked by row count, so two
deliverers never send the same entry; a claim left by a crashed process expires and the entry is retried
(receivers dedup on the entry id / PagerDuty `dedup_key`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from auditor.domain.alerts import (
    AlertState,
    AlertStatus,
    Delivery,
    DeliveryState,
    OutboxEntry,
    notification_from_dict,
    notification_to_dict,
)
from auditor.store.repo import Store
from auditor.store.tables import AlertStateRow, OutboxRow

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


async def write_outbox(
    s: AsyncSession, entries: Sequence[OutboxEntry], states: Sequence[AlertState | tuple[str, str]],
    *, run_id: str | None, now: datetime,
) -> None:
    """Adds outbox entries and applies alert-state changes inside the caller's transaction.

    A `(notifier, fingerprint)` tuple in `states` deletes that state (the channel should forget the alert).
    """
    for e in entries:
        n = e.notification
        s.add(OutboxRow(id=n.id, notifier=n.notifier, group_key=n.group_key, kind=e.kind,
                        payload=notification_to_dict(n), run_id=run_id, created_at=now, state="pending",
                        attempts=0, next_attempt_at=now, claimed_by=None, claimed_at=None, delivered_at=None,
                        last_status=None, last_error=None))
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


class Outbox:
    """Outbox reads and delivery bookkeeping on a Store's database."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def enqueue(self, entries: Sequence[OutboxEntry], states: Sequence[AlertState | tuple[str, str]],
                      *, run_id: str | None, now: datetime) -> None:
        """Writes entries and state changes in their own transaction (used outside a cycle)."""

        async def go(s: AsyncSession) -> None:
            await write_outbox(s, entries, states, run_id=run_id, now=now)

        await self.store._write(go)

    def writer(self, entries: Sequence[OutboxEntry], states: Sequence[AlertState | tuple[str, str]],
               *, run_id: str | None, now: datetime) -> Callable[[AsyncSession], Awaitable[None]]:
        """Returns the step that writes entries and states inside another transaction (`commit_cycle(extra=…)`)."""

        async def go(s: AsyncSession) -> None:
            await write_outbox(s, entries, states, run_id=run_id, now=now)

        return go

    async def alert_states(self) -> dict[tuple[str, str], AlertState]:
        """Returns every notifier's alert states by (notifier, fingerprint)."""

        async def go(s: AsyncSession) -> dict[tuple[str, str], AlertState]:
            rows = (await s.execute(select(AlertStateRow))).scalars()
            return {(r.notifier, r.fingerprint): AlertState(r.notifier, r.fingerprint, AlertStatus(r.status),
                                                            r.last_sent_at, r.starts_at) for r in rows}

        result: dict[tuple[str, str], AlertState] = await self.store._read(go)
        return result

    async def claim_due(self, *, now: datetime, worker: str, limit: int = 100) -> list[Delivery]:
        """Claims up to `limit` due entries (pending and due, or claimed by a deliverer that vanished)."""

        async def go(s: AsyncSession) -> list[Delivery]:
            due = or_(
                and_(OutboxRow.state == DeliveryState.PENDING.value, OutboxRow.next_attempt_at <= now),
                and_(OutboxRow.state == DeliveryState.DELIVERING.value, OutboxRow.claimed_at < now - CLAIM_TIMEOUT),
            )
            q = select(OutboxRow.id, OutboxRow.state).where(due).order_by(OutboxRow.created_at, OutboxRow.id)
            candidates = (await s.execute(q.limit(limit))).all()
            claimed: list[str] = []
            for entry_id, state in candidates:
                # Atomic claim: only one deliverer's UPDATE matches the state it read.
                r = await s.execute(
                    update(OutboxRow)
                    .where(OutboxRow.id == entry_id, OutboxRow.state == state)
                    .values(state=DeliveryState.DELIVERING.value, claimed_by=worker, claimed_at=now)
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

    async def mark_delivered(self, entry_id: str, *, now: datetime, status: int | None, detail: str) -> None:
        """Records a successful delivery."""
        await self._set(entry_id, state=DeliveryState.DELIVERED.value, delivered_at=now, last_status=status,
                        last_error=None, attempts=OutboxRow.attempts + 1, claimed_by=None)

    async def mark_retry(self, entry_id: str, *, next_at: datetime, status: int | None, error: str) -> None:
        """Records a failed attempt that will be retried at `next_at`."""
        await self._set(entry_id, state=DeliveryState.PENDING.value, next_attempt_at=next_at, last_status=status,
                        last_error=error[:1000], attempts=OutboxRow.attempts + 1, claimed_by=None)

    async def release(self, entry_id: str, *, next_at: datetime) -> None:
        """Puts a claimed entry back untried, due at `next_at`."""
        await self._set(entry_id, state=DeliveryState.PENDING.value, next_attempt_at=next_at, claimed_by=None)

    async def mark_failed(self, entry_id: str, *, status: int | None, error: str) -> None:
        """Records that delivery was given up (a permanent error or too many attempts)."""
        await self._set(entry_id, state=DeliveryState.FAILED.value, last_status=status, last_error=error[:1000],
                        attempts=OutboxRow.attempts + 1, claimed_by=None)

    async def _set(self, entry_id: str, **values: Any) -> None:
        async def go(s: AsyncSession) -> None:
            await s.execute(update(OutboxRow).where(OutboxRow.id == entry_id).values(**values))

        await self.store._write(go)

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
