"""Leases: one cycle writer per database, one leader among replicas.

A lease is a row (`leases.name` = "cycle" or "leader") naming its holder and an expiry the holder renews. It is
taken and renewed with conditional statements only — an INSERT that fails on the primary key, or an UPDATE whose
WHERE compares the holder and expiry it read (compare-and-set) and whose row count says who won. Both databases
make such a statement atomic (PostgreSQL re-checks the WHERE after waiting on the row lock; SQLite has one
writer), so no `BEGIN IMMEDIATE` or advisory lock is needed and the same code runs on both.

A lease whose expiry passed, or whose holder is a process on this host that no longer exists, may be taken over.
Expiry compares the holders' clocks: hosts need NTP (skew well under `daemon.leader_ttl`).
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import delete, select, update
from sqlalchemy import inspect as sa_inspect

# The ORM (tables, AsyncSession) and the dialects' INSERTs are imported where they are used: the read-only report
# (auditor.store.reads) uses `Lease` and `CYCLE` from here with SQLAlchemy Core only.
if TYPE_CHECKING:  # repo imports this module for the fence; the Store is only a type here
    from sqlalchemy.ext.asyncio import AsyncSession

    from auditor.store.repo import Store
    from auditor.store.tables import Base, LeaseRow

CYCLE = "cycle"
LEADER = "leader"
ACQUIRE_ATTEMPTS = 3  # decisions on a freshly read row after a lost compare-and-set


def _boot_time() -> float | None:
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def process_started_at(pid: int) -> datetime | None:
    """Returns when process `pid` started (from /proc), or None where that cannot be read."""
    boot = _boot_time()
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            stat = fh.read()
    except OSError:
        return None
    if boot is None:
        return None
    # Field 22 (starttime, in clock ticks since boot) comes after the parenthesised command name.
    fields = stat.rsplit(")", 1)[-1].split()
    try:
        ticks = int(fields[19])
    except (IndexError, ValueError):
        return None
    return datetime.fromtimestamp(boot + ticks / os.sysconf("SC_CLK_TCK"), UTC)


def is_process_gone(host: str, pid: int, started_at: datetime) -> bool:
    """Returns True only when the holder is certainly gone: same host, and no such process (or a reused pid)."""
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # exists, owned by someone else
        pass
    actual = process_started_at(pid)
    # A different start time means the pid was reused by another process.
    return actual is not None and abs((actual - started_at).total_seconds()) > 2


@dataclass(frozen=True, slots=True)
class Holder:
    """This process as a lease holder: host, pid, process start time and a nonce (one per process)."""

    id: str
    host: str
    pid: int
    started_at: datetime

    @classmethod
    def current(cls) -> Holder:
        """Returns a holder for this process."""
        host = socket.gethostname()
        pid = os.getpid()
        started = process_started_at(pid) or datetime.now(UTC)
        return cls(f"{host[:60]}:{pid}:{uuid.uuid4().hex[:12]}", host, pid, started)

    def describe(self) -> str:
        """Returns 'host pid N' for messages."""
        return f"{self.host} pid {self.pid}"


@dataclass(frozen=True, slots=True)
class Lease:
    """A lease row as read."""

    name: str
    holder: str
    host: str
    pid: int
    process_started_at: datetime
    acquired_at: datetime
    expires_at: datetime
    run_id: str | None

    def is_live(self, now: datetime) -> bool:
        """Returns whether the holder still owns it: not expired, and not a process known to be gone."""
        return self.expires_at > now and not is_process_gone(self.host, self.pid, self.process_started_at)

    def describe(self) -> str:
        """Returns 'host pid N since T' for messages."""
        return f"{self.host} pid {self.pid} since {self.acquired_at.isoformat(timespec='seconds')}"


def _lease(row: LeaseRow) -> Lease:
    return Lease(row.name, row.holder, row.host, row.pid, row.process_started_at, row.acquired_at, row.expires_at,
                 row.run_id)


class Leases:
    """Takes, renews, fences and releases named leases on a Store's database."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def get(self, name: str) -> Lease | None:
        """Returns the lease row, live or not."""
        from auditor.store.tables import LeaseRow

        async def go(s: AsyncSession) -> Lease | None:
            row = await s.get(LeaseRow, name)
            return _lease(row) if row else None

        result: Lease | None = await self.store._read(go)
        return result

    async def acquire(self, name: str, holder: Holder, *, now: datetime, ttl: timedelta,
                      run_id: str | None = None) -> tuple[bool, Lease | None]:
        """Takes (or keeps) the lease; returns (taken, the lease as it stands, ours or the other holder's).

        A lost compare-and-set means the row changed since it was read (renewed, released or taken): the decision
        is made again on the new row, a few times, rather than reporting a holder that may already be gone.
        """
        from auditor.store.tables import LeaseRow

        values = {"holder": holder.id, "host": holder.host, "pid": holder.pid,
                  "process_started_at": holder.started_at, "expires_at": now + ttl, "run_id": run_id}
        current = await self.get(name)
        for _ in range(ACQUIRE_ATTEMPTS):
            if current is None:

                async def create(s: AsyncSession) -> int:
                    return await insert_if_absent(s, LeaseRow, {"name": name, "acquired_at": now, **values})

                won = await self.store._write(create) == 1
            elif current.holder != holder.id and current.is_live(now):
                return False, current
            else:
                seen = current
                acquired_at = seen.acquired_at if seen.holder == holder.id else now

                async def take(s: AsyncSession, seen: Lease = seen, acquired_at: datetime = acquired_at) -> int:
                    # Compare-and-set on what was read: of several contenders for an expired lease, one wins.
                    r = await s.execute(update(LeaseRow).where(
                        LeaseRow.name == name, LeaseRow.holder == seen.holder,
                        LeaseRow.expires_at == seen.expires_at).values(acquired_at=acquired_at, **values))
                    return int(getattr(r, "rowcount", 0) or 0)

                won = await self.store._write(take) == 1
            current = await self.get(name)
            if won:
                return True, current
        return False, current

    async def renew(self, name: str, holder: Holder, *, now: datetime, ttl: timedelta) -> bool:
        """Extends our lease; False when it is no longer ours (expired and taken, or released)."""

        async def go(s: AsyncSession) -> int:
            return await renew_in(s, name, holder, now=now, ttl=ttl)

        result: int = await self.store._write(go)
        return result == 1

    async def release(self, name: str, holder: Holder) -> None:
        """Gives the lease up if it is still ours."""
        from auditor.store.tables import LeaseRow

        async def go(s: AsyncSession) -> None:
            await s.execute(delete(LeaseRow).where(LeaseRow.name == name, LeaseRow.holder == holder.id))

        await self.store._write(go)


