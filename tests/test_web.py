"""The web dashboard: in-process over real cycles of the fake Katapult (both databases), and in a real browser.

In-process (httpx.ASGITransport): security headers, login/logout and the signed session, CSRF, filters, every
number equal to the JSON API, banners, no secret in any page. Browser (`browser`, `slow`): Playwright drives
Debian's Chromium headless (one per test process: conftest's `browser`) against uvicorn on a loopback port; each
test saves a screenshot in its tmp_path, and with AUDITOR_SCREENSHOTS=1 the overview's goes to docs/overview.png.
Without Chromium the browser tests skip, except under CI=true, where they fail (as the PostgreSQL tests do).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import uvicorn
from pydantic import SecretStr
from test_api import KATAPULT, World, deps_for, reading

from auditor.api import ApiDeps, CycleMetrics, create_app
from auditor.config import Settings
from auditor.domain.listings import RunPoint
from auditor.domain.records import RunError, RunStats, RunStatus
from auditor.fake import Fault, Fleet, demo_fleet
from auditor.fake import create_app as fake_app
from auditor.fake.fleet import fake_id
from auditor.service import open_services, waivers_from
from auditor.service.clock import utcnow
from auditor.service.cycle import run_cycle
from auditor.service.dashboard import compliance_pct
from auditor.service.delivery import deliver_due
from auditor.service.queries import read_disk_detail
from auditor.service.runner import CycleRunner
from auditor.service.sessions import read_revoked_sessions, revoke_session
from auditor.store import writes
from auditor.store.repo import Store
from auditor.web.auth import SESSION_COOKIE, Signer, client_address, is_https, safe_next, trusted_networks
from auditor.web.charts import COLUMNS, MAX_MARKS, compliance_chart, severity_chart
from auditor.web.headers import CSP

API_TOKEN = "dashboard-api-token-7f3a"
AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
HOOK_URL = "http://127.0.0.1:9/hooks/secret-path-5b1e"
SLACK_URL = "http://127.0.0.1:9/services/T000/B000/slack-secret-c9d2"
PAGES = ("/", "/?days=30", "/?days=90", "/findings", "/findings?status=all&sort=rule&dir=asc", "/runs",
         "/notifications", "/waivers")
ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def waivers(today: date) -> list[dict[str, Any]]:
    """Three waivers: one expiring in 3 days, one in 60, one malformed (a problem)."""
    return [
        {"rule": "unprotected-disk", "disk": fake_id("disk", "demo:scratch-space"), "reason": "scratch, agreed",
         "owner": "ops@example.com", "expires": (today + timedelta(days=3)).isoformat()},
        {"rule": "schedule-stale", "disk": fake_id("disk", "demo:reports-data"), "reason": "vendor fix due",
         "owner": "data@example.com", "expires": (today + timedelta(days=60)).isoformat()},
        {"rule": "no-such-rule", "disk": "disk_x", "reason": "typo", "owner": "someone", "expires": "2031-01-01"},
    ]


def web_settings(db_url: str, targets: Any, *, notifiers: list[dict[str, Any]] | None = None,
                 interval: str = "15m") -> Settings:
    raw: dict[str, Any] = {
        "katapult": {"api_url": KATAPULT, "per_page": 10, "max_requests_per_minute": 60000, "max_attempts": 2},
        "database": {"url": db_url},
        "audit": {"interval": interval, "disks": targets.disks, "organizations": targets.organizations},
        "waivers": waivers(utcnow().date()),
        "notifiers": notifiers or [],
    }
    return Settings(**raw)


@pytest.fixture
async def world(db_url: str) -> AsyncIterator[World]:
    """The demo fleet audited twice (a policy fixed in between), with waivers and one webhook notifier."""
    fleet, targets = demo_fleet(now=int(time.time()))
    fleet.rate_limit_per_minute = 100_000
    settings = web_settings(db_url, targets, notifiers=[
        {"kind": "webhook", "name": "hook", "url": HOOK_URL, "min_severity": "low", "timeout_seconds": 1},
        {"kind": "slack", "name": "chat", "webhook_url": SLACK_URL, "min_severity": "critical", "timeout_seconds": 1},
    ])
    transport = httpx.ASGITransport(app=fake_app(fleet))
    async with open_services(settings, transport=transport, token="fake-token") as runtime:
        assert (await run_cycle(runtime, trigger="test")).status is RunStatus.COMPLETE
        fleet.update_policy(fake_id("dbp", "demo:legacy-db-data"), retention=30)
        assert (await run_cycle(runtime, trigger="test")).resolved == 2
        yield World(fleet, settings, runtime)


def web_client(deps: ApiDeps, *, base_url: str = "http://dash") -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(deps)), base_url=base_url)


async def login(client: httpx.AsyncClient, token: str = API_TOKEN) -> httpx.Response:
    form = await client.get("/login")
    assert form.status_code == 200
    return await client.post("/login", data={"token": token, "next": "/"})


def metrics(html: str) -> dict[str, str]:
    """Returns the text of every element carrying data-metric, by name (tags stripped, whitespace collapsed)."""

    class Collector(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.stack: list[tuple[str, str | None]] = []
            self.values: dict[str, str] = {}
            self.text: dict[str, list[str]] = {}

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            if tag in ("input", "br", "meta", "link", "circle", "line", "rect", "polyline"):
                return
            name = dict(attrs).get("data-metric")
            self.stack.append((tag, name))
            if name:
                self.text[name] = []

        def handle_endtag(self, tag: str) -> None:
            while self.stack:
                open_tag, name = self.stack.pop()
                if name:
                    self.values.setdefault(name, " ".join("".join(self.text.pop(name)).split()))
                if open_tag == tag:
                    break

        def handle_data(self, data: str) -> None:
            for _, name in self.stack:
                if name and name in self.text:
                    self.text[name].append(data)

    parser = Collector()
    parser.feed(html)
    return parser.values


def rows(html: str, attr: str = "data-fingerprint") -> list[str]:
    return re.findall(rf'<tr {attr}="([^"]+)"', html)


# ---- headers and markup ----------------------------------------------------------------------------------


async def test_every_page_has_the_security_headers_and_no_inline_code(world: World) -> None:
    disk = fake_id("disk", "demo:legacy-db-data")
    async with web_client(deps_for(world)) as web:
        for path in (*PAGES, f"/disks/{disk}", "/login", "/disks/disk_unknown0000", "/findings?status=bogus"):
            response = await web.get(path)
            assert response.status_code in (200, 303, 400, 404), path
            headers = response.headers
            assert headers["content-security-policy"] == CSP, path
            assert CSP == ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                           "frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
            assert headers["x-content-type-options"] == "nosniff", path
            assert headers["referrer-policy"] == "no-referrer", path
            assert headers["cache-control"] == "no-store", path
            if response.status_code == 303:
                continue
            assert headers["content-type"].startswith("text/html"), path
            html = response.text
            assert html.startswith("<!doctype html>") and '<html lang="en">' in html, path
            # No script at all, no inline style: the CSP would block them, so they must not be needed.
            assert "<script" not in html and "<style" not in html and " style=" not in html, path
            assert re.search(r"\son[a-z]+=", html) is None, path  # no inline event handlers
            assert "http://" not in html.replace('href="http', "") and "https://" not in html, path  # no CDN
            assert '<main id="main"' in html and 'class="skip" href="#main"' in html, path
        css = await web.get("/static/dashboard.css")
        assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
        assert css.headers["x-content-type-options"] == "nosniff"
        # The API and the probes are untouched: no page headers there.
        for path in ("/api/v1/report", "/healthz", "/readyz", "/metrics"):
            response = await web.get(path)
            assert response.status_code == 200, path
            assert "content-security-policy" not in response.headers, path


# ---- numbers equal the JSON API --------------------------------------------------------------------------


async def test_overview_numbers_equal_the_report(world: World) -> None:
    async with web_client(deps_for(world)) as web:
        page = await web.get("/")
        report = (await web.get("/api/v1/report")).json()
    assert page.status_code == 200
    shown = metrics(page.text)
    s = report["summary"]
    for key in ("disks_total", "compliant", "noncompliant", "unknown", "open_findings", "waived_findings"):
        assert shown[key] == str(s[key]), key
    assert s["waived_findings"] == 2 and s["open_findings"] > 0  # the two waivers that apply are in force
    for sev in ("critical", "high", "medium", "low"):
        assert shown[f"by_severity.{sev}"] == str(s["by_severity"].get(sev, 0)), sev
    assert {k.split(".", 1)[1]: int(v) for k, v in shown.items() if k.startswith("by_rule.")} == s["by_rule"]
    assert shown["compliance_pct"] == f"{100 * s['compliant'] / s['disks_total']:.1f}%"
    run = report["last_run"]
    assert (shown["last_run.id"], shown["last_run.status"], shown["last_run.api_requests"]) == (
        run["id"], run["status"], str(run["api_requests"]))
    assert shown["expiring_waivers"] == str(len(report["expiring_waivers"])) == "1"
    assert 'data-banner=' not in page.text  # a recent complete run: no banner


async def _api_findings(web: httpx.AsyncClient, **params: Any) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        body = (await web.get("/api/v1/findings", params={**params, "limit": 1000,
                                                           **({"cursor": cursor} if cursor else {})})).json()
        items += body["findings"]
        cursor = body["next_cursor"]
        if cursor is None:
            return items


async def test_findings_filters_sort_and_pages_agree_with_the_api(world: World) -> None:
    async with web_client(deps_for(world)) as web:
        for params in ({}, {"status": "resolved"}, {"status": "waived"}, {"status": "all"},
                       {"rule": "unprotected-disk"}, {"severity": "high"}, {"status": "all", "severity": "low"}):
            page = await web.get("/findings", params={**params, "size": "100"})
            assert page.status_code == 200, params
            expected = await _api_findings(web, **params)
            assert metrics(page.text)["total"] == str(len(expected)), params
            assert sorted(rows(page.text)) == sorted(f["fingerprint"] for f in expected), params
        # Organization: the demo org's findings and the config-listed disks' partition the open findings.
        everything = await _api_findings(web)
        sources = {d["disk_id"]: d["source"] for d in (await web.get("/api/v1/report")).json()["disks"]}
        org = f"org:{fake_id('org', 'demo')}"
        by_org = await web.get("/findings", params={"org": org, "size": "100"})
        mine = [f["fingerprint"] for f in everything if sources.get(f["disk_id"]) == org]
        assert mine and sorted(rows(by_org.text)) == sorted(mine)
        config = await web.get("/findings", params={"org": "config"})
        assert int(metrics(config.text)["total"]) + len(mine) == len(everything)
        assert f'<option value="{org}"' in by_org.text and '<option value="config"' in by_org.text
        # Disk text: a name fragment, any case; LIKE wildcards are literal.
        legacy = await web.get("/findings", params={"status": "all", "disk": "LEGACY-db"})
        assert rows(legacy.text) and all(
            f["disk_id"] == fake_id("disk", "demo:legacy-db-data")
            for f in await _api_findings(web, status="all") if f["fingerprint"] in rows(legacy.text))
        assert metrics((await web.get("/findings", params={"disk": "%"})).text)["total"] == "0"
        # Sort by severity, descending: ranks never go up; ascending: never down.
        rank = {"low": 0, "medium": 1, "high": 2, "critical": 3}
        for direction in ("desc", "asc"):
            html = (await web.get("/findings", params={"sort": "severity", "dir": direction})).text
            sevs = [rank[s] for s in re.findall(r'<span class="sev sev-(\w+)">', html)]
            assert len(sevs) == len(everything)
            assert sevs == sorted(sevs, reverse=direction == "desc")
        # Pages of 10 cover every open finding once, and each row links to its disk.
        seen: list[str] = []
        first = (await web.get("/findings", params={"size": "10"})).text
        pages = int(re.search(r"Page 1 of (\d+)", first).group(1))  # type: ignore[union-attr]
        assert pages == -(-len(everything) // 10) and pages > 1
        for n in range(1, pages + 1):
            html = (await web.get("/findings", params={"size": "10", "page": str(n)})).text
            seen += rows(html)
            assert 'rel="next"' in html if n < pages else 'rel="next"' not in html
        assert sorted(seen) == sorted(f["fingerprint"] for f in everything)
        past = await web.get("/findings", params={"size": "10", "page": "999"})
        assert f"Page {pages} of {pages}" in past.text
        disk_of = {f["fingerprint"]: f["disk_id"] for f in everything}
        for fingerprint, row in re.findall(r'<tr data-fingerprint="([^"]+)">(.*?)</tr>', first, re.S):
            assert f'href="/disks/{disk_of[fingerprint]}"' in row


@pytest.mark.parametrize("query", ["status=bogus", "severity=urgent", "rule=no-such-rule", "sort=size",
                                   "dir=up", "page=0", "page=x", "size=7", "disk=" + "x" * 201, "disk=a%00b",
                                   "days=8"])
async def test_bad_filters_are_a_400_page(world: World, query: str) -> None:
    async with web_client(deps_for(world)) as web:
        path = "/?" if query.startswith("days") else "/findings?"
        response = await web.get(path + query)
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("text/html") and "Bad request" in response.text


async def test_disk_page_equals_the_disk_api(world: World) -> None:
    disk = fake_id("disk", "demo:legacy-db-data")
    async with web_client(deps_for(world)) as web:
        page = await web.get(f"/disks/{disk}")
        api = (await web.get(f"/api/v1/disks/{disk}")).json()
        missing = await web.get("/disks/disk_nosuchdisk0000")
    assert api == await read_disk_detail(world.runtime, disk_id=disk)
    shown = metrics(page.text)
    assert (shown["disk_id"], shown["status"], shown["outcome"]) == (disk, api["status"], api["disk"]["outcome"])
    assert [shown[k] for k in ("policies", "findings", "drift", "snapshots")] == [
        str(len(api[k])) for k in ("policies", "findings", "drift", "snapshots")]
    assert re.findall(r'data-drift="([^"]+)"', page.text) == ["policy-changed"]
    assert "retention</span> 3" in page.text and "retention</span> 30" in page.text  # before → after
    assert page.text.count('class="event event-') == len(api["finding_events"]) == 4  # opened ×2, resolved ×2
    assert missing.status_code == 404 and "does not know the disk disk_nosuchdisk0000" in missing.text


async def test_disk_page_shows_the_attachment_the_api_gives(world: World) -> None:
    detached, lone = fake_id("disk", "demo:batch-1-old-data"), fake_id("disk", "demo:shared-uploads")
    async with web_client(deps_for(world)) as web:
        page = (await web.get(f"/disks/{detached}")).text
        api = (await web.get(f"/api/v1/disks/{detached}")).json()
        unattached = (await web.get(f"/disks/{lone}")).text
    assert api["disk"]["attachment"]["state"] == "detached" and api["status"] == "noncompliant"
    assert metrics(page)["attachment"] == "detached"
    assert api["disk"]["attachment"]["verified_at"] in page
    assert "attachment" not in metrics(unattached)  # a disk on no VM has none


async def test_runs_notifications_and_waivers_pages_equal_the_api(world: World) -> None:
    async with web_client(deps_for(world)) as web:
        runs_page = (await web.get("/runs")).text
        runs_api = (await web.get("/api/v1/runs", params={"limit": 50})).json()["runs"]
        assert rows(runs_page, "data-run") == [r["id"] for r in runs_api]
        assert re.findall(r'data-metric="api_requests">(\d+)<', runs_page) == [str(r["api_requests"])
                                                                             for r in runs_api]
        notes = (await web.get("/notifications")).text
        api = (await web.get("/api/v1/notifications", params={"limit": 500})).json()["notifications"]
        for notifier in ("hook", "chat"):
            block = re.search(rf'<tr data-notifier="{notifier}">(.*?)</tr>', notes, re.S)
            mine = [n for n in api if n["notifier"] == notifier]
            assert block and mine, notifier
            counts = dict(re.findall(r'data-metric="(\w+)">(\d+)<', block.group(1)))
            assert counts["total"] == str(len(mine))
            assert counts["pending"] == str(sum(n["state"] == "pending" for n in mine))
        page = (await web.get("/waivers")).text
        valid, problems = waivers_from(world.settings)
        shown = metrics(page)
        assert (shown["active"], shown["expiring"], shown["problems"]) == ("2", "1", "1")
        assert len(valid) == 2 and len(problems) == 1 and "unknown rule" in page


# ---- banners ---------------------------------------------------------------------------------------------


async def test_partial_run_shows_a_banner_and_the_disks_read_error(world: World) -> None:
    disk = fake_id("disk", "demo:partner-web-system")  # listed by id in the config: read on its own
    world.fleet.faults[disk] = Fault.FORBIDDEN  # 403: no retry, the disk is unknown at once
    outcome = await run_cycle(world.runtime, trigger="test")
    assert outcome.status is RunStatus.PARTIAL
    async with web_client(deps_for(world)) as web:
        overview = (await web.get("/")).text
        report = (await web.get("/api/v1/report")).json()
        page = (await web.get(f"/disks/{disk}")).text
    assert 'data-banner="partial"' in overview and 'role="alert"' in overview
    assert metrics(overview)["unknown"] == str(report["summary"]["unknown"]) == "1"
    assert 'data-banner="read-error"' in page and metrics(page)["status"] == "unknown"
    error = next(d["error"] for d in report["disks"] if d["disk_id"] == disk)
    assert error["code"] in page


async def test_failed_and_overdue_runs_show_banners(world: World) -> None:
    later = utcnow() + 2 * world.settings.audit.interval + timedelta(minutes=1)
    async with web_client(deps_for(world, clock=lambda: later)) as web:
        overview = (await web.get("/")).text
    assert re.findall(r'data-banner="(\w+)"', overview) == ["overdue"]
    assert "more than twice the audit interval (15 min)" in overview
    # The banner names its kind once: "Overdue. The last …", never "Overdue. Overdue: …".
    assert "<strong>Overdue.</strong> The last complete or partial run finished" in overview
    assert overview.count("Overdue") == 1
    store = world.runtime.store
    run_id = writes.new_run_id()
    await store.write(writes.start_run, run_id=run_id, now=utcnow(), trigger="test", owner=None)
    await store.write(writes.fail_run, run_id, now=utcnow(),
                      errors=[RunError("*", "database_unavailable", "went away")], stats=RunStats())
    async with web_client(deps_for(world)) as web:
        overview = (await web.get("/")).text
    assert re.findall(r'data-banner="(\w+)"', overview) == ["failed"]
    assert "database_unavailable: went away" in overview


async def test_no_run_yet_and_database_down_pages(store: Store) -> None:
    deps = ApiDeps(services=reading(store), trigger=_no_trigger)
    async with web_client(deps) as web:
        overview = await web.get("/")
        assert overview.status_code == 200 and 'data-banner="never"' in overview.text
        for path in PAGES[3:]:
            assert (await web.get(path)).status_code == 200, path
    broken = Store.from_url("postgresql+psycopg://auditor@127.0.0.1:1/none")
    try:
        async with web_client(replace(deps, services=reading(broken))) as web:
            for path in ("/", "/findings", "/runs", "/notifications", "/disks/disk_x"):
                response = await web.get(path)
                assert response.status_code == 503, path
                assert "Database unavailable" in response.text and response.headers["content-security-policy"]
    finally:
        await broken.close()


async def _no_trigger() -> str | None:
    return None


# ---- auth ------------------------------------------------------------------------------------------------


def cookie_attrs(response: httpx.Response) -> dict[str, str]:
    header = response.headers["set-cookie"]
    parts = [p.strip() for p in header.split(";")]
    attrs = {p.split("=", 1)[0].lower(): (p.split("=", 1)[1] if "=" in p else "") for p in parts[1:]}
    attrs["value"] = parts[0].split("=", 1)[1]
    return attrs


async def test_pages_redirect_to_login_and_a_session_opens_them(world: World) -> None:
    async with web_client(deps_for(world, token=API_TOKEN)) as web:
        for path in PAGES + (f"/disks/{fake_id('disk', 'demo:legacy-db-data')}",):
            response = await web.get(path)
            assert response.status_code == 303, path
            target = urlsplit(response.headers["location"])
            assert target.path == "/login" and parse_qs(target.query)["next"] == [path], path
        form = await web.get("/login", params={"next": "/findings?status=all"})
        assert form.status_code == 200 and 'type="password"' in form.text
        assert 'name="next" value="/findings?status=all"' in form.text
        wrong = await web.post("/login", data={"token": "guess-" + API_TOKEN[:6], "next": "/"})
        assert wrong.status_code == 401 and "That is not the API token" in wrong.text
        assert "guess-" not in wrong.text and "set-cookie" not in wrong.headers
        ok = await web.post("/login", data={"token": API_TOKEN, "next": "/findings?status=all"})
        assert ok.status_code == 303 and ok.headers["location"] == "/findings?status=all"
        attrs = cookie_attrs(ok)
        assert {"httponly", "path", "max-age", "samesite"} <= set(attrs) and "secure" not in attrs
        assert attrs["samesite"].lower() == "strict" and attrs["max-age"] == str(12 * 3600) and attrs["path"] == "/"
        assert API_TOKEN not in attrs["value"]
        for path in PAGES:
            assert (await web.get(path)).status_code == 200, path
        # The API keeps its bearer auth: a dashboard session does not open it.
        assert (await web.get("/api/v1/report")).status_code == 401
        assert (await web.get("/api/v1/report", headers=AUTH)).status_code == 200
        for path in ("/healthz", "/readyz", "/metrics"):
            assert (await web.get(path)).status_code == 200, path
        # Already logged in: the login page sends you on.
        assert (await web.get("/login")).status_code == 303
        # Log out: the cookie is cleared, the pages ask again.
        overview = await web.get("/")
        csrf = re.search(r'name="csrf" value="([^"]+)"', overview.text).group(1)  # type: ignore[union-attr]
        out = await web.post("/logout", data={"csrf": csrf})
        assert out.status_code == 303 and out.headers["location"] == "/login"
        cleared = cookie_attrs(out)
        assert cleared["max-age"] == "0" and cleared["value"] in ("", '""')
        assert (await web.get("/")).status_code == 303


async def test_session_cookie_rules(world: World) -> None:
    deps = deps_for(world, token=API_TOKEN)
    async with web_client(deps, base_url="http://dash") as web:
        https = await web.post("/login", data={"token": API_TOKEN}, headers={"X-Forwarded-Proto": "https"})
        assert "secure" in cookie_attrs(https)
    async with web_client(deps, base_url="https://dash") as web:
        assert "secure" in cookie_attrs(await login(web))
    signer = Signer(SecretStr(API_TOKEN))
    now = utcnow()
    _session, cookie = signer.issue(now=now)
    # Another replica (same token, another process) accepts it; another token does not; nor tampering or age.
    assert Signer(SecretStr(API_TOKEN)).verify(cookie, now=now) is not None
    assert Signer(SecretStr(API_TOKEN + "x")).verify(cookie, now=now) is None
    body, sig = cookie.split(".")
    forged = ("B" if sig[0] == "A" else "A") + sig[1:]  # the first char: the last one's low bits are padding
    assert signer.verify(f"{body}x.{sig}", now=now) is None and signer.verify(f"{body}.{forged}", now=now) is None
    assert signer.verify(cookie, now=now + timedelta(hours=11, minutes=59)) is not None
    assert signer.verify(cookie, now=now + timedelta(hours=12)) is None
    for junk in ("", "a.b.c", "nodot", "!!.??", "e30.AAAA"):
        assert signer.verify(junk, now=now) is None
    # Through the app: an expired session (the clock 13 h on) is sent back to the login page.
    later = [now]
    async with web_client(deps_for(world, token=API_TOKEN, clock=lambda: later[0])) as web:
        await login(web)
        assert (await web.get("/")).status_code == 200
        later[0] = now + timedelta(hours=13)
        assert (await web.get("/")).status_code == 303
    async with web_client(deps) as web:
        web.cookies.set(SESSION_COOKIE, f"{body}.{forged}")
        assert (await web.get("/")).status_code == 303


# ---- login throttling and sessions revoked on the server --------------------------------------------------------


def metric_value(text: str, name: str) -> float:
    """Returns the value of an unlabelled sample in a Prometheus exposition."""
    found = re.search(rf"^{name} (\S+)$", text, re.M)
    assert found is not None, name
    return float(found.group(1))


def peer_client(deps: ApiDeps, address: str) -> httpx.AsyncClient:
    """A client whose connection comes from `address` (what the app sees as request.client)."""
    transport = httpx.ASGITransport(app=create_app(deps), client=(address, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://dash")


async def test_wrong_logins_are_throttled_per_address_doubling_and_reset_by_success(world: World) -> None:
    t = [utcnow()]
    deps = deps_for(world, token=API_TOKEN, clock=lambda: t[0])
    wrong = {"token": "not-" + API_TOKEN, "next": "/"}
    async with peer_client(deps, "203.0.113.7") as web, peer_client(deps, "198.51.100.9") as other:
        for _ in range(5):
            assert (await web.post("/login", data=wrong)).status_code == 401
        # The 6th attempt waits, wrong or right token alike: the token is not even looked at.
        sixth = await web.post("/login", data=wrong)
        assert sixth.status_code == 429 and sixth.headers["retry-after"] == "30"
        assert "try again in" in sixth.text and "set-cookie" not in sixth.headers
        right = await web.post("/login", data={"token": API_TOKEN, "next": "/"})
        assert right.status_code == 429 and "set-cookie" not in right.headers
        t[0] += timedelta(seconds=10)
        assert (await web.post("/login", data=wrong)).headers["retry-after"] == "20"
        # Another address is not affected; nor does a forged X-Forwarded-For (no proxy is trusted) help.
        assert (await other.post("/login", data=wrong)).status_code == 401
        spoofed = await web.post("/login", data=wrong, headers={"X-Forwarded-For": "192.0.2.1"})
        assert spoofed.status_code == 429
        # Each further wrong token after a wait doubles the next wait, up to 15 minutes.
        waits = []
        for _ in range(7):
            t[0] += timedelta(seconds=int((await web.post("/login", data=wrong)).headers["retry-after"]))
            assert (await web.post("/login", data=wrong)).status_code == 401  # the wait is over: a real try
            waits.append(int((await web.post("/login", data=wrong)).headers["retry-after"]))
        assert waits == [60, 120, 240, 480, 900, 900, 900]
        # The right token after the wait logs in and resets the address: five free tries again.
        t[0] += timedelta(seconds=900)
        ok = await web.post("/login", data={"token": API_TOKEN, "next": "/"})
        assert ok.status_code == 303 and SESSION_COOKIE in ok.headers["set-cookie"]
        web.cookies.clear()
        for _ in range(5):
            assert (await web.post("/login", data=wrong)).status_code == 401
        assert (await web.post("/login", data=wrong)).status_code == 429
        exposition = (await web.get("/metrics")).text
    # 5 + 1 (other) + 7 + 5 wrong tokens looked at; every 429 counted as refused.
    assert metric_value(exposition, "auditor_login_failures_total") == 18
    assert metric_value(exposition, "auditor_login_throttled_total") == 1 + 1 + 1 + 1 + 7 * 2 + 1


def test_client_address_believes_forwarded_for_only_from_trusted_proxies() -> None:
    proxies = trusted_networks(["10.0.0.0/8", "fd00::1"])
    assert client_address("203.0.113.7", "192.0.2.1", trusted=()) == "203.0.113.7"
    assert client_address("203.0.113.7", "192.0.2.1", trusted=proxies) == "203.0.113.7"  # not from a proxy
    assert client_address("10.1.2.3", None, trusted=proxies) == "10.1.2.3"
    # From a proxy: the right-most hop that is not a proxy; what the client wrote on the left is ignored.
    assert client_address("10.1.2.3", "192.0.2.1", trusted=proxies) == "192.0.2.1"
    assert client_address("10.1.2.3", "6.6.6.6, 192.0.2.1, 10.9.9.9", trusted=proxies) == "192.0.2.1"
    assert client_address("fd00::1", "2001:db8::5", trusted=proxies) == "2001:db8::5"
    assert client_address("10.1.2.3", "10.4.4.4", trusted=proxies) == "10.4.4.4"  # only proxies: the first
    assert client_address(None, "192.0.2.1", trusted=proxies) == "unknown"
    with pytest.raises(ValueError, match="not an IP address"):
        Settings(api={"trusted_proxies": ["proxy.example"]})


async def test_a_trusted_proxy_throttles_each_forwarded_client(world: World) -> None:
    settings = world.settings.model_copy(update={"api": world.settings.api.model_copy(
        update={"trusted_proxies": ["127.0.0.1"]})})
    deps = replace(deps_for(world, token=API_TOKEN), services=replace(world.runtime, settings=settings))
    wrong = {"token": "nope"}
    async with peer_client(deps, "127.0.0.1") as proxy:
        for _ in range(5):
            assert (await proxy.post("/login", data=wrong, headers={"X-Forwarded-For": "192.0.2.1"})).status_code \
                == 401
        assert (await proxy.post("/login", data=wrong, headers={"X-Forwarded-For": "192.0.2.1"})).status_code == 429
        assert (await proxy.post("/login", data=wrong, headers={"X-Forwarded-For": "192.0.2.2"})).status_code == 401


async def session_cookie(deps: ApiDeps) -> tuple[str, str]:
    """Logs in through a fresh client; returns the session cookie and the page's CSRF token."""
    async with web_client(deps) as web:
        await login(web)
        cookie = web.cookies[SESSION_COOKIE]
        csrf = re.search(r'name="csrf" value="([^"]+)"', (await web.get("/")).text).group(1)  # type: ignore
    return cookie, csrf


