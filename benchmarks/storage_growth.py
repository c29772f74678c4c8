"""Database growth over many audit cycles: bytes and rows per cycle when 1% of policies change per cycle.

10,000 disks (organization mode) are audited 200 times, 15 simulated minutes apart. Before each cycle 1% of the
policies get a new retention (some drop below the minimum and open findings, some go back up and resolve them),
and every schedule whose `next_invocation_at` has passed moves on by its interval, as real backups do.

Each cycle is the real `run_cycle` use case on a real database; only Katapult is replaced by an in-memory
stand-in that returns the domain objects the client would have parsed (HTTP is measured by the other
benchmarks; here 200 cycles must measure the database). On PostgreSQL a plain VACUUM runs after each cycle, as
autovacuum would between cycles 15 minutes apart. The comparison "row-per-poll design" is computed: a
design that stores one row per (disk, policy) observation per poll would add that many rows every cycle, each as
large as an average `policy_states` row measured on this same database (indexes included).

Pruning (`--prune-cycles`, 10 by default): the same database then goes on with `[history] keep = 1d` (the
shortest allowed), one cycle every 6 simulated hours (the daemon's pruning period), and after each cycle
`prune_history` runs as the daemon's pruning job would. Within 4 cycles everything the growth phase wrote is older
than `keep`; from then on the history tables hold about one day of history, so their rows and the database's
bytes must stay flat while every cycle keeps adding rows. Rows are counted in every table pruning touches; bytes
are the database's in use (SQLite: pages in use after a checkpoint, free pages excluded; PostgreSQL: relation
sizes after a plain VACUUM, which makes deleted rows' space reusable but never returns it).
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import _common as c

TARGET_SHARE = 0.05
TABLES = ("audit_runs", "run_summaries", "disks", "policy_states", "disk_states", "drift_events", "findings",
          "finding_events")
CYCLE_GAP = timedelta(minutes=15)
# The tables `prune_history` deletes from (findings and disks are never pruned: they are bounded by the fleet).
PRUNED = ("audit_runs", "run_summaries", "policy_states", "disk_states", "drift_events", "finding_events", "outbox")
# Those whose rows pruning bounds by time (policy and disk states: each disk's current row plus `keep` of history);
# finding events are kept for as long as their finding's episode is open, so they follow the open findings.
HISTORY = ("audit_runs", "run_summaries", "policy_states", "disk_states", "drift_events", "outbox")
PRUNE_GAP = timedelta(hours=6)  # auditor.daemon.PRUNE_EVERY: how often the daemon prunes
PRUNE_KEEP = "1d"  # the shortest [history] keep allowed
PRUNE_STEADY = 5  # from this pruning cycle on, nothing of the growth phase is left (keep 1d = 4 gaps of 6 h)


class InMemoryKatapult:
    """Stands in for KatapultClient in organization mode: returns disks and policies as domain objects."""

    def __init__(self, disks: list[Any], policies: list[Any]) -> None:
        from auditor.katapult.client import RequestStats

        self.disks = disks
        self.policies = policies
        self.stats = RequestStats()

    async def list_org_disks(self, org: Any) -> list[Any]:
        self.stats.requests += -(-len(self.disks) // 200)
        return list(self.disks)

    async def list_org_policies(self, org: Any) -> list[Any]:
        self.stats.requests += -(-len(self.policies) // 200)
        return list(self.policies)


def domain_fleet(disks: int, *, seed: int) -> tuple[list[Any], list[Any]]:
    """Returns the generated fleet's disks and policies as the client would parse them."""
    from auditor.domain.models import BackupPolicy, Disk, Interval, Schedule, TargetType

    fleet = c.fleet_objects(c.generated_fleet(disks=disks, policies_per_disk=1.0, vm_share=0.2, seed=seed))
    out_disks = []
    for d in fleet.disks.values():
        vm = fleet.vms.get(d.vm_id) if d.vm_id else None
        out_disks.append(Disk(id=d.id, name=d.name, vm_id=d.vm_id, vm_fqdn=vm.fqdn if vm else None, state=d.state,
                              size_in_gb=d.size_in_gb))
    out_policies = []
    for p in fleet.policies.values():
        target = fleet.disks.get(p.target_id) if p.target_type == "Disk" else fleet.vms.get(p.target_id)
        out_policies.append(BackupPolicy(
            id=p.id, retention=p.retention, target_type=TargetType(p.target_type), target_id=p.target_id,
            target_name=target.name if target else None, total_size=p.total_size,
            schedule=Schedule(Interval(p.interval), datetime.fromtimestamp(p.next_invocation_at, UTC)),
        ))
    return out_disks, out_policies


