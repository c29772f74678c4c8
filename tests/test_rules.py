"""The compliance rules: every rule at its boundaries, overrides, severities, disabled rules, and properties."""

from __future__ import annotations

import hashlib
import math
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from profiles import examples

import auditor.domain.rules as rules_module
from auditor.config import RULE_IDS
from auditor.domain.invocations import Invocation, PolicySchedule
from auditor.domain.models import (
    Attachment,
    BackupPolicy,
    Disk,
    DiskSnapshot,
    Finding,
    Interval,
    ReadOutcome,
    Schedule,
    Severity,
    TargetType,
    fingerprint,
)
from auditor.domain.rules import (
    DETACHED_FROM_COVERING_VM,
    DISK_IN_TRASH,
    DISK_NOT_FOUND,
    INTERVAL_TOO_INFREQUENT,
    NO_BACKUP_DATA,
    OBSERVED_INTERVAL_TOO_LONG,
    RETENTION_BELOW_MINIMUM,
    RETENTION_WINDOW_TOO_SHORT,
    RULES,
    SCHEDULE_STALE,
    UNPROTECTED_DISK,
    Applied,
    RuleParams,
    RuleSet,
    build_ruleset,
    evaluate,
    observed_coverage,
)
from auditor.domain.tiers import Tier, TierDecision, TierMatch

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
DISK = "disk_Eb8INAK4quHcSCfG"
VM = "vm_web1web1web1web1"
# Thresholds no policy below can fail unless a test lowers or raises one on purpose.
LAX = RuleParams(min_retention=0, min_retention_days=0, max_interval=Interval.MONTHLY, stale_grace=timedelta(hours=1))
ALL_INTERVALS = [Interval.HOURLY, Interval.DAILY, Interval.WEEKLY, Interval.MONTHLY]  # most to least frequent
INTERVAL_HOURS = {Interval.HOURLY: 1, Interval.DAILY: 24, Interval.WEEKLY: 7 * 24, Interval.MONTHLY: 30 * 24}


def policy(
    pid: str = "dbp_aaaaaaaaaaaaaaaa",
    *,
    retention: int = 14,
    interval: Interval = Interval.DAILY,
    due: datetime | None = NOW + timedelta(hours=3),
    target_type: TargetType = TargetType.DISK,
    target_id: str = DISK,
) -> BackupPolicy:
    return BackupPolicy(pid, retention, target_type, target_id, Schedule(interval, due))


def snap(*policies: BackupPolicy, disk: Disk | None = None, outcome: ReadOutcome = ReadOutcome.OK,
         detail: dict[str, object] | None = None) -> DiskSnapshot:
    return DiskSnapshot(disk or Disk(DISK), outcome, tuple(policies), detail=dict(detail or {}))


def stepped(pid: str = "dbp_aaaaaaaaaaaaaaaa", *steps: float, days: float | None = None,
            first_seen: datetime = NOW - timedelta(days=60)) -> PolicySchedule:
    """A schedule whose observed runs came `steps` days apart (the last one due a day before NOW)."""
    gaps = list(steps) if days is None else [days]
    due = NOW - timedelta(days=1 + sum(gaps))
    recent = []
    for gap in gaps:
        nxt = due + timedelta(days=gap)
        recent.append(Invocation(DISK, pid, due, nxt, due + timedelta(minutes=15)))
        due = nxt
    return PolicySchedule(DISK, pid, first_seen, due, tuple(recent[-2:]))


def ruleset(params: RuleParams = LAX, **kwargs: object) -> RuleSet:
    return RuleSet(default=params, **kwargs)  # type: ignore[arg-type]


def rule_ids(findings: list[Finding]) -> list[str]:
    return [f.rule for f in findings]


# ---- the registry and the fingerprint contract ------------------------------------------------------------


def test_config_rule_ids_match_the_registry() -> None:
    assert RULE_IDS == tuple(RULES)


def test_registry_ids_and_default_severities_are_the_documented_ones() -> None:
    assert {rid: r.severity for rid, r in RULES.items()} == {
        "unprotected-disk": Severity.CRITICAL,
        "retention-below-minimum": Severity.MEDIUM,
        "retention-window-too-short": Severity.MEDIUM,
        "interval-too-infrequent": Severity.MEDIUM,
        "schedule-stale": Severity.HIGH,
        "disk-not-found": Severity.HIGH,
        "disk-in-trash": Severity.HIGH,
        "observed-interval-too-long": Severity.HIGH,
        "no-backup-data": Severity.HIGH,
        "detached-from-covering-vm": Severity.HIGH,
    }


def test_fingerprint_derivation_is_pinned() -> None:
    # A public contract (alerts dedup on it): these literals must never change.
    assert fingerprint(UNPROTECTED_DISK, DISK, None) == "bb5a7a7e51d083f2"
    assert fingerprint(RETENTION_BELOW_MINIMUM, DISK, "dbp_abcdefghijklmnop") == "4b97f8178ef0ae24"
    raw = f"{RETENTION_BELOW_MINIMUM}\x1f{DISK}\x1fdbp_abcdefghijklmnop".encode()
    assert fingerprint(RETENTION_BELOW_MINIMUM, DISK, "dbp_abcdefghijklmnop") == hashlib.sha256(raw).hexdigest()[:16]
    # "policy id or empty": no policy and an empty policy id are the same finding.
    assert fingerprint(UNPROTECTED_DISK, DISK, None) == fingerprint(UNPROTECTED_DISK, DISK, "")


