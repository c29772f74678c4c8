"""The compliance report (a public JSON contract) and its table/CSV/Markdown renderings, read from the store.

Both read the same `queries.report_inputs`: `build_report` through the async `Store` (the API, the dashboard, the
demo), `current_report` on a synchronous `Reader` for a one-shot command, so `auditor report` starts without
asyncio, httpx or the notifiers (benchmarks/cli_start.py). This module imports only the domain at import time.
"""

from __future__ import annotations

import contextlib
import csv
import io
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from auditor.domain.models import FindingStatus, ReadOutcome, TrackedFinding, Waiver, WaiverProblem
from auditor.domain.records import DiskRecord, DiskStatus, DriftRecord, PolicyStateRecord, RunRecord
from auditor.errors import SchemaError

if TYPE_CHECKING:
    from auditor.config import Settings
    from auditor.store import queries
    from auditor.store.repo import Reader, Store

EXPIRING_WITHIN = timedelta(days=7)
DRIFT_WITHIN = timedelta(days=7)
# What `services.check_schema` tells a read-only command to do about a missing or outdated database.
SCHEMA_HINT = "run `auditor db upgrade` or start `auditor run` once"


def iso(value: datetime | None) -> str | None:
    """Returns an ISO-8601 UTC string ending in Z, or None."""
    if value is None:
        return None
    return value.isoformat(timespec="seconds").replace("+00:00", "Z")


def run_json(run: RunRecord | None) -> dict[str, Any] | None:
    """Returns the report's `last_run` object (extended with traffic counters)."""
    if run is None:
        return None
    return {
        "id": run.id,
        "started_at": iso(run.started_at),
        "finished_at": iso(run.finished_at),
        "status": run.status.value,
        "trigger": run.trigger,
        "targets_checked": run.targets_checked,
        "disks_read": run.disks_ok,
        "disks_unknown": run.disks_unknown,
        "api_requests": run.stats.requests,
        "api_retries": run.stats.retries,
        "api_rate_limited": run.stats.rate_limited,
        "findings_opened": run.findings_opened,
        "findings_resolved": run.findings_resolved,
        "errors": [e.as_dict() for e in run.errors],
    }


def finding_json(f: TrackedFinding, *, with_resolution: bool = False) -> dict[str, Any]:
    """Returns a finding as the report lists it."""
    out: dict[str, Any] = {
        "fingerprint": f.fingerprint,
        "rule": f.rule,
        "severity": f.severity.value,
        "status": f.status.value,
        "disk_id": f.disk_id,
        "policy_id": f.policy_id,
        "message": f.message,
        "observed": f.observed,
        "expected": f.expected,
        "first_seen": iso(f.first_seen),
        "last_seen": iso(f.last_seen),
        "waiver": f.waiver,
    }
    if with_resolution:
        out["opened_at"] = iso(f.opened_at)
        out["resolved_at"] = iso(f.resolved_at)
    return out


REPORTED_STATUSES = (FindingStatus.OPEN.value, FindingStatus.WAIVED.value)


async def build_report(
    store: Store, *, now: datetime, waivers: Sequence[Waiver] = (), waiver_problems: Sequence[WaiverProblem] = ()
) -> dict[str, Any]:
    """Returns the compliance report: last run, summary, disks and open/waived findings (no Katapult call)."""
    from auditor.store import queries

    inputs = await store.read(queries.report_inputs, now=now, drift_since=now - DRIFT_WITHIN)
    return assemble_report(now=now, inputs=inputs, waivers=waivers, waiver_problems=waiver_problems)


def _utcnow() -> datetime:
    return datetime.now(UTC)


@contextlib.contextmanager
def _checked_reader(settings: Settings) -> Iterator[Reader]:
    """Yields a synchronous reader of the configured database after the checks `open_services(settings,
    katapult=False, migrate=False)` makes, with the same errors: SchemaError when the database is missing (never
    created) or not at the code's revision, StoreError when it cannot be read. Nothing is written: a run left
    `running` by a process that is gone reads as failed (`queries.run_view`)."""
    from auditor.store import engine
    from auditor.store.repo import Reader

    url = settings.database.url.get_secret_value()
    if url.startswith("sqlite") and engine.sqlite_file_missing(url):
        raise SchemaError(f"database {engine.safe_url(url)} does not exist: check database.url, or {SCHEMA_HINT}")
    reader = Reader(url)
    try:
        current = reader.revision()
        if current != engine.SCHEMA_HEAD:
            raise SchemaError(f"database {engine.safe_url(url)} is at schema revision {current or 'none'}, this "
                              f"version needs {engine.SCHEMA_HEAD}: {SCHEMA_HINT}")
        yield reader
    finally:
        reader.close()


