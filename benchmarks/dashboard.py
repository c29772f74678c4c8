"""The web dashboard under load: GET / (overview) and /findings at 10,000 disks / 3,000 open findings / 2,000 runs.

Served the way it is deployed, as report_api.py does: `auditor run` (the daemon) in its own process on a loopback
port over a real database, its first cycle auditing a fake Katapult (its own process) whose organization has
10,000 disks, 1,500 without a policy and 1,500 with a weekly one (3,000 open findings). `api.token` is set, so the
dashboard is guarded: each client logs in once (POST /login with the token) and sends its session cookie.

History: once the first cycle has finished, 1,999 earlier runs are written straight into the database (one
`audit_runs` and one `run_summaries` row each, numbered below the real run so it stays the latest), evenly spread
over the 90 days before it (one every ~65 min; 1 % failed, 3 % partial, the fleet figures wandering around the
real run's). With the real one that is 2,000 runs of history, all inside the overview's 90-day trend. The audit
interval is 1 h, so the charts draw continuous lines (no gap longer than twice the interval) and no second cycle
runs while the pages are measured. The dashboard reads its snapshot of the data (report, trend history, findings)
on the first page request after a run, so no page is asked for before the history is written; that first request
is timed alone, with /healthz asked back to back on another connection meanwhile (is the event loop held up?).

Then 20 clients (one keep-alive connection each, the minimal HTTP/1.1 client of _common.py, as report_api.py,
with cookies) request one page back to back for 15 s. Overview clients rotate over its three trend windows (`/` is
7 days, then `?days=30` and `?days=90`); findings clients rotate over paged views (default order, by disk, by
first seen, a rule, a severity, a disk-name search, the organization, 100 a page, every status), each on a
different page. Latency is from sending a request to having read its whole body; every answer must be a 200.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
import uuid
from datetime import timedelta
from typing import Any
from urllib.parse import quote, urlencode

import _common as c

TARGET_P99_MS = 100.0
TOKEN = "bench-dashboard-token"
HISTORY_DAYS = 90
OVERVIEW_VIEWS = ("/", "/?days=30", "/?days=90")
HTML = "text/html"


async def login(daemon: c.Daemon) -> str:
    """Logs in with the API token (POST /login) and returns the `Cookie` header value of the session."""
    conn = daemon.connection(accept=HTML)
    try:
        status, headers, _ = await conn.request(
            "POST", "/login", headers={"Content-Type": "application/x-www-form-urlencoded"},
            body=urlencode({"token": TOKEN, "next": "/"}).encode())
    finally:
        await conn.close()
    cookies = [v.split(";", 1)[0] for v in headers.get("set-cookie", []) if v.startswith("auditor_session=")]
    if status != 303 or not cookies:
        raise SystemExit(f"POST /login answered {status} without a session cookie")
    return cookies[0]


async def add_history(db_url: str, *, runs: int, days: int, seed: int = 3) -> tuple[int, list[str]]:
    """Writes `runs` synthetic earlier runs (audit_runs + run_summaries) before the real one, spread evenly over
    `days`; returns how many summaries the table then holds and the audited disks' sources."""
    from sqlalchemy import func, insert, select

    from auditor.store.repo import Store
    from auditor.store.tables import disks, run_summaries, runs

    store = Store.from_url(db_url)
    try:
        async with store.engine.begin() as conn:
            real = (await conn.execute(select(run_summaries))).mappings().one()
            first_seq = (await conn.execute(select(func.min(runs.c.seq)))).scalar_one()
            sources = [str(s) for s in (await conn.execute(select(disks.c.source).distinct())).scalars()]
        rng = random.Random(seed)
        step = timedelta(days=days) / runs
        summaries, run_rows = [], []
        compliant = real["disks_compliant"]
        total = real["disks_total"]
        for k in range(1, runs):
            started = real["started_at"] - k * step
            roll = rng.random()
            status = "failed" if roll < 0.01 else "partial" if roll < 0.04 else "complete"
            compliant = max(0, min(total, compliant + rng.randint(-40, 40)))
            unknown = rng.randint(1, 200) if status == "partial" else 0
            noncompliant = max(0, total - compliant - unknown)
            scale = noncompliant / max(real["disks_noncompliant"], 1)
            duration = real["duration_seconds"] * rng.uniform(0.8, 1.3)
            run_id = uuid.UUID(int=rng.getrandbits(128)).hex
            summaries.append({
                "run_id": run_id, "started_at": started, "finished_at": started + timedelta(seconds=duration),
                "status": status, "disks_total": total if status != "failed" else 0,
                "disks_compliant": compliant if status != "failed" else 0,
                "disks_noncompliant": noncompliant if status != "failed" else 0,
                "disks_unknown": unknown,
                "open_by_severity": {k2: round(v * scale) for k2, v in real["open_by_severity"].items()},
                "open_by_rule": {k2: round(v * scale) for k2, v in real["open_by_rule"].items()},
                "requests": real["requests"], "duration_seconds": duration,
            })
            run_rows.append({
                "id": run_id, "seq": first_seq - k, "trigger": "schedule", "status": status, "started_at": started,
                "finished_at": started + timedelta(seconds=duration), "targets_checked": 1,
                "disks_ok": total - unknown if status != "failed" else 0, "disks_unknown": unknown,
                "api_requests": real["requests"], "api_retries": 0, "api_rate_limited": 0, "api_by_status": {},
                "findings_opened": rng.randint(0, 20), "findings_resolved": rng.randint(0, 20),
                "errors": [{"target": "org", "code": "timeout", "message": "synthetic"}] if status != "complete"
                else [],
            })
        async with store.engine.begin() as conn:
            for k in range(0, len(summaries), 500):
                await conn.execute(insert(run_summaries), summaries[k:k + 500])
                await conn.execute(insert(runs), run_rows[k:k + 500])
        async with store.engine.connect() as conn:
            count = (await conn.execute(select(func.count()).select_from(run_summaries))).scalar_one()
    finally:
        await store.close()
    return int(count), sources


