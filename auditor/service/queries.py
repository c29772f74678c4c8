"""Read-side use cases: every read of stored data the CLI, the API and the dashboard make — the current report,
findings, runs, a disk's history, notifications, readiness and the metrics' stored state, the dashboard's snapshot
and searches. A new read goes here (the period report and the evidence export have their own modules:
`compliance`, `evidence`). Each runs the store's one definition of the read (`auditor.store.queries`); the JSON
they return is shaped by `reports`, the dashboard's views by `dashboard`.

Two ways to run them. The use cases take `Services` (the async `Store`: the API, the dashboard, the demo).
`current_report`, `current_findings` and `current_disk_detail` run the same store reads for a one-shot command, on
a synchronous `Reader` with the checks of `open_services(katapult=False, migrate=False)`, so `auditor report`,
`findings` and `history` start without asyncio, the async engine, httpx or the notifiers (benchmarks/cli_start.py).
For them this module imports, at import time, nothing of the service but the report's JSON shapes and nothing of
the store but its reads; the dashboard's views and the settings' waivers are imported by the reads that use them.
"""

from __future__ import annotations

import asyncio
import contextlib
import platform
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from auditor import __version__
from auditor.domain.alerts import Delivery
from auditor.domain.listings import ALL_STATUSES, FindingQuery, FindingSearch
from auditor.domain.models import FindingStatus, TrackedFinding, Waiver, WaiverProblem
from auditor.domain.records import DiskStatus, RunRecord, RunStatus
from auditor.errors import SchemaError, StoreError
from auditor.service.clock import utcnow as _utcnow
from auditor.service.reports import DRIFT_WITHIN, assemble_report, detail_json, iso
from auditor.store import queries as reads
from auditor.store.engine import SCHEMA_HINT as SCHEMA_HINT

if TYPE_CHECKING:
    from auditor.config import Settings
    from auditor.service.dashboard import FindingsResult, NotifierState, Snapshot, WaiverView
    from auditor.service.services import Services
    from auditor.store.repo import Reader, Store

T = TypeVar("T")


# ---- the current report, findings, a disk's history -----------------------------------------------------------


async def read_report(services: Services) -> dict[str, Any]:
    """Returns the compliance report as of now, with the waivers that apply now (no Katapult call)."""
    from auditor.service.configuration import waivers_from

    now = services.clock()
    waivers, problems = waivers_from(services.settings, now=now)
    return await build_report(services.store, now=now, waivers=waivers, waiver_problems=problems)


async def build_report(
    store: Store, *, now: datetime, waivers: Sequence[Waiver] = (), waiver_problems: Sequence[WaiverProblem] = ()
) -> dict[str, Any]:
    """Returns the compliance report: last run, summary, disks and open/waived findings (no Katapult call)."""
    from auditor.store import queries

    inputs = await store.read(queries.report_inputs, now=now, drift_since=now - DRIFT_WITHIN)
    return assemble_report(now=now, inputs=inputs, waivers=waivers, waiver_problems=waiver_problems)


async def read_disk_detail(services: Services, *, disk_id: str) -> dict[str, Any] | None:
    """Returns a disk's current policies, findings, snapshot history, drift and finding events, observed runs and the
    remediation attempts concerning it; None if unknown."""
    history, seen, runs = await services.store.read(reads.disk_detail, disk_id, now=services.clock())
    detail = detail_json(history, observed=seen, invocations=runs)
    if detail is not None:
        detail["remediations"] = [r.as_dict() for r in await services.store.read(reads.disk_remediations, disk_id)]
    return detail


async def read_findings(services: Services, *, query: FindingQuery) -> tuple[list[TrackedFinding], str | None]:
    """Returns one page of findings (ordered by disk and fingerprint) and the cursor of the next page, or None."""
    return await services.store.read(reads.list_findings, query)


async def read_recent_runs(services: Services, *, limit: int) -> list[RunRecord]:
    """Returns the `limit` most recent runs, newest first."""
    return await services.store.read(reads.list_runs, limit=limit)


