"""The reports API in-process (httpx.ASGITransport), over a store filled by real audits of the fake Katapult."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from auditor.api import ApiDeps, CycleMetrics, create_app
from auditor.api.models import DiskDetail, FindingsPage, NotificationsPage, Readiness, Report, RuleId, RunsPage
from auditor.config import Settings, config_fingerprint
from auditor.domain.records import RunStatus
from auditor.domain.rules import RULES
from auditor.fake import Fleet, demo_fleet
from auditor.fake import create_app as fake_app
from auditor.fake.fleet import fake_id
from auditor.service import Services, open_services, waivers_from
from auditor.service.clock import utcnow
from auditor.service.cycle import run_cycle
from auditor.service.queries import build_report, read_disk_detail
from auditor.service.runner import CycleRunner
from auditor.store import queries, writes
from auditor.store.repo import Store

KATAPULT = "http://fake/core/v1"
API_TOKEN = "api-token-for-tests"
AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
NOW = datetime.fromisoformat("2030-01-01T00:00:00+00:00")


def settings_for(db_url: str, fleet_targets: Any, *, interval: str = "15m") -> Settings:
    return Settings(**{
        "katapult": {"api_url": KATAPULT, "per_page": 10, "max_requests_per_minute": 60000, "max_attempts": 2},
        "database": {"url": db_url},
        "audit": {"interval": interval, "disks": fleet_targets.disks,
                  "organizations": fleet_targets.organizations},
    })


@dataclass
class World:
    """The demo fleet audited twice (with a policy fixed in between, so some findings are resolved)."""

    fleet: Fleet
    settings: Settings
    runtime: Services


async def _no_trigger() -> str | None:
    return None


def deps_for(world: World, *, token: str | None = None, clock: Callable[[], datetime] = utcnow,
             trigger: Callable[[], Awaitable[str | None]] = _no_trigger, store: Store | None = None,
             cycles: CycleMetrics | None = None) -> ApiDeps:
    services = replace(world.runtime, store=store or world.runtime.store, clock=clock)
    return ApiDeps(services=services, trigger=trigger, cycles=cycles or CycleMetrics(),
                   token=SecretStr(token) if token else None)


def reading(store: Store, *, interval: timedelta = timedelta(minutes=15)) -> Services:
    """Services reading `store`, with audit.interval `interval` (the rest of the settings: defaults)."""
    return Services(settings=Settings(audit={"interval": interval}), store=store)


def client_for(deps: ApiDeps) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(deps)), base_url="http://api")


@pytest.fixture
async def world(db_url: str) -> AsyncIterator[World]:
    fleet, targets = demo_fleet(now=int(time.time()))
    fleet.rate_limit_per_minute = 100_000  # the client paces to the fake's budget; keep the cycles quick
    settings = settings_for(db_url, targets)
    transport = httpx.ASGITransport(app=fake_app(fleet))
    async with open_services(settings, transport=transport, token="fake-token") as runtime:
        first = await run_cycle(runtime, trigger="test")
        assert first.status is RunStatus.COMPLETE
        fleet.update_policy(fake_id("dbp", "demo:legacy-db-data"), retention=30)
        second = await run_cycle(runtime, trigger="test")
        assert second.resolved == 2
        yield World(fleet, settings, runtime)


@pytest.fixture
async def api(world: World) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(deps_for(world)) as client:
        yield client


def unreachable_store() -> Store:
    # Nothing listens on port 1: every read fails at once with a connection error.
    return Store.from_url("postgresql+psycopg://auditor@127.0.0.1:1/none")


@pytest.fixture
async def bare() -> AsyncIterator[httpx.AsyncClient]:
    """The app without a database: enough for everything answered before the store is read."""
    store = unreachable_store()
    try:
        async with client_for(ApiDeps(services=reading(store), trigger=_no_trigger)) as api:
            yield api
    finally:
        await store.close()


# ---- report ---------------------------------------------------------------------------------------------


async def test_report_is_what_build_report_gives(world: World) -> None:
    async with client_for(deps_for(world, clock=lambda: NOW)) as api:
        response = await api.get("/api/v1/report")
    assert response.status_code == 200
    waivers, problems = waivers_from(world.settings)
    expected = await build_report(world.runtime.store, now=NOW, waivers=waivers, waiver_problems=problems)
    assert response.json() == expected
    Report.model_validate(response.json())  # the OpenAPI model describes the contract exactly (extra=forbid)
    assert expected["summary"]["open_findings"] > 0 and expected["last_run"]["status"] == "complete"


def count_latest_run_lookups(store: Store, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the store's reads of the latest run (the data version's lookups, and the report's own reads, which
    include it): one entry each."""
    lookups: list[int] = []
    real = store.read

    async def counted(fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        if fn in (queries.latest_run, queries.report_inputs):
            lookups.append(1)
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(store, "read", counted)
    return lookups


async def test_concurrent_requests_share_one_lookup_of_the_latest_run(world: World,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # With version_ttl (the daemon: 1 s), requests that find the version due at once share one query.
    lookups = count_latest_run_lookups(world.runtime.store, monkeypatch)
    async with client_for(replace(deps_for(world), version_ttl=60.0)) as api:
        paths = ["/api/v1/report", "/api/v1/findings", "/api/v1/findings?limit=5"] * 7
        answers = await asyncio.gather(*(api.get(p) for p in paths))
        assert [a.status_code for a in answers] == [200] * 21
        assert len({a.content for a in answers if a.request.url.path.endswith("/report")}) == 1
    assert len(lookups) == 2  # the version's, shared by all 21; the report's own, in its one build


async def test_a_slow_body_does_not_hold_up_another(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    # The report's first build waits on a gate; a findings page, a different cached body, must not wait with it.
    import auditor.service.queries as service_queries

    gate = asyncio.Event()
    real = service_queries.build_report

    async def gated(*args: Any, **kwargs: Any) -> Any:
        await gate.wait()
        return await real(*args, **kwargs)

    monkeypatch.setattr(service_queries, "build_report", gated)
    async with client_for(deps_for(world)) as api:
        reports = [asyncio.ensure_future(api.get("/api/v1/report")) for _ in range(3)]
        findings = await asyncio.wait_for(api.get("/api/v1/findings"), timeout=30)
        assert findings.status_code == 200 and not any(r.done() for r in reports)
        gate.set()
        answers = await asyncio.gather(*reports)
    assert [a.status_code for a in answers] == [200] * 3
    assert len({a.content for a in answers}) == 1


# ---- findings -------------------------------------------------------------------------------------------


async def _all_pages(api: httpx.AsyncClient, **params: Any) -> tuple[list[dict[str, Any]], int]:
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    pages = 0
    while True:
        query = dict(params, **({"cursor": cursor} if cursor else {}))
        response = await api.get("/api/v1/findings", params=query)
        assert response.status_code == 200, response.text
        body = FindingsPage.model_validate(response.json())
        pages += 1
        items.extend(response.json()["findings"])
        cursor = body.next_cursor
        if cursor is None:
            return items, pages
        assert pages < 100


async def test_findings_paginate_in_a_stable_order(world: World, api: httpx.AsyncClient) -> None:
    stored = await world.runtime.store.read(queries.all_findings, statuses=("open",))
    items, pages = await _all_pages(api, limit=4)
    assert [f["fingerprint"] for f in items] == [f.fingerprint for f in stored]
    assert len(stored) > 8 and pages == -(-len(stored) // 4)
    assert len({f["fingerprint"] for f in items}) == len(items)
    assert all(f["status"] == "open" and "opened_at" in f and "resolved_at" in f for f in items)


async def test_findings_filters(world: World, api: httpx.AsyncClient) -> None:
    resolved, _ = await _all_pages(api, status="resolved")
    assert {f["rule"] for f in resolved} == {"retention-below-minimum", "retention-window-too-short"}
    assert all(f["resolved_at"] is not None for f in resolved)
    everything, _ = await _all_pages(api, status="all", limit=1000)
    open_, _ = await _all_pages(api)
    assert len(everything) == len(open_) + len(resolved)
    unprotected, _ = await _all_pages(api, rule="unprotected-disk", limit=2)
    assert len(unprotected) >= 2 and {f["rule"] for f in unprotected} == {"unprotected-disk"}
    high, _ = await _all_pages(api, severity="high")
    assert high and {f["severity"] for f in high} == {"high"}
    disk = unprotected[0]["disk_id"]
    mine, _ = await _all_pages(api, disk_id=disk, status="all")
    assert mine and {f["disk_id"] for f in mine} == {disk}
    none, _ = await _all_pages(api, disk_id="disk_doesnotexist")
    assert none == []


@pytest.mark.parametrize("query", [
    "limit=-1", "limit=0", "limit=1001", "limit=ten", "status=bogus", "severity=urgent", "rule=no-such-rule",
    "cursor=garbage", "cursor=", "disk_id=has%20space", "disk_id=nul%00byte",
    "cursor=WyJhIiwgImJcdTAwMDAiXQ",  # a well-formed cursor whose key holds a NUL byte
])
async def test_bad_finding_queries_are_422_with_a_clear_body(bare: httpx.AsyncClient, query: str) -> None:
    # Validation answers before the store is read (this app has no database at all).
    response = await bare.get(f"/api/v1/findings?{query}")
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert detail and detail[0]["loc"][0] == "query" and detail[0]["msg"]


def test_rule_enum_is_the_rule_registry() -> None:
    assert [r.value for r in RuleId] == list(RULES)


# ---- disks and runs -------------------------------------------------------------------------------------


async def test_disk_detail(world: World, api: httpx.AsyncClient) -> None:
    disk_id = fake_id("disk", "demo:legacy-db-data")
    response = await api.get(f"/api/v1/disks/{disk_id}")
    assert response.status_code == 200
    assert response.json() == await read_disk_detail(world.runtime, disk_id=disk_id)
    body = DiskDetail.model_validate(response.json())
    assert body.disk.disk_id == disk_id and body.status == "compliant"
    assert len(body.snapshots) == 2 and [d.kind for d in body.drift] == ["policy-changed"]
    assert {f.status for f in body.findings} == {"resolved"}


async def test_unknown_disk_is_404(api: httpx.AsyncClient) -> None:
    response = await api.get("/api/v1/disks/disk_nosuchdisk0000")
    assert response.status_code == 404
    assert response.json() == {"detail": "disk disk_nosuchdisk0000 is not known to the auditor"}


async def test_bad_path_and_limits_are_422(bare: httpx.AsyncClient) -> None:
    assert (await bare.get("/api/v1/disks/a%20b")).status_code == 422
    assert (await bare.get("/api/v1/disks/" + "d" * 300)).status_code == 422
    for bad in ("0", "-3", "501", "x"):
        assert (await bare.get("/api/v1/runs", params={"limit": bad})).status_code == 422


async def test_runs_newest_first(api: httpx.AsyncClient, world: World) -> None:
    response = await api.get("/api/v1/runs")
    assert response.status_code == 200
    runs = RunsPage.model_validate(response.json()).runs
    assert [r.status for r in runs] == ["complete", "complete"]
    assert runs[0].started_at and runs[1].started_at and runs[0].started_at >= runs[1].started_at
    assert runs[0].errors == [] and runs[0].findings_resolved == 2 and runs[1].findings_opened > 0
    one = (await api.get("/api/v1/runs", params={"limit": 1})).json()["runs"]
    assert [r["id"] for r in one] == [runs[0].id]
    # Each run names the configuration it ran with: this process's, recomputable from the settings.
    assert {r.config_fingerprint for r in runs} == {config_fingerprint(world.settings)}


# ---- auth -----------------------------------------------------------------------------------------------


async def test_token_guards_api_but_not_probes(world: World) -> None:
    async with client_for(deps_for(world, token=API_TOKEN)) as api:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_TOKEN},
                        {"Authorization": f"Basic {API_TOKEN}"}, {"Authorization": f"Bearer {API_TOKEN}x"}):
            response = await api.get("/api/v1/report", headers=headers)
            assert response.status_code == 401, headers
            assert response.json() == {"detail": "missing or invalid bearer token"}
            assert response.headers["www-authenticate"] == "Bearer"
            assert API_TOKEN not in response.text
        assert (await api.post("/api/v1/audit")).status_code == 401
        assert (await api.get("/api/v1/findings", params={"limit": -1})).status_code == 401
        assert (await api.get("/api/v1/report", headers=AUTH)).status_code == 200
        assert (await api.get("/api/v1/runs", headers={"Authorization": f"bearer {API_TOKEN}"})).status_code == 200
        for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
            assert (await api.get(path)).status_code == 200, path
        schema = (await api.get("/openapi.json")).json()
        assert "HTTPBearer" in schema["components"]["securitySchemes"]


async def test_without_a_token_the_api_is_open(api: httpx.AsyncClient) -> None:
    assert (await api.get("/api/v1/report")).status_code == 200
    schema = (await api.get("/openapi.json")).json()
    assert "securitySchemes" not in schema.get("components", {})
    assert {"/healthz", "/readyz", "/metrics", "/api/v1/report", "/api/v1/findings", "/api/v1/disks/{disk_id}",
            "/api/v1/runs", "/api/v1/notifications", "/api/v1/audit"} <= set(schema["paths"])
    assert (await api.get("/docs")).status_code == 200


# ---- health and readiness -------------------------------------------------------------------------------


async def test_ready_after_a_recent_cycle(world: World, api: httpx.AsyncClient) -> None:
    assert (await api.get("/healthz")).json() == {"status": "ok"}
    response = await api.get("/readyz")
    assert response.status_code == 200
    body = Readiness.model_validate(response.json())
    assert body.status == "ready" and body.reason is None and body.last_cycle is not None
    assert body.last_cycle.status == "complete"


async def test_not_ready_when_the_last_cycle_is_old(world: World) -> None:
    later = utcnow() + 2 * world.settings.audit.interval + timedelta(minutes=1)
    async with client_for(deps_for(world, clock=lambda: later)) as api:
        response = await api.get("/readyz")
    assert response.status_code == 503
    assert "more than twice audit.interval" in response.json()["reason"]
    assert response.json()["last_cycle"]["status"] == "complete"


async def test_not_ready_before_any_cycle(store: Store) -> None:
    deps = ApiDeps(services=reading(store, interval=timedelta(minutes=1)), trigger=_no_trigger)
    async with client_for(deps) as api:
        response = await api.get("/readyz")
        assert response.status_code == 503
        assert response.json() == {"status": "not ready", "reason": "no audit cycle has finished yet",
                                   "last_cycle": None}
        assert (await api.get("/healthz")).status_code == 200


async def test_database_down_is_503_everywhere_never_500(world: World) -> None:
    broken = unreachable_store()
    try:
        async with client_for(deps_for(world, store=broken)) as api:
            ready = await api.get("/readyz")
            assert ready.status_code == 503 and ready.json()["reason"].startswith("database unavailable")
            assert (await api.get("/healthz")).status_code == 200
            assert (await api.get("/metrics")).status_code == 200
            for path in ("/api/v1/report", "/api/v1/findings", "/api/v1/runs", "/api/v1/disks/disk_x"):
                response = await api.get(path)
                assert response.status_code == 503, path
                assert response.json()["detail"].startswith("database unavailable"), path
    finally:
        await broken.close()


# ---- triggering a cycle ---------------------------------------------------------------------------------


async def test_audit_trigger_answers_202_or_409(bare: httpx.AsyncClient) -> None:
    async def started() -> str | None:
        return "run-123"

    store = unreachable_store()
    try:
        async with client_for(ApiDeps(services=reading(store, interval=timedelta(minutes=1)), trigger=started)) as api:
            response = await api.post("/api/v1/audit")
    finally:
        await store.close()
    assert response.status_code == 202 and response.json() == {"status": "started", "run": "run-123"}
    response = await bare.post("/api/v1/audit")
    assert response.status_code == 409 and response.json() == {"detail": "an audit cycle is already running",
                                                               "holder": "this process"}


async def test_audit_trigger_runs_one_cycle_at_a_time(world: World) -> None:
    world.fleet.latency = 0.02  # long enough for a second request to arrive while the first cycle runs
    cycles = CycleMetrics()
    runner = CycleRunner(world.runtime, cycles=cycles)
    async with client_for(deps_for(world, trigger=runner.trigger, cycles=cycles)) as api:
        first = await api.post("/api/v1/audit")
        assert first.status_code == 202, first.text
        run_id = first.json()["run"]
        assert runner.is_busy
        second = await api.post("/api/v1/audit")
        assert second.status_code == 409
        assert runner.current is not None
        outcome = await asyncio.wait_for(runner.current, timeout=30)
        assert outcome is not None and outcome.run_id == run_id
        runs = (await api.get("/api/v1/runs", params={"limit": 1})).json()["runs"]
        assert runs[0]["id"] == run_id and runs[0]["trigger"] == "api" and runs[0]["status"] == "complete"
        assert cycles.cycles == {"complete": 1}
        assert (await api.post("/api/v1/audit")).status_code == 202
        await asyncio.wait_for(runner.current, timeout=30)


async def test_audit_trigger_with_the_database_down_is_503(world: World, caplog: pytest.LogCaptureFixture) -> None:
    broken = unreachable_store()
    cycles = CycleMetrics()
    runner = CycleRunner(replace(world.runtime, store=broken), cycles=cycles)
    try:
        async with client_for(deps_for(world, trigger=runner.trigger, store=broken, cycles=cycles)) as api:
            response = await api.post("/api/v1/audit")
    finally:
        await broken.close()
    # The trigger checks the cycle lease first: with the database down it answers 503 and starts nothing.
    assert response.status_code == 503
    assert response.json()["detail"].startswith("database unavailable: ")
    assert cycles.cycles == {} and not runner.is_busy and runner.current is None


async def test_notifications_list_the_outbox(db_url: str) -> None:
    fleet, targets = demo_fleet(now=int(time.time()))
    fleet.rate_limit_per_minute = 100_000
    hook_url = "http://127.0.0.1:9/alerts-secret-path"
    settings = Settings(**{
        "katapult": {"api_url": KATAPULT, "per_page": 10, "max_requests_per_minute": 60000},
        "database": {"url": db_url},
        "audit": {"disks": targets.disks, "organizations": targets.organizations},
        "notifiers": [{"kind": "webhook", "name": "hook", "url": hook_url, "min_severity": "low"}],
    })
    async with open_services(settings, transport=httpx.ASGITransport(app=fake_app(fleet)),
                            token="fake-token") as runtime:
        await run_cycle(runtime)  # queues notifications; nothing delivers them here
        world = World(fleet, settings, runtime)
        async with client_for(deps_for(world)) as api:
            response = await api.get("/api/v1/notifications")
            assert response.status_code == 200
            items = NotificationsPage.model_validate(response.json()).notifications
            assert items and {n.state for n in items} == {"pending"} and {n.notifier for n in items} == {"hook"}
            assert all(n.status == "firing" and n.alerts for n in items)
            assert hook_url not in response.text
            assert (await api.get("/api/v1/notifications", params={"state": "delivered"})).json() == {
                "notifications": []}
            assert len((await api.get("/api/v1/notifications", params={"limit": 1})).json()["notifications"]) == 1
            for bad in ({"state": "sent"}, {"limit": 0}, {"limit": 501}):
                assert (await api.get("/api/v1/notifications", params=bad)).status_code == 422
            metrics = (await api.get("/metrics")).text
    families = {f.name: f for f in text_string_to_metric_families(metrics)}
    samples = {(s.labels["notifier"], s.labels["state"]): s.value for s in families["auditor_notifications"].samples}
    assert samples == {("hook", "pending"): len(items)}


async def test_readyz_does_not_count_an_abandoned_run(db_url: str) -> None:
    from datetime import UTC, datetime

    from auditor.api import ApiDeps, create_app
    from auditor.store import engine as db
    from auditor.store.repo import Store

    await db.upgrade(db_url)
    store = Store.from_url(db_url)
    try:
        now = datetime.now(UTC)
        run_id = writes.new_run_id()
        await store.write(writes.start_run, run_id=run_id, now=now, trigger="schedule", owner=None)
        # No cycle lease names this run: its owner is gone, so any process may mark it abandoned.
        assert await store.write(writes.abandon_orphaned_runs, now=now, reason="the auditor stopped") == [run_id]

        async def trigger() -> str | None:
            return None

        app = create_app(ApiDeps(services=reading(store), trigger=trigger))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as client:
            r = await client.get("/readyz")
        assert r.status_code == 503
        assert "no audit cycle has finished yet; the last one failed (abandoned" in r.json()["reason"]
        [run] = await store.read(queries.list_runs)
        assert run.status.value == "failed" and run.finished_at is None
        assert run.errors[0].code == "abandoned"
    finally:
        await store.close()
