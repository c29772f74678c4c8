"""Compliance over a period, end to end: real cycles of the fake Katapult placed in time with the clock seam, on
SQLite and PostgreSQL; the API route; the evidence export (byte-identical, verified by `sha256sum -c`); pruning;
and the CLI (`report --since`, `evidence`) as subprocesses.

The story (audit.interval 6h, period 2025-01-01 – 2025-01-04, runs every 6 hours):
- D0 has no policy: its unprotected-disk finding is born waived (waiver until 2025-01-02), unwaived at 48h.
- D1 is fine, except unreadable at the 54h run (partial run: unknown until 60h).
- D2 is weakened (retention 3) before the 24h run and fixed before the 60h run: two findings open 36h each.
- The 36h run fails (nothing readable) and 42h has no run at all: no data from 36h to 48h.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from auditor.api import ApiDeps, create_app
from auditor.api.models import Compliance
from auditor.config import Settings
from auditor.domain.periods import Period
from auditor.domain.records import RunStatus
from auditor.fake import Fault, Fleet
from auditor.fake import create_app as fake_app
from auditor.render.compliance import DISK_CSV_COLUMNS, compliance_csv, compliance_html, compliance_markdown
from auditor.service import Services, open_services
from auditor.service.compliance import read_period_report
from auditor.service.cycle import run_cycle
from auditor.service.evidence import MANIFEST, build_evidence, write_evidence
from auditor.service.housekeeping import prune_history
from auditor.store import queries
from auditor.store.tables import disk_states as DiskState
from auditor.store.tables import finding_events as FindingEvent
from auditor.store.tables import findings as FindingRow
from auditor.store.tables import run_summaries as RunSummary
from auditor.store.tables import runs as Run

KATAPULT = "http://fake/core/v1"
TOKEN = "fake-token"
T0 = datetime(2025, 1, 1, tzinfo=UTC)
H = timedelta(hours=1)
HOUR = 3600
NEXT = int((T0 + timedelta(days=365)).timestamp())  # the policies' next run: never stale in this story
D0, D1, D2 = "disk_unprotected0000", "disk_steady000000000", "disk_weakened0000000"
WEBHOOK_SECRET = "https://hooks.example.com/T0/B0/hook-SECRET-4d1c"
HEARTBEAT_SECRET = "https://hc-ping.example.com/ping-SECRET-77aa"
API_SECRET = "api-SECRET-token-5e9b"
PERIOD = Period(T0, T0 + 72 * H)


class Clock:
    """The services' clock seam, moved by the test."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def settings_for(db_url: str, **extra: Any) -> Settings:
    data: dict[str, Any] = {
        "katapult": {"api_url": KATAPULT, "per_page": 5, "max_attempts": 1, "max_requests_per_minute": 100_000},
        "database": {"url": db_url},
        "audit": {"disks": [D0, D1, D2], "interval": "6h"},
        "daemon": {"leader_ttl": "30s"},
        "waivers": [
            {"rule": "unprotected-disk", "disk": D0, "reason": "rebuild <script>alert(1)</script>",
             "owner": "ops@example.com", "expires": "2025-01-02"},
            {"rule": "unprotected-disk", "disk": D1, "reason": "long gone", "owner": "old@example.com",
             "expires": "2024-06-30"},
            {"rule": "no-such-rule", "disk": D1, "reason": "typo", "owner": "x@example.com", "expires": "2026-01-01"},
        ],
    }
    data.update(extra)
    return Settings(**data)


def make_fleet() -> Fleet:
    fleet = Fleet()
    fleet.rate_limit_per_minute = 1_000_000
    org = fleet.add_org("acme")
    fleet.add_disk(org.id, "unprotected", id=D0)
    fleet.add_disk(org.id, "steady", id=D1)
    fleet.add_policy(D1, id="dbp_steady", retention=14, next_invocation_at=NEXT, total_size=5.0)
    fleet.add_disk(org.id, "weakened", id=D2)
    fleet.add_policy(D2, id="dbp_weakened", retention=14, next_invocation_at=NEXT, total_size=5.0)
    return fleet


async def compliance_report(services: Services, period: Period, *,
                            generated_at: datetime | None = None) -> dict[str, Any]:
    """The period report of `period`, generated at the services' clock (or `generated_at`)."""
    if generated_at is not None:
        services = replace(services, clock=lambda: generated_at)
    return await read_period_report(services, start=period.start, end=period.end)


async def cycle_at(services: Services, clock: Clock, hour: int, expected: RunStatus) -> None:
    """Runs one of the story's cycles at its poll time (T0 + `hour` hours) and checks how it ended."""
    clock.now = T0 + hour * H
    outcome = await run_cycle(services, trigger="schedule")
    assert outcome.status is expected, (hour, outcome.errors)


