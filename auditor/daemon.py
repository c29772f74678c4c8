"""The composition root: builds the store, the Katapult client and the rules from settings, and wires them."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx

from auditor.alerting import DeliveryReport, deliver_due, incomplete_fingerprint, plan_notifications
from auditor.audit import AuditOutcome, OutboxHook, Progress, Targets, run_audit, utcnow
from auditor.config import NotifierCommon, RulesSettings, Settings
from auditor.domain.lifecycle import Change, parse_waivers
from auditor.domain.models import Interval, Severity, Waiver, WaiverProblem
from auditor.domain.records import RunError, RunStatus
from auditor.domain.rules import RULES, RuleParams, RuleSet, build_ruleset
from auditor.errors import StoreError
from auditor.katapult import KatapultClient
from auditor.notify.dispatch import Dispatcher
from auditor.store import engine as db
from auditor.store.outbox import Outbox
from auditor.store.repo import Store

log = logging.getLogger(__name__)


def ruleset_from(settings: RulesSettings) -> RuleSet:
    """Returns the domain RuleSet for the [rules] table."""
    default = RuleParams(
        min_retention=settings.min_retention,
        min_retention_days=settings.min_retention_days,
        max_interval=Interval(settings.max_interval),
        stale_grace=settings.stale_grace,
    )
    overrides = []
    for o in settings.overrides:
        changes: dict[str, Any] = {}
        if o.min_retention is not None:
            changes["min_retention"] = o.min_retention
        if o.min_retention_days is not None:
            changes["min_retention_days"] = o.min_retention_days
        if o.max_interval is not None:
            changes["max_interval"] = Interval(o.max_interval)
        if o.stale_grace is not None:
            changes["stale_grace"] = o.stale_grace
        overrides.append((o.disks, changes))
    return build_ruleset(
        default=default,
        overrides=overrides,
        severity={rule: Severity(sev) for rule, sev in settings.severity.items()},
        disabled=settings.disabled,
    )


def waivers_from(settings: Settings) -> tuple[list[Waiver], list[WaiverProblem]]:
    """Returns the configured waivers that apply now, and the problems of those that don't."""
    return parse_waivers(settings.waivers, known_rules=RULES.keys(), now=utcnow())


def targets_from(settings: Settings) -> Targets:
    """Returns the audit targets."""
    return Targets(tuple(settings.audit.disks), tuple(settings.audit.organizations))


async def prepare_database(settings: Settings) -> None:
    """Brings the schema to head (SQLite always; PostgreSQL unless auto_migrate is off, then checks it)."""
    url = settings.database.url.get_secret_value()
    if db.is_sqlite(url) or settings.database.auto_migrate:
        await db.upgrade(url)
        return
    current, head = await db.current_revision(url)
    if current != head:
        raise StoreError(
            f"database schema is at revision {current or 'none'}, this version needs {head}: "
            "run `auditor db upgrade` (database.auto_migrate is false)"
        )


def client_from(
    settings: Settings, *, transport: httpx.AsyncBaseTransport | None = None, token: str | None = None
) -> KatapultClient:
    """Returns a Katapult client configured from [katapult] (the token is read here, once)."""
    k = settings.katapult
    return KatapultClient(
        base_url=k.api_url,
        token=token or k.token().get_secret_value(),
        per_page=k.per_page,
        max_requests_per_minute=k.max_requests_per_minute,
        max_concurrency=k.max_concurrency,
        timeout=k.timeout_seconds,
        max_attempts=k.max_attempts,
        transport=transport,
    )


@dataclass
class Runtime:
    """The wired objects one command or the daemon works with."""

    settings: Settings
    store: Store
    client: KatapultClient | None
    rules: RuleSet
    targets: Targets
    dispatcher: Dispatcher | None = None
    worker: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")

    @property
    def outbox(self) -> Outbox:
        """Returns the alert outbox on this runtime's store."""
        return Outbox(self.store)

    @property
    def notifiers(self) -> dict[str, NotifierCommon]:
        """Returns the configured notifiers by name."""
        return {n.name: n for n in self.settings.notifiers}


