"""Housekeeping use cases: runs whose process is gone marked failed, history past `[history] keep` deleted.

Imports only the domain at import time: `queries` (`auditor report`) shares ORPHAN_REASON and the sweep's log line.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from auditor.service.reports import iso

if TYPE_CHECKING:
    from auditor.service.services import Services

# The sweep logs under the name it always had, wherever it runs (`open_services`, `auditor report`).
sweep_log = logging.getLogger("auditor.service.services")
prune_log = logging.getLogger(__name__)

ORPHAN_REASON = "its process stopped before it finished"


async def abandon_orphans(services: Services) -> list[str]:
    """Marks runs whose owner is gone as failed/abandoned; returns their ids."""
    abandoned = await services.store.abandon_orphaned_runs(now=services.clock(), reason=ORPHAN_REASON)
    if abandoned:
        sweep_log.warning("marked %d run(s) left running by a process that is gone as failed: %s", len(abandoned),
                    ", ".join(abandoned))
    return abandoned


async def prune_history(services: Services) -> dict[str, int]:
    """Deletes history older than `[history] keep` (the daemon's job); returns rows deleted per table."""
    # Imported here: `auditor report` imports this module (ORPHAN_REASON) and must start without SQLAlchemy.
    from auditor.store import history

    now = services.clock()
    before = now - services.settings.history.keep
    counts = await history.prune_history(services.store, before)
    prune_log.info("history pruned before %s: %s", iso(before),
                   ", ".join(f"{n} {table}" for table, n in counts.items()) or "nothing",
                   extra={"pruned": counts, "before": iso(before)})
    return counts


__all__ = ["ORPHAN_REASON", "abandon_orphans", "prune_history"]
