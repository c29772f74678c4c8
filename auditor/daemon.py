"""The daemon: process concerns only — signals, the scheduler, the API server, leadership and shutdown.

One event loop runs the APScheduler jobs, the uvicorn API server and the loop-level SIGTERM/SIGINT/SIGHUP
handlers. The use cases (the audit cycle, alert delivery) live in `auditor.service`; this module decides when they
run.

SIGHUP reloads the configuration (`_Daemon.reload`): the file and the environment are read and checked as at
start; an invalid one is logged line by line and changes nothing. A valid one becomes new `Services` (same store
and lease holder, see `service.services.rewire`) for the runner, the scheduler and delivery, and a new API
application (fresh caches, the new waivers and tiers, the new API token) for the next request; what a cycle or a
delivery round in flight uses is closed once it ends. Keys that need a restart keep their running value.

Replicas: several daemons on one database all serve the API; the one holding the `leader` lease (renewed every
daemon.leader_ttl / 3) runs the schedule and the alert delivery. When the leader dies, the lease expires and
another replica takes over within the TTL plus one renewal period.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import uvicorn
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger

from auditor.api import ApiDeps, CycleMetrics, create_app
from auditor.config import RESTART_KEYS, Settings, check_runnable, config_fingerprint, configured_secrets, plan_reload
from auditor.domain.retry import backoff
from auditor.errors import AuditorError, ConfigError, SchemaNewerError, StoreError
from auditor.katapult import Transport
from auditor.log import update_logging
from auditor.service import AuditOutcome, Services, open_services, reading_services, utcnow
from auditor.service.delivery import deliver_due
from auditor.service.housekeeping import abandon_orphans, prune_history
from auditor.service.leases import release_lead, renew_lead, take_lead
from auditor.service.queries import read_recent_runs
from auditor.service.reloads import ConfigStatus
from auditor.service.runner import CycleHook, CycleRunner
from auditor.service.services import close_replaced, database_label, rewire
from auditor.store.holders import Term
from auditor.web.auth import LoginThrottle

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED = 0, 2
DB_RETRY_FIRST = 1.0  # seconds before the first retry of an unreachable database; doubles up to db_retry_max
SERVER_STOP_MIN = 2.0  # seconds the API server always gets to finish in-flight requests at shutdown
CANCEL_WAIT = 5.0  # seconds to wait for a cancelled cycle to unwind (roll back its transaction)
DELIVERY_EVERY = 10.0  # seconds between alert outbox delivery rounds (when notifiers are configured)
ORPHAN_CHECK_EVERY = 10.0  # seconds between the leader's looks for runs whose process is gone (announced at once)
PRUNE_EVERY = timedelta(hours=6)  # how often the leader deletes history older than [history] keep
PRUNE_FIRST = timedelta(minutes=5)  # the first pruning comes a little after taking the lead


Scope = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[dict[str, Any]], Any]


class _CurrentApp:
    """The ASGI application uvicorn serves: hands every request to the API application of the configuration in
    force. A reload swaps `app`; a request already in the old one finishes there (keep-alive connections included:
    each request looks `app` up anew)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


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