async def replay(deps: ApiDeps, cookie: str, path: str = "/") -> httpx.Response:
    async with web_client(deps) as web:
        web.cookies.set(SESSION_COOKIE, cookie)
        return await web.get(path)


async def test_a_logged_out_cookie_replayed_is_sent_to_the_login_page(world: World) -> None:
    deps = deps_for(world, token=API_TOKEN)
    cookie, csrf = await session_cookie(deps)
    kept, _ = await session_cookie(deps)
    assert (await replay(deps, cookie)).status_code == 200
    async with web_client(deps) as web:
        web.cookies.set(SESSION_COOKIE, cookie)
        assert (await web.post("/logout", data={"csrf": csrf})).status_code == 303
    for path in ("/", "/findings", "/runs"):
        response = await replay(deps, cookie, path)
        assert response.status_code == 303 and urlsplit(response.headers["location"]).path == "/login", path
    # The login page does not take it for a session either; another session is untouched.
    async with web_client(deps) as web:
        web.cookies.set(SESSION_COOKIE, cookie)
        assert (await web.get("/login")).status_code == 200
        assert (await web.post("/audit", data={"csrf": csrf})).status_code == 403
    assert (await replay(deps, kept)).status_code == 200


async def test_a_cookie_logged_out_on_one_replica_is_refused_by_another(world: World) -> None:
    t = [utcnow()]
    second_store = Store.from_url(world.settings.database.url.get_secret_value())
    try:
        first = deps_for(world, token=API_TOKEN, clock=lambda: t[0])
        # The other replica: its own engine on the same database, caching lookups for a second as the daemon does.
        second = replace(deps_for(world, token=API_TOKEN, clock=lambda: t[0], store=second_store),
                         revocation_ttl=1.0)
        cookie, csrf = await session_cookie(first)
        async with web_client(second) as other:
            other.cookies.set(SESSION_COOKIE, cookie)
            assert (await other.get("/")).status_code == 200  # looked up: not revoked (cached for 1 s)
            async with web_client(first) as web:
                web.cookies.set(SESSION_COOKIE, cookie)
                assert (await web.post("/logout", data={"csrf": csrf})).status_code == 303
            t[0] += timedelta(milliseconds=500)
            assert (await other.get("/")).status_code == 200  # within the documented bound
            t[0] += timedelta(milliseconds=500)
            refused = await other.get("/")
            assert refused.status_code == 303 and urlsplit(refused.headers["location"]).path == "/login"
    finally:
        await second_store.close()


