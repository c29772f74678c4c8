"""The fake Katapult for benchmarks: `python -m auditor.fake --fleet FILE`, plus its request log on exit.

It serves the same app on a loopback port (`auditor.fake.serve`) and prints the same ready line, so it runs in a
process of its own and never shares a GIL with the auditor being measured. On SIGTERM or SIGINT it stops and
prints one line `fake stats: {json}` with what the server saw: request totals, 429s, counts per endpoint and
status, and (with --record) the arrival time, permitted rate and admission of every request, which lets a
benchmark compute floors from the server's own clock rather than the client's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from auditor.fake.__main__ import serve_until_signal
from auditor.fake.fleet import Fleet


def _record_arrivals(fleet: Fleet, log: list[tuple[float, int, bool]]) -> None:
    """Wraps `fleet.admit` so every rate-limit decision is logged as (clock time, permitted, admitted)."""
    admit = fleet.admit

    def recording_admit(token: str, *, permitted: int) -> tuple[bool, int]:
        admitted, remaining = admit(token, permitted=permitted)
        log.append((fleet.clock(), permitted, admitted))
        return admitted, remaining

    fleet.admit = recording_admit  # type: ignore[method-assign]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--fleet", required=True, help="fleet file (.json or .toml)")
    parser.add_argument("--record", action="store_true", help="log every request's arrival time")
    args = parser.parse_args()
    if not args.host.startswith("127.") and args.host not in ("localhost", "::1"):
        parser.error("benchmarks serve on loopback addresses only")
    fleet = Fleet.from_file(args.fleet, now=int(time.time()))
    arrivals: list[tuple[float, int, bool]] = []
    if args.record:
        _record_arrivals(fleet, arrivals)
    asyncio.run(serve_until_signal(fleet, host=args.host, port=args.port))
    stats = fleet.stats
    report: dict[str, Any] = {
        "total": stats.total,
        "rate_limited": stats.rate_limited,
        "by_endpoint": stats.by_endpoint,
        "by_status": {str(k): v for k, v in stats.by_status.items()},
        "arrivals": [[round(t, 6), p, a] for t, p, a in arrivals],
    }
    sys.stdout.write("fake stats: " + json.dumps(report, separators=(",", ":")) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