def findings_views(sources: list[str]) -> list[tuple[str, str, int]]:
    """Returns the findings views the clients rotate over: (name, query without page, pages it has)."""
    org = sources[0] if sources else "org:unknown"
    return [
        ("default", "", 60),
        ("by disk", "sort=disk&dir=asc", 60),
        ("by first seen", "sort=first_seen", 60),
        ("rule", "rule=unprotected-disk", 30),
        ("severity", "severity=medium", 30),
        ("disk search", "disk=disk-0{digit}", 6),
        ("organization", f"org={quote(org, safe='')}", 60),
        ("100 a page", "size=100", 30),
        ("every status", "status=all&sort=last_seen", 60),
    ]


async def load(daemon: c.Daemon, page: str, *, cookies: list[str], seconds: float, sources: list[str]) -> c.Load:
    """Runs one closed-loop client per cookie against one page's views for `seconds`; returns what they saw."""
    views = findings_views(sources)

    def next_request(n: int, i: int) -> tuple[str, str, dict[str, str]]:
        headers = {"Cookie": cookies[n]}
        if page == "overview":
            path = OVERVIEW_VIEWS[(n + i) % len(OVERVIEW_VIEWS)]
            return path, path, headers
        name, query, pages = views[(n + i) % len(views)]
        query = query.replace("{digit}", str((n + i) % 10))
        number = (n * 7 + i) % pages + 1
        parts = [p for p in (query, f"page={number}" if number > 1 else "") if p]
        return name, "/findings" + ("?" + "&".join(parts) if parts else ""), headers

    return await c.closed_loop(daemon.host, daemon.port, clients=len(cookies), seconds=seconds,
                               next_request=next_request, accept=HTML)


