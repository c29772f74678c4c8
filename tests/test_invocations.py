"""Observed invocations end to end: the fake Katapult behind a loopback socket, its policies' schedules running on a
clock the test moves (the auditor's clock is the same one), real cycles on SQLite and PostgreSQL; then the reports,
the API, the dashboard's disk page and the period report read what was observed."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from auditor.api import ApiDeps, create_app
from auditor.api.models import Compliance, DiskDetail, Report
from auditor.config import Settings
from auditor.domain.periods import Period
from auditor.domain.records import RunStatus
from auditor.fake import FakeServer, Fleet
from auditor.render.compliance import DISK_CSV_COLUMNS, compliance_csv
from auditor.service import Services, open_services
from auditor.service.compliance import read_period_report
from auditor.service.cycle import run_cycle
from auditor.service.evidence import build_evidence
from auditor.service.queries import read_disk_detail, read_report
from auditor.store import queries
from auditor.store.pruning import delete_history_before

pytestmark = pytest.mark.slow  # a real loopback socket

T0 = datetime(2030, 3, 1, tzinfo=UTC)
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
ORG = "org_invocations0001"
WEEKLY_STEP = "disk_weeklystep00001"  # a daily policy that runs every 7 days (frequency 7)
DAILY = "disk_dailyhealthy001"  # a daily policy that runs daily
EMPTY = "disk_neverholdsdata1"  # runs, but its total_size stays 0
POLICY = {WEEKLY_STEP: "dbp_weeklystep00001", DAILY: "dbp_dailyhealthy001", EMPTY: "dbp_neverholdsdata1"}


class Wall:
    """One clock for the auditor and the fake's schedules, moved by the test."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def unix(self) -> float:
        return self.now.timestamp()


def make_fleet(wall: Wall) -> Fleet:
    fleet = Fleet(rate_limit_per_minute=100_000, schedule_clock=wall.unix)
    org = fleet.add_org("invocations", id=ORG)
    first_run = int((T0 + HOUR).timestamp())
    for disk_id, frequency, growth in ((WEEKLY_STEP, 7, 2.5), (DAILY, 1, 2.5), (EMPTY, 1, 0.0)):
        fleet.add_disk(org.id, disk_id.removeprefix("disk_"), id=disk_id)
        fleet.add_policy(disk_id, id=POLICY[disk_id], retention=14, interval="daily", next_invocation_at=first_run,
                         frequency=frequency, growth=growth)
    return fleet


def settings_for(db_url: str, api_url: str, mode: str) -> Settings:
    audit: dict[str, Any] = {"interval": "6h"}
    audit["disks" if mode == "disks" else "organizations"] = list(POLICY) if mode == "disks" else [ORG]
    return Settings(**{
        "katapult": {"api_url": api_url, "per_page": 2, "max_requests_per_minute": 60000, "max_attempts": 2},
        "database": {"url": db_url},
        "audit": audit,
    })


@dataclass
class World:
    wall: Wall
    fleet: Fleet
    services: Services

    async def cycle_at(self, at: datetime) -> int:
        """Runs a cycle at `at`; returns its requests to Katapult."""
        self.wall.now = at
        outcome = await run_cycle(self.services, trigger="test")
        assert outcome.status is RunStatus.COMPLETE, outcome.errors
        return outcome.stats.requests

    async def open_rules(self, disk_id: str) -> set[str]:
        report = await read_report(self.services)
        return {f["rule"] for f in report["findings"] if f["disk_id"] == disk_id and f["status"] == "open"}


@contextmanager
def serving(fleet: Fleet) -> Iterator[FakeServer]:
    with FakeServer(fleet) as server:
        yield server


@asynccontextmanager
async def world_for(db_url: str, mode: str) -> AsyncIterator[World]:
    wall = Wall(T0)
    fleet = make_fleet(wall)
    with serving(fleet) as server:
        async with open_services(settings_for(db_url, server.url, mode), token="fake-token", clock=wall) as services:
            yield World(wall, fleet, services)


