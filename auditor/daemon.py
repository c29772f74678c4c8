"""The composition root: builds the store, the Katapult client and the rules from settings, and wires them.

It also runs the daemon (`serve`): one event loop with the APScheduler job, the uvicorn API server and the
loop-level SIGTERM/SIGINT handlers that drive the shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import httpx
import uvicorn
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger

from auditor.alerting import DeliveryReport, deliver_due, incomplete_fingerprint, plan_notifications
from auditor.api import ApiDeps, CycleMetrics, create_app
from auditor.audit import AuditOutcome, OutboxHook, Progress, Targets, run_audit, utcnow
from auditor.config import NotifierCommon, RulesSettings, Settings
from auditor.domain.lifecycle import Change, parse_waivers
from auditor.domain.models import Interval, Severity, Waiver, WaiverProblem
from auditor.domain.records import RunError, RunStats, RunStatus
from auditor.domain.rules import RULES, RuleParams, RuleSet, build_ruleset
from auditor.errors import AuditorError, StoreError
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


# ---- the daemon -------------------------------------------------------------------------------------------

EXIT_OK, EXIT_FAILED = 0, 2
DB_RETRY_FIRST = 1.0  # seconds before the first retry of an unreachable database; doubles up to db_retry_max
SERVER_STOP_MIN = 2.0  # seconds the API server always gets to finish in-flight requests at shutdown
CANCEL_WAIT = 5.0  # seconds to wait for a cancelled cycle to unwind (roll back its transaction)
DELIVERY_EVERY = 10.0  # seconds between alert outbox delivery rounds (when notifiers are configured)

CycleHook = Callable[[Runtime, AuditOutcome], Awaitable[None]]


class _RunAnnouncingStore(Store):
    """The runtime's store (same engine) that reports the id of the run a cycle starts.

    `run_audit` creates the run row itself; the daemon needs its id to answer POST /api/v1/audit with it and to
    mark the run failed if the cycle breaks in an unexpected way.
    """

    def __init__(self, store: Store, on_start: Callable[[str], None]) -> None:
        super().__init__(store.engine)
        self._on_start = on_start

    async def start_run(self, *, now: datetime, trigger: str) -> str:
        """Records a new running run, reports its id and returns it."""
        run_id = await super().start_run(now=now, trigger=trigger)
        self._on_start(run_id)
        return run_id


class CycleRunner:
    """Runs audit cycles one at a time, scheduled or on demand, and keeps the in-flight one for shutdown."""

    def __init__(self, runtime: Runtime, *, cycles: CycleMetrics, on_cycle: CycleHook | None = None) -> None:
        self.runtime = runtime
        self.cycles = cycles
        self.on_cycle = on_cycle
        self.current: asyncio.Task[AuditOutcome | None] | None = None
        self.is_closing = False
        self.last_error: str | None = None
        self._lock = asyncio.Lock()

    @property
    def is_busy(self) -> bool:
        """Returns whether a cycle is in flight."""
        return self.current is not None and not self.current.done()

    def start(
        self, trigger: str, *, started: asyncio.Future[str] | None = None
    ) -> asyncio.Task[AuditOutcome | None] | None:
        """Starts a cycle as a task and returns it; None if one is running or the daemon is stopping.

        The check and the start happen without an await in between, so two requests cannot both start one.
        """
        if self.is_closing or self.is_busy:
            return None
        task = asyncio.create_task(self._cycle(trigger, started), name=f"audit-cycle-{trigger}")
        self.current = task
        return task

    async def trigger(self) -> str | None:
        """Starts a cycle for the API; returns its run id once the run is recorded, None if one is running."""
        if self.is_closing:
            raise AuditorError("the auditor is shutting down")
        started: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        task = self.start("api", started=started)
        if task is None:
            return None
        either: set[asyncio.Future[Any]] = {started, task}
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if started.done():
            return started.result()
        outcome = None if task.cancelled() else task.result()
        if outcome is not None:
            return outcome.run_id
        raise StoreError(f"the audit cycle could not start: {self.last_error or 'cancelled'}")

    async def tick(self) -> None:
        """The scheduled job: runs a cycle unless one is already running (then this slot is skipped)."""
        task = self.start("schedule")
        if task is None:
            log.warning("scheduled audit cycle skipped: %s",
                        "the auditor is stopping" if self.is_closing else "a cycle is already running")
            return
        await asyncio.wait({task})

    async def _cycle(self, trigger: str, started: asyncio.Future[str] | None) -> AuditOutcome | None:
        """Runs one cycle; a failure is logged and counted, never raised (the next cycle tries again)."""
        run_id: str | None = None

        def on_start(new_id: str) -> None:
            nonlocal run_id
            run_id = new_id
            if started is not None and not started.done():
                started.set_result(new_id)

        async with self._lock:
            runtime = replace(self.runtime, store=_RunAnnouncingStore(self.runtime.store, on_start))
            began = time.monotonic()
            try:
                outcome = await audit_once(runtime, trigger=trigger)
            except AuditorError as exc:  # the database went away mid-cycle (Katapult trouble is a failed run)
                self._failed(trigger, began, str(exc))
                await self._mark_failed(run_id, "store_error" if isinstance(exc, StoreError) else "error", str(exc))
                return None
            except Exception as exc:  # a bug must not stop the daemon: log it whole, record it, go on
                log.exception("audit cycle (%s) broke unexpectedly", trigger)
                self._failed(trigger, began, f"{type(exc).__name__}: {exc}")
                await self._mark_failed(run_id, "internal_error", f"{type(exc).__name__}: {exc}")
                return None
            self.cycles.record(outcome)
            self.last_error = None
            if self.on_cycle is not None:
                try:
                    await self.on_cycle(self.runtime, outcome)
                except Exception:  # the cycle is recorded; a failing follow-up must not turn it into an error
                    log.exception("after audit run %s: the follow-up step failed", outcome.run_id)
            return outcome

    def _failed(self, trigger: str, began: float, reason: str) -> None:
        seconds = time.monotonic() - began
        self.cycles.record_error(seconds)
        self.last_error = reason
        log.error("audit cycle (%s) failed after %.1fs: %s; the next cycle will try again", trigger, seconds,
                  reason, extra={"status": "error", "duration_s": round(seconds, 3), "trigger": trigger})

    async def _mark_failed(self, run_id: str | None, code: str, message: str) -> None:
        """Marks the cycle's run failed if it was recorded and the database answers (else the next start does)."""
        if run_id is None:
            return
        try:
            await self.runtime.store.fail_run(run_id, now=utcnow(), errors=[RunError("*", code, message[:500])],
                                              stats=RunStats())
        except StoreError as exc:
            log.warning("could not mark run %s failed (%s); it will be at the next start", run_id, exc)