def _install_signals(stop: asyncio.Event, force: asyncio.Event, *,
                     on_hangup: Callable[[], None]) -> list[signal.Signals]:
    """Routes SIGTERM/SIGINT to `stop` (a second one to `force`) and SIGHUP to `on_hangup`; returns the signals
    handled."""
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():
            log.warning("%s again: abandoning the running cycle now", sig.name)
            force.set()
            return
        log.info("%s received: shutting down", sig.name)
        stop.set()

    installed = []
    handlers: list[tuple[signal.Signals, Callable[..., None], tuple[Any, ...]]] = [
        (signal.SIGTERM, on_signal, (signal.SIGTERM,)), (signal.SIGINT, on_signal, (signal.SIGINT,))]
    hangup = getattr(signal, "SIGHUP", None)  # not on Windows
    if hangup is not None:
        handlers.append((hangup, on_hangup, ()))
    for sig, handler, args in handlers:
        try:
            loop.add_signal_handler(sig, handler, *args)
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
    current: Callable[[], Settings],
    *,
    stop: asyncio.Event,
    seams: dict[str, Any],
) -> Services | None:
    """Returns the services once the database answers, retrying with backoff; None if stopped while waiting.

    `current` returns the settings in force at each attempt (a reload may come while the database is awaited).
    """
    shown = database_label(current())
    cap = max(current().daemon.db_retry_max.total_seconds(), DB_RETRY_FIRST)
    attempt = 1
    while True:
        # No jitter: one process waiting for its own database makes no herd.
        delay = backoff(attempt, base=DB_RETRY_FIRST, cap=cap, random=lambda: 1.0)
        try:
            services: Services = await stack.enter_async_context(open_services(current(), **seams))
            return services
        except SchemaNewerError:
            raise  # a newer auditor's database: no wait makes this version able to use it (exit 2, one line)
        except StoreError as exc:
            log.error("database %s unavailable at start (attempt %d): %s; retrying in %.0fs", shown, attempt, exc,
                      delay, extra={"attempt": attempt, "retry_in_s": delay})
        if await _wait_or_stop(stop, delay):
            return None
        attempt += 1


async def serve(
    settings: Settings,
    *,
    transport: Transport | None = None,
    token: str | None = None,
    on_cycle: CycleHook | None = None,
    notify_transport: Transport | None = None,
    heartbeat_transport: Transport | None = None,
    reload: Callable[[], Settings] | None = None,
    hangups_at_start: Callable[[], bool] | None = None,
) -> int:
    """Runs the daemon until SIGTERM/SIGINT: leadership, scheduled audits and the HTTP API; returns the exit code.

    `transport` and `token` reach the Katapult client (the demo and tests use the in-process fake);
    `on_cycle` is awaited after every cycle that ran to its end. `reload` reads the configuration again (the
    CLI's loader on the same file); SIGHUP calls it, and without it SIGHUP only says there is nothing to reload.
    `hangups_at_start` says whether a SIGHUP came before the daemon's own handlers (the CLI holds them from its
    first step, since the default action would end the process): it reloads at once.
    """
    stop = asyncio.Event()
    force = asyncio.Event()
    database_label(settings)  # a malformed URL is a configuration error: fail now
    sock = _listen(settings.api.host, settings.api.port)
    loop = asyncio.get_running_loop()
    seams = {"transport": transport, "token": token, "notify_transport": notify_transport,
             "heartbeat_transport": heartbeat_transport}
    daemon = _Daemon(settings, sock=sock, on_cycle=on_cycle, seams=seams, reload=reload)
    handled = _install_signals(stop, force, on_hangup=lambda: daemon.hangup(stop))
    if hangups_at_start is not None and hangups_at_start():
        # A SIGHUP between the process's start and these handlers (the CLI held it): the file may have changed
        # after it was read, so reload now.
        daemon.hangup(stop)
    try:
        return await daemon.run(stop, force, loop=loop)
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
        sock.close()


def _token_values(settings: Settings) -> tuple[str | None, str | None]:
    """Returns the Katapult and API tokens as they read now (None where one cannot be read or is not set)."""
    try:
        katapult_token, api_token = check_runnable(settings)
    except ConfigError:
        return None, None
    return katapult_token.get_secret_value(), api_token.get_secret_value() if api_token else None


