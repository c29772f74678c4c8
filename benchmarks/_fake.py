"""The fake Katapult for benchmarks: `python -m auditor.fake --fleet FILE`, plus its request log on exit.

It serves the same app on a loopback port (`auditor.fake.serve`) and prints the same ready line, so it runs in a
process of its own and never shares a GIL with the auditor being measured. On SIGTERM or SIGINT it stops and
prints one line `fake stats: {json}` with what the server saw: request totals, 429s, counts per endpoint and
status, and (with --record) the arrival time, permitted rate and admission of every request, which lets a
benchmark compute floors from the server's own clock rather than the client's.

One deviation, on by default: the listening socket is made with proto IPPROTO_TCP. `auditor.fake.server._bind`
makes it with proto 0, and asyncio only sets TCP_NODELAY on sockets whose proto is IPPROTO_TCP, so every response
(written as headers, then body) waits about 40 ms for the client's delayed ACK (Nagle): a configured 80 ms latency
becomes ~125 ms, which would flatter the auditor against a sequential loop. `--as-shipped` keeps the original.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import socket
import sys
import time
from typing import Any

from auditor.fake import serve
from auditor.fake import server as fake_server
from auditor.fake.fleet import DEFAULT_TOKEN, Fleet


def _bind_tcp(host: str, port: int) -> socket.socket:
    """Returns a bound TCP socket whose proto is IPPROTO_TCP, so asyncio turns Nagle off on accepted connections."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def _record_arrivals(fleet: Fleet, log: list[tuple[float, int, bool]]) -> None:
    """Wraps `fleet.admit` so every rate-limit decision is logged as (clock time, permitted, admitted)."""
    admit = fleet.admit

    def recording_admit(token: str, *, permitted: int) -> tuple[bool, int]:
        admitted, remaining = admit(token, permitted=permitted)
        log.append((fleet.clock(), permitted, admitted))
        return admitted, remaining

    fleet.admit = recording_admit  # type: ignore[method-assign]


async def _run(fleet: Fleet, *, host: str, port: int) -> None:
    token = DEFAULT_TOKEN if DEFAULT_TOKEN in fleet.tokens else min(fleet.tokens, default="none")

    def announce(url: str) -> None:
        sys.stdout.write(f"fake katapult listening on {url} (token: {token})\n")
        sys.stdout.flush()

    loop = asyncio.get_running_loop()
    task = asyncio.create_task(serve(fleet, host=host, port=port, on_ready=announce))
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--fleet", required=True, help="fleet file (.json or .toml)")
    parser.add_argument("--record", action="store_true", help="log every request's arrival time")
    parser.add_argument("--as-shipped", action="store_true", help="keep the fake's own socket (Nagle on)")
    args = parser.parse_args()
    if not args.as_shipped:
        fake_server._bind = _bind_tcp  # type: ignore[attr-defined]
    if not args.host.startswith("127.") and args.host not in ("localhost", "::1"):
        parser.error("benchmarks serve on loopback addresses only")
    fleet = Fleet.from_file(args.fleet, now=int(time.time()))
    arrivals: list[tuple[float, int, bool]] = []
    if args.record:
        _record_arrivals(fleet, arrivals)
    asyncio.run(_run(fleet, host=args.host, port=args.port))
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
