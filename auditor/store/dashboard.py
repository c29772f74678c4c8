"""Reads for the web dashboard: run history points, a filtered and sorted findings search, the disks' sources.

The reports API's reads stay in `repo`; these answer what only the dashboard asks (search by organization and
disk text, sort, count for page numbers, the history behind the trend charts).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import case, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import ColumnElement

from auditor.domain.models import Severity, TrackedFinding
from auditor.store.repo import Store, _finding
from auditor.store.tables import DiskRow, FindingRow, RunSummary

SortKey = Literal["severity", "rule", "disk", "status", "first_seen", "last_seen"]
SORT_KEYS: tuple[SortKey, ...] = ("severity", "rule", "disk", "status", "first_seen", "last_seen")


@dataclass(frozen=True, slots=True)
class RunPoint:
    """One finished run's summary (a row of `run_summaries`): the fleet as it stood after the run."""

    run_id: str
    started_at: datetime
    finished_at: datetime | None
    status: str
    disks_total: int
    compliant: int
    noncompliant: int
    unknown: int
    open_by_severity: dict[str, int]
    requests: int
    duration_seconds: float


@dataclass(frozen=True, slots=True)
class FindingSearch:
    """Filters, order and page of a findings search (`org` is a disk source such as `org:<ref>` or `config`)."""

    statuses: tuple[str, ...] = ("open",)
    rule: str | None = None
    severity: str | None = None
    org: str | None = None
    text: str | None = None  # a substring of the disk id or name, any case
    sort: SortKey = "severity"
    descending: bool = True
    offset: int = 0
    limit: int = 50


@dataclass(frozen=True, slots=True)
class FindingListing:
    """A finding with what the list shows of its disk."""

    finding: TrackedFinding
    disk_name: str | None
    disk_source: str | None


class DashboardReads:
    """The dashboard's reads on one store."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def run_points(self, *, since: datetime) -> list[RunPoint]:
        """Returns the summaries of runs started at or after `since`, oldest first."""

        async def go(s: AsyncSession) -> list[RunPoint]:
            q = (select(RunSummary).where(RunSummary.started_at >= since)
                 .order_by(RunSummary.started_at, RunSummary.run_id))
            return [RunPoint(run_id=r.run_id, started_at=r.started_at, finished_at=r.finished_at, status=r.status,
                             disks_total=r.disks_total, compliant=r.disks_compliant,
                             noncompliant=r.disks_noncompliant, unknown=r.disks_unknown,
                             open_by_severity={str(k): int(v) for k, v in (r.open_by_severity or {}).items()},
                             requests=r.requests, duration_seconds=r.duration_seconds)
                    for r in (await s.execute(q)).scalars()]

        result: list[RunPoint] = await self.store._read(go)
        return result

    async def disk_sources(self) -> list[str]:
        """Returns the distinct sources (`config`, `org:<ref>`) of the audited disks, sorted."""

        async def go(s: AsyncSession) -> list[str]:
            q = select(DiskRow.source).where(DiskRow.is_target.is_(True)).distinct().order_by(DiskRow.source)
            return [str(v) for v in (await s.execute(q)).scalars()]

        result: list[str] = await self.store._read(go)
        return result

    async def search_findings(self, search: FindingSearch) -> tuple[list[FindingListing], int]:
        """Returns one page of findings matching the search, and how many match in all."""
        where: list[ColumnElement[bool]] = [FindingRow.status.in_(list(search.statuses))]
        if search.rule:
            where.append(FindingRow.rule == search.rule)
        if search.severity:
            where.append(FindingRow.severity == search.severity)
        if search.org:
            where.append(DiskRow.source == search.org)
        if search.text:
            needle = search.text.lower()
            # autoescape: a % or _ typed in the box is matched literally, not as a LIKE wildcard.
            where.append(or_(func.lower(FindingRow.disk_id).contains(needle, autoescape=True),
                             func.lower(func.coalesce(DiskRow.name, "")).contains(needle, autoescape=True)))
        joined = FindingRow.disk_id == DiskRow.id

        async def go(s: AsyncSession) -> tuple[list[FindingListing], int]:
            total = (await s.execute(select(func.count()).select_from(FindingRow).outerjoin(DiskRow, joined)
                                     .where(*where))).scalar_one()
            primary = _sort_column(search.sort)
            q = (select(FindingRow, DiskRow.name, DiskRow.source).outerjoin(DiskRow, joined).where(*where)
                 .order_by(primary.desc() if search.descending else primary.asc(),
                           FindingRow.disk_id, FindingRow.fingerprint)
                 .offset(search.offset).limit(search.limit))
            rows = [FindingListing(_finding(f), name, source) for f, name, source in (await s.execute(q)).all()]
            return rows, int(total)

        result: tuple[list[FindingListing], int] = await self.store._read(go)
        return result


def _sort_column(key: SortKey) -> Any:
    if key == "severity":
        # Severity sorts by rank (low < medium < high < critical), not alphabetically.
        return case(*((FindingRow.severity == s.value, s.rank) for s in Severity), else_=-1)
    return {
        "rule": FindingRow.rule,
        "disk": FindingRow.disk_id,
        "status": FindingRow.status,
        "first_seen": FindingRow.first_seen,
        "last_seen": FindingRow.last_seen,
    }[key]
