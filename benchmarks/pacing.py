"""Per-disk audit at the API's rate limit: cycle wall time against the floor (requests / permitted rate), 429s.

Default: 2,000 disks, 80 ms latency, 6,000 requests/minute permitted (about 20 s). The foundation issue's case is
`--disks 500 --latency-ms 100 --rate 1200` (a 25 s floor). The fake Katapult runs in its own process on a loopback
socket; the cycle is the `run_cycle` use case run in this process (the same code `auditor audit --once` runs,
without interpreter start-up and migrations), with a real database.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import _common as c

TARGET_RATIO = 1.10


def main() -> int:
    p = c.parser(__doc__.splitlines()[0])
    p.add_argument("--disks", type=int, default=2000)
    p.add_argument("--latency-ms", type=float, default=80.0)
    p.add_argument("--rate", type=int, default=6000, help="requests/minute the fake permits (and the config allows)")
    p.add_argument("--concurrency", type=int, default=0, help="katapult.max_concurrency (default: 2 x latency x rate)")
    p.add_argument("--vm-share", type=float, default=0.0,
                   help="share of disks covered only by a VM policy (each costs 3 requests instead of 1)")
    args = p.parse_args()
    concurrency = args.concurrency or c.concurrency_for(latency_ms=args.latency_ms, rate_per_minute=args.rate)
    report = c.header("pacing", args, f"per-disk audit of {args.disks} disks, {args.latency_ms:g} ms latency, "
                                      f"{args.rate}/min permitted, max_concurrency {concurrency}; "
                                      f"run_cycle in-process")
    fleet = c.generated_fleet(disks=args.disks, vm_share=args.vm_share, rate=args.rate, latency_ms=args.latency_ms)
    disk_ids = list(c.fleet_objects(fleet).disks)

    with c.workdir(args) as tmp, c.database(args, tmp) as db, c.FakeKatapult(fleet, directory=tmp, record=True) as fake:
        settings = c.settings(api_url=fake.url, db_url=db.url, disks=disk_ids, rate=args.rate,
                              concurrency=concurrency)
        outcome, watch = asyncio.run(_audit(settings, fake.token))
    stats = fake.stats

    requests = outcome.stats.requests
    floor = requests / (args.rate / 60)
    ratio = watch.seconds / floor
    admitted = [t for t, _, ok in stats.arrivals if ok]
    span = admitted[-1] - admitted[0] if len(admitted) > 1 else 0.0
    report.info("cycle", f"status {outcome.status.value}, {outcome.disks_ok} disks read, {requests} requests "
                         f"({outcome.stats.retries} retries), {sum(outcome.open_findings.values())} open findings")
    report.info("floor", f"{requests} requests / {args.rate}/min = {floor:.2f} s")
    report.info("server-side span", f"first to last request arrival {span:.2f} s "
                                    f"({(len(admitted) - 1) / span * 60 if span else 0:.0f}/min); "
                                    f"{stats.total} requests served")
    report.info("process CPU", f"{watch.cpu_seconds:.2f} s of CPU in the auditor's process for the cycle")
    report.result("wall time vs floor", target=f"<= {TARGET_RATIO:.2f}x floor",
                  measured=f"{c.fmt_ratio(ratio)} ({watch.seconds:.2f} s / {floor:.2f} s)",
                  passed=ratio <= TARGET_RATIO)
    report.result("429s received", target="0", measured=f"{outcome.stats.rate_limited} (server: {stats.rate_limited})",
                  passed=outcome.stats.rate_limited == 0 and stats.rate_limited == 0)
    ok = outcome.status.value == "complete"
    report.result("cycle complete", target="complete", measured=outcome.status.value, passed=ok)
    return 0


async def _audit(settings: Any, token: str) -> tuple[Any, c.Stopwatch]:
    from auditor.service import open_services
    from auditor.service.cycle import run_cycle

    async with open_services(settings, token=token) as services:
        with c.Stopwatch() as watch:
            outcome = await run_cycle(services, trigger="benchmark")
    return outcome, watch


if __name__ == "__main__":
    sys.exit(main())
