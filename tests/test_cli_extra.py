"""The CLI for people and cron jobs: `audit --once` retrying within its drain budget, `check-config` showing what is
in effect (secrets redacted, durations as written), and a command line that starts without the heavy imports."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from receivers import HttpReceiver, RecordingApp, Reply
from test_cli import SECRET, clean_env, write

from auditor.config import format_duration, parse_duration
from auditor.fake import FakeServer, Fleet

pytestmark = pytest.mark.slow

BARE = "disk_barebarebarebare"  # no backup policy: one critical `unprotected-disk` finding


@pytest.fixture
def katapult() -> Iterator[FakeServer]:
    fleet = Fleet(rate_limit_per_minute=100_000)
    fleet.tokens.add(SECRET)
    org = fleet.add_org("acme", id="org_acmeacmeacmeacme")
    fleet.add_disk(org.id, "bare", id=BARE)
    with FakeServer(fleet) as server:
        yield server


def _audit_once(tmp_path: Path, katapult: FakeServer, hook_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    config = write(tmp_path / "auditor.toml", (
        "[katapult]\nmax_requests_per_minute = 60000\nmax_attempts = 1\ntimeout_seconds = 5\n"
        f'[database]\nurl = "sqlite:///{tmp_path / "auditor.db"}"\n'
        f"[audit]\ndisks = {json.dumps([BARE])}\n"
        f'[[notifiers]]\nkind = "webhook"\nname = "hook"\nurl = "{hook_url}"\nmin_severity = "low"\n'
    ))
    env = clean_env(AUDITOR_KATAPULT__API_URL=katapult.url, KATAPULT_API_TOKEN=SECRET)
    return subprocess.run([sys.executable, "-m", "auditor", "audit", "--once", "--config", str(config), *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def _outbox_states(tmp_path: Path) -> list[str]:
    with sqlite3.connect(tmp_path / "auditor.db") as conn:
        return [state for (state,) in conn.execute("SELECT state FROM outbox")]


def test_audit_once_retries_transient_failures_within_its_drain_budget(tmp_path: Path,
                                                                         katapult: FakeServer) -> None:
    busy = Reply(500, "try later", {"Retry-After": "1"})
    with HttpReceiver() as receiver:
        receiver.script(busy, busy)  # then the default 200
        # Backoff is full jitter over 5s, then 10s (never under Retry-After): at most ~15s of waiting.
        proc = _audit_once(tmp_path, katapult, receiver.url + "/alerts", "--drain-timeout", "40")
        requests = list(receiver.requests)
    assert proc.returncode == 1, proc.stderr  # complete, with an open finding
    assert len(requests) == 3, [r.path for r in requests]
    assert len({r.headers.get("idempotency-key") for r in requests}) == 1  # one notification, retried
    assert requests[-1].json()["status"] == "firing"
    assert "not yet delivered" not in proc.stderr
    assert _outbox_states(tmp_path) == ["delivered"]


def test_audit_once_leaves_what_cannot_be_delivered_in_time_with_the_reason(tmp_path: Path,
                                                                            katapult: FakeServer) -> None:
    app = RecordingApp(default=Reply(503, "down for maintenance", {"Retry-After": "40"}))
    began = time.monotonic()
    with HttpReceiver(app) as receiver:
        proc = _audit_once(tmp_path, katapult, receiver.url + "/alerts", "--drain-timeout", "5")
        tried = len(receiver.requests)
    assert proc.returncode == 1, proc.stderr
    assert tried == 1  # the retry at +40s does not fit in 5s: not tried again, not shortened
    assert time.monotonic() - began < 30
    line = next(x for x in proc.stderr.splitlines() if "not yet delivered" in x)
    assert re.search(r"^1 notification\(s\) not yet delivered: hook: HTTP 503\b.*\(next try in (3\d|40)s\); "
                     r"they stay in the outbox", line), line
    assert receiver.url not in proc.stderr
    assert _outbox_states(tmp_path) == ["pending"]


HOOK_SECRET = "hook-path-S3CRET-91b2"
HMAC = "hmac-S3CRET-55aa"
ROUTING = "pd-routing-S3CRET-0c0c"
SMTP_PASSWORD = "smtp-S3CRET-77ee"
API_TOKEN = "api-token-S3CRET-4242"
DB_PASSWORD = "db-S3CRET-1313"

FULL = f"""
[database]
url = "postgresql+psycopg://auditor:{DB_PASSWORD}@db.example.com/auditor"

[api]
token = "{API_TOKEN}"

[audit]
interval = "20s"
disks = ["disk_aaaaaaaaaaaaaaaa", "disk_bbbbbbbbbbbbbbbb"]
organizations = ["acme"]

