"""The same 2,000-disk fleet (80 ms latency, 6,000/min) audited by a plain sequential loop vs `auditor audit --once`.

The loop is what a user would write: one request at a time with a blocking HTTP client, sleep a second and retry on
429, and the same reads as the auditor's per-disk mode (the disk's policies, the disk itself, its VM's policies when
it is attached) with a minimum-retention check at the end. `auditor audit --once` runs as its own process (the
installed CLI, start-up and migrations included) on a fresh database. Each side gets a fresh fake Katapult.

A sequential loop's time is linear in its requests (it never nears the rate limit at one request per 80 ms), so
`--sample-disks N` times the loop over N disks of the fleet and scales to all of them; 0 runs the whole fleet.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import _common as c


def sequential_audit(url: str, token: str, disk_ids: list[str]) -> dict[str, int]:
    """Audits disks one request at a time, as a plain script would; returns counts."""
    import httpx

    counts = {"requests": 0, "rate_limited": 0, "noncompliant": 0}
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as http:

        def get(path: str, params: dict[str, Any]) -> Any:
            while True:
                counts["requests"] += 1
                response = http.get(path, params=params)
                if response.status_code == 429:
                    counts["rate_limited"] += 1
                    time.sleep(1)
                    continue
                response.raise_for_status()
                return response.json()

        def all_pages(path: str, params: dict[str, Any]) -> list[Any]:
            items: list[Any] = []
            page = 1
            while True:
                body = get(path, {**params, "page": page, "per_page": 200})
                items += body["disk_backup_policies"]
                pages = body["pagination"]["total_pages"]
                if not body["disk_backup_policies"] or (pages is not None and page >= pages):
                    return items
                page += 1

        for disk_id in disk_ids:
            policies = all_pages("/disks/disk/disk_backup_policies", {"disk[id]": disk_id})
            disk = get("/disks/disk", {"disk[id]": disk_id})["disk"]
            attached = disk.get("virtual_machine_disk")
            if attached:
                vm_id = attached["virtual_machine"]["id"]
                policies += [p for p in all_pages("/virtual_machines/virtual_machine/disk_backup_policies",
                                                  {"virtual_machine[id]": vm_id})
                             if p["target"]["type"] == "VirtualMachine"]
            if not policies or any(p["retention"] < 7 for p in policies):
                counts["noncompliant"] += 1
    return counts


def main() -> int:
    p = c.parser(__doc__.splitlines()[0])
    p.add_argument("--disks", type=int, default=2000)
    p.add_argument("--latency-ms", type=float, default=80.0)
    p.add_argument("--rate", type=int, default=6000)
    p.add_argument("--sample-disks", type=int, default=0,
                   help="time the sequential loop over this many disks and scale (default 0: all of them)")
    args = p.parse_args()
    concurrency = c.concurrency_for(latency_ms=args.latency_ms, rate_per_minute=args.rate)
    fleet = c.generated_fleet(disks=args.disks, rate=args.rate, latency_ms=args.latency_ms)
    disk_ids = list(c.fleet_objects(fleet).disks)
    sample = disk_ids if not args.sample_disks or args.sample_disks >= len(disk_ids) else \
        disk_ids[:: len(disk_ids) // args.sample_disks][: args.sample_disks]
    report = c.header("baseline", args, f"{args.disks} disks, {args.latency_ms:g} ms latency, {args.rate}/min: "
                                        f"sequential loop vs `auditor audit --once` (max_concurrency {concurrency})")

    with c.workdir(args) as tmp:
        with c.FakeKatapult(fleet, directory=tmp) as fake:
            began = time.monotonic()
            counts = sequential_audit(fake.url, fake.token, sample)
            loop_seconds = time.monotonic() - began
        with c.database(args, tmp) as db, c.FakeKatapult(fleet, directory=tmp) as fake:
            config = c.write_config(tmp / "auditor.toml", c.settings_dict(
                api_url=fake.url, db_url=db.url, disks=disk_ids, rate=args.rate, concurrency=concurrency))
            code, out, err, auditor_seconds, _ = c.run_cli(
                ["audit", "--once", "--format", "json"],
                env={"KATAPULT_API_TOKEN": fake.token, "AUDITOR_CONFIG": str(config)})
    try:
        summary = json.loads(out)
    except ValueError:
        summary = {}
    scale = len(disk_ids) / len(sample)
    loop_total = loop_seconds * scale
    per_request = loop_seconds / counts["requests"] if counts["requests"] else 0.0
    report.info("sequential loop", f"{len(sample)} disks, {counts['requests']} requests, {counts['rate_limited']} "
                                   f"x 429 in {loop_seconds:.1f} s ({per_request * 1000:.1f} ms per request)"
                + (f"; scaled x{scale:.2f} to {len(disk_ids)} disks: {loop_total:.1f} s" if scale != 1 else ""))
    report.info("auditor audit --once", f"exit {code}, status {summary.get('status', '?')}, "
                                        f"{summary.get('api_requests', '?')} requests, "
                                        f"{summary.get('api_rate_limited', '?')} x 429, {auditor_seconds:.1f} s "
                                        f"(process start to exit)")
    if code not in (0, 1):
        report.note(f"stderr: {err.strip()[-1500:]}")
    ratio = loop_total / auditor_seconds if auditor_seconds else 0.0
    report.result("speed-up over a sequential loop", target="print the ratio",
                  measured=f"{ratio:.1f}x ({loop_total:.0f} s vs {auditor_seconds:.1f} s"
                           + (", loop scaled from a sample" if scale != 1 else "") + ")",
                  passed=code in (0, 1) and summary.get("status") == "complete")
    return 0


if __name__ == "__main__":
    sys.exit(main())