def by_disk(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {d["disk_id"]: d for d in report["disks"]}


@pytest.mark.parametrize("mode", ["disks", "organizations"])
async def test_a_daily_policy_stepping_seven_days_opens_observed_interval_too_long(db_url: str, mode: str) -> None:
    async with world_for(db_url, mode) as w:
        # Every 6 hours for 8 days: the daily policy is seen to run each day, the other one every 7 days.
        requests = set()
        for n in range(8 * 4):
            requests.add(await w.cycle_at(T0 + n * 6 * HOUR))
            assert await w.open_rules(DAILY) == set(), n  # a compliant daily policy never opens it
            weekly = await w.open_rules(WEEKLY_STEP)
            # Its first run (T0 + 1h) is seen at T0 + 6h: the next one is planned 7 days on.
            assert weekly == (set() if n == 0 else {"observed-interval-too-long"}), n
        assert len(requests) == 1  # observing runs costs no request: every cycle makes the same ones
        report = await read_report(w.services)
        Report.model_validate(report)
        (finding,) = [f for f in report["findings"] if f["rule"] == "observed-interval-too-long"]
        assert finding["disk_id"] == WEEKLY_STEP and finding["policy_id"] == POLICY[WEEKLY_STEP]
        assert finding["severity"] == "high" and finding["observed"]["step_seconds"] == 7 * 86400
        assert finding["expected"]["max_step_seconds"] == 25 * 3600  # daily 24 h + stale_grace 1 h

        # Per disk: the last observed run, the longest gap (runs are a day apart: 24 h; the weekly one's 7 days,
        # from T0 + 1h to T0 + 7d 1h, its gap to now is shorter) and since when.
        disks = by_disk(report)
        assert disks[DAILY]["last_invocation_at"] == "2030-03-08T01:00:00Z"
        assert disks[DAILY]["observed_rpo_seconds"] == 86400
        assert disks[DAILY]["observed_since"] == "2030-03-01T00:00:00Z"
        assert disks[WEEKLY_STEP]["observed_rpo_seconds"] == 7 * 86400
        assert report["summary"]["observed_rpo"] == {"disks": 3, "p50_seconds": 86400,
                                                     "p95_seconds": 7 * 86400, "max_seconds": 7 * 86400}
        # The dashboard's overview shows all three.
        deps = ApiDeps(services=w.services, trigger=_no_trigger, token=SecretStr("api-token"))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(deps)),
                                     base_url="http://api") as api:
            await api.post("/login", data={"token": "api-token"})
            overview = (await api.get("/")).text
        for label, shown in (("p50", "1d 0h"), ("p95", "7d 0h"), ("max", "7d 0h")):
            assert f'<span data-metric="observed_rpo.{label}">{shown}</span>' in overview, label

        # Back to daily runs, the next one at T0 + 8d 1h (a reschedule, not a run): one good step is not enough,
        # two in a row resolve it.
        rescheduled = int((T0 + 8 * DAY + HOUR).timestamp())
        w.fleet.update_policy(POLICY[WEEKLY_STEP], frequency=1, next_invocation_at=rescheduled)
        await w.cycle_at(T0 + 8 * DAY)
        assert await w.open_rules(WEEKLY_STEP) == {"observed-interval-too-long"}
        await w.cycle_at(T0 + 8 * DAY + 6 * HOUR)  # saw the T0 + 8d 1h run: steps 7d then 1d
        assert await w.open_rules(WEEKLY_STEP) == {"observed-interval-too-long"}
        await w.cycle_at(T0 + 9 * DAY + 6 * HOUR)  # steps 1d, 1d
        assert await w.open_rules(WEEKLY_STEP) == set()