def mutate(policies: list[Any], *, rng: random.Random, share: float, now: datetime) -> tuple[list[Any], int]:
    """Returns the policies after one simulated interval (share of them changed, due schedules moved on)."""
    from auditor.domain.models import Schedule

    changed = set(rng.sample(range(len(policies)), round(len(policies) * share)))
    out = []
    for i, p in enumerate(policies):
        if i in changed:
            # Below 7 opens retention-below-minimum (and a short window); 7 and above resolves it again.
            p = replace(p, retention=rng.choice((3, 5, 10, 14, 21, 30)) if p.retention >= 7 else rng.randint(7, 30))
        due = p.schedule.next_invocation_at
        if due is not None and due < now:
            step = p.schedule.interval.length
            while due < now:
                due += step
            p = replace(p, schedule=Schedule(p.schedule.interval, due))
        out.append(p)
    return out, len(changed)


def main() -> int:
    p = c.parser(__doc__.splitlines()[0])
    p.add_argument("--disks", type=int, default=10_000)
    p.add_argument("--cycles", type=int, default=200)
    p.add_argument("--change", type=float, default=0.01, help="share of policies changed before each cycle")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--max-seconds", type=float, default=0.0,
                   help="stop after the cycle that passes this many seconds, pruning phase included (0: run every "
                        "cycle); the per-cycle figures are then measured over the cycles that ran")
    p.add_argument("--prune-cycles", type=int, default=10,
                   help=f"cycles {PRUNE_GAP.total_seconds() / 3600:g} h apart with keep = {PRUNE_KEEP}, each "
                        f"followed by pruning (0: no pruning phase; at least {PRUNE_STEADY + 2} to judge it)")
    args = p.parse_args()
    report = c.header("storage_growth", args, f"{args.disks} disks, {args.cycles} cycles, "
                                              f"{args.change:.0%} of policies changing per cycle")
    with c.workdir(args) as tmp, c.database(args, tmp) as db:
        asyncio.run(_run(args, db, report))
    return 0


