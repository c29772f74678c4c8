"""Per-disk audit while the fake lowers X-RateLimit-Permitted mid-run (6,000 -> 1,200/min): 429s, then the new floor.

Same fleet as pacing.py (2,000 disks, 80 ms latency). After half of the cycle's requests the fake starts answering
with the lower limit, and its per-token sliding 60-s window (README "Rate limits": requests per minute for the
token) then already holds every request of the last minute. The cycle is the `run_cycle` use case run in this
process; arrival times come from the fake's own clock (CLOCK_MONOTONIC, shared by both processes).

The new floor for the rest of the cycle, from the first request answered with the lower limit to the last request,
is the larger of
* the rate floor: requests after the change / the new rate (the issue's "requests / permitted rate"), and
* the window floor: the earliest any client could finish those requests under the fake's real rule (at most
  `permitted` arrivals in any 60-s window, counting the requests already made), found by sending each request at
  the first instant the window allows it.
"""

from __future__ import annotations

import asyncio
import bisect
import sys
from typing import Any

import _common as c
from pacing import _audit

TARGET_429 = 3
TARGET_RATIO = 1.15
WINDOW = 60.0


def window_floor(before: list[float], *, start: float, count: int, permitted: int) -> float:
    """Returns when the last of `count` requests can arrive at the earliest, starting at `start`.

    `before` holds the arrival times of the admitted requests made before `start` (ascending). A request may arrive
    at t when fewer than `permitted` admitted arrivals lie in (t - 60, t].
    """
    times = list(before)
    t = start
    for _ in range(count):
        while True:
            # Arrivals in (t - WINDOW, t]: everything after index lo.
            lo = bisect.bisect_right(times, t - WINDOW)
            in_window = len(times) - lo
            if in_window < permitted:
                break
            # Wait until the oldest arrivals that must age out have done so.
            t = times[lo + in_window - permitted] + WINDOW + 1e-6
        times.append(t)
    return t


def main() -> int:
    p = c.parser(__doc__.splitlines()[0])
    p.add_argument("--disks", type=int, default=2000)
    p.add_argument("--latency-ms", type=float, default=80.0)
    p.add_argument("--rate", type=int, default=6000, help="requests/minute permitted at first (and configured)")
    p.add_argument("--lowered", type=int, default=1200, help="requests/minute permitted after the change")
    p.add_argument("--change-after", type=int, default=0,
                   help="requests served before the limit drops (default: half of the expected requests)")
    p.add_argument("--concurrency", type=int, default=0)
    args = p.parse_args()
    concurrency = args.concurrency or c.concurrency_for(latency_ms=args.latency_ms, rate_per_minute=args.rate)
    fleet = c.generated_fleet(disks=args.disks, rate=args.rate, latency_ms=args.latency_ms)
    disk_ids = list(c.fleet_objects(fleet).disks)
    # read_disk lists a disk's policies and looks the disk up (plus its VM's policies when attached).
    expected = 2 * args.disks
    change_after = args.change_after or expected // 2
    fleet["rate_limit_changes"] = [[change_after, args.lowered]]
    report = c.header("adaptive_limit", args, f"per-disk audit of {args.disks} disks, {args.latency_ms:g} ms "
                                              f"latency, permitted {args.rate}/min, dropping to {args.lowered}/min "
                                              f"after {change_after} requests; max_concurrency {concurrency}; "
                                              f"run_cycle in-process")

    with c.workdir(args) as tmp, c.database(args, tmp) as db, c.FakeKatapult(fleet, directory=tmp, record=True) as fake:
        settings = c.settings(api_url=fake.url, db_url=db.url, disks=disk_ids, rate=args.rate,
                              concurrency=concurrency)
        outcome, watch = asyncio.run(_audit(settings, fake.token))
    arrivals = fake.stats.arrivals
    _report(report, args, outcome, watch, arrivals, fake.stats)
    return 0


