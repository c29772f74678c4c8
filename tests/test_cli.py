"""The real `auditor` command line, run as subprocesses: config errors, exit codes, reports, the token."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from auditor.fake import FakeServer, Fault, Fleet

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "config" / "auditor.example.toml"
SECRET = "kat-cli-SECRET-7f3a9c1e5b2d4680"
ENV_LINE = re.compile(r"^config error: (?P<key>\S+): .+ \(env (?P<env>AUDITOR_[A-Z0-9_]+)\)$")

pytestmark = pytest.mark.slow


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without any auditor setting or token, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUDITOR_") and k != "KATAPULT_API_TOKEN"}
    env.update(extra)
    return env


class Launched:
    """A started `python -m auditor ARGS`; `result()` waits for it. Several run at once to keep the suite fast."""

    def __init__(self, *args: str, cwd: Path, env: dict[str, str] | None = None) -> None:
        self.args = args
        self.proc = subprocess.Popen([sys.executable, "-m", "auditor", *args], cwd=cwd, env=env or clean_env(),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._done: subprocess.CompletedProcess[str] | None = None

    def result(self) -> subprocess.CompletedProcess[str]:
        """Returns the finished process; never a traceback, whatever the outcome."""
        if self._done is None:
            out, err = self.proc.communicate(timeout=120)
            self._done = subprocess.CompletedProcess(self.proc.args, self.proc.returncode, out, err)
            assert "Traceback" not in out + err, err
        return self._done


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return Launched(*args, cwd=cwd, env=env).result()


def error_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    # stderr may also carry JSON log lines; the problems are the `config error:` lines.
    return [line for line in proc.stderr.splitlines() if line.startswith("config error:")]


def write(path: Path, content: str) -> Path:
    path.write_text(content, encoding="utf-8")
    return path


WAIVER = """
[[waivers]]
rule = "unprotected-disk"
disk = "{disk}"
reason = "{reason}"
owner = "{owner}"
expires = {expires}
"""

# Two waivers of `unprotected-disk`, one in force and one expired; test_cli_extra.py's full config has them too.
WAIVERS = (
    WAIVER.format(disk="disk_aaaaaaaaaaaaaaaa", reason="being decommissioned", owner="ops@example.com",
                  expires="2099-01-01")
    + WAIVER.format(disk="disk_bbbbbbbbbbbbbbbb", reason="was fine", owner="old@example.com", expires="2001-01-01")
)

VALID = """
[katapult]
api_url = "https://api.katapult.io/core/v1"
per_page = 100

[database]
url = "sqlite:///{db}"

[audit]
interval = "15m"
disks = ["disk_aaaaaaaaaaaaaaaa"]
organizations = ["acme"]

[rules]
min_retention = 7
min_retention_days = 7
max_interval = "daily"
stale_grace = "1h"
severity = {{ "schedule-stale" = "critical" }}
disabled = ["disk-in-trash"]

[[rules.overrides]]
disks = ["disk_aaaaaaaaaaaaaaaa"]
min_retention = 30
""" + WAIVERS + """
[[notifiers]]
kind = "webhook"
name = "ops"
url = "https://hooks.example.com/auditor"
"""

# One file with many problems: every one is reported, one line each, in file order, naming key and env var.
MANY_PROBLEMS = """
[nonsense]
x = 1

[katapult]
bogus = 1
per_page = "lots"
timeout_seconds = 0

[database]
url = "mysql://db.example.com/auditor"

[audit]
interval = "fortnight"

