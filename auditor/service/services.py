"""The application layer: `Services` wired from settings plus explicit seams, and the use cases on it.

Use cases: `run_cycle` (one audit cycle under the cycle lease, recorded in one fenced transaction with its
alerts), `deliver_due` and `drain` (the alert outbox), `record_pending_failures` (failed cycles the database could
not take yet), and the read-side helpers the CLI and the API share. Each use case reads the clock once.

Seams: the Katapult transport and token, the notifier transport, the heartbeat transport and the clock are
parameters of `open_services`, so tests and the demo drive the real code against in-process fakes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from auditor.config import NotifierCommon, RuleOverride, RulesSettings, Settings, TierSettings
from auditor.domain.alerts import Delivery
from auditor.domain.lifecycle import Change, Transition, parse_waivers, reconcile
from auditor.domain.models import Interval, ReadOutcome, Severity, Waiver, WaiverProblem
from auditor.domain.records import RunError, RunStats, RunStatus
from auditor.domain.rules import RULES, RuleParams, RuleSet, build_ruleset
from auditor.domain.tiers import Tier, tier_from_tables
from auditor.errors import AuditorError, LeaseHeldError, LeaseLostError, SchemaError, StoreError
from auditor.katapult import KatapultClient, Transport
from auditor.notify.dispatch import Dispatcher
from auditor.notify.heartbeat import Heartbeat, summary_line
from auditor.service.alerts import DeliveryReport, deliver_due, incomplete_fingerprint, plan_notifications
from auditor.service.cycle import (
    INTERNAL_ERROR,
    AuditOutcome,
    Collected,
    Progress,
    Targets,
    collect,
    internal_error,
    judge,
    open_after,
    run_status,
    utcnow,
    verdicts_after,
)
from auditor.store import engine as db
from auditor.store import queries, writes
from auditor.store.leases import CYCLE, Holder, Lease, Leases
from auditor.store.outbox import Outbox
from auditor.store.repo import Store
from auditor.store.writes import CycleWrite, new_run_id
from auditor.vocabulary import format_duration

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
# How many pending outbox entries `drain` looks at to find the next due one and to explain what is left.
DRAIN_SCAN = 1000


def _changes(source: RuleOverride | TierSettings) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    if source.min_retention is not None:
        changes["min_retention"] = source.min_retention
    if source.min_retention_days is not None:
        changes["min_retention_days"] = source.min_retention_days
    if source.max_interval is not None:
        changes["max_interval"] = Interval(source.max_interval)
    if source.stale_grace is not None:
        changes["stale_grace"] = source.stale_grace
    return changes


def with_tiers(changes: list[Change], collected: Collected) -> list[Change]:
    """Returns the changes with each new or reopened finding labelled with its disk's tier (`TrackedFinding.tier`);
    other findings keep the label they opened with, so an alert resolves with the labels it fired with."""
    tiers = {w.snapshot.disk_id: w.snapshot.tier.name for w in collected.disks if w.snapshot.tier.name}
    return [replace(c, finding=replace(c.finding, tier=tiers.get(c.finding.disk_id)))
            if c.previous is None or c.kind is Transition.REOPENED else c for c in changes]


def tier_from(settings: TierSettings) -> Tier:
    """Returns the domain Tier for one [[tiers]] entry."""
    m = settings.match
    return tier_from_tables(settings.name, disk_annotations=m.disk_annotations, vm_annotations=m.vm_annotations,
                            organizations=m.organizations, exempt=settings.exempt, reason=settings.reason)


def ruleset_from(settings: RulesSettings, tiers: Sequence[TierSettings] = ()) -> RuleSet:
    """Returns the domain RuleSet for the [rules] table and the [[tiers]] entries."""
    default = RuleParams(
        min_retention=settings.min_retention,
        min_retention_days=settings.min_retention_days,
        max_interval=Interval(settings.max_interval),
        stale_grace=settings.stale_grace,
    )
    return build_ruleset(
        default=default,
        overrides=[(o.disks, _changes(o)) for o in settings.overrides],
        severity={rule: Severity(sev) for rule, sev in settings.severity.items()},
        disabled=settings.disabled,
        tiers=[(tier_from(t), _changes(t), {rule: Severity(sev) for rule, sev in t.severity.items()}, t.disabled)
               for t in tiers],
    )


def waivers_from(settings: Settings, *, now: datetime | None = None) -> tuple[list[Waiver], list[WaiverProblem]]:
    """Returns the configured waivers that apply now, and the problems of those that don't."""
    return parse_waivers(settings.waivers, known_rules=RULES.keys(), now=now or utcnow())


