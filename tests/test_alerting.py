"""Alerts end to end: planning, the durable outbox, delivery with retry, and exactly-once across a restart."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from receivers import HttpReceiver, Reply

from auditor.config import Settings
from auditor.domain.alerts import AlertState, AlertStatus
from auditor.domain.lifecycle import Change, Transition
from auditor.domain.models import FindingStatus, Severity, TrackedFinding
from auditor.domain.records import RunError, RunStatus
from auditor.fake import Fault, Fleet, create_app
from auditor.service import open_services
from auditor.service.alerts import incomplete_fingerprint, plan_notifications
from auditor.service.cycle import run_cycle
from auditor.service.delivery import deliver_due, drain

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def _finding(i: int, *, status: FindingStatus = FindingStatus.OPEN, rule: str = "schedule-stale") -> TrackedFinding:
    return TrackedFinding(f"fp{i:04d}", rule, f"disk_{i}", f"dbp_{i}", Severity.HIGH, status, "m", {}, {},
                          NOW, NOW, NOW, NOW if status is FindingStatus.RESOLVED else None)


def _notifier(**kw: Any) -> Any:
    return Settings(**{"notifiers": [{"kind": "webhook", "name": "hook", "url": "http://127.0.0.1:9/x", **kw}]}
                    ).notifiers[0]


def test_two_hundred_stale_disks_are_one_notification() -> None:
    changes = [Change(Transition.OPENED, _finding(i)) for i in range(200)]
    plan = plan_notifications(notifiers=[_notifier()], changes=changes, run_status=RunStatus.COMPLETE, errors=[],
                              incomplete_fp="inc", states={}, now=NOW)
    assert len(plan.entries) == 1
    assert len(plan.entries[0].notification.alerts) == 200
    assert plan.entries[0].kind == "firing"


def test_repeat_resolve_waive_and_filters() -> None:
    n = _notifier(repeat_interval="4h")
    firing = {("hook", f"fp{i:04d}"): AlertState("hook", f"fp{i:04d}", AlertStatus.FIRING, NOW - timedelta(hours=h),
                                                  NOW - timedelta(days=1)) for i, h in ((1, 1), (2, 5), (3, 1), (4, 1))}
    changes = [
        Change(Transition.PERSISTING, _finding(1)),  # sent an hour ago: nothing
        Change(Transition.PERSISTING, _finding(2)),  # sent five hours ago: repeat
        Change(Transition.RESOLVED, _finding(3, status=FindingStatus.RESOLVED)),  # resolved
        Change(Transition.WAIVED, _finding(4, status=FindingStatus.WAIVED)),  # silent, state forgotten
        Change(Transition.OPENED, TrackedFinding(
            "fp0005", "interval-too-infrequent", "disk_5", None, Severity.MEDIUM, FindingStatus.OPEN, "m", {}, {},
            NOW, NOW, NOW)),  # below min_severity high: not sent
    ]
    plan = plan_notifications(notifiers=[n], changes=changes, run_status=RunStatus.COMPLETE, errors=[],
                              incomplete_fp="inc", states=firing, now=NOW)
    kinds = {e.kind: [a.fingerprint for a in e.notification.alerts] for e in plan.entries}
    assert kinds == {"repeat": ["fp0002"], "resolved": ["fp0003"]}
    assert ("hook", "fp0004") in plan.states and ("hook", "fp0003") in plan.states


def test_audit_incomplete_fires_then_resolves() -> None:
    n = _notifier()
    errors = [RunError("disk_x", "service_unavailable", "503 after retries")]
    fp = incomplete_fingerprint(["disk_x"], [])
    assert fp == incomplete_fingerprint(["disk_x"], [])
    plan = plan_notifications(notifiers=[n], changes=[], run_status=RunStatus.PARTIAL, errors=errors,
                              incomplete_fp=fp, states={}, now=NOW)
    [entry] = plan.entries
    assert entry.notification.alerts[0].rule == "audit-incomplete"
    assert entry.notification.alerts[0].status is AlertStatus.FIRING
    states = {("hook", fp): AlertState("hook", fp, AlertStatus.FIRING, NOW, NOW)}
    plan = plan_notifications(notifiers=[n], changes=[], run_status=RunStatus.COMPLETE, errors=[],
                              incomplete_fp=fp, states=states, now=NOW + timedelta(minutes=15))
    [entry] = plan.entries
    assert entry.kind == "resolved" and entry.notification.alerts[0].status is AlertStatus.RESOLVED


@pytest.fixture(scope="module")
def receiver() -> Iterator[HttpReceiver]:
    with HttpReceiver() as r:
        yield r


def _fleet() -> tuple[Fleet, str, str]:
    fleet = Fleet()
    org = fleet.add_org("acme")
    good = fleet.add_disk(org.id, "good")
    bad = fleet.add_disk(org.id, "bad")
    fleet.add_policy(good.id, retention=14, interval="daily", next_invocation_at=int(time.time()) + 3600)
    return fleet, good.id, bad.id


def _settings(db_url: str, receiver: HttpReceiver, disks: list[str]) -> Settings:
    return Settings(**{
        "katapult": {"api_url": "http://fake/core/v1", "per_page": 5, "max_attempts": 1},
        "database": {"url": db_url},
        "audit": {"disks": disks},
        "notifiers": [{"kind": "webhook", "name": "hook", "url": receiver.url + "/alerts", "min_severity": "high",
                       "repeat_interval": "4h"}],
    })


async def test_outbox_survives_a_crash_and_delivers_exactly_once(db_url: str, receiver: HttpReceiver) -> None:
    receiver.reset()
    fleet, good, bad = _fleet()
    settings = _settings(db_url, receiver, [good, bad])
    transport = httpx.ASGITransport(app=create_app(fleet))
    # Process 1: the cycle commits the finding and its notification, then "dies" before delivering.
    async with open_services(settings, transport=transport, token="fake-token") as rt:
        outcome = await run_cycle(rt)
        assert outcome.opened == 1
        assert await rt.outbox.pending_count() == 1
    assert receiver.requests == []
    # Process 2 after the restart: delivers it once; more rounds and another cycle send nothing new.
    async with open_services(settings, transport=transport, token="fake-token") as rt:
        assert (await drain(rt, within=10)).pending == 0
        assert (await drain(rt, within=10)).pending == 0
        await run_cycle(rt)
        await drain(rt, within=10)
    assert len(receiver.requests) == 1
    body = receiver.requests[0].json()
    assert body["version"] == "4" and body["status"] == "firing" and body["receiver"] == "hook"
    [alert] = body["alerts"]
    assert alert["labels"]["alertname"] == "unprotected-disk" and alert["labels"]["disk_id"] == bad
    assert receiver.requests[0].headers.get("idempotency-key")
    # The disk gets a policy: one resolved message.
    fleet.add_policy(bad, retention=14, interval="daily", next_invocation_at=int(time.time()) + 3600)
    async with open_services(settings, transport=transport, token="fake-token") as rt:
        outcome = await run_cycle(rt)
        assert outcome.resolved == 1
        await drain(rt, within=10)
    assert len(receiver.requests) == 2
    assert receiver.requests[1].json()["status"] == "resolved"


async def test_retry_then_deliver_and_permanent_failure(db_url: str, receiver: HttpReceiver) -> None:
    receiver.reset()
    fleet, good, bad = _fleet()
    settings = _settings(db_url, receiver, [good, bad])
    transport = httpx.ASGITransport(app=create_app(fleet))
    receiver.script(Reply(503, "busy", {"Retry-After": "600"}))
    clock = MovableClock(datetime.now(UTC))
    async with open_services(settings, transport=transport, token="fake-token", clock=clock) as rt:
        await run_cycle(rt)
        report = await deliver_due(rt)
        assert report.retried == 1 and report.delivered == 0
        [entry] = await rt.outbox.recent()
        assert entry.state.value == "pending" and entry.attempts == 1 and entry.last_status == 503
        assert entry.next_attempt_at >= clock.now + timedelta(seconds=600)  # Retry-After honoured
        # Not due yet: a round now sends nothing.
        clock.now += timedelta(seconds=300)
        assert (await deliver_due(rt)).delivered == 0 and len(receiver.requests) == 1
        # Due after its Retry-After: the injected clock moves on and a later round delivers it.
        clock.now += timedelta(minutes=20)
        report = await deliver_due(rt)
        assert report.delivered == 1
        assert (await rt.outbox.recent())[0].state.value == "delivered"
    assert [r.json()["status"] for r in receiver.requests] == ["firing", "firing"]
    # A permanent 4xx is recorded with its reason and not retried.
    receiver.reset()
    receiver.script(Reply(400, "bad payload"))
    fleet.faults[good] = Fault.UNAVAILABLE  # run becomes partial: audit-incomplete fires
    async with open_services(settings, transport=transport, token="fake-token") as rt:
        outcome = await run_cycle(rt)
        assert outcome.status is RunStatus.PARTIAL
        report = await deliver_due(rt)
        assert report.failed == 1
        failed = [e for e in await rt.outbox.recent() if e.state.value == "failed"]
        assert failed and failed[0].last_status == 400 and "400" in (failed[0].last_error or "")
        assert receiver.url not in (failed[0].last_error or "")


class MovableClock:
    """The services' clock seam: tests move time instead of rewriting rows."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now