def test_finding_fingerprint_uses_the_derivation() -> None:
    (finding,) = evaluate(snap(policy("dbp_abcdefghijklmnop", retention=3)), ruleset(RuleParams(
        min_retention=7, min_retention_days=0, max_interval=Interval.MONTHLY)), now=NOW)
    assert finding.rule == RETENTION_BELOW_MINIMUM
    assert finding.fingerprint == "4b97f8178ef0ae24"


# ---- unprotected-disk and coverage ------------------------------------------------------------------------


def test_disk_without_policies_is_unprotected_and_critical() -> None:
    (finding,) = evaluate(snap(disk=Disk(DISK, vm_id=VM)), RuleSet(), now=NOW)
    assert finding.rule == UNPROTECTED_DISK
    assert finding.severity is Severity.CRITICAL
    assert finding.policy_id is None
    assert finding.disk_id == DISK
    assert finding.observed["policies"] == 0 and finding.observed["vm_id"] == VM
    assert VM in finding.message


def test_vm_level_policy_covers_the_disk() -> None:
    vm_policy = policy("dbp_vmvmvmvmvmvmvmvm", target_type=TargetType.VIRTUAL_MACHINE, target_id=VM)
    assert evaluate(snap(vm_policy, disk=Disk(DISK, vm_id=VM)), RuleSet(), now=NOW) == []


def test_vm_level_policy_is_judged_like_any_other() -> None:
    vm_policy = policy("dbp_vmvmvmvmvmvmvmvm", retention=3, target_type=TargetType.VIRTUAL_MACHINE, target_id=VM)
    findings = evaluate(snap(vm_policy, disk=Disk(DISK, vm_id=VM)), RuleSet(), now=NOW)
    assert sorted(rule_ids(findings)) == [RETENTION_BELOW_MINIMUM, RETENTION_WINDOW_TOO_SHORT]
    assert all(f.policy_id == "dbp_vmvmvmvmvmvmvmvm" and f.disk_id == DISK for f in findings)
    assert all(f.observed["target"] == f"VirtualMachine:{VM}" for f in findings)


def test_each_policy_is_judged_on_its_own() -> None:
    good = policy("dbp_good", retention=14)
    bad = policy("dbp_bad", retention=24, interval=Interval.HOURLY)  # one day of hourly backups
    findings = evaluate(snap(good, bad), RuleSet(), now=NOW)
    assert [(f.rule, f.policy_id) for f in findings] == [(RETENTION_WINDOW_TOO_SHORT, "dbp_bad")]


# ---- retention-below-minimum ------------------------------------------------------------------------------


@pytest.mark.parametrize("minimum", [1, 7, 30])
def test_retention_at_the_minimum_passes_and_one_below_fails(minimum: int) -> None:
    params = RuleParams(min_retention=minimum, min_retention_days=0, max_interval=Interval.MONTHLY)
    assert evaluate(snap(policy(retention=minimum)), ruleset(params), now=NOW) == []
    (finding,) = evaluate(snap(policy(retention=minimum - 1)), ruleset(params), now=NOW)
    assert finding.rule == RETENTION_BELOW_MINIMUM
    assert finding.severity is Severity.MEDIUM
    assert finding.observed == {"target": f"Disk:{DISK}", "retention": minimum - 1}
    assert finding.expected == {"min_retention": minimum}


def test_retention_zero_with_minimum_zero_passes() -> None:
    assert evaluate(snap(policy(retention=0)), ruleset(LAX), now=NOW) == []


# ---- retention-window-too-short ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("interval", "retention", "min_days"),
    [
        (Interval.HOURLY, 168, 7),  # 168 h is exactly 7 days
        (Interval.DAILY, 7, 7),
        (Interval.WEEKLY, 1, 7),
        (Interval.WEEKLY, 2, 14),
        (Interval.MONTHLY, 1, 30),  # a month counts as 30 days
        (Interval.HOURLY, 180, 7.5),
        (Interval.DAILY, 3, 2.5),
    ],
)
def test_window_exactly_the_minimum_passes_and_one_backup_less_fails(
    interval: Interval, retention: int, min_days: float
) -> None:
    params = RuleParams(min_retention=0, min_retention_days=min_days, max_interval=Interval.MONTHLY)
    assert evaluate(snap(policy(retention=retention, interval=interval)), ruleset(params), now=NOW) == []
    short = evaluate(snap(policy(retention=retention - 1, interval=interval)), ruleset(params), now=NOW)
    assert rule_ids(short) == [RETENTION_WINDOW_TOO_SHORT]
    (finding,) = short
    assert finding.observed["window_days"] == pytest.approx((retention - 1) * INTERVAL_HOURS[interval] / 24)
    assert finding.observed["interval"] == interval.value
    assert finding.expected == {"min_retention_days": min_days}
    assert finding.severity is Severity.MEDIUM


