"""`auditor plan` and `auditor apply` as real processes against the fake Katapult on a loopback port: exit codes, the
write credential (loaded by apply alone, never printed), a kill -9 in the middle of an apply, check-config."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hostile import Answer, AsgiServer, Request, Tamper, wrapped_error

from auditor.domain.remediation import content_hash
from auditor.fake import FakeServer, Fleet, create_app

pytestmark = pytest.mark.slow

READ_SECRET = "kat-read-SECRET-1f2e3d4c5b6a7980"
WRITE_SECRET = "kat-write-SECRET-9a8b7c6d5e4f3021"
DISKS = [f"disk_unprotected{i:04d}" for i in range(4)]
WEAK = "disk_weakweakweakweak"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AUDITOR_") and k not in ("KATAPULT_API_TOKEN", "KATAPULT_WRITE_TOKEN")}
    env.update(extra)
    return env


class Site:
    def __init__(self, tmp_path: Path, fleet: Fleet, server: FakeServer | AsgiServer, db_url: str) -> None:
        self.tmp_path, self.fleet, self.server = tmp_path, fleet, server
        self.config = tmp_path / "auditor.toml"
        self.config.write_text(
            "[katapult]\nper_page = 50\nmax_requests_per_minute = 60000\nmax_attempts = 1\ntimeout_seconds = 5\n"
            f"write_token_file = {json.dumps(str(tmp_path / 'no-such-dir' / 'write-token'))}\n"
            f"[database]\nurl = {json.dumps(db_url)}\n"
            f"[audit]\ndisks = {json.dumps([*DISKS, WEAK])}\n"
            "[remediation]\nenabled = true\n"
            '[log]\nlevel = "debug"\n')
        self.outputs: list[str] = []

    def start(self, *args: str, write_token: str | None = None, stdin: str | None = None,
              **env: str) -> subprocess.Popen[str]:
        extra = {"AUDITOR_KATAPULT__API_URL": self.server.url, "KATAPULT_API_TOKEN": READ_SECRET, **env}
        if write_token is not None:
            extra["KATAPULT_WRITE_TOKEN"] = write_token
            extra["AUDITOR_KATAPULT__WRITE_TOKEN_FILE"] = ""
        return subprocess.Popen([sys.executable, "-m", "auditor", *args, "--config", str(self.config)],
                                cwd=self.tmp_path, env=clean_env(**extra), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def run(self, *args: str, stdin: str = "", **kwargs: Any) -> subprocess.CompletedProcess[str]:
        proc = self.start(*args, **kwargs)
        out, err = proc.communicate(stdin, timeout=120)
        self.outputs.append(out + err)
        assert "Traceback" not in out + err, err
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture
def site(tmp_path: Path, db_url: str) -> Iterator[Site]:
    fleet = Fleet(rate_limit_per_minute=100_000)
    fleet.tokens.add(READ_SECRET)
    fleet.write_tokens.add(WRITE_SECRET)
    org = fleet.add_org("acme", id="org_acmeacmeacmeacme")
    for disk_id in DISKS:
        fleet.add_disk(org.id, disk_id.removeprefix("disk_"), id=disk_id)
    fleet.add_disk(org.id, "weak", id=WEAK)
    fleet.add_policy(WEAK, id="dbp_weak", retention=3, next_invocation_at=int(time.time()) + 86400)
    with FakeServer(fleet) as server:
        s = Site(tmp_path, fleet, server, db_url)
        yield s
    leaked = [out for out in s.outputs if WRITE_SECRET in out or READ_SECRET in out]
    assert not leaked, "a Katapult token appeared in the CLI output"


def covering(fleet: Fleet, disk_id: str) -> list[str]:
    return list(fleet.policy_ids_of_disk(disk_id))


def problem_lines(stderr: str) -> list[str]:
    """Returns stderr without its log lines (JSON, as logs are when not on a terminal)."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("{")]


def make_plan(site: Site, name: str = "plan.json") -> Path:
    audit = site.run("audit", "--once")
    assert audit.returncode == 1, audit.stderr
    # The plan is made without the write credential: its (missing) file is never read by `plan`.
    plan = site.run("plan", "--out", name)
    assert plan.returncode == 0, plan.stderr
    assert f"auditor apply {name}" in plan.stdout
    return site.tmp_path / name


# The process-level exit codes are the same on both databases; the use cases run on both (tests/test_remediation.py).
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_plan_apply_exit_codes_history_and_the_write_credential(site: Site, db_url: str) -> None:
    disabled = site.run("plan", AUDITOR_REMEDIATION__ENABLED="false")
    assert disabled.returncode == 78 and "remediation.enabled" in disabled.stderr, disabled.stderr
    plan_file = make_plan(site)
    # Filters naming nothing the auditor knows: exit 2, one line each.
    for args, line in ((("--tier", "nope"), "error: --tier: no tier named 'nope' (tiers: none)"),
                       (("--disk", "disk_neverseen0000"),
                        "error: --disk: disk disk_neverseen0000 is not known to the auditor")):
        unknown = site.run("plan", *args)
        assert unknown.returncode == 2 and problem_lines(unknown.stderr) == [line], unknown.stderr
    only = site.run("plan", "--disk", WEAK, "--format", "json")
    assert only.returncode == 0 and [c["disk_id"] for c in json.loads(only.stdout)["changes"]] == [WEAK]
    document = json.loads(plan_file.read_text())
    assert document["summary"]["changes"] == 5

    # No write credential: exit 2, naming the setting (the configured file does not exist).
    missing = site.run("apply", str(plan_file), "--yes")
    assert missing.returncode == 2 and "katapult.write_token_file" in missing.stderr, missing.stderr
    unset = site.run("apply", str(plan_file), "--yes", AUDITOR_KATAPULT__WRITE_TOKEN_FILE="")
    assert unset.returncode == 2 and "KATAPULT_WRITE_TOKEN" in unset.stderr, unset.stderr

    # An edited plan is refused before anything is read or written.
    edited = dict(document, changes=[{**document["changes"][0], "request": {
        **document["changes"][0]["request"], "method": "PATCH"}}, *document["changes"][1:]])
    (site.tmp_path / "edited.json").write_text(json.dumps(edited))
    refused = site.run("apply", "edited.json", "--yes", write_token=WRITE_SECRET)
    assert refused.returncode == 2 and "edited" in refused.stderr, refused.stderr

    # Validity is not the plan file's word: a rehashed plan that says it lasts until 2099, or is of another format.
    for fields, why in (({"created_at": "2020-01-01T00:00:00Z", "expires_at": "2099-01-01T00:00:00Z"}, "expired"),
                        ({"format_version": 99}, "format_version 99")):
        forged = {**document, **fields}
        forged["hash"] = content_hash(forged)
        (site.tmp_path / "forged.json").write_text(json.dumps(forged))
        refused = site.run("apply", "forged.json", "--yes", write_token=WRITE_SECRET)
        lines = problem_lines(refused.stderr)
        assert refused.returncode == 2 and len(lines) == 1, refused.stderr
        assert lines[0].startswith("error: plan forged.json: ") and why in lines[0], refused.stderr
    assert len(site.fleet.policies) == 1

    # Not confirmed: nothing applied, one line saying so (no "Aborted!"), whether answered no or stdin is closed.
    declined = site.run("apply", str(plan_file), write_token=WRITE_SECRET, stdin="n\n")
    assert declined.returncode == 1 and len(site.fleet.policies) == 1
    assert problem_lines(declined.stderr) == ["not applied: the answer was not yes; answer yes, or pass --yes"]
    closed = site.run("apply", str(plan_file), write_token=WRITE_SECRET, stdin="")
    assert closed.returncode == 1 and len(site.fleet.policies) == 1
    assert problem_lines(closed.stderr) == [
        "not applied: no answer to the question (stdin closed); answer yes, or pass --yes"], closed.stderr
    assert "Aborted" not in declined.stderr + closed.stderr

    # The summary shown is counted from the changes, not read from the file: a plan cut to one change says so.
    cut = {**document, "changes": document["changes"][:1]}
    cut["hash"] = content_hash(cut)
    (site.tmp_path / "cut.json").write_text(json.dumps(cut))
    shown = site.run("apply", "cut.json", write_token=WRITE_SECRET, stdin="n\n")
    assert shown.returncode == 1 and shown.stdout.startswith("plan: 1 change(s), "), shown.stdout
    assert cut["summary"]["changes"] == 5

    # A token without the write scope: every change refused with Katapult's code, exit 1.
    read_only = site.run("apply", str(plan_file), "--yes", write_token=READ_SECRET)
    assert read_only.returncode == 1, read_only.stderr
    assert read_only.stdout.count("refused scope_not_granted") == 5, read_only.stdout
    assert len(site.fleet.policies) == 1 and site.fleet.policies["dbp_weak"].retention == 3

    applied = site.run("apply", str(plan_file), "--yes", write_token=WRITE_SECRET)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    assert applied.stdout.count("applied: ") == 5
    assert "re-audit run" in applied.stdout and "-> after no open finding" in applied.stdout
    assert site.fleet.policies["dbp_weak"].retention == 14
    assert all(len(covering(site.fleet, d)) == 1 for d in DISKS)

    again = site.run("apply", str(plan_file), "--yes", write_token=WRITE_SECRET)
    assert again.returncode == 1 and again.stdout.count("stale: ") == 5, again.stdout
    assert all(len(covering(site.fleet, d)) == 1 for d in DISKS)

    history = site.run("history", WEAK, "--format", "json")
    rows = json.loads(history.stdout)["remediations"]
    assert [r["status"] for r in rows] == ["refused", "applied", "stale"]
    assert rows[0]["error_code"] == "scope_not_granted" and rows[1]["actor"]["user"]
    text = site.run("history", WEAK)
    assert "raise-retention applied by" in text.stdout

    # Katapult unreachable during the re-reads: exit 2, nothing written.
    down = site.run("apply", str(plan_file), "--yes", write_token=WRITE_SECRET,
                    AUDITOR_KATAPULT__API_URL="http://127.0.0.1:9/core/v1")
    assert down.returncode == 2 and "did not answer" in down.stderr, down.stderr

    # Neither token is stored: the database holds requests, answers and outcomes only.
    stored = b"".join(p.read_bytes() for p in site.tmp_path.glob("auditor.db*"))
    assert stored and WRITE_SECRET.encode() not in stored and READ_SECRET.encode() not in stored

    checked = site.run("check-config")
    assert checked.returncode == 0 and "remediation template (rules defaults): retention 14, daily" in checked.stdout
    assert "write token: file katapult.write_token_file" in checked.stdout


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # check-config does not use the database
def test_check_config_rejects_a_template_that_violates_its_tier(site: Site, db_url: str) -> None:
    tiers = ('[[tiers]]\nname = "gold"\nmatch = { disk_annotations = { tier = "gold" } }\nmin_retention = 30\n'
             'remediation = { retention = 20, target = "vm" }\n')
    site.config.write_text(site.config.read_text() + tiers)
    bad = site.run("check-config")
    assert bad.returncode == 78, bad.stdout + bad.stderr
    assert "config error: tiers[0].remediation:" in bad.stderr and "retention-below-minimum" in bad.stderr
    plan = site.run("plan")
    assert plan.returncode == 78 and "tiers[0].remediation" in plan.stderr


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # check-config does not use the database
@pytest.mark.parametrize(("policy", "key", "why"), [
    # Every 7 days while max_interval (the default) is daily: a policy made from it would be a finding.
    ('{ interval = "daily", frequency = 7, retention = 14, time = 2, minute = 0, target = "disk" }',
     "remediation.policy:", "observed-interval-too-long"),
    ('{ interval = "daily", retention = "14" }', "remediation.policy.retention:", "must be an integer"),
    ('{ interval = "daily", minute = 0.0 }', "remediation.policy.minute:", "must be an integer"),
])
def test_check_config_rejects_a_template_a_created_policy_would_break_or_mistype(
        site: Site, db_url: str, policy: str, key: str, why: str) -> None:
    site.config.write_text(site.config.read_text().replace("[remediation]\nenabled = true\n",
                                                           f"[remediation]\nenabled = true\npolicy = {policy}\n"))
    bad = site.run("check-config")
    assert bad.returncode == 78, bad.stdout + bad.stderr
    lines = problem_lines(bad.stderr)
    assert any(line.startswith(f"config error: {key}") and why in line for line in lines), lines


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_tokens_echoed_by_katapult_reach_no_output_row_or_bundle(tmp_path: Path, db_url: str) -> None:
    fleet = Fleet(rate_limit_per_minute=100_000)
    fleet.tokens.add(READ_SECRET)
    fleet.write_tokens.add(WRITE_SECRET)
    org = fleet.add_org("acme", id="org_acmeacmeacmeacme")
    for disk_id in DISKS:
        fleet.add_disk(org.id, disk_id.removeprefix("disk_"), id=disk_id)
    fleet.add_disk(org.id, "weak", id=WEAK)
    fleet.add_policy(WEAK, id="dbp_weak", retention=3, next_invocation_at=int(time.time()) + 86400)

    def echo(request: Request, status: int, body: Any) -> Answer | None:
        # A write answered 422 quoting both tokens, plainly and base64-encoded, in description and detail.errors.
        if request.method == "GET":
            return None
        return wrapped_error(422, "validation_error", f"bad token {READ_SECRET}", {
            "errors": [f"token {WRITE_SECRET} rejected", f"Bearer {b64(WRITE_SECRET)}", f"seen {b64(READ_SECRET)}"]})

    with AsgiServer(Tamper(create_app(fleet), echo)) as proxy:
        site = Site(tmp_path, fleet, proxy, db_url)
        plan_file = make_plan(site)
        applied = site.run("apply", str(plan_file), "--yes", write_token=WRITE_SECRET)
        assert applied.returncode == 1, applied.stdout + applied.stderr
        assert applied.stdout.count("refused validation_error [token [redacted] rejected; Bearer [redacted]; seen "
                                    "[redacted]]: ") == 5, applied.stdout
        history = site.run("history", WEAK, "--format", "json")
        (row,) = json.loads(history.stdout)["remediations"]
        assert row["response"]["error"]["description"] == "bad token [redacted]"
        assert row["errors"] == ["token [redacted] rejected", "Bearer [redacted]", "seen [redacted]"]
        assert "refused validation_error" in site.run("history", WEAK).stdout
        bundle = site.run("evidence", "--since", "1d", "--out", "bundle")
        assert bundle.returncode == 0, bundle.stderr
    forms = [s.encode() for s in (READ_SECRET, WRITE_SECRET, b64(READ_SECRET), b64(WRITE_SECRET))]
    files = [*tmp_path.glob("auditor.db*"), *(tmp_path / "bundle").rglob("*")]
    assert any(p.name == "remediations.json" for p in files)
    for path in (p for p in files if p.is_file()):
        assert not [f for f in forms if f in path.read_bytes()], f"{path.name} holds a token"
    for out in site.outputs:
        assert not [f for f in forms if f.decode() in out], "a token reached the CLI's output"


def test_kill_9_mid_apply_then_rerun_never_creates_a_second_policy(site: Site) -> None:
    plan_file = make_plan(site)
    before = len(site.fleet.policies)
    # Slow answers, so the kill lands between the first write and the next ones.
    site.fleet.latency = 0.3
    proc = site.start("apply", str(plan_file), "--yes", write_token=WRITE_SECRET)
    deadline = time.monotonic() + 60
    while len(site.fleet.policies) == before:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no policy was created in time"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=30)
    site.outputs.append(out + err)
    assert proc.returncode == -signal.SIGKILL
    created_by_killed = len(site.fleet.policies) - before
    assert 1 <= created_by_killed < 4, "the kill came too late to test anything"
    site.fleet.latency = 0.0

    rerun = site.run("apply", str(plan_file), "--yes", write_token=WRITE_SECRET)
    assert rerun.returncode == 1, rerun.stdout + rerun.stderr  # the change(s) made before the kill are stale
    assert rerun.stdout.count("stale: ") == created_by_killed, rerun.stdout
    for disk_id in DISKS:
        assert len(covering(site.fleet, disk_id)) == 1, (disk_id, covering(site.fleet, disk_id))
    assert site.fleet.policies["dbp_weak"].retention == 14
    # The first disk's history: the killed attempt (closed by the rerun if its outcome was never written), then the
    # rerun's stale check.
    first = next(c["disk_id"] for c in json.loads(plan_file.read_text())["changes"])
    rows = json.loads(site.run("history", first, "--format", "json").stdout)["remediations"]
    assert [r["status"] for r in rows][-1] == "stale"
    assert rows[0]["status"] in ("applied", "interrupted"), rows
