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
from datetime import datetime
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


# `auditor run` sent a SIGHUP by itself as early as it can be held: once SIGHUP is no longer the default action, or
# after 0.3 s (long before the daemon's own handlers, which come after the database and web stacks are imported).
EARLY_HANGUP = """
import os, signal, sys, threading, time
def hang_up():
    deadline = time.monotonic() + 0.3
    while signal.getsignal(signal.SIGHUP) is signal.SIG_DFL and time.monotonic() < deadline:
        time.sleep(0.001)
    os.kill(os.getpid(), signal.SIGHUP)
threading.Thread(target=hang_up, daemon=True).start()
from auditor.cli import main
sys.argv = ["auditor", "run", "--config", sys.argv[1]]
main()
"""


class Daemon:
    """`auditor run --config FILE` with a clean environment; its stderr is collected line by line as it runs."""

    def __init__(self, config: Path, *, early_hangup: bool = False) -> None:
        argv = ["-c", EARLY_HANGUP, str(config)] if early_hangup else ["-m", "auditor", "run", "--config", str(config)]
        self.proc = subprocess.Popen([sys.executable, *argv],
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
        """Sends SIGTERM; returns the exit code and how long the shutdown took by the daemon's own log: from its
        "SIGTERM received" line to its "auditor daemon stopped" line. The interpreter's start and teardown are left
        out (on a loaded machine they alone can take seconds); the process must still exit within `timeout`."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the daemon did not exit within {timeout:.0f}s of SIGTERM:\n{self.stderr[-4000:]}")
        self._reader.join(timeout=5)
        return self.proc.returncode, self.shutdown_seconds()

    def shutdown_seconds(self) -> float:
        """Seconds between the daemon's "SIGTERM received" and "auditor daemon stopped" log lines."""
        stamps: dict[str, datetime] = {}
        for line in self.lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            for key, text in (("signal", "SIGTERM received"), ("stopped", "auditor daemon stopped")):
                if isinstance(record, dict) and str(record.get("msg", "")).startswith(text):
                    stamps.setdefault(key, datetime.fromisoformat(record["ts"].replace("Z", "+00:00")))
        if len(stamps) != 2:
            pytest.fail(f"the daemon's log lacks its SIGTERM or its stop line:\n{self.stderr[-4000:]}")
        return (stamps["stopped"] - stamps["signal"]).total_seconds()

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
              extra: str = "", early_hangup: bool = False) -> tuple[Fake, Daemon, str]:
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
        daemon = Daemon(config, early_hangup=early_hangup)
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

    code, took = daemon.stop(timeout=5 + 10)
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
    code, took = daemon.stop(timeout=5 + 10)
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
    code, took = daemon.stop(timeout=1 + 15)
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


# ---- SIGHUP: reloading the configuration ----------------------------------------------------------------


def messages_of(daemon: Daemon) -> list[str]:
    return [json.loads(line)["msg"] for line in list(daemon.lines)]


def wait_ready(base: str, daemon: Daemon) -> None:
    wait_for("/readyz 200", lambda: (r := get(f"{base}/readyz")) is not None and r.status_code == 200 or None,
             alive=daemon)


def hangup(daemon: Daemon, *, expect: str) -> list[str]:
    """Sends SIGHUP and waits for a log line containing `expect` after it; returns the lines logged since."""
    seen = len(daemon.lines)
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for(f"'{expect}' in the log", lambda: any(expect in m for m in messages_of(daemon)[seen:]) or None,
             alive=daemon)
    return messages_of(daemon)[seen:]


def audit_now(base: str, daemon: Daemon) -> dict[str, Any]:
    """Starts a cycle through the API and returns its run once it has finished."""
    started = httpx.post(f"{base}/api/v1/audit", headers=AUTH, timeout=5)
    assert started.status_code == 202, started.text
    run_id = started.json()["run"]

    def finished() -> dict[str, Any] | None:
        run = next((r for r in latest_runs(base) or [] if r["id"] == run_id), None)
        return run if run is not None and run["status"] != "running" else None

    return wait_for(f"run {run_id} to finish", finished, alive=daemon)


