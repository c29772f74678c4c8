"""The dashboard's view models: the `Snapshot` the overview and findings pages show, the in-memory `FindingIndex`,
banners, the notifications' and waivers' views. Pure: `queries` reads what goes in them.

Every number the dashboard shows comes from here or from `reports` (the overview's summary *is* `build_report`'s),
so a page and the JSON API never disagree. The overview and the findings pages read a `Snapshot`: everything they
show of the data as the latest run left it, read once per run (the web layer builds it off the event loop).
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

from auditor.domain.alerts import DeliveryState
from auditor.domain.listings import SORT_KEYS, FindingListing, FindingSearch, RunPoint, SortKey
from auditor.domain.models import FindingStatus, Waiver, WaiverProblem
from auditor.domain.records import RunRecord, RunStatus
from auditor.service.reports import EXPIRING_WITHIN
from auditor.vocabulary import format_duration

# Trend windows in days; 1 (24 hours) is the default while less than MATURE_DAYS of runs exist, so a new
# deployment's first runs spread over the chart instead of one line at its right edge.
TREND_DAYS = (1, 7, 30, 90)
MATURE_DAYS = 7
TOP_FINDINGS = 10  # the overview lists this many of the most severe open findings


def default_trend_days(history: Sequence[RunPoint], *, now: datetime) -> int:
    """Returns the overview's default trend window: 24 hours while the runs (oldest first) span less than
    MATURE_DAYS, else MATURE_DAYS."""
    young = not history or now - history[0].started_at < timedelta(days=MATURE_DAYS)
    return 1 if young else MATURE_DAYS
DELIVERY_STATES = tuple(s.value for s in DeliveryState)


def compliance_pct(compliant: int, total: int) -> float | None:
    """Returns compliant disks as a percentage of the judged disks (unknown ones count against), or None; not
    rounded (pages format it: 1 of 5,000 disks is "< 0.1%", never 0)."""
    return 100.0 * compliant / total if total else None


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
        # The page prints the kind first ("Overdue."), so the text does not say it again.
        banners.append(Banner("overdue", f"The last complete or partial run finished "
                                         f"{format_duration(age, style='age')} ago, more than twice the audit "
                                         f"interval ({format_duration(interval, style='age')})."))
    return banners


# The findings page answers from memory when the findings fit: at most this many rows (every status if they all fit,
# else the open and waived ones, and views that include resolved findings are searched in SQL).
INDEX_LIMIT = 20_000
OPEN_OR_WAIVED = (FindingStatus.OPEN.value, FindingStatus.WAIVED.value)
REPORT_KEYS = ("generated_at", "last_run", "summary", "expiring_waivers", "waiver_problems", "drift")


@dataclass(frozen=True, slots=True)
class FindingsResult:
    """One page of a findings search, the total, and the choices of the organization filter."""

    items: list[FindingListing]
    total: int
    page: int
    pages: int
    sources: list[str]
    tiers: list[str] = field(default_factory=list)


class FindingIndex:
    """Every finding of some statuses with its disk's name and source, searched in memory.

    Filters, order and pages mean what `queries.search_findings` makes of them in SQL: the order is the sort
    key (severity by rank), then disk id and fingerprint ascending; text is a case-insensitive substring of the disk
    id or name. Text columns sort by code point (as SQLite does; PostgreSQL would use the database's collation).
    Every order is computed when the index is made (off the event loop); a search then filters one of them (and
    keeps the filtered list for the view's other pages).
    """

    def __init__(self, listings: Sequence[FindingListing], statuses: Sequence[str]) -> None:
        self.statuses = frozenset(statuses)
        base = sorted(listings, key=lambda item: (item.finding.disk_id, item.finding.fingerprint))
        self.items: tuple[FindingListing, ...] = tuple(base)
        self._orders: dict[tuple[SortKey, bool], tuple[FindingListing, ...]] = {}
        for key in SORT_KEYS:
            primary = _SORT_VALUES[key]
            for descending in (True, False):
                # Stable sorts: equal sort keys keep the (disk, fingerprint) order, in both directions.
                self._orders[(key, descending)] = tuple(sorted(base, key=primary, reverse=descending))
        self._views: OrderedDict[tuple[Any, ...], list[FindingListing]] = OrderedDict()

    def __len__(self) -> int:
        return len(self.items)

    def covers(self, statuses: Sequence[str]) -> bool:
        """Returns whether the index holds every finding of these statuses."""
        return self.statuses.issuperset(statuses)

    def matching(self, search: FindingSearch) -> list[FindingListing]:
        """Returns every finding that matches the search's filters, in its order (offset and limit aside)."""
        key = (search.statuses, search.rule, search.severity, search.org, search.text, search.sort,
               search.descending, search.tier)
        hit = self._views.get(key)
        if hit is not None:
            self._views.move_to_end(key)
            return hit
        statuses = frozenset(search.statuses)
        rule, severity, org, tier = search.rule, search.severity, search.org, search.tier
        needle = search.text.lower() if search.text else None
        found = [item for item in self._orders[(search.sort, search.descending)]
                 if item.finding.status.value in statuses
                 and (rule is None or item.finding.rule == rule)
                 and (severity is None or item.finding.severity.value == severity)
                 and (org is None or item.disk_source == org)
                 and (tier is None or item.disk_tier == tier)
                 and (needle is None or needle in item.finding.disk_id.lower()
                      or needle in (item.disk_name or "").lower())]
        self._views[key] = found
        while len(self._views) > VIEW_CACHE_SIZE:
            self._views.popitem(last=False)
        return found

    def page(self, search: FindingSearch, *, page: int, sources: list[str],
             tiers: list[str] | None = None) -> FindingsResult:
        """Returns page `page` (from 1; past the end: the last) of the findings matching `search`."""
        found = self.matching(search)
        size = search.limit
        pages = max(1, -(-len(found) // size))
        page = min(max(page, 1), pages)
        return FindingsResult(items=found[(page - 1) * size:page * size], total=len(found), page=page, pages=pages,
                              sources=sources, tiers=list(tiers or []))


VIEW_CACHE_SIZE = 256  # filtered lists per index (filters × order), a list of references each
_SORT_VALUES: dict[SortKey, Callable[[FindingListing], Any]] = {
    "severity": lambda item: item.finding.severity.rank,
    "rule": lambda item: item.finding.rule,
    "disk": lambda item: item.finding.disk_id,
    "status": lambda item: item.finding.status.value,
    "first_seen": lambda item: item.finding.first_seen,
    "last_seen": lambda item: item.finding.last_seen,
}


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the overview and the findings pages show of the data as one run left it, read in one go.

    `report` is `build_report`'s (so every number equals the API's) without its per-disk and per-finding lists;
    `unknown` is its disks without a verdict. `history` holds the runs of the longest trend window before
    `built_at`: until the next run commits, any window ending later is a slice of it. `index` is None when there
    are too many findings to hold (see INDEX_LIMIT).
    """

    built_at: datetime
    latest: RunRecord | None
    last_good: RunRecord | None
    report: dict[str, Any]
    compliance_pct: float | None
    unknown: list[dict[str, Any]]
    history: list[RunPoint]
    sources: list[str]
    index: FindingIndex | None
    tiers: list[str] = field(default_factory=list)
    top_open: list[FindingListing] = field(default_factory=list)  # the most severe open findings (TOP_FINDINGS)

    def trend(self, *, days: int, now: datetime) -> tuple[list[RunPoint], datetime]:
        """Returns the runs started in the `days` before `now` (oldest first) and the window's start."""
        start = now - timedelta(days=days)
        return self.history[bisect.bisect_left(self.history, start, key=lambda r: r.started_at):], start

    def banners(self, *, now: datetime, interval: timedelta) -> list[Banner]:
        """Returns the overview's banners as of `now` (overdue moves with the clock, the rest with the data)."""
        return run_banners(latest=self.latest, last_good=self.last_good, now=now, interval=interval)


@dataclass(slots=True)
class NotifierState:
    """How many outbox entries of one notifier are in each delivery state."""

    notifier: str
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DELIVERY_STATES, 0))

    @property
    def total(self) -> int:
        """Returns the number of entries of this notifier."""
        return sum(self.counts.values())


@dataclass(frozen=True, slots=True)
class WaiverView:
    """The configured waivers as of `today`: those that apply (soonest expiry first), those expiring soon, and the
    problems."""

    active: list[Waiver]
    expiring: list[Waiver]
    problems: list[WaiverProblem]
    today: date


def waiver_view(waivers: Sequence[Waiver], problems: Sequence[WaiverProblem], *, now: datetime) -> WaiverView:
    """Returns the waivers page's lists; "expiring" is the report's `expiring_waivers` (within EXPIRING_WITHIN)."""
    horizon = (now + EXPIRING_WITHIN).date()
    active = sorted((w for w in waivers if w.is_valid(now=now)), key=lambda w: (w.expires, w.disk_id, w.rule))
    return WaiverView(active=active, expiring=[w for w in active if w.expires <= horizon], problems=list(problems),
                      today=now.date())
