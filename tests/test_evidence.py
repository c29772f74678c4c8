"""The evidence bundle, end to end on SQLite and PostgreSQL: real cycles against the fake Katapult with a
configuration change in the middle of the period; what each file holds (the configurations in force with their
runs, the findings register, snapshots, drift, deliveries, metadata); exports that do not depend on the exporting
process's configuration; SSH signatures checked with stock `ssh-keygen -Y verify`; the OSCAL document validated
against NIST's published JSON schema; and the CLI as a subprocess.

The story (the period 2025-01-01 – 2025-01-04, a run every 6 hours): configuration A until the 30h run, then B
(`rules.min_retention` 5 instead of 7, a second notifier). D2's policy is weakened to retention 3 before the 24h run
and fixed before the 60h run; D0 has no policy, waived until 2025-01-02; D1 cannot be read at the 54h run.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import regex
from sqlalchemy import func, select

from auditor.config import REDACTED, Settings, canonical_json, config_fingerprint
from auditor.domain.models import FindingStatus, Severity, TrackedFinding
from auditor.domain.periods import Period
from auditor.domain.records import RunStatus
from auditor.errors import SigningError
from auditor.fake import Fault
from auditor.fake import create_app as fake_app
from auditor.service import Services, open_services
from auditor.service.evidence import (
    MANIFEST,
    SIGNATURE,
    SIGNATURE_NAMESPACE,
    build_evidence,
    sign_manifest,
    write_evidence,
)
from auditor.service.services import rewire
from auditor.store.engine import SCHEMA_HEAD
from auditor.store.tables import outbox, run_configs
from tests.test_compliance import (
    API_SECRET,
    D0,
    D1,
    D2,
    HEARTBEAT_SECRET,
    PERIOD,
    T0,
    TOKEN,
    WEBHOOK_SECRET,
    H,
    cycle_at,
    make_fleet,
    opening,
    settings_for,
)

OSCAL_SCHEMA = Path(__file__).parent / "schemas" / "oscal_assessment-results_schema-1.0.6.json"
ROUTING_SECRET = "rk-SECRET-0c1d2e3f4a5b6c7d8e9f0a1b2c3d4e5f"


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> Any:
        return self.now


def config_a(db_url: str) -> Settings:
    return settings_for(db_url, notifiers=[{"kind": "webhook", "name": "ops", "url": WEBHOOK_SECRET}],
                        heartbeat={"url": HEARTBEAT_SECRET}, api={"token": API_SECRET})


def config_b(db_url: str) -> Settings:
    a = config_a(db_url)
    return a.model_copy(update={
        "rules": a.rules.model_copy(update={"min_retention": 5}),
        "notifiers": [*a.notifiers, *Settings(notifiers=[{"kind": "pagerduty", "name": "pager",
                                                          "routing_key": ROUTING_SECRET}]).notifiers]})


async def play(services: Services, b: Settings, fleet: Any, clock: Clock) -> Services:
    """Runs the story's cycles, switching to configuration `b` after the 30h run; returns the services of b."""

    async def run(hour: int, expected: RunStatus) -> None:
        await cycle_at(services, clock, hour, expected)

    await opening(services, fleet, clock)
    services = rewire(services, b, transport=httpx.ASGITransport(app=fake_app(fleet)), token=TOKEN)
    await run(36, RunStatus.COMPLETE)
    await run(48, RunStatus.COMPLETE)
    fleet.faults[D1] = Fault.UNAVAILABLE
    await run(54, RunStatus.PARTIAL)
    fleet.faults.clear()
    fleet.update_policy("dbp_weakened", retention=14)
    for hour in (60, 66):
        await run(hour, RunStatus.COMPLETE)
    return services


def receiver(log: list[httpx.Request]) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        log.append(request)
        return httpx.Response(202 if "pagerduty" in str(request.url) else 200)

    return httpx.MockTransport(handle)