def main() -> int:
    p = c.parser(__doc__.splitlines()[0])
    p.add_argument("--disks", type=int, default=10_000)
    p.add_argument("--findings", type=int, default=3_000)
    p.add_argument("--runs", type=int, default=2_000, help="runs of history (the real one plus synthetic ones)")
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--seconds", type=float, default=15.0, help="load time per page")
    p.add_argument("--py-spy", metavar="FILE", default=None,
                   help="profile the daemon with py-spy (if installed) into FILE (collapsed stacks)")
    args = p.parse_args()
    report = c.header("dashboard", args, f"{args.disks} disks / {args.findings} open findings / {args.runs} runs, "
                                         f"{args.clients} clients x {args.seconds:g} s per page, `auditor run` "
                                         f"serving")
    if c.missing(report, "auditor.web", figure="overview p99", target=f"<= {TARGET_P99_MS:.0f} ms"):
        return 0
    with c.serving(args, report, disks=args.disks, findings=args.findings, interval="1h", api_token=TOKEN,
                   py_spy=args.py_spy) as (daemon, db):
        phases = asyncio.run(_measure(args, db, daemon, report))
    for page, result in phases:
        c.report_load(report, page, result, target_ms=TARGET_P99_MS,
                      figure="/ (overview)" if page == "overview" else "/findings", views=True)
    return 0


async def _measure(args: Any, db: c.Database, daemon: c.Daemon, report: c.Report) -> list[tuple[str, c.Load]]:
    await daemon.first_cycle(report)
    t0 = time.monotonic()
    summaries, sources = await add_history(db.url, runs=args.runs, days=HISTORY_DAYS)
    report.info("history", f"{summaries} runs in run_summaries (1 real + {summaries - 1} synthetic over "
                           f"{HISTORY_DAYS} days), written in {time.monotonic() - t0:.1f} s")
    cookies = [await login(daemon) for _ in range(args.clients)]
    phases = []
    for page, first in (("overview", "/?days=90"), ("findings", "/findings")):
        # One request first, alone: the size of the page and its unloaded latency. The first one after the run
        # waits for the dashboard's snapshot of the data (built off the event loop): meanwhile another connection
        # asks /healthz back to back, and its slowest answer shows whether the build held the event loop up.
        conn = daemon.connection(accept=HTML)
        alone = []
        for n in range(3):
            done = asyncio.Event()
            probing = asyncio.ensure_future(_probe(daemon, done)) if n == 0 and page == "overview" else None
            t = time.monotonic()
            status, body = await conn.get(first, headers={"Cookie": cookies[0]})
            alone.append(time.monotonic() - t)
            done.set()
            if status != 200:
                raise SystemExit(f"GET {first} answered {status}: {body[:300]!r}")
            if probing is not None:
                probes = await probing
                report.info("event loop during the build", f"while the first {first} waited for the snapshot "
                            f"({alone[0] * 1000:.0f} ms), /healthz answered {len(probes)} times, p50 "
                            f"{c.percentile(probes, 50) * 1000:.1f} ms, max {max(probes, default=0) * 1000:.1f} ms")
        await conn.close()
        report.info(f"{page} page", f"GET {first}: {len(body) / 1e3:.0f} kB of HTML; alone: first "
                                    f"{alone[0] * 1000:.0f} ms, then {min(alone[1:]) * 1000:.0f} ms")
        phases.append((page, await load(daemon, page, cookies=cookies, seconds=args.seconds, sources=sources)))
    return phases


async def _probe(daemon: c.Daemon, done: asyncio.Event) -> list[float]:
    """Asks /healthz back to back until `done`; returns the latencies."""
    conn = daemon.connection(accept=HTML)
    latencies = []
    try:
        while not done.is_set():
            t = time.monotonic()
            await conn.get("/healthz")
            latencies.append(time.monotonic() - t)
    finally:
        await conn.close()
    return latencies


if __name__ == "__main__":
    sys.exit(main())
