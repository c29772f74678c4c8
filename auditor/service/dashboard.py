"""Read-side use cases for the web dashboard: the overview, findings search, runs, notifications and waivers.

Every number the dashboard shows comes from here or from `reports` (the overview's summary *is* `build_report`'s),
so a page and the JSON API never disagree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from auditor.domain.alerts import Delivery, DeliveryState
from auditor.domain.models import Waiver, WaiverProblem
from auditor.domain.records import RunRecord, RunStatus
from auditor.service.reports import EXPIRING_WITHIN, build_report
from auditor.store.dashboard import DashboardReads, FindingListing, FindingSearch, RunPoint
from auditor.store.outbox import Outbox
from auditor.store.repo import Store

TREND_DAYS = (7, 30, 90)
DELIVERY_STATES = tuple(s.value for s in DeliveryState)


def compliance_pct(compliant: int, total: int) -> float | None:
    """Returns compliant disks as a percentage of all audited disks (unknown ones count against), or None."""
    return round(100.0 * compliant / total, 1) if total else None


@dataclass(frozen=True, slots=True)
class Banner:
    """Something wrong with the audit itself that the overview shows above everything else."""

    kind: str  # failed | partial | overdue | never
    text: str


def run_banners(*, latest: RunRecord | None, last_good: RunRecord | None, now: datetime,
                interval: timedelta) -> list[Banner]:
    """Returns the banners for the last run: failed, partial, overdue (as /readyz: > 2 × interval), never run."""
    banners: list[Banner] = []
    if latest is None:
        return [Banner("never", "No audit has run yet: there is nothing to report.")]
    if latest.status is RunStatus.FAILED:
        first = latest.errors[0] if latest.errors else None
        why = f" ({first.code}: {first.message})" if first else ""
        banners.append(Banner("failed", f"The last audit run failed{why}. Its findings were not updated."))
    elif latest.status is RunStatus.PARTIAL:
        banners.append(Banner("partial", f"The last audit run was partial: {len(latest.errors)} target(s) could "
                                         f"not be read and {latest.disks_unknown} disk(s) have no verdict."))
    limit = 2 * interval
    if last_good is None or last_good.finished_at is None:
        if latest.status is RunStatus.FAILED:
            banners.append(Banner("overdue", "No audit run has completed yet."))
    elif now - last_good.finished_at > limit:
        age = now - last_good.finished_at
        banners.append(Banner("overdue", f"Overdue: the last complete or partial run finished {human_age(age)} "
                                         f"ago, more than twice the audit interval ({human_age(interval)})."))
    return banners


def human_age(delta: timedelta) -> str:
    """Returns a duration as a short text: 45s, 12 min, 5 h 3 min, 3 d 4 h."""
    seconds = max(int(delta.total_seconds()), 0)
    if seconds < 60:
        return f"{seconds}s"
    minutes = seconds // 60
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


@dataclass(frozen=True, slots=True)
class Overview:
    """The overview page's data: the compliance report, the history of the trend window, the last run's banners."""

    report: dict[str, Any]
    compliance_pct: float | None
    trend: list[RunPoint]
    trend_start: datetime
    banners: list[Banner]
    last_good: RunRecord | None


async def overview(store: Store, *, now: datetime, interval: timedelta, days: int,
                   waivers: Sequence[Waiver] = (), waiver_problems: Sequence[WaiverProblem] = (),
                   report: dict[str, Any] | None = None) -> Overview:
    """Returns the overview: `report` (built now unless given, e.g. from a cache), trend over `days`, banners."""
    if report is None:
        report = await build_report(store, now=now, waivers=waivers, waiver_problems=waiver_problems)
    start = now - timedelta(days=days)
    trend = await DashboardReads(store).run_points(since=start)
    latest = await store.latest_run()
    last_good = await store.last_successful_run()
    summary = report["summary"]
    return Overview(report=report, compliance_pct=compliance_pct(summary["compliant"], summary["disks_total"]),
                    trend=trend, trend_start=start,
                    banners=run_banners(latest=latest, last_good=last_good, now=now, interval=interval),
                    last_good=last_good)


@dataclass(frozen=True, slots=True)
class FindingsResult:
    """One page of a findings search, the total, and the choices of the organization filter."""

    items: list[FindingListing]
    total: int
    page: int
    pages: int
    sources: list[str]


async def search_findings(store: Store, search: FindingSearch, *, page: int,
                          sources: list[str] | None = None, total: int | None = None) -> FindingsResult:
    """Returns page `page` (from 1) of the findings matching `search`; a page past the end is the last one.

    `sources` (the organization filter's choices) and `total` (how many match) are used if already known (e.g.
    cached per run), else read.
    """
    reads = DashboardReads(store)
    size = search.limit
    items, total = await reads.search_findings(_at_page(search, page), total=total)
    pages = max(1, -(-total // size))
    if page > pages:
        page = pages
        items, total = await reads.search_findings(_at_page(search, page), total=total)
    if sources is None:
        sources = await reads.disk_sources()
    return FindingsResult(items=items, total=total, page=page, pages=pages, sources=sources)


async def count_findings(store: Store, search: FindingSearch) -> int:
    """Returns how many findings match `search` (its order and page aside)."""
    _items, total = await DashboardReads(store).search_findings(_at_page(search, 1, limit=1))
    return total


async def disk_sources(store: Store) -> list[str]:
    """Returns the distinct sources (`config`, `org:<ref>`) of the audited disks, sorted: the organization filter."""
    return await DashboardReads(store).disk_sources()


def _at_page(search: FindingSearch, page: int, *, limit: int | None = None) -> FindingSearch:
    size = search.limit if limit is None else limit
    return FindingSearch(statuses=search.statuses, rule=search.rule, severity=search.severity, org=search.org,
                         text=search.text, sort=search.sort, descending=search.descending,
                         offset=(max(page, 1) - 1) * size, limit=size)


@dataclass(slots=True)
class NotifierState:
    """How many outbox entries of one notifier are in each delivery state."""

    notifier: str
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DELIVERY_STATES, 0))

    @property
    def total(self) -> int:
        """Returns the number of entries of this notifier."""
        return sum(self.counts.values())


async def notifications(store: Store, *, limit: int = 50) -> tuple[list[NotifierState], list[Delivery]]:
    """Returns the delivery state per notifier (all entries) and the `limit` most recent entries."""
    outbox = Outbox(store)
    by_notifier: dict[str, NotifierState] = {}
    for notifier, state, count in await outbox.counts():
        by_notifier.setdefault(notifier, NotifierState(notifier)).counts[state] = count
    return [by_notifier[n] for n in sorted(by_notifier)], await outbox.recent(limit=limit)


@dataclass(frozen=True, slots=True)
class WaiverView:
    """The configured waivers: those that apply (soonest expiry first), those expiring soon, and the problems."""

    active: list[Waiver]
    expiring: list[Waiver]
    problems: list[WaiverProblem]


def waiver_view(waivers: Sequence[Waiver], problems: Sequence[WaiverProblem], *, now: datetime) -> WaiverView:
    """Returns the waivers page's lists; "expiring" is the report's `expiring_waivers` (within EXPIRING_WITHIN)."""
    horizon = (now + EXPIRING_WITHIN).date()
    active = sorted((w for w in waivers if w.is_valid(now=now)), key=lambda w: (w.expires, w.disk_id, w.rule))
    return WaiverView(active=active, expiring=[w for w in active if w.expires <= horizon], problems=list(problems))
