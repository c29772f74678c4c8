"""The findings lifecycle (`reconcile`) and waiver parsing: pure, no database."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest

from auditor.domain.lifecycle import Change, Transition, find_waiver, parse_waivers, reconcile
from auditor.domain.models import Finding, FindingStatus, Severity, TrackedFinding, Waiver
from auditor.domain.rules import RULES

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
T1 = T0 + timedelta(minutes=15)
T2 = T0 + timedelta(minutes=30)
T3 = T0 + timedelta(minutes=45)
FAR = date(2099, 1, 1)


def finding(rule: str = "retention-below-minimum", disk: str = "disk_a", policy: str | None = "dbp_1",
            *, message: str = "too few backups", severity: Severity = Severity.MEDIUM) -> Finding:
    return Finding(rule, disk, policy, severity, message, {"retention": 3}, {"min_retention": 7})


def waiver(rule: str = "retention-below-minimum", disk: str = "disk_a", policy: str | None = None,
           expires: date = FAR) -> Waiver:
    return Waiver(rule=rule, disk_id=disk, reason="migration in progress", owner="ops@example.com",
                  expires=expires, policy_id=policy)


def run(previous: Mapping[str, TrackedFinding], produced: Sequence[Finding], *, now: datetime,
        settled: Sequence[str] = ("disk_a", "disk_b"), waivers: Sequence[Waiver] = ()) -> list[Change]:
    return reconcile(previous, produced, settled_disks=settled, waivers=waivers, now=now)


def state(changes: Sequence[Change], previous: Mapping[str, TrackedFinding] | None = None
          ) -> dict[str, TrackedFinding]:
    """Applies the changes to the stored state, as the store does."""
    out = dict(previous or {})
    out.update({c.finding.fingerprint: c.finding for c in changes})
    return out


def opened(*produced: Finding, now: datetime = T0) -> dict[str, TrackedFinding]:
    return state(run({}, produced, now=now))


# ---- opened / persisting ----------------------------------------------------------------------------------


def test_new_finding_opens() -> None:
    f = finding()
    (change,) = run({}, [f], now=T0)
    assert change.kind is Transition.OPENED
    assert change.previous is None
    t = change.finding
    assert (t.fingerprint, t.rule, t.disk_id, t.policy_id) == (f.fingerprint, f.rule, "disk_a", "dbp_1")
    assert t.status is FindingStatus.OPEN
    assert t.first_seen == t.last_seen == t.opened_at == T0
    assert t.resolved_at is None and t.waiver is None
    assert t.observed == {"retention": 3} and t.expected == {"min_retention": 7}


def test_seen_again_persists_and_moves_last_seen_only() -> None:
    prev = opened(finding())
    (change,) = run(prev, [finding(message="still too few", severity=Severity.HIGH)], now=T1)
    assert change.kind is Transition.PERSISTING
    t = change.finding
    assert t.status is FindingStatus.OPEN
    assert t.first_seen == T0 and t.opened_at == T0
    assert t.last_seen == T1
    # The latest evaluation's text and severity are kept.
    assert t.message == "still too few" and t.severity is Severity.HIGH
    assert change.previous == prev[t.fingerprint]


def test_duplicate_findings_in_one_run_count_once() -> None:
    changes = run({}, [finding(), finding()], now=T0)
    assert [c.kind for c in changes] == [Transition.OPENED]


def test_distinct_policies_are_distinct_findings() -> None:
    changes = run({}, [finding(policy="dbp_1"), finding(policy="dbp_2")], now=T0)
    assert len({c.finding.fingerprint for c in changes}) == 2


# ---- resolved only for settled disks ----------------------------------------------------------------------


def test_no_longer_produced_on_a_settled_disk_resolves() -> None:
    prev = opened(finding(disk="disk_a"), finding(disk="disk_b"))
    changes = run(prev, [], now=T1, settled=["disk_a"])
    (change,) = changes
    assert change.kind is Transition.RESOLVED
    t = change.finding
    assert t.disk_id == "disk_a"
    assert t.status is FindingStatus.RESOLVED
    assert t.resolved_at == T1
    assert t.first_seen == T0 and t.last_seen == T0  # not seen in the resolving run


def test_unknown_disk_keeps_its_findings_open() -> None:
    prev = opened(finding(disk="disk_a"), finding("unprotected-disk", "disk_a", None))
    assert run(prev, [], now=T1, settled=[]) == []
    # Also when other disks were read fine.
    assert run(prev, [], now=T1, settled=["disk_b", "disk_c"]) == []


def test_waiver_expiring_while_the_disk_is_unknown_unwaives_the_finding() -> None:
    # The disk cannot be read, so the finding stands as last seen; an expired waiver no longer hides it.
    w = waiver(expires=date(2026, 3, 1))
    s = state(run({}, [finding()], now=T0, waivers=[w]))
    assert next(iter(s.values())).status is FindingStatus.WAIVED
    next_day = datetime(2026, 3, 2, 0, 0, tzinfo=UTC)
    (change,) = run(s, [], now=next_day, settled=[], waivers=[w])
    assert change.kind is Transition.UNWAIVED
    t = change.finding
    assert t.status is FindingStatus.OPEN and t.waiver is None
    assert t.last_seen == T0 and t.first_seen == T0 and t.resolved_at is None  # not seen, not resolved


def test_waiver_added_while_the_disk_is_unknown_waives_the_finding() -> None:
    s = opened(finding())
    (change,) = run(s, [], now=T1, settled=[], waivers=[waiver()])
    assert change.kind is Transition.WAIVED
    assert change.finding.status is FindingStatus.WAIVED and change.finding.waiver is not None
    assert change.finding.last_seen == T0


def test_unknown_disk_with_an_unchanged_waiver_has_no_change() -> None:
    s = state(run({}, [finding()], now=T0, waivers=[waiver()]))
    assert run(s, [], now=T1, settled=[], waivers=[waiver()]) == []


def test_resolved_finding_not_produced_stays_resolved_without_a_new_event() -> None:
    prev = state(run(opened(finding()), [], now=T1))
    assert run(prev, [], now=T2) == []


def test_waived_finding_no_longer_produced_resolves() -> None:
    prev = state(run({}, [finding()], now=T0, waivers=[waiver()]))
    (change,) = run(prev, [], now=T1, waivers=[waiver()])
    assert change.kind is Transition.RESOLVED
    assert change.finding.status is FindingStatus.RESOLVED


# ---- reopened ---------------------------------------------------------------------------------------------


def test_reopened_keeps_first_seen_and_sets_a_new_opened_at() -> None:
    f = finding()
    s1 = opened(f)
    s2 = state(run(s1, [], now=T1), s1)
    assert s2[f.fingerprint].status is FindingStatus.RESOLVED
    (change,) = run(s2, [f], now=T2)
    assert change.kind is Transition.REOPENED
    t = change.finding
    assert t.fingerprint == f.fingerprint
    assert t.status is FindingStatus.OPEN
    assert t.first_seen == T0
    assert t.opened_at == T2 and t.last_seen == T2
    assert t.resolved_at is None
    assert change.previous is not None and change.previous.resolved_at == T1


def test_reopened_under_a_waiver_is_waived() -> None:
    f = finding()
    s2 = state(run(opened(f), [], now=T1))
    (change,) = run(s2, [f], now=T2, waivers=[waiver()])
    assert change.kind is Transition.WAIVED
    assert change.finding.status is FindingStatus.WAIVED
    assert change.finding.opened_at == T2 and change.finding.resolved_at is None


# ---- waived / unwaived ------------------------------------------------------------------------------------


def test_new_finding_matched_by_a_valid_waiver_is_waived_with_its_details() -> None:
    (change,) = run({}, [finding()], now=T0, waivers=[waiver()])
    assert change.kind is Transition.WAIVED
    t = change.finding
    assert t.status is FindingStatus.WAIVED
    assert t.waiver == {"rule": "retention-below-minimum", "disk_id": "disk_a", "policy_id": None,
                        "reason": "migration in progress", "owner": "ops@example.com", "expires": "2099-01-01"}


def test_open_finding_becomes_waived_then_unwaived_when_the_waiver_goes() -> None:
    f = finding()
    s1 = opened(f)
    (w,) = run(s1, [f], now=T1, waivers=[waiver()])
    assert w.kind is Transition.WAIVED and w.finding.status is FindingStatus.WAIVED
    assert w.finding.first_seen == T0 and w.finding.opened_at == T0
    s2 = state([w], s1)
    (same,) = run(s2, [f], now=T2, waivers=[waiver()])
    assert same.kind is Transition.PERSISTING and same.finding.status is FindingStatus.WAIVED
    (u,) = run(s2, [f], now=T3, waivers=[])
    assert u.kind is Transition.UNWAIVED
    assert u.finding.status is FindingStatus.OPEN and u.finding.waiver is None
    assert u.finding.first_seen == T0


def test_waiver_for_another_rule_or_disk_does_not_apply() -> None:
    changes = run({}, [finding()], now=T0,
                  waivers=[waiver(rule="schedule-stale"), waiver(disk="disk_b")])
    assert [c.finding.status for c in changes] == [FindingStatus.OPEN]


def test_waiver_narrowed_to_a_policy_covers_only_that_policy() -> None:
    f1, f2 = finding(policy="dbp_1"), finding(policy="dbp_2")
    changes = {c.finding.policy_id: c.finding for c in run({}, [f1, f2], now=T0, waivers=[waiver(policy="dbp_1")])}
    assert changes["dbp_1"].status is FindingStatus.WAIVED
    assert changes["dbp_1"].waiver is not None and changes["dbp_1"].waiver["policy_id"] == "dbp_1"
    assert changes["dbp_2"].status is FindingStatus.OPEN


def test_waiver_without_policy_covers_every_policy_and_a_policy_waiver_is_preferred() -> None:
    broad = waiver()
    narrow = Waiver(rule="retention-below-minimum", disk_id="disk_a", reason="specific", owner="dba@example.com",
                    expires=FAR, policy_id="dbp_2")
    f1, f2 = finding(policy="dbp_1"), finding(policy="dbp_2")
    assert find_waiver(f1, [broad, narrow], now=T0) is broad
    assert find_waiver(f2, [broad, narrow], now=T0) is narrow
    result = {c.finding.policy_id: c.finding for c in run({}, [f1, f2], now=T0, waivers=[broad, narrow])}
    assert result["dbp_1"].waiver is not None and result["dbp_1"].waiver["owner"] == "ops@example.com"
    assert result["dbp_2"].waiver is not None and result["dbp_2"].waiver["owner"] == "dba@example.com"


def test_policy_waiver_does_not_cover_a_disk_level_finding() -> None:
    f = finding("unprotected-disk", "disk_a", None)
    assert find_waiver(f, [waiver("unprotected-disk", policy="dbp_1")], now=T0) is None
    assert find_waiver(f, [waiver("unprotected-disk")], now=T0) is not None


def test_waiver_is_valid_through_its_expiry_day_utc() -> None:
    w = waiver(expires=date(2026, 3, 1))
    last_second = datetime(2026, 3, 1, 23, 59, 59, 999999, tzinfo=UTC)
    next_day = datetime(2026, 3, 2, 0, 0, tzinfo=UTC)
    assert w.is_valid(now=datetime(2026, 3, 1, 0, 0, tzinfo=UTC))
    assert w.is_valid(now=last_second)
    assert not w.is_valid(now=next_day)
    (during,) = run({}, [finding()], now=last_second, waivers=[w])
    assert during.finding.status is FindingStatus.WAIVED
    (after,) = run(state([during]), [finding()], now=next_day, waivers=[w])
    assert after.kind is Transition.UNWAIVED and after.finding.status is FindingStatus.OPEN


# ---- parse_waivers ----------------------------------------------------------------------------------------

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def good(**changes: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {"rule": "unprotected-disk", "disk": "disk_a", "reason": "decommissioning",
                           "owner": "ops@example.com", "expires": "2026-06-30"}
    raw.update(changes)
    return {k: v for k, v in raw.items() if v is not None}


def parse(*raw: dict[str, Any]) -> tuple[list[Waiver], list[Any]]:
    return parse_waivers(list(raw), known_rules=RULES.keys(), now=NOW)


def test_parse_valid_waivers() -> None:
    valid, problems = parse(good(), good(policy="dbp_1", expires=date(2026, 3, 1)),
                            good(expires=datetime(2026, 4, 1, 0, 0, tzinfo=UTC)))
    assert problems == []
    assert valid == [
        Waiver("unprotected-disk", "disk_a", "decommissioning", "ops@example.com", date(2026, 6, 30)),
        Waiver("unprotected-disk", "disk_a", "decommissioning", "ops@example.com", date(2026, 3, 1), "dbp_1"),
        Waiver("unprotected-disk", "disk_a", "decommissioning", "ops@example.com", date(2026, 4, 1)),
    ]


def test_parse_expired_waiver_is_a_problem_not_a_waiver() -> None:
    valid, problems = parse(good(), good(expires="2026-02-28"))
    assert len(valid) == 1
    (p,) = problems
    assert p.index == 1
    assert p.problem == "expired on 2026-02-28"
    assert p.raw["expires"] == "2026-02-28"


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (good(owner=None), "owner is required"),
        (good(owner="  "), "owner is required"),
        (good(reason=None), "reason is required"),
        (good(disk=None), "disk is required"),
        (good(rule=None), "rule is required"),
        (good(expires=None), "expires is required"),
        (good(expires="next tuesday"), "expires 'next tuesday' is not a date"),
        (good(expires="2026-02-30"), "is not a date"),
        (good(rule="no-such-rule"), "unknown rule 'no-such-rule'"),
        (good(until="2026-06-30"), "unknown key(s) until"),
        (good(policy=7), "policy must be a policy id"),
        (good(owner=42), "owner is required"),
    ],
)
def test_parse_malformed_waiver_is_reported(raw: dict[str, Any], fragment: str) -> None:
    valid, problems = parse(good(), raw)
    assert len(valid) == 1
    (p,) = problems
    assert p.index == 1
    assert p.problem.startswith("malformed: ")
    assert fragment in p.problem
    assert p.raw == raw


def test_parse_reports_every_problem_of_one_waiver() -> None:
    _, (p,) = parse({"rule": "bogus", "disk": "disk_a", "extra": 1, "expires": "soon"})
    for fragment in ("unknown key(s) extra", "reason is required", "owner is required", "unknown rule 'bogus'",
                     "expires 'soon' is not a date"):
        assert fragment in p.problem


def test_parse_expiry_day_itself_still_applies() -> None:
    valid, problems = parse(good(expires=NOW.date().isoformat()))
    assert problems == [] and valid[0].expires == NOW.date()
