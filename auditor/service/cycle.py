"""The audit cycle: `run_cycle` (one cycle under the cycle lease, recorded in one fenced transaction with its alerts)
and its failure state, `PendingFailures` (failed cycles the database could not take yet), recorded by
`record_failures` as soon as it can.

`PendingFailures` is owned by whoever runs cycles — the daemon's `runner.CycleRunner`, one `auditor audit` — and
passed in: `Services` holds no state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from auditor.domain.lifecycle import Change, Transition, parse_waivers, reconcile
from auditor.domain.models import FindingStatus, ReadOutcome, TrackedFinding, WaiverProblem
from auditor.domain.records import RunConfig, RunError, RunStats, RunStatus
from auditor.domain.rules import RULES
from auditor.errors import AuditorError, LeaseHeldError, LeaseLostError, StoreError
from auditor.notify.heartbeat import summary_line
from auditor.service.alerts import incomplete_fingerprint, plan_notifications
from auditor.service.collection import (
    AttachmentTruth,
    Collected,
    Progress,
    collect,
    internal_error,
    judge,
    open_after,
    run_status,
    verdicts_after,
)
from auditor.service.housekeeping import abandon_orphans
from auditor.service.leases import keep_cycle_lease, release_cycle_lease, take_cycle_lease
from auditor.service.observations import observe_runs
from auditor.service.services import Services
from auditor.store import queries, writes
from auditor.store.holders import LEADER, Term
from auditor.store.writes import CycleWrite, new_run_id

log = logging.getLogger(__name__)


@dataclass(slots=True)
class AuditOutcome:
    """What one cycle did, for the CLI summary, the log line and metrics."""

    run_id: str
    status: RunStatus
    started_at: datetime
    finished_at: datetime
    targets_checked: int = 0
    disks_ok: int = 0
    disks_unknown: int = 0
    errors: list[RunError] = field(default_factory=list)
    stats: RunStats = field(default_factory=RunStats)
    opened: int = 0
    resolved: int = 0
    open_findings: dict[str, int] = field(default_factory=dict)  # severity -> count, after the run
    waiver_problems: list[WaiverProblem] = field(default_factory=list)
    changes: list[Change] = field(default_factory=list)
    trigger: str = "manual"

    @property
    def duration(self) -> float:
        """Returns the cycle's wall time in seconds."""
        return (self.finished_at - self.started_at).total_seconds()


@dataclass(frozen=True, slots=True)
class FailedCycle:
    """A failed cycle the database could not take yet: recorded (run row and alert) as soon as it can."""

    run_id: str
    trigger: str
    started_at: datetime
    finished_at: datetime
    errors: list[RunError]
    stats: RunStats
    config: RunConfig | None = None  # the configuration it ran with


@dataclass(slots=True)
class PendingFailures:
    """Failed cycles waiting for the database, oldest first. It lives as long as whoever runs the cycles, not as
    long as one cycle: a cycle that fails while the database is down is recorded by a later `record_failures`."""

    waiting: list[FailedCycle] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.waiting)

    def __iter__(self) -> Iterator[FailedCycle]:
        return iter(self.waiting)


async def run_cycle(services: Services, *, failures: PendingFailures | None = None, trigger: str = "manual",
                    run_id: str | None = None, progress: Progress | None = None, wait: float = 0.0,
                    started: asyncio.Future[str] | None = None, leader: Term | None = None) -> AuditOutcome:
    """Runs one audit cycle under the cycle lease and records it; returns what happened.

    Never raises for Katapult trouble, a malformed response or a bug judging one disk (that disk is unknown).
    Raises LeaseHeldError when another process runs a cycle (after waiting up to `wait` seconds). Any other
    failure — the database, a bug outside the per-disk boundaries — ends the run `failed`, recorded with its
    `audit-incomplete` alert now or, if the database cannot take it, kept in `failures` (with the failures
    waiting there before it) for a later `record_failures`; without `failures`, a failure the database cannot
    take now is logged and dropped.

    `started`, when given, gets the run id once the run is recorded as `running` (its lease taken), or the error
    that kept it from starting: what a caller promising a run (`POST /api/v1/audit`) waits for.

    The run is started and committed under the cycle lease's term and, for a daemon's leader, its `leader` term,
    each checked in the same transaction: once either is over (another process took over, or this one was paused
    past its lease), the run is not started (LeaseHeldError) or its verdict is not committed (`lease_lost`).
    """
    assert services.client is not None, "run_cycle needs a Katapult client"
    try:
        return await _run_cycle(services, failures=failures, trigger=trigger, run_id=run_id, progress=progress,
                                wait=wait, started=started, leader=leader)
    except BaseException as exc:
        if started is not None and not started.done():
            started.set_exception(exc if isinstance(exc, Exception) else AuditorError("the cycle was cancelled"))
        raise
    finally:
        if started is not None and not started.done():
            started.set_exception(AuditorError("the audit cycle ended before its run was recorded"))


