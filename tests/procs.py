"""Real processes for the multi-process tests: the fake Katapult, `auditor run`, `auditor audit --once`, their
configuration, and polling helpers. Shared by tests/test_replicas.py, tests/test_crash_recovery.py and
tests/test_daemon.py."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psycopg
import pytest

from auditor.fake.fleet import fake_id
from auditor.store import queries

KATAPULT_TOKEN = "fake-token"
API_TOKEN = "api-secret-for-replica-tests"
AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
SEED = 11
ORG = fake_id("org", f"gen:{SEED}:0")
STARTUP = 30.0
T = TypeVar("T")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(what: str, check: Callable[[], T | None], *, timeout: float = STARTUP, every: float = 0.05,
             alive: list[Any] | None = None) -> T:
    """Polls `check` until it returns something other than None, or fails the test naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        for proc in alive or ():
            if proc.proc.poll() is not None:
                pytest.fail(f"{proc} exited ({proc.proc.returncode}) while waiting for {what}:\n{proc.tail()}")
        result = check()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


def get(url: str, **kwargs: Any) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=5, **kwargs)
    except httpx.TransportError:
        return None


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUDITOR_") and k != "KATAPULT_API_TOKEN"}
    env["KATAPULT_API_TOKEN"] = KATAPULT_TOKEN
    return env


# ---- the fake Katapult ------------------------------------------------------------------------------------


def write_fleet(path: Path, *, disks: int, policies_per_disk: float = 1.0, latency_ms: int = 0,
                vm_share: float = 0.0) -> Path:
    """Writes a generated fleet file: one organization (ORG), `disks` disks with stable ids (`disk_id(i)`).

    policies_per_disk=0 leaves every disk without a policy (one `no-policy` finding each); 1 makes every disk
    compliant. The disk ids do not depend on the policies, so switching files resolves or opens findings.
    """
    path.write_text(json.dumps({"generate": {"disks": disks, "orgs": 1, "seed": SEED,
                                             "policies_per_disk": policies_per_disk, "vm_share": vm_share},
                                "rate_limit_per_minute": 1_000_000, "latency_ms": latency_ms}))
    return path


def disk_id(i: int) -> str:
    return fake_id("disk", f"gen:{SEED}:{i}")


class Fake:
    """`python -m auditor.fake` on a fixed loopback port; restartable on the same port with another fleet file."""

    def __init__(self, fleet_file: Path, port: int | None = None) -> None:
        self.fleet_file = fleet_file
        self.port = port or free_port()
        self.proc: subprocess.Popen[str] | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/core/v1"

    def start(self, fleet_file: Path | None = None) -> Fake:
        self.fleet_file = fleet_file or self.fleet_file
        deadline = time.monotonic() + 10
        while True:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "auditor.fake", "--port", str(self.port), "--fleet", str(self.fleet_file)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            assert self.proc.stdout is not None
            line = self.proc.stdout.readline()
            if f"listening on http://127.0.0.1:{self.port}/core/v1" in line:
                return self
            self.proc.communicate(timeout=10)  # the port may linger a moment after a kill: try again
            if time.monotonic() > deadline:
                raise AssertionError(f"the fake did not start: {line}")
            time.sleep(0.1)

    def restart(self, fleet_file: Path) -> None:
        self.kill()
        self.start(fleet_file)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=10)
        self.proc = None


# ---- configuration -----------------------------------------------------------------------------------------


def write_config(path: Path, *, katapult: str, database: str, api_port: int | None = None, interval: str = "3s",
                 leader_ttl: str = "3s", hook: str | None = None, group_by: tuple[str, ...] = ("disk_id",),
                 per_page: int = 5, max_concurrency: int = 8, grace: str = "3s", extra: str = "") -> Path:
    """Writes an auditor config auditing ORG, with a `webhook` notifier named "hook" when `hook` is a URL."""
    notifier = "" if hook is None else f"""
[[notifiers]]
kind = "webhook"
name = "hook"
url = "{hook}"
min_severity = "low"
group_by = {json.dumps(list(group_by))}
"""
    path.write_text(f"""
[katapult]
api_url = "{katapult}"
per_page = {per_page}
max_attempts = 2
timeout_seconds = 5
max_requests_per_minute = 100000
max_concurrency = {max_concurrency}
[database]
url = "{database}"
[audit]
interval = "{interval}"
jitter = "0s"
organizations = ["{ORG}"]
[api]
listen = "127.0.0.1:{api_port or free_port()}"
token = "{API_TOKEN}"
[daemon]
shutdown_grace = "{grace}"
db_retry_max = "2s"
leader_ttl = "{leader_ttl}"
[log]
level = "info"
format = "json"
{notifier}
{extra}
""")
    return path