async def renew_in(s: AsyncSession, name: str, holder: Holder, *, now: datetime, ttl: timedelta) -> int:
    """Extends our lease inside the caller's transaction; returns the row count (1 when it is still ours).

    Inside a cycle's commit this is the fence: on PostgreSQL the updated row stays locked until the commit, so a
    contender's takeover waits for it and then finds the lease renewed.
    """
    from auditor.store.tables import LeaseRow

    r = await s.execute(update(LeaseRow).where(LeaseRow.name == name, LeaseRow.holder == holder.id)
                        .values(expires_at=now + ttl))
    return int(getattr(r, "rowcount", 0) or 0)


async def insert_if_absent(s: AsyncSession, table: type[Base], values: dict[str, object]) -> int:
    """Inserts a row unless its primary key exists (ON CONFLICT DO NOTHING); returns the row count."""
    from sqlalchemy.dialects.postgresql import insert as pg_insert
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    dialect = s.get_bind().dialect.name
    stmt = (pg_insert(table) if dialect == "postgresql" else sqlite_insert(table)).values(**values)
    key = next(iter(sa_inspect(table).primary_key))
    # RETURNING, not rowcount: psycopg reports no row count for INSERT … ON CONFLICT through SQLAlchemy.
    r = await s.execute(stmt.on_conflict_do_nothing().returning(key))
    return 1 if r.first() is not None else 0


async def read_in(s: AsyncSession, name: str) -> Lease | None:
    """Returns the lease row inside the caller's transaction."""
    from auditor.store.tables import LeaseRow

    row = (await s.execute(select(LeaseRow).where(LeaseRow.name == name))).scalar_one_or_none()
    return _lease(row) if row else None