def open_findings(base: str, rule: str) -> int:
    response = get(f"{base}/api/v1/findings", params={"rule": rule, "limit": 1000}, headers=AUTH)
    assert response is not None and response.status_code == 200, response
    return len(response.json()["findings"])


def metric(base: str, name: str) -> str:
    response = get(f"{base}/metrics")
    assert response is not None
    return next(line for line in response.text.splitlines() if line.startswith(name))


def test_a_sighup_while_the_daemon_starts_reloads_instead_of_ending_it(
        setup: Callable[..., tuple[Fake, Daemon, str]]) -> None:
    _, daemon, base = setup(early_hangup=True)
    wait_for("the reload of the SIGHUP held at start",
             lambda: any("reloading the configuration" in m for m in messages_of(daemon)) or None, alive=daemon)
    wait_ready(base, daemon)
    code, _ = daemon.stop(timeout=5 + 10)
    assert code == 0, daemon.stderr[-4000:]


def test_sighup_after_a_token_file_changed_says_the_token_changed(setup: Callable[..., tuple[Fake, Daemon, str]],
                                                                   tmp_path: Path) -> None:
    _, daemon, base = setup()
    wait_ready(base, daemon)
    config = tmp_path / "auditor.toml"
    token_file = tmp_path / "api-token"
    token_file.write_text("first-api-token-from-a-file\n")
    config.write_text(config.read_text().replace(f'token = "{API_TOKEN}"', f'token_file = "{token_file}"'))
    hangup(daemon, expect="configuration reloaded")
    # Only the file's content changes: no setting differs, but the token does, and the log says so (never its value).
    token_file.write_text("second-api-token-from-a-file\n")
    [reloaded] = [m for m in hangup(daemon, expect="configuration reloaded") if "configuration reloaded" in m]
    assert "the API token changed (in force now)" in reloaded, reloaded
    assert "second-api-token" not in daemon.stderr and "first-api-token" not in daemon.stderr
    new = get(f"{base}/api/v1/report", headers={"Authorization": "Bearer second-api-token-from-a-file"})
    old = get(f"{base}/api/v1/report", headers={"Authorization": "Bearer first-api-token-from-a-file"})
    assert new is not None and old is not None and (new.status_code, old.status_code) == (200, 401)


def test_sighup_puts_a_changed_rule_in_force_from_the_next_cycle(
        setup: Callable[..., tuple[Fake, Daemon, str]], tmp_path: Path) -> None:
    _, daemon, base = setup(interval="1h")
    wait_ready(base, daemon)
    assert open_findings(base, "retention-below-minimum") == 0  # every generated policy keeps 7 or more
    before = metric(base, "auditor_config_info")
    config = tmp_path / "auditor.toml"
    config.write_text(config.read_text() + "\n[rules]\nmin_retention = 1000\n")

    lines = hangup(daemon, expect="configuration reloaded")
    assert any("rules.min_retention" in m for m in lines), lines
    assert metric(base, "auditor_config_info") != before
    assert metric(base, "auditor_config_last_reload_success ") == "auditor_config_last_reload_success 1.0"
    run = audit_now(base, daemon)
    assert run["status"] == "complete", run
    assert open_findings(base, "retention-below-minimum") > 0

    config.write_text(config.read_text().replace("min_retention = 1000", "min_retention = 1"))
    hangup(daemon, expect="configuration reloaded")
    audit_now(base, daemon)
    assert open_findings(base, "retention-below-minimum") == 0  # resolved by the next cycle
    code, _ = daemon.stop(timeout=5 + 3)
    assert code == 0, daemon.stderr[-4000:]
    assert_clean_logs(daemon.stderr)