async def story(db_url: str, then: Callable[[Services], Awaitable[Any]] | None = None) -> tuple[
        dict[str, bytes], Any, Settings, Settings]:
    """Plays the story (delivering its alerts) and exports the period; returns the files, what `then` (given the
    services of b, before they close) returned, and both configurations."""
    from auditor.service.delivery import deliver_due

    fleet = make_fleet()
    a, b = config_a(db_url), config_b(db_url)
    clock = Clock()
    sent: list[httpx.Request] = []
    async with open_services(a, transport=httpx.ASGITransport(app=fake_app(fleet)), token=TOKEN, clock=clock,
                             notify_transport=receiver(sent),
                             heartbeat_transport=httpx.MockTransport(lambda r: httpx.Response(200))) as services:
        later = await play(services, b, fleet, clock)
        await deliver_due(later)
        assert sent, "the story delivers alerts"
        clock.now = T0 + 80 * H
        files = await build_evidence(later, period=PERIOD)
        return files, (await then(later) if then is not None else None), a, b


async def scalars(services: Services, statement: Any) -> list[Any]:
    async with services.store.engine.connect() as conn:
        return list((await conn.execute(statement)).scalars())


def as_json(files: dict[str, bytes], name: str) -> Any:
    return json.loads(files[name])


def csv_rows(files: dict[str, bytes], name: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(files[name].decode())))


# ---- what was in force -------------------------------------------------------------------------------------------


async def test_a_config_change_mid_period_lists_both_configurations_with_their_runs(db_url: str) -> None:
    files, stored, a, b = await story(db_url, lambda s: scalars(s, select(func.count()).select_from(run_configs)))
    fa, fb = config_fingerprint(a), config_fingerprint(b)
    assert fa != fb
    configs = as_json(files, "configs.json")
    assert set(configs["configs"]) == {fa, fb} and configs["runs_without_configuration"] == 0
    runs = as_json(files, "runs.json")["runs"]
    assert [r["config_fingerprint"] for r in runs] == [fa] * 6 + [fb] * 5
    first_a, first_b = configs["configs"][fa], configs["configs"][fb]
    assert (first_a["first_run"]["id"], first_a["last_run"]["id"], first_a["runs"]) == (runs[0]["id"], runs[5]["id"],
                                                                                        6)
    assert (first_b["first_run"]["id"], first_b["last_run"]["id"], first_b["runs"]) == (runs[6]["id"], runs[10]["id"],
                                                                                        5)
    assert first_a["first_run"]["started_at"] == "2025-01-01T00:00:00Z"
    assert first_b["first_run"]["started_at"] == "2025-01-02T12:00:00Z"
    assert first_a["config"]["rules"]["min_retention"] == 7 and first_b["config"]["rules"]["min_retention"] == 5
    # A fingerprint is the SHA-256 of its configuration's canonical JSON: anyone can recompute it.
    for fingerprint, entry in configs["configs"].items():
        assert hashlib.sha256(canonical_json(entry["config"])).hexdigest() == fingerprint
    assert [r["config_fingerprint"] for r in csv_rows(files, "runs.csv")] == [fa] * 6 + [fb] * 5
    rules = as_json(files, "rules.json")
    assert (rules["configs"][fa]["defaults"]["min_retention"], rules["configs"][fb]["defaults"]["min_retention"]) == (
        7, 5)
    # config.json and rules.json's top level: the configuration in force at the end, b.
    assert (rules["config_fingerprint"], rules["defaults"]["min_retention"]) == (fb, 5)
    assert as_json(files, "config.json") == first_b["config"]
    # Each distinct configuration is stored once, however many runs used it.
    assert stored == [2]
    metadata = as_json(files, "metadata.json")
    assert metadata["configurations"] == [fa, fb] and metadata["configuration_basis"] == "recorded"
    assert metadata["schema_revision"] == SCHEMA_HEAD and metadata["database"] == db_url.split(":")[0].split("+")[0]
    assert metadata["period"] == {"from": "2025-01-01T00:00:00Z", "to": "2025-01-04T00:00:00Z"}
    assert metadata["audit_interval"] == "6h" and metadata["runs"] == 11