async def read_latest_run(services: Services) -> RunRecord | None:
    """Returns the latest finished run, or None (what read-side caches are keyed on)."""
    return await services.store.read(reads.latest_run)


async def read_notifications(services: Services, *, limit: int, state: str | None = None) -> list[Delivery]:
    """Returns the `limit` most recent outbox entries (of one delivery state if given), newest first."""
    return await services.store.read(reads.deliveries, limit=limit, state=state)


@contextlib.contextmanager
def _checked_reader(settings: Settings) -> Iterator[Reader]:
    """Yields a synchronous reader of the configured database after the checks `open_services(settings,
    katapult=False, migrate=False)` makes, with the same errors: SchemaError when the database is missing (never
    created) or not at the code's revision, StoreError when it cannot be read. Nothing is written: a run left
    `running` by a process that is gone reads as failed (`queries.run_view`)."""
    from auditor.store import engine
    from auditor.store.repo import Reader

    url = settings.database.url.get_secret_value()
    if url.startswith("sqlite") and engine.sqlite_file_missing(url):
        raise engine.schema_error(url, None, exists=False) or SchemaError(url)
    reader = Reader(url)
    try:
        problem = engine.schema_error(url, reader.revision())
        if problem is not None:
            raise problem
        yield reader
    finally:
        reader.close()


def current_report(settings: Settings, *, clock: Callable[[], datetime] = _utcnow,
                   tier: str | None = None) -> dict[str, Any]:
    """Returns `build_report`'s report for the configured database, read as `auditor report` reads it: on a
    synchronous connection, with the checks and errors of `open_services(settings, katapult=False,
    migrate=False)`."""
    from auditor.domain.lifecycle import parse_waivers
    from auditor.domain.rules import RULES
    from auditor.store import queries

    with _checked_reader(settings) as reader:
        now = clock()
        waivers, problems = parse_waivers(settings.waivers, known_rules=RULES.keys(), now=now)
        inputs = reader.read(queries.report_inputs, now=now, drift_since=now - DRIFT_WITHIN)
        return assemble_report(now=now, inputs=inputs, waivers=waivers, waiver_problems=problems, tier=tier)


def current_findings(settings: Settings, *, statuses: Sequence[str]) -> list[TrackedFinding]:
    """Returns the findings with one of `statuses`, ordered by disk and fingerprint, read as `auditor findings`
    reads them (see `current_report`)."""
    from auditor.store import queries

    with _checked_reader(settings) as reader:
        return reader.read(queries.all_findings, statuses=statuses)


def current_disk_detail(settings: Settings, disk_id: str, *,
                        clock: Callable[[], datetime] = _utcnow) -> dict[str, Any] | None:
    """Returns `read_disk_detail` read as `auditor report` reads (`auditor history`), with the same checks and
    errors."""
    from auditor.store import queries

    with _checked_reader(settings) as reader:
        history, seen, runs = reader.read(queries.disk_detail, disk_id, now=clock())
        detail = detail_json(history, observed=seen, invocations=runs)
        if detail is not None:
            detail["remediations"] = [r.as_dict() for r in reader.read(queries.disk_remediations, disk_id)]
        return detail


# ---- operations: readiness and the stored state /metrics shows --------------------------------------------------


@dataclass(frozen=True, slots=True)
class Readiness:
    """Whether the auditor is ready (`reason` None) or why not, and the last complete or partial cycle."""

    reason: str | None
    last_cycle: dict[str, Any] | None