async def opening(services: Services, fleet: Any, clock: Clock) -> None:
    """The story's first 30 hours: four cycles, the weakened policy, two more cycles."""
    for hour in (0, 6, 12, 18):
        await cycle_at(services, clock, hour, RunStatus.COMPLETE)
    fleet.update_policy("dbp_weakened", retention=3)
    for hour in (24, 30):
        await cycle_at(services, clock, hour, RunStatus.COMPLETE)


async def play(services: Services, fleet: Fleet, clock: Clock) -> None:
    """Runs the story's cycles at their poll times."""

    async def run(hour: int, expected: RunStatus) -> None:
        await cycle_at(services, clock, hour, expected)

    await opening(services, fleet, clock)
    for disk in (D0, D1, D2):
        fleet.faults[disk] = Fault.UNAVAILABLE
    await run(36, RunStatus.FAILED)
    fleet.faults.clear()
    await run(48, RunStatus.COMPLETE)
    fleet.faults[D1] = Fault.UNAVAILABLE
    await run(54, RunStatus.PARTIAL)
    fleet.faults.clear()
    fleet.update_policy("dbp_weakened", retention=14)
    for hour in (60, 66):
        await run(hour, RunStatus.COMPLETE)


@dataclass
class World:
    settings: Settings
    services: Services
    clock: Clock


@pytest.fixture
async def world(db_url: str) -> AsyncIterator[World]:
    fleet = make_fleet()
    settings = settings_for(db_url)
    clock = Clock(T0)
    async with open_services(settings, transport=httpx.ASGITransport(app=fake_app(fleet)), token=TOKEN,
                             clock=clock) as services:
        await play(services, fleet, clock)
        clock.now = T0 + 80 * H
        yield World(settings, services, clock)


def by_id(items: list[dict[str, Any]], key: str) -> dict[str, dict[str, Any]]:
    return {item[key]: item for item in items}


# ---- the period report ----------------------------------------------------------------------------------------


async def test_the_period_report_over_real_cycles(world: World) -> None:
    report = await compliance_report(world.services, PERIOD)
    Compliance.model_validate(report)
    assert report["generated_at"] == "2025-01-04T08:00:00Z"  # the clock: this is not an evidence export
    assert report["period"] == {"from": "2025-01-01T00:00:00Z", "to": "2025-01-04T00:00:00Z", "seconds": 72 * HOUR,
                                "measured_to": "2025-01-04T00:00:00Z", "measured_seconds": 72 * HOUR}

    # Coverage: every run covers until the next one (6h); the failed 36h run covers nothing and ends the 30h
    # run's cover, and nothing ran at 42h: no data from 36h to 48h.
    c = report["coverage"]
    assert c == {
        "interval_seconds": 6 * HOUR, "scheduled_cycles": 12, "completed_cycles": 10, "complete_cycles": 9,
        "partial_cycles": 1, "failed_cycles": 1, "completed_pct": 83.333, "covered_seconds": 60 * HOUR,
        "no_data_seconds": 12 * HOUR, "coverage_pct": 83.333,
        "gaps": [{"from": "2025-01-02T12:00:00Z", "to": "2025-01-03T00:00:00Z", "seconds": 12 * HOUR}],
    }

    # Per disk: covered time only; waived counts as compliant, unknown does not.
    disks = by_id(report["disks"], "disk_id")
    assert list(disks) == sorted([D0, D1, D2])
    assert disks[D0] == {"disk_id": D0, "name": "unprotected", "compliance_pct": 60.0,
                         "compliant_seconds": 36 * HOUR, "waived_seconds": 36 * HOUR,
                         "noncompliant_seconds": 24 * HOUR, "unknown_seconds": 0, "no_data_seconds": 12 * HOUR,
                         "status_at_end": "noncompliant", "exempt_seconds": 0, "status_at_start": "waived",
                         "last_invocation_at": None, "observed_rpo_seconds": None, "observed_since": None}
    assert (disks[D1]["compliance_pct"], disks[D1]["compliant_seconds"], disks[D1]["unknown_seconds"],
            disks[D1]["no_data_seconds"], disks[D1]["status_at_end"]) == (90.0, 54 * HOUR, 6 * HOUR, 12 * HOUR,
                                                                          "compliant")
    assert (disks[D2]["compliance_pct"], disks[D2]["compliant_seconds"], disks[D2]["noncompliant_seconds"],
            disks[D2]["waived_seconds"]) == (60.0, 36 * HOUR, 24 * HOUR, 0)

    # The fleet, time-weighted, and per UTC day.
    f = report["fleet"]
    assert (f["disks"], f["compliance_pct"], f["compliant_seconds"], f["waived_seconds"],
            f["noncompliant_seconds"], f["unknown_seconds"]) == (3, 70.0, 126 * HOUR, 36 * HOUR, 48 * HOUR,
                                                                 6 * HOUR)
    days = [(d["date"], d["seconds"], d["coverage_pct"], d["compliance_pct"]) for d in f["by_day"]]
    assert days == [("2025-01-01", 24 * HOUR, 100.0, 100.0), ("2025-01-02", 24 * HOUR, 50.0, 66.666),
                    ("2025-01-03", 24 * HOUR, 100.0, 41.666)]
    assert sum(d["compliant_seconds"] for d in f["by_day"]) == f["compliant_seconds"]

    # Per rule: D2's two findings open 36h each; D0's, born waived, is open at the end, 72h old.
    rules = by_id(report["rules"], "rule")
    for rule in ("retention-below-minimum", "retention-window-too-short"):
        assert rules[rule] == {"rule": rule, "opened": 1, "resolved": 1, "waived": 0, "unwaived": 0,
                               "mean_time_to_resolve_seconds": 36 * HOUR, "p90_time_to_resolve_seconds": 36 * HOUR,
                               "open_at_end": 0, "oldest_open_age_seconds": None, "mean_open_age_seconds": None,
                               "waived_at_end": 0}
    assert rules["unprotected-disk"] == {
        "rule": "unprotected-disk", "opened": 0, "resolved": 0, "waived": 1, "unwaived": 1,
        "mean_time_to_resolve_seconds": None, "p90_time_to_resolve_seconds": None, "open_at_end": 1,
        "oldest_open_age_seconds": 72 * HOUR, "mean_open_age_seconds": 72 * HOUR, "waived_at_end": 0}
    assert rules["schedule-stale"]["opened"] == 0  # every registered rule is listed

    # The waivers in force: D0's (lapsed in the period), not D1's (expired before it) nor the malformed one.
    assert report["waivers"] == [{"rule": "unprotected-disk", "disk_id": D0, "policy_id": None,
                                  "reason": "rebuild <script>alert(1)</script>", "owner": "ops@example.com",
                                  "expires": "2025-01-02", "in_force_until": "2025-01-03T00:00:00Z",
                                  "lapsed_in_period": True}]