async def test_the_export_does_not_depend_on_the_exporting_process(db_url: str) -> None:
    a = config_a(db_url)
    # Another process exports later with its own, different configuration: other rules, interval and waivers.
    other = a.model_copy(update={
        "rules": a.rules.model_copy(update={"min_retention": 1}),
        "audit": a.audit.model_copy(update={"interval": a.audit.interval * 4}),
        "waivers": [{"rule": "unprotected-disk", "disk": D0, "reason": "other", "owner": "x@example.com",
                     "expires": "2026-01-01"}]})
    files, again, _, _ = await story(db_url, lambda s: build_evidence(
        replace(s, settings=other, clock=lambda: T0 + 900 * H), period=PERIOD))
    assert again == files
    assert as_json(files, "compliance.json")["coverage"]["interval_seconds"] == 6 * 3600


async def test_runs_recorded_without_a_configuration_are_said_so(db_url: str) -> None:
    """Runs recorded before configurations were kept (NULL fingerprint): the export falls back on the exporting
    process's configuration for the interval and waivers and says so."""
    from sqlalchemy import update

    from auditor.store.tables import runs

    async def as_if_recorded_before(services: Services) -> dict[str, bytes]:
        async with services.store.engine.begin() as conn:
            await conn.execute(update(runs).values(config_fingerprint=None))
        return await build_evidence(services, period=PERIOD)

    _, files, _, _ = await story(db_url, as_if_recorded_before)
    metadata = as_json(files, "metadata.json")
    assert (metadata["configuration_basis"], metadata["configurations"]) == ("exporting", [])
    assert metadata["runs_without_configuration"] == metadata["runs"] == 11
    assert as_json(files, "configs.json")["configs"] == {}
    assert {r["config_fingerprint"] for r in as_json(files, "runs.json")["runs"]} == {None}


async def test_a_period_without_runs_takes_the_configuration_of_the_last_run_before_it(db_url: str) -> None:
    """The daemon was stopped through the period: the configuration in force is that of the last run before it
    (b), never the exporting process's own."""
    a = config_a(db_url)
    other = a.model_copy(update={"rules": a.rules.model_copy(update={"min_retention": 1}),
                                 "audit": a.audit.model_copy(update={"interval": a.audit.interval * 4})})
    quiet = Period(T0 + 100 * H, T0 + 124 * H)  # after the story's last run (66 h)

    async def both(services: Services) -> tuple[dict[str, bytes], dict[str, bytes]]:
        mine = await build_evidence(services, period=quiet)
        theirs = await build_evidence(replace(services, settings=other), period=quiet)
        return mine, theirs

    _, (mine, theirs), _, b = await story(db_url, both)
    assert mine == theirs
    metadata = as_json(mine, "metadata.json")
    assert metadata["configuration_basis"] == "preceding" and metadata["runs"] == 0
    assert as_json(mine, "rules.json")["config_fingerprint"] == config_fingerprint(b)
    assert as_json(mine, "rules.json")["defaults"]["min_retention"] == 5
    assert as_json(mine, "compliance.json")["coverage"]["interval_seconds"] == 6 * 3600


def test_the_registers_tier_is_the_tier_that_required_the_values() -> None:
    from auditor.domain.records import DriftRecord
    from auditor.service.evidence import tier_at

    finding = TrackedFinding("fp", "retention-below-minimum", D0, "dbp_x", Severity.HIGH, FindingStatus.OPEN, "m",
                             {"retention": 3}, {"min_retention": 10}, T0, T0 + 10 * H, T0)  # opened in no tier

    def moved(hours: int, before: str | None, after: str | None) -> DriftRecord:
        return DriftRecord(D0, "", "run", T0 + hours * H, "tier-changed", {"tier": before}, {"tier": after})

    assert tier_at(finding, []) is None  # never moved: the tier it opened in
    assert tier_at(finding, [moved(5, None, "gold")]) == "gold"  # judged by gold when last seen
    assert tier_at(finding, [moved(5, None, "gold"), moved(10, "gold", "silver")]) == "silver"  # at last_seen
    assert tier_at(finding, [moved(12, "gold", "silver")]) == "gold"  # moved only after it was last judged


