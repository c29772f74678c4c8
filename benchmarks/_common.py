"""Shared benchmark plumbing: the fake Katapult in a subprocess, databases, settings, timing and result lines.

Every benchmark prints its figures as lines run_all.py collects:

    RESULT <script> | <figure> | target: <target> | measured: <measured> | PASS
    INFO   <script> | <figure> | <value>

PASS or MISS says whether the target was met; SKIP means the benchmark could not run (the reason follows).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import selectors
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
FAKE_TOKEN = "fake-token"
FAKE_READY_SECONDS = 60.0
FAKE_STOP_SECONDS = 15.0


# ------------------------------------------------------------------------------------------------ results

@dataclass
class Report:
    """Collects and prints one benchmark's figures; `missed` tells whether any target was missed."""

    script: str
    results: list[tuple[str, str, str, str]] = field(default_factory=list)

    def result(self, figure: str, *, target: str, measured: str, passed: bool | None) -> None:
        """Prints one figure against its target: PASS, MISS, or SKIP when `passed` is None."""
        verdict = "SKIP" if passed is None else ("PASS" if passed else "MISS")
        self.results.append((figure, target, measured, verdict))
        print(f"RESULT {self.script} | {figure} | target: {target} | measured: {measured} | {verdict}", flush=True)

    def info(self, figure: str, value: str) -> None:
        """Prints a figure that has no target (context for the ones that do)."""
        print(f"INFO   {self.script} | {figure} | {value}", flush=True)

    def note(self, text: str) -> None:
        """Prints a line of explanation."""
        print(f"       {text}", flush=True)

    @property
    def missed(self) -> bool:
        """Returns whether any target was missed."""
        return any(verdict == "MISS" for *_, verdict in self.results)


def machine() -> dict[str, str]:
    """Returns what the figures were measured on: cores, CPU model, RAM, Python and SQLite versions."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "ram": ram,
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "os": platform.platform(terse=True),
    }


def machine_line() -> str:
    """Returns the machine description as one line."""
    m = machine()
    return (f"{m['nproc']} cores, {m['cpu']}, {m['ram']} RAM, Python {m['python']}, SQLite {m['sqlite']}, "
            f"{m['os']}")


def parser(description: str) -> argparse.ArgumentParser:
    """Returns an argument parser with the options every benchmark has (--postgres, --keep)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--postgres", metavar="URL", default=os.environ.get("AUDITOR_BENCH_POSTGRES_URL") or None,
                   help="run against PostgreSQL (a private schema is created and dropped), e.g. "
                        "postgresql+psycopg://postgres@127.0.0.1:5432/test; default: an SQLite file")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (fleet file, database)")
    return p