async def test_revocations_are_kept_until_the_session_expires_then_pruned(world: World) -> None:
    t = [utcnow()]
    services = replace(world.runtime, clock=lambda: t[0])
    await revoke_session(services, sid="a" * 32, expires=t[0] + timedelta(hours=1))
    await revoke_session(services, sid="a" * 32, expires=t[0] + timedelta(hours=1))  # twice: still one
    await revoke_session(services, sid="b" * 32, expires=t[0] + timedelta(hours=3))
    assert await read_revoked_sessions(services, sids=["a" * 32, "b" * 32, "c" * 32]) == {"a" * 32, "b" * 32}
    t[0] += timedelta(hours=2)
    assert await read_revoked_sessions(services, sids=["a" * 32, "b" * 32]) == {"b" * 32}
    await revoke_session(services, sid="c" * 32, expires=t[0] + timedelta(hours=1))  # prunes the expired "a"
    assert await services.store.read(writes.revoke_session, "d" * 32, expires=t[0], now=t[0]) == 1  # itself
    t[0] -= timedelta(hours=2)  # "a" would count again had it been kept
    assert await read_revoked_sessions(services, sids=["a" * 32]) == set()


async def test_changing_the_token_ends_every_session(world: World) -> None:
    old = deps_for(world, token=API_TOKEN)
    cookie, _ = await session_cookie(old)
    assert (await replay(old, cookie)).status_code == 200
    new = deps_for(world, token=API_TOKEN + "-rotated")
    response = await replay(new, cookie)
    assert response.status_code == 303 and urlsplit(response.headers["location"]).path == "/login"
    # Back to the old token (no logout happened): the cookie is good again, so the refusal was the key's doing.
    assert (await replay(deps_for(world, token=API_TOKEN), cookie)).status_code == 200


