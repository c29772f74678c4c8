"""Read-side use cases: every read of stored data the CLI, the API and the dashboard make — the current report,
findings, runs, a disk's history, notifications, readiness and the metrics' stored state, the dashboard's snapshot
and searches. A new read goes here (the period report and the evidence export have their own modules:
`compliance`, `evidence`). The JSON they return is shaped by `reports`, the dashboard's views by `dashboard`.

Two ways to run them. The use cases take `Services` (the async `Store`: the API, the dashboard, the demo).
`current_report`, `current_findings` and `current_disk_detail` are the same reads for a one-shot command: they open
the database read-only as `open_services(katapult=False, migrate=False)` does, through `auditor.store.reads`
(sqlite3 for a plain SQLite file, else psycopg or SQLAlchemy Core), so `auditor report`, `findings` and `history`
start without the ORM, asyncio, httpx or the notifiers (benchmarks/cli_start.py). That is why this module imports
only the domain and light service modules at import time, and the store inside the functions that use it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from auditor.domain.alerts import Delivery
from auditor.domain.listings import FindingQuery, FindingSearch
from auditor.domain.models import TrackedFinding, Waiver, WaiverProblem
from auditor.domain.records import RunRecord
from auditor.errors import SchemaError, StoreError
from auditor.service import dashboard
from auditor.service.clock import utcnow as _utcnow
from auditor.service.configuration import waivers_from
from auditor.service.dashboard import (
    ALL_STATUSES,
    REPORT_KEYS,
    TREND_DAYS,
    FindingIndex,
    FindingsResult,
    NotifierState,
    Snapshot,
    WaiverView,
    compliance_pct,
    waiver_view,
)
from auditor.service.housekeeping import ORPHAN_REASON
from auditor.service.housekeeping import sweep_log as services_log
from auditor.service.reports import DRIFT_WITHIN, REPORTED_STATUSES, assemble_report, detail_json, iso

if TYPE_CHECKING:
    from auditor.config import Settings
    from auditor.service.services import Services
    from auditor.store.dashboard import DashboardReads
    from auditor.store.reads import ReportReads
    from auditor.store.repo import Store

T = TypeVar("T")

# What a read-only command is told to do about a missing or outdated database (`services.check_schema` too).
SCHEMA_HINT = "run `auditor db upgrade` or start `auditor run` once"


# ---- the current report, findings, a disk's history -----------------------------------------------------------


async def read_report(services: Services) -> dict[str, Any]:
    """Returns the compliance report as of now, with the waivers that apply now (no Katapult call)."""
    now = services.clock()
    waivers, problems = waivers_from(services.settings, now=now)
    return await build_report(services.store, now=now, waivers=waivers, waiver_problems=problems)


async def build_report(
    store: Store, *, now: datetime, waivers: Sequence[Waiver] = (), waiver_problems: Sequence[WaiverProblem] = ()
) -> dict[str, Any]:
    """Returns the compliance report: last run, summary, disks and open/waived findings (no Katapult call)."""
    run = await store.latest_run()
    disks = await store.load_disks(targets_only=True)
    findings = await store.all_findings(statuses=REPORTED_STATUSES)
    policies = await store.current_policy_ids()
    drift = await store.recent_drift(since=now - DRIFT_WITHIN)
    return assemble_report(now=now, run=run, disks=disks, findings=findings, policies=policies, drift=drift,
                           waivers=waivers, waiver_problems=waiver_problems)


async def read_disk_detail(services: Services, *, disk_id: str) -> dict[str, Any] | None:
    """Returns a disk's current policies, findings, snapshot history, drift and finding events; None if unknown."""
    return detail_json(await services.store.disk_history(disk_id))


async def list_findings(services: Services, *, query: FindingQuery) -> tuple[list[TrackedFinding], str | None]:
    """Returns one page of findings (ordered by disk and fingerprint) and the cursor of the next page, or None."""
    return await services.store.list_findings(query)


async def list_runs(services: Services, *, limit: int) -> list[RunRecord]:
    """Returns the `limit` most recent runs, newest first."""
    return await services.store.list_runs(limit=limit)


async def read_latest_run(services: Services) -> RunRecord | None:
    """Returns the latest finished run, or None (what read-side caches are keyed on)."""
    return await services.store.latest_run()


async def list_notifications(services: Services, *, limit: int, state: str | None = None) -> list[Delivery]:
    """Returns the `limit` most recent outbox entries (of one delivery state if given), newest first."""
    return await services.outbox.recent(limit=limit, state=state)