async def test_a_period_inside_a_day_and_one_before_any_run(world: World) -> None:
    # 2025-01-03 06:00 – 09:00: D1 unknown the whole time (the 54h run could not read it).
    report = await compliance_report(world.services, Period(T0 + 54 * H, T0 + 57 * H))
    disks = by_id(report["disks"], "disk_id")
    assert disks[D1]["compliance_pct"] == 0.0 and disks[D1]["unknown_seconds"] == 3 * HOUR
    assert report["coverage"]["coverage_pct"] == 100.0 and report["coverage"]["scheduled_cycles"] == 0
    assert report["coverage"]["completed_pct"] is None
    assert [d["date"] for d in report["fleet"]["by_day"]] == ["2025-01-03"]
    # Before the first run: nothing was checked, so nothing is compliant or not.
    empty = await compliance_report(world.services, Period(T0 - 48 * H, T0))
    assert empty["disks"] == [] and empty["fleet"]["compliance_pct"] is None
    assert empty["coverage"]["coverage_pct"] == 0.0
    assert empty["coverage"]["gaps"] == [{"from": "2024-12-30T00:00:00Z", "to": "2025-01-01T00:00:00Z",
                                          "seconds": 48 * HOUR}]
    # A period ending after the last run: its cover lasts 2 × interval at most, then no data.
    late = await compliance_report(world.services, Period(T0 + 66 * H, T0 + 96 * H))
    assert late["coverage"]["covered_seconds"] == 12 * HOUR
    assert late["coverage"]["gaps"][0]["from"] == "2025-01-04T06:00:00Z"


