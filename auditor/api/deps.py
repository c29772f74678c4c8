"""`ApiDeps`: everything the API reads or calls, passed in by the daemon (the API wires nothing itself)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import SecretStr

from auditor.service.reloads import ConfigStatus
from auditor.service.runner import CycleMetrics
from auditor.service.services import Services
from auditor.web.auth import LoginThrottle

Trigger = Callable[[], Awaitable[str | None]]
Leadership = Callable[[], dict[str, Any]]


@dataclass(frozen=True)
class ApiDeps:
    """What the API needs: the services it reads through, the daemon's hooks and counters, and its settings.

    `services` is what every route and page reads through (the daemon's: `reading_services`, its own store); its
    clock is the API's, its settings give audit.interval (readiness wants a cycle finished within twice that) and
    the waivers. `trigger` starts an audit cycle and returns the new run's id, or None when a cycle is already
    running. `leadership` says whether this replica leads (runs the schedule); /readyz shows it.
    `version_ttl`: report and findings bodies are cached per latest run; the daemon checks for a new run at
    most once a second (a run that just committed shows within that second). `revocation_ttl`: how long the
    dashboard trusts a "this session is not logged out" lookup (the daemon: 1 s, so a cookie logged out on another
    replica is refused here within that second). `logins`: this process's login throttle and its counters.
    """

    services: Services
    trigger: Trigger
    cycles: CycleMetrics = field(default_factory=CycleMetrics)
    token: SecretStr | None = field(default=None, repr=False)
    # How long the API trusts its last look at the latest run before rendering from cache (0: every request).
    version_ttl: float = 0.0
    # How long the dashboard trusts its last look at whether a session was logged out (0: every request).
    revocation_ttl: float = 0.0
    logins: LoginThrottle = field(default_factory=LoginThrottle)
    # The daemon's leadership ({"leader": bool, "replica": "host pid N"}) for /readyz; None outside a daemon.
    leadership: Leadership | None = None
    # The daemon's configuration in force and its reloads, for /metrics; None outside a daemon.
    config: ConfigStatus | None = None
