"""The compliance report and the disk detail as JSON (a public contract: `auditor report --format json`, the API,
the dashboard): pure functions of what `queries` read. The domain only at import time.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from auditor.domain.invocations import DiskObservation, Invocation, rpo_distribution
from auditor.domain.models import FindingStatus, ReadOutcome, TrackedFinding, Waiver, WaiverProblem
from auditor.domain.records import DiskRecord, DiskStatus, DriftRecord, PolicyStateRecord, RunRecord

if TYPE_CHECKING:
    from auditor.store import queries

EXPIRING_WITHIN = timedelta(days=7)
DRIFT_WITHIN = timedelta(days=7)


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
        # The configuration the run ran with (`evidence` lists each one in `configs.json`); null for runs recorded
        # before configurations were kept.
        "config_fingerprint": run.config_fingerprint,
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


def observation_json(seen: DiskObservation | None) -> dict[str, Any]:
    """Returns a disk's observed runs as reports carry them: `last_invocation_at`, `observed_rpo_seconds` (null
    with fewer than two observed runs) and `observed_since` (null: none of its policies observed yet)."""
    seen = seen or DiskObservation()
    return {"last_invocation_at": iso(seen.last_invocation_at), "observed_rpo_seconds": seen.observed_rpo_seconds,
            "observed_since": iso(seen.observed_since)}


def invocation_json(i: Invocation) -> dict[str, Any]:
    """Returns one observed run: the policy, when it was due, the next run it planned and the poll that saw it."""
    return {"policy_id": i.policy_id, "due_at": iso(i.due_at), "next_at": iso(i.next_at),
            "observed_at": iso(i.observed_at), "step_seconds": int(i.step.total_seconds())}


def exemption_json(disk: DiskRecord) -> dict[str, Any]:
    """Returns why an exempt disk is exempt: its tier's reason and what matched the tier."""
    detail = disk.tier_detail or {}
    return {"reason": detail.get("reason"), "because": dict(detail.get("because") or {})}


def attachment_json(disk: DiskRecord) -> dict[str, Any] | None:
    """Returns whether a VM-assigned disk is attached to its VM and when that was read (None: not known)."""
    a = disk.attachment
    return None if a is None else {"state": a.state, "verified_at": iso(a.verified_at)}


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
            **observation_json(inputs.observed.get(disk_id)),
            "attachment": attachment_json(d),
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
            "observed_rpo": rpo_distribution([d["observed_rpo_seconds"] for d in disk_items]),
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


def detail_json(history: queries.DiskHistory, *, observed: DiskObservation | None = None,
                invocations: Sequence[Invocation] = ()) -> dict[str, Any] | None:
    """Returns the disk detail of a disk's history (`queries.disk_history`), with what was observed of its runs
    (`queries.observations`, `queries.disk_invocations`); None if the disk is unknown."""
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
            **observation_json(observed),
            "attachment": attachment_json(disk),
        },
        "status": status.value,
        "policies": [_state_json(p) for p in states if p.valid_to is None],
        "findings": [finding_json(f, with_resolution=True) for f in findings],
        "snapshots": [_state_json(p) for p in states],
        "drift": [{"policy_id": d.policy_id, "run_id": d.run_id, "at": iso(d.at), "kind": d.kind,
                   "before": d.before, "after": d.after} for d in drift],
        "finding_events": [{"fingerprint": e.fingerprint, "run_id": e.run_id, "at": iso(e.at), "kind": e.kind}
                           for e in events],
        "invocations": [invocation_json(i) for i in invocations],
    }