def current_report(settings: Settings, *, clock: Callable[[], datetime] = _utcnow,
                   tier: str | None = None) -> dict[str, Any]:
    """Returns `build_report`'s report for the configured database, read as `auditor report` reads it: on a
    synchronous connection, with the checks and errors of `open_services(settings, katapult=False,
    migrate=False)`."""
    from auditor.domain.lifecycle import parse_waivers
    from auditor.domain.rules import RULES
    from auditor.store import queries

    with _checked_reader(settings) as reader:
        now = clock()
        waivers, problems = parse_waivers(settings.waivers, known_rules=RULES.keys(), now=now)
        inputs = reader.read(queries.report_inputs, now=now, drift_since=now - DRIFT_WITHIN)
        return assemble_report(now=now, inputs=inputs, waivers=waivers, waiver_problems=problems, tier=tier)


def current_findings(settings: Settings, *, statuses: Sequence[str]) -> list[TrackedFinding]:
    """Returns the findings with one of `statuses`, ordered by disk and fingerprint, read as `auditor findings`
    reads them (see `current_report`)."""
    from auditor.store import queries

    with _checked_reader(settings) as reader:
        return reader.read(queries.all_findings, statuses=statuses)


def disk_status(disk: DiskRecord, findings: Sequence[TrackedFinding]) -> DiskStatus:
    """Returns a disk's verdict: unknown (no reading), noncompliant (an open finding), exempt (its tier), or
    compliant (waived findings count as compliant)."""
    if disk.outcome == ReadOutcome.UNKNOWN.value:
        return DiskStatus.UNKNOWN
    if any(f.status is FindingStatus.OPEN for f in findings):
        return DiskStatus.NONCOMPLIANT
    if disk.tier_detail and disk.tier_detail.get("exempt"):
        return DiskStatus.EXEMPT
    return DiskStatus.COMPLIANT


def exemption_json(disk: DiskRecord) -> dict[str, Any]:
    """Returns why an exempt disk is exempt: its tier's reason and what matched the tier."""
    detail = disk.tier_detail or {}
    return {"reason": detail.get("reason"), "because": dict(detail.get("because") or {})}