async def read_readiness(services: Services) -> Readiness:
    """Returns readiness: the database answers and the last complete or partial cycle finished less than twice
    audit.interval ago. Failed cycles do not count: an auditor that fails every cycle is not ready."""
    now = services.clock()
    store = services.store
    try:
        await store.ping()
        run = await store.read(reads.last_successful_run)
        latest = await store.read(reads.latest_run, finished=True)
    except StoreError as exc:
        return Readiness(f"database unavailable: {exc}", None)
    if run is None or run.finished_at is None:
        reason = "no audit cycle has finished yet"
        if latest is not None and latest.status is RunStatus.FAILED:
            first = latest.errors[0] if latest.errors else None
            reason += f"; the last one failed ({first.code}: {first.message})" if first else "; the last failed"
        return Readiness(reason, None)
    age = (now - run.finished_at).total_seconds()
    last = {"id": run.id, "status": run.status.value, "finished_at": iso(run.finished_at),
            "age_seconds": round(age, 3)}
    limit = 2 * services.settings.audit.interval.total_seconds()
    if age > limit:
        failed = (f"; later cycles failed (last: {latest.errors[0].code}: {latest.errors[0].message})"
                  if latest is not None and latest.id != run.id and latest.status is RunStatus.FAILED
                  and latest.errors else "")
        return Readiness(f"the last complete or partial audit cycle finished {age:.0f}s ago, more than twice "
                         f"audit.interval ({limit:.0f}s){failed}", last)
    return Readiness(None, last)


@dataclass(frozen=True, slots=True)
class BuildInfo:
    """What `auditor_build_info` names: the auditor's version, the Python running it, the database kind."""

    version: str
    python: str
    database: str


def build_info(services: Services) -> BuildInfo:
    """Returns this process's build: the auditor's version, Python's (3.11.7) and the database kind."""
    return BuildInfo(__version__, platform.python_version(), services.store.kind)


@dataclass(frozen=True, slots=True)
class StoredState:
    """What a metrics scrape reads from the database."""

    finding_counts: list[tuple[str, str, str, int]]
    disk_counts: dict[str, int]
    notification_counts: list[tuple[str, str, int]]
    last_success_at: float | None
    last_finished_at: float | None


async def read_stored_state(services: Services) -> StoredState | None:
    """Returns the stored state metrics show, or None when the database does not answer."""
    store = services.store
    try:
        counts = await store.read(reads.finding_counts)
        disks = await store.read(reads.disk_status_counts)
        notifications = await store.read(reads.delivery_counts)
        success = await store.read(reads.last_successful_run)
        last = await store.read(reads.latest_run, finished=True)
    except StoreError:
        return None

    def stamp(run: RunRecord | None) -> float | None:
        return run.finished_at.timestamp() if run is not None and run.finished_at is not None else None

    return StoredState(counts, disks, notifications, stamp(success), stamp(last))


# ---- the dashboard ---------------------------------------------------------------------------------------------


async def read_snapshot(services: Services) -> Snapshot:
    """Reads everything the overview and findings pages show (the report, trend history, findings, sources), as
    of now."""
    from auditor.service import dashboard
    from auditor.service.configuration import waivers_from

    now = services.clock()
    store = services.store
    waivers, waiver_problems = waivers_from(services.settings, now=now)
    # First: the snapshot is at least as new as the run it is labelled with.
    latest = await store.read(reads.latest_run)
    report = await build_report(store, now=now, waivers=waivers, waiver_problems=waiver_problems)
    last_good = await store.read(reads.last_successful_run)
    history = await store.read(reads.run_points, since=now - timedelta(days=max(dashboard.TREND_DAYS)))
    sources = await store.read(reads.disk_sources)
    tiers = await store.read(reads.disk_tiers)
    counts = await store.read(reads.finding_status_counts)
    index = None
    if sum(counts.values()) <= dashboard.INDEX_LIMIT:
        index = dashboard.FindingIndex(await store.read(reads.finding_listings, statuses=ALL_STATUSES), ALL_STATUSES)
    elif counts.get(FindingStatus.OPEN, 0) + counts.get(FindingStatus.WAIVED, 0) <= dashboard.INDEX_LIMIT:
        active = dashboard.OPEN_OR_WAIVED
        index = dashboard.FindingIndex(await store.read(reads.finding_listings, statuses=active), active)
    # The overview's ten most severe open findings (severity, then disk and fingerprint, as the findings page).
    most_severe = FindingSearch(limit=dashboard.TOP_FINDINGS)
    if index is not None:
        top = index.matching(most_severe)[:dashboard.TOP_FINDINGS]
    else:
        top, _found = await store.read(reads.search_findings, most_severe)
    summary = report["summary"]
    # Exempt disks are judged by no rule: outside the ratio, as in the period report.
    judged = summary["disks_total"] - summary.get("exempt", 0)
    return dashboard.Snapshot(
        built_at=now, latest=latest, last_good=last_good, report={k: report[k] for k in dashboard.REPORT_KEYS},
        compliance_pct=dashboard.compliance_pct(summary["compliant"], judged),
        unknown=[d for d in report["disks"] if d["status"] == DiskStatus.UNKNOWN], history=history, sources=sources,
        index=index, tiers=tiers, top_open=list(top))