def test_sighup_with_a_broken_file_keeps_the_running_configuration(
        setup: Callable[..., tuple[Fake, Daemon, str]], tmp_path: Path) -> None:
    _, daemon, base = setup(interval="1h")
    wait_ready(base, daemon)
    before = metric(base, "auditor_config_info")
    config = tmp_path / "auditor.toml"
    good = config.read_text()
    config.write_text(good + "\n[rules]\nmin_retention = 1000\nno_such_key = 1\nmax_interval = \"fortnightly\"\n")

    lines = hangup(daemon, expect="configuration reload failed")
    problems = [m for m in lines if m.startswith("config error: ")]
    assert len(problems) == 2, lines
    assert any(m.startswith("config error: rules.no_such_key: unknown key") for m in problems)
    assert any(m.startswith("config error: rules.max_interval: ") for m in problems)
    assert daemon.proc.poll() is None
    assert metric(base, "auditor_config_reload_failures_total") == "auditor_config_reload_failures_total 1.0"
    assert metric(base, "auditor_config_last_reload_success ") == "auditor_config_last_reload_success 0.0"
    assert metric(base, "auditor_config_info") == before
    ready = get(f"{base}/readyz")
    assert ready is not None and ready.status_code == 200, ready.text if ready else None
    audit_now(base, daemon)
    assert open_findings(base, "retention-below-minimum") == 0  # the old min_retention (7) still judges

    config.write_text(good)  # fixed: the next SIGHUP succeeds, the failures stay counted
    hangup(daemon, expect="configuration reloaded")
    assert metric(base, "auditor_config_last_reload_success ") == "auditor_config_last_reload_success 1.0"
    assert metric(base, "auditor_config_reload_failures_total") == "auditor_config_reload_failures_total 1.0"
    code, _ = daemon.stop(timeout=5 + 3)
    assert code == 0, daemon.stderr[-4000:]
    assert_clean_logs(daemon.stderr)


def test_sighup_changing_the_database_url_needs_a_restart_and_keeps_the_old_one(
        setup: Callable[..., tuple[Fake, Daemon, str]], tmp_path: Path) -> None:
    _, daemon, base = setup(interval="1h")
    wait_ready(base, daemon)
    config = tmp_path / "auditor.toml"
    old_url = f"sqlite:///{tmp_path / 'auditor.db'}"
    text = config.read_text()
    assert f'url = "{old_url}"' in text
    config.write_text(text.replace(f'url = "{old_url}"',
                                   'url = "postgresql+psycopg://auditor:new-db-password@127.0.0.1:1/other"'))

    lines = hangup(daemon, expect="configuration reloaded")
    restart = [m for m in lines if "needs a restart" in m]
    assert len(restart) == 1 and restart[0].startswith("config reload: database.url changed"), lines
    run = audit_now(base, daemon)  # still on the SQLite file: PostgreSQL on port 1 would fail it
    assert run["status"] == "complete"
    with sqlite3.connect(tmp_path / "auditor.db") as conn:
        assert conn.execute("SELECT count(*) FROM audit_runs WHERE id = ?", (run["id"],)).fetchone() == (1,)
    code, _ = daemon.stop(timeout=5 + 3)
    assert code == 0, daemon.stderr[-4000:]
    assert "new-db-password" not in daemon.stderr
    assert_clean_logs(daemon.stderr)


def test_sighup_shortening_the_interval_reschedules_the_audit(
        setup: Callable[..., tuple[Fake, Daemon, str]], tmp_path: Path) -> None:
    _, daemon, base = setup(interval="1h", disks=5)
    wait_ready(base, daemon)
    config = tmp_path / "auditor.toml"
    config.write_text(config.read_text().replace('interval = "1h"', 'interval = "1s"'))
    hangup(daemon, expect="configuration reloaded")
    wait_for("three scheduled cycles", lambda: len([r for r in latest_runs(base) or []
                                                      if r["trigger"] == "schedule"]) >= 3 or None,
             alive=daemon, timeout=15)
    code, _ = daemon.stop(timeout=5 + 3)
    assert code == 0, daemon.stderr[-4000:]
