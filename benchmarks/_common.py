"""Shared benchmark plumbing: the fake Katapult in a subprocess, databases, settings, timing and result lines.

Every benchmark prints its figures as lines run_all.py collects:

    RESULT <script> | <figure> | target: <target> | measured: <measured> | PASS
    INFO   <script> | <figure> | <value>

PASS or MISS says whether the target was met; SKIP means the benchmark could not run (the reason follows).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import importlib
import json
import logging
import math
import os
import platform
import selectors
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
FAKE_TOKEN = "fake-token"
FAKE_READY_SECONDS = 60.0
FAKE_STOP_SECONDS = 15.0
DAEMON_READY_SECONDS = 240.0
DAEMON_STOP_SECONDS = 30.0
LOOPBACK = "127.0.0.1"


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


def missing(report: Report, module: str, *, figure: str, target: str) -> bool:
    """Returns whether `module` cannot be imported, after printing `figure` as SKIP (the benchmark cannot run)."""
    try:
        importlib.import_module(module)
    except ImportError as exc:
        report.result(figure, target=target, measured=f"{module} missing ({exc})", passed=None)
        return True
    return False


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


def fleet_with_findings(*, disks: int, unprotected: int, weekly: int) -> tuple[dict[str, Any], str]:
    """Returns a fleet file with `disks` disks, of which `unprotected` have no policy and `weekly` a weekly one."""
    from auditor.fake.fleet import Fleet

    now = int(time.time())
    generated = Fleet.generate(disks=disks, orgs=1, policies_per_disk=1.0, vm_share=0.0, seed=5, now=now)
    org = next(iter(generated.orgs.values()))
    policies = []
    by_disk = {p.target_id: p for p in generated.policies.values()}
    for i, disk_id in enumerate(generated.disks):
        p = by_disk[disk_id]
        if i % 2 == 0 and i // 2 < unprotected:
            continue  # unprotected-disk
        weekly_one = i % 2 == 1 and i // 2 < weekly
        policies.append({"id": p.id, "target_type": "Disk", "target_id": disk_id,
                         "retention": max(p.retention, 8), "interval": "weekly" if weekly_one else "daily",
                         "next_in_seconds": 3600, "total_size": p.total_size})
    data = {
        "rate_limit_per_minute": 100_000,
        "organizations": [{
            "id": org.id, "sub_domain": org.sub_domain, "name": org.name,
            "disks": [{"id": d.id, "name": d.name, "size_in_gb": d.size_in_gb} for d in generated.disks.values()],
            "policies": policies,
        }],
    }
    return data, org.id


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


# ------------------------------------------------------------------------------------------------ daemon and HTTP

# What a failed request raises in `HttpConnection` (the load counts it as an error by its class name).
HTTP_ERRORS = (OSError, asyncio.IncompleteReadError, ConnectionError)


def free_port() -> int:
    """Returns a loopback port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


def json_body(body: bytes) -> Any:
    """Parses a JSON body, unpacking it first if the server sent it gzipped."""
    return json.loads(gzip.decompress(body) if body[:2] == b"\x1f\x8b" else body)