@contextlib.contextmanager
def _checked_reads(settings: Settings, clock: Callable[[], datetime]) -> Iterator[ReportReads]:
    """Yields the read-only reads of the configured database after the checks `open_services(settings,
    katapult=False, migrate=False)` makes, with the same errors: SchemaError when the database is missing (never
    created) or not at the code's revision, StoreError when it cannot be read; runs left `running` by a process
    that is gone are marked failed first (a failure there is ignored, as there)."""
    from pathlib import Path

    from auditor.store import engine
    from auditor.store.reads import open_report_reads, plain_sqlite_file

    url = settings.database.url.get_secret_value()
    plain = plain_sqlite_file(url)  # sqlite3 or psycopg: SQLAlchemy is loaded only for other URLs and for errors
    missing = ((not Path(plain).is_file()) if plain is not None
               else url.startswith("sqlite") and engine.sqlite_file_missing(url))
    if missing:
        raise SchemaError(f"database {engine.safe_url(url)} does not exist: check database.url, or {SCHEMA_HINT}")
    reads = open_report_reads(url)
    try:
        current, head = reads.current_revision()
        if current != head:
            raise SchemaError(f"database {engine.safe_url(url)} is at schema revision {current or 'none'}, this "
                              f"version needs {head}: {SCHEMA_HINT}")
        with contextlib.suppress(StoreError):
            abandoned = reads.abandon_orphaned_runs(now=clock(), reason=ORPHAN_REASON)
            if abandoned:
                services_log.warning("marked %d run(s) left running by a process that is gone as failed: %s",
                                     len(abandoned), ", ".join(abandoned))
        yield reads
    finally:
        reads.close()


def current_report(settings: Settings, *, clock: Callable[[], datetime] = _utcnow,
                   tier: str | None = None) -> dict[str, Any]:
    """Returns `build_report`'s report for the configured database, read as `auditor report` reads it: what
    `open_services(settings, katapult=False, migrate=False)` plus `build_report` do, with the same errors."""
    from auditor.domain.lifecycle import parse_waivers
    from auditor.domain.rules import RULES

    with _checked_reads(settings, clock) as reads:
        waivers, problems = parse_waivers(settings.waivers, known_rules=RULES.keys(), now=clock())
        now = clock()
        return assemble_report(
            now=now, run=reads.latest_run(), disks=reads.target_disks(),
            findings=reads.all_findings(statuses=REPORTED_STATUSES), policies=reads.current_policy_ids(),
            drift=reads.recent_drift(since=now - DRIFT_WITHIN), waivers=waivers, waiver_problems=problems,
            tier=tier)


def current_findings(settings: Settings, *, statuses: Sequence[str],
                     clock: Callable[[], datetime] = _utcnow) -> list[TrackedFinding]:
    """Returns the findings with one of `statuses`, ordered by disk and fingerprint, read as `auditor findings`
    reads them: what `open_services(...)` plus `Store.all_findings` give, with the same errors."""
    with _checked_reads(settings, clock) as reads:
        return reads.all_findings(statuses=statuses)


def current_disk_detail(settings: Settings, disk_id: str, *,
                        clock: Callable[[], datetime] = _utcnow) -> dict[str, Any] | None:
    """Returns `read_disk_detail` read as `auditor report` reads (`auditor history`), with the same checks and
    errors."""
    with _checked_reads(settings, clock) as reads:
        return detail_json(reads.disk_history(disk_id))


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
        run = await store.last_successful_run()
        latest = await store.latest_run(finished=True)
    except StoreError as exc:
        return Readiness(f"database unavailable: {exc}", None)
    if run is None or run.finished_at is None:
        reason = "no audit cycle has finished yet"
        if latest is not None and latest.status.value == "failed":
            first = latest.errors[0] if latest.errors else None
            reason += f"; the last one failed ({first.code}: {first.message})" if first else "; the last failed"
        return Readiness(reason, None)
    age = (now - run.finished_at).total_seconds()
    last = {"id": run.id, "status": run.status.value, "finished_at": iso(run.finished_at),
            "age_seconds": round(age, 3)}
    limit = 2 * services.settings.audit.interval.total_seconds()
    if age > limit:
        failed = (f"; later cycles failed (last: {latest.errors[0].code}: {latest.errors[0].message})"
                  if latest is not None and latest.id != run.id and latest.status.value == "failed"
                  and latest.errors else "")
        return Readiness(f"the last complete or partial audit cycle finished {age:.0f}s ago, more than twice "
                         f"audit.interval ({limit:.0f}s){failed}", last)
    return Readiness(None, last)


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
        counts = await store.finding_counts()
        disks = await store.disk_status_counts()
        notifications = await services.outbox.counts()
        success = await store.last_successful_run()
        last = await store.latest_run(finished=True)
    except StoreError:
        return None

    def stamp(run: RunRecord | None) -> float | None:
        return run.finished_at.timestamp() if run is not None and run.finished_at is not None else None

    return StoredState(counts, disks, notifications, stamp(success), stamp(last))


