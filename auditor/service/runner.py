"""Running cycles in this process: one at a time, scheduled or on demand, counted for /metrics.

`CycleRunner` is the single-flight guard the daemon's scheduler and `POST /api/v1/audit` share, and owns what
lives across its cycles: the failed cycles waiting for the database (`PendingFailures`). `CycleMetrics` holds
what only the running process knows (cycle durations, Katapult traffic, failures in a row).
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from auditor.domain.records import RunStatus
from auditor.errors import AuditorError, LeaseHeldError
from auditor.service.cycle import AuditOutcome, PendingFailures, new_run_id, record_failures, run_cycle
from auditor.service.leases import check_cycle_lease
from auditor.service.services import Services
from auditor.store.holders import Term

log = logging.getLogger(__name__)

# Cycles take from well under a second (a few disks) to many minutes (tens of thousands behind a rate limit).
DURATION_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)

CycleHook = Callable[[Services, AuditOutcome], Awaitable[None]]


@dataclass
class CycleMetrics:
    """Counters of the cycles this process ran; the daemon records every cycle here."""

    buckets: tuple[float, ...] = DURATION_BUCKETS
    bucket_counts: list[int] = field(default_factory=lambda: [0] * (len(DURATION_BUCKETS) + 1))
    duration_sum: float = 0.0
    cycles: dict[str, int] = field(default_factory=dict)
    requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    responses: dict[str, int] = field(default_factory=dict)
    consecutive_failed: int = 0  # failed cycles in a row (reset by a complete or partial one)
    heartbeat_failures: int = 0
    delivery_errors: int = 0
    is_leader: bool | None = None  # None: not a daemon (no leadership)
    # A daemon's live answer to "do I lead now?" (its term, by its own clock): what /metrics shows, so a process
    # that wakes from a pause never reports itself leader before it has learnt it no longer is.
    leading: Callable[[], bool] | None = None
    leader_epoch: int = 0  # the leader lease's epoch as this replica last saw it (led or followed)

    def _observe(self, seconds: float) -> None:
        self.bucket_counts[bisect.bisect_left(self.buckets, seconds)] += 1
        self.duration_sum += seconds

    def record(self, outcome: AuditOutcome) -> None:
        """Counts a cycle that ran to its end (complete, partial or failed) and its Katapult traffic."""
        self._observe(outcome.duration)
        status = outcome.status.value
        self.consecutive_failed = self.consecutive_failed + 1 if status == RunStatus.FAILED else 0
        self.cycles[status] = self.cycles.get(status, 0) + 1
        self.requests += outcome.stats.requests
        self.retries += outcome.stats.retries
        self.rate_limited += outcome.stats.rate_limited
        for code, n in outcome.stats.by_status.items():
            self.responses[code] = self.responses.get(code, 0) + n

    def record_error(self, seconds: float) -> None:
        """Counts a cycle that broke before recording its verdict (e.g. the database went away)."""
        self._observe(seconds)
        self.cycles["error"] = self.cycles.get("error", 0) + 1
        self.consecutive_failed += 1



class CycleRunner:
    """Runs audit cycles one at a time in this process, scheduled or on demand; keeps the in-flight one."""

    def __init__(self, services: Services, *, cycles: CycleMetrics, on_cycle: CycleHook | None = None) -> None:
        self.services = services
        self.cycles = cycles
        self.on_cycle = on_cycle
        self.current: asyncio.Task[AuditOutcome | None] | None = None
        self.is_closing = False
        self.last_error: str | None = None
        self.failures = PendingFailures()  # this process's failed cycles the database could not take yet
        # The daemon's leader term while it leads (None otherwise): its cycles are started and committed under it.
        self.leader: Callable[[], Term | None] = lambda: None

    @property
    def is_busy(self) -> bool:
        """Returns whether a cycle is in flight."""
        return self.current is not None and not self.current.done()

    def start(self, trigger: str, *, run_id: str | None = None,
              started: asyncio.Future[str] | None = None) -> asyncio.Task[AuditOutcome | None] | None:
        """Starts a cycle as a task and returns it; None if one is running here or the daemon is stopping.

        The check and the start happen without an await in between, so two requests cannot both start one.
        """
        if self.is_closing or self.is_busy:
            return None
        task = asyncio.create_task(self._cycle(trigger, run_id, started), name=f"audit-cycle-{trigger}")
        self.current = task
        return task

    async def trigger(self) -> str | None:
        """Starts a cycle for the API and returns its run id once the run is recorded (`running`, under the cycle
        lease); None if one is running here.

        Raises LeaseHeldError when another process holds the cycle lease (the API answers 409 naming it), and the
        error that kept the run from starting otherwise: a run id is never promised for a run that does not exist.
        """
        if self.is_closing:
            raise AuditorError("the auditor is shutting down")
        if self.is_busy:
            return None
        await check_cycle_lease(self.services)
        started: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        if self.start("api", run_id=new_run_id(), started=started) is None:
            return None
        return await asyncio.shield(started)

    async def record_failures(self) -> int:
        """Records this runner's failed cycles the database could not take yet; returns how many still wait."""
        if not self.failures:
            return 0
        return await record_failures(self.services, failures=self.failures)

    async def tick(self) -> None:
        """The scheduled job: runs a cycle unless one is already running (then this slot is skipped)."""
        task = self.start("schedule")
        if task is None:
            log.warning("scheduled audit cycle skipped: %s",
                        "the auditor is stopping" if self.is_closing else "a cycle is already running")
            return
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            # Shutdown stops the scheduler while this job waits; the cycle task itself is tracked and finished
            # (or abandoned) by the shutdown, so this is not an error worth a traceback.
            return

    async def _cycle(self, trigger: str, run_id: str | None,
                     started: asyncio.Future[str] | None = None) -> AuditOutcome | None:
        """Runs one cycle; a failure is logged and counted, never raised (the next cycle tries again)."""
        began = time.monotonic()
        # The whole cycle, its follow-up included, runs on the Services in force when it started: a reload
        # (the daemon swapping `self.services`) takes effect from the next cycle.
        services = self.services
        try:
            outcome = await run_cycle(services, failures=self.failures, trigger=trigger, run_id=run_id,
                                      started=started, leader=self.leader())
        except LeaseHeldError as exc:
            log.info("audit cycle (%s) skipped: %s", trigger, exc)
            return None
        except Exception as exc:  # run_cycle records its own failures; this is a last line for a bug in it
            log.exception("audit cycle (%s) broke unexpectedly", trigger)
            seconds = time.monotonic() - began
            self.cycles.record_error(seconds)
            self.last_error = f"{type(exc).__name__}: {exc}"
            return None
        self.cycles.record(outcome)
        self.last_error = None if outcome.status is not RunStatus.FAILED else "; ".join(
            f"{e.code}: {e.message}" for e in outcome.errors[:3])
        if self.on_cycle is not None:
            try:
                await self.on_cycle(services, outcome)
            except Exception:  # the cycle is recorded; a failing follow-up must not turn it into an error
                log.exception("after audit run %s: the follow-up step failed", outcome.run_id)
        return outcome