def header(script: str, args: argparse.Namespace, what: str) -> Report:
    """Prints the benchmark's title and machine line and returns its Report."""
    # The auditor's own warnings (one per 429, say) would bury the figures; they are counted in the results.
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    print(f"# {script}: {what}", flush=True)
    print(f"machine: {machine_line()}", flush=True)
    print(f"database: {'PostgreSQL' if args.postgres else 'SQLite'}; load average at start: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    return Report(script)


@contextlib.contextmanager
def workdir(args: argparse.Namespace) -> Iterator[Path]:
    """Yields a temporary directory, removed afterwards unless --keep."""
    if args.keep:
        path = Path(tempfile.mkdtemp(prefix="auditor-bench-"))
        print(f"keeping {path}", flush=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="auditor-bench-") as name:
        yield Path(name)


# ------------------------------------------------------------------------------------------------ timing

class Stopwatch:
    """Measures wall time (monotonic clock) and CPU time of this process between start and stop."""

    def __init__(self) -> None:
        self.started = self.stopped = 0.0
        self.cpu_started = self.cpu_stopped = 0.0

    def __enter__(self) -> Stopwatch:
        self.started = time.monotonic()
        self.cpu_started = time.process_time()
        return self

    def __exit__(self, *_: object) -> None:
        self.stopped = time.monotonic()
        self.cpu_stopped = time.process_time()

    @property
    def seconds(self) -> float:
        """Returns the wall time measured."""
        return self.stopped - self.started

    @property
    def cpu_seconds(self) -> float:
        """Returns this process's CPU time over the same span."""
        return self.cpu_stopped - self.cpu_started


def percentile(values: Sequence[float], q: float) -> float:
    """Returns the q-th percentile (0..100) by linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def concurrency_for(*, latency_ms: float, rate_per_minute: float) -> int:
    """Returns a max_concurrency that keeps the pipe full: twice latency x rate, at least 8 (the default)."""
    in_flight = latency_ms / 1000 * rate_per_minute / 60
    return max(8, min(64, math.ceil(in_flight * 2)))


# ------------------------------------------------------------------------------------------------ fake

@dataclass
class FakeStats:
    """What the fake served, read from its `fake stats:` line at exit."""

    total: int = 0
    rate_limited: int = 0
    by_endpoint: dict[str, int] = field(default_factory=dict)
    by_status: dict[str, int] = field(default_factory=dict)
    arrivals: list[tuple[float, int, bool]] = field(default_factory=list)  # (monotonic time, permitted, admitted)


class FakeKatapult:
    """The fake Katapult in its own process on a free loopback port (see benchmarks/_fake.py).

    Use as a context manager; `.url` and `.token` while it runs, `.stats` after it stopped. The fleet is written
    to a JSON fleet file in `directory` (keys of `Fleet.from_file`: generate, rate_limit_per_minute, latency_ms,
    rate_limit_changes, ...).
    """

    def __init__(self, fleet: dict[str, Any], *, directory: Path, record: bool = False) -> None:
        self.fleet = fleet
        self.directory = directory
        self.record = record
        self.url = ""
        self.token = FAKE_TOKEN
        self.stats = FakeStats()
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> FakeKatapult:
        path = self.directory / f"fleet-{uuid.uuid4().hex[:8]}.json"
        path.write_text(json.dumps(self.fleet), encoding="utf-8")
        cmd = [sys.executable, str(HERE / "_fake.py"), "--host", "127.0.0.1", "--port", "0", "--fleet", str(path)]
        if self.record:
            cmd.append("--record")
        self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        line = self._readline(FAKE_READY_SECONDS)
        if not line.startswith("fake katapult listening on "):
            self._kill()
            err = self._proc.stderr.read() if self._proc.stderr else ""
            raise RuntimeError(f"the fake Katapult did not start: {line!r} {err[-2000:]}")
        # "fake katapult listening on http://127.0.0.1:N/core/v1 (token: fake-token)"
        rest = line.removeprefix("fake katapult listening on ")
        self.url, _, token = rest.partition(" (token: ")
        self.token = token.rstrip(")\n") or FAKE_TOKEN
        return self

    def _readline(self, timeout: float) -> str:
        assert self._proc is not None and self._proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self._proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                return ""
        return self._proc.stdout.readline()

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def __exit__(self, *_: object) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=FAKE_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            self._kill()
            out, err = proc.communicate()
        for line in out.splitlines():
            if line.startswith("fake stats: "):
                raw = json.loads(line.removeprefix("fake stats: "))
                self.stats = FakeStats(raw["total"], raw["rate_limited"], raw["by_endpoint"], raw["by_status"],
                                       [(float(t), int(p), bool(a)) for t, p, a in raw["arrivals"]])
        if proc.returncode not in (0, -signal.SIGTERM) and err.strip():
            print(f"fake katapult exited {proc.returncode}: {err.strip()[-2000:]}", file=sys.stderr)


def generated_fleet(
    *,
    disks: int,
    orgs: int = 1,
    policies_per_disk: float = 1.0,
    vm_share: float = 0.0,
    seed: int = 1,
    rate: int = 1000,
    latency_ms: float = 0.0,
    rate_limit_changes: Sequence[tuple[int, int]] = (),
) -> dict[str, Any]:
    """Returns a fleet file's content for a generated fleet (see `Fleet.generate`)."""
    data: dict[str, Any] = {
        "generate": {"disks": disks, "orgs": orgs, "policies_per_disk": policies_per_disk, "vm_share": vm_share,
                     "seed": seed},
        "rate_limit_per_minute": rate,
        "latency_ms": latency_ms,
    }
    if rate_limit_changes:
        data["rate_limit_changes"] = [list(pair) for pair in rate_limit_changes]
    return data


def fleet_objects(fleet: dict[str, Any]) -> Any:
    """Returns the `Fleet` a generated fleet file describes, built in this process (ids and counts only)."""
    from auditor.fake.fleet import Fleet

    return Fleet.from_dict(fleet, now=int(time.time()))


# ------------------------------------------------------------------------------------------------ database

@dataclass
class Database:
    """A scratch database: an SQLite file in the work directory, or a private schema in PostgreSQL."""

    url: str
    kind: str  # "sqlite" | "postgres"
    path: Path | None = None  # SQLite file
    schema: str | None = None  # PostgreSQL schema
    admin_url: str | None = None

    def size_bytes(self) -> int:
        """Returns the bytes the database uses (SQLite: pages in use after a WAL checkpoint; PG: relation sizes)."""
        if self.kind == "sqlite":
            assert self.path is not None
            with contextlib.closing(sqlite3.connect(self.path)) as conn:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                page_size = conn.execute("PRAGMA page_size").fetchone()[0]
                pages = conn.execute("PRAGMA page_count").fetchone()[0]
                free = conn.execute("PRAGMA freelist_count").fetchone()[0]
            return int((pages - free) * page_size)
        import psycopg

        assert self.admin_url is not None
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            row = conn.execute(
                "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relkind = 'r'",
                (self.schema,),
            ).fetchone()
        return int(row[0]) if row else 0

    def table_bytes(self) -> dict[str, int]:
        """Returns bytes per table, indexes included (SQLite via the dbstat table when available)."""
        if self.kind == "sqlite":
            assert self.path is not None
            with contextlib.closing(sqlite3.connect(self.path)) as conn:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                try:
                    rows = conn.execute(
                        "SELECT coalesce(m.tbl_name, d.name), sum(d.pgsize) FROM dbstat d "
                        "LEFT JOIN sqlite_master m ON m.name = d.name GROUP BY 1"
                    ).fetchall()
                except sqlite3.OperationalError:
                    return {}
            return {str(name): int(size) for name, size in rows}
        import psycopg

        assert self.admin_url is not None
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT c.relname, pg_total_relation_size(c.oid) FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relkind = 'r'",
                (self.schema,),
            ).fetchall()
        return {str(name): int(size) for name, size in rows}

    def live_table_bytes(self) -> dict[str, int] | None:
        """Returns bytes of live data per table, indexes included: the pages' bytes less their unused space (SQLite,
        via dbstat), so B-tree pages left part-empty by deletes do not count; None on PostgreSQL or without dbstat.
        """
        if self.kind != "sqlite":
            return None
        assert self.path is not None
        with contextlib.closing(sqlite3.connect(self.path)) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            try:
                rows = conn.execute(
                    "SELECT coalesce(m.tbl_name, d.name), sum(d.pgsize - d.unused) FROM dbstat d "
                    "LEFT JOIN sqlite_master m ON m.name = d.name GROUP BY 1"
                ).fetchall()
            except sqlite3.OperationalError:
                return None
        return {str(name): int(size) for name, size in rows}

    def row_counts(self, tables: Sequence[str]) -> dict[str, int]:
        """Returns the number of rows in each table."""
        if self.kind == "sqlite":
            assert self.path is not None
            with contextlib.closing(sqlite3.connect(self.path)) as conn:
                return {t: int(conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0]) for t in tables}
        import psycopg

        assert self.admin_url is not None
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'SET search_path TO "{self.schema}"')
            out = {}
            for t in tables:
                row = conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()
                out[t] = int(row[0]) if row else 0
            return out

    def vacuum(self) -> None:
        """Lets the database settle (PostgreSQL: VACUUM, so dead tuples are reusable; SQLite: a checkpoint)."""
        if self.kind == "sqlite":
            assert self.path is not None
            with contextlib.closing(sqlite3.connect(self.path)) as conn:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            return
        import psycopg

        assert self.admin_url is not None
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'SET search_path TO "{self.schema}"')
            conn.execute("VACUUM")


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


