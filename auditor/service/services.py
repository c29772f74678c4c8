"""`Services`: the wiring every use case runs on — settings, store, Katapult client, notifier dispatcher,
heartbeat, clock and lease holder — and how it is built (`open_services`, `reading_services`). No use case and no
state lives here: see the package docstring for where each use case is.

Seams: the Katapult transport and token, the notifier transport, the heartbeat transport and the clock are
parameters of `open_services`, so tests and the demo drive the real code against in-process fakes.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from functools import cached_property

from auditor.config import Settings, fingerprint_of, redacted_config
from auditor.domain.records import RunConfig
from auditor.domain.rules import RuleSet
from auditor.errors import SchemaError, StoreError
from auditor.katapult import KatapultClient, Transport
from auditor.katapult.pacing import RateLimiter
from auditor.notify.dispatch import Dispatcher
from auditor.notify.heartbeat import Heartbeat
from auditor.service.clock import Clock, utcnow
from auditor.service.configuration import Targets, ruleset_from, targets_from
from auditor.service.housekeeping import abandon_orphans
from auditor.service.queries import SCHEMA_HINT
from auditor.store import engine as db
from auditor.store.leases import Holder, Leases
from auditor.store.outbox import Outbox
from auditor.store.repo import Store


@dataclass(frozen=True)
class Services:
    """The wired objects every use case works with; built by `open_services` (or `reading_services`).

    Frozen and stateless: what lives across cycles (failed cycles waiting for the database) belongs to whoever
    runs them (`runner.CycleRunner`, one `auditor audit`) and is passed to the use case.
    """

    settings: Settings
    store: Store
    client: KatapultClient | None = None
    dispatcher: Dispatcher | None = None
    heartbeat: Heartbeat | None = None
    clock: Clock = utcnow
    holder: Holder = field(default_factory=Holder.current)

    @cached_property
    def rules(self) -> RuleSet:
        """Returns the rule set of [rules] and [[tiers]]."""
        return ruleset_from(self.settings.rules, self.settings.tiers)

    @cached_property
    def run_config(self) -> RunConfig:
        """Returns the configuration a run records it ran with: the settings redacted, and their fingerprint."""
        settings = redacted_config(self.settings)
        return RunConfig(fingerprint_of(settings), settings)

    @cached_property
    def targets(self) -> Targets:
        """Returns what [audit] names to audit."""
        return targets_from(self.settings)

    @property
    def outbox(self) -> Outbox:
        """Returns the alert outbox on this store."""
        return Outbox(self.store, self.clock)

    @property
    def leases(self) -> Leases:
        """Returns the leases on this store."""
        return Leases(self.store)

    async def aclose(self) -> None:
        """Closes clients and the store (the heartbeat gets a moment to send what is queued)."""
        if self.heartbeat is not None:
            await self.heartbeat.flush(5.0)
            await self.heartbeat.aclose()
        if self.client is not None:
            await self.client.aclose()
        if self.dispatcher is not None:
            await self.dispatcher.aclose()
        await self.store.close()


def database_label(settings: Settings) -> str:
    """Returns the configured database URL fit for messages (password masked); ConfigError when malformed."""
    return db.safe_url(settings.database.url.get_secret_value())


async def prepare_database(settings: Settings) -> None:
    """Brings the schema to head (SQLite always; PostgreSQL unless auto_migrate is off, then checks it)."""
    url = settings.database.url.get_secret_value()
    if db.is_sqlite(url) or settings.database.auto_migrate:
        await db.upgrade(url)
        return
    await check_schema(url, hint="run `auditor db upgrade` (database.auto_migrate is false)")


async def check_schema(url: str, *, hint: str = SCHEMA_HINT) -> None:
    """Raises SchemaError unless the database exists and is at the code's head revision (never creates it)."""
    if db.sqlite_file_missing(url):
        raise db.schema_error(url, None, hint=hint, exists=False) or SchemaError(url)
    current, _head = await db.current_revision(url)
    problem = db.schema_error(url, current, hint=hint)
    if problem is not None:
        raise problem