async def _run(args: Any, db: c.Database, report: c.Report) -> None:
    from dataclasses import replace

    from auditor.config import Settings
    from auditor.service import Services, prepare_database
    from auditor.service.cycle import run_cycle
    from auditor.store.repo import Store

    # keep only matters to the pruning phase: nothing is pruned while the growth is measured.
    settings = Settings(**c.settings_dict(api_url="http://127.0.0.1:9/core/v1", db_url=db.url,
                                          organizations=["org_bench"]), history={"keep": PRUNE_KEEP})
    await prepare_database(settings)
    store = Store.from_url(db.url)
    disks, policies = domain_fleet(args.disks, seed=args.seed)
    rng = random.Random(args.seed)
    client = InMemoryKatapult(disks, policies)
    # The stand-in client at the Katapult seam; the rules and targets are the settings' ([audit] org_bench).
    base = Services(settings=settings, store=store, client=client)  # type: ignore[arg-type]
    start = datetime.now(UTC).replace(microsecond=0)
    total_changes = 0
    ran = 0
    write_seconds: list[float] = []

    async def cycle(i: int, at: datetime | None = None) -> int:
        """Runs cycle i (0: the first audit, nothing changed before it) at `at` (default: i gaps after the start);
        returns how many policies changed."""
        now = at or start + i * CYCLE_GAP
        changed = 0
        if i:
            client.policies, changed = mutate(client.policies, rng=rng, share=args.change, now=now)
        outcome = await run_cycle(replace(base, clock=lambda: now), trigger="benchmark")
        if outcome.status.value != "complete":
            raise SystemExit(f"cycle {i} did not complete: {outcome.status.value} {outcome.errors[:3]}")
        if db.kind == "postgres":
            # Cycles are 15 minutes apart in real life: autovacuum (naptime 1 min) runs between any two of them,
            # making the dead row versions every UPDATE leaves reusable. Here cycles follow each other within
            # seconds, so do its work explicitly (plain VACUUM: space is reused, never returned to the OS).
            db.vacuum()
        return changed

    try:
        await cycle(0)
        db.vacuum()
        first_bytes = db.size_bytes()
        # Cycle 1 is warm-up: the first time rows are updated (on PostgreSQL every disk row gets a second version
        # once, which VACUUM then keeps for reuse). Growth is measured from its end.
        with c.Stopwatch() as warm:
            await cycle(1)
        db.vacuum()
        base_bytes = db.size_bytes()
        base_rows = db.row_counts(TABLES)
        report.info("first cycles", f"{len(disks)} disks, {len(policies)} policies: {first_bytes / 1e6:.2f} MB after "
                                    f"the first audit, {base_bytes / 1e6:.2f} MB after one more (warm-up, not "
                                    f"counted); rows {base_rows}")
        began = time.monotonic()
        # Under --max-seconds, the pruning phase's cycles (each about as long as the warm-up's, plus its prune and
        # counts) are kept out of the growth phase's share.
        growth_seconds = args.max_seconds - args.prune_cycles * (warm.seconds + 1.5) if args.max_seconds else 0.0
        if args.max_seconds:
            growth_seconds = max(growth_seconds, args.max_seconds / 3)
        for i in range(2, args.cycles + 1):
            t0 = time.monotonic()
            total_changes += await cycle(i)
            write_seconds.append(time.monotonic() - t0)
            ran += 1
            if growth_seconds and time.monotonic() - began > growth_seconds:
                break
        elapsed = time.monotonic() - began
        _growth_figures(args, db, report, disks=disks, policies=client.policies, base_bytes=base_bytes,
                        base_rows=base_rows, ran=ran, total_changes=total_changes, elapsed=elapsed,
                        write_seconds=write_seconds)
        if args.prune_cycles:
            await _prune_phase(args, db, report, base, cycle, after=start + (ran + 1) * CYCLE_GAP,
                               next_cycle=ran + 2)
    finally:
        await store.close()


