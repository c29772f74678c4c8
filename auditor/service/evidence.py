"""The evidence export for an external auditor: `build_evidence` gives the period report (JSON, CSV, HTML) with the
configuration (secrets redacted), rule parameters, waivers in force with their events, the runs and a
`MANIFEST.sha256`; the same database and period give byte-identical files. `write_evidence` writes them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr

from auditor.config import RulesSettings, Settings
from auditor.domain import periods
from auditor.domain.models import Waiver
from auditor.domain.periods import Period
from auditor.domain.rules import RULES
from auditor.errors import FolderNotEmptyError
from auditor.render.compliance import compliance_csv, compliance_html
from auditor.render.evidence import json_bytes, manifest, runs_csv
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
from auditor.service.services import Services, database_label
from auditor.vocabulary import format_duration

REDACTED = "<redacted>"
MANIFEST = "MANIFEST.sha256"


def _plain(value: Any) -> Any:
    """Returns a JSON-ready copy of a settings value with every secret redacted."""
    if isinstance(value, SecretStr):
        return REDACTED if value.get_secret_value() else ""
    if isinstance(value, BaseModel):
        return {name: _plain(getattr(value, name)) for name in sorted(type(value).model_fields)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, list | tuple | set | frozenset):
        items = [_plain(v) for v in value]
        return sorted(items, key=json.dumps) if isinstance(value, set | frozenset) else items
    if isinstance(value, timedelta):
        return format_duration(value, style="export")
    if isinstance(value, datetime):
        return iso(value.astimezone(UTC)) if value.tzinfo else value.isoformat()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def redacted_config(settings: Settings) -> dict[str, Any]:
    """Returns the effective configuration with every secret redacted (the database URL keeps all but its password).

    Secrets are the `SecretStr` settings: API token, notifier URLs, routing keys and passwords, the heartbeat URL.
    """
    out: dict[str, Any] = _plain(settings)
    out["database"]["url"] = database_label(settings)
    # The email notifier's sender is `from` in the file (a Python keyword, so `from_` in the model).
    for notifier in out["notifiers"]:
        if "from_" in notifier:
            notifier["from"] = notifier.pop("from_")
    return out


def rules_json(rules: RulesSettings) -> dict[str, Any]:
    """Returns the rules with their severities and whether they are enabled, the default parameters and overrides."""
    return {
        "defaults": {"min_retention": rules.min_retention, "min_retention_days": rules.min_retention_days,
                     "max_interval": rules.max_interval,
                     "stale_grace": format_duration(rules.stale_grace, style="export")},
        "overrides": [{k: _plain(v) for k, v in sorted(o.model_dump(exclude_none=True).items())}
                      for o in rules.overrides],
        "rules": [{"id": rule.id, "description": rule.description, "default_severity": rule.severity.value,
                   "severity": rules.severity.get(rule.id, rule.severity.value),
                   "enabled": rule.id not in rules.disabled} for rule in RULES.values()],
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
            not_in_force.append({"index": index, "problem": problems[0].problem, "waiver": _plain(item)})
        elif not waivers_during(parsed, period):
            not_in_force.append({"index": index, "problem": f"expired on {parsed[0].expires.isoformat()}, before "
                                 "the period", "waiver": _plain(item)})
        well_formed += parsed
    items = []
    for w in waivers_during(well_formed, period):
        mine = [e for e in changes if e.rule == w.rule and e.disk_id == w.disk_id
                and (w.policy_id is None or w.policy_id == e.policy_id)]
        items.append({**waiver_json(w, period), "events": [
            {"at": iso(e.at), "kind": e.kind, "fingerprint": e.fingerprint, "policy_id": e.policy_id}
            for e in sorted(mine, key=lambda e: (e.at, e.fingerprint, e.kind))]})
    return {"period": {"from": iso(start), "to": iso(end)}, "waivers": items, "not_in_force": not_in_force}


async def build_evidence(services: Services, *, period: Period) -> dict[str, bytes]:
    """Returns the evidence files by name (MANIFEST.sha256 included); the same database and period give the same
    bytes: nothing in them reads the clock (the report's `generated_at` is the period's end)."""
    settings = services.settings
    waivers, _ = configured_waivers(settings.waivers)
    data = await read_period_data(services, period=period)
    report = compliance_from(data, period=period, interval=settings.audit.interval, waivers=waivers,
                             generated_at=period.end)
    runs = await read_period_runs(services, period=period)
    run_items = [r for r in (run_json(run) for run in runs) if r is not None]
    files = {
        "compliance.json": json_bytes(report),
        "compliance.csv": compliance_csv(report).encode(),
        "compliance.html": compliance_html(report).encode(),
        "config.json": json_bytes(redacted_config(settings)),
        "rules.json": json_bytes(rules_json(settings.rules)),
        "waivers.json": json_bytes(waivers_json(settings.waivers, data.events, period)),
        "runs.json": json_bytes({"period": report["period"], "runs": run_items}),
        "runs.csv": runs_csv(run_items).encode(),
        # Every change `auditor apply` attempted in the period: who, when, the request, the answer, the outcome.
        "remediations.json": json_bytes({"period": report["period"], "remediations": await read_remediations(
            services, start=period.start, end=period.end)}),
    }
    files[MANIFEST] = manifest(files)
    return files


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