async def test_a_period_reaching_past_now_is_measured_to_now(world: World) -> None:
    # Now is 70h, 4h after the last run (66h), whose cover would reach 78h: `--since 25m --until <now + 20m>`.
    now = T0 + 70 * H
    world.clock.now = now
    period = Period(now - timedelta(minutes=25), now + timedelta(minutes=20))
    report = await compliance_report(world.services, period)
    Compliance.model_validate(report)
    assert report["period"] == {"from": "2025-01-03T21:35:00Z", "to": "2025-01-03T22:20:00Z", "seconds": 45 * 60,
                                "measured_to": "2025-01-03T22:00:00Z", "measured_seconds": 25 * 60}
    c = report["coverage"]
    # The 20 minutes to come are neither covered nor a gap: they have not happened.
    assert (c["covered_seconds"], c["no_data_seconds"], c["coverage_pct"], c["gaps"]) == (25 * 60, 0, 100.0, [])
    for d in report["disks"]:
        judged = d["compliant_seconds"] + d["noncompliant_seconds"] + d["unknown_seconds"] + d["exempt_seconds"]
        assert (judged, d["no_data_seconds"]) == (25 * 60, 0), d
        assert d["status_at_end"] == d["status_at_start"] != "no_data"  # the status at now: a run covers it
    assert by_id(report["disks"], "disk_id")[D1]["compliant_seconds"] == 25 * 60
    assert [(d["date"], d["seconds"]) for d in report["fleet"]["by_day"]] == [("2025-01-03", 25 * 60)]
    # D0's finding, open since 0h, is 70h old now: not as old as it will be at the period's end.
    assert by_id(report["rules"], "rule")["unprotected-disk"]["oldest_open_age_seconds"] == 70 * HOUR
    note = "Measured to 2025-01-03T22:00:00Z (now): the rest of the period has not happened yet"
    assert note in compliance_markdown(report) and note in compliance_html(report)
    assert "Measured to" not in compliance_markdown(await compliance_report(world.services, Period(T0, T0 + 48 * H)))

    # Once now is past the last run's cover (78h), the end is no data, whatever the period's end says.
    world.clock.now = T0 + 79 * H
    later = await compliance_report(world.services, Period(T0 + 77 * H, T0 + 90 * H))
    assert later["period"]["measured_seconds"] == 2 * HOUR
    assert later["coverage"]["covered_seconds"] == HOUR and later["coverage"]["coverage_pct"] == 50.0
    assert {d["status_at_start"] for d in later["disks"]} != {"no_data"}
    assert {d["status_at_end"] for d in later["disks"]} == {"no_data"}

    # A period wholly ahead measures nothing: no coverage share, no status, no day.
    ahead = await compliance_report(world.services, Period(T0 + 80 * H, T0 + 90 * H))
    assert ahead["period"]["measured_seconds"] == 0 and ahead["coverage"]["coverage_pct"] is None
    assert ahead["coverage"]["covered_seconds"] == ahead["coverage"]["no_data_seconds"] == 0
    assert ahead["fleet"]["by_day"] == [] and ahead["fleet"]["compliance_pct"] is None
    assert {(d["status_at_start"], d["status_at_end"]) for d in ahead["disks"]} == {("no_data", "no_data")}
    assert by_id(ahead["rules"], "rule")["unprotected-disk"]["open_at_end"] == 0
    assert "The period lies ahead" in compliance_markdown(ahead) and "The period lies ahead" in compliance_html(ahead)
    assert len(compliance_csv(ahead).splitlines()) == 1 + len(ahead["disks"])


def test_csv_cells_a_spreadsheet_would_evaluate_stay_text() -> None:
    names = ["=HYPERLINK(\"http://x\",\"y\")", "+1", "-cmd", "@SUM(A1)", "\tx", "\rx", "a\rb\x1b", "web-1", "", None]
    report = {"disks": [{**{c: None for c in DISK_CSV_COLUMNS}, "disk_id": f"disk_{i}", "name": name,
                         "compliance_pct": -1.5, "unknown_seconds": 0} for i, name in enumerate(names)]}
    rows = list(csv.DictReader(io.StringIO(compliance_csv(report), newline="")))
    assert [r["name"] for r in rows] == ["'=HYPERLINK(\"http://x\",\"y\")", "'+1", "'-cmd", "'@SUM(A1)", "'\tx",
                                         "\\x0dx", "a\\x0db\\x1b", "web-1", "", ""]
    assert {r["compliance_pct"] for r in rows} == {"-1.5"} and {r["unknown_seconds"] for r in rows} == {"0"}


async def test_renderings(world: World) -> None:
    report = await compliance_report(world.services, PERIOD)
    rows = list(csv.DictReader(io.StringIO(compliance_csv(report))))
    assert [r["disk_id"] for r in rows] == sorted([D0, D1, D2])
    assert by_id(rows, "disk_id")[D1]["compliance_pct"] == "90.0"
    markdown = compliance_markdown(report)
    assert markdown.startswith("# Backup-policy compliance 2025-01-01T00:00:00Z – 2025-01-04T00:00:00Z")
    assert "| 2025-01-02T12:00:00Z | 2025-01-03T00:00:00Z | 12h 0m |" in markdown
    assert "| retention-below-minimum | 1 | 1 | 1d 12h | 1d 12h | 0 | – |" in markdown
    html = compliance_html(report)
    assert html.startswith("<!DOCTYPE html>") and "<svg" in html
    # Self-contained and escaped: no external reference, the waiver's reason shown as text.
    assert "<script" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    for external in ("http://", "https://", "<link", "src="):
        assert external not in html
    assert html.count("<rect") == 3  # one bar a day


