"""Use cases: `run_audit` reads Katapult, judges every disk, and records the verdict in one transaction."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from auditor.domain.lifecycle import Change, Transition, parse_waivers, reconcile
from auditor.domain.models import (
    BackupPolicy,
    Disk,
    DiskSnapshot,
    FindingStatus,
    ReadOutcome,
    TargetType,
    WaiverProblem,
)
from auditor.domain.records import RunError, RunStats, RunStatus
from auditor.domain.rules import RULES, RuleSet, evaluate
from auditor.errors import (
    AuditorError,
    InTrashError,
    KatapultError,
    NotFoundError,
    StoreError,
)
from auditor.katapult import KatapultClient, OrgRef
from auditor.store.repo import CycleWrite, DiskWrite, Store

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")
Clock = Callable[[], datetime]
Progress = Callable[[int, int], None]


def utcnow() -> datetime:
    """Returns the current time, timezone-aware UTC."""
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Targets:
    """What to audit: explicit disk ids (per-disk endpoint) and organizations (org-wide endpoints)."""

    disks: tuple[str, ...] = ()
    organizations: tuple[str, ...] = ()

    @property
    def is_empty(self) -> bool:
        """Returns whether nothing is configured."""
        return not self.disks and not self.organizations


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

    @property
    def duration(self) -> float:
        """Returns the cycle's wall time in seconds."""
        return (self.finished_at - self.started_at).total_seconds()


async def _bounded_map(fn: Callable[[T], Awaitable[R]], items: Sequence[T], *, limit: int,
                       progress: Callable[[], None] | None = None) -> list[R]:
    """Returns fn(item) for every item, at most `limit` at a time, in order (workers, not a task per item)."""
    results: list[Any] = [None] * len(items)
    iterator = iter(enumerate(items))

    async def worker() -> None:
        for index, item in iterator:
            results[index] = await fn(item)
            if progress:
                progress()

    await asyncio.gather(*(worker() for _ in range(max(1, min(limit, len(items))))))
    return results


def _error_of(exc: KatapultError, target: str) -> RunError:
    return RunError(target=target, code=exc.code, message=str(exc)[:500])


def _failed_snapshot(disk: Disk, exc: KatapultError) -> DiskSnapshot:
    # 404 disk_not_found and 406 object_in_trash are definite answers about the disk; anything else (5xx after
    # retries, timeouts, 403, a malformed body, a VM lookup failing) leaves the disk without a verdict.
    if isinstance(exc, NotFoundError) and exc.code == "disk_not_found":
        return DiskSnapshot(disk, ReadOutcome.NOT_FOUND, error_code=exc.code, error_message=str(exc)[:500])
    if isinstance(exc, InTrashError):
        return DiskSnapshot(disk, ReadOutcome.IN_TRASH, error_code=exc.code, error_message=str(exc)[:500],
                            detail=dict(exc.detail))
    return DiskSnapshot(disk, ReadOutcome.UNKNOWN, error_code=exc.code, error_message=str(exc)[:500])


VmPolicies = Callable[[str], Awaitable[list[BackupPolicy]]]


def shared_vm_policies(client: KatapultClient) -> VmPolicies:
    """Returns a reader of VM policies that asks Katapult once per VM, however many of its disks are audited.

    Failures are kept too: a VM whose policies cannot be read makes each of its disks unknown without asking again.
    """
    done: dict[str, list[BackupPolicy] | KatapultError] = {}
    locks: dict[str, asyncio.Lock] = {}

    async def read(vm_id: str) -> list[BackupPolicy]:
        async with locks.setdefault(vm_id, asyncio.Lock()):
            if vm_id not in done:
                try:
                    done[vm_id] = await client.list_vm_policies(vm_id)
                except KatapultError as exc:
                    done[vm_id] = exc
        result = done[vm_id]
        if isinstance(result, KatapultError):
            raise result
        return result

    return read