async def test_the_register_snapshots_drift_and_deliveries(db_url: str) -> None:
    files, keys, _, _ = await story(db_url, lambda s: scalars(s, select(outbox.c.id)))
    register = {(f["disk_id"], f["rule"]): f for f in as_json(files, "findings.json")["findings"]}
    retention = register[(D2, "retention-below-minimum")]
    assert retention["disk_name"] == "weakened" and retention["policy_id"] == "dbp_weakened"
    assert retention["opened_at"] == "2025-01-02T00:00:00Z" and retention["resolved_at"] == "2025-01-03T12:00:00Z"
    assert retention["status_at_end"] == "resolved" and retention["severity"]
    assert retention["observed"] and retention["required"] and retention["observed"] != retention["required"]
    assert [e["kind"] for e in retention["events"]] == ["opened", "resolved"]
    unprotected = register[(D0, "unprotected-disk")]
    assert unprotected["status_at_end"] == "open"
    assert (unprotected["waiver"]["owner"], unprotected["waiver"]["expires"]) == ("ops@example.com", "2025-01-02")
    assert [e["kind"] for e in unprotected["events"]] == ["waived", "unwaived"]  # born waived
    rows = {(r["disk_id"], r["rule"]): r for r in csv_rows(files, "findings.csv")}
    assert set(rows) == set(register)
    assert rows[(D0, "unprotected-disk")]["waived_by"] == "ops@example.com"
    assert rows[(D0, "unprotected-disk")]["waived_until"] == "2025-01-02"
    assert json.loads(rows[(D2, "retention-below-minimum")]["observed"]) == retention["observed"]

    states = as_json(files, "snapshots.json")["policy_states"]
    assert sorted(s["retention"] for s in states if s["policy_id"] == "dbp_weakened") == [3, 14, 14]
    drift = as_json(files, "drift.json")["events"]
    changed = [d for d in drift if d["policy_id"] == "dbp_weakened" and d["kind"] == "policy-changed"]
    assert [d["at"] for d in changed] == ["2025-01-02T00:00:00Z", "2025-01-03T12:00:00Z"]

    deliveries = csv_rows(files, "deliveries.csv")
    assert deliveries and {d["idempotency_key"] for d in deliveries} <= set(keys)
    assert {(d["notifier"], d["notifier_kind"]) for d in deliveries} == {("ops", "webhook"), ("pager", "pagerduty")}
    assert all(d["result"] == "delivered" for d in deliveries), deliveries
    assert {d["transition"] for d in deliveries} >= {"firing", "resolved"}

    everything = b"".join(files.values()).decode()
    for secret in (WEBHOOK_SECRET, HEARTBEAT_SECRET, API_SECRET, ROUTING_SECRET, "SECRET", "hooks.example.com"):
        assert secret not in everything
    assert REDACTED in files["configs.json"].decode()
    readme = files["README.md"].decode()
    for name in files:
        assert name == "README.md" or f"`{name}`" in readme, name
    assert f"-n {SIGNATURE_NAMESPACE}" in readme


# ---- signatures --------------------------------------------------------------------------------------------------


def ssh_keygen(*args: str, cwd: Path, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["ssh-keygen", *args], cwd=cwd, input=stdin, capture_output=True, timeout=30)


@pytest.fixture
def signing_key(tmp_path: Path) -> Path:
    if shutil.which("ssh-keygen") is None:  # pragma: no cover - OpenSSH is in every image the suite runs in
        pytest.fail("ssh-keygen is not installed")
    key = tmp_path / "keys" / "evidence_ed25519"
    key.parent.mkdir()
    assert ssh_keygen("-q", "-t", "ed25519", "-N", "", "-C", "auditor@example.com", "-f", str(key),
                      cwd=tmp_path).returncode == 0
    return key