@pytest.mark.parametrize(("retention", "min_days", "text"), [
    (1, 7, "covers 1 day (1 × daily), less than the required 7 days"),
    (2, 7, "covers 2 days (2 × daily), less than the required 7 days"),
    (0, 1, "covers 0 days (0 × daily), less than the required 1 day"),
])
def test_window_message_counts_days_in_words_that_agree(retention: int, min_days: float, text: str) -> None:
    params = RuleParams(min_retention=0, min_retention_days=min_days, max_interval=Interval.MONTHLY)
    [finding] = evaluate(snap(policy(retention=retention, interval=Interval.DAILY)), ruleset(params), now=NOW)
    assert finding.message.endswith(text), finding.message


def test_window_uses_the_interval_length_not_the_count() -> None:
    # 7 backups pass min_retention=7 but 7 hourly backups are only 7 hours.
    params = RuleParams(min_retention=7, min_retention_days=7, max_interval=Interval.DAILY)
    findings = evaluate(snap(policy(retention=7, interval=Interval.HOURLY)), ruleset(params), now=NOW)
    assert rule_ids(findings) == [RETENTION_WINDOW_TOO_SHORT]
    assert findings[0].observed["window_days"] == pytest.approx(7 / 24)


# ---- interval-too-infrequent ------------------------------------------------------------------------------


@pytest.mark.parametrize("maximum", ALL_INTERVALS)
@pytest.mark.parametrize("interval", ALL_INTERVALS)
def test_each_interval_against_each_max_interval(interval: Interval, maximum: Interval) -> None:
    params = RuleParams(min_retention=0, min_retention_days=0, max_interval=maximum)
    findings = evaluate(snap(policy(interval=interval)), ruleset(params), now=NOW)
    less_frequent = ALL_INTERVALS.index(interval) > ALL_INTERVALS.index(maximum)
    if less_frequent:
        (finding,) = findings
        assert finding.rule == INTERVAL_TOO_INFREQUENT
        assert finding.observed["interval"] == interval.value
        assert finding.expected == {"max_interval": maximum.value}
    else:
        assert findings == []


def test_interval_order_and_lengths() -> None:
    assert [i.rank for i in ALL_INTERVALS] == [0, 1, 2, 3]
    assert [i.length for i in ALL_INTERVALS] == [
        timedelta(hours=1), timedelta(days=1), timedelta(days=7), timedelta(days=30)]


# ---- schedule-stale ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("grace", [timedelta(0), timedelta(minutes=5), timedelta(hours=1), timedelta(days=2)])
def test_stale_exactly_at_the_grace_edge_passes_and_one_second_past_fails(grace: timedelta) -> None:
    params = RuleParams(min_retention=0, min_retention_days=0, max_interval=Interval.MONTHLY, stale_grace=grace)
    edge = NOW - grace
    assert evaluate(snap(policy(due=edge)), ruleset(params), now=NOW) == []
    (finding,) = evaluate(snap(policy(due=edge - timedelta(seconds=1))), ruleset(params), now=NOW)
    assert finding.rule == SCHEDULE_STALE
    assert finding.severity is Severity.HIGH
    assert finding.observed["overdue_seconds"] == (grace + timedelta(seconds=1)).total_seconds()
    assert finding.expected["stale_grace_seconds"] == grace.total_seconds()


def test_future_schedule_is_not_stale() -> None:
    assert evaluate(snap(policy(due=NOW + timedelta(seconds=1))), ruleset(LAX), now=NOW) == []


def test_missing_next_invocation_is_stale() -> None:
    (finding,) = evaluate(snap(policy(due=None)), ruleset(LAX), now=NOW)
    assert finding.rule == SCHEDULE_STALE
    assert finding.observed == {"target": f"Disk:{DISK}", "next_invocation_at": None}


def test_stale_is_judged_against_the_given_now() -> None:
    due = NOW - timedelta(hours=2)
    assert rule_ids(evaluate(snap(policy(due=due)), ruleset(LAX), now=NOW)) == [SCHEDULE_STALE]
    assert evaluate(snap(policy(due=due)), ruleset(LAX), now=NOW - timedelta(hours=1)) == []


# ---- read outcomes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("policies", [(), (policy(retention=0, interval=Interval.MONTHLY, due=None),)])
def test_unknown_snapshot_yields_no_findings(policies: tuple[BackupPolicy, ...]) -> None:
    unknown = DiskSnapshot(Disk(DISK), ReadOutcome.UNKNOWN, policies, error_code="service_unavailable")
    assert evaluate(unknown, RuleSet(), now=NOW) == []


def test_not_found_disk() -> None:
    (finding,) = evaluate(snap(outcome=ReadOutcome.NOT_FOUND), RuleSet(), now=NOW)
    assert finding.rule == DISK_NOT_FOUND
    assert finding.severity is Severity.HIGH
    assert finding.policy_id is None
    assert finding.observed == {"error": "disk_not_found"}


