"""`ApiDeps`: everything the API reads or calls, passed in by the daemon (the API wires nothing itself)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pydantic import SecretStr

from auditor.domain.models import Waiver, WaiverProblem
from auditor.service.cycle import utcnow
from auditor.service.runner import CycleMetrics
from auditor.store.repo import Store

Trigger = Callable[[], Awaitable[str | None]]
WaiverSource = Callable[[], tuple[list[Waiver], list[WaiverProblem]]]
Leadership = Callable[[], dict[str, Any]]


def _no_waivers() -> tuple[list[Waiver], list[WaiverProblem]]:
    return [], []


@dataclass(frozen=True)
class ApiDeps:
    """What the API needs: the store it reads, the daemon's hooks and counters, and its settings.

    `trigger` starts an audit cycle and returns the new run's id, or None when a cycle is already running.
    `waivers` returns the configured waivers that apply now and the problems of those that don't.
    `interval` is audit.interval (readiness wants a cycle finished within twice that).
    `leadership` says whether this replica leads (runs the schedule); /readyz shows it.
    `version_ttl`: report and findings bodies are cached per latest run; the daemon checks for a new run at
    most once a second (a run that just committed shows within that second).
    """

    store: Store
    interval: timedelta
    trigger: Trigger
    waivers: WaiverSource = _no_waivers
    cycles: CycleMetrics = field(default_factory=CycleMetrics)
    token: SecretStr | None = field(default=None, repr=False)
    clock: Callable[[], datetime] = utcnow
    # How long the API trusts its last look at the latest run before rendering from cache (0: every request).
    version_ttl: float = 0.0
    # The daemon's leadership ({"leader": bool, "replica": "host pid N"}) for /readyz; None outside a daemon.
    leadership: Leadership | None = None
