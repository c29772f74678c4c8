"""`python -m auditor.fake`: serve a fake Katapult on a loopback port until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Sequence

from auditor.fake.fleet import DEFAULT_TOKEN, Fleet, demo_fleet
from auditor.fake.server import serve


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m auditor.fake", description="Serve a fake Katapult Core API."
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default: a free one)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--fleet", metavar="FILE", help="fleet file (.toml or .json)")
    source.add_argument("--demo", action="store_true", help="serve the demo fleet")
    source.add_argument("--disks", type=int, metavar="N", help="serve a generated fleet of N compliant disks")
    parser.add_argument("--orgs", type=int, default=1, help="organizations in a generated fleet (--disks)")
    parser.add_argument("--seed", type=int, default=0, help="seed of a generated fleet (with --disks)")
    return parser


def _load(args: argparse.Namespace) -> Fleet:
    """Returns the fleet the arguments ask for."""
    now = int(time.time())
    if args.fleet is not None:
        return Fleet.from_file(args.fleet, now=now)
    if args.demo:
        return demo_fleet(now=now)[0]
    return Fleet.generate(disks=args.disks, orgs=args.orgs, seed=args.seed, now=now)


async def serve_until_signal(fleet: Fleet, *, host: str, port: int) -> None:
    """Serves until SIGTERM or SIGINT, then shuts the server down cleanly."""
    token = DEFAULT_TOKEN if DEFAULT_TOKEN in fleet.tokens else min(fleet.tokens, default="none")

    def announce(url: str) -> None:
        sys.stdout.write(f"fake katapult listening on {url} (token: {token})\n")
        sys.stdout.flush()

    loop = asyncio.get_running_loop()
    task = asyncio.create_task(serve(fleet, host=host, port=port, on_ready=announce))
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the fake server from command-line arguments and returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        fleet = _load(args)
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    asyncio.run(serve_until_signal(fleet, host=args.host, port=args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
