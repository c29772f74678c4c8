"""Runs every benchmark (`make bench`), each in its own process with a time bound, and prints a Markdown summary.

The whole run stays under 10 minutes on a 2-core machine: each script has a hard time limit, baseline.py times its
sequential loop over a sample of the fleet and scales it, scale.py audits 20,000 disks instead of 100,000 (about
40 s instead of 3 minutes; its RSS target is checked on a linear projection to 100,000), period_report.py writes
its 90 days of history straight into the tables (~10 s), and storage_growth.py gets whatever time is left before
report_api.py and dashboard.py, which run last (it keeps time for its pruning phase's cycles, stops its growth
phase after the cycle that uses up the rest of its share and reports per-cycle figures over the cycles it ran).
Exit status is 0 even when a target is missed: the summary says which, loudly.
`--postgres URL` is passed to every benchmark (scale.py uses PostgreSQL on 127.0.0.1:5432 when it answers anyway).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import _common as c

TOTAL_BUDGET = 570.0  # seconds: leaves room under make bench's 10 minutes for start-up and the summary
# Seconds kept for the scripts after storage_growth.py (each ~50 s on a 2-core VM: daemon start and first cycle at
# 10,000 disks, then 2 x 15 s of load).
RESERVED_AFTER_STORAGE = {"report_api.py": 80.0, "dashboard.py": 80.0}
STORAGE_MIN = 45.0


@dataclass
class Bench:
    """One benchmark script, its arguments and hard time limit."""

    script: str
    args: list[str] = field(default_factory=list)
    timeout: float = 120.0


PLAN = [
    Bench("rules.py", timeout=60),
    Bench("cli_start.py", timeout=60),  # ~20 s: --help, check-config and report, 5 runs each
    Bench("pacing.py", timeout=120),
    Bench("adaptive_limit.py", timeout=240),
    Bench("org_discovery.py", timeout=90),
    Bench("memory.py", timeout=120),
    Bench("baseline.py", ["--sample-disks", "200"], timeout=180),
    Bench("scale.py", ["--quick"], timeout=300),  # 20,000 disks (~40 s, + ~2 min of first-cycle attachment reads)
    Bench("period_report.py", timeout=90),  # ~10 s: history written straight into the tables, 3 builds
    Bench("storage_growth.py", timeout=0),  # gets the time left (see main)
    Bench("report_api.py", timeout=150),
    Bench("dashboard.py", timeout=150),
]


@dataclass
class Outcome:
    """What one script printed and how it ended."""

    script: str
    results: list[tuple[str, str, str, str]] = field(default_factory=list)
    seconds: float = 0.0
    ended: str = "ok"  # ok | timeout | exit N


def run(bench: Bench, extra: list[str], timeout: float) -> Outcome:
    """Runs one script, echoing its output, and returns its RESULT lines."""
    outcome = Outcome(bench.script)
    cmd = [sys.executable, str(c.HERE / bench.script), *bench.args, *extra]
    print(f"\n$ {' '.join(Path(a).name if a.endswith('.py') else a for a in cmd[1:])}  (limit {timeout:.0f} s)",
          flush=True)
    began = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=c.REPO,
                            start_new_session=True)
    assert proc.stdout is not None
    deadline = began + timeout
    lines: list[str] = []
    import selectors

    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                outcome.ended = "timeout"
                # The script and everything it started (fake Katapult, auditor processes) form one group.
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                break
            if not sel.select(min(left, 1.0)):
                continue
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            print(line, end="", flush=True)
    proc.wait()
    outcome.seconds = time.monotonic() - began
    if outcome.ended == "ok" and proc.returncode != 0:
        outcome.ended = f"exit {proc.returncode}"
    for line in lines:
        if line.startswith("RESULT "):
            parts = [p.strip() for p in line.removeprefix("RESULT ").split(" | ")]
            if len(parts) == 5:
                _, figure, target, measured, verdict = parts
                outcome.results.append((figure, target.removeprefix("target: "),
                                        measured.removeprefix("measured: "), verdict))
    return outcome


def summary(outcomes: list[Outcome], *, total: float, database: str) -> tuple[str, int]:
    """Returns the Markdown summary and how many targets were missed or could not be measured."""
    rows = ["| script | figure | target | result | |", "|---|---|---|---|---|"]
    problems = 0
    for o in outcomes:
        if not o.results:
            rows.append(f"| {o.script} | - | - | no result ({o.ended}, {o.seconds:.0f} s) | ERROR |")
            problems += 1
            continue
        for figure, target, measured, verdict in o.results:
            rows.append(f"| {o.script} | {figure} | {target} | {measured} | {verdict} |")
            problems += verdict in ("MISS", "SKIP")
        if o.ended != "ok":
            rows.append(f"| {o.script} | (run) | finishes | {o.ended} after {o.seconds:.0f} s | ERROR |")
            problems += 1
    times = ", ".join(f"{o.script} {o.seconds:.0f} s" for o in outcomes)
    text = "\n".join([
        f"Machine: {c.machine_line()}; database: {database}.",
        "",
        *rows,
        "",
        f"Wall time: {total:.0f} s ({times}).",
    ])
    return text, problems


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--postgres", metavar="URL", default=None, help="run every benchmark against PostgreSQL")
    p.add_argument("--only", nargs="*", default=None, help="run only these scripts (e.g. pacing rules)")
    p.add_argument("--markdown", metavar="FILE", default=None, help="also write the summary to FILE")
    args = p.parse_args()
    extra = ["--postgres", args.postgres] if args.postgres else []
    plan = [b for b in PLAN if not args.only or b.script.removesuffix(".py") in {s.removesuffix(".py")
                                                                                 for s in args.only}]
    print(f"machine: {c.machine_line()}", flush=True)
    began = time.monotonic()
    outcomes = []
    for bench in plan:
        timeout = bench.timeout
        bench_args = list(bench.args)
        if bench.script == "storage_growth.py":
            # Whatever is left of the budget after keeping the shares of the scripts that run after it (those in
            # this run); the script stops itself in time.
            later = {b.script for b in plan[plan.index(bench) + 1:]}
            reserve = sum(v for k, v in RESERVED_AFTER_STORAGE.items() if k in later)
            left = TOTAL_BUDGET - (time.monotonic() - began) - reserve
            share = max(STORAGE_MIN, left - 40)
            bench_args += ["--max-seconds", f"{share:.0f}"]
            timeout = share + 60
        outcomes.append(run(Bench(bench.script, bench_args, timeout), extra, timeout))
    total = time.monotonic() - began
    text, problems = summary(outcomes, total=total, database="PostgreSQL" if args.postgres else "SQLite")
    print("\n## Benchmark summary\n")
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n", encoding="utf-8")
    print()
    if problems:
        print(f"*** {problems} target(s) MISSED or not measured: see the rows marked MISS, SKIP or ERROR above. "
              "(make bench still exits 0: benchmarks report, they do not gate.) ***")
    else:
        print("All targets met.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
