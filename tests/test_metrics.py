"""/metrics: Prometheus text that `prometheus_client`'s parser reads, built from stored state and cycle counters."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import timedelta

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from auditor.api import ApiDeps, CycleMetrics, create_app
from auditor.config import Settings
from auditor.fake import Fleet, demo_fleet
from auditor.fake import create_app as fake_app
from auditor.service import Services, open_services
from auditor.service.cycle import AuditOutcome, run_cycle
from auditor.service.runner import DURATION_BUCKETS
from auditor.store import queries
from auditor.store.repo import Store


class Seeded:
    def __init__(self, fleet: Fleet, runtime: Services, outcome: AuditOutcome, cycles: CycleMetrics) -> None:
        self.fleet = fleet
        self.runtime = runtime
        self.outcome = outcome
        self.cycles = cycles


@pytest.fixture
async def seeded(db_url: str) -> AsyncIterator[Seeded]:
    fleet, targets = demo_fleet(now=int(time.time()))
    fleet.rate_limit_per_minute = 100_000
    settings = Settings(**{
        "katapult": {"api_url": "http://fake/core/v1", "per_page": 10, "max_requests_per_minute": 60000},
        "database": {"url": db_url},
        "audit": {"disks": targets.disks, "organizations": targets.organizations},
    })
    async with open_services(settings, transport=httpx.ASGITransport(app=fake_app(fleet)),
                            token="fake-token") as runtime:
        outcome = await run_cycle(runtime)
        cycles = CycleMetrics()
        cycles.record(outcome)
        yield Seeded(fleet, runtime, outcome, cycles)


async def _no_trigger() -> str | None:
    return None


async def scrape(store: Store, cycles: CycleMetrics) -> tuple[httpx.Response, dict[str, list[Sample]]]:
    services = Services(settings=Settings(audit={"interval": timedelta(minutes=15)}), store=store)
    deps = ApiDeps(services=services, trigger=_no_trigger, cycles=cycles)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(deps)), base_url="http://api") as api:
        response = await api.get("/metrics")
    assert response.status_code == 200
    families = {f.name: f.samples for f in text_string_to_metric_families(response.text)}
    return response, families


def value(samples: list[Sample], name: str, **labels: str) -> float:
    found = [s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (name, labels, samples)
    return found[0]


async def test_metrics_parse_and_match_stored_state(seeded: Seeded) -> None:
    store = seeded.runtime.store
    requests_before = seeded.fleet.stats.total
    response, families = await scrape(store, seeded.cycles)
    assert response.headers["content-type"].startswith("text/plain")
    assert seeded.fleet.stats.total == requests_before  # a scrape never polls Katapult

    duration = families["auditor_cycle_duration_seconds"]
    assert value(duration, "auditor_cycle_duration_seconds_count") == 1
    assert value(duration, "auditor_cycle_duration_seconds_bucket", le="+Inf") == 1
    assert len([s for s in duration if s.name.endswith("_bucket")]) == len(DURATION_BUCKETS) + 1
    assert value(duration, "auditor_cycle_duration_seconds_sum") == pytest.approx(seeded.outcome.duration)
    assert value(families["auditor_cycles"], "auditor_cycles_total", status="complete") == 1
    assert value(families["auditor_cycles"], "auditor_cycles_total", status="error") == 0

    stats = seeded.outcome.stats
    assert value(families["auditor_katapult_requests"], "auditor_katapult_requests_total") == stats.requests
    assert value(families["auditor_katapult_retries"], "auditor_katapult_retries_total") == stats.retries
    assert value(families["auditor_katapult_rate_limited"], "auditor_katapult_rate_limited_total") == 0
    responses = families["auditor_katapult_responses"]
    assert {s.labels["code"]: s.value for s in responses} == {k: float(v) for k, v in stats.by_status.items()}
    assert {"200", "404", "406"} <= {s.labels["code"] for s in responses}

    run = await store.read(queries.last_successful_run)
    assert run is not None and run.finished_at is not None
    last = families["auditor_last_successful_cycle_timestamp_seconds"]
    assert value(last, "auditor_last_successful_cycle_timestamp_seconds") == pytest.approx(
        run.finished_at.timestamp(), abs=1e-3)

    open_findings = {(s.labels["rule"], s.labels["severity"]): s.value for s in families["auditor_open_findings"]}
    expected: dict[tuple[str, str], float] = {}
    for f in await store.read(queries.all_findings, statuses=("open",)):
        expected[(f.rule, f.severity.value)] = expected.get((f.rule, f.severity.value), 0) + 1
    assert open_findings == expected and sum(expected.values()) == sum(seeded.outcome.open_findings.values())

    disks = {s.labels["status"]: s.value for s in families["auditor_disks"]}
    assert disks == {k: float(v) for k, v in (await store.read(queries.disk_status_counts)).items()}
    assert disks["noncompliant"] > 0 and disks["compliant"] > 0
    assert value(families["auditor_store_up"], "auditor_store_up") == 1


async def test_cycle_counters_accumulate(seeded: Seeded) -> None:
    seeded.cycles.record(seeded.outcome)
    seeded.cycles.record_error(4000.0)
    _, families = await scrape(seeded.runtime.store, seeded.cycles)
    duration = families["auditor_cycle_duration_seconds"]
    assert value(duration, "auditor_cycle_duration_seconds_count") == 3
    assert value(duration, "auditor_cycle_duration_seconds_bucket", le="3600.0") == 2
    assert value(duration, "auditor_cycle_duration_seconds_bucket", le="+Inf") == 3
    assert value(families["auditor_cycles"], "auditor_cycles_total", status="error") == 1
    assert value(families["auditor_katapult_requests"], "auditor_katapult_requests_total") == (
        2 * seeded.outcome.stats.requests)


async def test_metrics_without_a_database_still_serve_counters() -> None:
    store = Store.from_url("postgresql+psycopg://auditor@127.0.0.1:1/none")
    try:
        _, families = await scrape(store, CycleMetrics())
    finally:
        await store.close()
    assert value(families["auditor_store_up"], "auditor_store_up") == 0
    assert value(families["auditor_cycle_duration_seconds"], "auditor_cycle_duration_seconds_count") == 0
    assert "auditor_open_findings" not in families and "auditor_disks" not in families


async def test_each_scrape_uses_its_own_registry(store: Store) -> None:
    # No global registry: two apps in one process expose only their own counters.
    a, b = CycleMetrics(), CycleMetrics()
    a.record_error(1.0)
    _, fa = await scrape(store, a)
    _, fb = await scrape(store, b)
    assert value(fa["auditor_cycles"], "auditor_cycles_total", status="error") == 1
    assert value(fb["auditor_cycles"], "auditor_cycles_total", status="error") == 0
    assert "auditor_last_successful_cycle_timestamp_seconds" not in fb  # no run yet: no made-up timestamp
    assert {s.labels["status"]: s.value for s in fb["auditor_disks"]} == {
        "compliant": 0, "noncompliant": 0, "unknown": 0}