def test_redirect_targets_and_https_detection() -> None:
    assert safe_next("/findings?status=all") == "/findings?status=all"
    for bad in (None, "", "https://evil.example/", "//evil.example/", "/\\evil", "evil", "/a\nb", "/a b"):
        assert safe_next(bad) == "/", bad
    assert is_https("https", None) and is_https("http", "https") and is_https("http", "HTTPS, http")
    assert not is_https("http", None) and not is_https("http", "http, https")


async def test_run_audit_now_needs_the_csrf_token_of_the_session(world: World) -> None:
    calls: list[int] = []

    async def trigger() -> str | None:
        calls.append(1)
        return "run-from-web"

    deps = deps_for(world, token=API_TOKEN, trigger=trigger)
    async with web_client(deps) as web, web_client(deps) as other:
        assert (await web.post("/audit", data={"csrf": "x"})).status_code == 403  # no session at all
        await login(web)
        await login(other)
        html = (await web.get("/")).text
        csrf = re.search(r'<form method="post" action="/audit" class="audit-now">\s*'
                         r'<input type="hidden" name="csrf" value="([^"]+)">', html).group(1)  # type: ignore[union-attr]
        theirs = re.search(r'name="csrf" value="([^"]+)"', (await other.get("/")).text).group(1)  # type: ignore
        for data in ({}, {"csrf": ""}, {"csrf": ("B" if csrf[0] == "A" else "A") + csrf[1:]}, {"csrf": theirs}):
            response = await web.post("/audit", data=data)
            assert response.status_code == 403, data
            assert "CSRF" in response.text and response.headers["content-security-policy"] == CSP
        assert calls == []
        # A logout without the token is refused too (the session stays).
        assert (await web.post("/logout", data={})).status_code == 403
        assert (await web.get("/")).status_code == 200
        ok = await web.post("/audit", data={"csrf": csrf})
        assert ok.status_code == 303 and ok.headers["location"] == "/runs?audit=started&run=run-from-web"
        assert calls == [1]
        started = await web.get(ok.headers["location"])
        assert "Audit run <span class=\"id\">run-from-web</span> started" in started.text
        # An oversized or non-form body is refused before anything else.
        assert (await web.post("/audit", content=b"csrf=" + b"x" * 10_000,
                               headers={"content-type": "application/x-www-form-urlencoded"})).status_code == 400
        assert (await web.post("/audit", json={"csrf": csrf})).status_code == 400