def targets_from(settings: Settings) -> Targets:
    """Returns the audit targets."""
    return Targets(tuple(settings.audit.disks), tuple(settings.audit.organizations))


async def prepare_database(settings: Settings) -> None:
    """Brings the schema to head (SQLite always; PostgreSQL unless auto_migrate is off, then checks it)."""
    url = settings.database.url.get_secret_value()
    if db.is_sqlite(url) or settings.database.auto_migrate:
        await db.upgrade(url)
        return
    await check_schema(url, hint="run `auditor db upgrade` (database.auto_migrate is false)")


async def check_schema(url: str, *, hint: str = "run `auditor db upgrade` or start `auditor run` once") -> None:
    """Raises SchemaError unless the database exists and is at the code's head revision (never creates it)."""
    if db.sqlite_file_missing(url):
        raise SchemaError(f"database {db.safe_url(url)} does not exist: check database.url, or {hint}")
    current, head = await db.current_revision(url)
    if current != head:
        raise SchemaError(f"database {db.safe_url(url)} is at schema revision {current or 'none'}, this version "
                          f"needs {head}: {hint}")


def client_from(settings: Settings, *, transport: Transport | None = None, token: str | None = None) -> KatapultClient:
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
        max_response_bytes=k.max_response_bytes,
        transport=transport,
    )


@dataclass(slots=True)
class PendingFailure:
    """A failed cycle the database could not take yet: recorded (run row and alert) as soon as it can."""

    run_id: str
    trigger: str
    started_at: datetime
    finished_at: datetime
    errors: list[RunError]
    stats: RunStats


@dataclass(slots=True)
class DrainReport:
    """What `drain` left behind."""

    pending: int = 0
    reasons: list[str] = field(default_factory=list)


