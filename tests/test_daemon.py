"""`auditor run` as a real process against the fake Katapult on a loopback port: readiness, the API, SIGTERM,
a Katapult that dies mid-cycle, a database that is down at start, and a cycle abandoned after the grace."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from procs import KATAPULT_TOKEN, STARTUP, Fake, clean_env, free_port, get
from receivers import HttpReceiver

from auditor.fake.fleet import fake_id

pytestmark = pytest.mark.slow

API_TOKEN = "api-secret-for-daemon-tests"
AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
SEED = 7
ORG = fake_id("org", f"gen:{SEED}:0")
T = TypeVar("T")


def wait_for(what: str, check: Callable[[], T | None], *, timeout: float = STARTUP,
             alive: Daemon | None = None) -> T:
    """Polls `check` until it returns something other than None (or fails the test naming `what`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive is not None and alive.proc.poll() is not None:
            pytest.fail(f"the daemon exited ({alive.proc.returncode}) while waiting for {what}:\n"
                        f"{alive.stderr[-4000:]}")
        result = check()
        if result is not None:
            return result
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


class Daemon:
    """`auditor run --config FILE` with a clean environment; its stderr is collected line by line as it runs."""

    def __init__(self, config: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "auditor", "run", "--config", str(config)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=clean_env())
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)

    def stop(self, *, timeout: float) -> tuple[int, float]:
        """Sends SIGTERM; returns the exit code and how long the exit took."""
        began = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the daemon did not exit within {timeout:.0f}s of SIGTERM:\n{self.stderr[-4000:]}")
        took = time.monotonic() - began
        self._reader.join(timeout=5)
        return self.proc.returncode, took

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._reader.join(timeout=5)


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Callable[..., tuple[Fake, Daemon, str]]]:
    """Builds a fleet file, a config and starts the fake and the daemon; kills whatever is left at the end."""
    started: list[Fake | Daemon] = []

    def start(*, latency_ms: int = 0, disks: int = 30, grace: str = "5s", interval: str = "2s",
              database_url: str | None = None, fake: bool = True, disk_ids: tuple[str, ...] = (),
              extra: str = "") -> tuple[Fake, Daemon, str]:
        fleet_file = tmp_path / "fleet.json"
        fleet_file.write_text(json.dumps({"generate": {"disks": disks, "orgs": 1, "seed": SEED},
                                          "rate_limit_per_minute": 100000, "latency_ms": latency_ms}))
        katapult = Fake(fleet_file)
        if fake:
            katapult.start()
            started.append(katapult)
        api_port = free_port()
        db = database_url or f"sqlite:///{tmp_path / 'auditor.db'}"
        config = tmp_path / "auditor.toml"
        config.write_text(f"""
[katapult]
api_url = "http://127.0.0.1:{katapult.port}/core/v1"
per_page = 5
max_attempts = 2
timeout_seconds = 5
max_requests_per_minute = 100000
[database]
url = "{db}"
[audit]
interval = "{interval}"
jitter = "0s"
organizations = ["{ORG}"]
disks = {json.dumps(list(disk_ids))}
[api]
listen = "127.0.0.1:{api_port}"
token = "{API_TOKEN}"
[daemon]
shutdown_grace = "{grace}"
db_retry_max = "2s"
[log]
level = "info"
format = "json"
{extra}
""")
        daemon = Daemon(config)
        started.append(daemon)
        return katapult, daemon, f"http://127.0.0.1:{api_port}"

    yield start
    for thing in reversed(started):
        thing.kill()


def latest_runs(base: str) -> list[dict[str, Any]] | None:
    response = get(f"{base}/api/v1/runs", params={"limit": 50}, headers=AUTH)
    if response is None or response.status_code != 200:
        return None
    runs: list[dict[str, Any]] = response.json()["runs"]
    return runs


def assert_clean_logs(stderr: str) -> None:
    assert KATAPULT_TOKEN not in stderr and API_TOKEN not in stderr
    assert "Authorization" not in stderr and "Bearer" not in stderr
    for line in stderr.splitlines():
        record = json.loads(line)  # every line is a JSON object (format = "json")
        assert "exc" not in record and "Traceback" not in record["msg"], line
        assert not record["logger"].startswith("apscheduler") or record["level"] == "info", line


def test_serves_reports_and_exits_0_on_sigterm(setup: Callable[..., tuple[Fake, Daemon, str]], db_url: str) -> None:
    # Once on SQLite, once on PostgreSQL (when configured): `auditor run` works the same on both.
    _, daemon, base = setup(database_url=db_url)
    ready = wait_for("/readyz 200", lambda: (r := get(f"{base}/readyz")) is not None and r.status_code == 200 or None,
                     alive=daemon)
    assert ready
    assert get(f"{base}/healthz").status_code == 200  # type: ignore[union-attr]
    assert get(f"{base}/api/v1/report").status_code == 401  # type: ignore[union-attr]
    response = get(f"{base}/api/v1/report", headers=AUTH)
    assert response is not None and response.status_code == 200
    report = response.json()
    assert report["last_run"]["status"] == "complete"
    assert report["summary"]["disks_total"] == 30 and report["summary"]["unknown"] == 0
    metrics = get(f"{base}/metrics")
    assert metrics is not None and "auditor_cycles_total" in metrics.text

    code, took = daemon.stop(timeout=5 + 3)
    assert code == 0, daemon.stderr[-4000:]
    assert took < 5
    assert_clean_logs(daemon.stderr)
    messages = [json.loads(line)["msg"] for line in daemon.stderr.splitlines()]
    assert any(m.startswith("audit run ") and " complete in " in m for m in messages)
    assert "SIGTERM received: shutting down" in messages and messages[-1] == "auditor daemon stopped"