async def _run_cycle(services: Services, *, failures: PendingFailures | None, trigger: str, run_id: str | None,
                     progress: Progress | None, wait: float, started: asyncio.Future[str] | None,
                     leader: Term | None) -> AuditOutcome:
    failures = failures if failures is not None else PendingFailures()
    run_id = run_id or new_run_id()
    began = time.monotonic()
    now = services.clock()
    try:
        # Another process's cycle is not a failure of this one: no heartbeat ping, the holder pings its own.
        cycle = await take_cycle_lease(services, run_id=run_id, wait=wait)
    except StoreError as exc:
        outcome = await _fail(services, failures, run_id, trigger, now, began,
                              RunError("*", "database_unavailable", str(exc)))
        return _finish(services, outcome)
    # The cycle starts now, not when it began waiting for the lease: its poll time and start follow the wait.
    began = time.monotonic()
    now = services.clock()
    _ping(services, "start", f"{trigger} run {run_id} starting")
    renewer = asyncio.create_task(keep_cycle_lease(services, term=cycle), name=f"cycle-lease-{run_id[:8]}")
    terms = (cycle,) if leader is None else (cycle, leader)
    try:
        outcome = await _while_held(_cycle(services, run_id, trigger, now, began, progress, started, terms),
                                    renewer, cycle)
    except LeaseHeldError:
        raise  # refused at its start: no run exists, nothing failed
    except LeaseLostError as exc:
        # Another process took over after our lease expired; it marks this run abandoned. Nothing is written.
        log.error("audit run %s: %s", run_id, exc)
        outcome = AuditOutcome(run_id, RunStatus.FAILED, now, now + _elapsed(began),
                               errors=[RunError("*", "lease_lost", str(exc))], stats=_stats(services))
    except StoreError as exc:
        outcome = await _fail(services, failures, run_id, trigger, now, began,
                              RunError("*", "database_unavailable", str(exc)))
    except AuditorError as exc:
        outcome = await _fail(services, failures, run_id, trigger, now, began,
                              RunError("*", getattr(exc, "code", "error"), str(exc)[:500]))
    except Exception as exc:  # a bug outside the per-disk boundaries: the run fails loudly, never silently
        code, message = internal_error(exc, where=f"audit run {run_id}")
        outcome = await _fail(services, failures, run_id, trigger, now, began, RunError("*", code, message))
    finally:
        renewer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await renewer
        await release_cycle_lease(services, term=cycle)
    return _finish(services, outcome)