@asynccontextmanager
async def open_runtime(
    settings: Settings,
    *,
    katapult: bool = True,
    transport: httpx.AsyncBaseTransport | None = None,
    token: str | None = None,
    notify_transport: httpx.AsyncBaseTransport | None = None,
) -> AsyncIterator[Runtime]:
    """Yields a Runtime with a migrated database and (if asked) a Katapult client; closes both after."""
    client = client_from(settings, transport=transport, token=token) if katapult else None
    dispatcher = Dispatcher(transport=notify_transport) if settings.notifiers else None
    store: Store | None = None
    try:
        await prepare_database(settings)
        store = Store.from_url(settings.database.url.get_secret_value())
        yield Runtime(settings, store, client, ruleset_from(settings.rules), targets_from(settings), dispatcher)
    finally:
        if client is not None:
            await client.aclose()
        if dispatcher is not None:
            await dispatcher.aclose()
        if store is not None:
            await store.close()


async def audit_once(runtime: Runtime, *, trigger: str = "manual", progress: Progress | None = None) -> AuditOutcome:
    """Runs one audit cycle with the runtime's objects."""
    assert runtime.client is not None
    s = runtime.settings
    hook = await outbox_hook(runtime) if s.notifiers else None
    outcome = await run_audit(
        client=runtime.client,
        store=runtime.store,
        targets=runtime.targets,
        rules=runtime.rules,
        waivers=s.waivers,
        concurrency=s.katapult.max_concurrency,
        trigger=trigger,
        progress=progress,
        outbox=hook,
    )
    log_cycle(outcome)
    return outcome


async def outbox_hook(runtime: Runtime) -> OutboxHook:
    """Returns the step that plans a cycle's notifications and writes them in the cycle's transaction."""
    outbox = runtime.outbox
    states = await outbox.alert_states()
    s = runtime.settings
    incomplete_fp = incomplete_fingerprint(s.audit.disks, s.audit.organizations)

    def hook(changes: list[Change], status: RunStatus, errors: list[RunError], now: datetime, run_id: str) -> Any:
        plan = plan_notifications(notifiers=s.notifiers, changes=changes, run_status=status, errors=errors,
                                  incomplete_fp=incomplete_fp, states=states, now=now)
        return outbox.writer(plan.entries, plan.states, run_id=run_id, now=now)

    return hook


async def deliver(runtime: Runtime) -> DeliveryReport:
    """Runs one delivery round of the alert outbox."""
    if runtime.dispatcher is None:
        return DeliveryReport()
    return await deliver_due(outbox=runtime.outbox, dispatcher=runtime.dispatcher, notifiers=runtime.notifiers,
                             clock=utcnow, worker=runtime.worker)


async def drain_outbox(runtime: Runtime, *, within: float) -> int:
    """Delivers what is due until nothing is or `within` seconds pass; returns how many entries remain pending."""
    if runtime.dispatcher is None:
        return 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        try:
            report = await asyncio.wait_for(deliver(runtime), timeout=max(0.1, deadline - loop.time()))
        except TimeoutError:
            break
        if report.delivered + report.failed + report.retried + report.released == 0:
            break
        if report.retried or report.released:
            break  # what failed waits for its backoff; it stays in the outbox for the daemon
    return await runtime.outbox.pending_count()


def log_cycle(outcome: AuditOutcome) -> None:
    """Logs the one summary line of a cycle."""
    log.info(
        "audit run %s %s in %.1fs: %d targets, %d disks read, %d unknown, %d requests, %d retries, %d x 429, "
        "%d findings opened, %d resolved, %d open",
        outcome.run_id, outcome.status.value, outcome.duration, outcome.targets_checked, outcome.disks_ok,
        outcome.disks_unknown, outcome.stats.requests, outcome.stats.retries, outcome.stats.rate_limited,
        outcome.opened, outcome.resolved, sum(outcome.open_findings.values()),
        extra={"run_id": outcome.run_id, "status": outcome.status.value, "duration_s": round(outcome.duration, 3),
               "targets": outcome.targets_checked, "requests": outcome.stats.requests,
               "rate_limited": outcome.stats.rate_limited, "opened": outcome.opened,
               "resolved": outcome.resolved},
    )
