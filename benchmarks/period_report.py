"""The 90-day period report over 10,000 disks: `read_period_report` from stored history, then its renderings.

History is synthetic and written straight into the tables (no cycle runs; 90 days of cycles would take hours):
one run every 15 minutes (the default audit interval) through the 90 days and the hour before them, 1 % failed
and 3 % partial, and now and then (0.2 % of gaps) three hours without a run, so coverage has gaps to find; 10,000
disks, each with a verdict interval from before the period and 0..6 (`--max-changes`) changes of verdict inside
it (compliant, noncompliant, unknown or waived: about 40,000 `disk_states` rows); a finding on every third disk,
opened inside the period and resolved 1..40 hours later for 70 % of them. Each disk has a name, as the report
lists it, and one daily policy whose runs were observed (`--runs-per-day`, default 1: 900,000 `invocations` rows
over 90 days, and one `policy_schedules` row a disk) for the observed RPO.

Timed, in this process, on a database that holds nothing else: `read_period_report` (read the runs, verdicts and
finding events in one session, then the period arithmetic), as the API's `/api/v1/compliance` and `auditor report
--since 90d` call it; then, separately, the JSON body, the CSV and the HTML page of that report. Each is run
`--repeat` times; the figure against the target is the slowest build (the first one reads a cold cache).
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import _common as c

TARGET_SECONDS = 2.0
INTERVAL = timedelta(minutes=15)
END = datetime(2030, 4, 1, tzinfo=UTC)
BATCH = 2000


def history(*, disks: int, days: int, seed: int, max_changes: int = 6,
            runs_per_day: int = 1) -> dict[str, list[dict[str, Any]]]:
    """Returns the rows of each history table for `disks` disks over the `days` before END."""
    rnd = random.Random(seed)
    start = END - timedelta(days=days)
    runs: list[dict[str, Any]] = []
    t, seq = start - timedelta(hours=1), 0
    while t < END:
        seq += 1
        status = "failed" if rnd.random() < 0.01 else ("partial" if rnd.random() < 0.03 else "complete")
        runs.append({"id": f"{seq:032x}", "seq": seq, "trigger": "schedule", "status": status, "started_at": t,
                     "finished_at": t + timedelta(seconds=40), "targets_checked": 10, "disks_ok": disks,
                     "disks_unknown": 0, "api_requests": 60, "api_retries": 0, "api_rate_limited": 0,
                     "api_by_status": {}, "findings_opened": 0, "findings_resolved": 0, "errors": []})
        t += INTERVAL if rnd.random() > 0.002 else timedelta(hours=3)
    rows: dict[str, list[dict[str, Any]]] = {"runs": runs, "disks": [], "states": [], "findings": [], "events": [],
                                             "invocations": [], "schedules": []}
    step = 86400 // max(runs_per_day, 1)
    slots = days * 24 * 60 // 15
    for i in range(disks):
        disk_id = f"disk_{i:016d}"
        rows["disks"].append({"id": disk_id, "name": f"disk {i}", "vm_id": None, "vm_fqdn": None,
                              "source": "org:acme", "is_target": True, "outcome": "ok", "error_code": None,
                              "error_message": None, "first_seen_at": start, "last_checked_at": END,
                              "last_read_at": END, "last_run_id": None})
        if runs_per_day:
            due = int(start.timestamp()) + rnd.randint(0, step - 1)
            gap = None
            while due < int(END.timestamp()):
                rows["invocations"].append({"disk_id": disk_id, "policy_id": f"dbp_{i:016d}", "due_at": due,
                                            "next_at": due + step, "observed_at": due + 300, "gap_seconds": gap,
                                            "run_id": "x"})
                due, gap = due + step, step
            rows["schedules"].append({"disk_id": disk_id, "policy_id": f"dbp_{i:016d}", "first_seen_at": start,
                                      "next_invocation_at": datetime.fromtimestamp(due, tz=UTC), "recent": {}})
        changes = sorted(rnd.sample(range(1, slots), rnd.randint(0, max_changes)))
        points = [start - timedelta(hours=1)] + [start + k * INTERVAL for k in changes]
        for j, at in enumerate(points):
            status = rnd.choice(["compliant", "compliant", "compliant", "noncompliant", "unknown", "waived"])
            rows["states"].append({"disk_id": disk_id, "status": status, "valid_from": at,
                                   "valid_to": points[j + 1] if j + 1 < len(points) else None, "run_id": "x"})
        if i % 3 == 0:
            fp = f"{i:016x}"
            rows["findings"].append({"fingerprint": fp, "rule": "retention-below-minimum", "disk_id": disk_id,
                                     "policy_id": "p", "severity": "medium", "status": "open", "message": "m",
                                     "observed": {}, "expected": {}, "first_seen": start, "last_seen": END,
                                     "opened_at": start, "resolved_at": None, "waiver": None})
            at = start + timedelta(hours=rnd.randint(0, days * 24 - 48))
            rows["events"].append({"fingerprint": fp, "disk_id": disk_id, "run_id": "x", "at": at, "kind": "opened"})
            if rnd.random() < 0.7:
                rows["events"].append({"fingerprint": fp, "disk_id": disk_id, "run_id": "x",
                                       "at": at + timedelta(hours=rnd.randint(1, 40)), "kind": "resolved"})
    return rows


def main() -> int:
    p = c.parser(__doc__.splitlines()[0])
    p.add_argument("--disks", type=int, default=10_000)
    p.add_argument("--days", type=int, default=90)
    p.add_argument("--repeat", type=int, default=3, help="builds (and renderings) timed")
    p.add_argument("--max-changes", type=int, default=6,
                   help="verdict changes per disk inside the period: 0..N, uniformly (6: ~40,000 disk_states)")
    p.add_argument("--runs-per-day", type=int, default=1, help="observed runs per disk and day (0: none)")
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args()
    report = c.header("period_report", args, f"{args.days}-day period report over {args.disks} disks, "
                                             f"{args.repeat} builds")
    try:
        from auditor.service.compliance import read_period_report  # noqa: F401
    except ImportError as exc:
        report.result("period report", target=f"<= {TARGET_SECONDS:g} s", measured=f"missing ({exc})", passed=None)
        return 0
    with c.workdir(args) as tmp, c.database(args, tmp) as db:
        asyncio.run(_run(args, db, report))
    return 0


async def _run(args: Any, db: c.Database, report: c.Report) -> None:
    from sqlalchemy import insert

    from auditor.config import Settings
    from auditor.domain.periods import Period
    from auditor.render.compliance import compliance_csv, compliance_html
    from auditor.service import Services
    from auditor.service.compliance import read_period_report
    from auditor.store import engine
    from auditor.store.repo import Store
    from auditor.store.tables import (
        disk_states,
        disks,
        finding_events,
        findings,
        invocations,
        policy_schedules,
        runs,
    )

    await engine.upgrade(db.url)
    store = Store.from_url(db.url)
    try:
        with c.Stopwatch() as fill:
            rows = history(disks=args.disks, days=args.days, seed=args.seed, max_changes=args.max_changes,
                           runs_per_day=args.runs_per_day)
            async with store.engine.begin() as conn:
                for table, name in ((runs, "runs"), (disks, "disks"), (disk_states, "states"),
                                    (findings, "findings"), (finding_events, "events"),
                                    (invocations, "invocations"), (policy_schedules, "schedules")):
                    for k in range(0, len(rows[name]), BATCH):
                        await conn.execute(insert(table), rows[name][k:k + BATCH])
        db.vacuum()
        report.info("history", f"{len(rows['runs'])} runs, {len(rows['disks'])} disks, {len(rows['states'])} "
                               f"disk_states, {len(rows['findings'])} findings, {len(rows['events'])} finding_events, "
                               f"{len(rows['invocations'])} observed runs; "
                               f"{db.size_bytes() / 1e6:.1f} MB, written in {fill.seconds:.1f} s")
        period = Period(END - timedelta(days=args.days), END)
        services = Services(settings=Settings(audit={"interval": INTERVAL}), store=store, clock=lambda: END)
        builds, as_json, as_csv, as_html = [], [], [], []
        result: dict[str, Any] = {}
        sizes: dict[str, int] = {}
        for _ in range(args.repeat):
            with c.Stopwatch() as sw:
                result = await read_period_report(services, start=period.start, end=period.end)
            builds.append(sw.seconds)
            for times, name, render in ((as_json, "JSON", lambda r: json.dumps(r)), (as_csv, "CSV", compliance_csv),
                                        (as_html, "HTML", compliance_html)):
                with c.Stopwatch() as sw:
                    body = render(result)
                times.append(sw.seconds)
                sizes[name] = len(body.encode())
    finally:
        await store.close()
    cov, fleet = result["coverage"], result["fleet"]
    report.info("report", f"{fleet['disks']} disks, {len(fleet['by_day'])} days; fleet {fleet['compliance_pct']} % "
                          f"in compliance, coverage {cov['coverage_pct']} % ({cov['completed_cycles']} of "
                          f"{cov['scheduled_cycles']} cycles, {len(cov['gaps'])} gaps)")
    report.info("read_period_report", ", ".join(f"{s:.2f} s" for s in builds))
    for name, times in (("JSON", as_json), ("CSV", as_csv), ("HTML", as_html)):
        report.info(f"{name} rendering", f"{', '.join(f'{s:.2f} s' for s in times)} ({sizes[name] / 1e6:.2f} MB)")
    slowest = max(builds)
    report.result(f"{args.days}-day report over {args.disks} disks", target=f"<= {TARGET_SECONDS:g} s",
                  measured=f"{slowest:.2f} s (slowest of {len(builds)}; fastest {min(builds):.2f} s)",
                  passed=slowest <= TARGET_SECONDS)
    rendered = max(b + j + cs + h for b, j, cs, h in zip(builds, as_json, as_csv, as_html, strict=True))
    report.result("report with its JSON, CSV and HTML", target=f"<= {TARGET_SECONDS:g} s",
                  measured=f"{rendered:.2f} s (slowest; CSV {max(as_csv):.2f} s, HTML {max(as_html):.2f} s, "
                           f"JSON {max(as_json):.2f} s)",
                  passed=rendered <= TARGET_SECONDS)


if __name__ == "__main__":
    sys.exit(main())