def client_from(settings: Settings, *, transport: Transport | None = None, token: str | None = None,
                limiter: RateLimiter | None = None) -> KatapultClient:
    """Returns a Katapult client configured from [katapult] (the token is read here, once), pacing its requests
    with `limiter` when given (`auditor apply`'s writes share the reads' limiter)."""
    k = settings.katapult
    return KatapultClient(
        base_url=k.api_url,
        token=token or k.token().get_secret_value(),
        per_page=k.per_page,
        max_requests_per_minute=k.max_requests_per_minute,
        max_concurrency=k.max_concurrency,
        timeout=k.timeout_seconds,
        max_attempts=k.max_attempts,
        max_response_bytes=k.max_response_bytes,
        transport=transport,
        limiter=limiter,
    )


def reading_services(settings: Settings, *, clock: Clock = utcnow) -> Services:
    """Returns Services for reading only (the daemon's API and dashboard): its own store on the configured
    database, no Katapult client, no notifiers. Nothing is checked or connected yet: the API answers (/healthz,
    /readyz saying why) while the database is still being waited for."""
    return Services(settings=settings, store=Store.from_url(settings.database.url.get_secret_value()), clock=clock)


@asynccontextmanager
async def open_services(
    settings: Settings,
    *,
    katapult: bool = True,
    migrate: bool = True,
    transport: Transport | None = None,
    token: str | None = None,
    notify_transport: Transport | None = None,
    heartbeat_transport: Transport | None = None,
    clock: Clock = utcnow,
) -> AsyncIterator[Services]:
    """Yields Services on a ready database; closes everything after.

    `migrate=False` (read-only commands) never creates or migrates the database: a missing database or one not at
    the current revision raises SchemaError.
    """
    url = settings.database.url.get_secret_value()
    if migrate:
        await prepare_database(settings)
    else:
        await check_schema(url)
    client = client_from(settings, transport=transport, token=token) if katapult else None
    services = Services(
        settings=settings,
        store=Store.from_url(url),
        client=client,
        dispatcher=Dispatcher(transport=notify_transport) if settings.notifiers else None,
        heartbeat=(Heartbeat.from_settings(settings.heartbeat, transport=heartbeat_transport)
                   if katapult else None),
        clock=clock,
    )
    try:
        # A process that audits records a run whose owner is gone as failed at once; a read-only one never writes
        # (every read already shows such a run failed, `queries.run_view`).
        if katapult:
            with contextlib.suppress(StoreError):
                await abandon_orphans(services)
        yield services
    finally:
        await services.aclose()


def rewire(
    services: Services,
    settings: Settings,
    *,
    transport: Transport | None = None,
    token: str | None = None,
    notify_transport: Transport | None = None,
    heartbeat_transport: Transport | None = None,
) -> Services:
    """Returns Services for reloaded settings: the same store, clock and lease holder (the database URL needs a
    restart, and the leases must stay this process's), a new Katapult client (the token file is read again), the
    notifier dispatcher kept while there are notifiers, the heartbeat kept unless [heartbeat] changed. What the
    old Services held and the new one does not is closed by `close_replaced`, once nothing uses it any more."""
    client = client_from(settings, transport=transport, token=token) if services.client is not None else None
    dispatcher = services.dispatcher
    if not settings.notifiers:
        dispatcher = None
    elif dispatcher is None:
        dispatcher = Dispatcher(transport=notify_transport)
    heartbeat = services.heartbeat
    if settings.heartbeat != services.settings.heartbeat:
        heartbeat = Heartbeat.from_settings(settings.heartbeat, transport=heartbeat_transport)
    return replace(services, settings=settings, client=client, dispatcher=dispatcher, heartbeat=heartbeat)


async def close_replaced(old: Services, new: Services) -> None:
    """Closes what `old` holds and `new` does not (the heartbeat gets a moment to send what is queued)."""
    if old.heartbeat is not None and old.heartbeat is not new.heartbeat:
        await old.heartbeat.flush(5.0)
        await old.heartbeat.aclose()
    if old.client is not None and old.client is not new.client:
        await old.client.aclose()
    if old.dispatcher is not None and old.dispatcher is not new.dispatcher:
        await old.dispatcher.aclose()
    if old.store is not new.store:
        await old.store.close()


__all__ = [
    "Services",
    "check_schema",
    "client_from",
    "close_replaced",
    "database_label",
    "open_services",
    "prepare_database",
    "reading_services",
    "rewire",
]