def _growth_figures(args: Any, db: c.Database, report: c.Report, *, disks: list[Any], policies: list[Any],
                    base_bytes: int, base_rows: dict[str, int], ran: int, total_changes: int, elapsed: float,
                    write_seconds: list[float]) -> None:
    """Reports the growth phase: bytes and rows per cycle against a row-per-poll design."""
    db.vacuum()
    end_bytes = db.size_bytes()
    end_rows = db.row_counts(TABLES)
    per_table = db.table_bytes()
    cycles = ran
    if ran < args.cycles - 1:
        report.note(f"measured {ran} of {args.cycles - 1} cycles within the {args.max_seconds:.0f} s time budget "
                    f"(--max-seconds); growth per cycle is steady, so per-cycle figures are over those {ran}")
    grown = end_bytes - base_bytes
    bytes_per_cycle = grown / cycles
    rows_per_cycle = {t: (end_rows[t] - base_rows[t]) / cycles for t in TABLES}
    new_rows = sum(rows_per_cycle.values())
    # The row-per-poll design: every cycle stores one row per (disk, policy) observation.
    observations = _observations(disks, policies)
    state_bytes = per_table.get("policy_states", 0)
    avg_row = state_bytes / end_rows["policy_states"] if end_rows["policy_states"] else 0.0
    per_poll_bytes = observations * avg_row
    share = bytes_per_cycle / per_poll_bytes if per_poll_bytes else float("inf")
    changes_per_cycle = total_changes / cycles

    report.info("cycle time", f"{elapsed / cycles:.2f} s per cycle on average, run_cycle over the stand-in "
                              f"(load, evaluate, reconcile, commit); p50 {c.percentile(write_seconds, 50):.2f} s, "
                              f"max {max(write_seconds):.2f} s")
    report.info("changes", f"{changes_per_cycle:.0f} policies changed per cycle ({total_changes} in total)")
    report.info("rows per cycle", ", ".join(f"{t} {v:.1f}" for t, v in rows_per_cycle.items() if v)
                + f"; total {new_rows:.1f}")
    tables = "; ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sorted(per_table.items()) if v > 100_000)
    report.info("database size", f"{base_bytes / 1e6:.2f} MB after the warm-up, {end_bytes / 1e6:.2f} MB after "
                                 f"{cycles} more cycles ({tables})")
    report.info("bytes per change", f"{bytes_per_cycle / changes_per_cycle:.0f} bytes per changed policy"
                if changes_per_cycle else "no changes")
    report.info("row-per-poll design", f"{observations} rows per cycle x {avg_row:.0f} bytes per policy_states row "
                                       f"(measured, indexes included) = {per_poll_bytes / 1e6:.2f} MB per cycle")
    report.result("bytes per cycle vs row-per-poll", target="<= 5% of a row-per-poll design",
                  measured=f"{share:.2%} ({bytes_per_cycle / 1e3:.1f} kB vs {per_poll_bytes / 1e3:.0f} kB per cycle)",
                  passed=share <= TARGET_SHARE)
    # Proportional to changes: a handful of rows per changed policy (its new state, a drift event, a finding and
    # its event, the disk's new verdict) plus the run's own two rows (audit_runs, run_summaries), never a row per
    # disk or per policy observed.
    report.result("rows per cycle", target=f"proportional to changes ({changes_per_cycle:.0f}/cycle), "
                                           f"not to disks ({len(disks)})",
                  measured=f"{new_rows:.1f} rows per cycle = {(new_rows - 2) / changes_per_cycle:.2f} per change + "
                           f"2 run rows" if changes_per_cycle else f"{new_rows:.1f}",
                  passed=new_rows <= 6 * changes_per_cycle + 2 if changes_per_cycle else new_rows <= 2)