async def test_no_backup_data_after_an_observed_run_and_resolved_once_data_arrives(db_url: str) -> None:
    async with world_for(db_url, "organizations") as w:
        await w.cycle_at(T0)
        assert await w.open_rules(EMPTY) == set()  # first seen: nothing was due yet
        await w.cycle_at(T0 + 2 * HOUR)  # the first run (T0 + 1h) is observed, total_size still 0
        assert await w.open_rules(EMPTY) == {"no-backup-data"}
        assert await w.open_rules(DAILY) == set()  # its size grew with the run
        report = await read_report(w.services)
        (finding,) = [f for f in report["findings"] if f["rule"] == "no-backup-data"]
        assert finding["observed"]["total_size"] == 0 and finding["observed"]["invoked"] is True
        # A disk with one observed run has no observed RPO yet: null, never 0.
        assert by_disk(report)[EMPTY]["observed_rpo_seconds"] is None
        assert by_disk(report)[EMPTY]["last_invocation_at"] == "2030-03-01T01:00:00Z"

        w.fleet.update_policy(POLICY[EMPTY], growth=1.0)
        await w.cycle_at(T0 + DAY + 2 * HOUR)
        assert await w.open_rules(EMPTY) == set()

        # Observed runs are history: `[history] keep` prunes them; a policy's schedule stays.
        counts = await delete_history_before(w.services.store, T0 + DAY)
        assert counts["invocations"] == 3  # the three policies' runs due at T0 + 1h
        after = by_disk(await read_report(w.services))
        assert after[DAILY]["last_invocation_at"] == "2030-03-02T01:00:00Z"
        assert after[DAILY]["observed_since"] == "2030-03-01T00:00:00Z"

        # A disk no longer audited is no longer observed: its schedules go with it.
        assert await w.services.store.read(queries.policy_schedules_of, [EMPTY])
        w.fleet.remove_disk(EMPTY)
        await w.cycle_at(T0 + 2 * DAY)
        assert await w.services.store.read(queries.policy_schedules_of, [EMPTY]) == {}
        assert await w.services.store.read(queries.policy_schedules_of, [DAILY])


async def test_the_disk_detail_api_and_page_show_the_observed_runs(db_url: str) -> None:
    async with world_for(db_url, "disks") as w:
        for n in range(6):
            await w.cycle_at(T0 + n * 12 * HOUR)
        detail = await read_disk_detail(w.services, disk_id=DAILY)
        assert detail is not None
        DiskDetail.model_validate(detail)
        assert [i["due_at"] for i in detail["invocations"]] == ["2030-03-03T01:00:00Z", "2030-03-02T01:00:00Z",
                                                               "2030-03-01T01:00:00Z"]
        assert {i["step_seconds"] for i in detail["invocations"]} == {86400}
        assert detail["disk"]["observed_rpo_seconds"] == 86400

        deps = ApiDeps(services=w.services, trigger=_no_trigger, token=SecretStr("api-token"))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(deps)),
                                     base_url="http://api") as api:
            got = await api.get(f"/api/v1/disks/{DAILY}", headers={"Authorization": "Bearer api-token"})
            assert got.status_code == 200 and got.json()["invocations"] == detail["invocations"]
            login = await api.post("/login", data={"token": "api-token"})
            assert login.status_code in (302, 303)
            page = await api.get(f"/disks/{DAILY}")
            assert page.status_code == 200
            assert "Observed runs (<span data-metric=\"invocations\">3</span>)" in page.text
            assert '<time datetime="2030-03-03T01:00:00Z">' in page.text
            assert '<dd data-metric="observed_rpo">1d 0h</dd>' in page.text
            # The overview gives the fleet's: two disks have two observed runs a day apart (the weekly one has one).
            overview = await api.get("/")
            assert overview.status_code == 200
            for label in ("p50", "p95", "max"):
                assert f'<span data-metric="observed_rpo.{label}">1d 0h</span>' in overview.text, label


async def _no_trigger() -> str | None:
    return None


