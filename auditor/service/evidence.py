"""The evidence export for an external auditor: `build_evidence` gives the files of an evidence bundle (the period
report, every configuration in force with the runs that used it, rules and waivers of those configurations, the
findings register, policy snapshots, drift, alert deliveries, an OSCAL Assessment Results document, metadata, a
README and `MANIFEST.sha256`). Everything comes from the database, never from the exporting process's own
configuration or clock (but a period not ended yet, which is measured to now), so the same database and period
give byte-identical files. `sign_manifest` signs the
manifest with an SSH key (`ssh-keygen -Y sign`); `write_evidence` writes the files.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import replace as dc_replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from auditor import __version__
from auditor.config import Settings, fingerprint_of, redacted_config
from auditor.domain import periods
from auditor.domain.alerts import Delivery
from auditor.domain.models import FindingStatus, TrackedFinding, Waiver
from auditor.domain.periods import LifecycleEvent, Period
from auditor.domain.records import DriftRecord, PolicyStateRecord, RunConfig, RunRecord
from auditor.domain.rules import RULES
from auditor.errors import FolderNotEmptyError, SigningError
from auditor.render.compliance import compliance_csv, compliance_html
from auditor.render.evidence import (
    bundle_readme,
    deliveries_csv,
    findings_csv,
    json_bytes,
    manifest,
    oscal_assessment_results,
    runs_csv,
)
from auditor.service.compliance import (
    compliance_from,
    configured_waivers,
    read_period_data,
    read_period_runs,
    waiver_json,
    waivers_during,
)
from auditor.service.remediation import read_remediations
from auditor.service.reports import iso, run_json
from auditor.service.services import Services
from auditor.store import queries
from auditor.vocabulary import format_duration, parse_duration

MANIFEST = "MANIFEST.sha256"
SIGNATURE = "MANIFEST.sha256.sig"
SIGNATURE_NAMESPACE = "auditor-evidence"  # the `ssh-keygen -Y` namespace of evidence signatures
SIGNING_TIMEOUT = 30.0


def rules_json(rules: Mapping[str, Any]) -> dict[str, Any]:
    """Returns a stored configuration's rules (its `rules` section): the default parameters, the overrides, and the
    rules with their severities and whether they are enabled."""
    severity, disabled = rules.get("severity") or {}, set(rules.get("disabled") or ())
    return {
        "defaults": {key: rules.get(key) for key in ("min_retention", "min_retention_days", "max_interval",
                                                      "stale_grace")},
        "overrides": [{k: v for k, v in sorted(o.items()) if v is not None} for o in rules.get("overrides") or ()],
        "rules": [{"id": rule.id, "description": rule.description, "default_severity": rule.severity.value,
                   "severity": severity.get(rule.id, rule.severity.value), "enabled": rule.id not in disabled}
                  for rule in RULES.values()],
    }


def waivers_json(raw: Sequence[Mapping[str, Any]], events: Sequence[periods.LifecycleEvent],
                 period: Period) -> dict[str, Any]:
    """Returns the waivers in force during the period with the waive/unwaive events of the findings they match,
    and the configured waivers that were not in force (malformed, or expired before the period)."""
    start, end = period.start, period.end
    changes = [e for e in events if e.kind in ("waived", "unwaived") and start <= e.at < end]
    well_formed: list[Waiver] = []
    not_in_force: list[dict[str, Any]] = []
    for index, item in enumerate(raw):
        parsed, problems = configured_waivers([item])
        if problems:
            not_in_force.append({"index": index, "problem": problems[0].problem, "waiver": dict(item)})
        elif not waivers_during(parsed, period):
            not_in_force.append({"index": index, "problem": f"expired on {parsed[0].expires.isoformat()}, before "
                                 "the period", "waiver": dict(item)})
        well_formed += parsed
    items = []
    for w in waivers_during(well_formed, period):
        mine = [e for e in changes if e.rule == w.rule and e.disk_id == w.disk_id
                and (w.policy_id is None or w.policy_id == e.policy_id)]
        items.append({**waiver_json(w, period), "events": [
            {"at": iso(e.at), "kind": e.kind, "fingerprint": e.fingerprint, "policy_id": e.policy_id}
            for e in sorted(mine, key=lambda e: (e.at, e.fingerprint, e.kind))]})
    return {"period": {"from": iso(start), "to": iso(end)}, "waivers": items, "not_in_force": not_in_force}


def configs_json(runs: Sequence[RunRecord], stored: Mapping[str, RunConfig]) -> dict[str, Any]:
    """Returns each configuration the runs ran with, by fingerprint, with the first and last run that used it and
    how many did; runs recorded without one are counted apart."""
    used: dict[str, list[RunRecord]] = {}
    for run in runs:
        if run.config_fingerprint is not None:
            used.setdefault(run.config_fingerprint, []).append(run)
    configs = {}
    for fingerprint, mine in used.items():
        first, last = mine[0], mine[-1]
        found = stored.get(fingerprint)
        configs[fingerprint] = {
            "config": found.settings if found is not None else None,
            "first_run": {"id": first.id, "started_at": iso(first.started_at)},
            "last_run": {"id": last.id, "started_at": iso(last.started_at)},
            "runs": len(mine),
        }
    return {"configs": configs, "runs_without_configuration": sum(1 for r in runs if r.config_fingerprint is None)}


def _in_force(runs: Sequence[RunRecord], stored: Mapping[str, RunConfig]) -> list[RunConfig]:
    """Returns the stored configurations the runs ran with, ordered by the last run that used each (the last one is
    the configuration in force at the end)."""
    last: dict[str, RunConfig] = {}
    for run in runs:
        fp = run.config_fingerprint
        if fp is not None and fp in stored:
            last.pop(fp, None)
            last[fp] = stored[fp]
    return list(last.values())


def _waivers_of(configs: Sequence[RunConfig]) -> list[dict[str, Any]]:
    """Returns the waivers the configurations list, each once, in the order they first appear."""
    found: dict[str, dict[str, Any]] = {}
    for config in configs:
        for item in config.settings.get("waivers") or ():
            found.setdefault(fingerprint_of(item), item)
    return list(found.values())


def _status_at_end(events: Sequence[LifecycleEvent]) -> str:
    """Returns a finding's status at the period's end from its lifecycle events before it."""
    last = events[-1].kind if events else "opened"
    return {"resolved": FindingStatus.RESOLVED.value, "waived": FindingStatus.WAIVED.value}.get(
        last, FindingStatus.OPEN.value)


def tier_at(finding: TrackedFinding, changes: Sequence[DriftRecord]) -> str | None:
    """Returns the tier of the finding's disk when the finding was last judged (its `last_seen`), which is the tier
    whose rules gave its required values: from the disk's `tier-changed` events (oldest first), else the tier the
    finding opened in."""
    mine = [c for c in changes if c.disk_id == finding.disk_id]
    before = [c for c in mine if c.at <= finding.last_seen]
    if before:
        return (before[-1].after or {}).get("tier")
    if mine:  # it changed only later: the tier before that change
        return (mine[0].before or {}).get("tier")
    return finding.tier


def register_json(entries: Sequence[queries.RegisterEntry], events: Sequence[LifecycleEvent],
                  waivers: Sequence[Waiver], period: Period, *,
                  tier_changes: Sequence[DriftRecord] = ()) -> list[dict[str, Any]]:
    """Returns the findings register of the period: each finding open at some time of it with its disk, observed
    and required values (and the tier whose rules required them), when it opened and resolved, its status at the
    period's end, the waiver that covered it during the period (by whom, until when) and its lifecycle events up
    to the end."""
    changes_of: dict[str, list[DriftRecord]] = {}
    for change in tier_changes:
        changes_of.setdefault(change.disk_id, []).append(change)
    by_fp: dict[str, list[LifecycleEvent]] = {}
    for e in events:
        by_fp.setdefault(e.fingerprint, []).append(e)
    by_target: dict[tuple[str, str], list[Waiver]] = {}
    for w in waivers_during(waivers, period):
        by_target.setdefault((w.rule, w.disk_id), []).append(w)
    out = []
    for entry in entries:
        f = entry.finding
        mine = sorted(by_fp.get(f.fingerprint, []), key=lambda e: (e.at, e.kind))
        before = [e for e in mine if e.at < period.start]
        if mine and not (len(before) < len(mine) or _status_at_end(before) != FindingStatus.RESOLVED.value):
            continue  # resolved before the period and reopened only after it: never open during the period
        status = _status_at_end(mine)
        opened = [e.at for e in mine if e.kind in ("opened", "reopened")]
        resolved = [e.at for e in mine if e.kind == "resolved"]
        # The waiver that covered it during the period (it may have lapsed before the end: see status_at_end).
        covering = [w for w in by_target.get((f.rule, f.disk_id), ()) if w.matches(f)]
        waiver = covering[0].as_dict() if covering else (dict(f.waiver) if f.waiver and status == "waived" else None)
        source = entry.disk_source or ""
        out.append({
            "fingerprint": f.fingerprint, "rule": f.rule, "severity": f.severity.value, "disk_id": f.disk_id,
            "disk_name": entry.disk_name,
            "organization": source.removeprefix("org:") if source.startswith("org:") else None,
            "policy_id": f.policy_id, "tier": tier_at(f, changes_of.get(f.disk_id, ())), "observed": f.observed,
            "required": f.expected,
            "opened_at": iso(opened[0] if opened else f.opened_at),
            "resolved_at": iso(resolved[-1]) if status == FindingStatus.RESOLVED.value and resolved else None,
            "status_at_end": status, "waiver": waiver,
            "events": [{"at": iso(e.at), "kind": e.kind} for e in mine],
        })
    return out


def snapshot_json(state: PolicyStateRecord, period: Period) -> dict[str, Any]:
    """Returns one policy setting seen on a disk; `valid_to` is null when it was still in force at the period's end
    (its moving parts, next run and size, are left out: they are updated in place, and neither they nor a later
    change may alter an export of a past period)."""
    return {"disk_id": state.disk_id, "policy_id": state.policy_id, "retention": state.retention,
            "interval": state.interval, "target_type": state.target_type, "target_id": state.target_id,
            "target_name": state.target_name, "settings_hash": state.settings_hash,
            "valid_from": iso(state.valid_from),
            "valid_to": iso(state.valid_to) if state.valid_to is not None and state.valid_to < period.end else None}


def delivery_row(delivery: Delivery, run_id: str | None, fingerprint: str | None,
                 configs: Mapping[str, RunConfig], fallback: RunConfig | None) -> dict[str, Any]:
    """Returns one alert delivery for `deliveries.csv`: the notifier's kind comes from the configuration of the run
    that caused it (a test notification: the last configuration in force). Never a URL, key or error text."""
    config = configs.get(fingerprint or "") or fallback
    kinds = {n.get("name"): n.get("kind") for n in (config.settings.get("notifiers") or ())} if config else {}
    return {"idempotency_key": delivery.id, "notifier": delivery.notifier,
            "notifier_kind": kinds.get(delivery.notifier),
            "transition": delivery.kind, "created_at": iso(delivery.created_at),
            "delivered_at": iso(delivery.delivered_at), "result": delivery.state.value,
            "attempts": delivery.attempts, "last_status": delivery.last_status,
            "run_id": run_id}


async def build_evidence(services: Services, *, period: Period) -> dict[str, bytes]:
    """Returns the evidence files by name (MANIFEST.sha256 included).

    Only the database is read: the configurations are those the period's runs recorded (the one in force at the
    period's end gives the report's audit interval; the waivers are those of every configuration in force), so the
    exporting process's configuration and clock change nothing, and the same database and period give the same
    bytes. A period none of whose runs recorded its configuration (runs from before configurations were kept, or
    no run) takes the configuration of the last run before the period that recorded one (`"preceding"`), and only
    when there is none falls back on the exporting process's configuration for the interval and waivers;
    `metadata.json` says which (`configuration_basis`).
    """
    store = services.store
    runs = await read_period_runs(services, period=period)
    stored = await store.read(queries.stored_configs, [r.config_fingerprint for r in runs if r.config_fingerprint])
    in_force = _in_force(runs, stored)
    preceding = None if in_force else await store.read(queries.config_before, at=period.start)
    if in_force:  # the last one used is in force at the period's end
        governing, raw_waivers, basis = in_force[-1], _waivers_of(in_force), "recorded"
    elif preceding is not None:  # no run in the period: the configuration of the last run before it was in force
        governing, raw_waivers, basis = preceding, _waivers_of([preceding]), "preceding"
    else:
        settings = redacted_config(services.settings)
        governing, raw_waivers, basis = RunConfig(fingerprint_of(settings), settings), settings["waivers"], "exporting"
    interval = _interval_of(governing, fallback=services.settings)
    waivers, _ = configured_waivers(raw_waivers)
    data = await read_period_data(services, period=period, interval=interval)
    # Measured at the clock: a period in the past is measured whole whenever it is exported (the same bytes); one
    # reaching past now only up to now, as the period report is.
    report = compliance_from(data, period=period, interval=interval, waivers=waivers, generated_at=period.end,
                             now=services.clock())
    period_json = {"from": str(iso(period.start)), "to": str(iso(period.end))}
    run_items = [run_json(_without_clock(run)) or {} for run in runs]
    entries = await store.read(queries.findings_register, start=period.start, end=period.end)
    tier_changes = await store.read(queries.tier_changes, disk_ids=[e.finding.disk_id for e in entries])
    register = register_json(entries, data.events, waivers, period, tier_changes=tier_changes)
    states = await store.read(queries.policy_states_during, start=period.start, end=period.end)
    drift = await store.read(queries.drift_between, start=period.start, end=period.end)
    deliveries = [delivery_row(d, run_id, fp, stored, governing if in_force else None) for d, run_id, fp in
                  await store.read(queries.deliveries_between, start=period.start, end=period.end)]
    configs = configs_json(runs, stored)
    metadata = {
        "auditor_version": __version__,
        "schema_revision": await store.read(queries.schema_revision),
        "database": store.engine.dialect.name,
        "period": period_json,
        "configurations": list(configs["configs"]),
        "configuration_basis": basis,
        "audit_interval": format_duration(interval, style="export"),
        "runs": len(runs),
        "runs_without_configuration": configs["runs_without_configuration"],
        "signature_namespace": SIGNATURE_NAMESPACE,
    }
    enabled = [r for r in rules_json(governing.settings.get("rules") or {})["rules"] if r["enabled"]]
    oscal = oscal_assessment_results(
        period=period_json, version=__version__,
        collected=str(iso(runs[-1].started_at)) if runs else period_json["to"],
        disks=report["disks"], rules=[{"id": r["id"], "description": r["description"]} for r in enabled],
        findings=register)
    files = {
        "README.md": bundle_readme(period=period_json, namespace=SIGNATURE_NAMESPACE).encode(),
        "metadata.json": json_bytes(metadata),
        "compliance.json": json_bytes(report),
        "compliance.csv": compliance_csv(report).encode(),
        "compliance.html": compliance_html(report).encode(),
        "configs.json": json_bytes({"period": period_json, **configs}),
        # config.json and rules.json's top level: the configuration in force at the period's end (the last run's).
        "config.json": json_bytes(governing.settings),
        "rules.json": json_bytes({**rules_json(governing.settings.get("rules") or {}), "period": period_json,
                                  "config_fingerprint": governing.fingerprint, "configs": {
            c.fingerprint: rules_json(c.settings.get("rules") or {}) for c in (in_force or [governing])}}),
        "waivers.json": json_bytes(waivers_json(raw_waivers, data.events, period)),
        "runs.json": json_bytes({"period": report["period"], "runs": run_items}),
        "runs.csv": runs_csv(run_items).encode(),
        "findings.json": json_bytes({"period": period_json, "findings": register}),
        "findings.csv": findings_csv(register).encode(),
        "snapshots.json": json_bytes({"period": period_json,
                                      "policy_states": [snapshot_json(s, period) for s in states]}),
        "drift.json": json_bytes({"period": period_json, "events": [
            {"at": iso(d.at), "disk_id": d.disk_id, "policy_id": d.policy_id, "run_id": d.run_id, "kind": d.kind,
             "before": d.before, "after": d.after} for d in drift]}),
        "deliveries.csv": deliveries_csv(deliveries).encode(),
        "oscal-assessment-results.json": json_bytes(oscal, compact=True),
        # Every change `auditor apply` attempted in the period: who, when, the request, the answer, the outcome.
        "remediations.json": json_bytes({"period": period_json, "remediations": await read_remediations(
            services, start=period.start, end=period.end)}),
    }
    files[MANIFEST] = manifest(files)
    return files


def _without_clock(run: RunRecord) -> RunRecord:
    """Returns the run with the message of an `abandoned` error cut to its reason: the message says when a reader
    (or the daemon) noticed, a wall-clock time that would make two exports differ."""
    if not any(e.code == queries.ABANDONED for e in run.errors):
        return run
    return dc_replace(run, errors=tuple(dc_replace(e, message=queries.ABANDONED_REASON) if e.code == queries.ABANDONED
                                        else e for e in run.errors))


def _interval_of(config: RunConfig, *, fallback: Settings) -> timedelta:
    """Returns a stored configuration's audit interval (the exporting process's when it cannot be read)."""
    try:
        return parse_duration(config.settings["audit"]["interval"])
    except (KeyError, TypeError, ValueError):
        return fallback.audit.interval


def sign_manifest(manifest_bytes: bytes, key: Path) -> bytes:
    """Returns the SSH signature (`ssh-keygen -Y sign`, namespace `auditor-evidence`) of the manifest with the
    private key file `key`; SigningError (one line) when it cannot.

    ssh-keygen runs without a terminal (a new session, stdin the manifest), so a key that needs a passphrase fails
    instead of prompting.
    """
    program = shutil.which("ssh-keygen")
    if program is None:
        raise SigningError(key, "ssh-keygen (OpenSSH) is not installed")
    if not key.is_file():
        raise SigningError(key, "no such key file")
    try:
        proc = subprocess.run([program, "-Y", "sign", "-q", "-f", str(key), "-n", SIGNATURE_NAMESPACE],
                              input=manifest_bytes, capture_output=True, timeout=SIGNING_TIMEOUT,
                              start_new_session=True, env={**os.environ, "SSH_ASKPASS": "", "DISPLAY": ""})
    except subprocess.TimeoutExpired:
        raise SigningError(key, f"ssh-keygen did not finish within {SIGNING_TIMEOUT:.0f} s") from None
    except OSError as exc:
        raise SigningError(key, exc.strerror or str(exc)) from None
    if proc.returncode != 0 or not proc.stdout.startswith(b"-----BEGIN SSH SIGNATURE-----"):
        text = proc.stderr.decode(errors="replace")
        if "passphrase" in text:  # without a terminal ssh-keygen cannot ask for it: "Enter passphrase: Load key …"
            raise SigningError(key, "the key is protected by a passphrase; give a key without one")
        if "are too open" in text:  # "Permissions 0644 for 'k' are too open." … "No private key found"
            raise SigningError(key, f"the key file is readable by others (mode {key.stat().st_mode & 0o777:04o}), "
                                    "so ssh-keygen ignores it; chmod 600 it")
        if "Couldn't load public key" in text or "invalid format" in text:  # it read no private key from the file
            raise SigningError(key, "not an SSH private key (ssh-keygen could not load one from the file)")
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        raise SigningError(key, lines[-1] if lines else f"ssh-keygen exited with {proc.returncode}")
    return proc.stdout


def is_empty_folder(out: Path) -> bool:
    """Returns whether `out` holds nothing: a missing folder or an empty one."""
    try:
        return next(out.iterdir(), None) is None
    except OSError:
        return True  # missing, or not a directory or unreadable: mkdir or the write fails with the OS's reason


def write_evidence(files: Mapping[str, bytes], out: Path) -> list[Path]:
    """Writes the files into `out`, which must be missing or empty (created if missing).

    A folder that already holds anything is refused (FolderNotEmptyError, nothing written): an export written over
    another one, or beside foreign files, would still verify against its manifest while the folder shows more than
    the manifest covers.
    """
    if not is_empty_folder(out):
        raise FolderNotEmptyError(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in sorted(files):
        target = out / name
        tmp = out / f".{name}.tmp"
        tmp.write_bytes(files[name])
        os.replace(tmp, target)
        written.append(target)
    return written
