"""Peak RSS of `auditor audit --once` auditing 10,000 disks in organization mode.

The command runs as its own process (the installed CLI, as a user runs it) against the fake Katapult in another
process; its peak resident set size comes from the kernel (`wait4` rusage of that process alone), so it includes
the interpreter, every import, the parsed fleet, the cycle's objects and the database work.
"""

from __future__ import annotations

import json
import sys

import _common as c

TARGET_MB = 250


def main() -> int:
    p = c.parser(__doc__.splitlines()[0])
    p.add_argument("--disks", type=int, default=10_000)
    p.add_argument("--policies", type=int, default=12_000)
    p.add_argument("--vm-share", type=float, default=0.2)
    p.add_argument("--latency-ms", type=float, default=20.0)
    p.add_argument("--rate", type=int, default=6000)
    args = p.parse_args()
    per_target = args.policies / (args.disks * (1 - args.vm_share / 2))
    fleet = c.generated_fleet(disks=args.disks, policies_per_disk=per_target, vm_share=args.vm_share, seed=3,
                              rate=args.rate, latency_ms=args.latency_ms)
    objects = c.fleet_objects(fleet)
    org_id = next(iter(objects.orgs))
    report = c.header("memory", args, f"`auditor audit --once`, organization mode, {len(objects.disks)} disks / "
                                      f"{len(objects.policies)} policies")
    with c.workdir(args) as tmp, c.database(args, tmp) as db, c.FakeKatapult(fleet, directory=tmp) as fake:
        config = c.write_config(tmp / "auditor.toml", c.settings_dict(
            api_url=fake.url, db_url=db.url, organizations=[org_id], rate=args.rate, concurrency=8))
        env = {"KATAPULT_API_TOKEN": fake.token, "AUDITOR_CONFIG": str(config)}
        # A first run creates the schema; the measured run is a steady-state cycle over a populated database.
        first = c.run_cli(["audit", "--once", "--format", "json"], env=env)
        code, out, err, wall, rss = c.run_cli(["audit", "--once", "--format", "json"], env=env)
    try:
        summary = json.loads(out)
    except ValueError:
        summary = {}
    status = summary.get("status", f"exit {code}")
    report.info("first run (empty database)", f"exit {first[0]}, {first[3]:.1f} s, peak RSS {first[4] / 2**20:.0f} MB")
    report.info("measured run", f"exit {code}, status {status}, {summary.get('disks_read', '?')} disks, "
                                f"{summary.get('api_requests', '?')} requests, {wall:.1f} s wall")
    if code not in (0, 1):
        report.note(f"stderr: {err.strip()[-1500:]}")
    mb = max(rss, first[4]) / 2**20
    report.result("peak RSS", target=f"<= {TARGET_MB} MB",
                  measured=f"{mb:.0f} MB (first run {first[4] / 2**20:.0f} MB, second run {rss / 2**20:.0f} MB)",
                  passed=mb <= TARGET_MB and status == "complete")
    return 0


if __name__ == "__main__":
    sys.exit(main())
