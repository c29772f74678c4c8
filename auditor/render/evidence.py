"""The evidence export's files other than the period report's: the runs, findings register and deliveries as CSV,
JSON files, the SHA-256 manifest, the OSCAL Assessment Results document and the bundle's README."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from auditor.render.cells import csv_cell

RUN_CSV_COLUMNS = ("id", "trigger", "status", "started_at", "finished_at", "targets_checked", "disks_read",
                   "disks_unknown", "api_requests", "api_retries", "api_rate_limited", "findings_opened",
                   "findings_resolved", "error_count", "errors", "config_fingerprint")
FINDING_CSV_COLUMNS = ("fingerprint", "rule", "severity", "disk_id", "disk_name", "organization", "policy_id",
                       "tier", "observed", "required", "opened_at", "resolved_at", "status_at_end", "waived_by",
                       "waived_until", "waiver_reason")
DELIVERY_CSV_COLUMNS = ("idempotency_key", "notifier", "notifier_kind", "transition", "created_at", "delivered_at",
                        "result", "attempts", "last_status", "run_id")

OSCAL_VERSION = "1.0.6"  # the OSCAL release whose assessment-results JSON schema the document follows
# Every UUID in the OSCAL document is a version-5 UUID of a name under this namespace: the same data, the same ids.
OSCAL_NAMESPACE = uuid.UUID("6f6d7a3e-0b59-5c0e-9d0c-61756469746f")
# Our property names live in this namespace (OSCAL reserves names without `ns` for its own).
OSCAL_PROPS_NS = "https://katapult.io/ns/auditor/oscal"


def table_csv(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
    """Returns rows as CSV with a header (cells through `csv_cell`: lists and objects as JSON, None empty)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([csv_cell(row.get(c)) for c in columns])
    return buf.getvalue()


def runs_csv(runs: Sequence[Mapping[str, Any]]) -> str:
    """Returns the runs as CSV (one row a run; `errors` is the run's error list as JSON)."""
    return table_csv(RUN_CSV_COLUMNS, [{**r, "error_count": len(r["errors"]),
                                        "errors": json.dumps(r["errors"], sort_keys=True)} for r in runs])


def findings_csv(findings: Sequence[Mapping[str, Any]]) -> str:
    """Returns the findings register as CSV (observed and required values as JSON objects)."""
    rows = []
    for f in findings:
        waiver = f.get("waiver") or {}
        rows.append({**f, "observed": json.dumps(f["observed"], sort_keys=True),
                     "required": json.dumps(f["required"], sort_keys=True), "waived_by": waiver.get("owner"),
                     "waived_until": waiver.get("expires"), "waiver_reason": waiver.get("reason")})
    return table_csv(FINDING_CSV_COLUMNS, rows)


def deliveries_csv(deliveries: Sequence[Mapping[str, Any]]) -> str:
    """Returns the alert deliveries as CSV."""
    return table_csv(DELIVERY_CSV_COLUMNS, deliveries)


def json_bytes(value: Any, *, compact: bool = False) -> bytes:
    """Returns a JSON file's bytes: indented (or, `compact`, without whitespace: large machine-read files, written
    by the C encoder), keys sorted, one final newline (the same value, the same bytes)."""
    if compact:
        return (json.dumps(value, sort_keys=True, separators=(",", ":")) + "\n").encode()
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()


def manifest(files: Mapping[str, bytes]) -> bytes:
    """Returns `sha256sum` lines (`<sha256>  <file>`) for the files, sorted by name."""
    return "".join(f"{hashlib.sha256(files[name]).hexdigest()}  {name}\n" for name in sorted(files)).encode()


def oscal_uuid(*parts: str) -> str:
    """Returns the version-5 UUID of `parts` under the auditor's OSCAL namespace."""
    return str(uuid.uuid5(OSCAL_NAMESPACE, "\x1f".join(parts)))


def _prop(name: str, value: object) -> dict[str, str]:
    return {"name": name, "ns": OSCAL_PROPS_NS, "value": str(value)}