@contextlib.contextmanager
def database(args: argparse.Namespace, directory: Path, *, name: str = "auditor") -> Iterator[Database]:
    """Yields a fresh, empty database (SQLite file, or a private PostgreSQL schema dropped afterwards)."""
    if not args.postgres:
        path = directory / f"{name}.db"
        yield Database(url=f"sqlite:///{path}", kind="sqlite", path=path)
        return
    import psycopg

    base = args.postgres
    if not base.startswith("postgresql"):
        raise SystemExit("--postgres needs a postgresql:// or postgresql+psycopg:// URL")
    if base.startswith("postgresql://"):
        base = base.replace("postgresql://", "postgresql+psycopg://", 1)
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    admin = _libpq(base)
    with psycopg.connect(admin, autocommit=True, connect_timeout=10) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    sep = "&" if "?" in base else "?"
    try:
        yield Database(url=f"{base}{sep}options=-csearch_path%3D{schema}", kind="postgres", schema=schema,
                       admin_url=admin)
    finally:
        if not args.keep:
            with psycopg.connect(admin, autocommit=True, connect_timeout=10) as conn:
                conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


# ------------------------------------------------------------------------------------------------ auditor

def settings_dict(
    *,
    api_url: str,
    db_url: str,
    disks: Sequence[str] = (),
    organizations: Sequence[str] = (),
    rate: int = 1000,
    concurrency: int = 8,
    per_page: int = 200,
    timeout: float = 30.0,
    log_level: str = "warning",
) -> dict[str, Any]:
    """Returns the configuration (as the TOML would hold it) for auditing the fake Katapult."""
    return {
        "katapult": {"api_url": api_url, "max_requests_per_minute": rate, "max_concurrency": concurrency,
                     "per_page": per_page, "timeout_seconds": timeout},
        "database": {"url": db_url},
        "audit": {"disks": list(disks), "organizations": list(organizations), "jitter": "0s"},
        "log": {"level": log_level, "format": "text"},
    }


