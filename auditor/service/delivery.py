"""Delivery: `deliver_due` (one round of the alert outbox) and `drain` (rounds until nothing is pending or a time
budget runs out). Retry, backoff and giving up live here once; notifiers only build a payload and send it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from auditor.config import NotifierCommon
from auditor.domain.alerts import Delivery
from auditor.domain.retry import backoff
from auditor.errors import NotifyError, StoreError
from auditor.notify.policy import BACKOFF_BASE, BACKOFF_CAP
from auditor.vocabulary import format_duration

if TYPE_CHECKING:
    from auditor.service.services import Services
    from auditor.store.holders import Term

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 25  # with the 15-minute backoff cap, about five hours of trying before giving up
# How many pending outbox entries `drain` looks at to find the next due one and to explain what is left.
DRAIN_SCAN = 1000


@dataclass(slots=True)
class DeliveryReport:
    """What one delivery round did."""

    delivered: int = 0
    retried: int = 0
    failed: int = 0
    released: int = 0
    errors: int = 0  # unexpected exceptions (logged whole; the entry was released for a later round)
    abandoned: int = 0  # claimed but left unsent: the term ended mid-round (the next leader sends them)
    unrecorded: int = 0  # sent, but the record was refused (the claim had ended): the next leader sends it again


class _ClaimLost(Exception):
    """An outcome was refused: the entry's claim (and the round's others) belongs to nobody here any more."""


ERROR_RETRY = timedelta(seconds=60)  # an entry whose delivery broke unexpectedly is tried again after this


def retry_at(now: datetime, seconds: float) -> datetime:
    """Returns now + seconds, never overflowing (a wait past the datetime range is capped at a day)."""
    try:
        return now + timedelta(seconds=min(max(seconds, 0.0), 86400.0))
    except (OverflowError, ValueError):
        return now + timedelta(days=1)


async def deliver_due(services: Services, *, limit: int = 200, term: Term | None = None,
                      holds: Callable[[], bool] | None = None) -> DeliveryReport:
    """Claims due outbox entries and delivers them, each notifier on its own so a failing one delays no other.

    Within a notifier entries go in order; after a temporary failure the notifier's other entries are put back
    for the same retry time instead of each waiting out its own timeout. An unexpected exception never vanishes:
    it is logged whole, counted, and the entry is released for a later round. Without notifiers (no dispatcher)
    it does nothing. The clock is read once to claim; later reads stamp when each entry was sent or is retried.

    A daemon's leader passes its `term`: the claims and every outcome are refused, in the same statement, once the
    term is over (another replica leads, or this one's lease expired while it was paused), and what this round
    claimed is then taken over by the next leader at once (sent again with the same Idempotency-Key). With
    `holds` (whether the term still holds by this process's own clock: not stepped down, released, or paused past
    its lease), nothing more is sent once it says no, and a notifier whose outcome was refused sends nothing more:
    what is left of the round is the next leader's, so a process that wakes from a pause, or hands over at
    shutdown, finishes at most the request in flight.
    """
    dispatcher = services.dispatcher
    if dispatcher is None:
        return DeliveryReport()
    outbox, clock, worker = services.outbox, services.clock, services.holder.id
    notifiers = {n.name: n for n in services.settings.notifiers}
    max_retry_after = services.settings.notify.max_retry_after
    now = clock()
    claimed = await outbox.claim_due(now=now, worker=worker, limit=limit, term=term)
    report = DeliveryReport()
    by_notifier: dict[str, list[Delivery]] = {}
    for d in claimed:
        by_notifier.setdefault(d.notifier, []).append(d)

    async def send_one(name: str, settings: NotifierCommon | None, d: Delivery) -> datetime | None:
        """Delivers one entry; returns the retry time when the notifier failed temporarily."""
        if settings is None:
            await outbox.mark_failed(d.id, status=None, error=f"notifier {name!r} is no longer configured",
                                     worker=worker, term=term)
            report.failed += 1
            return None
        try:
            result = await dispatcher.send(d.notification, settings, now=clock())
        except NotifyError as exc:
            attempts = d.attempts + 1
            if exc.permanent or attempts >= MAX_ATTEMPTS:
                why = str(exc) if exc.permanent else f"gave up after {attempts} attempts: {exc}"
                log.error("notification %s to %s failed permanently: %s", d.id, name, why)
                await outbox.mark_failed(d.id, status=exc.status_code, error=why, worker=worker, term=term)
                report.failed += 1
                return None
            wait = backoff(attempts, base=BACKOFF_BASE, cap=BACKOFF_CAP, retry_after=exc.retry_after,
                           max_retry_after=max_retry_after)
            next_at = retry_at(clock(), wait)
            log.warning("notification %s to %s failed (attempt %d), retrying in %.0fs: %s", d.id, name,
                        attempts, wait, exc)
            await outbox.mark_retry(d.id, next_at=next_at, status=exc.status_code, error=str(exc), worker=worker,
                                    term=term)
            report.retried += 1
            return next_at
        if not await outbox.mark_delivered(d.id, now=clock(), status=result.status_code, detail=result.detail,
                                           worker=worker, term=term):
            log.warning("notification %s to %s was sent after this process's claim ended: not recorded here, the "
                        "next leader sends it again (same Idempotency-Key)", d.id, name)
            report.unrecorded += 1
            raise _ClaimLost
        report.delivered += 1
        return None

    async def run(name: str, items: list[Delivery]) -> None:
        settings = notifiers.get(name)
        for index, d in enumerate(items):
            if holds is not None and not holds():
                log.warning("delivery to %s stopped: this process no longer leads (%d entries left to the next "
                            "leader)", name, len(items) - index)
                report.abandoned += len(items) - index
                return
            try:
                next_at = await send_one(name, settings, d)
            except _ClaimLost:
                report.abandoned += len(items) - index - 1
                return  # the claims are no longer ours: the next leader sends the rest
            except StoreError:
                raise
            except Exception:  # a bug in delivery: log it whole, put the entry back, go on with the others
                log.exception("delivering notification %s to %s broke unexpectedly; it is retried later", d.id,
                              name)
                report.errors += 1
                await outbox.release(d.id, next_at=retry_at(clock(), ERROR_RETRY.total_seconds()), worker=worker,
                                     term=term)
                continue
            if next_at is not None:
                for rest in items[index + 1:]:
                    await outbox.release(rest.id, next_at=next_at, worker=worker, term=term)
                    report.released += 1
                return

    results = await asyncio.gather(*(run(name, items) for name, items in by_notifier.items()),
                                   return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r  # a StoreError: the round's remaining claims expire and are retried by exactly one deliverer
    if claimed:
        log.info("delivery round: %d delivered, %d to retry, %d failed, %d errors%s", report.delivered,
                 report.retried, report.failed, report.errors,
                 (f", {report.unrecorded} sent but not recorded" if report.unrecorded else "")
                 + (f", {report.abandoned} left to the next leader" if report.abandoned else ""))
    return report


@dataclass(slots=True)
class DrainReport:
    """What `drain` left behind."""

    pending: int = 0
    reasons: list[str] = field(default_factory=list)


async def drain(services: Services, *, within: float) -> DrainReport:
    """Delivers until nothing is pending or `within` seconds pass, waiting out retries that fit; returns what
    remains and why.

    After a temporary failure `deliver_due` has already planned the retry (backoff, Retry-After): this waits
    until the earliest pending entry is due when that fits in what is left of the budget, never sooner.
    """
    report = DrainReport()
    if services.dispatcher is None:
        return report
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    slept = False
    while loop.time() < deadline:
        try:
            r = await asyncio.wait_for(deliver_due(services), timeout=max(0.1, deadline - loop.time()))
        except TimeoutError:
            report.reasons.append("the drain budget ran out mid-delivery")
            break
        worked = r.delivered + r.failed + r.retried + r.released + r.errors > 0
        if slept and not worked:
            break  # waited until an entry was due and none could be claimed (another process, or a fixed clock)
        due = await _earliest_pending(services)
        if due is None:
            break
        wait = (due - services.clock()).total_seconds()
        if wait <= 0:
            if not worked:
                break  # due but claimed by someone else: that deliverer owns it now
            continue
        if wait > deadline - loop.time():
            break
        await asyncio.sleep(wait)
        slept = True
    report.pending = await services.outbox.pending_count()
    if report.pending:
        report.reasons.extend(await _pending_reasons(services))
    return report


async def _earliest_pending(services: Services) -> datetime | None:
    """Returns when the earliest pending outbox entry is due, or None when none is pending."""
    pending = await services.outbox.recent(limit=DRAIN_SCAN, state="pending")
    return min((d.next_attempt_at for d in pending), default=None)


async def _pending_reasons(services: Services) -> list[str]:
    """Returns one line per notifier with undelivered entries: its last error and when it is tried next."""
    pending = await services.outbox.recent(limit=DRAIN_SCAN, state="pending")
    first: dict[str, Delivery] = {}
    for d in sorted(pending, key=lambda d: d.next_attempt_at):
        first.setdefault(d.notifier, d)
    now = services.clock()
    lines = []
    for name, d in sorted(first.items()):
        error = d.last_error or "not tried yet"
        # Notify errors read "<kind> notifier '<name>': HTTP 503: …"; the line names the notifier once.
        _, named, rest = error.partition(f"notifier '{name}': ")
        error = rest if named else error
        head = error if error.startswith(f"{name}:") else f"{name}: {error}"
        seconds = max(0.0, (d.next_attempt_at - now).total_seconds())
        lines.append(f"{head} (next try in {format_duration(seconds, style='wait')})")
    return lines


__all__ = ["DeliveryReport", "DrainReport", "MAX_ATTEMPTS", "deliver_due", "drain", "retry_at"]