async def test_open_dashboard_without_a_token_still_needs_csrf(world: World) -> None:
    calls: list[int] = []

    async def trigger() -> str | None:
        calls.append(1)
        return None  # a cycle is already running

    async with web_client(deps_for(world, trigger=trigger)) as web:
        first = await web.get("/")
        assert first.status_code == 200 and "Log out" not in first.text
        attrs = cookie_attrs(first)
        assert "httponly" in attrs and attrs["samesite"].lower() == "strict"
        assert (await web.get("/login")).status_code == 303
        assert (await web.post("/audit", data={})).status_code == 403
        csrf = re.search(r'name="csrf" value="([^"]+)"', first.text).group(1)  # type: ignore[union-attr]
        busy = await web.post("/audit", data={"csrf": csrf})
        assert busy.status_code == 303 and busy.headers["location"] == "/runs?audit=busy" and calls == [1]
    async with web_client(deps_for(world, trigger=trigger)) as fresh:
        assert (await fresh.post("/audit", data={"csrf": csrf})).status_code == 403  # not its session


async def test_no_secret_in_any_page(world: World) -> None:
    # A delivery attempt to the closed port records an error on the hook's entries.
    await deliver_due(world.runtime)
    secrets = [API_TOKEN, "fake-token", HOOK_URL, "secret-path-5b1e", SLACK_URL, "slack-secret-c9d2",
               world.settings.database.url.get_secret_value()]
    async with web_client(deps_for(world, token=API_TOKEN)) as web:
        login_page = await web.get("/login")
        wrong = await web.post("/login", data={"token": API_TOKEN + "-almost"})
        ok = await login(web)
        disks = [d["disk_id"] for d in (await web.get("/api/v1/report", headers=AUTH)).json()["disks"]]
        bodies = [login_page.text, wrong.text, ok.text, *[(await web.get(p)).text for p in PAGES],
                  *[(await web.get(f"/disks/{d}")).text for d in disks]]
        notes = (await web.get("/notifications")).text
    assert "transport error" in notes or "HTTP" in notes  # the error is shown, without its URL
    for body in bodies:
        for secret in secrets:
            assert secret not in body
    assert all(API_TOKEN not in v for v in ok.headers.get_list("set-cookie"))