def _report(report: c.Report, args: Any, outcome: Any, watch: c.Stopwatch,
            arrivals: list[tuple[float, int, bool]], stats: c.FakeStats) -> None:
    changed = next((i for i, (_, permitted, _) in enumerate(arrivals) if permitted == args.lowered), None)
    complete = outcome.status.value == "complete"
    report.info("cycle", f"status {outcome.status.value}, {outcome.disks_ok} disks read, {outcome.stats.requests} "
                         f"requests, {outcome.stats.retries} retries, wall {watch.seconds:.1f} s")
    report.result("completes", target="complete", measured=outcome.status.value, passed=complete)
    rate_limited = outcome.stats.rate_limited
    refused = [t for t, _, ok in arrivals if not ok]
    if refused:
        # The fake answers after its latency sleep, right when it decides: a request decided at t was sent at
        # t - latency, so one decided later than first refusal + latency was sent after the client had been told.
        latency = args.latency_ms / 1000
        late = [t for t in refused if t > refused[0] + latency + 0.005]
        offsets = ", ".join(f"+{(t - refused[0]) * 1000:.0f}" for t in refused[:12])
        report.info("429s", f"refused at {offsets} ms after the first one; {len(refused) - len(late)} were already "
                            f"on the wire when the first 429 reached the client (about latency x rate = "
                            f"{latency * args.rate / 60:.0f}), {len(late)} were sent after it")
    report.result("429s received", target=f"<= {TARGET_429}",
                  measured=f"{rate_limited} (server: {stats.rate_limited})", passed=rate_limited <= TARGET_429)
    if changed is None:
        report.result("time after the change vs new floor", target=f"<= {TARGET_RATIO:.2f}x new floor",
                      measured="the limit never changed (too few requests)", passed=None)
        return
    t_change = arrivals[changed][0]
    before = [t for t, _, ok in arrivals[:changed] if ok]
    after = [t for t, _, ok in arrivals[changed:] if ok]
    t_first = arrivals[0][0]
    measured = after[-1] - t_change
    rate_floor = len(after) / (args.lowered / 60)
    win_floor = window_floor(before, start=t_change, count=len(after), permitted=args.lowered) - t_change
    floor = max(rate_floor, win_floor)
    ratio = measured / floor
    in_window = sum(1 for t in before if t > t_change - WINDOW)
    report.info("change", f"limit lowered at request {changed + 1}, {t_change - t_first:.1f} s into the cycle, with "
                          f"{in_window} requests already in the fake's 60-s window")
    report.info("after the change", f"{len(after)} requests in {measured:.1f} s (first request at the new limit to "
                                    f"the last request, server clock)")
    report.info("new floor", f"max(rate floor {rate_floor:.1f} s = {len(after)} / {args.lowered}/min, window floor "
                             f"{win_floor:.1f} s) = {floor:.1f} s")
    # Where the time went after the change: gaps longer than 1 s are waits for the window.
    waits = [(b - a) for a, b in zip(after, after[1:], strict=False) if b - a > 1.0]
    first_wait = after[0] - t_change if after else 0.0
    if waits or first_wait > 1.0:
        report.info("waits", f"{first_wait:.1f} s before the first admitted request after the change; "
                             f"{len(waits)} pause(s) over 1 s totalling {sum(waits):.1f} s")
    sent_after_wait = _steady_rate(after)
    if sent_after_wait:
        report.info("pace after waiting", f"{sent_after_wait:.0f} requests/min over the last 80% of the requests "
                                          f"after the change")
    report.result("time after the change vs new floor", target=f"<= {TARGET_RATIO:.2f}x new floor",
                  measured=f"{c.fmt_ratio(ratio)} ({measured:.1f} s / {floor:.1f} s)", passed=ratio <= TARGET_RATIO)


def _steady_rate(times: list[float]) -> float:
    """Returns the request rate per minute over the last 80% of `times`."""
    if len(times) < 10:
        return 0.0
    tail = times[len(times) // 5:]
    span = tail[-1] - tail[0]
    return (len(tail) - 1) / span * 60 if span > 0 else 0.0


if __name__ == "__main__":
    sys.exit(main())