# ---- the API --------------------------------------------------------------------------------------------------


def deps_for(world: World) -> ApiDeps:
    return ApiDeps(services=world.services, trigger=_no_trigger)


async def _no_trigger() -> str | None:
    return None


async def test_the_api_gives_the_same_document_and_refuses_bad_periods(world: World) -> None:
    app = create_app(deps_for(world))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as api:
        response = await api.get("/api/v1/compliance", params={"from": "2025-01-01", "to": "2025-01-04T00:00:00Z"})
        assert response.status_code == 200, response.text
        body = response.json()
        Compliance.model_validate(body)
        # Expired waivers come back from the waiver problems: D0's is in force during the period.
        assert body == await compliance_report(world.services, PERIOD)
        # Offsets are converted to UTC.
        shifted = await api.get("/api/v1/compliance", params={"from": "2025-01-01T01:00:00+01:00",
                                                              "to": "2025-01-04"})
        assert shifted.json()["period"] == body["period"]
        # Default: the 30 days before now (the clock).
        default = (await api.get("/api/v1/compliance")).json()
        assert default["period"] == {"from": "2024-12-05T08:00:00Z", "to": "2025-01-04T08:00:00Z",
                                     "seconds": 30 * 86400, "measured_to": "2025-01-04T08:00:00Z",
                                     "measured_seconds": 30 * 86400}
        assert (await api.get("/api/v1/compliance", params={"to": "2025-01-03"})).json()["period"]["from"] == \
            "2024-12-04T00:00:00Z"
        for params in ({"from": "2025-01-04", "to": "2025-01-01"}, {"from": "2025-01-01", "to": "2025-01-01"},
                       {"from": "yesterday"}, {"to": "2025-13-01"}, {"from": ""}, {"from": "2023-01-01"},
                       {"from": "2020-01-01", "to": "2021-02-05"}, {"from": "0001-01-01"}, {"to": "9999-12-31"},
                       {"from": "x" * 65}, {"from": "2026-01-01"}):
            bad = await api.get("/api/v1/compliance", params=params)
            assert bad.status_code == 422, (params, bad.text)
            assert isinstance(bad.json()["detail"], list)
        assert "longer than 400 days" in (await api.get("/api/v1/compliance", params={"from": "2023-01-01"})).text
        assert "/api/v1/compliance" in (await api.get("/openapi.json")).json()["paths"]


# ---- the evidence export --------------------------------------------------------------------------------------