[rules]
max_interval = "yearly"
severity = { "no-such-rule" = "high" }
disabled = ["another-unknown-rule"]
"""
MANY_EXPECTED = [
    ("katapult.per_page", "AUDITOR_KATAPULT__PER_PAGE", "valid integer"),
    ("katapult.timeout_seconds", "AUDITOR_KATAPULT__TIMEOUT_SECONDS", "greater than 0"),
    ("katapult.bogus", "AUDITOR_KATAPULT__BOGUS", "unknown key"),
    ("database.url", "AUDITOR_DATABASE__URL", "must start with"),
    ("audit.interval", "AUDITOR_AUDIT__INTERVAL", "expected a duration"),
    ("rules.max_interval", "AUDITOR_RULES__MAX_INTERVAL", "'hourly', 'daily', 'weekly' or 'monthly'"),
    ("rules.severity", "AUDITOR_RULES__SEVERITY", "unknown rule id(s) no-such-rule"),
    ("rules.disabled", "AUDITOR_RULES__DISABLED", "unknown rule id(s) another-unknown-rule"),
    ("nonsense", "AUDITOR_NONSENSE", "unknown key"),
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Launched]:
    """Starts every config-only command of this module at once (each test then waits for its own)."""
    d = tmp_path_factory.mktemp("config")
    valid = write(d / "valid.toml", VALID.format(db=d / "never.db"))
    token = clean_env(KATAPULT_API_TOKEN=SECRET)
    return {
        "help": Launched("--help", cwd=d),
        "valid": Launched("check-config", "--config", str(valid), cwd=d,
                          env=clean_env(KATAPULT_API_TOKEN=SECRET, AUDITOR_AUDIT__DISKS='["disk_x", "disk_y"]')),
        "many": Launched("check-config", "--config", str(write(d / "many.toml", MANY_PROBLEMS)), cwd=d),
        "notifier": Launched("check-config", "--config", str(write(
            d / "notifier.toml", '[[notifiers]]\nkind = "carrier-pigeon"\nname = "coo"\n')), cwd=d),
        "invalid toml": Launched("audit", "--once", "--config", str(write(d / "broken.toml", "x = [\n")), cwd=d,
                                 env=token),
        "missing file": Launched("report", "--config", str(d / "absent.toml"), cwd=d),
        "env per_page": Launched("check-config", "--config", str(valid), cwd=d,
                                 env=clean_env(AUDITOR_KATAPULT__PER_PAGE="500")),
        "no token": Launched("audit", "--once", "--config", str(valid), cwd=d),
        "no targets": Launched("audit", "--once", "--config", str(write(
            d / "empty.toml", f'[database]\nurl = "sqlite:///{d / "never.db"}"\n')), cwd=d, env=token),
    }


# ---- help and check-config ---------------------------------------------------------------------------------


def test_help_lists_the_commands(runs: dict[str, Launched]) -> None:
    proc = runs["help"].result()
    assert proc.returncode == 0
    commands = proc.stdout.split("Commands:", 1)[1]
    listed = {line.split()[0] for line in commands.splitlines() if line.strip()}
    assert {"audit", "report", "findings", "history", "check-config"} <= listed


def test_check_config_accepts_the_example_config(tmp_path: Path) -> None:
    if not EXAMPLE.is_file():
        pytest.fail(f"{EXAMPLE.relative_to(REPO)} is missing: the shipped example config must exist and be valid "
                    "(`auditor check-config --config config/auditor.example.toml`)")
    proc = cli("check-config", "--config", str(EXAMPLE), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "configuration is valid" in proc.stdout


def test_check_config_accepts_a_valid_config_with_env_overrides(runs: dict[str, Launched]) -> None:
    proc = runs["valid"].result()
    assert proc.returncode == 0, proc.stderr
    assert "configuration is valid" in proc.stdout
    assert "2 disk(s), 1 organization(s)" in proc.stdout  # AUDITOR_AUDIT__DISKS beat the file's one disk
    assert "katapult token: set" in proc.stdout
    assert "waivers[1] does not apply: expired on 2001-01-01" in proc.stdout
    assert SECRET not in proc.stdout + proc.stderr


def test_bad_config_exits_78_with_one_line_per_problem(runs: dict[str, Launched]) -> None:
    proc = runs["many"].result()
    assert proc.returncode == 78
    assert proc.stdout == ""
    lines = error_lines(proc)
    assert len(lines) == len(MANY_EXPECTED), "\n".join(lines)
    got = {}
    for line in lines:
        match = ENV_LINE.match(line)
        assert match, f"no key and env var in {line!r}"
        got[match["key"]] = (match["env"], line)
    for key, env, fragment in MANY_EXPECTED:
        assert key in got, f"{key} not reported"
        assert got[key][0] == env
        assert fragment in got[key][1]


def test_unknown_notifier_kind_exits_78_naming_the_key_and_env_var(runs: dict[str, Launched]) -> None:
    proc = runs["notifier"].result()
    assert proc.returncode == 78
    (line,) = error_lines(proc)
    assert line.startswith("config error: notifiers[0]: unknown notifier kind")
    assert "webhook" in line  # lists the known kinds
    # Every problem line names the env var that sets the key; for a list that is the whole list, as JSON.
    assert "(env AUDITOR_NOTIFIERS)" in line, f"no env var named: {line!r}"


@pytest.mark.parametrize(("case", "expected"), [("invalid toml", "not valid TOML"), ("missing file", "not found")])
def test_unreadable_config_file_exits_78(runs: dict[str, Launched], case: str, expected: str) -> None:
    proc = runs[case].result()
    assert proc.returncode == 78
    (line,) = error_lines(proc)
    assert re.match(rf"config error: config file \S+\.toml: {expected}", line), line


def test_env_override_with_a_bad_value_exits_78(runs: dict[str, Launched]) -> None:
    proc = runs["env per_page"].result()
    assert proc.returncode == 78
    (line,) = error_lines(proc)
    match = ENV_LINE.match(line)
    assert match and (match["key"], match["env"]) == ("katapult.per_page", "AUDITOR_KATAPULT__PER_PAGE"), line
    assert "less than or equal to 200" in line


def test_audit_without_a_token_exits_78(runs: dict[str, Launched]) -> None:
    proc = runs["no token"].result()
    assert proc.returncode == 78
    (line,) = error_lines(proc)
    assert "KATAPULT_API_TOKEN" in line and "katapult.api_token_file" in line


def test_audit_with_nothing_to_audit_exits_78(runs: dict[str, Launched]) -> None:
    proc = runs["no targets"].result()
    assert proc.returncode == 78
    (line,) = error_lines(proc)
    assert "AUDITOR_AUDIT__DISKS" in line and "AUDITOR_AUDIT__ORGANIZATIONS" in line


# ---- against a running fake Katapult -----------------------------------------------------------------------

GOOD, WEAK = "disk_goodgoodgoodgood", "disk_weakweakweakweak"


class Site:
    """A fake Katapult on a loopback port, a config file and a SQLite database, for one test."""

    def __init__(self, tmp_path: Path, fleet: Fleet, server: FakeServer) -> None:
        self.tmp_path = tmp_path
        self.fleet = fleet
        self.server = server
        self.config = write(tmp_path / "auditor.toml", (
            "[katapult]\nper_page = 2\nmax_requests_per_minute = 60000\nmax_attempts = 1\ntimeout_seconds = 5\n"
            f'[database]\nurl = "sqlite:///{tmp_path / "auditor.db"}"\n'
            f"[audit]\ndisks = {json.dumps([GOOD, WEAK])}\n"
            '[log]\nlevel = "debug"\n'  # the most output there can be, for the token check
        ))
        self.outputs: list[str] = []

    def start(self, *args: str) -> Launched:
        env = clean_env(AUDITOR_KATAPULT__API_URL=self.server.url, KATAPULT_API_TOKEN=SECRET)
        return Launched(*args, "--config", str(self.config), cwd=self.tmp_path, env=env)

    def done(self, launched: Launched) -> subprocess.CompletedProcess[str]:
        proc = launched.result()
        self.outputs.append(proc.stdout + proc.stderr)
        return proc

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.done(self.start(*args))

    def json(self, launched: Launched) -> Any:
        proc = self.done(launched)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    fleet = Fleet(rate_limit_per_minute=100_000)
    fleet.tokens.add(SECRET)
    org = fleet.add_org("acme", id="org_acmeacmeacmeacme")
    fleet.add_disk(org.id, "good", id=GOOD)
    fleet.add_policy(GOOD, id="dbp_good", retention=14, next_invocation_at=int(time.time()) + 86400)
    fleet.add_disk(org.id, "weak", id=WEAK)
    fleet.add_policy(WEAK, id="dbp_weak", retention=3, next_invocation_at=int(time.time()) + 86400)  # medium only
    with FakeServer(fleet) as server:
        s = Site(tmp_path, fleet, server)
        yield s
    assert s.outputs, "the test ran no command"
    assert not [out for out in s.outputs if SECRET in out], "the Katapult token appeared in the CLI output"


def check_contract(report: dict[str, Any]) -> None:
    """The report's JSON contract: at least these keys, with these types."""
    assert {"generated_at", "last_run", "summary", "disks", "findings"} <= set(report)
    assert isinstance(report["generated_at"], str) and report["generated_at"].endswith("Z")
    run = report["last_run"]
    assert {"id", "started_at", "finished_at", "status", "targets_checked", "api_requests", "errors"} <= set(run)
    assert all(isinstance(run[k], str) for k in ("id", "started_at", "finished_at", "status"))
    assert isinstance(run["targets_checked"], int) and isinstance(run["api_requests"], int)
    assert isinstance(run["errors"], list)
    for e in run["errors"]:
        assert set(e) == {"target", "code", "message"} and all(isinstance(v, str) for v in e.values())
    summary = report["summary"]
    counts = ("disks_total", "compliant", "noncompliant", "unknown", "open_findings")
    assert {*counts, "by_rule", "by_severity"} <= set(summary)
    assert all(isinstance(summary[k], int) for k in counts)
    assert isinstance(summary["by_rule"], dict) and isinstance(summary["by_severity"], dict)
    assert summary["disks_total"] == summary["compliant"] + summary["noncompliant"] + summary["unknown"]
    assert isinstance(report["disks"], list) and isinstance(report["findings"], list)
    for d in report["disks"]:
        assert {"disk_id", "name", "status", "policies", "findings"} <= set(d)
        assert isinstance(d["disk_id"], str) and d["status"] in ("compliant", "noncompliant", "unknown")
        assert isinstance(d["name"], str | None)
        assert isinstance(d["policies"], list) and isinstance(d["findings"], list)
    for f in report["findings"]:
        assert {"fingerprint", "rule", "severity", "status", "disk_id", "policy_id", "message", "observed",
                "expected", "first_seen", "last_seen", "waiver"} <= set(f)
        assert re.fullmatch(r"[0-9a-f]{16}", f["fingerprint"])
        assert f["status"] in ("open", "waived") and f["severity"] in ("low", "medium", "high", "critical")
        assert isinstance(f["policy_id"], str | None) and isinstance(f["waiver"], dict | None)
        assert isinstance(f["observed"], dict) and isinstance(f["expected"], dict)
        assert isinstance(f["first_seen"], str) and isinstance(f["last_seen"], str)
        assert isinstance(f["message"], str) and f["message"]


