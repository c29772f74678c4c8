"""The application layer: `Services` and its use cases (audit cycle, alert delivery, read-side queries).

The CLI, the demo, the API and the daemon call it; it calls katapult, store and notify, which call the domain.

The names below are loaded on first use: importing a light submodule (`auditor.service.reports` for
`auditor report`) does not load `services` and `cycle`, which bring in the ORM, httpx and the notifiers.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

_WHERE = {
    "AuditOutcome": "auditor.service.cycle",
    "Targets": "auditor.service.cycle",
    "utcnow": "auditor.service.cycle",
    "DrainReport": "auditor.service.services",
    "Services": "auditor.service.services",
    "check_schema": "auditor.service.services",
    "log_cycle": "auditor.service.services",
    "open_services": "auditor.service.services",
    "prepare_database": "auditor.service.services",
    "ruleset_from": "auditor.service.services",
    "targets_from": "auditor.service.services",
    "waivers_from": "auditor.service.services",
}

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


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(where), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
