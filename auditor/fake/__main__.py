"""`python -m auditor.fake`: serve a fake Katapult on a loopback port until SIGTERM or SIGINT.

At start it prints the listening URL (first line, which scripts wait for) and then the ids it serves. SIGHUP
re-reads the `--fleet` file and swaps the whole fleet in at once; a file that fails to load keeps the old fleet.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Sequence

from auditor.fake.app import create_app
from auditor.fake.fleet import DEFAULT_TOKEN, Fleet, demo_fleet
from auditor.fake.server import serve

logger = logging.getLogger(__name__)

# How many ids of each kind are listed at start; a bigger fleet shows its count and the first ones (a reader that
# only waits for the first line must not fill its pipe).
LISTED_IDS = 10


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


def _listed(title: str, rows: list[str], *, limit: int) -> list[str]:
    lines = [f"{title} ({len(rows)}):"]
    lines += [f"  {row}" for row in rows[:limit]]
    if len(rows) > limit:
        lines.append(f"  … and {len(rows) - limit} more")
    return lines


def fleet_summary(fleet: Fleet, *, limit: int = LISTED_IDS) -> list[str]:
    """Returns the lines listing what a fleet serves: organizations, disks and VMs (at most `limit` of each)."""
    subs = {org.id: org.sub_domain for org in fleet.orgs.values()}
    orgs = [f"{org.id}  sub_domain={org.sub_domain}  {org.name}" for org in fleet.orgs.values()]
    disks = [
        f"{disk.id}  {disk.name or '-'}  org={subs.get(disk.org_id, disk.org_id)}"
        + (f"  vm={disk.vm_id}" if disk.vm_id else "")
        for disk in fleet.disks.values()
    ]
    vms = [f"{vm.id}  {vm.fqdn}" for vm in fleet.vms.values()]
    return [
        *_listed("organizations", orgs, limit=limit),
        *_listed("disks", disks, limit=limit),
        *_listed("virtual machines", vms, limit=limit),
        f"policies: {len(fleet.policies)}",
    ]


def _counts(fleet: Fleet) -> str:
    return (
        f"{len(fleet.orgs)} organization(s), {len(fleet.disks)} disk(s), {len(fleet.vms)} VM(s), "
        f"{len(fleet.policies)} polic(ies)"
    )


async def serve_until_signal(fleet: Fleet, *, host: str, port: int, fleet_file: str | None = None) -> None:
    """Serves until SIGTERM or SIGINT, then shuts the server down cleanly; SIGHUP reloads `fleet_file`."""
    token = DEFAULT_TOKEN if DEFAULT_TOKEN in fleet.tokens else min(fleet.tokens, default="none")
    app = create_app(fleet)

    def announce(url: str) -> None:
        # The first line is the one scripts wait for; the ids follow it.
        lines = [f"fake katapult listening on {url} (token: {token})", *fleet_summary(fleet)]
        if fleet_file is not None:
            lines.append(f"send SIGHUP to re-read {fleet_file}")
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()

    def reload() -> None:
        if fleet_file is None:
            logger.warning("SIGHUP: nothing to reload (the fleet is not from a --fleet file)")
            return
        try:
            fresh = Fleet.from_file(fleet_file, now=int(time.time()))
        except (OSError, ValueError) as exc:  # tomllib/json errors are ValueErrors
            logger.error("SIGHUP: kept the current fleet; %s did not load: %s", fleet_file, exc)
            return
        # One attribute assignment: every request is answered wholly from the old fleet or wholly from the new.
        app.replace_fleet(fresh)
        logger.info("SIGHUP: reloaded %s: %s", fleet_file, _counts(fresh))

    loop = asyncio.get_running_loop()
    task = asyncio.create_task(serve(fleet, host=host, port=port, on_ready=announce, app=app))
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    loop.add_signal_handler(signal.SIGHUP, reload)
    try:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the fake server from command-line arguments and returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)  # reloads are news; uvicorn and the rest stay at WARNING
    try:
        fleet = _load(args)
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    try:
        asyncio.run(serve_until_signal(fleet, host=args.host, port=args.port, fleet_file=args.fleet))
    except OSError as exc:  # the port is taken, or the address is not this host's: one line, not a traceback
        sys.stderr.write(f"fake katapult cannot listen on {args.host}:{args.port}: {exc.strerror or exc}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