class HttpConnection:
    """One keep-alive HTTP/1.1 connection: GET or POST with extra headers, Content-Length bodies.

    A minimal client, so the load generator costs little CPU on a 2-core machine. Like browsers, httpx, requests
    and curl --compressed it accepts gzip; a body that comes gzipped is not unpacked (see `json_body`).
    """

    def __init__(self, host: str, port: int, *, accept: str = "application/json") -> None:
        self.host = host
        self.port = port
        self.accept = accept
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, *, headers: dict[str, str] | None = None,
                      body: bytes = b"") -> tuple[int, dict[str, list[str]], bytes]:
        """Returns the status, headers (lower-case names, every value) and body of one request (reconnecting if
        the server closed the connection)."""
        if self._writer is None or self._writer.is_closing():
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port, limit=2**20)
            sock = self._writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assert self._reader is not None and self._writer is not None
        fields = {"Host": self.host, "Accept": self.accept, "Accept-Encoding": "gzip", **(headers or {})}
        head = [f"{method} {path} HTTP/1.1", *(f"{k}: {v}" for k, v in fields.items())]
        if method != "GET":
            head.append(f"Content-Length: {len(body)}")
        self._writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        raw = await self._reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        got: dict[str, list[str]] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name:
                got.setdefault(name.strip().lower(), []).append(value.strip())
        if "chunked" in ",".join(got.get("transfer-encoding", [])).lower():
            raise RuntimeError(f"{path}: chunked responses are not read by this client")
        data = await self._reader.readexactly(int(got.get("content-length", ["0"])[0]))
        if any(v.lower() == "close" for v in got.get("connection", [])):
            await self.close()
        return status, got, data

    async def get(self, path: str, *, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        """Returns the status and body of GET path."""
        status, _, body = await self.request("GET", path, headers=headers)
        return status, body

    async def close(self) -> None:
        """Closes the connection."""
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await self._writer.wait_closed()
        self._reader = self._writer = None


@dataclass
class Load:
    """Latencies (overall and per view) and outcomes of one load phase."""

    latencies: list[float] = field(default_factory=list)
    by_view: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    body_bytes: int = 0
    seconds: float = 0.0

    def error(self, kind: str) -> None:
        """Counts one error (an HTTP status other than 200, or an exception's class name)."""
        self.errors[kind] = self.errors.get(kind, 0) + 1


async def closed_loop(
    host: str,
    port: int,
    *,
    clients: int,
    seconds: float,
    next_request: Callable[[int, int], tuple[str, str, dict[str, str]]],
    answered: Callable[[int, bytes], None] | None = None,
    accept: str = "application/json",
) -> Load:
    """Runs `clients` closed-loop clients (one keep-alive connection each) for `seconds`; returns what they saw.

    Client n's i-th request is `next_request(n, i)`: (view, path, extra headers); `answered(n, body)` is given the
    body of each 200 answer. Latency is from sending a request to having read its whole body; requests still in
    flight at the end are waited for and counted. Every answer must be a 200: others count as errors.
    """
    result = Load()
    deadline = time.monotonic() + seconds

    async def client(n: int) -> None:
        conn = HttpConnection(host, port, accept=accept)
        i = 0
        try:
            while time.monotonic() < deadline:
                view, path, headers = next_request(n, i)
                i += 1
                began = time.monotonic()
                try:
                    status, body = await conn.get(path, headers=headers)
                except HTTP_ERRORS as exc:
                    result.error(type(exc).__name__)
                    await conn.close()
                    continue
                took = time.monotonic() - began
                result.latencies.append(took)
                result.by_view.setdefault(view, []).append(took)
                result.body_bytes = max(result.body_bytes, len(body))
                if status != 200:
                    result.error(str(status))
                elif answered is not None:
                    answered(n, body)
        finally:
            await conn.close()

    began = time.monotonic()
    await asyncio.gather(*(client(n) for n in range(clients)))
    result.seconds = time.monotonic() - began
    return result


def report_load(report: Report, name: str, result: Load, *, target_ms: float, figure: str | None = None,
                views: bool = False) -> None:
    """Prints a load phase: `<name> load` (rate, p50, p99, max, errors), with `views` also `<name> views` (p50 and
    p99 per view), then `<figure> p99` (figure: name by default) against `target_ms`, met only without errors."""
    lat = result.latencies
    p50 = percentile(lat, 50) * 1000
    p99 = percentile(lat, 99) * 1000
    rps = len(lat) / result.seconds if result.seconds else 0.0
    errors = ", ".join(f"{k}: {v}" for k, v in result.errors.items()) or "none"
    report.info(f"{name} load", f"{len(lat)} requests in {result.seconds:.1f} s = {rps:.1f} req/s; p50 {p50:.0f} ms, "
                                f"p99 {p99:.0f} ms, max {max(lat, default=0) * 1000:.0f} ms; errors {errors}")
    if views:
        report.info(f"{name} views", "; ".join(
            f"{view} p50 {percentile(v, 50) * 1000:.0f} / p99 {percentile(v, 99) * 1000:.0f} ms"
            for view, v in result.by_view.items()))
    report.result(f"{figure or name} p99", target=f"<= {target_ms:.0f} ms",
                  measured=f"{p99:.0f} ms (p50 {p50:.0f} ms, {rps:.1f} req/s)",
                  passed=p99 <= target_ms and not result.errors)


@dataclass
class Daemon:
    """`auditor run` in its own process, serving the API (and the dashboard) on a loopback port."""

    proc: subprocess.Popen[bytes]
    port: int
    api_token: str | None = None  # api.token: the API wants it as a bearer token, the dashboard a login
    host: str = LOOPBACK
    started: float = field(default_factory=time.monotonic)

    def connection(self, *, accept: str = "application/json") -> HttpConnection:
        """Returns a new (not yet connected) connection to the daemon."""
        return HttpConnection(self.host, self.port, accept=accept)

    async def first_cycle(self, report: Report, *, within: float = DAEMON_READY_SECONDS) -> dict[str, Any]:
        """Waits until the daemon has finished its first run, prints it as `first cycle` and returns it."""
        headers = {"Authorization": f"Bearer {self.api_token}"} if self.api_token else {}
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"auditor run exited with {self.proc.returncode} before it was ready")
            conn = self.connection()
            try:
                status, body = await conn.get("/api/v1/runs?limit=1", headers=headers)
                runs = json_body(body).get("runs", []) if status == 200 else []
                if runs and runs[0]["status"] != "running":
                    run = dict(runs[0])
                    report.info("first cycle", f"run {run['status']}, {run['disks_read']} disks, "
                                               f"{run['api_requests']} requests; daemon ready "
                                               f"{time.monotonic() - self.started:.1f} s after start")
                    return run
            except (*HTTP_ERRORS, ValueError):
                pass
            finally:
                await conn.close()
            await asyncio.sleep(0.5)
        raise SystemExit("auditor run did not finish its first cycle in time")