@dataclass
class Services:
    """The wired objects every use case works with; built by `open_services`."""

    settings: Settings
    store: Store
    client: KatapultClient | None
    rules: RuleSet
    targets: Targets
    dispatcher: Dispatcher | None = None
    heartbeat: Heartbeat | None = None
    clock: Clock = utcnow
    holder: Holder = field(default_factory=Holder.current)
    pending_failures: list[PendingFailure] = field(default_factory=list)
    consecutive_failed: int = 0

    @property
    def worker(self) -> str:
        """Returns this process's id as a deliverer (the lease holder id)."""
        return self.holder.id

    @property
    def outbox(self) -> Outbox:
        """Returns the alert outbox on this store."""
        return Outbox(self.store)

    @property
    def leases(self) -> Leases:
        """Returns the leases on this store."""
        return Leases(self.store)

    @property
    def notifiers(self) -> dict[str, NotifierCommon]:
        """Returns the configured notifiers by name."""
        return {n.name: n for n in self.settings.notifiers}

    @property
    def lease_ttl(self) -> timedelta:
        """Returns how long a lease lives without renewal (daemon.leader_ttl)."""
        return self.settings.daemon.leader_ttl

    def waivers(self) -> tuple[list[Waiver], list[WaiverProblem]]:
        """Returns the waivers that apply now and the problems of those that don't."""
        return waivers_from(self.settings, now=self.clock())

    # ---- the audit cycle --------------------------------------------------------------------------------

    async def run_cycle(self, *, trigger: str = "manual", run_id: str | None = None,
                        progress: Progress | None = None, wait: float = 0.0) -> AuditOutcome:
        """Runs one audit cycle under the cycle lease and records it; returns what happened.

        Never raises for Katapult trouble, a malformed response or a bug judging one disk (that disk is unknown).
        Raises LeaseHeldError when another process runs a cycle (after waiting up to `wait` seconds). Any other
        failure — the database, a bug outside the per-disk boundaries — ends the run `failed`, recorded with its
        `audit-incomplete` alert now or, if the database cannot take it, as soon as it can.
        """
        assert self.client is not None, "run_cycle needs a Katapult client"
        run_id = run_id or new_run_id()
        began = time.monotonic()
        now = self.clock()
        try:
            # Another process's cycle is not a failure of this one: no heartbeat ping, the holder pings its own.
            await self._take_cycle_lease(run_id, wait=wait)
        except StoreError as exc:
            outcome = await self._fail(run_id, trigger, now, began, RunError("*", "database_unavailable", str(exc)))
            return self._finish(outcome)
        # The cycle starts now, not when it began waiting for the lease: its poll time and start follow the wait.
        began = time.monotonic()
        now = self.clock()
        self._ping("start", f"{trigger} run {run_id} starting")
        renewer = asyncio.create_task(self._renew_cycle_lease(), name=f"cycle-lease-{run_id[:8]}")
        try:
            outcome = await self._cycle(run_id, trigger, now, began, progress)
        except LeaseLostError as exc:
            # Another process took over after our lease expired; it marks this run abandoned. Nothing is written.
            log.error("audit run %s: %s", run_id, exc)
            outcome = AuditOutcome(run_id, RunStatus.FAILED, now, now + _elapsed(began),
                                   errors=[RunError("*", "lease_lost", str(exc))], stats=self._stats())
        except StoreError as exc:
            outcome = await self._fail(run_id, trigger, now, began, RunError("*", "database_unavailable", str(exc)))
        except AuditorError as exc:
            outcome = await self._fail(run_id, trigger, now, began,
                                       RunError("*", getattr(exc, "code", "error"), str(exc)[:500]))
        except Exception as exc:  # a bug outside the per-disk boundaries: the run fails loudly, never silently
            code, message = internal_error(exc, where=f"audit run {run_id}")
            outcome = await self._fail(run_id, trigger, now, began, RunError("*", code, message))
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
            await self._release_cycle_lease()
        return self._finish(outcome)

    async def _take_cycle_lease(self, run_id: str, *, wait: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(wait, 0.0)
        while True:
            now = self.clock()
            taken, lease = await self.leases.acquire(CYCLE, self.holder, now=now, ttl=self.lease_ttl, run_id=run_id)
            if taken:
                return
            if loop.time() >= deadline:
                raise _held(lease)
            await asyncio.sleep(min(1.0, max(deadline - loop.time(), 0.05)))

    async def _renew_cycle_lease(self) -> None:
        every = self.lease_ttl.total_seconds() / 3
        while True:
            await asyncio.sleep(every)
            try:
                if not await self.leases.renew(CYCLE, self.holder, now=self.clock(), ttl=self.lease_ttl):
                    log.error("the cycle lease was lost (expired and taken by another process); this cycle's "
                              "commit will be refused")
                    return
            except StoreError as exc:
                log.warning("could not renew the cycle lease: %s", exc)

    async def _release_cycle_lease(self) -> None:
        try:
            await self.leases.release(CYCLE, self.holder)
        except StoreError as exc:
            log.warning("could not release the cycle lease (%s); it expires on its own", exc)

    async def _cycle(self, run_id: str, trigger: str, now: datetime, began: float,
                     progress: Progress | None) -> AuditOutcome:
        assert self.client is not None
        abandoned = await self.store.write(writes.abandon_orphaned_runs, now=now)
        if abandoned:
            log.warning("marked %d run(s) left running by a process that is gone as failed: %s", len(abandoned),
                        ", ".join(abandoned))
        await self.store.write(writes.start_run, now=now, trigger=trigger, run_id=run_id, owner=self.holder.id)
        self.client.stats.snapshot_and_reset()
        known = await self.store.read(queries.target_sources)
        collected = await collect(self.client, self.targets, known_sources=known,
                                  concurrency=self.settings.katapult.max_concurrency, progress=progress,
                                  rules=self.rules)
        findings = judge(collected, self.rules, now=now)
        valid_waivers, problems = parse_waivers(self.settings.waivers, known_rules=RULES.keys(), now=now)
        settled = {w.snapshot.disk_id for w in collected.disks if w.snapshot.outcome is not ReadOutcome.UNKNOWN}
        status = run_status(collected)
        stats = self._stats()
        finished = now + _elapsed(began)
        async with self.store.transaction() as tx:
            # The fence: renewing the lease inside the commit refuses the write if another process took over.
            await tx.check_lease(self.holder, now=self.clock(), ttl=self.lease_ttl)
            previous = await tx.run(queries.active_findings, extra=(f.fingerprint for f in findings))
            changes = with_tiers(reconcile(previous, findings, settled_disks=settled | collected.retired,
                                           waivers=valid_waivers, now=now), collected)
            history = verdicts_after(collected, previous, changes)
            await tx.run(writes.write_cycle, CycleWrite(
                run_id=run_id, now=now, status=status, targets_checked=collected.targets_checked, stats=stats,
                errors=collected.errors, disks=collected.disks, changes=changes, retired_disks=collected.retired,
                finished_at=finished, disk_statuses=history.disk_statuses,
                open_by_severity=history.open_by_severity, open_by_rule=history.open_by_rule))
            if self.settings.notifiers:
                plan = plan_notifications(notifiers=self.settings.notifiers, changes=changes, run_status=status,
                                          errors=collected.errors, incomplete_fp=self._incomplete_fp,
                                          states=await tx.run(queries.alert_state_map), now=now,
                                          interval=self.settings.audit.interval, untouched=previous.values())
                await tx.run(writes.enqueue, plan.entries, plan.states, run_id=run_id, now=now)
        opened = sum(1 for c in changes if c.kind.value in ("opened", "reopened", "unwaived"))
        resolved = sum(1 for c in changes if c.kind.value == "resolved")
        return AuditOutcome(
            run_id=run_id, status=status, started_at=now, finished_at=finished,
            targets_checked=collected.targets_checked, disks_ok=len(settled),
            disks_unknown=len(collected.disks) - len(settled), errors=collected.errors, stats=stats,
            opened=opened, resolved=resolved, open_findings=open_after(previous, changes),
            waiver_problems=problems, changes=changes, trigger=trigger,
        )

    @property
    def _incomplete_fp(self) -> str:
        return incomplete_fingerprint(self.settings.audit.disks, self.settings.audit.organizations)

    def _stats(self) -> RunStats:
        if self.client is None:
            return RunStats()
        s = self.client.stats.snapshot_and_reset()
        return RunStats(s.requests, s.retries, s.rate_limited, dict(s.by_status))

    async def _fail(self, run_id: str, trigger: str, now: datetime, began: float, error: RunError) -> AuditOutcome:
        """Returns a failed outcome, recorded with its alert now or queued until the database takes it."""
        log.error("audit run %s failed: %s: %s", run_id, error.code, error.message)
        failure = PendingFailure(run_id, trigger, now, now + _elapsed(began), [error], self._stats())
        self.pending_failures.append(failure)
        await self.record_pending_failures()
        return AuditOutcome(run_id, RunStatus.FAILED, now, failure.finished_at, errors=failure.errors,
                            stats=failure.stats, trigger=trigger)

    async def record_pending_failures(self) -> int:
        """Records failed cycles (run row and `audit-incomplete` alert) the database could not take before.

        Returns how many are still waiting. Idempotent: the alert fires once while it is firing already.
        """
        while self.pending_failures:
            f = self.pending_failures[0]
            try:
                # What must not be lost, alone in its transaction: the failed run and its audit-incomplete alert
                # (it reads nothing else, so even a database missing the findings table takes it).
                async with self.store.transaction() as tx:
                    await tx.run(writes.record_failed_run, f.run_id, trigger=f.trigger, started_at=f.started_at,
                                               finished_at=f.finished_at, errors=f.errors, stats=f.stats,
                                               owner=self.holder.id)
                    if self.settings.notifiers:
                        plan = plan_notifications(notifiers=self.settings.notifiers, changes=[],
                                                  run_status=RunStatus.FAILED, errors=f.errors,
                                                  incomplete_fp=self._incomplete_fp,
                                                  states=await tx.run(queries.alert_state_map), now=f.finished_at,
                                                  interval=self.settings.audit.interval)
                        await tx.run(writes.enqueue, plan.entries, plan.states, run_id=f.run_id, now=f.finished_at)
            except StoreError as exc:
                log.error("could not record failed run %s yet (%s); %d failure(s) waiting, retrying",
                          f.run_id, exc, len(self.pending_failures))
                return len(self.pending_failures)
            self.pending_failures.pop(0)
            await self._keep_open_alerts_alive(f)
        return 0

    async def _keep_open_alerts_alive(self, f: PendingFailure) -> None:
        """After a failed cycle, re-posts open findings to Alertmanager so it does not resolve them (best effort)."""
        if not any(n.kind == "alertmanager" for n in self.settings.notifiers):
            return
        try:
            async with self.store.transaction() as tx:
                plan = plan_notifications(notifiers=self.settings.notifiers, changes=[],
                                          run_status=RunStatus.FAILED, errors=f.errors,
                                          incomplete_fp=self._incomplete_fp,
                                          states=await tx.run(queries.alert_state_map),
                                          now=f.finished_at, interval=self.settings.audit.interval,
                                          untouched=(await tx.run(queries.active_findings)).values())
                await tx.run(writes.enqueue, plan.entries, plan.states, run_id=f.run_id, now=f.finished_at)
        except StoreError as exc:
            log.warning("after failed run %s: could not re-post open alerts to Alertmanager: %s", f.run_id, exc)

    def _finish(self, outcome: AuditOutcome) -> AuditOutcome:
        if outcome.status is RunStatus.FAILED:
            self.consecutive_failed += 1
        else:
            self.consecutive_failed = 0
        reason = "; ".join(f"{e.target}: {e.code}" for e in outcome.errors[:3]) or None
        body = summary_line(status=outcome.status.value, targets=outcome.targets_checked,
                            disks=outcome.disks_ok + outcome.disks_unknown, unknown=outcome.disks_unknown,
                            opened=outcome.opened, resolved=outcome.resolved, requests=outcome.stats.requests,
                            run_id=outcome.run_id, reason=reason if outcome.status is not RunStatus.COMPLETE else None)
        self._ping("success" if outcome.status is RunStatus.COMPLETE else "fail", body)
        log_cycle(outcome)
        return outcome

    def _ping(self, kind: str, body: str) -> None:
        if self.heartbeat is None:
            return
        try:
            getattr(self.heartbeat, kind)(body)
        except Exception:  # the dead-man's switch never fails a cycle
            log.exception("heartbeat %s could not be queued", kind)

    # ---- alerts -----------------------------------------------------------------------------------------

    async def deliver_due(self) -> DeliveryReport:
        """Runs one delivery round of the alert outbox."""
        if self.dispatcher is None:
            return DeliveryReport()
        return await deliver_due(outbox=self.outbox, dispatcher=self.dispatcher, notifiers=self.notifiers,
                                 clock=self.clock, worker=self.worker,
                                 max_retry_after=self.settings.notify.max_retry_after)

    async def drain(self, *, within: float) -> DrainReport:
        """Delivers until nothing is pending or `within` seconds pass, waiting out retries that fit; returns
        what remains and why.

        After a temporary failure `deliver_due` has already planned the retry (backoff, Retry-After): this waits
        until the earliest pending entry is due when that fits in what is left of the budget, never sooner.
        """
        report = DrainReport()
        if self.dispatcher is None:
            return report
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        slept = False
        while loop.time() < deadline:
            try:
                r = await asyncio.wait_for(self.deliver_due(), timeout=max(0.1, deadline - loop.time()))
            except TimeoutError:
                report.reasons.append("the drain budget ran out mid-delivery")
                break
            worked = r.delivered + r.failed + r.retried + r.released + r.errors > 0
            if slept and not worked:
                break  # waited until an entry was due and none could be claimed (another process, or a fixed clock)
            due = await self._earliest_pending()
            if due is None:
                break
            wait = (due - self.clock()).total_seconds()
            if wait <= 0:
                if not worked:
                    break  # due but claimed by someone else: that deliverer owns it now
                continue
            if wait > deadline - loop.time():
                break
            await asyncio.sleep(wait)
            slept = True
        report.pending = await self.outbox.pending_count()
        if report.pending:
            report.reasons.extend(await self._pending_reasons())
        return report

    async def _earliest_pending(self) -> datetime | None:
        """Returns when the earliest pending outbox entry is due, or None when none is pending."""
        pending = await self.outbox.recent(limit=DRAIN_SCAN, state="pending")
        return min((d.next_attempt_at for d in pending), default=None)

    async def _pending_reasons(self) -> list[str]:
        """Returns one line per notifier with undelivered entries: its last error and when it is tried next."""
        pending = await self.outbox.recent(limit=DRAIN_SCAN, state="pending")
        first: dict[str, Delivery] = {}
        for d in sorted(pending, key=lambda d: d.next_attempt_at):
            first.setdefault(d.notifier, d)
        now = self.clock()
        lines = []
        for name, d in sorted(first.items()):
            error = d.last_error or "not tried yet"
            # Notify errors read "<kind> notifier '<name>': HTTP 503: …"; the line names the notifier once.
            _, named, rest = error.partition(f"notifier '{name}': ")
            error = rest if named else error
            head = error if error.startswith(f"{name}:") else f"{name}: {error}"
            seconds = max(0.0, (d.next_attempt_at - now).total_seconds())
            lines.append(f"{head} (next try in {format_duration(seconds, style='wait')})")
        return lines

    # ---- leases and housekeeping ------------------------------------------------------------------------

    async def cycle_lease(self) -> Lease | None:
        """Returns the cycle lease as it stands (live or not)."""
        return await self.leases.get(CYCLE)

    async def abandon_orphans(self) -> list[str]:
        """Marks runs whose owner is gone as failed/abandoned; returns their ids."""
        return await self.store.write(writes.abandon_orphaned_runs, now=self.clock(),
                                                      reason="its process stopped before it finished")

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


def _held(lease: Lease | None) -> LeaseHeldError:
    if lease is None:
        return LeaseHeldError("another process holds the cycle lease", holder="unknown", since="unknown")
    since = lease.acquired_at.isoformat(timespec="seconds")
    return LeaseHeldError(f"another audit cycle is running on this database: {lease.host} pid {lease.pid} since "
                          f"{since}", holder=f"{lease.host} pid {lease.pid}", since=since)


def _elapsed(began: float) -> timedelta:
    return timedelta(seconds=time.monotonic() - began)


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
        rules=ruleset_from(settings.rules, settings.tiers),
        targets=targets_from(settings),
        dispatcher=Dispatcher(transport=notify_transport) if settings.notifiers else None,
        heartbeat=(Heartbeat.from_settings(settings.heartbeat, transport=heartbeat_transport)
                   if katapult else None),
        clock=clock,
    )
    try:
        # A process that audits records a run whose owner is gone as failed at once; a read-only one never writes
        # (every read already shows such a run failed, `queries.run_view`).
        with contextlib.suppress(StoreError):
            abandoned = await services.abandon_orphans() if katapult else []
            if abandoned:
                log.warning("marked %d run(s) left running by a process that is gone as failed: %s",
                            len(abandoned), ", ".join(abandoned))
        yield services
    finally:
        await services.aclose()


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


__all__ = [
    "INTERNAL_ERROR",
    "DrainReport",
    "PendingFailure",
    "Services",
    "check_schema",
    "client_from",
    "log_cycle",
    "open_services",
    "prepare_database",
    "ruleset_from",
    "targets_from",
    "waivers_from",
]