def assemble_report(
    *, now: datetime, inputs: queries.ReportInputs, waivers: Sequence[Waiver] = (),
    waiver_problems: Sequence[WaiverProblem] = (), tier: str | None = None,
) -> dict[str, Any]:
    """Returns the report from what was read (see `build_report`); with `tier`, only that tier's disks (and their
    findings and drift), the summary counting those."""
    run, disks, findings, policies = inputs.run, inputs.disks, inputs.findings, inputs.policies
    drift: Sequence[DriftRecord] = inputs.drift
    if tier is not None:
        disks = {k: d for k, d in disks.items() if d.tier == tier}
        drift = [d for d in drift if d.disk_id in disks]
    by_disk: dict[str, list[TrackedFinding]] = {}
    for f in findings:
        by_disk.setdefault(f.disk_id, []).append(f)

    disk_items = []
    counts = {s.value: 0 for s in DiskStatus}
    by_tier: dict[str, int] = {}
    for disk_id in sorted(disks):
        d = disks[disk_id]
        mine = by_disk.get(disk_id, [])
        status = disk_status(d, mine)
        counts[status.value] += 1
        by_tier[d.tier or ""] = by_tier.get(d.tier or "", 0) + 1
        disk_items.append({
            "disk_id": disk_id,
            "name": d.name,
            "status": status.value,
            "policies": policies.get(disk_id, []),
            "findings": [f.fingerprint for f in mine],
            "vm_id": d.vm_id,
            "source": d.source,
            "last_read_at": iso(d.last_read_at),
            "error": ({"code": d.error_code, "message": d.error_message}
                      if d.outcome == ReadOutcome.UNKNOWN.value else None),
            "tier": d.tier,
            "exemption": exemption_json(d) if status is DiskStatus.EXEMPT else None,
        })

    target_ids = set(disks)
    listed = [f for f in findings if f.disk_id in target_ids]
    open_findings = [f for f in listed if f.status is FindingStatus.OPEN]
    by_rule: dict[str, int] = {}
    by_severity: dict[str, int] = {}
    for f in open_findings:
        by_rule[f.rule] = by_rule.get(f.rule, 0) + 1
        by_severity[f.severity.value] = by_severity.get(f.severity.value, 0) + 1
    horizon = (now + EXPIRING_WITHIN).date()
    expiring = [w.as_dict() for w in waivers if w.is_valid(now=now) and w.expires <= horizon]
    return {
        "generated_at": iso(now),
        "last_run": run_json(run),
        "summary": {
            "disks_total": len(disks),
            "compliant": counts["compliant"],
            "noncompliant": counts["noncompliant"],
            "unknown": counts["unknown"],
            "open_findings": len(open_findings),
            "waived_findings": len(listed) - len(open_findings),
            "by_rule": dict(sorted(by_rule.items())),
            "by_severity": dict(sorted(by_severity.items())),
            "exempt": counts["exempt"],
            "by_tier": dict(sorted(by_tier.items())),
        },
        "disks": disk_items,
        "findings": [finding_json(f) for f in listed],
        "waiver_problems": [{"index": p.index, "problem": p.problem, "waiver": _jsonable(p.raw)}
                            for p in waiver_problems],
        "expiring_waivers": expiring,
        "drift": [
            {"disk_id": d.disk_id, "policy_id": d.policy_id, "at": iso(d.at), "kind": d.kind,
             "before": d.before, "after": d.after}
            for d in drift
        ],
    }


def _jsonable(raw: dict[str, Any]) -> dict[str, Any]:
    return {k: (v if isinstance(v, str | int | float | bool | type(None)) else str(v)) for k, v in raw.items()}


CSV_COLUMNS = ("fingerprint", "rule", "severity", "status", "disk_id", "policy_id", "message", "first_seen",
               "last_seen", "waiver_owner", "waiver_expires")


# A text cell a spreadsheet would take for a formula (first character =, +, -, @ or tab) is written with a leading
# apostrophe, so a disk named "=HYPERLINK(…)" in an export opened in a spreadsheet stays text ("CSV injection").
# Control characters other than tab and newline are written as \xNN: the csv module leaves a lone CR unquoted
# (our lines end in "\n"), and a reader would split the row there. Numbers are written as they are; None is empty.
_FORMULA_START = ("=", "+", "-", "@", "\t")
_CSV_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0)) if chr(c) not in "\t\n"}


def csv_cell(value: Any) -> str:
    """Returns one CSV cell: text a spreadsheet would evaluate is prefixed with an apostrophe, control characters
    other than tab and newline are shown as \\xNN."""
    if value is None:
        return ""
    if isinstance(value, str):
        text = value.translate(_CSV_CONTROL)
        return "'" + text if text.startswith(_FORMULA_START) else text
    return str(value)


