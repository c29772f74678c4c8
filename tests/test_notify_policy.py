"""Delivery-stage policy helpers: filtering, grouping, backoff and repeat, at their boundaries."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import pytest
from pydantic import SecretStr

from auditor.config import WebhookNotifier
from auditor.domain.alerts import AUDIT_INCOMPLETE, Alert, AlertStatus
from auditor.domain.models import Severity
from auditor.domain.retry import backoff as shared_backoff
from auditor.notify.policy import BACKOFF_BASE, BACKOFF_CAP, group_alerts, group_key, is_repeat_due, wants

backoff = partial(shared_backoff, base=BACKOFF_BASE, cap=BACKOFF_CAP)  # the delivery stage's

NOW = datetime(2026, 11, 28, 7, 0, tzinfo=UTC)


def alert(fingerprint: str, **kw: Any) -> Alert:
    fields: dict[str, Any] = {
        "fingerprint": fingerprint,
        "rule": "unprotected-disk",
        "severity": Severity.HIGH,
        "status": AlertStatus.FIRING,
        "summary": "s",
        "description": "d",
        "starts_at": NOW - timedelta(hours=1),
        "disk_id": "dsk_1",
    }
    fields.update(kw)
    return Alert(**fields)


def settings(**kw: Any) -> WebhookNotifier:
    return WebhookNotifier(kind="webhook", name="hook", url=SecretStr("http://x/secret"), **kw)


# ------------------------------------------------------------------------------------------------- wants


@pytest.mark.parametrize(
    ("minimum", "severity", "expected"),
    [
        ("low", Severity.LOW, True),
        ("medium", Severity.LOW, False),
        ("medium", Severity.MEDIUM, True),
        ("high", Severity.MEDIUM, False),
        ("high", Severity.HIGH, True),
        ("high", Severity.CRITICAL, True),
        ("critical", Severity.HIGH, False),
        ("critical", Severity.CRITICAL, True),
    ],
)
def test_wants_filters_on_min_severity(minimum: str, severity: Severity, expected: bool) -> None:
    assert wants(settings(min_severity=minimum), alert("a", severity=severity)) is expected


def test_wants_default_min_severity_is_high() -> None:
    assert wants(settings(), alert("a", severity=Severity.HIGH))
    assert not wants(settings(), alert("a", severity=Severity.MEDIUM))


def test_wants_filters_on_rules_when_listed() -> None:
    only_stale = settings(rules=["schedule-stale"], min_severity="low")
    assert wants(only_stale, alert("a", rule="schedule-stale"))
    assert not wants(only_stale, alert("a", rule="unprotected-disk"))
    assert wants(settings(rules=[]), alert("a", rule="disk-in-trash"))


def test_wants_applies_the_same_filters_to_audit_incomplete() -> None:
    incomplete = alert("a", rule=AUDIT_INCOMPLETE, severity=Severity.HIGH, disk_id=None)
    assert wants(settings(), incomplete)
    assert not wants(settings(min_severity="critical"), incomplete)
    assert not wants(settings(rules=["unprotected-disk"]), incomplete)
    assert wants(settings(rules=[AUDIT_INCOMPLETE]), incomplete)


def test_wants_resolved_only_with_send_resolved() -> None:
    resolved = alert("a", status=AlertStatus.RESOLVED, ends_at=NOW)
    assert wants(settings(), resolved)
    assert not wants(settings(send_resolved=False), resolved)
    assert wants(settings(send_resolved=False), alert("a"))


def test_wants_resolved_still_needs_severity_and_rule() -> None:
    resolved = alert("a", status=AlertStatus.RESOLVED, severity=Severity.LOW, ends_at=NOW)
    assert not wants(settings(), resolved)


# ------------------------------------------------------------------------------------------ group_alerts


def test_group_key_is_alertmanager_style() -> None:
    assert group_key({}) == "{}:{}"
    assert group_key({"alertname": "schedule-stale"}) == '{}:{alertname="schedule-stale"}'
    assert group_key({"severity": "high", "alertname": "x", "disk_id": "d"}) == (
        '{}:{alertname="x", disk_id="d", severity="high"}'
    )
    assert group_key({"disk_id": 'a"b\\c'}) == '{}:{disk_id="a\\"b\\\\c"}'


def test_group_by_rule() -> None:
    a = alert("b2", rule="schedule-stale")
    b = alert("a1", rule="schedule-stale", disk_id="dsk_2")
    c = alert("c3", rule="unprotected-disk")
    groups = group_alerts("hook", [a, c, b], ["rule"])
    assert groups == [
        ('{}:{alertname="schedule-stale"}', {"alertname": "schedule-stale"}, (b, a)),
        ('{}:{alertname="unprotected-disk"}', {"alertname": "unprotected-disk"}, (c,)),
    ]


def test_group_by_several_labels_and_order_of_group_by_does_not_matter() -> None:
    a = alert("1", severity=Severity.HIGH, disk_id="dsk_1")
    b = alert("2", severity=Severity.CRITICAL, disk_id="dsk_1")
    c = alert("3", severity=Severity.HIGH, disk_id="dsk_1")
    one = group_alerts("hook", [a, b, c], ["rule", "severity", "disk_id"])
    other = group_alerts("hook", [c, b, a], ["disk_id", "severity", "rule"])
    assert one == other
    assert [(key, members) for key, _, members in one] == [
        ('{}:{alertname="unprotected-disk", disk_id="dsk_1", severity="critical"}', (b,)),
        ('{}:{alertname="unprotected-disk", disk_id="dsk_1", severity="high"}', (a, c)),
    ]


def test_group_by_nothing_is_one_group() -> None:
    alerts = [alert("2", rule="schedule-stale"), alert("1")]
    assert group_alerts("hook", alerts, []) == [("{}:{}", {}, (alerts[1], alerts[0]))]


def test_group_by_disk_leaves_empty_disk_out_of_labels() -> None:
    incomplete = alert("9", rule=AUDIT_INCOMPLETE, disk_id=None)
    disk = alert("1")
    groups = group_alerts("hook", [incomplete, disk], ["disk_id"])
    assert groups == [  # sorted by key: "d" sorts before "}"
        ('{}:{disk_id="dsk_1"}', {"disk_id": "dsk_1"}, (disk,)),
        ("{}:{}", {}, (incomplete,)),
    ]


def test_group_alerts_empty_and_key_is_independent_of_notifier() -> None:
    assert group_alerts("hook", [], ["rule"]) == []
    alerts = [alert("1"), alert("2", rule="schedule-stale")]
    assert group_alerts("a", alerts, ["rule"]) == group_alerts("b", alerts, ["rule"])


def test_group_alerts_keeps_firing_and_resolved_together() -> None:
    firing = alert("1")
    resolved = replace(alert("2"), status=AlertStatus.RESOLVED, ends_at=NOW)
    [(_, _, members)] = group_alerts("hook", [resolved, firing], ["rule"])
    assert members == (firing, resolved)


# ------------------------------------------------------------------------------------------------ backoff


@pytest.mark.parametrize(
    ("attempt", "ceiling"),
    [(0, 5.0), (1, 5.0), (2, 10.0), (3, 20.0), (8, 640.0), (9, 900.0), (10, 900.0), (10_000, 900.0)],
)
def test_backoff_ceiling_doubles_then_caps(attempt: int, ceiling: float) -> None:
    assert backoff(attempt, retry_after=None, random=lambda: 1.0) == ceiling
    assert backoff(attempt, retry_after=None, random=lambda: 0.5) == ceiling / 2


def test_backoff_full_jitter_can_be_zero() -> None:
    assert backoff(5, retry_after=None, random=lambda: 0.0) == 0.0


def test_backoff_never_below_retry_after() -> None:
    assert backoff(1, retry_after=30.0, random=lambda: 1.0) == 30.0
    assert backoff(8, retry_after=30.0, random=lambda: 1.0) == 640.0
    assert backoff(8, retry_after=30.0, random=lambda: 0.0) == 30.0
    assert backoff(3, retry_after=3600.0, random=lambda: 1.0) == 3600.0  # above the cap: the receiver decides
    assert backoff(3, retry_after=0.0, random=lambda: 0.25) == 5.0


def test_backoff_custom_base_and_cap() -> None:
    assert backoff(4, retry_after=None, base=1.0, cap=5.0, random=lambda: 1.0) == 5.0
    assert backoff(3, retry_after=None, base=1.0, cap=5.0, random=lambda: 1.0) == 4.0


def test_backoff_default_random_stays_in_range() -> None:
    for attempt in range(1, 15):
        assert 0.0 <= backoff(attempt, retry_after=None) <= 900.0


# ------------------------------------------------------------------------------------------ is_repeat_due


def test_repeat_due_at_exactly_the_interval() -> None:
    interval = timedelta(hours=4)
    assert not is_repeat_due(NOW - interval + timedelta(seconds=1), interval, now=NOW)
    assert is_repeat_due(NOW - interval, interval, now=NOW)
    assert is_repeat_due(NOW - interval - timedelta(days=3), interval, now=NOW)


def test_repeat_due_when_never_sent() -> None:
    assert is_repeat_due(None, timedelta(hours=4), now=NOW)


def test_repeat_interval_zero_never_repeats() -> None:
    assert not is_repeat_due(NOW - timedelta(days=365), timedelta(0), now=NOW)
    assert not is_repeat_due(None, timedelta(0), now=NOW)


def test_repeat_not_due_when_clock_went_backwards() -> None:
    assert not is_repeat_due(NOW + timedelta(minutes=5), timedelta(hours=1), now=NOW)
