"""Reads for the web dashboard: run history points, the findings listing (whole, or searched, sorted and paged in
SQL), the disks' sources, and a second engine on the same database for reads on another thread's event loop.

The reports API's reads stay in `repo`; these answer what only the dashboard asks (search by organization and
disk text, sort, count for page numbers, the history behind the trend charts).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import case, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import ColumnElement

from auditor.domain.listings import FindingListing, FindingSearch, RunPoint, SortKey
from auditor.domain.models import FindingStatus, Severity, TrackedFinding
from auditor.store.engine import create_engine_for, sqlite_path
from auditor.store.repo import Store
from auditor.store.tables import DiskRow, FindingRow, RunSummary


class DashboardReads:
    """The dashboard's reads on one store."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def run_points(self, *, since: datetime) -> list[RunPoint]:
        """Returns the summaries of runs started at or after `since`, oldest first."""

        async def go(s: AsyncSession) -> list[RunPoint]:
            # Plain columns, not ORM objects: no identity map, and `open_by_rule` (unused here) is never decoded.
            q = (select(RunSummary.run_id, RunSummary.started_at, RunSummary.finished_at, RunSummary.status,
                        RunSummary.disks_total, RunSummary.disks_compliant, RunSummary.disks_noncompliant,
                        RunSummary.disks_unknown, RunSummary.open_by_severity, RunSummary.requests,
                        RunSummary.duration_seconds)
                 .where(RunSummary.started_at >= since).order_by(RunSummary.started_at, RunSummary.run_id))
            return [RunPoint(run_id=run_id, started_at=started_at, finished_at=finished_at, status=status,
                             disks_total=total, compliant=compliant, noncompliant=noncompliant, unknown=unknown,
                             open_by_severity={str(k): int(v) for k, v in (by_severity or {}).items()},
                             requests=requests, duration_seconds=duration)
                    for (run_id, started_at, finished_at, status, total, compliant, noncompliant, unknown,
                         by_severity, requests, duration) in (await s.execute(q)).all()]

        result: list[RunPoint] = await self.store._read(go)
        return result

    async def disk_sources(self) -> list[str]:
        """Returns the distinct sources (`config`, `org:<ref>`) of the audited disks, sorted."""

        async def go(s: AsyncSession) -> list[str]:
            q = select(DiskRow.source).where(DiskRow.is_target.is_(True)).distinct().order_by(DiskRow.source)
            return [str(v) for v in (await s.execute(q)).scalars()]

        result: list[str] = await self.store._read(go)
        return result

    async def disk_tiers(self) -> list[str]:
        """Returns the distinct tiers of the audited disks (the defaults not included), sorted."""

        async def go(s: AsyncSession) -> list[str]:
            q = (select(DiskRow.tier).where(DiskRow.is_target.is_(True), DiskRow.tier.is_not(None)).distinct()
                 .order_by(DiskRow.tier))
            return [str(v) for v in (await s.execute(q)).scalars()]

        result: list[str] = await self.store._read(go)
        return result

    async def finding_status_counts(self) -> dict[str, int]:
        """Returns how many findings are in each status (open, waived, resolved)."""

        async def go(s: AsyncSession) -> dict[str, int]:
            q = select(FindingRow.status, func.count()).group_by(FindingRow.status)
            return {str(status): int(n) for status, n in (await s.execute(q)).all()}

        result: dict[str, int] = await self.store._read(go)
        return result

    async def finding_listings(self, statuses: tuple[str, ...]) -> list[FindingListing]:
        """Returns every finding in one of `statuses` with its disk's name and source (the listed columns only), by
        disk and fingerprint."""

        async def go(s: AsyncSession) -> list[FindingListing]:
            q = (select(*_LISTED, DiskRow.name, DiskRow.source, DiskRow.tier)
                 .outerjoin(DiskRow, FindingRow.disk_id == DiskRow.id)
                 .where(FindingRow.status.in_(list(statuses)))
                 .order_by(FindingRow.disk_id, FindingRow.fingerprint))
            return [FindingListing(_listed(row), row.name, row.source, row.tier)
                    for row in (await s.execute(q)).all()]

        result: list[FindingListing] = await self.store._read(go)
        return result

    async def search_findings(self, search: FindingSearch, *,
                              total: int | None = None) -> tuple[list[FindingListing], int]:
        """Returns one page of findings matching the search, and how many match in all (counted unless given)."""
        where: list[ColumnElement[bool]] = [FindingRow.status.in_(list(search.statuses))]
        if search.rule:
            where.append(FindingRow.rule == search.rule)
        if search.severity:
            where.append(FindingRow.severity == search.severity)
        if search.org:
            where.append(DiskRow.source == search.org)
        if search.tier:
            where.append(DiskRow.tier == search.tier)
        if search.text:
            needle = search.text.lower()
            # autoescape: a % or _ typed in the box is matched literally, not as a LIKE wildcard.
            where.append(or_(func.lower(FindingRow.disk_id).contains(needle, autoescape=True),
                             func.lower(func.coalesce(DiskRow.name, "")).contains(needle, autoescape=True)))
        joined = FindingRow.disk_id == DiskRow.id

        async def go(s: AsyncSession) -> tuple[list[FindingListing], int]:
            count = total
            if count is None:
                count = (await s.execute(select(func.count()).select_from(FindingRow).outerjoin(DiskRow, joined)
                                         .where(*where))).scalar_one()
            primary = _sort_column(search.sort)
            # Only the listed columns: `observed` and `expected` (JSON the list does not show) are not read, and
            # the listing's finding carries them empty.
            q = (select(*_LISTED, DiskRow.name, DiskRow.source, DiskRow.tier).outerjoin(DiskRow, joined)
                 .where(*where)
                 .order_by(primary.desc() if search.descending else primary.asc(),
                           FindingRow.disk_id, FindingRow.fingerprint)
                 .offset(search.offset).limit(search.limit))
            rows = [FindingListing(_listed(row), row.name, row.source, row.tier)
                    for row in (await s.execute(q)).all()]
            return rows, int(count)

        result: tuple[list[FindingListing], int] = await self.store._read(go)
        return result


_LISTED = (FindingRow.fingerprint, FindingRow.rule, FindingRow.disk_id, FindingRow.policy_id, FindingRow.severity,
           FindingRow.status, FindingRow.message, FindingRow.first_seen, FindingRow.last_seen, FindingRow.opened_at,
           FindingRow.resolved_at, FindingRow.waiver)


def _listed(row: Any) -> TrackedFinding:
    return TrackedFinding(fingerprint=row.fingerprint, rule=row.rule, disk_id=row.disk_id, policy_id=row.policy_id,
                          severity=Severity(row.severity), status=FindingStatus(row.status), message=row.message,
                          observed={}, expected={}, first_seen=row.first_seen, last_seen=row.last_seen,
                          opened_at=row.opened_at, resolved_at=row.resolved_at, waiver=row.waiver)


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


def can_reopen(store: Store) -> bool:
    """Returns whether a second engine on the database of `store` sees the same data (not for in-memory SQLite)."""
    url = store.engine.url
    return url.get_backend_name() != "sqlite" or sqlite_path(url.render_as_string(hide_password=False)) is not None


def same_database(store: Store) -> Store:
    """Returns a new Store (its own engine and connections) on the database of `store`, for reads on another
    thread's event loop: an engine's connections belong to the loop that opened them. The caller closes it."""
    return Store(create_engine_for(store.engine.url.render_as_string(hide_password=False), pool_size=2))