def test_disk_in_trash_reports_keep_until_as_iso() -> None:
    keep = int((NOW + timedelta(days=7)).timestamp())
    trash = {"trash_object": {"id": "trsh_x", "keep_until": keep, "object_id": DISK, "object_type": "Disk"}}
    (finding,) = evaluate(snap(outcome=ReadOutcome.IN_TRASH, detail=trash), RuleSet(), now=NOW)
    assert finding.rule == DISK_IN_TRASH
    assert finding.severity is Severity.HIGH
    assert finding.observed == {"error": "object_in_trash", "keep_until": "2026-03-08T12:00:00Z"}
    assert "2026-03-08T12:00:00Z" in finding.message


def test_disk_in_trash_without_detail() -> None:
    (finding,) = evaluate(snap(outcome=ReadOutcome.IN_TRASH), RuleSet(), now=NOW)
    assert finding.rule == DISK_IN_TRASH
    assert finding.observed["keep_until"] is None


# ---- overrides, severities, disabled rules ----------------------------------------------------------------


def test_per_disk_override_applies_only_to_its_disks() -> None:
    default = RuleParams(min_retention=7, min_retention_days=0, max_interval=Interval.MONTHLY)
    rs = build_ruleset(default=default, overrides=[(["disk_strict"], {"min_retention": 14})])
    strict = snap(policy(retention=10, target_id="disk_strict"), disk=Disk("disk_strict"))
    normal = snap(policy(retention=10, target_id="disk_normal"), disk=Disk("disk_normal"))
    (finding,) = evaluate(strict, rs, now=NOW)
    assert finding.rule == RETENTION_BELOW_MINIMUM and finding.expected == {"min_retention": 14}
    assert evaluate(normal, rs, now=NOW) == []
    # Only the named parameter changes; the rest stay the defaults.
    assert rs.applied("disk_strict").params == RuleParams(14, 0, Interval.MONTHLY, default.stale_grace)


def test_override_can_loosen_and_later_overrides_win() -> None:
    default = RuleParams()  # min_retention 7, 7 days, daily
    rs = build_ruleset(
        default=default,
        overrides=[
            (["disk_a", "disk_b"], {"max_interval": Interval.WEEKLY, "min_retention": 2}),
            (["disk_b"], {"min_retention": 4, "min_retention_days": 28}),
        ],
    )
    weekly3 = policy(retention=3, interval=Interval.WEEKLY)
    assert evaluate(snap(weekly3, disk=Disk("disk_a")), rs, now=NOW) == []
    assert sorted(rule_ids(evaluate(snap(weekly3, disk=Disk("disk_b")), rs, now=NOW))) == [
        RETENTION_BELOW_MINIMUM, RETENTION_WINDOW_TOO_SHORT]
    assert rs.applied("disk_b").params.max_interval is Interval.WEEKLY  # kept from the first override
    assert sorted(rule_ids(evaluate(snap(weekly3, disk=Disk("disk_c")), rs, now=NOW))) == [
        INTERVAL_TOO_INFREQUENT, RETENTION_BELOW_MINIMUM]


def test_override_changes_stale_grace() -> None:
    rs = build_ruleset(default=LAX, overrides=[([DISK], {"stale_grace": timedelta(hours=6)})])
    due = NOW - timedelta(hours=5)
    assert evaluate(snap(policy(due=due)), rs, now=NOW) == []
    assert rule_ids(evaluate(snap(policy(due=due), disk=Disk("disk_other")), rs, now=NOW)) == [SCHEDULE_STALE]


@pytest.mark.parametrize("rule", list(RULES))
def test_severity_override_applies_to_each_rule(rule: str) -> None:
    rs = RuleSet(severity={rule: Severity.LOW})
    assert rs.severity_of(rule) is Severity.LOW
    bad = policy(retention=0, interval=Interval.MONTHLY, due=NOW - timedelta(days=3))
    produced = [
        *evaluate(snap(), rs, now=NOW),
        *evaluate(snap(bad), rs, now=NOW, schedules={bad.id: stepped(bad.id, days=7)}),
        *evaluate(snap(outcome=ReadOutcome.NOT_FOUND), rs, now=NOW),
        *evaluate(snap(outcome=ReadOutcome.IN_TRASH), rs, now=NOW),
        *evaluate(snap(vm_policy(), disk=on_vm("detached")), rs, now=NOW),
    ]
    assert sorted({f.rule for f in produced}) == sorted(RULES)  # every rule fired once somewhere
    for f in produced:
        assert f.severity is (Severity.LOW if f.rule == rule else RULES[f.rule].severity)


@pytest.mark.parametrize("rule", list(RULES))
def test_disabled_rule_never_fires_and_the_others_still_do(rule: str) -> None:
    rs = RuleSet(disabled=frozenset({rule}))
    bad = policy(retention=0, interval=Interval.MONTHLY, due=NOW - timedelta(days=3))
    produced = [
        *evaluate(snap(), rs, now=NOW),
        *evaluate(snap(bad), rs, now=NOW, schedules={bad.id: stepped(bad.id, days=7)}),
        *evaluate(snap(outcome=ReadOutcome.NOT_FOUND), rs, now=NOW),
        *evaluate(snap(outcome=ReadOutcome.IN_TRASH), rs, now=NOW),
        *evaluate(snap(vm_policy(), disk=on_vm("detached")), rs, now=NOW),
    ]
    assert sorted({f.rule for f in produced}) == sorted(set(RULES) - {rule})