def allowed_signers(key: Path) -> Path:
    path = key.parent / "allowed_signers"
    path.write_text(f'auditor@example.com namespaces="{SIGNATURE_NAMESPACE}" {key.with_suffix(".pub").read_text()}')
    return path


def verify(folder: Path, signers: Path) -> subprocess.CompletedProcess[bytes]:
    return ssh_keygen("-Y", "verify", "-f", str(signers), "-I", "auditor@example.com", "-n", SIGNATURE_NAMESPACE,
                      "-s", SIGNATURE, cwd=folder, stdin=(folder / MANIFEST).read_bytes())


def flip_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_a_signed_bundle_verifies_with_ssh_keygen_and_fails_after_one_byte_changes(signing_key: Path,
                                                                                   tmp_path: Path) -> None:
    files = {"a.json": b'{"a": 1}\n', "b.csv": b"x,y\n1,2\n"}
    from auditor.render.evidence import manifest

    files[MANIFEST] = manifest(files)
    files[SIGNATURE] = sign_manifest(files[MANIFEST], signing_key)
    assert files[SIGNATURE].startswith(b"-----BEGIN SSH SIGNATURE-----")
    assert sign_manifest(files[MANIFEST], signing_key) == files[SIGNATURE]  # Ed25519: the same bytes each time
    signers = allowed_signers(signing_key)
    good = write_evidence(files, tmp_path / "good")[0].parent
    check = verify(good, signers)
    assert check.returncode == 0, check.stderr
    assert b"Good" in check.stdout + check.stderr
    assert subprocess.run(["sha256sum", "-c", "--quiet", MANIFEST], cwd=good, timeout=30).returncode == 0

    # One byte of the manifest changed: the signature no longer verifies.
    forged = write_evidence(files, tmp_path / "forged")[0].parent
    flip_one_byte(forged / MANIFEST)
    assert verify(forged, signers).returncode != 0
    # One byte of a file changed: the signed manifest no longer matches it.
    edited = write_evidence(files, tmp_path / "edited")[0].parent
    flip_one_byte(edited / "b.csv")
    assert verify(edited, signers).returncode == 0
    assert subprocess.run(["sha256sum", "-c", "--quiet", MANIFEST], cwd=edited, capture_output=True,
                          timeout=30).returncode != 0
    # Signed with another key: not the signer the auditor trusts.
    other = tmp_path / "other_ed25519"
    assert ssh_keygen("-q", "-t", "ed25519", "-N", "", "-f", str(other), cwd=tmp_path).returncode == 0
    (good / SIGNATURE).write_bytes(sign_manifest(files[MANIFEST], other))
    assert verify(good, signers).returncode != 0


@pytest.mark.slow
def test_signing_problems_are_one_line(tmp_path: Path, signing_key: Path) -> None:
    locked = tmp_path / "locked_ed25519"
    assert ssh_keygen("-q", "-t", "ed25519", "-N", "a passphrase", "-f", str(locked), cwd=tmp_path).returncode == 0
    not_a_key = tmp_path / "notes.txt"
    not_a_key.write_text("not a key\n")
    exposed = tmp_path / "exposed_ed25519"
    assert ssh_keygen("-q", "-t", "ed25519", "-N", "", "-f", str(exposed), cwd=tmp_path).returncode == 0
    exposed.chmod(0o644)
    for key, words in ((tmp_path / "missing", "no such key file"), (locked, "protected by a passphrase"),
                       (not_a_key, "not an SSH private key"), (exposed, "readable by others (mode 0644)")):
        with pytest.raises(SigningError) as err:
            sign_manifest(b"x\n", key)
        assert words in str(err.value) and "\n" not in str(err.value) and str(key) in str(err.value)


# ---- OSCAL -------------------------------------------------------------------------------------------------------


