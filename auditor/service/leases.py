"""The leases, as use cases: the cycle lease (one audit cycle at a time across every process on the database)
and the leader lease (one daemon replica runs the schedule and the alert delivery). Both live
`daemon.leader_ttl` unless renewed."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from auditor.errors import LeaseHeldError, StoreError
from auditor.store.leases import CYCLE, LEADER, Lease, Term

if TYPE_CHECKING:
    from auditor.service.services import Services

log = logging.getLogger(__name__)


async def read_cycle_lease(services: Services) -> Lease | None:
    """Returns the cycle lease as it stands (live or not)."""
    return await services.leases.get(CYCLE)


async def check_cycle_lease(services: Services) -> None:
    """Raises LeaseHeldError when another process holds a live cycle lease (a cycle is running there)."""
    lease = await read_cycle_lease(services)
    if lease is not None and lease.holder != services.holder.id and lease.is_live(services.clock()):
        raise LeaseHeldError(f"an audit cycle is running in another process: {lease.describe()}",
                             holder=f"{lease.host} pid {lease.pid}",
                             since=lease.acquired_at.isoformat(timespec="seconds"))


async def take_cycle_lease(services: Services, *, run_id: str, wait: float) -> Term:
    """Takes the cycle lease for `run_id`, trying for up to `wait` seconds; returns the term it is held under.
    LeaseHeldError if it stays held."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max(wait, 0.0)
    ttl = services.settings.daemon.leader_ttl
    while True:
        taken, lease = await services.leases.acquire(CYCLE, services.holder, now=services.clock(), ttl=ttl,
                                                     run_id=run_id)
        if taken and lease is not None:
            return lease.term
        if loop.time() >= deadline:
            raise _held(lease)
        await asyncio.sleep(min(1.0, max(deadline - loop.time(), 0.05)))


async def keep_cycle_lease(services: Services, *, term: Term) -> None:
    """Renews the cycle lease every ttl/3 until cancelled, or until it was lost (then the cycle's commit fails)."""
    ttl = services.settings.daemon.leader_ttl
    while True:
        await asyncio.sleep(ttl.total_seconds() / 3)
        try:
            if not await services.leases.renew(term, now=services.clock(), ttl=ttl):
                log.error("the cycle lease was lost (it expired: this process was paused past it or could not "
                          "renew it, or another process took it): the cycle stops and writes nothing")
                return
        except StoreError as exc:
            log.warning("could not renew the cycle lease: %s", exc)


async def release_cycle_lease(services: Services, *, term: Term) -> None:
    """Releases the cycle lease (a failure is logged: the lease then expires on its own)."""
    try:
        await services.leases.release(term, now=services.clock())
    except StoreError as exc:
        log.warning("could not release the cycle lease (%s); it expires on its own", exc)


async def take_lead(services: Services) -> tuple[bool, Lease | None]:
    """Tries to take the leader lease; returns whether it was taken and the lease as it stands."""
    return await services.leases.acquire(LEADER, services.holder, now=services.clock(),
                                         ttl=services.settings.daemon.leader_ttl)


async def renew_lead(services: Services, *, term: Term) -> bool:
    """Renews the leader lease; returns False when the term is over (expired, or another replica took it)."""
    return await services.leases.renew(term, now=services.clock(), ttl=services.settings.daemon.leader_ttl)


async def release_lead(services: Services, *, term: Term) -> None:
    """Gives the leader lease up, so another replica takes it at its next check instead of after the TTL."""
    await services.leases.release(term, now=services.clock())


def _held(lease: Lease | None) -> LeaseHeldError:
    if lease is None:
        return LeaseHeldError("another process holds the cycle lease", holder="unknown", since="unknown")
    since = lease.acquired_at.isoformat(timespec="seconds")
    return LeaseHeldError(f"another audit cycle is running on this database: {lease.host} pid {lease.pid} since "
                          f"{since}", holder=f"{lease.host} pid {lease.pid}", since=since)


__all__ = ["check_cycle_lease", "keep_cycle_lease", "read_cycle_lease", "release_cycle_lease", "release_lead",
           "renew_lead", "take_cycle_lease", "take_lead"]