class _ApiServer(uvicorn.Server):
    """uvicorn, minus its signal handling: the daemon owns SIGTERM/SIGINT and stops it with `should_exit`.

    uvicorn 0.54's `serve()` installs handlers with `signal.signal` (replacing the loop's) inside
    `capture_signals()` and re-raises the captured signal after shutdown, which would kill the process with
    the signal instead of letting it exit 0.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Captures nothing."""
        yield


def _listen(host: str, port: int) -> socket.socket:
    """Returns a listening socket for the API, so the address is taken (or fails) before anything else starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP (not 0) lets asyncio switch Nagle off on accepted connections; otherwise every small
    # response waits ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise AuditorError(f"api.listen: cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


def _install_signals(stop: asyncio.Event, force: asyncio.Event) -> list[signal.Signals]:
    """Routes SIGTERM/SIGINT to `stop` (a second one to `force`); returns the signals handled."""
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():
            log.warning("%s again: abandoning the running cycle now", sig.name)
            force.set()
            return
        log.info("%s received: shutting down", sig.name)
        stop.set()

    installed = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, on_signal, sig)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no such signal here
            continue
        installed.append(sig)
    return installed


async def _wait_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Sleeps up to `seconds`; returns True if `stop` was set meanwhile."""
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except TimeoutError:
        return False
    return True


async def _open_with_retry(
    stack: contextlib.AsyncExitStack,
    settings: Settings,
    *,
    stop: asyncio.Event,
    transport: httpx.AsyncBaseTransport | None,
    token: str | None,
    notify_transport: httpx.AsyncBaseTransport | None = None,
) -> Runtime | None:
    """Returns the runtime once the database answers, retrying with backoff; None if stopped while waiting."""
    shown = db.safe_url(settings.database.url.get_secret_value())
    cap = max(settings.daemon.db_retry_max.total_seconds(), DB_RETRY_FIRST)
    delay = DB_RETRY_FIRST
    attempt = 1
    while True:
        try:
            runtime: Runtime = await stack.enter_async_context(
                open_runtime(settings, transport=transport, token=token, notify_transport=notify_transport))
            return runtime
        except StoreError as exc:
            log.error("database %s unavailable at start (attempt %d): %s; retrying in %.0fs", shown, attempt, exc,
                      delay, extra={"attempt": attempt, "retry_in_s": delay})
        if await _wait_or_stop(stop, delay):
            return None
        attempt += 1
        delay = min(delay * 2, cap)


