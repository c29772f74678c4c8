"""The findings lifecycle: what one run's findings do to the stored ones (open, persist, resolve, reopen, waive)."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import date, datetime
from enum import StrEnum
from typing import Any

from auditor.domain.models import Finding, FindingStatus, TrackedFinding, Waiver, WaiverProblem


class Transition(StrEnum):
    """What happened to a finding in one run."""

    OPENED = "opened"  # first time ever seen
    REOPENED = "reopened"  # seen again after it was resolved
    PERSISTING = "persisting"  # still produced, same status
    RESOLVED = "resolved"  # no longer produced by a run that read the disk
    WAIVED = "waived"  # an open finding became covered by a valid waiver
    UNWAIVED = "unwaived"  # its waiver expired or was removed: open again


@dataclass(frozen=True, slots=True)
class Change:
    """One finding's transition in a run, with its new state."""

    kind: Transition
    finding: TrackedFinding
    previous: TrackedFinding | None = None


def find_waiver(finding: Finding, waivers: Sequence[Waiver], *, now: datetime) -> Waiver | None:
    """Returns the first valid waiver covering the finding, preferring one that names the policy."""
    matches = [w for w in waivers if w.matches(finding) and w.is_valid(now=now)]
    matches.sort(key=lambda w: w.policy_id is None)
    return matches[0] if matches else None


def reconcile(
    previous: Mapping[str, TrackedFinding],
    produced: Sequence[Finding],
    *,
    settled_disks: Collection[str],
    waivers: Sequence[Waiver],
    now: datetime,
) -> list[Change]:
    """Returns the transitions of one run.

    `previous` holds the stored findings that are open or waived (resolved ones may be included; they reopen).
    `settled_disks` are the disks this run has a definite answer for: only their findings can resolve. A disk
    that could not be read is not settled, so its open findings stay open — missing data never looks compliant;
    only their waiver status follows the current waivers.
    """
    changes: list[Change] = []
    seen: set[str] = set()
    for f in produced:
        fp = f.fingerprint
        if fp in seen:
            continue
        seen.add(fp)
        waiver = find_waiver(f, waivers, now=now)
        status = FindingStatus.WAIVED if waiver else FindingStatus.OPEN
        waiver_dict = waiver.as_dict() if waiver else None
        prev = previous.get(fp)
        if prev is None:
            new = TrackedFinding(
                fp, f.rule, f.disk_id, f.policy_id, f.severity, status, f.message, f.observed, f.expected,
                first_seen=now, last_seen=now, opened_at=now, resolved_at=None, waiver=waiver_dict,
            )
            changes.append(Change(Transition.OPENED if waiver is None else Transition.WAIVED, new, None))
            continue
        updated = replace(
            prev,
            severity=f.severity,
            status=status,
            message=f.message,
            observed=f.observed,
            expected=f.expected,
            last_seen=now,
            waiver=waiver_dict,
        )
        if prev.status is FindingStatus.RESOLVED:
            kind = Transition.REOPENED if waiver is None else Transition.WAIVED
            updated = replace(updated, opened_at=now, resolved_at=None)
        elif prev.status is FindingStatus.OPEN and waiver is not None:
            kind = Transition.WAIVED
        elif prev.status is FindingStatus.WAIVED and waiver is None:
            kind = Transition.UNWAIVED
        else:
            kind = Transition.PERSISTING
        changes.append(Change(kind, updated, prev))
    settled = set(settled_disks)
    for fp, prev in previous.items():
        if fp in seen or prev.status is FindingStatus.RESOLVED:
            continue
        if prev.disk_id in settled:
            changes.append(
                Change(Transition.RESOLVED, replace(prev, status=FindingStatus.RESOLVED, resolved_at=now), prev)
            )
            continue
        # An unread disk's finding stands as last seen, but whether a waiver covers it is decided now: an expired
        # or removed waiver must not keep hiding it (and a new one applies) while the disk cannot be read.
        last = Finding(prev.rule, prev.disk_id, prev.policy_id, prev.severity, prev.message, prev.observed,
                       prev.expected)
        waiver = find_waiver(last, waivers, now=now)
        if prev.status is FindingStatus.OPEN and waiver is not None:
            changes.append(Change(Transition.WAIVED,
                                  replace(prev, status=FindingStatus.WAIVED, waiver=waiver.as_dict()), prev))
        elif prev.status is FindingStatus.WAIVED and waiver is None:
            changes.append(Change(Transition.UNWAIVED, replace(prev, status=FindingStatus.OPEN, waiver=None), prev))
    return changes


_WAIVER_KEYS = {"rule", "disk", "policy", "reason", "owner", "expires"}


def parse_waivers(
    raw: Sequence[Mapping[str, Any]], *, known_rules: Collection[str], now: datetime
) -> tuple[list[Waiver], list[WaiverProblem]]:
    """Returns the waivers that apply and the problems of those that don't (malformed or expired)."""
    valid: list[Waiver] = []
    problems: list[WaiverProblem] = []
    for index, item in enumerate(raw):
        errors: list[str] = []
        unknown = sorted(set(item) - _WAIVER_KEYS)
        if unknown:
            errors.append(f"unknown key(s) {', '.join(unknown)}")
        for key in ("rule", "disk", "reason", "owner", "expires"):
            value = item.get(key)
            if key == "expires" and isinstance(value, date):
                continue
            if not isinstance(value, str) or not value.strip():
                errors.append(f"{key} is required")
        rule = item.get("rule")
        if isinstance(rule, str) and rule and rule not in known_rules:
            errors.append(f"unknown rule {rule!r}")
        policy = item.get("policy")
        if policy is not None and (not isinstance(policy, str) or not policy.strip()):
            errors.append("policy must be a policy id")
        expires = item.get("expires")
        expiry: date | None = None
        if isinstance(expires, datetime):
            expiry = expires.date()
        elif isinstance(expires, date):
            expiry = expires
        elif isinstance(expires, str) and expires.strip():
            try:
                expiry = date.fromisoformat(expires.strip())
            except ValueError:
                errors.append(f"expires {expires!r} is not a date (YYYY-MM-DD)")
        if errors:
            problems.append(WaiverProblem(index, "malformed: " + "; ".join(errors), dict(item)))
            continue
        assert expiry is not None
        waiver = Waiver(
            rule=str(item["rule"]),
            disk_id=str(item["disk"]),
            reason=str(item["reason"]),
            owner=str(item["owner"]),
            expires=expiry,
            policy_id=str(policy) if policy else None,
        )
        if not waiver.is_valid(now=now):
            problems.append(WaiverProblem(index, f"expired on {expiry.isoformat()}", dict(item)))
            continue
        valid.append(waiver)
    return valid, problems