def _observed_text(disk: Mapping[str, Any], findings: Sequence[Mapping[str, Any]]) -> str:
    if findings:
        return "; ".join(f"{f['fingerprint']} ({f['severity']}): observed {json.dumps(f['observed'], sort_keys=True)}"
                         f", required {json.dumps(f['required'], sort_keys=True)}, opened {f['opened_at']}"
                         + (f", resolved {f['resolved_at']}" if f["resolved_at"] else "")
                         + f", {f['status_at_end']} at the end of the period" for f in findings)
    judged = disk["compliant_seconds"] + disk["waived_seconds"] + disk["noncompliant_seconds"]
    if judged == 0:
        # Missing data never looks compliant: a disk never read in the period is said to be unread.
        return "No finding, but the disk was never read successfully in the period: its compliance is unknown."
    return (f"No finding in the period. Read for {judged} s of it; unknown for {disk['unknown_seconds']} s and "
            f"without data for {disk['no_data_seconds']} s.")


def oscal_assessment_results(*, period: Mapping[str, str], version: str, collected: str,
                             disks: Sequence[Mapping[str, Any]], rules: Sequence[Mapping[str, Any]],
                             findings: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Returns an OSCAL Assessment Results document (JSON model, OSCAL 1.0.6) of the period: one result spanning
    it, one observation per disk per rule (the rules enabled, and any rule that found something), and one finding
    per finding of the register, linked to its disk's observation of its rule.

    `disks` are the period report's disks, `rules` dicts with `id` and `description`, `findings` the register's
    rows; `collected` is when the last run of the period polled (the period's end without runs).
    """
    by_disk_rule: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    rules_found: dict[str, set[str]] = {}
    for f in findings:
        by_disk_rule.setdefault((f["disk_id"], f["rule"]), []).append(f)
        rules_found.setdefault(f["disk_id"], set()).add(f["rule"])
    descriptions = {r["id"]: r["description"] for r in rules}
    disk_rows = {d["disk_id"]: d for d in disks}
    for f in findings:  # a finding on a disk without verdicts in the period still gets its observation
        disk_rows.setdefault(f["disk_id"], {"disk_id": f["disk_id"], "name": f["disk_name"], "compliance_pct": None,
                                            "compliant_seconds": 0, "waived_seconds": 0, "noncompliant_seconds": 0,
                                            "unknown_seconds": 0, "no_data_seconds": 0})
    observations, oscal_findings = [], []
    for disk_id in sorted(disk_rows):
        disk = disk_rows[disk_id]
        label = f"{disk['name']} ({disk_id})" if disk.get("name") else disk_id
        subject = {"subject-uuid": oscal_uuid("disk", disk_id), "type": "resource", "title": label}
        rule_ids = sorted({*descriptions, *rules_found.get(disk_id, ())})
        for rule in rule_ids:
            mine = by_disk_rule.get((disk_id, rule), [])
            obs_uuid = oscal_uuid("observation", period["from"], period["to"], disk_id, rule)
            props = [_prop("disk-id", disk_id), _prop("rule", rule)]
            if disk.get("compliance_pct") is not None:
                props.append(_prop("compliance-pct", disk["compliance_pct"]))
            observations.append({
                "uuid": obs_uuid,
                "title": f"{rule} on {label}",
                "description": _observed_text(disk, mine),
                "props": props,
                "methods": ["TEST"],
                "types": ["finding" if mine else "control-objective"],
                "subjects": [subject],
                "collected": collected,
            })
            for f in mine:
                oscal_findings.append({
                    "uuid": oscal_uuid("finding", period["from"], period["to"], f["fingerprint"]),
                    "title": f"{rule} on {label}",
                    "description": f"{descriptions.get(rule, rule)} ({f['severity']}; finding {f['fingerprint']}).",
                    "props": [_prop("fingerprint", f["fingerprint"]), _prop("severity", f["severity"]),
                              _prop("status-at-end", f["status_at_end"])],
                    "target": {"type": "objective-id", "target-id": rule,
                               "status": {"state": "satisfied" if f["status_at_end"] == "resolved"
                                          else "not-satisfied"}},
                    "related-observations": [{"observation-uuid": obs_uuid}],
                })
    result: dict[str, Any] = {
        "uuid": oscal_uuid("result", period["from"], period["to"]),
        "title": f"Backup policy compliance {period['from']} – {period['to']}",
        "description": "Backup policies of the audited Katapult disks, judged by the auditor's rules over the period.",
        "start": period["from"],
        "end": period["to"],
        "reviewed-controls": {"control-selections": [{"description": "The auditor's rules", "include-all": {}}]},
    }
    if observations:
        result["observations"] = observations
    if oscal_findings:
        result["findings"] = oscal_findings
    return {"assessment-results": {
        "uuid": oscal_uuid("assessment-results", period["from"], period["to"]),
        "metadata": {"title": f"Backup policy compliance evidence {period['from']} – {period['to']}",
                     "last-modified": period["to"], "version": version, "oscal-version": OSCAL_VERSION},
        "import-ap": {"href": "#"},
        "results": [result],
    }}


BUNDLE_README = """\
# Backup policy compliance evidence

This folder is an evidence export of the backup-policy compliance auditor for the period {period_from} (included)
to {period_to} (excluded). Everything in it was read from the auditor's database: the configurations are those
the runs recorded they ran with, and nothing depends on the configuration or the clock of the process that
exported it (unless `metadata.json` says `"configuration_basis": "exporting"`: no run of the period, nor any run
before it, recorded its configuration; `"preceding"`: the period had no run, and the last run before it gave the
configuration), so two exports of the same database and period are byte-identical (the signature aside).

## Files

- `metadata.json`: the auditor's version, the database's schema revision and kind, the period, the
  configurations in force and the audit interval the report was computed with.
- `configs.json`: every configuration a run of the period ran with, by fingerprint (the SHA-256 of its canonical
  JSON, secrets redacted), with the first and last run that used it.
- `runs.json`, `runs.csv`: every run polled in the period, each with the `config_fingerprint` of the configuration
  it ran with.
- `compliance.json`, `compliance.csv`, `compliance.html`: the period report: coverage, the fleet's and each disk's
  compliance, the rules' statistics.
- `config.json`: the configuration in force at the end of the period (that of its last run), as in `configs.json`.
- `rules.json`: the rule parameters and rules (severities, enabled) of that configuration, and under `configs`
  those of each configuration of the period, by fingerprint.
- `waivers.json`: the waivers of the configurations in force that applied during the period, with their events.
- `findings.json`, `findings.csv`: the findings register: every finding open at some time of the period with its
  disk, organization, policy and tier, observed vs required values, when it opened and resolved, its status at
  the end of the period and the waiver that covered it during the period (by whom, until when); the JSON adds
  its events.
- `snapshots.json`: the backup policy settings seen on each disk during the period, with when each was seen.
- `drift.json`: the changes in the disks' protection during the period (policies added, removed or changed;
  tier changes).
- `deliveries.csv`: the alert deliveries of the period: notifier name and kind, transition, `Idempotency-Key`,
  time, result.
- `remediations.json`: every change `auditor apply` attempted in the period: who, when, the request, Katapult's
  answer and the outcome.
- `oscal-assessment-results.json`: the period as an OSCAL {oscal_version} Assessment Results document: one
  observation per disk per rule, one finding per finding of the register linked to its observation.
- `MANIFEST.sha256`: the SHA-256 of every other file.
- `MANIFEST.sha256.sig` (signed exports only): an SSH signature of the manifest, namespace `{namespace}`.

Times are UTC (ISO 8601). No file holds a secret: tokens, notifier URLs, routing keys and passwords read
`<redacted>`, and the database URL has its password masked.

## How to verify

1. That no file was changed since the export: `sha256sum -c MANIFEST.sha256` (every line must say `OK`).
2. That the manifest is the one the exporter signed (signed exports): put the signer's public key in an
   `allowed_signers` file as `<identity> namespaces="{namespace}" <public key>`, then run
   `ssh-keygen -Y verify -f allowed_signers -I <identity> -n {namespace} -s MANIFEST.sha256.sig < MANIFEST.sha256`.
3. That a configuration is the one its fingerprint names: the fingerprint is the SHA-256 of the configuration's
   canonical JSON (keys sorted, no whitespace, UTF-8); this prints `True` for each configuration:

   ```sh
   python3 - <<'PY'
   import hashlib, json
   for fingerprint, entry in json.load(open("configs.json"))["configs"].items():
       canonical = json.dumps(entry["config"], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
       print(fingerprint, hashlib.sha256(canonical.encode()).hexdigest() == fingerprint)
   PY
   ```
"""


def bundle_readme(*, period: Mapping[str, str], namespace: str) -> str:
    """Returns the bundle's README.md: what each file is and how to verify the bundle."""
    return BUNDLE_README.format(period_from=period["from"], period_to=period["to"], namespace=namespace,
                                oscal_version=OSCAL_VERSION)