async def test_evidence_is_byte_identical_verifies_and_holds_no_secret(db_url: str, tmp_path: Path) -> None:
    fleet = make_fleet()
    settings = settings_for(db_url, notifiers=[{"kind": "webhook", "name": "ops", "url": WEBHOOK_SECRET,
                                                "min_severity": "critical"}],
                            heartbeat={"url": HEARTBEAT_SECRET}, api={"token": API_SECRET})
    clock = Clock(T0)
    transport = httpx.ASGITransport(app=fake_app(fleet))
    async with open_services(settings, transport=transport, token=TOKEN, clock=clock,
                             notify_transport=httpx.MockTransport(lambda r: httpx.Response(200)),
                             heartbeat_transport=httpx.MockTransport(lambda r: httpx.Response(200))) as services:
        await play(services, fleet, clock)
        clock.now = T0 + 80 * H
        first = await build_evidence(services, period=PERIOD)
        clock.now = T0 + 90 * H  # a later export of the same period: same bytes
        second = await build_evidence(services, period=PERIOD)
    assert first == second
    assert sorted(first) == ["MANIFEST.sha256", "README.md", "compliance.csv", "compliance.html", "compliance.json",
                             "config.json", "configs.json", "deliveries.csv", "drift.json", "findings.csv",
                             "findings.json", "metadata.json", "oscal-assessment-results.json", "remediations.json",
                             "rules.json", "runs.csv", "runs.json", "snapshots.json", "waivers.json"]
    a, b = write_evidence(first, tmp_path / "a"), write_evidence(second, tmp_path / "b" / "nested")
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    if shutil.which("sha256sum"):
        check = subprocess.run(["sha256sum", "-c", MANIFEST], cwd=tmp_path / "a", capture_output=True, text=True,
                               timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr
        assert check.stdout.count(": OK") == len(first) - 1
    else:  # pragma: no cover - coreutils are in every image the suite runs in
        pytest.fail("sha256sum is not installed")
    # Tampering is caught.
    (tmp_path / "a" / "runs.csv").write_text("forged\n")
    assert subprocess.run(["sha256sum", "-c", "--quiet", MANIFEST], cwd=tmp_path / "a", capture_output=True,
                          timeout=30).returncode != 0

    everything = b"".join(first.values()).decode()
    for secret in (WEBHOOK_SECRET, HEARTBEAT_SECRET, API_SECRET, "SECRET"):
        assert secret not in everything

    report = json.loads(first["compliance.json"])
    assert report["generated_at"] == "2025-01-04T00:00:00Z"  # derived from the period, not the clock
    assert report["fleet"]["compliance_pct"] == 70.0
    (config,) = [c["config"] for c in json.loads(first["configs.json"])["configs"].values()]
    assert config["notifiers"][0]["url"] == "<redacted>" and config["heartbeat"]["url"] == "<redacted>"
    assert config["api"]["token"] == "<redacted>" and config["audit"]["interval"] == "6h"
    assert config["history"]["keep"] == "400d"
    rules = json.loads(first["rules.json"])
    assert rules["configs"][rules["config_fingerprint"]]["defaults"] == rules["defaults"]
    assert json.loads(first["config.json"]) == config
    assert rules["defaults"] == {"min_retention": 7, "min_retention_days": 7.0, "max_interval": "daily",
                                 "stale_grace": "1h"}
    assert {r["id"] for r in rules["rules"]} >= {"unprotected-disk", "retention-below-minimum"}
    waivers = json.loads(first["waivers.json"])
    (w,) = waivers["waivers"]
    assert (w["disk_id"], w["expires"], [e["kind"] for e in w["events"]]) == (D0, "2025-01-02",
                                                                               ["waived", "unwaived"])
    assert w["events"][1]["at"] == "2025-01-03T00:00:00Z"
    assert [(p["index"], p["problem"].split(" ")[0]) for p in waivers["not_in_force"]] == [(1, "expired"),
                                                                                          (2, "malformed:")]
    runs = json.loads(first["runs.json"])["runs"]
    assert [r["status"] for r in runs] == ["complete"] * 6 + ["failed", "complete", "partial", "complete",
                                                              "complete"]
    assert runs[6]["errors"] and all(r["api_requests"] > 0 for r in runs)
    rows = list(csv.DictReader(io.StringIO(first["runs.csv"].decode())))
    assert [r["id"] for r in rows] == [r["id"] for r in runs]
    assert rows[6]["error_count"] == str(len(runs[6]["errors"])) and json.loads(rows[6]["errors"]) == runs[6]["errors"]


async def test_database_passwords_are_masked_in_the_exported_config() -> None:
    from auditor.config import redacted_config

    settings = settings_for("postgresql+psycopg://auditor:pa55-SECRET@db.example.com:5432/auditor",
                            notifiers=[{"kind": "pagerduty", "name": "pd", "routing_key": "rk-SECRET"},
                                       {"kind": "email", "name": "mail", "host": "smtp.example.com",
                                        "from": "a@example.com", "to": ["b@example.com"], "password": "pw-SECRET"},
                                       {"kind": "slack", "name": "s", "webhook_url": "https://hooks.slack/SECRET"},
                                       {"kind": "alertmanager", "name": "am", "url": "https://am/SECRET"}])
    config = redacted_config(settings)
    text = json.dumps(config)
    assert "SECRET" not in text
    assert config["database"]["url"] == "postgresql+psycopg://auditor:***@db.example.com:5432/auditor"
    assert config["notifiers"][1]["from"] == "a@example.com"
    assert config["notifiers"][0]["events_url"].startswith("https://events.pagerduty.com")


# ---- pruning --------------------------------------------------------------------------------------------------


async def count(services: Services, table: Any) -> int:
    async with services.store.engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(table))).scalar_one())