def report_csv(report: dict[str, Any]) -> str:
    """Returns the report's findings as CSV (one row a finding)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for f in report["findings"]:
        waiver = f.get("waiver") or {}
        writer.writerow([csv_cell(v) for v in (
            f["fingerprint"], f["rule"], f["severity"], f["status"], f["disk_id"], f["policy_id"], f["message"],
            f["first_seen"], f["last_seen"], waiver.get("owner"), waiver.get("expires"))])
    return buf.getvalue()


def md_cell(text: Any, empty: str = "") -> str:
    """Returns one markdown table cell: `|` escaped, newlines as spaces, other control characters as \\xNN."""
    if text is None:
        return empty
    return str(text).replace("|", "\\|").replace("\n", " ").translate(_CSV_CONTROL)


def report_markdown(report: dict[str, Any]) -> str:
    """Returns the report as Markdown (summary, findings table, unknown disks)."""
    s = report["summary"]
    run = report["last_run"]
    lines = ["# Backup-policy compliance report", "", f"Generated {report['generated_at']}."]
    if run:
        lines.append(f"Last run `{run['id']}` ({run['status']}) finished {run['finished_at'] or '(cut short)'}, "
                     f"{run['api_requests']} API requests.")
    else:
        lines.append("No audit has run yet.")
    lines += ["", "| disks | compliant | noncompliant | unknown | open findings |", "|---|---|---|---|---|",
              f"| {s['disks_total']} | {s['compliant']} | {s['noncompliant']} | {s['unknown']} | "
              f"{s['open_findings']} |", ""]
    if report["findings"]:
        lines += ["## Findings", "", "| severity | rule | disk | policy | status | message |",
                  "|---|---|---|---|---|---|"]
        for f in report["findings"]:
            lines.append(f"| {f['severity']} | {f['rule']} | {md_cell(f['disk_id'])} | {md_cell(f['policy_id'])} | "
                         f"{f['status']} | {md_cell(f['message'])} |")
        lines.append("")
    unknown = [d for d in report["disks"] if d["status"] == DiskStatus.UNKNOWN]
    if unknown:
        lines += ["## Disks without a verdict", ""]
        lines += [f"- {md_cell(d['disk_id'])}: {md_cell((d.get('error') or {}).get('message'))}" for d in unknown]
        lines.append("")
    if run and run["errors"]:
        lines += ["## Errors in the last run", ""]
        lines += [f"- {md_cell(e['target'])}: `{e['code']}` {md_cell(e['message'])}" for e in run["errors"]]
        lines.append("")
    return "\n".join(lines)


def _state_json(p: PolicyStateRecord) -> dict[str, Any]:
    return {
        "policy_id": p.policy_id,
        "retention": p.retention,
        "interval": p.interval,
        "target_type": p.target_type,
        "target_id": p.target_id,
        "target_name": p.target_name,
        "next_invocation_at": iso(p.next_invocation_at),
        "total_size": p.total_size,
        "valid_from": iso(p.valid_from),
        "valid_to": iso(p.valid_to),
    }


async def disk_detail(store: Store, disk_id: str) -> dict[str, Any] | None:
    """Returns a disk's current policies, findings, snapshot history, drift and finding events; None if unknown."""
    from auditor.store import queries

    return detail_json(await store.read(queries.disk_history, disk_id))


def current_disk_detail(settings: Settings, disk_id: str) -> dict[str, Any] | None:
    """Returns `disk_detail` read as `auditor report` reads (`auditor history`), with the same checks and errors."""
    from auditor.store import queries

    with _checked_reader(settings) as reader:
        return detail_json(reader.read(queries.disk_history, disk_id))


def detail_json(history: queries.DiskHistory) -> dict[str, Any] | None:
    """Returns the disk detail of a disk's history (`queries.disk_history`); None if the disk is unknown."""
    disk, states, drift, findings, events = history
    if disk is None:
        return None
    status = disk_status(disk, findings)
    return {
        "disk": {
            "disk_id": disk.id,
            "name": disk.name,
            "vm_id": disk.vm_id,
            "vm_fqdn": disk.vm_fqdn,
            "source": disk.source,
            "is_target": disk.is_target,
            "outcome": disk.outcome,
            "error": {"code": disk.error_code, "message": disk.error_message} if disk.error_code else None,
            "first_seen_at": iso(disk.first_seen_at),
            "last_checked_at": iso(disk.last_checked_at),
            "last_read_at": iso(disk.last_read_at),
            "tier": disk.tier,
            "exemption": exemption_json(disk) if status is DiskStatus.EXEMPT else None,
        },
        "status": status.value,
        "policies": [_state_json(p) for p in states if p.valid_to is None],
        "findings": [finding_json(f, with_resolution=True) for f in findings],
        "snapshots": [_state_json(p) for p in states],
        "drift": [{"policy_id": d.policy_id, "run_id": d.run_id, "at": iso(d.at), "kind": d.kind,
                   "before": d.before, "after": d.after} for d in drift],
        "finding_events": [{"fingerprint": e.fingerprint, "run_id": e.run_id, "at": iso(e.at), "kind": e.kind}
                           for e in events],
    }
