"""CLI start: `auditor --help`, `check-config`, `report`, `findings` and `history` as fresh processes, median of 5.

Each command runs once first (to write bytecode caches), then five times; the figure is the median wall time of a
whole process, start to exit: what a person or a cron job waits for. `check-config` reads a small config; the
read-only commands read a small, migrated database with no run recorded (no Katapult call either way): an SQLite
file (target 0.5 s), or PostgreSQL with `--postgres URL` (target 0.6 s for the reads: the driver and a connection
handshake come on top).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import _common as c

TARGET_SECONDS = 0.5
POSTGRES_READ_TARGET_SECONDS = 0.6
RUNS = 5


def timed(args: list[str], *, cwd: Path, env: dict[str, str]) -> float:
    """Returns the wall time of one `python -m auditor ARGS` process; raises when it fails (`history` of a disk the
    empty database does not know exits 2 after the same reads: that counts as done)."""
    began = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "auditor", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=60)
    elapsed = time.perf_counter() - began
    if proc.returncode != 0 and not (args[0] == "history" and proc.returncode == 2):
        raise RuntimeError(f"auditor {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()[-300:]}")
    return elapsed


def main() -> int:
    p = c.parser(__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=RUNS)
    args = p.parse_args()
    report = c.header("cli_start", args, f"process start to exit, median of {args.runs}")
    # PYTHONDONTWRITEBYTECODE would make the warm-up run below write no bytecode cache, and every timed run compile
    # the auditor's sources again: not what an installed package (whose wheel install compiles them) starts like.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AUDITOR_") and k not in ("KATAPULT_API_TOKEN", "PYTHONDONTWRITEBYTECODE")}
    with c.workdir(args) as d, c.database(args, d) as db:
        config = d / "auditor.toml"
        config.write_text(
            f'[database]\nurl = "{db.url}"\n'
            '[audit]\ninterval = "15m"\ndisks = ["disk_aaaaaaaaaaaaaaaa"]\norganizations = ["acme"]\n'
            '[[notifiers]]\nkind = "webhook"\nname = "ops"\nurl = "http://127.0.0.1:9/hook"\n',
            encoding="utf-8",
        )
        timed(["db", "upgrade", "--config", str(config)], cwd=d, env=env)
        commands = {
            "auditor --help": ["--help"],
            "auditor check-config": ["check-config", "--config", str(config)],
            "auditor report": ["report", "--config", str(config)],
            "auditor findings": ["findings", "--config", str(config)],
            "auditor history": ["history", "disk_aaaaaaaaaaaaaaaa", "--config", str(config)],
        }
        for name, argv in commands.items():
            reads = argv[0] in ("report", "findings", "history")
            target = POSTGRES_READ_TARGET_SECONDS if reads and args.postgres else TARGET_SECONDS
            try:
                timed(argv, cwd=d, env=env)  # bytecode caches
                times = [timed(argv, cwd=d, env=env) for _ in range(args.runs)]
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                report.result(f"{name} start", target=f"<= {target:.1f} s", measured=f"could not run: {exc}",
                              passed=None)
                continue
            median = statistics.median(times)
            report.info(f"{name} runs", ", ".join(f"{t:.3f} s" for t in times))
            report.result(f"{name} start", target=f"<= {target:.1f} s",
                          measured=f"{median:.3f} s (median of {args.runs})", passed=median <= target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