async def read_disk(client: KatapultClient, disk_id: str, *, vm_policies: VmPolicies | None = None) -> DiskSnapshot:
    """Returns one disk's snapshot through the per-disk endpoint.

    The per-disk list returns the policies that target the disk itself; the disk is then looked up and, if it is
    attached, its VM's policies are added (a policy on a VM covers its disks). The VM's policies are read even
    when the disk has its own: each covering policy is judged, so skipping them would hide a weak VM policy and
    give a different verdict than the org-wide join for the same disk. `vm_policies` (see `shared_vm_policies`)
    lets the disks of one VM share one read.
    """
    disk = Disk(id=disk_id)
    try:
        policies = await client.list_disk_policies(disk_id)
        disk = await client.get_disk(disk_id)
        if disk.vm_id:
            vm_list = await (vm_policies or client.list_vm_policies)(disk.vm_id)
            policies = [*policies, *(p for p in vm_list
                                     if p.target_type is TargetType.VIRTUAL_MACHINE and p.target_id == disk.vm_id)]
        return DiskSnapshot(disk, ReadOutcome.OK, tuple(policies))
    except KatapultError as exc:
        return _failed_snapshot(disk, exc)


def join_org(disks: Iterable[Disk], policies: Iterable[BackupPolicy]) -> list[DiskSnapshot]:
    """Returns a snapshot per org disk: the policies targeting it plus those targeting the VM it is attached to."""
    by_disk: dict[str, list[BackupPolicy]] = {}
    by_vm: dict[str, list[BackupPolicy]] = {}
    for p in policies:
        index = by_disk if p.target_type is TargetType.DISK else by_vm
        index.setdefault(p.target_id, []).append(p)
    out = []
    for d in disks:
        covering = list(by_disk.get(d.id, ()))
        if d.vm_id:
            covering.extend(by_vm.get(d.vm_id, ()))
        out.append(DiskSnapshot(d, ReadOutcome.OK, tuple(covering)))
    return out


@dataclass(slots=True)
class Collected:
    """The raw result of reading every target."""

    disks: list[DiskWrite]
    errors: list[RunError]
    retired: set[str]
    targets_checked: int


async def collect(
    client: KatapultClient,
    targets: Targets,
    *,
    known_sources: dict[str, str],
    concurrency: int,
    progress: Progress | None = None,
) -> Collected:
    """Reads every target; a disk is read once even if both an org and `audit.disks` name it.

    `known_sources` maps disks audited before to their source; disks of an org whose listing failed stay known
    (as unknown) rather than silently dropping out of the report.
    """
    errors: list[RunError] = []
    writes: dict[str, DiskWrite] = {}

    async def read_org(ref: str) -> tuple[str, list[DiskSnapshot] | None, KatapultError | None]:
        org = OrgRef(ref)
        try:
            disks, policies = await asyncio.gather(client.list_org_disks(org), client.list_org_policies(org))
        except KatapultError as exc:
            return ref, None, exc
        return ref, join_org(disks, policies), None

    for ref, snaps, exc in await asyncio.gather(*(read_org(r) for r in targets.organizations)):
        source = f"org:{ref}"
        if snaps is None:
            assert exc is not None
            errors.append(_error_of(exc, ref))
            for disk_id, known in known_sources.items():
                if known == source and disk_id not in writes:
                    writes[disk_id] = DiskWrite(
                        DiskSnapshot(Disk(disk_id), ReadOutcome.UNKNOWN, error_code=exc.code,
                                     error_message=f"organization {ref} could not be read: {exc}"[:500]),
                        source,
                    )
            continue
        for snap in snaps:
            writes.setdefault(snap.disk_id, DiskWrite(snap, source))

    pending = [d for d in targets.disks if d not in writes or writes[d].snapshot.outcome is ReadOutcome.UNKNOWN]
    total = len(pending)
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, total)

    vm_policies = shared_vm_policies(client)
    for snap in await _bounded_map(lambda d: read_disk(client, d, vm_policies=vm_policies), pending,
                                   limit=concurrency * 2, progress=tick):
        writes[snap.disk_id] = DiskWrite(snap, "config")
        if snap.outcome is ReadOutcome.UNKNOWN:
            errors.append(RunError(snap.disk_id, snap.error_code or "unknown", snap.error_message or ""))

    retired = {d for d in known_sources if d not in writes}
    return Collected(list(writes.values()), errors, retired, len(targets.organizations) + len(targets.disks))


def run_status(collected: Collected) -> RunStatus:
    """Returns complete when every target was read, failed when nothing was, else partial."""
    if not collected.errors and all(w.snapshot.outcome is not ReadOutcome.UNKNOWN for w in collected.disks):
        return RunStatus.COMPLETE
    if collected.disks and any(w.snapshot.outcome is not ReadOutcome.UNKNOWN for w in collected.disks):
        return RunStatus.PARTIAL
    return RunStatus.FAILED


