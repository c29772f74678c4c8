"""The reports API under load: GET /api/v1/report and /api/v1/findings at 10,000 disks / 3,000 open findings.

The API is served the way it is deployed: `auditor run` (the daemon: scheduler, cycle runner and uvicorn in one
event loop) in its own process, on a loopback port, over a real database. Its first cycle, at start, audits a
fake Katapult (its own process) whose organization has 10,000 disks: 1,500 without any policy and 1,500 with a
weekly policy give 3,000 open findings. The audit interval is a day, so no cycle runs while the API is measured.

Then 20 concurrent clients (one keep-alive connection each, a minimal HTTP/1.1 client so the load generator costs
little CPU on this 2-core machine) request one endpoint back to back for 15 s; /findings clients page through every
open finding with `next_cursor` (100 per page) and start over. Latency is from sending a request to having read
its whole body. Requests still in flight at the end are waited for and counted. A short run of the same load
on /healthz first shows what the HTTP stack alone costs on this machine.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import _common as c

TARGET_P99_MS = 100.0
FINDINGS = "/api/v1/findings"


async def load(daemon: c.Daemon, endpoint: str, *, clients: int, seconds: float) -> c.Load:
    """Runs `clients` closed-loop clients against one endpoint for `seconds` (/findings clients follow
    `next_cursor` and start over after the last page); returns what they saw."""
    cursors: dict[int, str | None] = {}

    def next_request(n: int, i: int) -> tuple[str, str, dict[str, str]]:
        cursor = cursors.get(n)
        return endpoint, f"{endpoint}&cursor={cursor}" if cursor else endpoint, {}

    def answered(n: int, body: bytes) -> None:
        cursors[n] = c.json_body(body).get("next_cursor")

    return await c.closed_loop(daemon.host, daemon.port, clients=clients, seconds=seconds, next_request=next_request,
                               answered=answered if endpoint.startswith(FINDINGS) else None)


def main() -> int:
    p = c.parser(__doc__.splitlines()[0])
    p.add_argument("--disks", type=int, default=10_000)
    p.add_argument("--findings", type=int, default=3_000)
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--seconds", type=float, default=15.0, help="load time per endpoint")
    p.add_argument("--floor-seconds", type=float, default=5.0, help="load time on /healthz (the stack's floor)")
    p.add_argument("--py-spy", metavar="FILE", default=None,
                   help="profile the daemon with py-spy (if installed) into FILE (collapsed stacks)")
    args = p.parse_args()
    report = c.header("report_api", args, f"{args.disks} disks / {args.findings} open findings, {args.clients} "
                                          f"clients x {args.seconds:g} s per endpoint, `auditor run` serving")
    if c.missing(report, "auditor.api", figure="p99 latency", target=f"<= {TARGET_P99_MS:.0f} ms"):
        return 0
    with c.serving(args, report, disks=args.disks, findings=args.findings, interval="24h",
                   py_spy=args.py_spy) as (daemon, _):
        phases = asyncio.run(_measure(args, daemon, report))
    for endpoint, result in phases:
        c.report_load(report, endpoint.split("?")[0], result, target_ms=TARGET_P99_MS)
    return 0


async def _measure(args: Any, daemon: c.Daemon, report: c.Report) -> list[tuple[str, c.Load]]:
    await daemon.first_cycle(report)
    phases = []
    # The same load on /healthz (no database, a tiny body): what the server stack alone costs per request.
    floor = await load(daemon, "/healthz", clients=args.clients, seconds=args.floor_seconds)
    report.info("server floor (/healthz)", f"{len(floor.latencies) / floor.seconds:.0f} req/s, p50 "
                                           f"{c.percentile(floor.latencies, 50) * 1000:.0f} ms, p99 "
                                           f"{c.percentile(floor.latencies, 99) * 1000:.0f} ms with "
                                           f"{args.clients} clients: the HTTP stack's own cost")
    for endpoint in ("/api/v1/report", f"{FINDINGS}?status=open&limit=100"):
        # One request first, alone: the size of the answer and its unloaded latency.
        conn = daemon.connection()
        t0 = time.monotonic()
        status, body = await conn.get(endpoint)
        single = time.monotonic() - t0
        await conn.close()
        if endpoint == "/api/v1/report" and status == 200:
            summary = c.json_body(body)["summary"]
            report.info("report", f"{summary['disks_total']} disks, {summary['open_findings']} open findings, "
                                  f"{len(body) / 1e6:.2f} MB of JSON; alone: {single * 1000:.0f} ms")
        else:
            report.info("findings page", f"{len(body) / 1e3:.0f} kB of JSON; alone: {single * 1000:.0f} ms")
        phases.append((endpoint, await load(daemon, endpoint, clients=args.clients, seconds=args.seconds)))
    return phases


if __name__ == "__main__":
    sys.exit(main())