class _Daemon:
    """The running daemon: API server, leadership, scheduler, cycle runner and alert delivery, and their order.

    The API starts first, on its own store (same database), so /healthz answers and /readyz explains while the
    database is still being waited for; leadership (and with it the schedule) starts once the database answers.
    """

    def __init__(self, settings: Settings, *, sock: socket.socket, on_cycle: CycleHook | None,
                 seams: dict[str, Any], reload: Callable[[], Settings] | None) -> None:
        self.settings = settings
        self.sock = sock
        self.on_cycle = on_cycle
        self.seams = seams
        self.read_settings = reload
        # The tokens as read at start or the last reload (from the environment or their files): a reload that only
        # changed a token file's content changes no setting, and is logged by these.
        self.tokens = _token_values(settings)
        self.config = ConfigStatus(fingerprint=config_fingerprint(settings), loaded_at=time.time())
        self.reloading = asyncio.Lock()  # one reload at a time, in the order the signals came
        self.background: set[asyncio.Task[None]] = set()  # reloads, and closing what reloads replaced
        self.cycles = CycleMetrics(is_leader=False)
        self.cycles.leading = self.leads_now
        # One login throttle for the process: a reload (which builds a new API application) keeps its waits.
        self.logins = LoginThrottle()
        self.services: Services | None = None
        self.runner: CycleRunner | None = None
        self.scheduler = AsyncIOScheduler(timezone=UTC)
        self.delivery: asyncio.Task[None] | None = None
        self.is_leader = False
        self.term: Term | None = None  # this replica's leader term while it leads
        # When (monotonic) the request of the last successful take or renewal of the leader lease was sent: the
        # lease is ours for leader_ttl from then, by this process's own clock, whatever pause came after.
        self.renewed_at = 0.0
        self.leader_epoch = 0  # the leader lease's epoch as last seen (led or followed); 0 before the first look
        # The API reads through Services of its own (its own store on the same database), ready before the
        # database answers.
        self.api_services = reading_services(settings)
        self.app = _CurrentApp(self._api_app(self.api_services))
        grace = settings.daemon.shutdown_grace.total_seconds()
        config = uvicorn.Config(self.app, interface="asgi3", log_config=None, access_log=False, lifespan="off",
                                timeout_graceful_shutdown=max(int(grace), int(SERVER_STOP_MIN)))
        self.server = _ApiServer(config)

    def _api_app(self, services: Services) -> Any:
        """Returns the API application reading through `services` (its settings give the token and waivers)."""
        deps = ApiDeps(services=services, trigger=self._trigger, cycles=self.cycles,
                       token=services.settings.api.resolved_token(), version_ttl=1.0, revocation_ttl=1.0,
                       leadership=self._leadership, config=self.config, logins=self.logins)
        return create_app(deps)

    async def _trigger(self) -> str | None:
        if self.runner is None:
            raise AuditorError("the auditor is starting: audits begin once the database answers")
        return await self.runner.trigger()

    def _leadership(self) -> dict[str, Any]:
        holder = self.services.holder if self.services is not None else None
        return {"leader": self.leads_now(), "leader_epoch": self.leader_epoch,
                "replica": holder.describe() if holder else None}

    def leads_now(self) -> bool:
        """Whether this process leads at this instant: it took the lead and its term holds by its own clock. A
        process that wakes from a pause answers False at once (its lease was renewed more than leader_ttl ago),
        before its leadership loop has even looked, so /readyz and /metrics never show two leaders."""
        term = self.term
        return self.is_leader and term is not None and self.holds(term)

    # ---- leadership ---------------------------------------------------------------------------------------

    async def _lead(self, stop: asyncio.Event) -> None:
        """Takes or renews the leader lease every ttl/3; leads (schedule + delivery) only while it holds it."""
        ttl = self.settings.daemon.leader_ttl  # a restart key: a reload never changes it
        every = ttl.total_seconds() / 3
        while not stop.is_set():
            services = self.services  # the store and the holder stay the same across reloads
            assert services is not None
            try:
                sent = time.monotonic()
                if self.is_leader and self.term is not None:
                    if await renew_lead(services, term=self.term):
                        self.renewed_at = sent
                    else:
                        self._step_down("the leader lease expired or was taken by another replica")
                else:
                    taken, lease = await take_lead(services)
                    if lease is not None:
                        self._saw_epoch(lease.epoch)
                    if taken and lease is not None:
                        self.renewed_at = sent
                        await self._become_leader(services, lease.term)
                    elif lease is not None:
                        log.debug("following the leader %s (epoch %d)", lease.describe(), lease.epoch)
                if self.runner is not None:  # this process's failed cycles, leader or not: record them now
                    await self.runner.record_failures()
            except StoreError as exc:
                if self.is_leader and time.monotonic() - self.renewed_at > ttl.total_seconds() - every:
                    # Stop leading before the lease can expire under us: another replica may take over then.
                    self._step_down(f"cannot renew the leader lease: {exc}")
                else:
                    log.warning("leadership check failed: %s", exc)
            if await _wait_or_stop(stop, every):
                break

    def _saw_epoch(self, epoch: int) -> None:
        self.leader_epoch = max(self.leader_epoch, epoch)
        self.cycles.leader_epoch = self.leader_epoch

    async def _become_leader(self, services: Services, term: Term) -> None:
        assert self.runner is not None
        self.term = term
        self.is_leader = True
        self.cycles.is_leader = True
        first = await self._first_run_time(services)
        log.warning("this replica (%s) is now the leader (epoch %d): it runs the audit schedule and the alert "
                    "delivery; first cycle at %s", services.holder.describe(), term.epoch,
                    first.isoformat(timespec="seconds"))
        self._schedule_audit(first)
        self.scheduler.add_job(self._prune, IntervalTrigger(seconds=PRUNE_EVERY.total_seconds(), timezone=UTC),
                               id="history-prune", name="history pruning", max_instances=1, coalesce=True,
                               next_run_time=utcnow() + PRUNE_FIRST, replace_existing=True)
        self._schedule_delivery(services)
        # A cycle lost by another process (killed, frozen past its lease) is recorded and announced within
        # leader_ttl + ORPHAN_CHECK_EVERY, not only when the next cycle starts.
        self.scheduler.add_job(self._sweep_orphans, IntervalTrigger(seconds=ORPHAN_CHECK_EVERY, timezone=UTC),
                               id="orphan-check", name="abandoned runs", max_instances=1, coalesce=True,
                               next_run_time=utcnow(), replace_existing=True)

    def _schedule_audit(self, first: datetime) -> None:
        """(Re)places the audit job on [audit] interval and jitter, its next run at `first`."""
        assert self.runner is not None
        audit = self.settings.audit
        interval = audit.interval.total_seconds()
        self.scheduler.add_job(
            self._audit_tick,
            IntervalTrigger(seconds=interval, jitter=int(audit.jitter.total_seconds()) or None, timezone=UTC),
            id="audit-cycle", name="audit cycle", next_run_time=first, max_instances=1, coalesce=True,
            misfire_grace_time=max(1, int(interval)), replace_existing=True,
        )

    def _schedule_delivery(self, services: Services) -> None:
        """Runs the delivery job while there are notifiers (a reload may add the first or remove the last)."""
        if services.dispatcher is not None:
            if self.scheduler.get_job("alert-delivery") is None:
                # Retries wait in the outbox until due; this round picks them up (and new alerts after each cycle).
                self.scheduler.add_job(self._deliver_tick, IntervalTrigger(seconds=DELIVERY_EVERY, timezone=UTC),
                                       id="alert-delivery", name="alert delivery", max_instances=1, coalesce=True,
                                       next_run_time=utcnow(), replace_existing=True)
        elif self.scheduler.get_job("alert-delivery") is not None:
            self.scheduler.remove_job("alert-delivery")

    async def _first_run_time(self, services: Services) -> datetime:
        """Returns when the new leader's first cycle runs: now, unless a cycle started less than an interval ago."""
        now = utcnow()
        try:
            runs = await read_recent_runs(services, limit=1)
        except StoreError:
            return now
        if not runs:
            return now
        due = runs[0].started_at + self.settings.audit.interval
        return due if now < due < now + self.settings.audit.interval else now

    def _step_down(self, reason: str) -> None:
        if not self.is_leader:
            return
        self.is_leader = False
        self.term = None
        self.cycles.is_leader = False
        log.warning("this replica is no longer the leader (%s): schedule paused", reason)
        for job_id in ("audit-cycle", "alert-delivery", "history-prune", "orphan-check"):
            with contextlib.suppress(Exception):
                self.scheduler.remove_job(job_id)

    # ---- jobs ---------------------------------------------------------------------------------------------

    def _deliver_now(self) -> None:
        """Brings the next delivery round forward to now (what was just queued goes out at once)."""
        services = self.services
        if (services is not None and services.dispatcher is not None and self.scheduler.running and self.is_leader
                and not self._is_closing):
            with contextlib.suppress(Exception):  # the job is gone if leadership was lost meanwhile
                self.scheduler.modify_job("alert-delivery", next_run_time=utcnow())

    async def _after_cycle(self, services: Services, outcome: AuditOutcome) -> None:
        self._deliver_now()  # what the cycle queued, now
        if services.heartbeat is not None:
            self.cycles.heartbeat_failures = services.heartbeat.failures
        if self.on_cycle is not None:
            await self.on_cycle(services, outcome)

    @property
    def _is_closing(self) -> bool:
        return self.runner is not None and self.runner.is_closing

    async def _still_leader(self) -> bool:
        """Renews the leader lease before a leader job acts: a job that fires late (the process was paused) finds
        the lease expired, steps down and does nothing; the leadership loop may take the lead anew."""
        assert self.services is not None
        if self.term is None:
            return False
        try:
            sent = time.monotonic()
            if await renew_lead(self.services, term=self.term):
                self.renewed_at = sent
                return True
        except StoreError as exc:
            log.warning("leader job skipped: the leader lease could not be renewed (%s)", exc)
            return False
        self._step_down("the leader lease expired or was taken by another replica")
        return False

    async def _audit_tick(self) -> None:
        """The scheduled audit job, run only while this process still holds the leader lease."""
        assert self.runner is not None
        if await self._still_leader():
            await self.runner.tick()

    async def _sweep_orphans(self) -> None:
        """The leader's look for runs left `running` by a process that is gone: recorded failed and announced."""
        assert self.services is not None
        if not await self._still_leader():
            return
        # Also while this process runs a cycle: a run is marked only when its cycle lease is not live, so a cycle
        # in flight here is left alone, and one this process lost while paused is announced now.
        try:
            if await abandon_orphans(self.services):
                self._deliver_now()  # its audit-incomplete goes out now, not at the next delivery round
        except asyncio.CancelledError:
            return
        except StoreError as exc:
            log.warning("looking for abandoned runs failed: %s; the next round tries again", exc)
        except Exception:  # never "Task exception was never retrieved": log it whole
            log.exception("looking for abandoned runs broke unexpectedly")

    async def _prune(self) -> None:
        """The pruning job: history older than [history] keep goes, so the database stays bounded."""
        assert self.services is not None
        if not await self._still_leader():
            return
        try:
            await prune_history(self.services)
        except asyncio.CancelledError:  # shutdown while pruning: the transaction rolls back, the next start prunes
            return
        except StoreError as exc:
            log.warning("history pruning failed: %s; the next round tries again", exc)
        except Exception:  # never "Task exception was never retrieved": log it whole
            log.exception("history pruning broke unexpectedly")

    async def _deliver_tick(self) -> None:
        """The delivery job: one round of the alert outbox (tracked, so shutdown can let it finish)."""
        if self.delivery is not None and not self.delivery.done():
            return
        if not await self._still_leader():
            return
        self.delivery = asyncio.create_task(self._deliver_round(), name="alert-delivery")
        try:
            await asyncio.wait({self.delivery})
        except asyncio.CancelledError:
            # Shutdown stops the scheduler while this job waits: the round itself is tracked in `self.delivery`
            # and shutdown lets it finish (or cancels it) — not an error worth a traceback in the log.
            return

    def holds(self, term: Term) -> bool:
        """Returns whether this process still leads in `term` by its own clock: not stepped down or released, and
        the lease renewed less than leader_ttl ago (a process that wakes from a pause learns it here, before its
        next send, without asking the database)."""
        ttl = self.settings.daemon.leader_ttl.total_seconds()
        return self.term is term and time.monotonic() - self.renewed_at < ttl

    async def _deliver_round(self) -> None:
        assert self.services is not None
        term = self.term
        if term is None:
            return  # stepped down since the job started
        try:
            report = await deliver_due(self.services, term=term, holds=lambda: self.holds(term))
        except StoreError as exc:  # the database went away: the entries stay in the outbox for the next round
            log.warning("alert delivery round failed: %s", exc)
            return
        except Exception:  # never "Task exception was never retrieved": log it whole; the next round retries
            log.exception("alert delivery round broke unexpectedly")
            self.cycles.delivery_errors += 1
            return
        self.cycles.delivery_errors += report.errors

    # ---- run and stop -------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, force: asyncio.Event, *, loop: asyncio.AbstractEventLoop) -> int:
        """Serves, waits for the database, leads or follows until `stop` is set, then shuts down in order."""
        s = self.settings
        server_task = asyncio.create_task(self.server.serve(sockets=[self.sock]), name="api-server")
        log.info("API on http://%s (docs /docs, metrics /metrics)", s.api.listen)
        code = EXIT_OK
        lead: asyncio.Task[None] | None = None
        try:
            async with contextlib.AsyncExitStack() as stack:
                services = await _open_with_retry(stack, lambda: self.settings, stop=stop, seams=self.seams)
                if services is None:
                    log.info("stopped while waiting for the database")
                else:
                    # Runs before open_services closes `services`: closes what reloads put in its place.
                    stack.push_async_callback(self._close_reloaded, services)
                    self.services = services
                    s = services.settings
                    self.runner = CycleRunner(services, cycles=self.cycles, on_cycle=self._after_cycle)
                    self.runner.leader = lambda: self.term
                    self.scheduler.start()
                    lead = asyncio.create_task(self._lead(stop), name="leadership")
                    log.info("auditor daemon started as %s: audit every %ss, %d disk(s) and %d organization(s); "
                             "leader lease ttl %ss", services.holder.describe(),
                             int(s.audit.interval.total_seconds()), len(s.audit.disks), len(s.audit.organizations),
                             int(s.daemon.leader_ttl.total_seconds()))
                    code = await self._serve_until(stop, server_task)
                await self._shutdown(server_task, force=force, loop=loop, lead=lead)
        finally:
            if not server_task.done():  # e.g. a database error at start: do not leave the server running
                self.server.should_exit = True
                await asyncio.wait({server_task}, timeout=SERVER_STOP_MIN)
            await self.api_services.aclose()  # the store every generation of the API's Services shared
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
                        loop: asyncio.AbstractEventLoop, lead: asyncio.Task[None] | None) -> None:
        """Stops scheduling, lets the cycle finish within the grace (or abandons it), hands leadership over."""
        grace = self.settings.daemon.shutdown_grace.total_seconds()
        deadline = loop.time() + grace
        if self.scheduler.running:
            self.scheduler.pause()
        if lead is not None:
            lead.cancel()
            await asyncio.wait({lead}, timeout=CANCEL_WAIT)
        if self.runner is not None:
            self.runner.is_closing = True
        if self.services is not None and self.is_leader and self.term is not None:
            # Hand over first: stop acting as the leader (no new claims, `/readyz` says so) and release the lease,
            # so a follower takes over at its next check while this process finishes or abandons what is in
            # flight within the grace. The cycle lease still keeps that cycle and the next leader's apart; what
            # the round in flight records after the release is refused (its term is over) and the next leader
            # sends it again, same Idempotency-Key.
            term = self.term
            self._step_down("shutting down")
            try:
                await release_lead(self.services, term=term)
            except StoreError as exc:
                log.warning("could not release the leader lease (%s); it expires on its own", exc)
        if self.runner is not None:
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

    # ---- reload (SIGHUP) -----------------------------------------------------------------------------------

    def hangup(self, stop: asyncio.Event) -> None:
        """The SIGHUP handler: starts a reload (reloads run one after the other); ignored while stopping."""
        if stop.is_set():
            log.info("SIGHUP received while shutting down: not reloading")
            return
        if self.read_settings is None:
            log.info("SIGHUP received: there is no configuration file to reload")
            return
        log.info("SIGHUP received: reloading the configuration")
        self._in_background(self.reload(), name="config-reload")

    def _in_background(self, coro: Any, *, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def reload(self) -> bool:
        """Reads the configuration again and puts it in force; returns False (logging each problem) if invalid."""
        assert self.read_settings is not None
        async with self.reloading:
            try:
                # A small TOML file: read on the loop, like at start.
                new = self.read_settings()
                check_runnable(new)
                database_label(new)  # a malformed URL is refused as at start (even though it needs a restart)
            except ConfigError as err:
                for line in err.problems:
                    log.error("config error: %s", line)
                self.config.failed()
                log.error("configuration reload failed (%d problem(s)): the running configuration (%s) stays in "
                          "force", len(err.problems), self.config.fingerprint)
                return False
            except Exception:  # a bug in reading: keep running on what is in force
                log.exception("configuration reload broke unexpectedly: the running configuration stays in force")
                self.config.failed()
                return False
            plan = plan_reload(self.settings, new)
            settings = plan.settings
            katapult_token, api_token = check_runnable(settings)
            # Before anything is logged about the new configuration: its secrets are masked from here on.
            update_logging(level=settings.log.level, secrets=[
                *configured_secrets(settings), katapult_token.get_secret_value(),
                *([api_token.get_secret_value()] if api_token is not None else [])])
            for key in plan.restart:
                log.warning("config reload: %s changed but needs a restart (%s): it keeps its running value",
                            key, RESTART_KEYS[key])
            await self._put_in_force(settings)
            self.config.succeeded(config_fingerprint(settings))
            tokens = (katapult_token.get_secret_value(), api_token.get_secret_value() if api_token else None)
            # A token file's new content changes no setting: said by itself (never its value), with when it counts.
            token_news = [f"{name} changed ({when})" for (name, section, when), before, after in zip(
                (("the Katapult token", "katapult.api_token", "used from the next cycle"),
                 ("the API token", "api.token", "in force now")), self.tokens, tokens, strict=True)
                if before != after and not any(k.startswith(section) for k in plan.changed)]
            self.tokens = tokens
            said = [", ".join(plan.changed) + " take(s) effect from the next cycle"] if plan.changed else []
            log.info("configuration reloaded (%s): %s", self.config.fingerprint,
                     "; ".join(said + token_news) or "nothing that can be reloaded changed")
            return True

    async def _put_in_force(self, settings: Settings) -> None:
        """Swaps in Services and an API application built on `settings`; closes what they replace after use."""
        old_interval = (self.settings.audit.interval, self.settings.audit.jitter)
        self.settings = settings
        old = self.services
        if old is not None and self.runner is not None:
            new = rewire(old, settings, **self.seams)
            in_flight = {t for t in (self.runner.current, self.delivery) if t is not None and not t.done()}
            self.services = self.runner.services = new
            self._in_background(self._retire(old, new, in_flight), name="config-retire")
            if self.is_leader and self.scheduler.running:
                if (settings.audit.interval, settings.audit.jitter) != old_interval:
                    self._schedule_audit(await self._first_run_time(new))
                self._schedule_delivery(new)
        # The API's Services share the store (database.url needs a restart): nothing to close. A new application
        # has fresh caches, so the report shows the new waivers and tiers from the next request on.
        self.api_services = replace(self.api_services, settings=settings)
        self.app.app = self._api_app(self.api_services)

    async def _retire(self, old: Services, new: Services, in_flight: set[asyncio.Task[Any]]) -> None:
        """Closes what `old` held and `new` does not, once the cycle or delivery round using it has ended."""
        if in_flight:
            await asyncio.wait(in_flight)
        try:
            await close_replaced(old, new)
        except Exception:  # closing a client must not break the daemon
            log.exception("closing what the reloaded configuration replaced failed")

    async def _close_reloaded(self, first: Services) -> None:
        """At shutdown: lets pending retirements finish, then closes what reloads opened that `first` (closed by
        open_services) does not hold."""
        if self.background:
            await asyncio.wait(set(self.background), timeout=CANCEL_WAIT)
        if self.services is not None and self.services is not first:
            await close_replaced(self.services, first)

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
        # Nothing of a cancelled cycle is committed (one transaction at its end) and its lease is released on
        # the way out; its run row, still `running`, is marked failed here, or by the next process to look.
        try:
            await abandon_orphans(runner.services)
        except StoreError as exc:
            log.warning("could not mark the abandoned run failed (%s); the next process will", exc)