def test_findings_are_ordered_by_policy_then_registry_order() -> None:
    bad = dict(retention=0, interval=Interval.MONTHLY, due=NOW - timedelta(days=3))
    findings = evaluate(snap(policy("dbp_b", **bad), policy("dbp_a", **bad)), RuleSet(), now=NOW)  # type: ignore[arg-type]
    per_policy = [RETENTION_BELOW_MINIMUM, RETENTION_WINDOW_TOO_SHORT, INTERVAL_TOO_INFREQUENT, SCHEDULE_STALE]
    assert [(f.policy_id, f.rule) for f in findings] == [("dbp_a", r) for r in per_policy] + [
        ("dbp_b", r) for r in per_policy]


# ---- properties -------------------------------------------------------------------------------------------

intervals = st.sampled_from(ALL_INTERVALS)
params_strategy = st.builds(
    RuleParams,
    min_retention=st.integers(0, 400),
    # Halves only: exact in binary, so the oracle below needs no float tolerance.
    min_retention_days=st.integers(0, 800).map(lambda n: n / 2),
    max_interval=intervals,
    stale_grace=st.integers(0, 7 * 86400).map(lambda s: timedelta(seconds=s)),
)
nows = st.datetimes(
    min_value=datetime(1990, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
)
ids = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-", min_size=1, max_size=24)


@st.composite
def policies(draw: st.DrawFn, now: datetime) -> BackupPolicy:
    due = draw(st.one_of(st.none(), st.integers(-30 * 86400, 30 * 86400).map(lambda s: now + timedelta(seconds=s))))
    return BackupPolicy(
        draw(ids.map(lambda s: "dbp_" + s)),
        draw(st.integers(0, 2000)),
        draw(st.sampled_from(list(TargetType))),
        draw(ids),
        Schedule(draw(intervals), due),
    )


def expected_rules(p: BackupPolicy, params: RuleParams, now: datetime) -> set[str]:
    """An independent oracle in whole seconds."""
    out = set()
    if p.retention < params.min_retention:
        out.add(RETENTION_BELOW_MINIMUM)
    if p.retention * INTERVAL_HOURS[p.schedule.interval] * 2 < params.min_retention_days * 48:
        out.add(RETENTION_WINDOW_TOO_SHORT)
    if ALL_INTERVALS.index(p.schedule.interval) > ALL_INTERVALS.index(params.max_interval):
        out.add(INTERVAL_TOO_INFREQUENT)
    due = p.schedule.next_invocation_at
    if due is None or (now - due) > params.stale_grace:
        out.add(SCHEDULE_STALE)
    return out


class _ClockTrap(datetime):
    """A datetime whose clock readers fail the test: rules must only use the `now` they are given."""

    @classmethod
    def now(cls, tz: object = None) -> datetime:  # type: ignore[override]
        raise AssertionError("a rule read the clock")

    @classmethod
    def utcnow(cls) -> datetime:  # type: ignore[override]
        raise AssertionError("a rule read the clock")

    @classmethod
    def today(cls) -> datetime:  # type: ignore[override]
        raise AssertionError("a rule read the clock")


@settings(max_examples=examples(200), deadline=None)
@given(data=st.data(), params=params_strategy, now=nows)
def test_evaluate_matches_an_independent_oracle(data: st.DataObject, params: RuleParams, now: datetime) -> None:
    p = data.draw(policies(now))
    with mock.patch.object(rules_module, "datetime", _ClockTrap), mock.patch("time.time", side_effect=AssertionError):
        findings = evaluate(snap(p), ruleset(params), now=now)
    assert {f.rule for f in findings} == expected_rules(p, params, now)
    assert all(f.policy_id == p.id and f.disk_id == DISK for f in findings)


@settings(max_examples=examples(150), deadline=None)
@given(data=st.data(), params=params_strategy, now=nows, shift=st.integers(-10**9, 10**9))
def test_evaluate_is_deterministic_and_only_relative_to_now(
    data: st.DataObject, params: RuleParams, now: datetime, shift: int
) -> None:
    ps = data.draw(st.lists(policies(now), max_size=4, unique_by=lambda p: p.id))
    first = evaluate(snap(*ps), ruleset(params), now=now)
    assert evaluate(snap(*ps), ruleset(params), now=now) == first
    # Move the poll time and every schedule by the same amount: the verdicts (not the timestamps in the
    # messages) stay the same, so nothing but the given `now` is used as the clock.
    delta = timedelta(seconds=shift)
    moved = [
        BackupPolicy(p.id, p.retention, p.target_type, p.target_id,
                     Schedule(p.schedule.interval, None if p.schedule.next_invocation_at is None
                              else p.schedule.next_invocation_at + delta))
        for p in ps
    ]
    later = evaluate(snap(*moved), ruleset(params), now=now + delta)
    assert [(f.rule, f.policy_id, f.severity, f.fingerprint) for f in later] == [
        (f.rule, f.policy_id, f.severity, f.fingerprint) for f in first]


@settings(max_examples=examples(200), deadline=None)
@given(
    params=params_strategy,
    now=nows,
    data=st.data(),
    extra_retention=st.integers(0, 50),
    ahead=st.integers(0, 30 * 86400),
    target_type=st.sampled_from(list(TargetType)),
)
def test_a_policy_meeting_every_threshold_yields_no_finding(
    params: RuleParams, now: datetime, data: st.DataObject, extra_retention: int, ahead: int,
    target_type: TargetType
) -> None:
    interval = data.draw(st.sampled_from(ALL_INTERVALS[: params.max_interval.rank + 1]))
    needed_for_window = math.ceil(params.min_retention_days * 24 / INTERVAL_HOURS[interval])
    retention = max(params.min_retention, needed_for_window) + extra_retention
    due = now - params.stale_grace + timedelta(seconds=ahead)
    p = BackupPolicy("dbp_ok", retention, target_type, DISK, Schedule(interval, due))
    assert evaluate(snap(p), ruleset(params), now=now) == []


@settings(max_examples=examples(300), deadline=None)
@given(a=st.tuples(st.sampled_from(list(RULES)), ids, st.one_of(st.none(), ids)),
       b=st.tuples(st.sampled_from(list(RULES)), ids, st.one_of(st.none(), ids)))
def test_fingerprints_are_stable_and_distinct_per_rule_disk_policy(
    a: tuple[str, str, str | None], b: tuple[str, str, str | None]
) -> None:
    fa, fb = fingerprint(*a), fingerprint(*b)
    assert fa == fingerprint(*a)
    assert len(fa) == 16 and all(c in "0123456789abcdef" for c in fa)
    same = (a[0], a[1], a[2] or "") == (b[0], b[1], b[2] or "")
    assert (fa == fb) is same
    finding = Finding(a[0], a[1], a[2], Severity.LOW, "m")
    assert finding.fingerprint == fa


@settings(max_examples=examples(100), deadline=None)
@given(data=st.data(), params=params_strategy, now=nows)
def test_fingerprints_do_not_depend_on_thresholds_or_time(data: st.DataObject, params: RuleParams,
                                                          now: datetime) -> None:
    p = data.draw(policies(now))
    for f in evaluate(snap(p), ruleset(params), now=now):
        assert f.fingerprint == fingerprint(f.rule, DISK, p.id)


# ---- rules judged from observed runs ----------------------------------------------------------------------


def test_observed_step_longer_than_the_tier_allows_opens_and_two_good_steps_resolve() -> None:
    rs = ruleset(replace(LAX, max_interval=Interval.DAILY))
    p = sized(policy())

    def rules_after(*steps: float) -> list[str]:
        return rule_ids(evaluate(snap(p), rs, now=NOW, schedules={p.id: stepped(p.id, *steps)}))

    assert rules_after(1, 1) == []
    assert rules_after(1, 7) == [OBSERVED_INTERVAL_TOO_LONG]
    assert rules_after(7, 1) == [OBSERVED_INTERVAL_TOO_LONG]  # one good step is not enough
    assert rules_after(1, 1) == []  # two in a row resolve it
    # The limit is 24 h plus stale_grace (1 h): 25 h passes, a minute more does not.
    assert rules_after(1, 25 / 24) == []
    assert rules_after(1, 25 / 24 + 1 / 1440) == [OBSERVED_INTERVAL_TOO_LONG]
    (finding,) = evaluate(snap(p), rs, now=NOW, schedules={p.id: stepped(p.id, 1, 7)})
    assert finding.observed["step_seconds"] == 7 * 86400 and finding.expected["max_step_seconds"] == 25 * 3600


@pytest.mark.parametrize(("tier", "limit_days"), [(Interval.HOURLY, 1 / 24), (Interval.DAILY, 1),
                                                  (Interval.WEEKLY, 7), (Interval.MONTHLY, 31)])
def test_observed_interval_limit_per_tier(tier: Interval, limit_days: float) -> None:
    rs = ruleset(replace(LAX, max_interval=tier, stale_grace=timedelta(0)))
    p = sized(policy(interval=tier))
    ok = evaluate(snap(p), rs, now=NOW, schedules={p.id: stepped(p.id, limit_days, limit_days)})
    bad = evaluate(snap(p), rs, now=NOW, schedules={p.id: stepped(p.id, limit_days, limit_days + 0.01)})
    assert rule_ids(ok) == [] and rule_ids(bad) == [OBSERVED_INTERVAL_TOO_LONG]


def test_a_step_seen_late_counts_only_what_it_proves() -> None:
    # Seen 20 h after it was due, a 30 h step could hide a run in between: only the 10 h after the poll is proven.
    due = NOW - timedelta(hours=20)
    late = Invocation(DISK, "dbp_x", due, due + timedelta(hours=30), NOW)
    assert late.step == timedelta(hours=10)
    prompt = Invocation(DISK, "dbp_x", due, due + timedelta(hours=30), due + timedelta(minutes=15))
    assert prompt.step == timedelta(hours=30)


def test_no_backup_data_after_an_observed_run_or_a_whole_interval() -> None:
    rs = ruleset()
    empty = policy()  # total_size None: not sent, so not known to hold anything
    zero = sized(policy(), 0.0)
    full = sized(policy(), 12.5)
    fresh = PolicySchedule(DISK, empty.id, NOW - timedelta(hours=2), NOW + timedelta(hours=3))
    waited = PolicySchedule(DISK, empty.id, NOW - timedelta(hours=25, minutes=1), NOW + timedelta(hours=3))
    ran = stepped(empty.id, 1, first_seen=NOW - timedelta(hours=30))
    for p in (empty, zero):
        assert rule_ids(evaluate(snap(p), rs, now=NOW, schedules={p.id: fresh})) == []
        assert rule_ids(evaluate(snap(p), rs, now=NOW, schedules={p.id: waited})) == [NO_BACKUP_DATA]
        assert rule_ids(evaluate(snap(p), rs, now=NOW, schedules={p.id: ran})) == [NO_BACKUP_DATA]
    assert rule_ids(evaluate(snap(full), rs, now=NOW, schedules={full.id: ran})) == []
    # Never observed (no schedule given): the rules judged from observations say nothing.
    assert rule_ids(evaluate(snap(zero), rs, now=NOW)) == []


def sized(p: BackupPolicy, total_size: float | None = 1.0) -> BackupPolicy:
    return replace(p, total_size=total_size)
# ---- attachment: VM policies cover attached disks only --------------------------------------------------------


def vm_policy(pid: str = "dbp_vmvmvmvmvmvmvmvm", **kw: object) -> BackupPolicy:
    return policy(pid, target_type=TargetType.VIRTUAL_MACHINE, target_id=VM, **kw)  # type: ignore[arg-type]


def on_vm(state: str | None, *, boot: bool | None = True) -> Disk:
    return Disk(DISK, vm_id=VM, attachment=None if state is None else Attachment(state, boot))


def test_a_detached_disk_covered_only_by_its_vm_is_a_finding_not_compliant() -> None:
    findings = evaluate(snap(vm_policy(retention=1), disk=on_vm("detached", boot=False)), ruleset(), now=NOW)
    (f,) = findings
    assert f.rule == DETACHED_FROM_COVERING_VM and f.severity is Severity.HIGH and f.policy_id is None
    assert f.observed == {"vm_id": VM, "state": "detached", "attach_on_boot": False,
                          "vm_policies": ["dbp_vmvmvmvmvmvmvmvm"]}
    assert "detached from virtual machine" in f.message
    # Attached, the same VM policy covers it and is judged (retention 1 fails the raised minimum).
    attached = evaluate(snap(vm_policy(retention=1), disk=on_vm("attached")),
                        ruleset(RuleParams(min_retention=7, min_retention_days=0, max_interval=Interval.MONTHLY)),
                        now=NOW)
    assert rule_ids(attached) == [RETENTION_BELOW_MINIMUM]


def test_a_detached_disk_with_its_own_policy_is_judged_by_that_policy_only() -> None:
    weak_vm = vm_policy(retention=1)
    findings = evaluate(snap(policy(retention=14), weak_vm, disk=on_vm("detached")),
                        ruleset(RuleParams(min_retention=7, min_retention_days=0, max_interval=Interval.MONTHLY)),
                        now=NOW)
    assert findings == []  # the VM's weak policy does not back this disk up, so it is not judged against it


def test_a_detached_disk_without_any_policy_is_unprotected() -> None:
    assert rule_ids(evaluate(snap(disk=on_vm("detached")), ruleset(), now=NOW)) == [UNPROTECTED_DISK]


def test_disabling_the_rule_counts_detached_disks_as_covered() -> None:
    # A Katapult that backs up detached disks: the operator disables the rule, and the VM policy covers again.
    rs = ruleset(RuleParams(min_retention=7, min_retention_days=0, max_interval=Interval.MONTHLY),
                 disabled=frozenset({DETACHED_FROM_COVERING_VM}))
    assert evaluate(snap(vm_policy(retention=14), disk=on_vm("detached")), rs, now=NOW) == []
    assert rule_ids(evaluate(snap(vm_policy(retention=1), disk=on_vm("detached")), rs, now=NOW)) == [
        RETENTION_BELOW_MINIMUM]


def test_a_lowered_severity_applies() -> None:
    rs = ruleset(severity={DETACHED_FROM_COVERING_VM: Severity.LOW})
    (f,) = evaluate(snap(vm_policy(), disk=on_vm("detached")), rs, now=NOW)
    assert f.severity is Severity.LOW


def test_an_unknown_attachment_state_is_never_taken_as_detached() -> None:
    # Anything but "attached" is not attached; no state at all is decided by the collection (see collection tests).
    (f,) = evaluate(snap(vm_policy(), disk=on_vm("detaching")), ruleset(), now=NOW)
    assert f.rule == DETACHED_FROM_COVERING_VM
    assert evaluate(snap(vm_policy(), disk=on_vm(None)), ruleset(), now=NOW) == []


def test_a_vm_policys_runs_count_only_for_disks_known_attached_unless_the_rule_is_disabled() -> None:
    own, vm = policy("dbp_own"), vm_policy()
    gold = Tier("gold", TierMatch())
    rs = ruleset(tiers=(gold,), tier_rules={"gold": Applied(LAX, {}, frozenset({DETACHED_FROM_COVERING_VM}))})
    ids = {state: [p.id for p in observed_coverage(snap(own, vm, disk=on_vm(state)), rs)]
           for state in ("attached", "detached", "detaching", None)}
    assert ids == {"attached": ["dbp_own", "dbp_vmvmvmvmvmvmvmvm"], "detached": ["dbp_own"], "detaching": ["dbp_own"],
                   None: ["dbp_own"]}  # an unknown state is not taken as attached here (it is when judging)
    assert [p.id for p in observed_coverage(snap(own, vm, disk=Disk(DISK)), rs)] == ["dbp_own", "dbp_vmvmvmvmvmvmvmvm"]
    # A tier that disables the rule: VM policies cover its detached disks, for their runs as for their verdict.
    in_gold = replace(snap(vm, disk=on_vm("detached")), tier=TierDecision(gold))
    assert [p.id for p in observed_coverage(in_gold, rs)] == ["dbp_vmvmvmvmvmvmvmvm"]
    assert evaluate(in_gold, rs, now=NOW) == []
    assert [p.id for p in observed_coverage(replace(in_gold, disk=on_vm(None)), rs)] == ["dbp_vmvmvmvmvmvmvmvm"]
    # ... and a per-disk override is judged by [rules], which does not.
    assert observed_coverage(in_gold, replace(rs, overrides={DISK: LAX})) == ()


def test_observe_records_runs_not_reschedules_and_chains_gaps_across_policies() -> None:
    from auditor.domain.invocations import RpoFacts, observe, observed_rpo

    a, b = policy("dbp_a"), policy("dbp_b")
    at = NOW - timedelta(hours=30)

    def moved(p: BackupPolicy, to: datetime | None) -> BackupPolicy:
        return replace(p, schedule=Schedule(p.schedule.interval, to))

    first = observe(DISK, [moved(a, at), moved(b, at + timedelta(hours=2))], {}, now=at - HOUR)
    assert first.invocations == [] and {s.first_seen_at for s in first.schedules.values()} == {at - HOUR}
    # b moved on from a time still to come: a reschedule; a ran (its old value has passed).
    second = observe(DISK, [moved(a, at + DAY), moved(b, at + DAY)], first.schedules, now=at + HOUR)
    assert [(i.policy_id, i.due_at, i.gap_seconds) for i in second.invocations] == [("dbp_a", at, None)]
    assert second.schedules["dbp_b"].recent == () and second.schedules["dbp_b"].next_invocation_at == at + DAY
    # A missing value keeps the last one; both then run: each gap is from the disk's previous run, any policy.
    third = observe(DISK, [moved(a, None), moved(b, None)], second.schedules, now=at + 2 * HOUR)
    assert third.invocations == [] and third.schedules["dbp_a"].next_invocation_at == at + DAY
    fourth = observe(DISK, [moved(a, at + 2 * DAY), moved(b, at + 2 * DAY)], third.schedules, now=at + DAY + HOUR)
    assert [(i.policy_id, i.gap_seconds) for i in fourth.invocations] == [("dbp_a", 86400), ("dbp_b", 0)]
    # The RPO: the longest gap, or the time since the last run when that is longer; None without a gap, never 0.
    assert observed_rpo(RpoFacts(2, at + DAY, timedelta(days=1)), end=at + DAY + HOUR) == 86400
    assert observed_rpo(RpoFacts(2, at + DAY, timedelta(days=1)), end=at + 3 * DAY) == 2 * 86400
    assert observed_rpo(RpoFacts(1, at, None), end=at + 3 * DAY) is None


HOUR = timedelta(hours=1)
DAY = timedelta(days=1)


def test_observed_interval_follows_overrides_and_tiers() -> None:
    # A disk allowed weekly runs (an override) passes a 7-day step; the defaults (daily) do not.
    rs = build_ruleset(default=LAX, overrides=[(["disk_weekly"], {"max_interval": Interval.WEEKLY})])
    rs = replace(rs, default=replace(LAX, max_interval=Interval.DAILY))
    p = sized(policy())
    week = {p.id: stepped(p.id, 7, 7)}
    assert rule_ids(evaluate(snap(p, disk=Disk("disk_weekly")), rs, now=NOW, schedules=week)) == []
    assert rule_ids(evaluate(snap(p), rs, now=NOW, schedules=week)) == [OBSERVED_INTERVAL_TOO_LONG]
    # Disabled like any rule, or with another severity.
    assert evaluate(snap(p), replace(rs, disabled=frozenset({OBSERVED_INTERVAL_TOO_LONG})), now=NOW,
                    schedules=week) == []
    (f,) = evaluate(snap(p), replace(rs, severity={OBSERVED_INTERVAL_TOO_LONG: Severity.LOW}), now=NOW,
                    schedules=week)
    assert f.severity is Severity.LOW