def test_survives_katapult_dying_mid_cycle_and_recovers(setup: Callable[..., tuple[Fake, Daemon, str]]) -> None:
    fake, daemon, base = setup(latency_ms=60)
    wait_for("/readyz 200", lambda: (r := get(f"{base}/readyz")) is not None and r.status_code == 200 or None,
             alive=daemon)
    first = latest_runs(base)
    assert first and first[0]["status"] == "complete"

    def running() -> dict[str, Any] | None:
        runs = latest_runs(base)
        return runs[0] if runs and runs[0]["status"] == "running" else None

    interrupted = wait_for("a cycle in progress", running, alive=daemon)
    fake.kill()

    def failed_since() -> dict[str, Any] | None:
        # Normally the interrupted run itself; if the kill landed after its last request, the next cycle's.
        runs = latest_runs(base) or []
        return next((r for r in runs if r["status"] in ("failed", "partial")
                     and r["started_at"] >= interrupted["started_at"]), None)

    broken = wait_for("a failed cycle recorded", failed_since, alive=daemon)
    assert broken["status"] in ("failed", "partial")
    assert broken["errors"] and all(e["code"] in ("connection_error", "transport_error", "timeout")
                                    for e in broken["errors"])
    assert daemon.proc.poll() is None
    assert get(f"{base}/healthz").status_code == 200  # type: ignore[union-attr]

    fake.start()  # the same port again
    restarted = time.time()

    def recovered() -> dict[str, Any] | None:
        runs = latest_runs(base) or []
        return next((r for r in runs if r["status"] == "complete"
                     and r["started_at"] > time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(restarted))), None)

    wait_for("a complete cycle after the fake came back", recovered, alive=daemon)
    code, _ = daemon.stop(timeout=5 + 3)
    assert code == 0, daemon.stderr[-4000:]
    assert_clean_logs(daemon.stderr)
    assert "the next cycle will try again" not in daemon.stderr  # Katapult trouble is a recorded run, not an error


def test_database_down_at_start_is_retried_not_a_crash(setup: Callable[..., tuple[Fake, Daemon, str]]) -> None:
    _, daemon, base = setup(database_url="postgresql+psycopg://auditor:db-password@127.0.0.1:1/auditor",
                            fake=False)
    wait_for("a retry", lambda: sum("unavailable at start" in line for line in daemon.lines) >= 2 or None,
             alive=daemon)
    # The API is up meanwhile: alive, not ready (and why), no audit to trigger yet.
    assert get(f"{base}/healthz").status_code == 200  # type: ignore[union-attr]
    ready = get(f"{base}/readyz")
    assert ready is not None and ready.status_code == 503
    assert ready.json()["reason"].startswith("database unavailable") and "db-password" not in ready.text
    trigger = httpx.post(f"{base}/api/v1/audit", headers=AUTH, timeout=5)
    assert trigger.status_code == 503 and "starting" in trigger.json()["detail"]
    code, took = daemon.stop(timeout=5)
    assert code == 0 and took < 3, daemon.stderr[-4000:]
    retries = [json.loads(line) for line in daemon.stderr.splitlines()
               if "unavailable at start" in json.loads(line)["msg"]]
    assert len(retries) >= 2 and retries[0]["attempt"] == 1
    assert "db-password" not in daemon.stderr
    assert "stopped while waiting for the database" in daemon.stderr


def test_cycle_abandoned_after_the_grace_is_marked_failed(setup: Callable[..., tuple[Fake, Daemon, str]],
                                                          tmp_path: Path) -> None:
    # 3 s a request: the first cycle's first page alone outlasts the 1 s grace.
    _, daemon, base = setup(latency_ms=3000, grace="1s", interval="1h")

    def running() -> str | None:
        runs = latest_runs(base)
        return runs[0]["id"] if runs and runs[0]["status"] == "running" else None

    run_id = wait_for("the first cycle to start", running, alive=daemon)
    code, took = daemon.stop(timeout=1 + 6)
    assert code == 0, daemon.stderr[-4000:]
    assert took < 1 + 4
    assert "abandoning the running audit cycle" in daemon.stderr
    with sqlite3.connect(tmp_path / "auditor.db") as conn:
        status, errors = conn.execute("SELECT status, errors FROM audit_runs WHERE id = ?", (run_id,)).fetchone()
    assert status == "failed" and json.loads(errors)[0]["code"] == "abandoned"


def test_alerts_are_delivered_by_the_daemon(setup: Callable[..., tuple[Fake, Daemon, str]]) -> None:
    with HttpReceiver() as receiver:
        hook = receiver.url + "/alerts"
        # A disk id that does not exist is a `disk-not-found` finding, so the first cycle has an alert to send.
        _, daemon, _ = setup(disk_ids=("disk_doesnotexist00",), extra=f"""
[[notifiers]]
kind = "webhook"
name = "hook"
url = "{hook}"
min_severity = "low"
""")
        wait_for("an alert at the webhook", lambda: receiver.requests or None, alive=daemon)
        body = receiver.requests[0].json()
        assert body["status"] == "firing" and body["alerts"][0]["labels"]["alertname"] == "disk-not-found"
        code, _ = daemon.stop(timeout=5 + 3)
    assert code == 0, daemon.stderr[-4000:]
    assert_clean_logs(daemon.stderr)
    assert hook not in daemon.stderr and receiver.url not in daemon.stderr
