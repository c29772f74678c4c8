"""Housekeeping use cases: runs whose process is gone marked failed, history past `[history] keep` deleted."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from auditor.service.reports import iso
from auditor.store import pruning, writes

if TYPE_CHECKING:
    from auditor.service.services import Services

# The sweep logs under the name it always had (it ran in `open_services`).
sweep_log = logging.getLogger("auditor.service.services")
prune_log = logging.getLogger(__name__)


async def abandon_orphans(services: Services) -> list[str]:
    """Marks runs whose owner is gone as failed/abandoned; returns their ids."""
    abandoned = await services.store.write(writes.abandon_orphaned_runs, now=services.clock())
    if abandoned:
        sweep_log.warning("marked %d run(s) left running by a process that is gone as failed: %s", len(abandoned),
                    ", ".join(abandoned))
    return abandoned


async def prune_history(services: Services) -> dict[str, int]:
    """Deletes history older than `[history] keep` (the daemon's job); returns rows deleted per table."""
    now = services.clock()
    before = now - services.settings.history.keep
    counts = await pruning.prune_history(services.store, before)
    prune_log.info("history pruned before %s: %s", iso(before),
                   ", ".join(f"{n} {table}" for table, n in counts.items()) or "nothing",
                   extra={"pruned": counts, "before": iso(before)})
    return counts


__all__ = ["abandon_orphans", "prune_history"]