def oscal_validator() -> jsonschema.Draft7Validator:
    """NIST's OSCAL 1.0.6 assessment-results schema (usnistgov/OSCAL v1.0.6, json/schema). Its patterns use
    Unicode classes (`\\p{L}`) that Python's `re` lacks; they are checked with the `regex` module, which has them."""
    schema = json.loads(OSCAL_SCHEMA.read_text())

    def pattern(validator: Any, patrn: str, instance: Any, schema: Any) -> Any:
        if isinstance(instance, str) and not regex.search(patrn, instance):
            yield jsonschema.ValidationError(f"{instance!r} does not match {patrn!r}")

    cls = jsonschema.validators.extend(jsonschema.Draft7Validator, {"pattern": pattern})
    return cls(schema, format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)  # type: ignore[no-any-return]


def errors_of(doc: Any) -> list[str]:
    return [e.message for e in oscal_validator().iter_errors(doc)]


async def test_the_oscal_document_validates_against_nists_schema(db_url: str) -> None:
    files, _, _, _ = await story(db_url)
    doc = as_json(files, "oscal-assessment-results.json")
    assert errors_of(doc) == []
    (result,) = doc["assessment-results"]["results"]
    assert (result["start"], result["end"]) == ("2025-01-01T00:00:00Z", "2025-01-04T00:00:00Z")
    observations = {o["uuid"]: o for o in result["observations"]}
    titles = {o["title"] for o in observations.values()}
    # One observation per disk per rule.
    enabled = [r["id"] for r in next(iter(as_json(files, "rules.json")["configs"].values()))["rules"] if r["enabled"]]
    assert len(observations) == 3 * len(enabled) and f"unprotected-disk on steady ({D1})" in titles
    register = as_json(files, "findings.json")["findings"]
    assert len(result["findings"]) == len(register)
    for finding in result["findings"]:
        (link,) = finding["related-observations"]
        observed = observations[link["observation-uuid"]]
        assert observed["title"] == finding["title"] and finding["target"]["target-id"] in observed["title"]
    states = {f["title"]: f["target"]["status"]["state"] for f in result["findings"]}
    assert states[f"retention-below-minimum on weakened ({D2})"] == "satisfied"  # resolved in the period
    assert states[f"unprotected-disk on unprotected ({D0})"] == "not-satisfied"


BREAKAGES: list[tuple[str, Callable[[dict[str, Any]], None]]] = [
    ("no uuid", lambda d: d["assessment-results"].pop("uuid")),
    ("a version-1 uuid", lambda d: d["assessment-results"]["results"][0].update(
        uuid="c232d7c4-d2c4-11ee-a2b1-0242ac120002")),
    ("a time without a zone", lambda d: d["assessment-results"]["results"][0].update(start="2025-01-01T00:00:00")),
    ("an unknown finding target type", lambda d: d["assessment-results"]["results"][0]["findings"][0]["target"]
     .update(type="disk")),
    ("an observation without methods", lambda d: d["assessment-results"]["results"][0]["observations"][0]
     .pop("methods")),
    ("a property name with a space", lambda d: d["assessment-results"]["results"][0]["observations"][0]["props"][0]
     .update(name="disk id")),
    ("an unknown field", lambda d: d["assessment-results"]["metadata"].update(generated="now")),
]


@pytest.mark.parametrize(("what", "breakage"), BREAKAGES, ids=[b[0] for b in BREAKAGES])
async def test_a_broken_oscal_document_does_not_validate(what: str, breakage: Callable[[dict[str, Any]], None],
                                                         tmp_path: Path) -> None:
    from auditor.render.evidence import oscal_assessment_results

    period = {"from": "2025-01-01T00:00:00Z", "to": "2025-01-04T00:00:00Z"}
    disk = {"disk_id": D2, "name": "weakened", "compliance_pct": 50.0, "compliant_seconds": 1, "waived_seconds": 0,
            "noncompliant_seconds": 1, "unknown_seconds": 0, "no_data_seconds": 0}
    finding = {"fingerprint": "f" * 32, "rule": "retention-below-minimum", "severity": "warning", "disk_id": D2,
               "disk_name": "weakened", "observed": {"retention": 3}, "required": {"retention": 7},
               "opened_at": "2025-01-02T00:00:00Z", "resolved_at": None, "status_at_end": "open"}
    doc = oscal_assessment_results(period=period, version="0.1.0", collected=period["to"], disks=[disk],
                                   rules=[{"id": "retention-below-minimum", "description": "Retention"}],
                                   findings=[finding])
    assert errors_of(doc) == []
    breakage(doc)
    assert errors_of(doc), what