@contextlib.contextmanager
def daemon(settings: dict[str, Any], *, directory: Path, katapult_token: str, report: Report,
           api_token: str | None = None, py_spy: str | None = None) -> Iterator[Daemon]:
    """Runs `auditor run` with `settings` (see `settings_dict`) and an [api] section on a free loopback port.

    The config file and the daemon's log (daemon.log) go to `directory`; `api_token` guards the API and the
    dashboard; `py_spy` profiles the daemon with py-spy into that file (collapsed stacks). Afterwards the daemon is
    stopped (killed if it takes longer than DAEMON_STOP_SECONDS) and the log's tail noted if it exited with an error.
    """
    port = free_port()
    api: dict[str, Any] = {"listen": f"{LOOPBACK}:{port}"}
    if api_token:
        api["token"] = api_token
    config = write_config(directory / "auditor.toml", {**settings, "api": api})
    env = {**os.environ, "KATAPULT_API_TOKEN": katapult_token, "AUDITOR_CONFIG": str(config)}
    wrap = [str(Path(sys.executable).with_name("py-spy")), "record", "-r", "200", "-f", "raw", "-o",
            str(Path(py_spy).resolve()), "--"] if py_spy else []
    with (directory / "daemon.log").open("wb") as log:
        proc = subprocess.Popen([*wrap, *auditor_command(), "run"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                cwd=REPO)
        try:
            yield Daemon(proc, port, api_token)
        finally:
            if proc.poll() is None:
                # py-spy writes its profile on SIGINT (and passes it on); the daemon stops on either.
                proc.send_signal(signal.SIGINT if py_spy else signal.SIGTERM)
                try:
                    proc.wait(timeout=DAEMON_STOP_SECONDS)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    if proc.returncode not in (0, None):
        report.note(f"auditor run exited {proc.returncode}: "
                    f"{(directory / 'daemon.log').read_text(errors='replace')[-1500:]}")


@contextlib.contextmanager
def serving(args: argparse.Namespace, report: Report, *, disks: int, findings: int, interval: str,
            api_token: str | None = None, py_spy: str | None = None) -> Iterator[tuple[Daemon, Database]]:
    """Yields `auditor run` serving over a fresh database (see `daemon`), its first cycle auditing a fake Katapult
    whose one organization has `disks` disks and `findings` open findings (half of them disks without a policy,
    half with a weekly one); `interval` is the audit interval."""
    fleet, org_id = fleet_with_findings(disks=disks, unprotected=findings // 2, weekly=findings - findings // 2)
    with workdir(args) as tmp, database(args, tmp) as db, FakeKatapult(fleet, directory=tmp) as fake:
        data = settings_dict(api_url=fake.url, db_url=db.url, organizations=[org_id], rate=100_000)
        data["audit"]["interval"] = interval
        with daemon(data, directory=tmp, katapult_token=fake.token, report=report, api_token=api_token,
                    py_spy=py_spy) as served:
            yield served, db
