"""The durable alert outbox: claiming due entries and recording each attempt's outcome.

Entries are written in the same transaction as the finding changes that cause them (`writes.enqueue`), then claimed
and delivered. A claim is a compare-and-set `UPDATE` checked by row count, so two deliverers never send the same
entry; a claim left by a crashed process expires and exactly one deliverer retries it with the same id (the
`Idempotency-Key`; PagerDuty `dedup_key`), so a send cut mid-flight is repeated, never renamed. In a daemon the
claims carry the leader's epoch: when the leader changes, the new one takes over the old one's claims at once.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import update
from sqlalchemy.engine import Connection

from auditor.domain.alerts import Delivery, DeliveryState
from auditor.store import queries
from auditor.store.holders import Term
from auditor.store.statements import rowcount
from auditor.store.tables import outbox

if TYPE_CHECKING:
    from auditor.store.repo import Store

# A claim made outside the leadership (`audit --once`), or before claims carried an epoch, is taken over after this.
CLAIM_TIMEOUT = timedelta(minutes=5)


def claim_due(conn: Connection, *, now: datetime, worker: str, limit: int, term: Term | None) -> list[Delivery]:
    """Claims up to `limit` due entries (pending and due, or claimed by a deliverer whose claim is over).

    Under a leader `term`, every claim made under an older epoch is over at once (that leader was deposed or is
    gone), and the claim itself is refused in the same statement once `term` no longer holds. A claim is a
    compare-and-set on the (state, claimed_by, claimed_at, claim_epoch) the deliverer read, checked by row count,
    so of two deliverers reclaiming one stale entry exactly one wins.
    """
    o = outbox.c
    claimed: list[str] = []
    epoch = term.epoch if term is not None else None
    for entry_id, state, claimed_by, claimed_at, claim_epoch in queries.due_deliveries(
            conn, now=now, stale_before=now - CLAIM_TIMEOUT, epoch=epoch, limit=limit):
        q = update(outbox).where(o.id == entry_id, o.state == state, _is(o.claimed_by, claimed_by),
                                 _is(o.claimed_at, claimed_at), _is(o.claim_epoch, claim_epoch))
        if term is not None:
            q = q.where(queries.term_holds(term, now=now))
        r = conn.execute(q.values(state=DeliveryState.DELIVERING.value, claimed_by=worker, claimed_at=now,
                                  claim_epoch=epoch))
        if rowcount(r) == 1:
            claimed.append(entry_id)
    return queries.deliveries_by_id(conn, claimed) if claimed else []


def _is(column: Any, value: Any) -> Any:
    return column.is_(None) if value is None else column == value


def set_outcome(conn: Connection, entry_id: str, worker: str | None, values: dict[str, Any], *,
                term: Term | None = None, now: datetime | None = None) -> int:
    """Records an attempt's outcome on an entry, only if `worker` still holds its claim and, under a leader
    `term`, only while that term holds (checked in the same statement); returns the row count."""
    q = update(outbox).where(outbox.c.id == entry_id)
    if worker is not None:  # only the deliverer that holds the claim records its outcome
        q = q.where(outbox.c.claimed_by == worker)
    if term is not None:
        assert now is not None
        q = q.where(outbox.c.claim_epoch == term.epoch, queries.term_holds(term, now=now))
    return rowcount(conn.execute(q.values(**values)))


class Outbox:
    """Outbox delivery bookkeeping on a Store's database."""

    def __init__(self, store: Store, clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.store = store
        self.clock = clock  # when a leader term is checked

    async def claim_due(self, *, now: datetime, worker: str, limit: int = 100,
                        term: Term | None = None) -> list[Delivery]:
        """Claims up to `limit` due entries (see `claim_due`)."""
        return await self.store.write(claim_due, now=now, worker=worker, limit=limit, term=term)

    async def recent(self, *, limit: int = 50, state: str | None = None) -> list[Delivery]:
        """Returns recent outbox entries, newest first."""
        return await self.store.read(queries.deliveries, limit=limit, state=state)

    async def counts(self) -> list[tuple[str, str, int]]:
        """Returns (notifier, state, count) for metrics."""
        return await self.store.read(queries.delivery_counts)

    async def pending_count(self, *, run_id: str | None = None) -> int:
        """Returns how many entries are not yet delivered or given up (optionally of one run)."""
        return await self.store.read(queries.undelivered_count, run_id=run_id)

    async def mark_delivered(self, entry_id: str, *, now: datetime, status: int | None, detail: str,
                             worker: str | None = None, term: Term | None = None) -> bool:
        """Records a successful delivery; False if the claim was no longer this worker's (or its term is over)."""
        return await self._set(entry_id, worker, term, state=DeliveryState.DELIVERED.value, delivered_at=now,
                               last_status=status, last_error=None, attempts=outbox.c.attempts + 1,
                               claimed_by=None, claim_epoch=None)

    async def mark_retry(self, entry_id: str, *, next_at: datetime, status: int | None, error: str,
                         worker: str | None = None, term: Term | None = None) -> bool:
        """Records a failed attempt that will be retried at `next_at`."""
        return await self._set(entry_id, worker, term, state=DeliveryState.PENDING.value, next_attempt_at=next_at,
                               last_status=status, last_error=error[:1000], attempts=outbox.c.attempts + 1,
                               claimed_by=None, claim_epoch=None)

    async def release(self, entry_id: str, *, next_at: datetime, worker: str | None = None,
                      term: Term | None = None) -> bool:
        """Puts a claimed entry back untried, due at `next_at`."""
        return await self._set(entry_id, worker, term, state=DeliveryState.PENDING.value, next_attempt_at=next_at,
                               claimed_by=None, claim_epoch=None)

    async def mark_failed(self, entry_id: str, *, status: int | None, error: str, worker: str | None = None,
                          term: Term | None = None) -> bool:
        """Records that delivery was given up (a permanent error or too many attempts)."""
        return await self._set(entry_id, worker, term, state=DeliveryState.FAILED.value, last_status=status,
                               last_error=error[:1000], attempts=outbox.c.attempts + 1, claimed_by=None,
                               claim_epoch=None)

    async def _set(self, entry_id: str, worker: str | None, term: Term | None, **values: Any) -> bool:
        return await self.store.write(set_outcome, entry_id, worker, values, term=term,
                                      now=self.clock() if term is not None else None) == 1
