"""What the auditor observes of the policies' runs between its polls (`auditor.domain.invocations`): read before a
cycle judges its disks, written with the cycle."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from auditor.domain.invocations import Invocation, PolicySchedule, observe
from auditor.domain.models import ReadOutcome
from auditor.domain.rules import RuleSet, observed_coverage
from auditor.service.collection import Collected
from auditor.store import queries
from auditor.store.repo import Store


@dataclass(slots=True)
class Observations:
    """A cycle's observations: every definitely read disk's schedules after the poll (by disk and policy, what the
    rules judge), the schedules to write (new or changed), those gone, and the invocations seen."""

    by_disk: dict[str, dict[str, PolicySchedule]] = field(default_factory=dict)
    changed: list[PolicySchedule] = field(default_factory=list)
    gone: list[tuple[str, str]] = field(default_factory=list)
    invocations: list[Invocation] = field(default_factory=list)


async def observe_runs(store: Store, collected: Collected, rules: RuleSet, *, now: datetime) -> Observations:
    """Returns what the poll at `now` observed of the runs of the policies of every disk read definitely (an unknown
    disk observes nothing: its stored schedules stay as they were). One read of the stored schedules per chunk.

    Only the policies that cover a disk as far as this poll knows (`rules.observed_coverage`) are observed for it:
    a VM's policy is not, while the disk is detached from the VM or its attachment is not known, so none of its
    runs is the disk's (its schedule on the disk is dropped, and starts afresh once the disk is known attached).
    """
    read = [w.snapshot for w in collected.disks if w.snapshot.outcome is ReadOutcome.OK]
    known = await store.read(queries.policy_schedules_of, [s.disk_id for s in read])
    out = Observations()
    for snap in read:
        stored = known.get(snap.disk_id, {})
        seen = observe(snap.disk_id, observed_coverage(snap, rules), stored, now=now)
        out.by_disk[snap.disk_id] = seen.schedules
        out.invocations.extend(seen.invocations)
        out.changed.extend(s for policy_id, s in seen.schedules.items() if stored.get(policy_id) != s)
        out.gone.extend((snap.disk_id, policy_id) for policy_id in stored if policy_id not in seen.schedules)
    return out