# Given (changes, run status, errors, now, run id), returns an opaque step the store runs inside the cycle's
# transaction (the alert outbox), or None.
OutboxHook = Callable[[list[Change], RunStatus, list[RunError], datetime, str], Any]


async def run_audit(
    *,
    client: KatapultClient,
    store: Store,
    targets: Targets,
    rules: RuleSet,
    waivers: Sequence[dict[str, Any]] = (),
    concurrency: int = 8,
    trigger: str = "manual",
    clock: Clock = utcnow,
    progress: Progress | None = None,
    outbox: OutboxHook | None = None,
) -> AuditOutcome:
    """Runs one audit cycle and records it; returns what happened. Never raises for Katapult trouble.

    The clock is read once: `now` is the poll time every rule and lifecycle step uses. Nothing of the cycle is
    written until the end, in one transaction, so a crash leaves the previous verdict intact and the run is
    found `running` and marked failed at the next start.
    """
    now = clock()
    began = time.monotonic()
    run_id = await store.start_run(now=now, trigger=trigger)
    client.stats.snapshot_and_reset()
    try:
        known = await store.load_disks(targets_only=True)
        collected = await collect(client, targets, known_sources={k: v.source for k, v in known.items()},
                                  concurrency=concurrency, progress=progress)
        findings = [f for w in collected.disks for f in evaluate(w.snapshot, rules, now=now)]
        valid_waivers, problems = parse_waivers(waivers, known_rules=RULES.keys(), now=now)
        previous = await store.load_active_findings(extra=(f.fingerprint for f in findings))
        settled = {w.snapshot.disk_id for w in collected.disks if w.snapshot.outcome is not ReadOutcome.UNKNOWN}
        changes = reconcile(previous, findings, settled_disks=settled | collected.retired, waivers=valid_waivers,
                            now=now)
        status = run_status(collected)
        stats = _stats(client)
        finished = now + _elapsed(began)
        cycle = CycleWrite(run_id=run_id, now=now, status=status, targets_checked=collected.targets_checked,
                           stats=stats, errors=collected.errors, disks=collected.disks, changes=changes,
                           retired_disks=collected.retired, finished_at=finished)
        extra = outbox(changes, status, collected.errors, now, run_id) if outbox else None
        await store.commit_cycle(cycle, extra=extra)
    except StoreError:
        raise
    except AuditorError as exc:  # e.g. a malformed response that escaped per-disk handling
        log.error("audit run %s failed: %s", run_id, exc)
        errors = [RunError("*", getattr(exc, "code", "error"), str(exc)[:500])]
        stats = _stats(client)
        extra = outbox([], RunStatus.FAILED, errors, now, run_id) if outbox else None
        await store.fail_run(run_id, now=now + _elapsed(began), errors=errors, stats=stats, extra=extra)
        return AuditOutcome(run_id, RunStatus.FAILED, now, now + _elapsed(began), errors=errors, stats=stats)

    opened = sum(1 for c in changes if c.kind in (Transition.OPENED, Transition.REOPENED, Transition.UNWAIVED))
    resolved = sum(1 for c in changes if c.kind is Transition.RESOLVED)
    open_now: dict[str, int] = {}
    for f in _open_after(previous, changes):
        open_now[f] = open_now.get(f, 0) + 1
    ok = len(settled)
    return AuditOutcome(
        run_id=run_id, status=status, started_at=now, finished_at=finished,
        targets_checked=collected.targets_checked, disks_ok=ok, disks_unknown=len(collected.disks) - ok,
        errors=collected.errors, stats=stats, opened=opened, resolved=resolved, open_findings=open_now,
        waiver_problems=problems, changes=changes,
    )


def _open_after(previous: dict[str, Any], changes: list[Change]) -> list[str]:
    """Returns the severities of every finding open after the run (changed ones plus untouched open ones)."""
    state = {fp: f for fp, f in previous.items()}
    for c in changes:
        state[c.finding.fingerprint] = c.finding
    return [f.severity.value for f in state.values() if f.status is FindingStatus.OPEN]


def _elapsed(began: float) -> timedelta:
    return timedelta(seconds=time.monotonic() - began)


def _stats(client: KatapultClient) -> RunStats:
    s = client.stats.snapshot_and_reset()
    return RunStats(s.requests, s.retries, s.rate_limited, dict(s.by_status))
