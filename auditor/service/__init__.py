"""The application layer: `Services` (the wiring) and the use cases, in modules named by purpose.

The CLI, the demo, the API, the dashboard and the daemon call it; it calls katapult, store, notify and render,
which call the domain. The API and the dashboard reach stored data only through it (an import-linter contract).

Every use case is called the same way::

    async def verb(services: Services, *, keyword: ..., ...) -> Result

- a module-level coroutine named by a verb (`run_cycle`, `deliver_due`, `read_report`, `read_recent_runs`);
- `Services` first, everything after it keyword-only;
- it reads `services.clock()` at most once, at its start, for the instant it is about (a cycle: once the cycle
  lease is taken), and passes that `now` down to the domain and the store; a use case that spans time reads it
  again only to stamp what happens later (when each notification was sent) or to wait;
- it owns its transactions (through the store's typed transaction API); no caller holds one open across it;
- `Services` holds no state: what lives across calls (failed cycles waiting for the database) is an object its
  owner passes in (`failures=PendingFailures()`, kept by the daemon's `CycleRunner`).

Pure helpers beside them take domain objects and `now` (`plan_notifications`, `assemble_report`,
`compliance_from`). The one exception: `current_report`, `current_findings` and `current_disk_detail` in `queries`
take `Settings` and run synchronously — the same reads for a one-shot command, without building `Services` (the
ORM, httpx, the notifiers), so `auditor report`, `findings` and `history` start fast.

Where things are:

- `services`: `Services`, `open_services`, `reading_services` (the API's), database checks, the Katapult client;
- `configuration`: what the settings mean to the domain (rule set, tiers, targets, waivers) — imports no store;
- `clock`: the clock seam (`Clock`, `utcnow`);
- `cycle`: the audit cycle (`run_cycle`, `record_failures`, `PendingFailures`, `AuditOutcome`);
- `collection`: the cycle's reading and judging, every disk inside its own fault boundary;
- `alerts`: what each notifier is told after a cycle (pure planning), test notifications;
- `delivery`: the alert outbox delivered (`deliver_due`, `drain`);
- `leases`: the cycle lease and the leader lease;
- `housekeeping`: orphaned runs marked failed, history pruned;
- `queries`: every read — report, findings, runs, a disk's history, notifications, readiness, the metrics'
  stored state, the dashboard's snapshot and searches; `reports` shapes their JSON, `dashboard` their views;
- `compliance`: the period report; `evidence`: the evidence export;
- `remediation`: remediation plans (`make_plan`) and their application (`apply_plan`, each change re-checked
  against Katapult, its intent recorded before the write), the plan's planned fix per finding;
- `sessions`: dashboard sessions revoked on the server (logout), for every replica;
- `runner`: running cycles in this process (`CycleRunner`, `CycleMetrics`); `versions`: the data version the
  read-side caches key on.

The names below are loaded on first use: importing a light submodule (`auditor.service.queries` for
`auditor report`) does not load `services` and `cycle`, which bring in the ORM, httpx and the notifiers.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from auditor.service.clock import utcnow
    from auditor.service.configuration import Targets, ruleset_from, targets_from, waivers_from
    from auditor.service.cycle import AuditOutcome, PendingFailures, log_cycle
    from auditor.service.delivery import DrainReport
    from auditor.service.services import (
        Services,
        check_schema,
        open_services,
        prepare_database,
        reading_services,
    )

_WHERE = {
    "AuditOutcome": "auditor.service.cycle",
    "DrainReport": "auditor.service.delivery",
    "PendingFailures": "auditor.service.cycle",
    "Services": "auditor.service.services",
    "Targets": "auditor.service.configuration",
    "check_schema": "auditor.service.services",
    "log_cycle": "auditor.service.cycle",
    "open_services": "auditor.service.services",
    "prepare_database": "auditor.service.services",
    "reading_services": "auditor.service.services",
    "ruleset_from": "auditor.service.configuration",
    "targets_from": "auditor.service.configuration",
    "utcnow": "auditor.service.clock",
    "waivers_from": "auditor.service.configuration",
}

__all__ = [
    "AuditOutcome",
    "DrainReport",
    "PendingFailures",
    "Services",
    "Targets",
    "check_schema",
    "log_cycle",
    "open_services",
    "prepare_database",
    "reading_services",
    "ruleset_from",
    "targets_from",
    "utcnow",
    "waivers_from",
]


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(where), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