def load_settings(config: Path) -> Any:
    """Returns the Settings of a config file, read as the CLI reads it (environment cleared of AUDITOR_*)."""
    from auditor.config import load_settings as load

    saved = dict(os.environ)
    try:
        os.environ.clear()
        os.environ.update(clean_env())
        return load(config)
    finally:
        os.environ.clear()
        os.environ.update(saved)


# ---- auditor processes -------------------------------------------------------------------------------------


class Proc:
    """An auditor subprocess whose stderr is collected line by line while it runs."""

    def __init__(self, args: list[str], *, name: str) -> None:
        self.name = name
        self.proc = subprocess.Popen([sys.executable, "-m", "auditor", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=clean_env())
        self.lines: list[str] = []
        self.out: list[str] = []
        self._readers = [threading.Thread(target=self._read, args=(self.proc.stderr, self.lines), daemon=True),
                         threading.Thread(target=self._read, args=(self.proc.stdout, self.out), daemon=True)]
        for t in self._readers:
            t.start()

    def __repr__(self) -> str:
        return f"<{self.name} pid {self.proc.pid}>"

    @staticmethod
    def _read(stream: Any, into: list[str]) -> None:
        for line in stream:
            into.append(line.rstrip("\n"))

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)

    def tail(self, n: int = 4000) -> str:
        return self.stderr[-n:]

    def messages(self) -> list[str]:
        """Returns the `msg` of every JSON log line (other lines as they are)."""
        out = []
        for line in list(self.lines):
            try:
                out.append(str(json.loads(line)["msg"]))
            except (ValueError, KeyError, TypeError):
                out.append(line)
        return out

    def wait(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self} did not exit within {timeout:.0f}s:\n{self.tail()}")
        for t in self._readers:
            t.join(timeout=5)
        return code

    def stop(self, timeout: float = 10) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        """SIGKILL, and reap it (an unreaped zombie would still look alive to a lease check)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        for t in self._readers:
            t.join(timeout=5)


def daemon(config: Path, *, name: str = "daemon") -> Proc:
    return Proc(["run", "--config", str(config)], name=name)


def audit_once(config: Path, *extra: str) -> Proc:
    return Proc(["audit", "--once", "--config", str(config), *extra], name="audit --once")


def api_base(config: Path) -> str:
    for line in config.read_text().splitlines():
        if line.startswith("listen = "):
            return "http://" + line.split('"')[1]
    raise AssertionError("no api.listen in the config")


# ---- the database, read in-process -------------------------------------------------------------------------


def run_sync(coro: Any) -> Any:
    """Runs a coroutine to its end on a fresh event loop (the tests themselves are synchronous)."""
    return asyncio.run(coro)


async def read_db(url: str, fn: Callable[[Any], Any]) -> Any:
    """Opens a Store on `url`, awaits fn(store) and closes the store."""
    from auditor.store.repo import Store

    store = Store.from_url(url)
    try:
        return await fn(store)
    finally:
        await store.close()


def runs(url: str) -> list[Any]:
    """Returns every run record, oldest first."""

    async def go(store: Any) -> list[Any]:
        return list(reversed(await store.read(queries.list_runs, limit=500)))

    result: list[Any] = run_sync(read_db(url, go))
    return result


def outbox(url: str) -> list[Any]:
    """Returns every outbox entry (Delivery), oldest first."""
    from auditor.store.outbox import Outbox

    async def go(store: Any) -> list[Any]:
        return list(reversed(await Outbox(store).recent(limit=10_000)))

    result: list[Any] = run_sync(read_db(url, go))
    return result


def findings(url: str) -> dict[str, tuple[str, Any, Any]]:
    """Returns every finding as fingerprint -> (status, opened_at, resolved_at)."""

    async def go(store: Any) -> dict[str, tuple[str, Any, Any]]:
        found = await store.read(queries.all_findings, statuses=["open", "resolved", "waived"])
        return {f.fingerprint: (f.status.value, f.opened_at, f.resolved_at) for f in found}

    result: dict[str, tuple[str, Any, Any]] = run_sync(read_db(url, go))
    return result


def assert_disjoint(records: list[Any]) -> None:
    """Asserts the runs' [started_at, finished_at] intervals are pairwise disjoint (a running run is open-ended)."""
    spans = sorted((r.started_at, r.finished_at, r.id, r.status.value) for r in records)
    for (s1, f1, id1, st1), (s2, _, id2, st2) in zip(spans, spans[1:], strict=False):
        assert f1 is not None or st1 == "failed", f"run {id1} ({st1}) has no end but another run started after it"
        if f1 is not None:
            assert f1 <= s2, f"runs overlap: {id1} ({st1}) [{s1}, {f1}] and {id2} ({st2}) starts {s2}"


