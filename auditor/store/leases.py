"""Leases: one cycle writer per database, one leader among replicas.

A lease is a row (`leases.name` = "cycle" or "leader") naming its holder and an expiry the holder renews. It is
taken and renewed with conditional statements only — an INSERT that fails on the primary key, or an UPDATE whose
WHERE compares the holder and expiry it read (compare-and-set) and whose row count says who won. Both databases
make such a statement atomic (PostgreSQL re-checks the WHERE after waiting on the row lock; SQLite has one
writer), so no `BEGIN IMMEDIATE` or advisory lock is needed and the same code runs on both.

Every holding of a lease is a term with an epoch, a number that only grows (a released lease keeps its row, expired),
so what a holder started under one term is refused once the lease moved on (`renew` is the fence).

A lease whose expiry passed, or whose holder is a process on this host that no longer exists, may be taken over.
Expiry compares the holders' clocks: hosts need NTP (skew well under `daemon.leader_ttl`).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import update
from sqlalchemy.engine import Connection

from auditor.store import queries
from auditor.store.holders import CYCLE, LEADER, Holder, Lease, Term
from auditor.store.statements import insert_if_absent, rowcount
from auditor.store.tables import leases

if TYPE_CHECKING:
    from auditor.store.repo import Store

__all__ = ["ACQUIRE_ATTEMPTS", "CYCLE", "LEADER", "Holder", "Lease", "Leases", "Term", "renew"]

ACQUIRE_ATTEMPTS = 3  # decisions on a freshly read row after a lost compare-and-set


def create(conn: Connection, name: str, values: dict[str, Any], *, now: datetime) -> int:
    """Creates the lease row (epoch 1) unless one exists; returns the row count (1 when created)."""
    return insert_if_absent(conn, leases, {"name": name, "acquired_at": now, "epoch": 1, **values})


def take(conn: Connection, name: str, seen: Lease, values: dict[str, Any], *, acquired_at: datetime,
         epoch: int) -> int:
    """Takes the lease if it is still as `seen` (compare-and-set), under `epoch`; returns the row count."""
    r = conn.execute(update(leases).where(leases.c.name == name, leases.c.holder == seen.holder,
                                          leases.c.expires_at == seen.expires_at, leases.c.epoch == seen.epoch)
                     .values(acquired_at=acquired_at, epoch=epoch, **values))
    return rowcount(r)


def renew(conn: Connection, term: Term, *, now: datetime, ttl: timedelta) -> int:
    """Extends our lease inside the caller's transaction; returns the row count (1 while the term holds).

    The term holds while the row still names its holder and epoch and has not expired. An expired lease is never
    renewed by its old holder, taken by another process or not: a process that was paused (SIGSTOP, a long GC, a
    frozen VM) past its expiry may have been replaced meanwhile, so it must take the lease anew (a new epoch,
    `Leases.acquire`) before it acts again, and what it started under the old epoch stays refused. Inside a
    transaction this is the fence: on PostgreSQL the updated row stays locked until the commit, so a contender's
    takeover waits for it and then finds it renewed.
    """
    r = conn.execute(update(leases).where(leases.c.name == term.name, leases.c.holder == term.holder,
                                          leases.c.epoch == term.epoch, leases.c.expires_at > now)
                     .values(expires_at=now + ttl))
    return rowcount(r)


def release(conn: Connection, term: Term, *, now: datetime) -> None:
    """Ends our term: the row stays (so its epoch never goes back), expired from `now` on."""
    conn.execute(update(leases).where(leases.c.name == term.name, leases.c.holder == term.holder,
                                      leases.c.epoch == term.epoch, leases.c.expires_at > now)
                 .values(expires_at=now))


class Leases:
    """Takes, renews and releases named leases on a Store's database."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def get(self, name: str) -> Lease | None:
        """Returns the lease row, live or not."""
        return await self.store.read(queries.lease, name)

    async def acquire(self, name: str, holder: Holder, *, now: datetime, ttl: timedelta,
                      run_id: str | None = None) -> tuple[bool, Lease | None]:
        """Takes (or keeps) the lease; returns (taken, the lease as it stands, ours or the other holder's).

        Keeping our own live lease keeps its epoch; any other taking (a first holding, a takeover, or taking back
        our own expired lease) starts a new term under the next epoch.

        A lost compare-and-set means the row changed since it was read (renewed, released or taken): the decision
        is made again on the new row, a few times, rather than reporting a holder that may already be gone.
        """
        values = {"holder": holder.id, "host": holder.host, "pid": holder.pid,
                  "process_started_at": holder.started_at, "expires_at": now + ttl, "run_id": run_id}
        current = await self.get(name)
        for _ in range(ACQUIRE_ATTEMPTS):
            if current is None:
                won = await self.store.write(create, name, values, now=now) == 1
            elif current.holder != holder.id and current.is_live(now):
                return False, current
            else:
                # Our own live lease is kept; an expired one taken back starts a new term (the pause may have
                # seen another holder come and go).
                ours = current.holder == holder.id and current.is_live(now)
                acquired_at, epoch = (current.acquired_at, current.epoch) if ours else (now, current.epoch + 1)
                won = await self.store.write(take, name, current, values, acquired_at=acquired_at,
                                             epoch=epoch) == 1
            current = await self.get(name)
            if won:
                return True, current
        return False, current

    async def renew(self, term: Term, *, now: datetime, ttl: timedelta) -> bool:
        """Extends our lease; False when the term is over (expired, taken, released or taken again)."""
        return await self.store.write(renew, term, now=now, ttl=ttl) == 1

    async def release(self, term: Term, *, now: datetime) -> None:
        """Gives the lease up if the term still holds."""
        await self.store.write(release, term, now=now)