async def _prune_phase(args: Any, db: c.Database, report: c.Report, services: Any, cycle: Any, *,
                       after: datetime, next_cycle: int) -> None:
    """Runs cycles PRUNE_GAP apart, each followed by `prune_history`; reports rows and bytes before and after."""
    from dataclasses import replace

    from auditor.service.housekeeping import prune_history

    def measure() -> dict[str, Any]:
        rows = db.row_counts((*PRUNED, "findings"))
        sizes = db.table_bytes()
        live = db.live_table_bytes()
        return {"rows": sum(rows[t] for t in HISTORY), "bytes": sum(sizes.get(t, 0) for t in HISTORY),
                "live": sum(live.get(t, 0) for t in HISTORY) if live is not None else None,
                "db": db.size_bytes(), "events": rows["finding_events"], "findings": rows["findings"]}

    steps: list[dict[str, Any]] = []
    for k in range(1, args.prune_cycles + 1):
        now = after + k * PRUNE_GAP
        await cycle(next_cycle + k - 1, now)
        db.vacuum()
        before = measure()
        with c.Stopwatch() as sw:
            deleted = await prune_history(replace(services, clock=lambda now=now: now))
        db.vacuum()
        steps.append({"before": before, "after": measure(), "deleted": deleted, "seconds": sw.seconds})
    mb = 1e6
    report.info("pruning", f"keep {PRUNE_KEEP}, a cycle every {PRUNE_GAP.total_seconds() / 3600:g} h, pruning "
                           "after each; time-bounded history rows (MB) before -> after: " + "; ".join(
                               f"{s['before']['rows']:,} -> {s['after']['rows']:,} ({s['before']['bytes'] / mb:.2f} "
                               f"-> {s['after']['bytes'] / mb:.2f})" for s in steps))
    biggest = max(steps, key=lambda s: sum(s["deleted"].values()))
    report.info("largest prune", f"{sum(biggest['deleted'].values()):,} rows in {biggest['seconds']:.2f} s ("
                + ", ".join(f"{t} {n:,}" for t, n in biggest["deleted"].items() if n) + f"); database "
                f"{biggest['before']['db'] / mb:.2f} -> {biggest['after']['db'] / mb:.2f} MB; a prune takes "
                f"{c.percentile([s['seconds'] for s in steps], 50):.2f} s (median)")
    steady = steps[PRUNE_STEADY - 1:]
    if len(steady) < 3:
        report.result("history pruned, database bounded", target=f"flat once keep ({PRUNE_KEEP}) has passed",
                      measured=f"too few pruning cycles ({len(steps)}; at least {PRUNE_STEADY + 2})", passed=None)
        return
    first, last = steady[0]["after"], steady[-1]["after"]
    report.info("not pruned by time", f"open findings keep their whole episode and findings rows stay (bounded by "
                                      f"the fleet, not by time): findings {first['findings']:,} -> "
                                      f"{last['findings']:,}, finding_events {first['events']:,} -> "
                                      f"{last['events']:,} over the last {len(steady)} cycles; whole database "
                                      f"{first['db'] / mb:.2f} -> {last['db'] / mb:.2f} MB")
    # What one cycle adds to the time-bounded tables, from the counts before each prune.
    per_cycle = sum(s["before"]["rows"] - p["after"]["rows"] for p, s in zip(steady, steady[1:], strict=False))
    per_cycle /= len(steady) - 1
    rows = [s["after"]["rows"] for s in steady]
    rows_growth = rows[-1] - rows[0]
    pages_growth = last["bytes"] / first["bytes"] - 1 if first["bytes"] else 0.0
    if first["live"] is not None:
        # SQLite never merges B-tree pages that deletes leave part-empty, so the pages of the tables grow a little
        # while the data in them stays flat; "live" is the data (dbstat: page bytes less unused bytes).
        live_growth = last["live"] / first["live"] - 1 if first["live"] else 0.0
        size_text = (f"live data {first['live'] / mb:.2f} -> {last['live'] / mb:.2f} MB ({live_growth:+.1%}), "
                     f"their pages {first['bytes'] / mb:.2f} -> {last['bytes'] / mb:.2f} MB ({pages_growth:+.1%})")
    else:
        live_growth = pages_growth
        size_text = f"{first['bytes'] / mb:.2f} -> {last['bytes'] / mb:.2f} MB ({pages_growth:+.1%})"
    report.result("history pruned, database bounded",
                  target=f"keep {PRUNE_KEEP}: history rows and bytes flat after pruning while cycles go on",
                  measured=f"{min(rows):,}-{max(rows):,} rows ({rows_growth:+,} first to last of {len(steady)} "
                           f"cycles, each adding {per_cycle:,.0f}); {size_text}",
                  # Flat: the last count is within one cycle's rows of the first, and the data within 5 %.
                  passed=rows_growth <= per_cycle and live_growth <= 0.05)


def _observations(disks: list[Any], policies: list[Any]) -> int:
    """Returns how many (disk, covering policy) pairs one poll observes (a disk without a policy counts once)."""
    on_disk: dict[str, int] = {}
    on_vm: dict[str, int] = {}
    for p in policies:
        index = on_disk if p.target_type.value == "Disk" else on_vm
        index[p.target_id] = index.get(p.target_id, 0) + 1
    return sum(max(1, on_disk.get(d.id, 0) + (on_vm.get(d.vm_id, 0) if d.vm_id else 0)) for d in disks)


if __name__ == "__main__":
    sys.exit(main())