# ---- PostgreSQL ---------------------------------------------------------------------------------------------


def libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


@contextmanager
def pg_schema(base_url: str) -> Iterator[tuple[str, str]]:
    """Yields (url, schema): a private PostgreSQL schema, dropped afterwards."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(libpq(base_url), autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    sep = "&" if "?" in base_url else "?"
    try:
        yield f"{base_url}{sep}options=-csearch_path%3D{schema}", schema
    finally:
        with psycopg.connect(libpq(base_url), autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


def schema_of(url: str) -> str | None:
    marker = "search_path%3D"
    return url.split(marker, 1)[1].split("&", 1)[0] if marker in url else None


def sql(url: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    """Runs one query with the raw driver (sqlite3 or psycopg) and returns its rows; `?` placeholders."""
    if url.startswith("sqlite"):
        import sqlite3

        with contextlib.closing(sqlite3.connect(url.split(":///", 1)[1], timeout=10)) as conn:
            return list(conn.execute(query, params).fetchall())
    with psycopg.connect(libpq(url), autocommit=True) as conn:
        return list(conn.execute(query.replace("?", "%s"), params).fetchall())


# ---- receivers ----------------------------------------------------------------------------------------------


class BlackHole:
    """A loopback port that accepts connections (in the kernel's backlog) and never reads or answers."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def close(self) -> None:
        self.sock.close()


def transitions(requests: list[Any]) -> list[tuple[str, tuple[str, str, str]]]:
    """Returns (Idempotency-Key, (fingerprint, status, startsAt)) for every alert of every webhook request."""
    out = []
    for r in requests:
        body = r.json()
        assert body["version"] == "4", body
        for alert in body["alerts"]:
            out.append((r.headers.get("idempotency-key", ""), (alert["fingerprint"], alert["status"],
                                                               alert["startsAt"])))
    return out


def assert_delivered_once(requests: list[Any], entries: list[Any], *, resent: frozenset[str] = frozenset()) -> None:
    """Asserts every outbox entry was delivered, each request's Idempotency-Key is an entry id, each key arrived
    once (twice for the `resent` ones: a send cut mid-flight) and each alert transition under exactly one key."""
    assert entries, "nothing was planned: the test would prove nothing"
    undelivered = [(e.id, e.state.value, e.last_error) for e in entries if e.state.value != "delivered"]
    assert not undelivered, f"outbox entries not delivered: {undelivered}"
    keys = collections.Counter(r.headers.get("idempotency-key") for r in requests)
    ids = {e.id for e in entries}
    assert set(keys) == ids, f"keys without entry: {set(keys) - ids}; entries never sent: {ids - set(keys)}"
    wrong = {k: n for k, n in keys.items() if n != (2 if k in resent else 1)}
    assert not wrong, f"Idempotency-Keys received a wrong number of times (resent: {sorted(resent)}): {wrong}"
    by_transition: dict[tuple[str, str, str], list[str]] = collections.defaultdict(list)
    for key, transition in transitions(requests):
        by_transition[transition].append(key)
    dupes = {t: ks for t, ks in by_transition.items() if len(set(ks)) != 1 or len(ks) != (2 if ks[0] in resent
                                                                                            else 1)}
    assert not dupes, f"alert transitions delivered more or less than once: {dupes}"
