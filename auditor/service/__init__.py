"""The application layer: `Services` and its use cases (audit cycle, alert delivery, read-side queries).

The CLI, the demo, the API and the daemon call it; it calls katapult, store and notify, which call the domain.
"""

from __future__ import annotations

from auditor.service.cycle import AuditOutcome, Targets, utcnow
from auditor.service.services import (
    DrainReport,
    Services,
    check_schema,
    log_cycle,
    open_services,
    prepare_database,
    ruleset_from,
    targets_from,
    waivers_from,
)

__all__ = [
    "AuditOutcome",
    "DrainReport",
    "Services",
    "Targets",
    "check_schema",
    "log_cycle",
    "open_services",
    "prepare_database",
    "ruleset_from",
    "targets_from",
    "utcnow",
    "waivers_from",
]
