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
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from procs import free_port
from receivers import HttpReceiver, RecordingApp, Reply
from sqlalchemy import select
from test_cli import SECRET, WAIVERS, clean_env, write

from auditor.config import Settings, format_duration, parse_duration
from auditor.errors import StoreError
from auditor.fake import FakeServer, Fault, Fleet
from auditor.fake import create_app as fake_app
from auditor.service import open_services
from auditor.service.cycle import run_cycle
from auditor.service.queries import (
    current_disk_detail,
    current_findings,
    current_report,
    read_disk_detail,
    read_report,
)
from auditor.service.reports import REPORTED_STATUSES
from auditor.store import engine as db
from auditor.store import queries, writes
from auditor.store.tables import runs

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
{WAIVERS}
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


# check-config shares the service's reading of the settings (`auditor.service.configuration`), not its wiring.
HEAVY = ("pydantic", "rich", "sqlalchemy", "alembic", "httpx", "fastapi", "uvicorn", "auditor.daemon", "auditor.store",
         "auditor.service.services")


def _probe_imports(tmp_path: Path, args: list[str], watched: tuple[str, ...], *,
                   must_succeed: bool = False) -> subprocess.CompletedProcess[str]:
    """Runs `main(args)` in a fresh interpreter, which prints last the sorted list of the `watched` modules it
    imported; with `must_succeed`, a non-zero exit of the command fails the interpreter."""
    on_exit = "assert not exc.code, exc" if must_succeed else "pass"
    probe = (
        "import sys\nfrom auditor.cli import main\n"
        f"try:\n    main({args!r}, standalone_mode=False)\nexcept SystemExit as exc:\n    {on_exit}\n"
        f"print(sorted(m for m in {watched!r} if m in sys.modules))\n"
    )
    return subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=clean_env(), capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize(("args", "allowed"), [
    (["--help"], ()),
    (["check-config"], ("pydantic", "rich")),
])
def test_the_command_line_starts_without_heavy_imports(tmp_path: Path, args: list[str],
                                                       allowed: tuple[str, ...]) -> None:
    proc = _probe_imports(tmp_path, args, HEAVY)
    assert proc.returncode == 0, proc.stderr
    loaded = proc.stdout.strip().splitlines()[-1]
    assert loaded == repr(sorted(allowed)), loaded


# ---- `auditor report`: the current report without the ORM ------------------------------------------------------

# What `auditor report` must not load (benchmarks/cli_start.py times it): of HEAVY only pydantic (the config), rich
# (the table) and SQLAlchemy's Core (the store's queries, on a synchronous connection).
NOT_FOR_REPORT = tuple(m for m in HEAVY if m not in ("pydantic", "rich", "sqlalchemy", "auditor.store")) + (
    "sqlalchemy.orm", "sqlalchemy.ext.asyncio", "aiosqlite", "jinja2", "apscheduler", "prometheus_client",
    "auditor.katapult", "auditor.notify", "auditor.api", "auditor.web", "auditor.service.services",
    "auditor.service.cycle", "auditor.service.collection", "auditor.service.compliance", "auditor.service.evidence",
    "auditor.service.delivery", "auditor.service.runner", "auditor.service.housekeeping", "auditor.render.compliance",
    "auditor.store.writes", "alembic",
)