async def test_a_dead_daemon_period_reports_no_data_never_compliant(db_url: str) -> None:
    async with world_for(db_url, "disks") as w:
        for n in range(4):
            await w.cycle_at(T0 + n * 6 * HOUR)
        w.wall.now = T0 + 20 * DAY  # the daemon was dead from T0 + 24h on
        dead = Period(T0 + 5 * DAY, T0 + 6 * DAY)
        ahead = Period(T0 + 25 * DAY, T0 + 26 * DAY)  # a period still to come
        lively = Period(T0, T0 + 12 * HOUR)
        for period in (dead, ahead):
            report = await read_period_report(w.services, start=period.start, end=period.end)
            Compliance.model_validate(report)
            # The dead stretch was measured and nothing covered it; the period ahead has no measured time at all.
            assert report["coverage"]["coverage_pct"] == (0.0 if period is dead else None)
            assert report["period"]["measured_seconds"] == (86400 if period is dead else 0)
            for d in report["disks"]:
                assert (d["status_at_start"], d["status_at_end"]) == ("no_data", "no_data"), d
                assert d["compliant_seconds"] == 0 and d["compliance_pct"] is None
            rows = compliance_csv(report).splitlines()
            start, end = DISK_CSV_COLUMNS.index("status_at_start"), DISK_CSV_COLUMNS.index("status_at_end")
            assert all(row.split(",")[start] == row.split(",")[end] == "no_data" for row in rows[1:])
        covered = await read_period_report(w.services, start=lively.start, end=lively.end)
        assert by_disk(covered)[DAILY]["status_at_start"] == by_disk(covered)[DAILY]["status_at_end"] == "compliant"

        # The API and the evidence say the same.
        deps = ApiDeps(services=replace(w.services), trigger=_no_trigger)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(deps)),
                                     base_url="http://api") as api:
            got = await api.get("/api/v1/compliance", params={"from": dead.start.isoformat(),
                                                              "to": dead.end.isoformat()})
            assert got.status_code == 200
            assert {d["status_at_end"] for d in got.json()["disks"]} == {"no_data"}
        files = await build_evidence(w.services, period=dead)
        assert b'"status_at_end": "compliant"' not in files["compliance.json"]
        assert b'"status_at_start": "no_data"' in files["compliance.json"]


def observed_of(report: dict[str, Any], disk_id: str) -> tuple[Any, Any, Any]:
    d = by_disk(report)[disk_id]
    return d["last_invocation_at"], d["observed_since"], d["observed_rpo_seconds"]


async def test_a_period_reports_the_runs_due_in_it_alone_and_later_state_changes_nothing(db_url: str) -> None:
    async with world_for(db_url, "disks") as w:
        for n in range(10):  # every 6 h to T0 + 2d 6h: the daily runs due at T0 + 1h, 1d 1h and 2d 1h are seen
            await w.cycle_at(T0 + n * 6 * HOUR)
        past = Period(T0 + 12 * HOUR, T0 + 2 * DAY)
        before = await read_period_report(w.services, start=past.start, end=past.end)
        Compliance.model_validate(before)
        # One run due in it (T0 + 1d 1h), whose gap reaches back a day to the one before; since that run.
        assert observed_of(before, DAILY) == ("2030-03-02T01:00:00Z", "2030-03-02T01:00:00Z", 86400)
        # The seven-day policy's only run (T0 + 1h) is before the period: nothing of it is in the period.
        assert observed_of(before, WEEKLY_STEP) == (None, None, None)
        assert before["fleet"]["observed_rpo"] == {"disks": 2, "p50_seconds": 86400, "p95_seconds": 86400,
                                                   "max_seconds": 86400}

        # A period reaching past now (T0 + 2d 6h) that no run is due in: no run from before it.
        ahead = await read_period_report(w.services, start=T0 + 2 * DAY + 3 * HOUR, end=w.wall.now + DAY)
        for disk_id in POLICY:
            assert observed_of(ahead, disk_id) == (None, None, None), disk_id
        assert ahead["fleet"]["observed_rpo"]["disks"] == 0
        assert compliance_csv(ahead).splitlines()[1].endswith(",,,")

        # Later state — a policy gone (its schedule with it), more runs — leaves the past period's report as it was.
        w.fleet.remove_policy(POLICY[DAILY])
        await w.cycle_at(T0 + 3 * DAY + 6 * HOUR)
        assert await w.services.store.read(queries.policy_schedules_of, [DAILY]) == {}
        after = await read_period_report(w.services, start=past.start, end=past.end)
        for disk_id in POLICY:
            assert observed_of(after, disk_id) == observed_of(before, disk_id), disk_id
        assert after["fleet"]["observed_rpo"] == before["fleet"]["observed_rpo"]