async def test_pruning_keeps_what_current_verdicts_and_later_periods_need(db_url: str) -> None:
    fleet = make_fleet()
    settings = settings_for(db_url, history={"keep": "1d"})
    clock = Clock(T0)
    async with open_services(settings, transport=httpx.ASGITransport(app=fake_app(fleet)), token=TOKEN,
                             clock=clock) as services:
        await play(services, fleet, clock)
        late = Period(T0 + 60 * H, T0 + 72 * H)
        before = await compliance_report(services, late, generated_at=T0 + 72 * H)
        runs_before = await count(services, Run)

        clock.now = T0 + 72 * H  # keep 1d: everything before 48h goes
        counts = await prune_history(services)
        assert counts["audit_runs"] == 7 and counts["run_summaries"] == 7  # 0h .. 36h
        assert counts["disk_states"] > 0 and counts["policy_states"] >= 1 and counts["drift_events"] >= 1
        assert await count(services, Run) == runs_before - 7
        # A period after the cut reads the same; the current report is untouched.
        assert await compliance_report(services, late, generated_at=T0 + 72 * H) == before
        # D0's open finding keeps its whole episode (born waived at 0h): its age is still known.
        rules = by_id(before["rules"], "rule")
        assert rules["unprotected-disk"]["oldest_open_age_seconds"] == 72 * HOUR
        async with services.store.engine.connect() as conn:
            kinds = sorted((await conn.execute(select(FindingEvent.c.kind).join(
                FindingRow, FindingRow.c.fingerprint == FindingEvent.c.fingerprint)
                .where(FindingRow.c.disk_id == D0))).scalars())
        assert kinds == ["unwaived", "waived"]
        # D2's episode was resolved at 60h, after the cut: kept whole, its time to resolve still 36h.
        whole = await compliance_report(services, Period(T0 + 48 * H, T0 + 72 * H))
        assert by_id(whole["rules"], "rule")["retention-below-minimum"]["mean_time_to_resolve_seconds"] == 36 * HOUR

        # Far later: everything is old, but the latest run, current verdicts, findings and open episodes stay.
        clock.now = T0 + 1000 * H
        await prune_history(services)
        assert await count(services, Run) == 1 and await count(services, RunSummary) == 1
        assert (await services.store.read(queries.latest_run)) is not None
        async with services.store.engine.connect() as conn:
            current = (await conn.execute(select(func.count()).select_from(DiskState)
                                          .where(DiskState.c.valid_to.is_(None)))).scalar_one()
            closed = (await conn.execute(select(func.count()).select_from(DiskState)
                                         .where(DiskState.c.valid_to.is_not(None)))).scalar_one()
        assert (current, closed) == (3, 0)
        assert await count(services, FindingRow) == 3
        assert await count(services, FindingEvent) == 2  # D0's open episode only; D2's resolved ones are gone
        assert (await prune_history(services)) == dict.fromkeys(counts, 0)  # idempotent


async def test_pruning_in_small_batches_deletes_everything_it_should(db_url: str) -> None:
    from auditor.store.pruning import delete_history_before as prune

    fleet = make_fleet()
    clock = Clock(T0)
    async with open_services(settings_for(db_url), transport=httpx.ASGITransport(app=fake_app(fleet)), token=TOKEN,
                             clock=clock) as services:
        await play(services, fleet, clock)
        counts = await prune(services.store, T0 + 1000 * H, batch=2)
        assert counts["audit_runs"] == 10 and await count(services, Run) == 1


# ---- the command line ----------------------------------------------------------------------------------------


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "auditor", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={"PATH": "/usr/bin:/bin", "HOME": str(cwd)})
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    return proc


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A config file and an SQLite database holding the story's runs."""
    db = tmp_path / "auditor.db"

    async def fill() -> None:
        fleet = make_fleet()
        clock = Clock(T0)
        async with open_services(settings_for(f"sqlite:///{db}"), transport=httpx.ASGITransport(
                app=fake_app(fleet)), token=TOKEN, clock=clock) as services:
            await play(services, fleet, clock)

    asyncio.run(fill())
    config = tmp_path / "auditor.toml"
    config.write_text(f'[database]\nurl = "sqlite:///{db}"\n[audit]\ninterval = "6h"\ndisks = ["{D0}", "{D1}", '
                      f'"{D2}"]\n[log]\nlevel = "warning"\n'
                      f'[[waivers]]\nrule = "unprotected-disk"\ndisk = "{D0}"\nreason = "rebuild"\n'
                      'owner = "ops@example.com"\nexpires = 2025-01-02\n')
    return config