# ---- charts ----------------------------------------------------------------------------------------------


def point(at: datetime, *, status: str = "complete", total: int = 10, compliant: int = 8,
          open_by_severity: dict[str, int] | None = None) -> RunPoint:
    return RunPoint(run_id=at.isoformat(), started_at=at, finished_at=at, status=status, disks_total=total,
                    compliant=compliant, noncompliant=total - compliant, unknown=0,
                    open_by_severity=open_by_severity if open_by_severity is not None else {"high": 2},
                    requests=5, duration_seconds=1.0)


def test_charts_have_a_point_per_run_and_shade_gaps() -> None:
    end = datetime(2030, 1, 8, tzinfo=UTC)
    start = end - timedelta(days=7)
    at = [end - timedelta(hours=h) for h in (30, 29, 28, 10, 9, 1)]
    runs = [point(at[0]), point(at[1], compliant=5), point(at[2], status="failed", total=0),
            point(at[3], open_by_severity={"critical": 1, "high": 7}), point(at[4]), point(at[5], compliant=10)]
    chart = compliance_chart(runs, start=start, end=end, gap=timedelta(hours=2))
    assert len(chart.marks) == len(runs) and chart.runs == 6
    assert [m.css for m in chart.marks].count("point point-failed") == 1
    # Lines break at the failed run and at the 18 h and 8 h gaps: [0, 1] [3, 4] [5].
    assert [line.vertices for line in chart.lines] == [2, 2, 1]
    # No data: before the first run, the two gaps, and nothing after the last run (1 h < 2 h).
    assert len(chart.bands) == 3 and chart.bands[0].x == chart.left
    assert chart.marks[-1].y == chart.top and chart.marks[1].y > chart.marks[0].y  # 100 % at the top
    severity = severity_chart(runs, start=start, end=end, gap=timedelta(hours=2))
    assert [t.label for t in severity.y_ticks] == ["0", "2", "4", "6", "8"]
    assert {line.css for line in severity.lines} == {"line-critical", "line-high", "line-medium", "line-low"}
    assert "1 critical, 2 high" not in severity.desc and "0 critical, 2 high, 0 medium, 0 low" in severity.desc
    many = [point(end - timedelta(minutes=5 * i)) for i in range(MAX_MARKS + 1)]
    big = compliance_chart(many, start=start, end=end, gap=timedelta(hours=2))
    assert big.marks == [] and sum(line.vertices for line in big.lines) == len(many)
    assert compliance_pct(0, 0) is None and compliance_pct(2, 3) == pytest.approx(66.667, abs=0.001)


def test_charts_keep_one_vertex_per_pixel_column_when_runs_outnumber_them() -> None:
    end = datetime(2030, 4, 1, tzinfo=UTC)
    start = end - timedelta(days=90)
    runs = [point(start + timedelta(minutes=64 * i), compliant=2 if i == 1000 else 8,
                  open_by_severity={"high": 9 if i == 1500 else 2}) for i in range(2000)]
    chart = compliance_chart(runs, start=start, end=end, gap=timedelta(hours=2))
    vertices = sum(line.vertices for line in chart.lines)
    assert len(runs) > COLUMNS >= vertices > COLUMNS - 10 and chart.runs == len(runs)
    xs = [float(p.split(",")[0]) for line in chart.lines for p in line.points.split()]
    assert len({int(x) for x in xs}) == len(xs)  # one vertex per pixel column
    ys = [float(p.split(",")[1]) for line in chart.lines for p in line.points.split()]
    assert max(ys) == round(chart.bottom - 0.2 * (chart.bottom - chart.top), 1)  # the 20 % dip is still drawn
    severity = severity_chart(runs, start=start, end=end, gap=timedelta(hours=2))
    high = next(line for line in severity.lines if line.css == "line-high")
    assert high.vertices <= COLUMNS and severity.y_ticks[-1].label == "12"
    assert min(float(p.split(",")[1]) for p in high.points.split()) < max(
        float(p.split(",")[1]) for p in high.points.split())  # the spike to 9 is still drawn


# ---- a real browser --------------------------------------------------------------------------------------