@pytest.mark.parametrize("fmt", ["table", "json"])
def test_report_reads_the_database_without_the_orm_httpx_or_the_daemon(tmp_path: Path, katapult: FakeServer,
                                                                         fmt: str, db_url: str) -> None:
    config = write(tmp_path / "auditor.toml", (
        "[katapult]\nmax_requests_per_minute = 60000\nmax_attempts = 1\ntimeout_seconds = 5\n"
        f'[database]\nurl = "{db_url}"\n'
        f"[audit]\ndisks = {json.dumps([BARE])}\n"
        '[[notifiers]]\nkind = "webhook"\nname = "ops"\nurl = "http://127.0.0.1:9/hook"\n'
    ))
    env = clean_env(AUDITOR_KATAPULT__API_URL=katapult.url, KATAPULT_API_TOKEN=SECRET)
    audit = subprocess.run([sys.executable, "-m", "auditor", "audit", "--once", "--drain-timeout", "0", "--config",
                            str(config)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert audit.returncode == 1, audit.stderr  # one open finding: the report has a run, a disk and a finding
    for command in (["report"], ["findings"], ["history", BARE]):  # findings and history read the same way
        args = [*command, "--config", str(config), "--format", fmt]
        proc = _probe_imports(tmp_path, args, NOT_FOR_REPORT, must_succeed=True)
        assert proc.returncode == 0, proc.stderr
        *printed, loaded = proc.stdout.strip().splitlines()
        assert loaded == repr([]), f"{command}: {loaded}"
        assert BARE in "\n".join(printed) and "unprotected-disk" in "\n".join(printed)


class FixedClock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def _report_settings(db_url: str, disks: list[str], waived: str, expired: str, now: datetime) -> Settings:
    return Settings(**{
        "katapult": {"api_url": "http://fake/core/v1", "per_page": 5, "max_attempts": 1,
                     "max_requests_per_minute": 100_000},
        "database": {"url": db_url},
        "audit": {"disks": disks},
        "waivers": [
            {"rule": "unprotected-disk", "disk": waived, "reason": "moving", "owner": "ops@example.com",
             "expires": (now + timedelta(days=3)).date()},  # in force, expiring within a week
            {"rule": "unprotected-disk", "disk": expired, "reason": "was fine", "owner": "old@example.com",
             "expires": "2001-01-01"},
        ],
    })


async def test_report_reads_the_same_report_as_build_report_on_the_store(db_url: str) -> None:
    """`auditor report`'s synchronous Core reads give what the async ORM Store gives, field for field: runs
    (including one abandoned on the way), disks known or not, open, waived and resolved findings, drift."""
    now = datetime.now(UTC).replace(microsecond=0)
    clock = FixedClock(now)
    fleet = Fleet(rate_limit_per_minute=1_000_000)
    org = fleet.add_org("acme")
    ids = [fleet.add_disk(org.id, name=f"disk {i}").id for i in range(4)]
    fleet.add_policy(ids[1], id="dbp_good", retention=30 * 24, interval="hourly",
                     next_invocation_at=int(time.time()) + 30 * 86400)
    fleet.add_policy(ids[2], id="dbp_weak", retention=3, next_invocation_at=int(time.time()) + 86400)
    fleet.add_policy(ids[3], id="dbp_short", retention=3, next_invocation_at=int(time.time()) + 86400)
    settings = _report_settings(db_url, ids, waived=ids[0], expired=ids[3], now=now)
    async with open_services(settings, transport=httpx.ASGITransport(app=fake_app(fleet)), token="fake-token",
                             clock=clock) as s:
        await run_cycle(s)
        fleet.update_policy("dbp_weak", retention=14)  # drift; its findings resolve
        clock.now += timedelta(minutes=15)
        await run_cycle(s)
        fleet.faults[ids[1]] = Fault.UNAVAILABLE  # unknown, with its error
        clock.now += timedelta(minutes=15)
        await run_cycle(s)
        # A run whose process is gone: every reader sees it failed (abandoned), the latest run, and none writes so.
        orphan = writes.new_run_id()
        await s.store.write(writes.start_run, run_id=orphan, now=clock.now, trigger="manual",
                            owner="elsewhere:1:0123456789ab")
    clock.now += timedelta(minutes=1)

    fast = current_report(settings, clock=clock)
    assert fast["last_run"]["id"] == orphan and fast["last_run"]["errors"][0]["code"] == "abandoned"
    assert fast["drift"] and fast["findings"] and fast["expiring_waivers"] and fast["waiver_problems"]
    assert {d["status"] for d in fast["disks"]} == {"compliant", "noncompliant", "unknown"}
    async with open_services(settings, katapult=False, migrate=False, clock=clock) as s:
        assert await read_report(s) == fast
        for statuses in (REPORTED_STATUSES, ("resolved",), ("open", "waived", "resolved")):
            assert current_findings(settings, statuses=statuses) == \
                await s.store.read(queries.all_findings, statuses=statuses)
        details = [current_disk_detail(settings, disk_id) for disk_id in [*ids, "disk_unknownunknown00"]]
        assert details == [await read_disk_detail(s, disk_id=d) for d in [*ids, "disk_unknownunknown00"]]
        # Not vacuous: snapshots, drift, findings and finding events are all compared.
        assert all(any(d and d[part] for d in details) for part in ("snapshots", "drift", "findings", "finding_events"))
        assert details[-1] is None
        # Read-only: the abandoned run is abandoned only in what was read.
        async with s.store.engine.connect() as conn:
            stored = (await conn.execute(select(runs.c.status).where(runs.c.id == orphan))).scalar_one()
        assert stored == "running"


async def _open_error(settings: Settings) -> str:
    with pytest.raises(StoreError) as caught:
        async with open_services(settings, katapult=False, migrate=False):
            pass
    return f"{type(caught.value).__name__}: {caught.value}"


def _report_error(settings: Settings) -> str:
    with pytest.raises(StoreError) as caught:
        current_report(settings)
    return f"{type(caught.value).__name__}: {caught.value}"


async def test_report_fails_on_a_database_as_open_services_does(tmp_path: Path, db_url: str) -> None:
    """Missing, outdated or not a database at all: the same error, and nothing created or migrated."""
    def settings(url: str) -> Settings:
        return Settings(**{"database": {"url": url}})

    missing = settings(f"sqlite:///{tmp_path / 'typo' / 'nothing.db'}")
    assert "does not exist" in _report_error(missing) == await _open_error(missing)
    assert not (tmp_path / "typo").exists()
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database" * 100)
    assert "file is not a database" in _report_error(settings(f"sqlite:///{garbage}")) == await _open_error(
        settings(f"sqlite:///{garbage}"))
    await db.upgrade(db_url, "0001")
    old = settings(db_url)
    assert "revision 0001" in _report_error(old) == await _open_error(old)
    assert (await db.current_revision(db_url))[0] == "0001"  # left as it was
    unreachable = settings("postgresql+psycopg://nobody:pw-SECRET@127.0.0.1:9/none")  # nothing listens on 9
    error = _report_error(unreachable)
    assert "Connection refused" in error == await _open_error(unreachable)
    assert "SECRET" not in error


def test_a_url_sqlalchemy_cannot_parse_is_a_store_error_not_an_internal_error() -> None:
    with pytest.raises(StoreError, match="not a valid database URL"):
        db.safe_url("postgresql+psycopg://a:pw@db:port/x")


def test_a_database_a_newer_auditor_migrated_stops_every_command_with_one_line(tmp_path: Path) -> None:
    database = tmp_path / "auditor.db"
    config = write(tmp_path / "auditor.toml", f'[database]\nurl = "sqlite:///{database}"\n'
                                              '[audit]\ndisks = ["disk_aaaaaaaaaaaaaaaa"]\n')
    env = clean_env(KATAPULT_API_TOKEN=SECRET, AUDITOR_KATAPULT__API_URL="http://127.0.0.1:9/core/v1",
                    AUDITOR_API__TOKEN="api-token-for-the-schema-test", AUDITOR_API__LISTEN=f"127.0.0.1:{free_port()}")

    def auditor(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "auditor", *args, "--config", str(config)], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=120)

    assert auditor("db", "upgrade").returncode == 0
    with sqlite3.connect(database) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '0099'")
    # The daemon too: waiting cannot make this version able to use the database, so it stops at once.
    for command in (["db", "upgrade"], ["db", "current"], ["report"], ["findings"], ["audit", "--once"], ["run"]):
        proc = auditor(*command)
        assert proc.returncode == 2, (command, proc.stdout, proc.stderr)
        lines = [line for line in proc.stderr.splitlines() if "0099" in line]
        assert len(lines) == 1 and "database schema 0099 is newer than this auditor" in lines[0], proc.stderr
        assert lines[0].endswith("upgrade the auditor"), lines[0]
        assert "Traceback" not in proc.stderr and "CommandError" not in proc.stderr
