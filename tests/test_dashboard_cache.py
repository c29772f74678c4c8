"""The dashboard's snapshot and page caches (auditor/web/snapshots.py, the routes in auditor/web/pages.py).

A snapshot of the data is built once per data version (latest run, UTC day), off the event loop, and shared by
every request waiting for it; pages are rendered from it once and carry each viewer's CSRF token and the time they
are read at through slots. What could go wrong: a page of the previous run after a run commits, one build per
request, a build that holds up the event loop, an in-memory findings search that disagrees with the SQL one, a
cached page carrying another viewer's token, a trend window frozen at the first render, a failure cached.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

import pytest
import test_web
from pydantic import SecretStr
from test_api import World, count_latest_run_lookups, deps_for
from test_web import API_TOKEN, _api_findings, login, metrics, rows, web_client

from auditor.domain.listings import SORT_KEYS, FindingSearch
from auditor.errors import StoreError
from auditor.fake.fleet import fake_id
from auditor.service import dashboard, queries
from auditor.service.clock import utcnow
from auditor.service.cycle import run_cycle
from auditor.web.auth import SESSION_COOKIE, Signer
from auditor.web.snapshots import Slotted, Snapshots, slot

ALL = ("open", "waived", "resolved")
world = test_web.world  # the fixture: the demo fleet audited twice, with waivers (pytest finds it by this name)


def counting(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the snapshot builds (`queries.read_snapshot` runs in the build's worker thread)."""
    calls: list[int] = []
    real = queries.read_snapshot

    async def counted(*args: Any, **kwargs: Any) -> dashboard.Snapshot:
        calls.append(1)
        return await real(*args, **kwargs)

    monkeypatch.setattr(queries, "read_snapshot", counted)
    return calls