async def _while_held(work: Coroutine[Any, Any, AuditOutcome], renewer: asyncio.Task[None],
                      term: Term) -> AuditOutcome:
    """Runs the cycle's work while its lease holds: the renewer ends only when the lease was lost (this process was
    paused past it, or another took it), and then the work stops at once instead of reading Katapult for a verdict
    its commit would refuse (LeaseLostError; the next leader announces the lost run)."""
    task = asyncio.create_task(work, name=f"cycle-work-{term.epoch}")
    try:
        await asyncio.wait({task, renewer}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise
    if not task.done() and not renewer.cancelled() and renewer.exception() is not None:
        # The renewer broke (a bug, not a lost lease): the work goes on, and its commit's fence still decides.
        log.error("the cycle lease renewer broke: %r; the cycle goes on, its commit checks the lease",
                  renewer.exception())
        return await task
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise LeaseLostError(f"the {term.name} lease of epoch {term.epoch} was lost mid-cycle (expired and taken by "
                             "another process, or this process was paused past it): the cycle stopped; nothing "
                             "was written")
    return task.result()


async def record_failures(services: Services, *, failures: PendingFailures) -> int:
    """Records failed cycles (run row and `audit-incomplete` alert) the database could not take before.

    Returns how many are still waiting. Idempotent: the alert fires once while it is firing already.
    """
    settings = services.settings
    while failures.waiting:
        f = failures.waiting[0]
        try:
            # What must not be lost, alone in its transaction: the failed run and its audit-incomplete alert
            # (it reads nothing else, so even a database missing the findings table takes it).
            async with services.store.transaction() as tx:
                await tx.run(writes.record_failed_run, f.run_id, trigger=f.trigger, started_at=f.started_at,
                             finished_at=f.finished_at, errors=f.errors, stats=f.stats, owner=services.holder.id,
                             config=f.config)
                if settings.notifiers:
                    plan = plan_notifications(notifiers=settings.notifiers, changes=[],
                                              run_status=RunStatus.FAILED, errors=f.errors,
                                              incomplete_fp=_incomplete_fp(services),
                                              states=await tx.run(queries.alert_state_map), now=f.finished_at,
                                              interval=settings.audit.interval,
                                              runbook_url=settings.notify.runbook_url)
                    await tx.run(writes.enqueue, plan.entries, plan.states, run_id=f.run_id, now=f.finished_at)
        except StoreError as exc:
            log.error("could not record failed run %s yet (%s); %d failure(s) waiting, retrying",
                      f.run_id, exc, len(failures))
            return len(failures)
        failures.waiting.pop(0)
        await _keep_open_alerts_alive(services, f)
    return 0


def with_tiers(changes: list[Change], collected: Collected) -> list[Change]:
    """Returns the changes with each new or reopened finding labelled with its disk's tier (`TrackedFinding.tier`);
    other findings keep the label they opened with, so an alert resolves with the labels it fired with."""
    tiers = {w.snapshot.disk_id: w.snapshot.tier.name for w in collected.disks if w.snapshot.tier.name}
    return [replace(c, finding=replace(c.finding, tier=tiers.get(c.finding.disk_id)))
            if c.previous is None or c.kind is Transition.REOPENED else c for c in changes]


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


# ---- the cycle's steps ----------------------------------------------------------------------------------


async def _start(services: Services, run_id: str, trigger: str, now: datetime, terms: tuple[Term, ...]) -> None:
    """Records the run as `running`, in the same transaction as the check that its terms still hold."""
    ttl = services.settings.daemon.leader_ttl
    try:
        async with services.store.transaction() as tx:
            await tx.fence(*terms, now=services.clock(), ttl=ttl)
            await tx.run(writes.start_run, now=now, trigger=trigger, run_id=run_id, owner=services.holder.id,
                         config=services.run_config)
    except LeaseLostError as exc:
        # Not a failed cycle: this process may no longer start one (it was deposed, or paused past its lease).
        leader = await services.leases.get(LEADER)
        live = leader is not None and leader.is_live(services.clock())
        raise LeaseHeldError(f"not started: {exc}", holder=f"{leader.host} pid {leader.pid}" if live and leader
                             else "unknown", since=leader.acquired_at.isoformat(timespec="seconds") if live and leader
                             else "unknown") from None


async def _cycle(services: Services, run_id: str, trigger: str, now: datetime, began: float,
                 progress: Progress | None, started: asyncio.Future[str] | None,
                 terms: tuple[Term, ...]) -> AuditOutcome:
    client, settings, store, rules = services.client, services.settings, services.store, services.rules
    assert client is not None
    await abandon_orphans(services)  # a lost cycle is announced before this one starts
    await _start(services, run_id, trigger, now, terms)
    if started is not None and not started.done():
        started.set_result(run_id)  # recorded: `GET /api/v1/runs` lists it as running from now on
    client.stats.snapshot_and_reset()
    known = await store.read(queries.target_sources)
    truth = AttachmentTruth(now=now, known=await store.read(queries.verified_attachments),
                            refresh=settings.audit.attachment_refresh, interval=settings.audit.interval)
    collected = await collect(client, services.targets, known_sources=known,
                              concurrency=settings.katapult.max_concurrency, progress=progress, rules=rules,
                              attachments=truth)
    observed = await observe_runs(store, collected, rules, now=now)
    findings = judge(collected, rules, now=now, schedules=observed.by_disk)
    valid_waivers, problems = parse_waivers(settings.waivers, known_rules=RULES.keys(), now=now)
    settled = {w.snapshot.disk_id for w in collected.disks if w.snapshot.outcome is not ReadOutcome.UNKNOWN}
    status = run_status(collected)
    stats = _stats(services)
    finished = now + _elapsed(began)
    async with store.transaction() as tx:
        # The fence: renewing the terms inside the commit refuses the write once another process took over.
        await tx.fence(*terms, now=services.clock(), ttl=settings.daemon.leader_ttl)
        previous = await tx.run(queries.active_findings, extra=(f.fingerprint for f in findings))
        changes = with_tiers(reconcile(previous, findings, settled_disks=settled | collected.retired,
                                       waivers=valid_waivers, now=now), collected)
        history = verdicts_after(collected, previous, changes)
        await tx.run(writes.write_cycle, CycleWrite(
            run_id=run_id, now=now, status=status, targets_checked=collected.targets_checked, stats=stats,
            errors=collected.errors, disks=collected.disks, changes=changes, retired_disks=collected.retired,
            finished_at=finished, disk_statuses=history.disk_statuses,
            open_by_severity=history.open_by_severity, open_by_rule=history.open_by_rule,
            schedules=observed.changed, schedules_gone=observed.gone, invocations=observed.invocations))
        if settings.notifiers:
            plan = plan_notifications(notifiers=settings.notifiers, changes=changes, run_status=status,
                                      errors=collected.errors, incomplete_fp=_incomplete_fp(services),
                                      states=await tx.run(queries.alert_state_map), now=now,
                                      interval=settings.audit.interval, untouched=previous.values(),
                                      disks=await tx.run(queries.alert_disks, _alert_disk_ids(changes, previous)),
                                      runbook_url=settings.notify.runbook_url)
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


def _alert_disk_ids(changes: Iterable[Change], findings: Mapping[str, TrackedFinding]) -> set[str]:
    """Returns the disks alerts may name: those of the changed findings and of the stored open ones."""
    return {c.finding.disk_id for c in changes} | {f.disk_id for f in findings.values()
                                                   if f.status is FindingStatus.OPEN}


def _incomplete_fp(services: Services) -> str:
    return incomplete_fingerprint(services.settings.audit.disks, services.settings.audit.organizations)


def _stats(services: Services) -> RunStats:
    if services.client is None:
        return RunStats()
    s = services.client.stats.snapshot_and_reset()
    return RunStats(s.requests, s.retries, s.rate_limited, dict(s.by_status))


async def _fail(services: Services, failures: PendingFailures, run_id: str, trigger: str, now: datetime,
                began: float, error: RunError) -> AuditOutcome:
    """Returns a failed outcome, recorded with its alert now or kept in `failures` until the database takes it."""
    log.error("audit run %s failed: %s: %s", run_id, error.code, error.message)
    failure = FailedCycle(run_id, trigger, now, now + _elapsed(began), [error], _stats(services),
                          config=services.run_config)
    failures.waiting.append(failure)
    await record_failures(services, failures=failures)
    return AuditOutcome(run_id, RunStatus.FAILED, now, failure.finished_at, errors=failure.errors,
                        stats=failure.stats, trigger=trigger)


async def _keep_open_alerts_alive(services: Services, f: FailedCycle) -> None:
    """After a failed cycle, re-posts open findings to Alertmanager so it does not resolve them (best effort)."""
    settings = services.settings
    if not any(n.kind == "alertmanager" for n in settings.notifiers):
        return
    try:
        async with services.store.transaction() as tx:
            active = await tx.run(queries.active_findings)
            plan = plan_notifications(notifiers=settings.notifiers, changes=[],
                                      run_status=RunStatus.FAILED, errors=f.errors,
                                      incomplete_fp=_incomplete_fp(services),
                                      states=await tx.run(queries.alert_state_map),
                                      now=f.finished_at, interval=settings.audit.interval,
                                      untouched=active.values(),
                                      disks=await tx.run(queries.alert_disks, _alert_disk_ids((), active)),
                                      runbook_url=settings.notify.runbook_url)
            await tx.run(writes.enqueue, plan.entries, plan.states, run_id=f.run_id, now=f.finished_at)
    except StoreError as exc:
        log.warning("after failed run %s: could not re-post open alerts to Alertmanager: %s", f.run_id, exc)


def _finish(services: Services, outcome: AuditOutcome) -> AuditOutcome:
    reason = "; ".join(f"{e.target}: {e.code}" for e in outcome.errors[:3]) or None
    body = summary_line(status=outcome.status.value, targets=outcome.targets_checked,
                        disks=outcome.disks_ok + outcome.disks_unknown, unknown=outcome.disks_unknown,
                        opened=outcome.opened, resolved=outcome.resolved, requests=outcome.stats.requests,
                        run_id=outcome.run_id, reason=reason if outcome.status is not RunStatus.COMPLETE else None)
    _ping(services, "success" if outcome.status is RunStatus.COMPLETE else "fail", body)
    log_cycle(outcome)
    return outcome


def _ping(services: Services, kind: str, body: str) -> None:
    if services.heartbeat is None:
        return
    try:
        getattr(services.heartbeat, kind)(body)
    except Exception:  # the dead-man's switch never fails a cycle
        log.exception("heartbeat %s could not be queued", kind)


def _elapsed(began: float) -> timedelta:
    return timedelta(seconds=time.monotonic() - began)


__all__ = ["AuditOutcome", "FailedCycle", "PendingFailures", "log_cycle", "new_run_id", "record_failures",
           "run_cycle", "with_tiers"]