async def read_search_page(services: Services, *, search: FindingSearch, page: int,
                           sources: list[str] | None = None, total: int | None = None) -> FindingsResult:
    """Returns page `page` (from 1) of the findings matching `search`; a page past the end is the last one.

    `sources` (the organization filter's choices) and `total` (how many match) are used if already known (e.g.
    cached per run), else read.
    """
    from auditor.service.dashboard import FindingsResult

    store = services.store
    size = search.limit
    items, found = await store.read(reads.search_findings, _at_page(search, page), total=total)
    pages = max(1, -(-found // size))
    if page > pages:
        page = pages
        items, found = await store.read(reads.search_findings, _at_page(search, page), total=found)
    if sources is None:
        sources = await store.read(reads.disk_sources)
    return FindingsResult(items=items, total=found, page=page, pages=pages, sources=sources,
                          tiers=await store.read(reads.disk_tiers))


async def count_findings(services: Services, *, search: FindingSearch) -> int:
    """Returns how many findings match `search` (its order and page aside)."""
    _items, total = await services.store.read(reads.search_findings, _at_page(search, 1, limit=1))
    return total


async def read_notifier_states(services: Services, *, limit: int = 50) -> tuple[list[NotifierState], list[Delivery]]:
    """Returns the delivery state per notifier (all entries) and the `limit` most recent entries."""
    from auditor.service.dashboard import NotifierState

    store = services.store
    by_notifier: dict[str, NotifierState] = {}
    for notifier, state, count in await store.read(reads.delivery_counts):
        by_notifier.setdefault(notifier, NotifierState(notifier)).counts[state] = count
    return [by_notifier[n] for n in sorted(by_notifier)], await store.read(reads.deliveries, limit=limit)


async def read_waivers(services: Services) -> WaiverView:
    """Returns the waivers page's lists as of now (from the configuration: no database read)."""
    from auditor.service.configuration import waivers_from
    from auditor.service.dashboard import waiver_view

    now = services.clock()
    valid, problems = waivers_from(services.settings, now=now)
    return waiver_view(valid, problems, now=now)


async def off_loop(services: Services, *, read: Callable[[Services], Awaitable[T]]) -> T:
    """Runs `read` in a worker thread on its own event loop, on Services over a second engine on the same database:
    neither its queries' results nor its Python work hold up this loop. (On an in-memory SQLite database, which a
    second engine would not see, it runs here.)"""
    if not services.store.can_reopen():
        return await read(services)

    def work() -> T:
        async def read_reopened() -> T:
            own = replace(services, store=services.store.reopened())
            try:
                return await read(own)
            finally:
                await own.store.close()

        return asyncio.run(read_reopened())

    return await asyncio.to_thread(work)


def _at_page(search: FindingSearch, page: int, *, limit: int | None = None) -> FindingSearch:
    size = search.limit if limit is None else limit
    return FindingSearch(statuses=search.statuses, rule=search.rule, severity=search.severity, org=search.org,
                         text=search.text, sort=search.sort, descending=search.descending, tier=search.tier,
                         offset=(max(page, 1) - 1) * size, limit=size)
