"""Rule evaluation alone: `evaluate` over snapshots holding 100,000 policies, on one core.

Snapshots are built up front: 50,000 disks with two policies each, mostly daily (5..30 kept) and hourly
(120..400 kept), a few weekly or monthly, about 3% of schedules overdue or missing, so every rule fires somewhere
and there is about one finding for every five policies. Only the evaluation is timed, in this single-threaded
process; the figure is the best of the runs, all of which are printed.
"""

from __future__ import annotations

import random
import sys
import time
from datetime import UTC, datetime, timedelta

import _common as c

TARGET_SECONDS = 1.0


def snapshots(policies: int, *, per_disk: int, seed: int, now: datetime) -> list[object]:
    """Returns disk snapshots holding `policies` policies in total."""
    from auditor.domain.models import BackupPolicy, Disk, DiskSnapshot, Interval, ReadOutcome, Schedule, TargetType

    rng = random.Random(seed)
    intervals = (Interval.HOURLY,) * 20 + (Interval.DAILY,) * 76 + (Interval.WEEKLY,) * 3 + (Interval.MONTHLY,)
    out = []
    n = 0
    for d in range(policies // per_disk):
        disk = Disk(id=f"disk_{d:016d}", name=f"disk-{d}")
        items = []
        for _ in range(per_disk):
            interval = rng.choice(intervals)
            retention = rng.randint(120, 400) if interval is Interval.HOURLY else rng.randint(5, 30)
            roll = rng.random()
            due = None if roll < 0.005 else now + timedelta(seconds=rng.randint(-10800, -3700) if roll < 0.03
                                                            else rng.randint(60, 86400))
            items.append(BackupPolicy(id=f"dbp_{n:016d}", retention=retention, target_type=TargetType.DISK,
                                      target_id=disk.id, schedule=Schedule(interval, due), target_name=disk.name))
            n += 1
        out.append(DiskSnapshot(disk, ReadOutcome.OK, tuple(items)))
    return out


def main() -> int:
    p = c.parser(__doc__.splitlines()[0])
    p.add_argument("--policies", type=int, default=100_000)
    p.add_argument("--per-disk", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    report = c.header("rules", args, f"evaluate() over {args.policies} policies, one core")
    from auditor.domain.rules import evaluate
    from auditor.service import ruleset_from

    rules = ruleset_from(c.settings(api_url="http://127.0.0.1:9/core/v1", db_url="sqlite://").rules)
    now = datetime.now(UTC)
    snaps = snapshots(args.policies, per_disk=args.per_disk, seed=11, now=now)
    times = []
    cpu = []
    findings = 0
    for _ in range(args.repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        findings = sum(len(evaluate(s, rules, now=now)) for s in snaps)  # type: ignore[arg-type]
        times.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    best = min(times)
    report.info("work", f"{len(snaps)} disk snapshots, {args.policies} policies, {findings} findings "
                        f"({findings / args.policies:.0%} of policies)")
    report.info("runs", ", ".join(f"{t:.3f} s" for t in times) + f" wall; CPU {min(cpu):.3f} s at best")
    report.info("per policy", f"{best / args.policies * 1e6:.1f} us")
    report.result("evaluation time", target=f"<= {TARGET_SECONDS:.1f} s on one core",
                  measured=f"{best:.3f} s (best of {args.repeat})", passed=best <= TARGET_SECONDS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
