"""Observed invocations: how often a policy really runs, seen from outside.

Katapult's list endpoints give a policy's `interval` and `next_invocation_at` only (README of the API: single-policy
GETs add `frequency`, `time`, `minute`, undocumented). What the auditor can observe is how `next_invocation_at`
moves between two of its polls: when it moves forward from a time that has passed, the run due at the old value
happened (an invocation), and the new value is when the next one is planned. The rules `observed-interval-too-long`
and `no-backup-data` are judged from these observations only, with no extra request.

Pure functions and frozen records; the store keeps one `PolicySchedule` per policy and disk (a read model) and
every `Invocation` (history for the observed RPO).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from auditor.domain.models import BackupPolicy
from auditor.domain.periods import percentile

# How many of a policy's latest invocations its schedule keeps: `observed-interval-too-long` resolves after two
# consecutive steps within the limit, so the last two steps decide it.
RECENT = 2
# The window of the current report's observed RPO.
RPO_WINDOW = timedelta(days=30)


@dataclass(frozen=True, slots=True)
class Invocation:
    """One observed run of a policy on a disk: due at `due_at` (the old `next_invocation_at`), seen done by the poll
    at `observed_at`, which found the next run planned at `next_at`."""

    disk_id: str
    policy_id: str
    due_at: datetime
    next_at: datetime
    observed_at: datetime
    # Seconds from the disk's previous observed run (of any of its policies) to this one; None for its first. Worked
    # out when the run is observed, so the observed RPO is a plain aggregate of the stored runs.
    gap_seconds: int | None = field(default=None, compare=False)

    @property
    def step(self) -> timedelta:
        """Returns how long after this run the next one comes, as far as the observations prove it.

        `next_at - due_at`, unless the poll saw the move later than half that step after `due_at`: then runs
        between `due_at` and the poll cannot be ruled out (a schedule that runs every p with p no longer than the
        poll's lateness would look the same), and only `next_at - observed_at`, a step every such schedule has, is
        proven.
        """
        full = self.next_at - self.due_at
        late = self.observed_at - self.due_at
        ahead = self.next_at - self.observed_at
        if late > ahead:
            return max(ahead, timedelta(0))
        return full


@dataclass(frozen=True, slots=True)
class PolicySchedule:
    """What the auditor has observed of one policy on one disk: when it first saw it, the latest
    `next_invocation_at` it saw (None: never one), and its latest invocations (at most `RECENT`, oldest first)."""

    disk_id: str
    policy_id: str
    first_seen_at: datetime
    next_invocation_at: datetime | None
    recent: tuple[Invocation, ...] = ()

    @property
    def invoked(self) -> bool:
        """Returns whether a run of the policy has been observed on this disk."""
        return bool(self.recent)


@dataclass(frozen=True, slots=True)
class Observed:
    """One disk's schedules after a poll, by policy id, and the invocations the poll observed."""

    schedules: dict[str, PolicySchedule]
    invocations: list[Invocation]


def observe(disk_id: str, policies: Iterable[BackupPolicy], known: Mapping[str, PolicySchedule], *,
            now: datetime) -> Observed:
    """Returns the disk's schedules after a poll at `now` that read `policies`, given those stored (`known`).

    An invocation is recorded when `next_invocation_at` moved forward from a value at or before `now` (the run
    due then happened). A move from a time still to come is a reschedule, not a run; a missing value keeps the
    last one seen, so a run is still recognised when a value comes back. Each new invocation carries its gap from
    the disk's previous observed run (the latest in `known`, of any policy, or one new in this poll).
    """
    schedules: dict[str, PolicySchedule] = {}
    invocations: list[Invocation] = []
    latest = max((s.recent[-1].due_at for s in known.values() if s.recent), default=None)
    for policy in policies:
        if policy.id in schedules:
            continue  # listed twice: observed once
        nxt = policy.schedule.next_invocation_at
        before = known.get(policy.id)
        if before is None:
            schedules[policy.id] = PolicySchedule(disk_id, policy.id, now, nxt)
            continue
        due = before.next_invocation_at
        recent = before.recent
        if due is not None and nxt is not None and nxt > due and due <= now:
            invocation = Invocation(disk_id, policy.id, due, nxt, now)
            invocations.append(invocation)
            recent = (*recent, invocation)[-RECENT:]
        schedules[policy.id] = replace(before, next_invocation_at=nxt if nxt is not None else due, recent=recent)
    chained: list[Invocation] = []
    for invocation in sorted(invocations, key=lambda i: (i.due_at, i.policy_id)):
        gap = None if latest is None else max(int((invocation.due_at - latest).total_seconds()), 0)
        chained.append(replace(invocation, gap_seconds=gap))
        latest = invocation.due_at if latest is None else max(latest, invocation.due_at)
    return Observed(schedules, chained)


@dataclass(frozen=True, slots=True)
class RpoFacts:
    """A disk's observed invocations due within a window, as the store sums them up: how many, the last one's due
    time, the longest gap ending in the window between two consecutive ones (None: no run in the window has an
    observed run before it) and the first one's due time (None: not asked for)."""

    count: int
    last_due_at: datetime
    longest_gap: timedelta | None
    first_due_at: datetime | None = None


def observed_rpo(facts: RpoFacts | None, *, end: datetime) -> int | None:
    """Returns the observed RPO in whole seconds: the longest of the gaps between consecutive observed invocations
    and the time from the last one to `end`; None (not 0) with fewer than two invocations."""
    if facts is None or facts.longest_gap is None:
        return None
    since_last = max(end - facts.last_due_at, timedelta(0))
    return int(max(facts.longest_gap, since_last).total_seconds())


@dataclass(frozen=True, slots=True)
class DiskObservation:
    """What reports say per disk of its observed runs: since when its policies are observed, the latest observed
    run, and the observed RPO in seconds (None with fewer than two observed runs: never 0)."""

    observed_since: datetime | None = None
    last_invocation_at: datetime | None = None
    observed_rpo_seconds: int | None = None


def disk_observation(since: datetime | None, latest: datetime | None, facts: RpoFacts | None, *,
                     end: datetime) -> DiskObservation:
    """Returns a disk's observation over a window ending at `end`: `facts` of the runs in the window, `since` and
    `latest` from its schedules (the latest run counts only before `end`)."""
    last = facts.last_due_at if facts is not None else (latest if latest is not None and latest < end else None)
    return DiskObservation(since, last, observed_rpo(facts, end=end))


def period_observation(facts: RpoFacts | None, *, end: datetime) -> DiskObservation:
    """Returns a disk's observation over a period from the runs due in it alone (`facts`), measured to `end` (the
    period's end, or now if that is earlier): since its first run in the period, its last one, and the observed
    RPO; all None without a run in the period. What happened after `end` changes none of it."""
    if facts is None:
        return DiskObservation()
    return DiskObservation(facts.first_due_at, facts.last_due_at, observed_rpo(facts, end=end))


def rpo_distribution(values: Sequence[int | None]) -> dict[str, int | None]:
    """Returns the fleet's p50, p95 and max observed RPO (nearest rank) over the disks that have one, and how many
    disks that is."""
    known = [v for v in values if v is not None]
    return {"disks": len(known), "p50_seconds": percentile(known, 50), "p95_seconds": percentile(known, 95),
            "max_seconds": max(known, default=None)}