async def serve(
    settings: Settings,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    token: str | None = None,
    on_cycle: CycleHook | None = None,
    notify_transport: httpx.AsyncBaseTransport | None = None,
) -> int:
    """Runs the daemon until SIGTERM/SIGINT: scheduled audits plus the HTTP API; returns the exit code.

    `transport` and `token` reach the Katapult client (the demo and tests use the in-process fake);
    `on_cycle` is awaited after every cycle that ran to its end.
    """
    stop = asyncio.Event()
    force = asyncio.Event()
    db.safe_url(settings.database.url.get_secret_value())  # a malformed URL is a configuration error: fail now
    sock = _listen(settings.api.host, settings.api.port)
    handled = _install_signals(stop, force)
    loop = asyncio.get_running_loop()
    try:
        daemon = _Daemon(settings, sock=sock, on_cycle=on_cycle)
        return await daemon.run(stop, force, loop=loop, transport=transport, token=token,
                                notify_transport=notify_transport)
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
        sock.close()


class _Daemon:
    """The running daemon: API server, scheduler, cycle runner and alert delivery, and the order they stop in.

    The API starts first, on its own store (same database), so /healthz answers and /readyz explains while the
    database is still being waited for; audits start once the database answers.
    """

    def __init__(self, settings: Settings, *, sock: socket.socket, on_cycle: CycleHook | None) -> None:
        self.settings = settings
        self.sock = sock
        self.on_cycle = on_cycle
        self.cycles = CycleMetrics()
        self.runtime: Runtime | None = None
        self.runner: CycleRunner | None = None
        self.scheduler = AsyncIOScheduler(timezone=UTC)
        self.delivery: asyncio.Task[None] | None = None
        self.api_store = Store.from_url(settings.database.url.get_secret_value())
        deps = ApiDeps(store=self.api_store, interval=settings.audit.interval, trigger=self._trigger,
                       waivers=lambda: waivers_from(settings), cycles=self.cycles,
                       token=settings.api.resolved_token(), version_ttl=1.0)
        grace = settings.daemon.shutdown_grace.total_seconds()
        config = uvicorn.Config(create_app(deps), log_config=None, access_log=False, lifespan="off",
                                timeout_graceful_shutdown=max(int(grace), int(SERVER_STOP_MIN)))
        self.server = _ApiServer(config)

    async def _trigger(self) -> str | None:
        if self.runner is None:
            raise AuditorError("the auditor is starting: audits begin once the database answers")
        return await self.runner.trigger()

    def _schedule(self, runtime: Runtime, runner: CycleRunner) -> None:
        audit = self.settings.audit
        interval = audit.interval.total_seconds()
        self.scheduler.add_job(
            runner.tick,
            IntervalTrigger(seconds=interval, jitter=int(audit.jitter.total_seconds()) or None, timezone=UTC),
            id="audit-cycle", name="audit cycle", next_run_time=utcnow(), max_instances=1, coalesce=True,
            misfire_grace_time=max(1, int(interval)),
        )
        if runtime.dispatcher is not None:
            # Retries wait in the outbox until due; this round picks them up (and new alerts after each cycle).
            self.scheduler.add_job(self._deliver_tick, IntervalTrigger(seconds=DELIVERY_EVERY, timezone=UTC),
                                   id="alert-delivery", name="alert delivery", max_instances=1, coalesce=True)

    async def _after_cycle(self, runtime: Runtime, outcome: AuditOutcome) -> None:
        if runtime.dispatcher is not None and self.scheduler.running and not self._is_closing:
            self.scheduler.modify_job("alert-delivery", next_run_time=utcnow())  # what the cycle queued, now
        if self.on_cycle is not None:
            await self.on_cycle(runtime, outcome)

    @property
    def _is_closing(self) -> bool:
        return self.runner is not None and self.runner.is_closing

    async def _deliver_tick(self) -> None:
        """The delivery job: one round of the alert outbox (tracked, so shutdown can let it finish)."""
        if self.delivery is not None and not self.delivery.done():
            return
        self.delivery = asyncio.create_task(self._deliver_round(), name="alert-delivery")
        await asyncio.wait({self.delivery})

    async def _deliver_round(self) -> None:
        assert self.runtime is not None
        try:
            report = await deliver(self.runtime)
        except AuditorError as exc:  # the database went away: the entries stay in the outbox for the next round
            log.warning("alert delivery round failed: %s", exc)
            return
        if report.delivered or report.retried or report.failed:
            log.info("alerts: %d delivered, %d to retry, %d failed", report.delivered, report.retried,
                     report.failed)

    async def run(self, stop: asyncio.Event, force: asyncio.Event, *, loop: asyncio.AbstractEventLoop,
                  transport: httpx.AsyncBaseTransport | None, token: str | None,
                  notify_transport: httpx.AsyncBaseTransport | None = None) -> int:
        """Serves, waits for the database, audits until `stop` is set, then shuts down in order; returns the code."""
        s = self.settings
        server_task = asyncio.create_task(self.server.serve(sockets=[self.sock]), name="api-server")
        log.info("API on http://%s (docs /docs, metrics /metrics)", s.api.listen)
        code = EXIT_OK
        try:
            async with contextlib.AsyncExitStack() as stack:
                runtime = await _open_with_retry(stack, s, stop=stop, transport=transport, token=token,
                                                 notify_transport=notify_transport)
                if runtime is None:
                    log.info("stopped while waiting for the database")
                else:
                    abandoned = await runtime.store.abandon_running_runs(
                        now=utcnow(), reason="the auditor stopped before this run finished")
                    if abandoned:
                        log.warning("marked %d run(s) left running by an earlier process as failed", abandoned)
                    self.runtime = runtime
                    self.runner = CycleRunner(runtime, cycles=self.cycles, on_cycle=self._after_cycle)
                    self._schedule(runtime, self.runner)
                    self.scheduler.start()
                    log.info("auditor daemon started: audit every %ss, %d disk(s) and %d organization(s)",
                             int(s.audit.interval.total_seconds()), len(s.audit.disks), len(s.audit.organizations))
                    code = await self._serve_until(stop, server_task)
                await self._shutdown(server_task, force=force, loop=loop)
        finally:
            if not server_task.done():  # e.g. a database error at start: do not leave the server running
                self.server.should_exit = True
                await asyncio.wait({server_task}, timeout=SERVER_STOP_MIN)
            await self.api_store.close()
        return code

    async def _serve_until(self, stop: asyncio.Event, server_task: asyncio.Task[None]) -> int:
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({stopping, server_task}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if stop.is_set():
            return EXIT_OK
        error = None if server_task.cancelled() else server_task.exception()
        log.error("the API server stopped unexpectedly (%s); shutting down", error or "no error")
        return EXIT_FAILED

    async def _shutdown(self, server_task: asyncio.Task[None], *, force: asyncio.Event,
                        loop: asyncio.AbstractEventLoop) -> None:
        """Stops scheduling, lets the cycle finish within the grace (or abandons it), stops the server."""
        grace = self.settings.daemon.shutdown_grace.total_seconds()
        deadline = loop.time() + grace
        if self.scheduler.running:
            self.scheduler.pause()
        if self.runner is not None:
            self.runner.is_closing = True
            await self._finish_cycle(self.runner, force=force, grace=grace)
        if self.delivery is not None and not self.delivery.done():
            # A round in flight finishes within what is left of the grace; undelivered entries stay queued.
            await asyncio.wait({self.delivery}, timeout=max(deadline - loop.time(), 1.0))
            if not self.delivery.done():
                self.delivery.cancel()
                await asyncio.wait({self.delivery}, timeout=CANCEL_WAIT)
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        self.server.should_exit = True
        remaining = max(deadline - loop.time(), SERVER_STOP_MIN)
        done, _ = await asyncio.wait({server_task}, timeout=remaining)
        if not done:
            self.server.force_exit = True
            await asyncio.wait({server_task}, timeout=SERVER_STOP_MIN)
        log.info("auditor daemon stopped")

    async def _finish_cycle(self, runner: CycleRunner, *, force: asyncio.Event, grace: float) -> None:
        """Waits up to the grace for a running cycle; past it (or on a second signal) cancels it."""
        cycle = runner.current
        if cycle is None or cycle.done():
            return
        log.info("waiting up to %.0fs for the running audit cycle to finish", grace)
        forced = asyncio.create_task(force.wait())
        await asyncio.wait({cycle, forced}, timeout=grace, return_when=asyncio.FIRST_COMPLETED)
        forced.cancel()
        if cycle.done():
            return
        log.warning("abandoning the running audit cycle (shutdown_grace %.0fs); its run is marked failed", grace)
        cycle.cancel()
        await asyncio.wait({cycle}, timeout=CANCEL_WAIT)
        # Nothing of a cancelled cycle is committed (one transaction at its end); its run row, still `running`,
        # is marked failed here, or at the next start if the database does not answer now.
        try:
            await runner.runtime.store.abandon_running_runs(
                now=utcnow(), reason="abandoned at shutdown (daemon.shutdown_grace elapsed)")
        except StoreError as exc:
            log.warning("could not mark the abandoned run failed (%s); the next start will", exc)