async def test_a_new_run_is_on_the_next_page_load(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    builds = counting(monkeypatch)
    async with web_client(deps_for(world)) as web:
        before = metrics((await web.get("/")).text)
        listed = await web.get("/findings", params={"status": "all", "size": "100"})
        assert (await web.get("/findings", params={"status": "all", "size": "100"})).text.count("<tr data-") == \
            listed.text.count("<tr data-")
        assert len(builds) == 1  # the second findings page came from the same snapshot
        world.fleet.remove_policy(fake_id("dbp", "demo:wiki-data"))  # its disk loses its backups: new findings
        outcome = await run_cycle(world.runtime, trigger="test")
        assert outcome.opened > 0
        after = metrics((await web.get("/")).text)
        report = (await web.get("/api/v1/report")).json()
        assert after["last_run.id"] == report["last_run"]["id"] == outcome.run_id != before["last_run.id"]
        for key in ("open_findings", "noncompliant", "compliant"):
            assert after[key] == str(report["summary"][key]), key
        assert after["open_findings"] != before["open_findings"]
        page = await web.get("/findings", params={"status": "all", "size": "100"})
        expected = await _api_findings(web, status="all")
        assert metrics(page.text)["total"] == str(len(expected))
        assert sorted(rows(page.text)) == sorted(f["fingerprint"] for f in expected)
        assert sorted(rows(page.text)) != sorted(rows(listed.text))
    assert len(builds) == 2


async def test_concurrent_first_requests_share_one_snapshot_build(world: World,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    builds = counting(monkeypatch)
    paths = ["/", "/?days=30", "/?days=90", "/findings", "/findings?page=2&size=10", "/findings?status=all"] * 4
    async with web_client(deps_for(world)) as web:
        pages = await asyncio.gather(*(web.get(p) for p in paths))
        assert [p.status_code for p in pages] == [200] * len(paths)
        assert len(builds) == 1
        # The same view asked for at once is rendered alike for everyone.
        assert len({metrics(p.text)["open_findings"] for p in pages[::6]}) == 1
        await run_cycle(world.runtime, trigger="test")
        again = await asyncio.gather(*(web.get(p) for p in paths))
        assert [p.status_code for p in again] == [200] * len(paths)
    assert len(builds) == 2


async def test_concurrent_requests_share_one_lookup_of_the_latest_run(world: World,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    lookups = count_latest_run_lookups(world.runtime.store, monkeypatch)
    deps = replace(deps_for(world), version_ttl=60.0)  # as the daemon (1 s): looked up at most once a minute here
    async with web_client(deps) as web:
        pages = await asyncio.gather(*(web.get(p) for p in ["/", "/findings", "/findings?page=2&size=10"] * 7))
        assert [p.status_code for p in pages] == [200] * 21
        assert (await web.get("/findings?status=all")).status_code == 200
    assert len(lookups) == 1  # the snapshot reads on its own engine, not through this store


async def test_the_snapshot_is_built_off_the_event_loop(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    entered, release = threading.Event(), threading.Event()
    real = queries.read_snapshot

    async def held(*args: Any, **kwargs: Any) -> dashboard.Snapshot:
        snap = await real(*args, **kwargs)
        entered.set()
        release.wait(20)  # blocks the thread it runs in: on the event loop, nothing else could answer meanwhile
        return snap

    monkeypatch.setattr(queries, "read_snapshot", held)
    async with web_client(deps_for(world)) as web:
        overview = asyncio.ensure_future(web.get("/"))
        assert await asyncio.to_thread(entered.wait, 20)
        try:
            assert (await web.get("/healthz")).status_code == 200
            assert (await web.get("/runs")).status_code == 200  # a page that reads the database on the loop
            assert (await web.get("/api/v1/report")).status_code == 200
            assert not overview.done()
        finally:
            release.set()
        assert (await overview).status_code == 200


async def test_a_failed_snapshot_build_is_not_kept(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    real = queries.read_snapshot
    failures = [1]

    async def flaky(*args: Any, **kwargs: Any) -> dashboard.Snapshot:
        if failures:
            failures.pop()
            raise StoreError("database went away")
        return await real(*args, **kwargs)

    monkeypatch.setattr(queries, "read_snapshot", flaky)
    async with web_client(deps_for(world)) as web:
        down = await web.get("/findings")
        assert down.status_code == 503 and "Database unavailable" in down.text
        assert (await web.get("/findings")).status_code == 200
        assert (await web.get("/")).status_code == 200


@pytest.mark.slow  # every status, sort, filter and page against SQL: seconds
async def test_findings_index_answers_as_the_sql_search(world: World) -> None:
    services = world.runtime
    snap = await queries.read_snapshot(services)
    assert snap.index is not None and snap.index.covers(ALL) and len(snap.index) > 10
    org = f"org:{fake_id('org', 'demo')}"
    filters: list[dict[str, Any]] = [{}, {"rule": "unprotected-disk"}, {"severity": "high"}, {"org": org},
                                     {"org": "config"}, {"text": "DATA"}, {"text": "%"}]
    for statuses in (("open",), ("waived",), ("resolved",), ALL):
        for sort in SORT_KEYS:
            for descending in (True, False):
                for extra in filters:
                    search = FindingSearch(statuses=statuses, sort=sort, descending=descending, limit=4, **extra)
                    for page in (1, 2, 99):
                        mine = snap.index.page(search, page=page, sources=snap.sources)
                        theirs = await queries.read_search_page(services, search=search, page=page,
                                                                sources=snap.sources)
                        where = (statuses, sort, descending, extra, page)
                        assert [i.finding.fingerprint for i in mine.items] == [
                            i.finding.fingerprint for i in theirs.items], where
                        assert (mine.total, mine.page, mine.pages) == (theirs.total, theirs.page, theirs.pages), where
                        assert [(i.disk_name, i.disk_source) for i in mine.items] == [
                            (i.disk_name, i.disk_source) for i in theirs.items], where


@pytest.mark.parametrize("limit", ["open and waived", "none"])
async def test_findings_beyond_the_index_limit_are_searched_in_sql(world: World, monkeypatch: pytest.MonkeyPatch,
                                                                   limit: str) -> None:
    async with web_client(deps_for(world)) as web:
        current = len(await _api_findings(web)) + len(await _api_findings(web, status="waived"))
    monkeypatch.setattr(dashboard, "INDEX_LIMIT", current if limit == "open and waived" else 0)
    snap = await queries.read_snapshot(world.runtime)
    assert (snap.index is None) == (limit == "none")
    async with web_client(deps_for(world)) as web:
        for params in ({}, {"status": "all"}, {"status": "resolved"}, {"status": "all", "sort": "rule"}):
            page = await web.get("/findings", params={**params, "size": "100"})
            expected = await _api_findings(web, **{k: v for k, v in params.items() if k == "status"})
            assert metrics(page.text)["total"] == str(len(expected)), params
            assert sorted(rows(page.text)) == sorted(f["fingerprint"] for f in expected), params


async def test_cached_pages_carry_each_viewers_csrf_token_and_read_time(world: World) -> None:
    clock = [utcnow()]
    deps = deps_for(world, token=API_TOKEN, clock=lambda: clock[0])
    signer = Signer(SecretStr(API_TOKEN))
    async with web_client(deps) as one, web_client(deps) as other:
        await login(one)
        await login(other)
        for path in ("/", "/findings", "/findings?status=all&sort=rule"):
            tokens = []
            for web in (one, other):
                html = (await web.get(path)).text
                assert "\x00" not in html, path
                session = signer.verify(web.cookies[SESSION_COOKIE], now=clock[0])
                assert session is not None
                found = set(re.findall(r'name="csrf" value="([^"]*)"', html))
                assert found == {signer.csrf(session)}, path  # the logout form's, and the overview's audit form's
                tokens.append(found)
            assert tokens[0] != tokens[1], path
        clock[0] += timedelta(seconds=20)
        for path in ("/", "/findings"):
            html = (await one.get(path)).text
            stamp = clock[0].isoformat(timespec="seconds").replace("+00:00", "Z")
            assert f'<time datetime="{stamp}">{stamp}</time>' in html, path


def _window_start(html: str) -> str:
    found = set(re.findall(r"since (\d{4}-\d\d-\d\d \d\d:\d\d) UTC", html))
    assert len(found) == 1, found  # both charts
    return found.pop()


def _when(t: datetime) -> str:
    return t.strftime("%Y-%m-%d %H:%M")


async def test_the_overview_trend_window_follows_the_clock(world: World) -> None:
    clock = [utcnow()]
    async with web_client(deps_for(world, clock=lambda: clock[0])) as web:
        assert _window_start((await web.get("/?days=7")).text) == _when(clock[0] - timedelta(days=7))
        # An hour on: the page of an hour ago is not served, the window is drawn again first.
        clock[0] += timedelta(hours=1)
        assert _window_start((await web.get("/?days=7")).text) == _when(clock[0] - timedelta(days=7))
        # Two minutes on: the last page (same data) may answer while the new one renders; the new one follows.
        clock[0] += timedelta(minutes=2)
        for _ in range(500):
            if _window_start((await web.get("/?days=7")).text) == _when(clock[0] - timedelta(days=7)):
                break
            await asyncio.sleep(0.01)
        else:
            pytest.fail("the overview's trend window did not move with the clock")
        # The banners move with the clock on every request, cached page or not.
        clock[0] += 2 * world.settings.audit.interval
        assert re.findall(r'data-banner="(\w+)"', (await web.get("/?days=7")).text) == ["overdue"]


# ---- the caches on their own -----------------------------------------------------------------------------


def test_slotted_pages_fill_their_slots_per_request() -> None:
    page = Slotted(f"<p>{slot('csrf')}</p><i>{slot('read_at')}</i><b>{slot('csrf')}</b>")
    assert page.names == {"csrf", "read_at"}
    assert page.fill({"csrf": "tok", "read_at": "now"}) == b"<p>tok</p><i>now</i><b>tok</b>"
    assert page.fill({"csrf": "é", "read_at": ""}) == "<p>é</p><i></i><b>é</b>".encode()
    assert Slotted("no slot \x00here\x00").fill({}) == b"no slot \x00here\x00"  # only our markers are slots


async def test_snapshots_build_once_per_version_and_never_older_than_asked() -> None:
    built: list[str] = []
    version = ["v1"]
    gate = asyncio.Event()

    async def build() -> tuple[Any, Any, dict[str, Any]]:
        built.append(version[0])
        await gate.wait()
        return version[0], object(), {}

    snapshots = Snapshots(build)
    seen = time.monotonic()
    waiting = [asyncio.ensure_future(snapshots.get("v1", seen)) for _ in range(5)]
    await asyncio.sleep(0)
    gate.set()
    first = await asyncio.gather(*waiting)
    assert built == ["v1"] and len({id(b) for b in first}) == 1 and first[0].version == "v1"
    assert await snapshots.get("v1", seen) is first[0] and snapshots.builds == 1
    # A run commits: asked for v2 (looked up after the v1 snapshot was read), a new build.
    version[0] = "v2"
    second = await snapshots.get("v2", time.monotonic())
    assert second.version == "v2" and built == ["v1", "v2"] and snapshots.current is second
    # Someone who looked the version up before the v2 snapshot was read gets it (it is newer), no build.
    assert await snapshots.get("v1", first[0].started) is second and snapshots.builds == 2