def test_audit_exit_codes_reports_findings_and_history(site: Site) -> None:
    # Complete with open findings (two medium ones on the weak disk): 1, unless --fail-on is above medium.
    first = site.run("audit", "--once")
    assert first.returncode == 1, first.stdout + first.stderr
    quiet = site.run("audit", "--once", "--fail-on", "critical", "--format", "json")
    assert quiet.returncode == 0, quiet.stdout + quiet.stderr
    summary = json.loads(quiet.stdout)
    assert summary["status"] == "complete" and summary["open_findings_by_severity"] == {"medium": 2}
    assert summary["api_requests"] > 0 and summary["errors"] == []

    # The reports read the database only; they can run side by side.
    as_json, as_csv, as_md = (site.start("report", "--format", f) for f in ("json", "csv", "markdown"))
    report = site.json(as_json)
    check_contract(report)
    assert report["last_run"]["status"] == "complete" and report["last_run"]["targets_checked"] == 2
    assert report["summary"]["disks_total"] == 2 and report["summary"]["noncompliant"] == 1
    assert report["summary"]["open_findings"] == 2
    assert report["summary"]["by_rule"] == {"retention-below-minimum": 1, "retention-window-too-short": 1}
    assert report["summary"]["by_severity"] == {"medium": 2}
    disks = {d["disk_id"]: d for d in report["disks"]}
    assert disks[GOOD]["status"] == "compliant" and disks[GOOD]["policies"] == ["dbp_good"]
    assert disks[GOOD]["findings"] == []
    assert disks[WEAK]["status"] == "noncompliant"
    assert sorted(disks[WEAK]["findings"]) == sorted(f["fingerprint"] for f in report["findings"])
    assert {(f["rule"], f["disk_id"], f["policy_id"], f["status"]) for f in report["findings"]} == {
        ("retention-below-minimum", WEAK, "dbp_weak", "open"), ("retention-window-too-short", WEAK, "dbp_weak", "open")}
    rows = list(csv.DictReader(io.StringIO(site.done(as_csv).stdout)))
    assert {(r["rule"], r["disk_id"], r["policy_id"], r["status"]) for r in rows} == {
        ("retention-below-minimum", WEAK, "dbp_weak", "open"), ("retention-window-too-short", WEAK, "dbp_weak", "open")}
    assert {r["fingerprint"] for r in rows} == {f["fingerprint"] for f in report["findings"]}
    markdown = site.done(as_md)
    assert markdown.returncode == 0
    assert markdown.stdout.startswith("# Backup-policy compliance report")
    assert "| 2 | 1 | 1 | 0 | 2 |" in markdown.stdout
    assert f"| medium | retention-below-minimum | {WEAK} | dbp_weak | open |" in markdown.stdout

    # Fixed in Katapult: complete and clean, 0; the findings are resolved, with resolved_at.
    site.fleet.update_policy("dbp_weak", retention=14)
    clean = site.run("audit", "--once")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    listing, history, history_table, nobody = (
        site.start("findings", "--status", "all", "--format", "json"),
        site.start("history", WEAK, "--format", "json"),
        site.start("history", WEAK),
        site.start("history", "disk_neverseen0000000"),
    )
    listed = site.json(listing)["findings"]
    assert {(f["rule"], f["status"]) for f in listed} == {("retention-below-minimum", "resolved"),
                                                          ("retention-window-too-short", "resolved")}
    assert all(isinstance(f["resolved_at"], str) and f["resolved_at"].endswith("Z") for f in listed)
    detail = site.json(history)
    assert detail["disk"]["disk_id"] == WEAK and detail["status"] == "compliant"
    assert [(d["kind"], d["before"]["retention"], d["after"]["retention"]) for d in detail["drift"]] == [
        ("policy-changed", 3, 14)]
    assert sorted(e["kind"] for e in detail["finding_events"]) == ["opened", "opened", "resolved", "resolved"]
    table = site.done(history_table)
    assert table.returncode == 0
    assert WEAK in table.stdout and "policy-changed" in table.stdout and "dbp_weak" in table.stdout
    unknown = site.done(nobody)
    assert unknown.returncode == 2 and "not known" in unknown.stderr

    # A disk that cannot be read: partial, 2, and --fail-on cannot turn that into success.
    site.fleet.faults[GOOD] = Fault.UNAVAILABLE
    partial = site.run("audit", "--once", "--fail-on", "critical")
    assert partial.returncode == 2, partial.stdout + partial.stderr
    assert "partial" in partial.stdout
    assert f"could not read {GOOD}: service_unavailable" in partial.stdout  # says which target and why