# ---- the dashboard ---------------------------------------------------------------------------------------------


async def read_snapshot(services: Services) -> Snapshot:
    """Reads everything the overview and findings pages show (the report, trend history, findings, sources), as
    of now."""
    now = services.clock()
    store = services.store
    waivers, waiver_problems = waivers_from(services.settings, now=now)
    latest = await store.latest_run()  # first: the snapshot is at least as new as the run it is labelled with
    report = await build_report(store, now=now, waivers=waivers, waiver_problems=waiver_problems)
    last_good = await store.last_successful_run()
    reads = _dashboard_reads(store)
    history = await reads.run_points(since=now - timedelta(days=max(TREND_DAYS)))
    sources = await reads.disk_sources()
    tiers = await reads.disk_tiers()
    counts = await reads.finding_status_counts()
    index = None
    if sum(counts.values()) <= dashboard.INDEX_LIMIT:
        index = FindingIndex(await reads.finding_listings(ALL_STATUSES), ALL_STATUSES)
    elif counts.get("open", 0) + counts.get("waived", 0) <= dashboard.INDEX_LIMIT:
        index = FindingIndex(await reads.finding_listings(("open", "waived")), ("open", "waived"))
    summary = report["summary"]
    return Snapshot(built_at=now, latest=latest, last_good=last_good, report={k: report[k] for k in REPORT_KEYS},
                    # Exempt disks are judged by no rule: outside the ratio, as in the period report.
                    compliance_pct=compliance_pct(summary["compliant"],
                                                  summary["disks_total"] - summary.get("exempt", 0)),
                    unknown=[d for d in report["disks"] if d["status"] == "unknown"], history=history,
                    sources=sources, index=index, tiers=tiers)


async def search_findings(services: Services, *, search: FindingSearch, page: int,
                          sources: list[str] | None = None, total: int | None = None) -> FindingsResult:
    """Returns page `page` (from 1) of the findings matching `search`; a page past the end is the last one.

    `sources` (the organization filter's choices) and `total` (how many match) are used if already known (e.g.
    cached per run), else read.
    """
    reads = _dashboard_reads(services.store)
    size = search.limit
    items, total = await reads.search_findings(_at_page(search, page), total=total)
    pages = max(1, -(-total // size))
    if page > pages:
        page = pages
        items, total = await reads.search_findings(_at_page(search, page), total=total)
    if sources is None:
        sources = await reads.disk_sources()
    return FindingsResult(items=items, total=total, page=page, pages=pages, sources=sources,
                          tiers=await reads.disk_tiers())


async def count_findings(services: Services, *, search: FindingSearch) -> int:
    """Returns how many findings match `search` (its order and page aside)."""
    _items, total = await _dashboard_reads(services.store).search_findings(_at_page(search, 1, limit=1))
    return total


async def read_notifier_states(services: Services, *, limit: int = 50) -> tuple[list[NotifierState], list[Delivery]]:
    """Returns the delivery state per notifier (all entries) and the `limit` most recent entries."""
    outbox = services.outbox
    by_notifier: dict[str, NotifierState] = {}
    for notifier, state, count in await outbox.counts():
        by_notifier.setdefault(notifier, NotifierState(notifier)).counts[state] = count
    return [by_notifier[n] for n in sorted(by_notifier)], await outbox.recent(limit=limit)


async def read_waivers(services: Services) -> WaiverView:
    """Returns the waivers page's lists as of now (from the configuration: no database read)."""
    now = services.clock()
    valid, problems = waivers_from(services.settings, now=now)
    return waiver_view(valid, problems, now=now)


async def off_loop(services: Services, read: Callable[[Services], Awaitable[T]]) -> T:
    """Runs `read` in a worker thread on its own event loop, on Services over a second engine on the same database:
    neither its queries' results nor its Python work hold up this loop. (On an in-memory SQLite database, which a
    second engine would not see, it runs here.)"""
    from auditor.store.dashboard import can_reopen, same_database

    if not can_reopen(services.store):
        return await read(services)

    def work() -> T:
        async def go() -> T:
            own = replace(services, store=same_database(services.store))
            try:
                return await read(own)
            finally:
                await own.store.close()

        return asyncio.run(go())

    return await asyncio.to_thread(work)


def _dashboard_reads(store: Store) -> DashboardReads:
    from auditor.store.dashboard import DashboardReads

    return DashboardReads(store)


def _at_page(search: FindingSearch, page: int, *, limit: int | None = None) -> FindingSearch:
    size = search.limit if limit is None else limit
    return FindingSearch(statuses=search.statuses, rule=search.rule, severity=search.severity, org=search.org,
                         text=search.text, sort=search.sort, descending=search.descending, tier=search.tier,
                         offset=(max(page, 1) - 1) * size, limit=size)
