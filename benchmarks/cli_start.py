"""CLI start: `auditor --help`, `auditor check-config` and `auditor report` as fresh processes, median of 5 each.

Each command runs once first (to write bytecode caches), then five times; the figure is the median wall time of a
whole process, start to exit: what a person or a cron job waits for. `check-config` reads a small config;
`report` reads a small, migrated database with no run recorded (no Katapult call either way): an SQLite file, or
PostgreSQL with `--postgres URL`.
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
RUNS = 5


def timed(args: list[str], *, cwd: Path, env: dict[str, str]) -> float:
    """Returns the wall time of one `python -m auditor ARGS` process; raises when it fails."""
    began = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "auditor", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=60)
    elapsed = time.perf_counter() - began
    if proc.returncode != 0:
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
        }
        for name, argv in commands.items():
            try:
                timed(argv, cwd=d, env=env)  # bytecode caches
                times = [timed(argv, cwd=d, env=env) for _ in range(args.runs)]
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                report.result(f"{name} start", target=f"<= {TARGET_SECONDS:.1f} s", measured=f"could not run: {exc}",
                              passed=None)
                continue
            median = statistics.median(times)
            report.info(f"{name} runs", ", ".join(f"{t:.3f} s" for t in times))
            report.result(f"{name} start", target=f"<= {TARGET_SECONDS:.1f} s",
                          measured=f"{median:.3f} s (median of {args.runs})", passed=median <= TARGET_SECONDS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