def settings(**kwargs: Any) -> Any:
    """Returns validated `Settings` for auditing the fake (see `settings_dict`)."""
    from auditor.config import Settings

    return Settings(**settings_dict(**kwargs))


def write_config(path: Path, data: dict[str, Any]) -> Path:
    """Writes a configuration dict as a TOML file for the `auditor` command and returns its path."""
    lines: list[str] = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {json.dumps(value)}")
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def auditor_command() -> list[str]:
    """Returns the command that runs the `auditor` CLI of this checkout's virtualenv."""
    exe = Path(sys.executable).with_name("auditor")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "auditor"]


def run_cli(args: Sequence[str], *, env: dict[str, str] | None = None,
            timeout: float = 600.0) -> tuple[int, str, str, float, int]:
    """Runs the auditor CLI; returns (exit code, stdout, stderr, wall seconds, peak RSS in bytes of that process)."""
    full_env = {**os.environ, **(env or {})}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        began = time.monotonic()
        proc = subprocess.Popen([*auditor_command(), *args], stdout=out, stderr=err, env=full_env, cwd=REPO,
                                text=True)
        deadline = began + timeout
        status = None
        rusage = None
        while status is None:
            pid, wstatus, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                status, rusage = wstatus, usage
                break
            if time.monotonic() > deadline:
                proc.kill()
                _, status, rusage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.02)
        wall = time.monotonic() - began
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        # ru_maxrss is in kilobytes on Linux.
        return proc.returncode, out.read(), err.read(), wall, int(rusage.ru_maxrss) * 1024 if rusage else 0


def fmt_ratio(value: float) -> str:
    """Returns a ratio like `1.03x`."""
    return f"{value:.2f}x"
