"""The current compliance report (`reports.assemble_report`'s JSON) as CSV and Markdown."""

from __future__ import annotations

import csv
import io
from typing import Any

from auditor.domain.records import DiskStatus
from auditor.render.cells import csv_cell, md_cell
from auditor.render.compliance import rpo_text

CSV_COLUMNS = ("fingerprint", "rule", "severity", "status", "disk_id", "policy_id", "message", "first_seen",
               "last_seen", "waiver_owner", "waiver_expires")


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
              f"{s['open_findings']} |", "", f"Observed RPO (30 days): {rpo_text(s['observed_rpo'])}.", ""]
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