class _QuietServer(uvicorn.Server):
    # The test process owns its signals, as the daemon does.
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class Dashboard:
    """The dashboard served by uvicorn on a loopback port from a thread that also owns the store and the fleet."""

    url: str
    loop: asyncio.AbstractEventLoop
    world: World
    runner: CycleRunner

    def call(self, coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def api(self, path: str, **params: Any) -> Any:
        response = httpx.get(f"{self.url}{path}", params=params, headers=AUTH, timeout=10)
        response.raise_for_status()
        return response.json()


async def _history(runtime: Any, fleet: Any, clock: list[datetime | None]) -> None:
    """Eleven runs six hours apart up to now, the fleet changing on the way (fixes, a fault, a removed policy)."""
    now = utcnow()
    for k in range(10, -1, -1):
        clock[0] = now - timedelta(hours=6 * k) if k else None
        if k == 7:
            fleet.update_policy(fake_id("dbp", "demo:legacy-db-data"), retention=30)
        if k == 5:
            fleet.remove_policy(fake_id("dbp", "demo:wiki-data"))
        if k == 3:
            fleet.faults[fake_id("disk", "demo:partner-web-system")] = Fault.FORBIDDEN
        if k == 2:
            del fleet.faults[fake_id("disk", "demo:partner-web-system")]
            fleet.update_policy(fake_id("dbp", "demo:metrics-cache"), retention=168)
        await run_cycle(runtime, trigger="schedule")


@contextlib.contextmanager
def _served(build: Callable[[contextlib.AsyncExitStack], Awaitable[tuple[Any, T]]]
            ) -> Iterator[tuple[str, asyncio.AbstractEventLoop, T]]:
    """Runs `build` (which returns an ASGI app and what else the test needs) and uvicorn serving that app on a
    loopback port, both in one thread's event loop (the store's engine belongs to it); yields the URL, the loop and
    what `build` gave."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="dashboard", daemon=True)
    thread.start()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    stack = contextlib.AsyncExitStack()

    async def start() -> tuple[T, _QuietServer, concurrent.futures.Future[None] | asyncio.Task[None]]:
        app, extra = await build(stack)
        server = _QuietServer(uvicorn.Config(app, lifespan="off", log_level="warning", access_log=False,
                                             timeout_graceful_shutdown=1))
        serving = asyncio.ensure_future(server.serve(sockets=[sock]))
        while not server.started:
            await asyncio.sleep(0.01)
        return extra, server, serving

    extra, server, serving = asyncio.run_coroutine_threadsafe(start(), loop).result(120)
    try:
        yield url, loop, extra
    finally:
        async def stop() -> None:
            server.should_exit = True
            await asyncio.wait_for(asyncio.shield(serving), 10)  # type: ignore[arg-type]
            await stack.aclose()

        asyncio.run_coroutine_threadsafe(stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        sock.close()


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dashboard]:
    db = tmp_path_factory.mktemp("dashboard") / "auditor.db"
    clock: list[datetime | None] = [None]

    async def build(stack: contextlib.AsyncExitStack) -> tuple[Any, tuple[World, CycleRunner]]:
        fleet, targets = demo_fleet(now=int(time.time()))
        fleet.rate_limit_per_minute = 100_000
        settings = web_settings(f"sqlite:///{db}", targets, interval="6h")
        runtime = await stack.enter_async_context(open_services(
            settings, transport=httpx.ASGITransport(app=fake_app(fleet)), token="fake-token",
            clock=lambda: clock[0] or utcnow()))
        await _history(runtime, fleet, clock)
        world = World(fleet, settings, runtime)
        cycles = CycleMetrics()
        runner = CycleRunner(runtime, cycles=cycles)
        return create_app(deps_for(world, token=API_TOKEN, trigger=runner.trigger, cycles=cycles)), (world, runner)

    with _served(build) as (url, loop, (world, runner)):
        yield Dashboard(url, loop, world, runner)


# Three disks whose daily policies run every 1, 2 and 3 days (frequency), audited every 12 hours for a week: their
# observed RPOs are 1, 2 and 3 days, so the fleet's p50 (2 days) differs from its p95 and max (3 days).
RPO_T0 = datetime(2025, 3, 1, tzinfo=UTC)
RPO_DISKS = {f"disk_rpoeverydays{n:04d}": n for n in (1, 2, 3)}


@pytest.fixture(scope="module")
def rpo_dashboard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The dashboard of a fleet whose policies' runs were observed (RPOs 1, 2 and 3 days); yields its URL."""
    db = tmp_path_factory.mktemp("rpo-dashboard") / "auditor.db"
    clock = [RPO_T0]
    fleet = Fleet(rate_limit_per_minute=100_000, schedule_clock=lambda: clock[0].timestamp())
    org = fleet.add_org("rpo", id="org_rpodashboard0001")
    for disk_id, every in RPO_DISKS.items():
        fleet.add_disk(org.id, disk_id.removeprefix("disk_"), id=disk_id)
        fleet.add_policy(disk_id, id=disk_id.replace("disk_", "dbp_"), retention=14, interval="daily",
                         next_invocation_at=int((RPO_T0 + timedelta(hours=1)).timestamp()), frequency=every,
                         growth=1.0)

    async def build(stack: contextlib.AsyncExitStack) -> tuple[Any, None]:
        settings = Settings(**{
            "katapult": {"api_url": KATAPULT, "per_page": 10, "max_requests_per_minute": 60000, "max_attempts": 2},
            "database": {"url": f"sqlite:///{db}"}, "audit": {"interval": "12h", "organizations": [org.id]}})
        runtime = await stack.enter_async_context(open_services(
            settings, transport=httpx.ASGITransport(app=fake_app(fleet)), token="fake-token",
            clock=lambda: clock[0]))
        for n in range(15):
            clock[0] = RPO_T0 + n * timedelta(hours=12)
            assert (await run_cycle(runtime, trigger="schedule")).status is RunStatus.COMPLETE
        return create_app(ApiDeps(services=runtime, trigger=_no_trigger, token=SecretStr(API_TOKEN))), None

    with _served(build) as (url, _, _):
        yield url


@pytest.fixture
def page(browser: Any, dashboard: Dashboard) -> Iterator[Any]:
    """A logged-in page at 1280 × 900."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, base_url=dashboard.url)
    tab = context.new_page()
    tab.goto("/login")
    tab.fill("#token", API_TOKEN)
    tab.click("form.login button[type=submit]")
    tab.wait_for_url(f"{dashboard.url}/")
    try:
        yield tab
    finally:
        context.close()


def shot(page: Any, path: Path, *, full_page: bool = True) -> None:
    page.screenshot(path=str(path), full_page=full_page)
    assert path.stat().st_size > 1000


@pytest.mark.slow
def test_browser_login_and_logout(browser: Any, dashboard: Dashboard, tmp_path: Path) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 900}, base_url=dashboard.url)
    page = context.new_page()
    try:
        page.goto("/findings?status=all")
        assert page.url == f"{dashboard.url}/login?next=%2Ffindings%3Fstatus%3Dall"
        # The form is ready to type into (autofocus lands once the page has loaded: wait for it, up to 5 s).
        page.wait_for_function("document.activeElement && document.activeElement.id === 'token'", timeout=5000)
        page.fill("#token", "not-the-token")
        page.keyboard.press("Enter")
        assert page.locator("#login-error").inner_text() == "That is not the API token."
        assert context.cookies() == []
        page.fill("#token", API_TOKEN)
        page.keyboard.press("Enter")
        page.wait_for_url(f"{dashboard.url}/findings?status=all")
        [cookie] = context.cookies()
        assert cookie["name"] == SESSION_COOKIE and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert API_TOKEN not in cookie["value"] and 11.9 * 3600 < cookie["expires"] - time.time() <= 12 * 3600
        assert page.evaluate("document.cookie") == ""  # HttpOnly: scripts cannot read it
        shot(page, tmp_path / "logged-in.png")
        page.click("form.logout button")
        page.wait_for_url(f"{dashboard.url}/login")
        assert context.cookies() == []
        page.goto("/")
        assert page.url.startswith(f"{dashboard.url}/login")
        shot(page, tmp_path / "logged-out.png")
    finally:
        context.close()


@pytest.mark.slow
def test_browser_overview_numbers_equal_the_api(page: Any, dashboard: Dashboard, tmp_path: Path) -> None:
    page.goto("/")
    report = dashboard.api("/api/v1/report")
    s = report["summary"]
    shown = {key: page.locator(f'[data-metric="{key}"]').inner_text().strip()
             for key in ("disks_total", "compliant", "noncompliant", "unknown", "open_findings", "waived_findings")}
    assert shown == {key: str(s[key]) for key in shown}
    for sev in ("critical", "high", "medium", "low"):
        assert page.locator(f'[data-metric="by_severity.{sev}"]').inner_text() == str(s["by_severity"].get(sev, 0))
    assert page.locator('[data-metric="last_run.id"]').inner_text() == report["last_run"]["id"]
    assert page.locator("[data-banner]").count() == 0
    shot(page, tmp_path / "overview.png")
    if os.environ.get("AUDITOR_SCREENSHOTS") == "1":
        shot(page, ROOT / "docs" / "overview.png")
    # Keyboard: the first Tab reaches the skip link, which moves focus to the content.
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.className") == "skip"
    page.keyboard.press("Enter")
    assert page.evaluate("document.activeElement.id") == "main"


@pytest.mark.slow
def test_browser_filters_change_the_findings_table(page: Any, dashboard: Dashboard, tmp_path: Path) -> None:
    page.goto("/findings")
    table = page.locator("table.findings tbody tr")
    everything = table.count()
    assert everything == len(dashboard.api("/api/v1/findings", limit=1000)["findings"]) > 5
    page.select_option("#f-severity", "high")
    page.click("form.filters button[type=submit]")
    page.wait_for_url("**/findings?*severity=high*")
    high = dashboard.api("/api/v1/findings", severity="high", limit=1000)["findings"]
    assert 0 < table.count() == len(high) < everything
    assert set(page.locator("table.findings .sev").all_inner_texts()) == {"high"}
    names = {d["disk_id"]: d["name"] or "" for d in dashboard.api("/api/v1/report")["disks"]}
    needle = high[0]["disk_id"][-7:].upper()  # any case matches
    page.fill("#f-disk", needle)
    page.keyboard.press("Enter")  # submitting from the keyboard
    page.wait_for_url(lambda url: f"disk={needle}" in url)
    mine = [f for f in high if needle.lower() in f"{f['disk_id']} {names.get(f['disk_id'], '')}".lower()]
    assert 0 < table.count() == len(mine) < len(high)
    page.select_option("#f-severity", "")
    page.fill("#f-disk", "")
    page.select_option("#f-status", "resolved")
    page.click("form.filters button[type=submit]")
    page.wait_for_url("**status=resolved*")
    resolved = dashboard.api("/api/v1/findings", status="resolved", limit=1000)["findings"]
    assert table.count() == len(resolved) > 0
    assert set(page.locator("table.findings .status").all_inner_texts()) == {"resolved"}
    shot(page, tmp_path / "findings.png")
    page.locator("table.findings tbody tr a[href^='/disks/']").first.click()
    page.wait_for_url("**/disks/*")
    assert page.locator("h1").inner_text().startswith("Disk")


@pytest.mark.slow
def test_browser_trend_chart_has_one_point_per_run(page: Any, dashboard: Dashboard, tmp_path: Path) -> None:
    page.goto("/?days=7")
    runs = dashboard.api("/api/v1/runs", limit=500)["runs"]
    points = page.locator("#chart-compliance circle.point")
    assert points.count() == len(runs) >= 11
    assert page.locator("#chart-compliance circle.point-failed").count() == sum(r["status"] == "failed"
                                                                                 for r in runs)
    vertices = page.locator("#chart-compliance polyline").evaluate_all(
        "ls => ls.reduce((n, l) => n + l.points.numberOfItems, 0)")
    assert vertices == sum(r["status"] != "failed" for r in runs)
    assert page.locator("#chart-severity polyline.line-high").count() >= 1
    page.click("nav.tabs a[href='/?days=30']")
    assert page.locator("nav.tabs a[aria-current=page]").inner_text() == "30 days"
    assert page.locator("#chart-compliance circle.point").count() == len(runs)
    page.locator("#chart-compliance").screenshot(path=str(tmp_path / "trend.png"))


@pytest.mark.slow
def test_browser_disk_page_shows_drift_after_a_policy_change(page: Any, dashboard: Dashboard,
                                                             tmp_path: Path) -> None:
    disk = fake_id("disk", "demo:git-repos")
    page.goto(f"/disks/{disk}")
    assert page.locator("[data-drift]").count() == 0
    before = len(dashboard.api("/api/v1/runs", limit=500)["runs"])

    async def change() -> None:
        dashboard.world.fleet.update_policy(fake_id("dbp", "demo:git-repos"), retention=3, interval="weekly")

    dashboard.call(change())
    page.goto("/")
    page.click("form.audit-now button")  # a real "Run audit now": POST with the page's CSRF token
    page.wait_for_url("**/runs?audit=started*")
    assert "started" in page.locator("[role=status]").inner_text()
    deadline = time.monotonic() + 20
    while True:
        runs = dashboard.api("/api/v1/runs", limit=500)["runs"]
        if len(runs) > before and runs[0]["status"] != "running":
            break
        assert time.monotonic() < deadline, "the triggered run did not finish"
        time.sleep(0.1)
    assert runs[0]["trigger"] == "api" and runs[0]["status"] == "complete"
    page.goto(f"/disks/{disk}")
    drift = page.locator('[data-drift="policy-changed"]')
    assert drift.count() == 1
    text = drift.inner_text()
    assert "retention 7" in text and "retention 3" in text and "interval weekly" in text
    api = dashboard.api(f"/api/v1/disks/{disk}")
    assert [d["kind"] for d in api["drift"]] == ["policy-changed"]
    assert page.locator('[data-metric="snapshots"]').inner_text() == str(len(api["snapshots"])) == "2"
    shot(page, tmp_path / "disk.png")


@pytest.mark.slow
def test_browser_post_without_csrf_is_rejected(page: Any, dashboard: Dashboard, tmp_path: Path) -> None:
    before = len(dashboard.api("/api/v1/runs", limit=500)["runs"])
    # The browser's own session cookie, but no token in the form.
    for form in ({}, {"csrf": "forged"}):
        response = page.request.post(f"{dashboard.url}/audit", form=form, max_redirects=0)
        assert response.status == 403, form
    # The page's form with its hidden token removed, submitted by the user.
    page.goto("/runs")
    page.locator("form.audit-now input[name=csrf]").evaluate("e => e.remove()")
    page.click("form.audit-now button")
    assert page.locator("h1").inner_text() == "Forbidden"
    assert "CSRF" in page.locator("[role=alert]").inner_text()
    shot(page, tmp_path / "forbidden.png")
    assert len(dashboard.api("/api/v1/runs", limit=500)["runs"]) == before


@pytest.mark.slow
def test_browser_pages_fit_375px_without_horizontal_scroll(browser: Any, dashboard: Dashboard,
                                                          tmp_path: Path) -> None:
    context = browser.new_context(viewport={"width": 375, "height": 812}, base_url=dashboard.url)
    page = context.new_page()
    try:
        page.goto("/login")
        assert page.evaluate("document.documentElement.scrollWidth") <= 375
        shot(page, tmp_path / "375-login.png")
        page.fill("#token", API_TOKEN)
        page.keyboard.press("Enter")
        page.wait_for_url(f"{dashboard.url}/")
        paths = ["/", "/findings?status=all", "/runs", "/notifications", "/waivers",
                 f"/disks/{fake_id('disk', 'demo:busy-volume')}", f"/disks/{fake_id('disk', 'demo:legacy-db-data')}"]
        for n, path in enumerate(paths):
            page.goto(path)
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= 375, (path, width)
            shot(page, tmp_path / f"375-{n}.png")
    finally:
        context.close()