@pytest.mark.slow
def test_report_since_and_evidence_on_the_command_line(site: Path) -> None:
    cwd = site.parent
    args = ("--config", str(site))
    as_json = cli("report", "--since", "3d", "--until", "2025-01-04", "--format", "json", *args, cwd=cwd)
    assert as_json.returncode == 0, as_json.stderr
    report = json.loads(as_json.stdout)
    assert report["fleet"]["compliance_pct"] == 70.0 and report["coverage"]["coverage_pct"] == 83.333
    as_csv = cli("report", "--since", "72h", "--until", "2025-01-04T00:00:00Z", "--format", "csv", *args, cwd=cwd)
    assert as_csv.stdout == compliance_csv(report)
    html = cli("report", "--since", "3d", "--until", "2025-01-04", "--format", "html", *args, cwd=cwd)
    assert html.returncode == 0 and html.stdout.startswith("<!DOCTYPE html>")
    md = cli("report", "--since", "3d", "--until", "2025-01-04", "--format", "markdown", *args, cwd=cwd)
    assert md.returncode == 0 and "## Rules" in md.stdout
    table = cli("report", "--since", "3d", "--until", "2025-01-04", *args, cwd=cwd)
    assert table.returncode == 0 and "fleet time in compliance 70 %" in table.stdout
    # Without --since the current report is what it always was.
    current = json.loads(cli("report", "--format", "json", *args, cwd=cwd).stdout)
    assert set(current) == {"generated_at", "last_run", "summary", "disks", "findings", "waiver_problems",
                            "expiring_waivers", "drift"}

    out_a, out_b = cwd / "evidence-a", cwd / "evidence-b"
    for out in (out_a, out_b):
        proc = cli("evidence", "--since", "3d", "--until", "2025-01-04", "--out", str(out), *args, cwd=cwd)
        assert proc.returncode == 0, proc.stderr
        assert "sha256sum -c MANIFEST.sha256" in proc.stdout
    names = sorted(p.name for p in out_a.iterdir())
    assert names == sorted(p.name for p in out_b.iterdir()) and len(names) == 19
    assert all((out_a / n).read_bytes() == (out_b / n).read_bytes() for n in names)
    check = subprocess.run(["sha256sum", "-c", MANIFEST], cwd=out_a, capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    exported = json.loads((out_a / "compliance.json").read_text())
    # The waivers are those of the configuration the runs ran with, not the exporting process's (its file names
    # the same waiver with another reason).
    assert [w["reason"] for w in exported.pop("waivers")] == ["rebuild <script>alert(1)</script>"]
    assert [w["reason"] for w in report.pop("waivers")] == ["rebuild"]
    assert exported == {**report, "generated_at": "2025-01-04T00:00:00Z"}


@pytest.mark.slow
@pytest.mark.parametrize(("args", "message"), [
    (("report", "--since", "500d"), "longer than 400 days"),
    (("report", "--since", "fortnight"), "--since: expected a duration"),
    (("report", "--since", "0d"), "--since: must be longer than 0"),
    (("report", "--since", "9" * 400 + "d"), "--since:"),
    (("report", "--since", "3d", "--until", "tomorrow"), "--until: 'tomorrow' is not an ISO-8601"),
    (("report", "--until", "2025-01-04"), "need --since"),
    (("report", "--format", "html"), "need --since"),
    (("evidence", "--since", "401d", "--out", "x"), "longer than 400 days"),
])
def test_bad_periods_are_one_line_and_exit_2(site: Path, args: tuple[str, ...], message: str) -> None:
    proc = cli(*args, "--config", str(site), cwd=site.parent)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr


@pytest.mark.slow
def test_read_only_commands_never_create_a_database(tmp_path: Path) -> None:
    config = tmp_path / "auditor.toml"
    config.write_text('[database]\nurl = "sqlite:///./typo.db"\n')
    for args in (("report", "--since", "30d"), ("evidence", "--out", str(tmp_path / "out"))):
        proc = cli(*args, "--config", str(config), cwd=tmp_path)
        assert proc.returncode == 2 and "does not exist" in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert not (tmp_path / "typo.db").exists() and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_evidence_refuses_a_folder_that_is_not_empty(site: Path) -> None:
    cwd = site.parent
    args = ("--until", "2025-01-04", "--config", str(site))
    foreign = cwd / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not part of any export\n")
    (foreign / "compliance.json").write_text("{}")
    proc = cli("evidence", "--out", str(foreign), *args, cwd=cwd)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(foreign) in lines[0] and "not empty" in lines[0]
    # Nothing written: the foreign files are as they were and no manifest appeared beside them.
    assert sorted(p.name for p in foreign.iterdir()) == ["compliance.json", "notes.txt"]
    assert (foreign / "compliance.json").read_text() == "{}"
    # An empty folder (or a missing one) works as before; a second export into it is refused, the first kept.
    empty = cwd / "empty"
    empty.mkdir()
    assert cli("evidence", "--out", str(empty), *args, cwd=cwd).returncode == 0
    written = {p.name: p.read_bytes() for p in empty.iterdir()}
    assert len(written) == 19
    again = cli("evidence", "--out", str(empty), *args, cwd=cwd)
    assert again.returncode == 2 and str(empty) in again.stderr
    assert {p.name: p.read_bytes() for p in empty.iterdir()} == written
    # A hidden file counts too.
    hidden = cwd / "hidden"
    hidden.mkdir()
    (hidden / ".keep").write_text("")
    assert cli("evidence", "--out", str(hidden), *args, cwd=cwd).returncode == 2


def test_write_evidence_refuses_a_folder_that_is_not_empty(tmp_path: Path) -> None:
    from auditor.errors import FolderNotEmptyError

    (tmp_path / "old.txt").write_text("x")
    with pytest.raises(FolderNotEmptyError) as caught:
        write_evidence({"a.json": b"{}"}, tmp_path)
    assert caught.value.folder == tmp_path and str(tmp_path) in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.txt"]
    assert [p.name for p in write_evidence({"a.json": b"{}"}, tmp_path / "new" / "deep")] == ["a.json"]