# ---- the command line --------------------------------------------------------------------------------------------


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "auditor", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(cwd),
                                            **(env or {})})
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    return proc


@pytest.mark.slow
def test_evidence_on_the_command_line_is_signed_and_ignores_environment_overrides(tmp_path: Path,
                                                                                  signing_key: Path) -> None:
    import asyncio

    db = tmp_path / "auditor.db"

    async def fill() -> None:
        await story(f"sqlite:///{db}")

    asyncio.run(fill())
    config = tmp_path / "auditor.toml"
    config.write_text(f'[database]\nurl = "sqlite:///{db}"\n[log]\nlevel = "warning"\n')
    args = ("--config", str(config), "--since", "3d", "--until", "2025-01-04")
    plain = cli("evidence", *args, "--out", str(tmp_path / "plain"), "--sign", str(signing_key), cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr
    assert f"-n {SIGNATURE_NAMESPACE} -s {SIGNATURE}" in plain.stdout
    overridden = cli("evidence", *args, "--out", str(tmp_path / "overridden"), "--sign", str(signing_key),
                     cwd=tmp_path, env={"AUDITOR_RULES__MIN_RETENTION": "1", "AUDITOR_AUDIT__INTERVAL": "1h"})
    assert overridden.returncode == 0, overridden.stderr
    names = sorted(p.name for p in (tmp_path / "plain").iterdir())
    assert SIGNATURE in names and names == sorted(p.name for p in (tmp_path / "overridden").iterdir())
    for name in names:
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "overridden" / name).read_bytes(), name
    signers = allowed_signers(signing_key)
    assert verify(tmp_path / "plain", signers).returncode == 0
    assert subprocess.run(["sha256sum", "-c", "--quiet", MANIFEST], cwd=tmp_path / "plain",
                          timeout=30).returncode == 0
    # The bundle's README shows how to check each configuration against its fingerprint: it works as written.
    readme = (tmp_path / "plain" / "README.md").read_text()
    snippet = "\n".join(line.removeprefix("   ") for line in
                        readme[readme.index("python3 - <<'PY'"):readme.index("   PY\n") + 6].splitlines())
    checked = subprocess.run(["sh", "-c", snippet.replace("python3", sys.executable, 1)], cwd=tmp_path / "plain",
                             capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stderr
    assert sorted(checked.stdout.split()) == sorted([*json.loads((tmp_path / "plain" / "configs.json").read_text())
                                                     ["configs"], "True", "True"])
    flip_one_byte(tmp_path / "plain" / "findings.csv")
    assert subprocess.run(["sha256sum", "-c", "--quiet", MANIFEST], cwd=tmp_path / "plain", capture_output=True,
                          timeout=30).returncode != 0

    bad = cli("evidence", *args, "--out", str(tmp_path / "bad"), "--sign", str(tmp_path / "nope"), cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0
    assert "cannot sign with" in bad.stderr and "no such key file" in bad.stderr
    assert not (tmp_path / "bad").exists()


# ---- the register and recording, piece by piece ------------------------------------------------------------------


def test_the_register_keeps_only_findings_open_during_the_period() -> None:
    from auditor.domain.models import FindingStatus, Severity, TrackedFinding
    from auditor.domain.periods import LifecycleEvent, Period
    from auditor.service.evidence import register_json
    from auditor.store.queries import RegisterEntry

    period = Period(T0, T0 + 24 * H)

    def entry(fp: str) -> RegisterEntry:
        return RegisterEntry(TrackedFinding(fp, "unprotected-disk", D0, None, Severity.CRITICAL, FindingStatus.OPEN,
                                            "m", {"policies": 0}, {"policies": ">= 1"}, T0 - 48 * H, T0, T0 - 48 * H),
                             "unprotected", "org:acme")

    def ev(fp: str, hours: int, kind: str) -> LifecycleEvent:
        return LifecycleEvent(fp, "unprotected-disk", D0, None, T0 + hours * H, kind)

    events = [ev("before", -48, "opened"), ev("before", -24, "resolved"),  # resolved before the period
              ev("across", -48, "opened"),  # open when the period starts
              ev("inside", -48, "opened"), ev("inside", -24, "resolved"), ev("inside", 2, "reopened"),
              ev("inside", 5, "resolved"), ev("waived", -1, "opened"), ev("waived", 3, "waived")]
    rows = {r["fingerprint"]: r for r in register_json([entry(fp) for fp in ("before", "across", "inside", "waived")],
                                                       events, [], period)}
    assert set(rows) == {"across", "inside", "waived"}
    assert (rows["across"]["status_at_end"], rows["across"]["opened_at"], rows["across"]["resolved_at"]) == (
        "open", "2024-12-30T00:00:00Z", None)
    assert (rows["inside"]["status_at_end"], rows["inside"]["resolved_at"]) == ("resolved", "2025-01-01T05:00:00Z")
    assert rows["waived"]["status_at_end"] == "waived" and rows["across"]["organization"] == "acme"
    assert [e["kind"] for e in rows["inside"]["events"]] == ["opened", "resolved", "reopened", "resolved"]


async def test_a_failed_run_recorded_late_keeps_its_configuration_and_each_is_stored_once(db_url: str) -> None:
    from auditor.domain.records import RunError, RunStats
    from auditor.store import queries, writes

    async with open_services(config_a(db_url), katapult=False) as services:
        config = services.run_config
        assert config.fingerprint == config_fingerprint(services.settings)
        await services.store.write(writes.start_run, run_id="a" * 32, now=T0, trigger="schedule", owner=None,
                                   config=config)
        await services.store.write(writes.record_failed_run, "b" * 32, trigger="schedule", started_at=T0 + H,
                                   finished_at=T0 + H, errors=[RunError("*", "database_unavailable", "down")],
                                   stats=RunStats(), owner=None, config=config)
        runs = await services.store.read(queries.runs_between, start=T0, end=T0 + 2 * H)
        assert [(r.id, r.config_fingerprint) for r in runs] == [("a" * 32, config.fingerprint),
                                                                ("b" * 32, config.fingerprint)]
        stored = await services.store.read(queries.stored_configs, [config.fingerprint, "0" * 64])
        assert stored == {config.fingerprint: config}
        assert await scalars(services, select(func.count()).select_from(run_configs)) == [1]


async def test_a_run_abandoned_in_the_period_carries_no_wall_clock_time(db_url: str) -> None:
    from auditor.store import queries, writes

    async def with_an_orphan(services: Services) -> dict[str, bytes]:
        # Left running by a process that is gone (no live cycle lease names it): readers see it failed.
        await services.store.write(writes.start_run, run_id="c" * 32, now=T0 + 70 * H, trigger="schedule",
                                   owner="gone-host:1:nonce", config=services.run_config)
        return await build_evidence(services, period=PERIOD)

    _, files, _, _ = await story(db_url, with_an_orphan)
    last = as_json(files, "runs.json")["runs"][-1]
    assert (last["id"], last["status"]) == ("c" * 32, "failed")
    assert last["errors"] == [{"target": "*", "code": queries.ABANDONED, "message": queries.ABANDONED_REASON}]
    assert "noticed" not in files["runs.csv"].decode()