[rules]
min_retention = 7
stale_grace = "90m"
severity = {{ "schedule-stale" = "critical" }}
disabled = ["disk-in-trash"]

[[rules.overrides]]
disks = ["disk_aaaaaaaaaaaaaaaa"]
min_retention = 30
stale_grace = "2d"

[[waivers]]
rule = "unprotected-disk"
disk = "disk_aaaaaaaaaaaaaaaa"
reason = "being decommissioned"
owner = "ops@example.com"
expires = 2099-01-01

[[waivers]]
rule = "unprotected-disk"
disk = "disk_bbbbbbbbbbbbbbbb"
reason = "was fine"
owner = "old@example.com"
expires = 2001-01-01

[[notifiers]]
kind = "webhook"
name = "ops"
url = "https://hooks.example.com/{HOOK_SECRET}"
secret = "{HMAC}"

[[notifiers]]
kind = "pagerduty"
name = "pager"
routing_key = "{ROUTING}"
min_severity = "critical"
repeat_interval = "0"

[[notifiers]]
kind = "email"
name = "mail"
host = "smtp.example.com"
from = "auditor@example.com"
to = ["ops@example.com"]
username = "auditor"
password = "{SMTP_PASSWORD}"
repeat_interval = "1d"
"""


def test_check_config_prints_what_is_in_effect_without_secrets(tmp_path: Path) -> None:
    config = write(tmp_path / "full.toml", FULL)
    proc = subprocess.run([sys.executable, "-m", "auditor", "check-config", "--config", str(config)], cwd=tmp_path,
                          env=clean_env(KATAPULT_API_TOKEN=SECRET), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for secret in (HOOK_SECRET, HMAC, ROUTING, SMTP_PASSWORD, API_TOKEN, DB_PASSWORD, SECRET, "hooks.example.com"):
        assert secret not in out + proc.stderr, secret
    for expected in (
        "2 disk(s), 1 organization(s); interval 20s; notifiers: 3; katapult token: set",
        "disks: disk_aaaaaaaaaaaaaaaa, disk_bbbbbbbbbbbbbbbb",
        "organizations: acme",
        "rule parameters: min_retention 7, min_retention_days 7, max_interval daily, stale_grace 90m",
        "rule schedule-stale: critical (default ",
        "rule disk-in-trash: disabled",
        "rule unprotected-disk: critical",
        "override for disk_aaaaaaaaaaaaaaaa: min_retention 30, stale_grace 2d",
        "waivers: 1 in force, 1 not applying",
        "waiver unprotected-disk on disk_aaaaaaaaaaaaaaaa until 2099-01-01 (ops@example.com): being decommissioned",
        "warning: waivers[1] does not apply: expired on 2001-01-01",
        "notifier ops (webhook): min_severity high, repeat_interval 4h",
        "notifier pager (pagerduty): min_severity critical, repeat_interval never",
        "notifier mail (email): min_severity high, repeat_interval 1d",
    ):
        assert expected in out, f"{expected!r} not in:\n{out}"
    assert "0:00:20" not in out


@pytest.mark.parametrize(("written", "shown"), [
    ("20s", "20s"), ("90s", "90s"), ("15m", "15m"), ("4h", "4h"), ("36h", "36h"), ("7d", "7d"), ("3600", "1h"),
    ("1.5s", "1.5s"), ("250ms", "250ms"), ("0", "0s"),
])
def test_durations_are_printed_as_written(written: str, shown: str) -> None:
    assert format_duration(parse_duration(written)) == shown
    assert parse_duration(format_duration(parse_duration(written))) == parse_duration(written)


def test_format_duration_of_odd_values() -> None:
    assert format_duration(timedelta(seconds=61)) == "61s"
    assert format_duration(timedelta(seconds=-30)) == "-30s"
    assert format_duration(timedelta(microseconds=1500)) == "0.0015s"


HEAVY = ("pydantic", "rich", "sqlalchemy", "alembic", "httpx", "fastapi", "uvicorn", "auditor.daemon")


@pytest.mark.parametrize(("args", "allowed"), [
    (["--help"], ()),
    (["check-config"], ("pydantic", "rich")),
])
def test_the_command_line_starts_without_heavy_imports(tmp_path: Path, args: list[str],
                                                       allowed: tuple[str, ...]) -> None:
    probe = (
        "import sys\nfrom auditor.cli import main\n"
        f"try:\n    main({args!r}, standalone_mode=False)\nexcept SystemExit:\n    pass\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=clean_env(), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    loaded = proc.stdout.strip().splitlines()[-1]
    assert loaded == repr(sorted(allowed)), loaded
