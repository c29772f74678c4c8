"""Housekeeping use cases: runs whose process is gone marked failed, history past `[history] keep` deleted."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from auditor.domain.records import RunError, RunStatus
from auditor.service.alerts import incomplete_fingerprint, plan_notifications
from auditor.service.reports import iso
from auditor.store import pruning, queries, writes

if TYPE_CHECKING:
    from auditor.service.services import Services

# The sweep logs under the name it always had (it ran in `open_services`).
sweep_log = logging.getLogger("auditor.service.services")
prune_log = logging.getLogger(__name__)


async def abandon_orphans(services: Services) -> list[str]:
    """Records as failed (abandoned) the runs whose owner is gone, and in the same transaction announces the lost
    cycle: `audit-incomplete` fires on every notifier (once while it is firing; the next complete cycle resolves
    it). Returns their ids."""
    now = services.clock()
    settings = services.settings
    async with services.store.transaction() as tx:
        abandoned = await tx.run(writes.abandon_orphaned_runs, now=now)
        if abandoned and settings.notifiers:
            reason = f"run {abandoned[-1]} was abandoned: {queries.ABANDONED_REASON}"
            plan = plan_notifications(notifiers=settings.notifiers, changes=[], run_status=RunStatus.FAILED,
                                      errors=[RunError("*", queries.ABANDONED, reason)],
                                      incomplete_fp=incomplete_fingerprint(settings.audit.disks,
                                                                           settings.audit.organizations),
                                      states=await tx.run(queries.alert_state_map), now=now,
                                      interval=settings.audit.interval, runbook_url=settings.notify.runbook_url)
            await tx.run(writes.enqueue, plan.entries, plan.states, run_id=abandoned[-1], now=now)
    if abandoned:
        sweep_log.warning("marked %d run(s) failed (abandoned): left running under a cycle lease that expired (its "
                          "process is gone, or was paused past it): %s", len(abandoned),
                          ", ".join(abandoned))
    return abandoned


async def prune_history(services: Services) -> dict[str, int]:
    """Deletes history older than `[history] keep` (the daemon's job); returns rows deleted per table."""
    now = services.clock()
    before = now - services.settings.history.keep
    counts = await pruning.delete_history_before(services.store, before)
    prune_log.info("history pruned before %s: %s", iso(before),
                   ", ".join(f"{n} {table}" for table, n in counts.items()) or "nothing",
                   extra={"pruned": counts, "before": iso(before)})
    return counts


__all__ = ["abandon_orphans", "prune_history"]
