"""On-call conventions (issue 13): Alertmanager keep-alive every cycle, `notify test` resolving what it fired on
stateful receivers, and per-notifier labels, source, external_url and severity_map, against loopback receivers."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import notify_support
import pytest
from click.testing import CliRunner
from procs import clean_env
from pydantic import ValidationError
from receivers import GroupWaitRouter, HttpReceiver

from auditor.cli import main
from auditor.config import Settings
from auditor.domain.alerts import AlertState, AlertStatus, notifier_warnings
from auditor.domain.lifecycle import Change, Transition
from auditor.domain.models import FindingStatus, Severity, TrackedFinding
from auditor.domain.records import RunStatus
from auditor.notify.dispatch import Dispatcher
from auditor.service.alerts import Plan, plan_notifications

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
INTERVAL = timedelta(minutes=15)


http_server = notify_support.http_server  # the module's loopback receiver
receiver = notify_support.receiver  # reset before and after each test


def _finding(i: int, *, severity: Severity = Severity.HIGH) -> TrackedFinding:
    return TrackedFinding(f"fp{i:014d}", "unprotected-disk", f"disk_{i}", None, severity, FindingStatus.OPEN, "m",
                          {}, {}, NOW, NOW, NOW, None)


def _notifiers(**notifiers: dict[str, Any]) -> list[Any]:
    return list(Settings(notifiers=[{"name": name, **kw} for name, kw in notifiers.items()]).notifiers)


def _apply(states: dict[tuple[str, str], AlertState], plan: Plan) -> None:
    for change in plan.states:
        if isinstance(change, AlertState):
            states[(change.notifier, change.fingerprint)] = change
        else:
            states.pop(change, None)


def _plan(notifiers: list[Any], changes: list[Change], states: dict[tuple[str, str], AlertState], now: datetime,
          **kw: Any) -> Plan:
    plan = plan_notifications(notifiers=notifiers, changes=changes, run_status=RunStatus.COMPLETE, errors=[],
                              incomplete_fp="inc", states=states, now=now, interval=INTERVAL, **kw)
    _apply(states, plan)
    return plan


def _rfc(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# ---- (2) Alertmanager keeps every open finding firing --------------------------------------------------------


async def test_alertmanager_reposts_open_finding_every_cycle_with_future_ends_at(receiver: HttpReceiver) -> None:
    notifiers = _notifiers(am={"kind": "alertmanager", "url": receiver.url, "repeat_interval": "0"},
                           hook={"kind": "webhook", "url": f"{receiver.url}/hook", "repeat_interval": "0"})
    states: dict[tuple[str, str], AlertState] = {}
    finding = _finding(1)
    cycles = [(NOW, Transition.OPENED), (NOW + INTERVAL, Transition.PERSISTING),
              (NOW + 2 * INTERVAL, Transition.PERSISTING)]
    async with Dispatcher() as dispatcher:
        for now, kind in cycles:
            plan = _plan(notifiers, [Change(kind, finding)], states, now)
            for entry in plan.entries:
                settings = next(n for n in notifiers if n.name == entry.notification.notifier)
                await dispatcher.send(entry.notification, settings, now=now)
    posts = [r for r in receiver.requests if r.path == "/api/v2/alerts"]
    hooks = [r for r in receiver.requests if r.path == "/hook"]
    assert len(posts) == 3  # every cycle, although repeat_interval = "0"
    assert len(hooks) == 1  # the human channel honours repeat_interval = "0": told once
    for (now, _), request in zip(cycles, posts, strict=True):
        [alert] = json.loads(request.body)
        assert alert["labels"]["fingerprint"] == finding.fingerprint
        ends = _rfc(alert["endsAt"])
        assert ends == now + 3 * INTERVAL + timedelta(minutes=5)
        assert ends > now + INTERVAL  # the next cycle's re-post lands before Alertmanager would resolve it


def test_alertmanager_keep_alive_covers_unread_disks_and_resolves_once() -> None:
    [am] = _notifiers(am={"kind": "alertmanager", "url": "http://127.0.0.1:9"})
    states: dict[tuple[str, str], AlertState] = {}
    finding = _finding(2)
    _plan([am], [Change(Transition.OPENED, finding)], states, NOW)
    # The disk could not be read: no change for the finding, but it is still open and must stay firing.
    plan = _plan([am], [], states, NOW + INTERVAL, untouched=[finding])
    [entry] = plan.entries
    assert entry.kind == "repeat" and entry.notification.keep_alive == 3 * INTERVAL + timedelta(minutes=5)
    resolved = replace(finding, status=FindingStatus.RESOLVED, resolved_at=NOW + 2 * INTERVAL)
    plan = _plan([am], [Change(Transition.RESOLVED, resolved)], states, NOW + 2 * INTERVAL)
    assert [e.kind for e in plan.entries] == ["resolved"]
    assert _plan([am], [], states, NOW + 3 * INTERVAL).entries == []


def test_check_config_warns_about_settings_that_cannot_work(tmp_path: Path) -> None:
    settings = Settings(notifiers=[
        {"kind": "alertmanager", "name": "am", "url": "http://am", "repeat_interval": "0", "send_resolved": False},
        {"kind": "pagerduty", "name": "pd", "routing_key": "k", "severity_map": {"high": "urgent"}},
        {"kind": "alertmanager", "name": "quiet", "url": "http://am"},
    ])
    warnings = notifier_warnings(settings)
    assert any("am (alertmanager): repeat_interval is ignored" in w for w in warnings)
    assert any("am (alertmanager): send_resolved = false" in w for w in warnings)
    assert any("pd (pagerduty): severity_map for high" in w for w in warnings)
    assert not any("quiet" in w for w in warnings)
    config = tmp_path / "auditor.toml"
    config.write_text('[[notifiers]]\nkind = "alertmanager"\nname = "am"\nurl = "http://am"\nrepeat_interval = "1h"\n')
    result = CliRunner().invoke(main, ["check-config", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "warning: notifier am (alertmanager): repeat_interval is ignored" in result.output
    # What a kind ignores is not shown as if it applied: no repeat_interval on the Alertmanager notifier's line.
    assert "  notifier am (alertmanager): min_severity high\n" in result.output
    config.write_text('[notify]\nrunbook_url = "https://wiki.example.com/{rule}"\n\n[[notifiers]]\nkind = "webhook"\n'
                      'name = "hook"\nurl = "http://hook"\n')
    result = CliRunner().invoke(main, ["check-config", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "  notifier hook (webhook): min_severity high, repeat_interval 4h\n" in result.output
    assert "  runbook_url https://wiki.example.com/{rule}\n" in result.output


# ---- (3) notify test resolves on stateful receivers -----------------------------------------------------------


def test_notify_test_fires_then_resolves_on_alertmanager_and_pagerduty(receiver: HttpReceiver,
                                                                      tmp_path: Path) -> None:
    config = tmp_path / "auditor.toml"
    config.write_text(
        f'[[notifiers]]\nkind = "alertmanager"\nname = "am"\nurl = "{receiver.url}/am"\n\n'
        f'[[notifiers]]\nkind = "pagerduty"\nname = "pd"\nrouting_key = "R0UTING"\n'
        f'events_url = "{receiver.url}/v2/enqueue"\n\n'
        f'[[notifiers]]\nkind = "webhook"\nname = "hook"\nurl = "{receiver.url}/hook"\n'
    )
    result = CliRunner().invoke(main, ["notify", "test", "--hold", "0", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "holding" not in result.output
    assert "am [alertmanager]: ok (HTTP 200), sent and resolved" in result.output
    assert "pd [pagerduty]: ok (HTTP 200), sent and resolved" in result.output
    assert "hook [webhook]: ok (HTTP 200)\n" in result.output  # stateless: nothing to resolve
    am = [json.loads(r.body) for r in receiver.requests if r.path == "/am/api/v2/alerts"]
    assert len(am) == 2
    [fired], [cleared] = am
    assert fired["labels"] == cleared["labels"]  # the same Alertmanager alert
    assert _rfc(fired["endsAt"]) > datetime.now(UTC)
    assert _rfc(cleared["endsAt"]) <= datetime.now(UTC)  # endsAt in the past: resolved at once
    pd = [json.loads(r.body) for r in receiver.requests if r.path == "/v2/enqueue"]
    assert [e["event_action"] for e in pd] == ["trigger", "resolve"]
    assert pd[0]["dedup_key"] == pd[1]["dedup_key"]
    assert len([r for r in receiver.requests if r.path == "/hook"]) == 1


@pytest.mark.slow
def test_a_held_notify_test_passes_group_wait_and_reaches_on_call(receiver: HttpReceiver, tmp_path: Path) -> None:
    # An Alertmanager stand-in holds new alerts for its group_wait (1 s here, 30 s by default) and then routes the
    # still-active ones to the on-call receiver; PagerDuty is the module's receiver.
    with HttpReceiver() as on_call, HttpReceiver(GroupWaitRouter(on_call.url + "/oncall", group_wait=1.0)) as am:
        config = tmp_path / "auditor.toml"
        config.write_text(
            f'[[notifiers]]\nkind = "alertmanager"\nname = "am"\nurl = "{am.url}"\n\n'
            f'[[notifiers]]\nkind = "pagerduty"\nname = "pd"\nrouting_key = "R0UTING"\n'
            f'events_url = "{receiver.url}/v2/enqueue"\n\n'
            f'[[notifiers]]\nkind = "webhook"\nname = "hook"\nurl = "{receiver.url}/hook"\n'
        )
        router = cast(GroupWaitRouter, am.app)
        # Resolved at once (the behaviour without a hold): Alertmanager took it, on-call never hears of it.
        result = CliRunner().invoke(main, ["notify", "test", "--hold", "0", "--config", str(config)])
        assert result.exit_code == 0, result.output
        assert _wait_for(lambda: not router._tasks, within=5)
        assert on_call.requests == []
        # Held past group_wait: the on-call receiver gets the firing test alert, then it is resolved.
        router.active.clear()
        receiver.reset()
        began = time.monotonic()
        result = CliRunner().invoke(main, ["notify", "test", "--hold", "2s", "--config", str(config)])
        took = time.monotonic() - began
        assert result.exit_code == 0, result.output
        assert "holding the test alert firing on am, pd for 2s" in result.output
        assert "am [alertmanager]: ok (HTTP 200), sent, held 2s and resolved" in result.output
        assert "pd [pagerduty]: ok (HTTP 200), sent, held 2s and resolved" in result.output
        assert "hook [webhook]: ok (HTTP 200)\n" in result.output
        assert took >= 2
        assert _wait_for(lambda: bool(on_call.requests), within=5)
        [routed] = on_call.requests
        [alert] = routed.json()["alerts"]
        assert alert["labels"]["alertname"] == "notifier-test" and alert["labels"]["test"] == "true"
        am_posts = [json.loads(r.body) for r in am.requests if r.path == "/api/v2/alerts"]
        assert len(am_posts) == 4 and _rfc(am_posts[-1][0]["endsAt"]) <= datetime.now(UTC)  # resolved at the end
        pd = [json.loads(r.body)["event_action"] for r in receiver.requests if r.path == "/v2/enqueue"]
        assert pd == ["trigger", "resolve"]


def _wait_for(condition: Callable[[], bool], *, within: float) -> bool:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.mark.parametrize(("hold", "problem"), [("soon", "expected a duration"), ("2h", "at most 1h"),
                                               ("-1s", "expected a duration")])
def test_notify_test_refuses_a_bad_hold(hold: str, problem: str, tmp_path: Path) -> None:
    config = tmp_path / "auditor.toml"
    config.write_text('[[notifiers]]\nkind = "webhook"\nname = "hook"\nurl = "http://127.0.0.1:9/x"\n')
    result = CliRunner().invoke(main, ["notify", "test", "--hold", hold, "--config", str(config)])
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--hold'" in result.output and problem in result.output, result.output


# ---- (4) labels, source, external_url, severity_map -----------------------------------------------------------


def _routed(receiver_url: str, kind: str, **kw: Any) -> Any:
    target = {"url": receiver_url} if kind in ("webhook", "alertmanager") else \
        {"routing_key": "k", "events_url": receiver_url} if kind == "pagerduty" else {"webhook_url": receiver_url}
    [n] = _notifiers(**{kind: {"kind": kind, **target, "labels": {"team": "storage", "env": "prod"},
                        "external_url": "https://auditor.example.com/", "severity_map": {"high": "critical",
                                                                                          "medium": "warning"},
                        **kw}})
    return n


async def test_webhook_and_alertmanager_carry_routing_labels_and_links(receiver: HttpReceiver) -> None:
    hook = _routed(f"{receiver.url}/hook", "webhook")
    am = _routed(receiver.url, "alertmanager")
    states: dict[tuple[str, str], AlertState] = {}
    plan = _plan([hook, am], [Change(Transition.OPENED, _finding(3))], states, NOW)
    async with Dispatcher() as dispatcher:
        for entry in plan.entries:
            settings = hook if entry.notification.notifier == hook.name else am
            await dispatcher.send(entry.notification, settings, now=NOW)
    [hook_req] = [r for r in receiver.requests if r.path == "/hook"]
    [am_req] = [r for r in receiver.requests if r.path == "/api/v2/alerts"]
    payload = json.loads(hook_req.body)
    assert payload["externalURL"] == "https://auditor.example.com"
    [alert] = payload["alerts"]
    assert alert["labels"] == {"alertname": "unprotected-disk", "disk_id": "disk_3", "severity": "critical",
                               "fingerprint": "fp00000000000003", "source": "auditor", "team": "storage",
                               "env": "prod"}
    assert alert["generatorURL"] == "https://auditor.example.com/disks/disk_3"
    assert alert["fingerprint"] == "fp00000000000003"  # the finding's, not Alertmanager's label hash
    [posted] = json.loads(am_req.body)
    assert posted["labels"] == alert["labels"]
    assert posted["generatorURL"] == alert["generatorURL"]


def test_severity_map_groups_by_the_value_sent() -> None:
    [n] = _notifiers(x={"kind": "webhook", "url": "http://h", "min_severity": "low", "group_by": ["severity"],
                        "severity_map": {"high": "critical", "critical": "critical", "low": "warning"}})
    findings = [_finding(4, severity=Severity.HIGH), _finding(5, severity=Severity.CRITICAL),
                _finding(6, severity=Severity.LOW)]
    plan = _plan([n], [Change(Transition.OPENED, f) for f in findings], {}, NOW)
    assert sorted(e.notification.group_labels["severity"] for e in plan.entries) == ["critical", "warning"]


def test_pagerduty_slack_and_email_show_routing_labels() -> None:
    from auditor.notify import email, pagerduty, slack
    from auditor.service.alerts import finding_alert

    note_plan = _plan([_routed("http://h", "pagerduty")], [Change(Transition.OPENED, _finding(7))], {}, NOW)
    note = note_plan.entries[0].notification
    [event] = pagerduty.NOTIFIER.build_payload(note, _routed("http://h", "pagerduty"), now=NOW)
    assert event["payload"]["severity"] == "critical"  # high mapped to critical, one of PagerDuty's values
    assert event["payload"]["custom_details"]["team"] == "storage"
    assert event["payload"]["custom_details"]["source"] == "auditor"
    assert event["links"] == [{"href": "https://auditor.example.com/disks/disk_7", "text": "disk_7 in the auditor"}]
    unmapped = _routed("http://h", "pagerduty", severity_map={"high": "P1"})
    [event] = pagerduty.NOTIFIER.build_payload(note, unmapped, now=NOW)
    assert event["payload"]["severity"] == "error"  # "P1" is not a PagerDuty severity: its own mapping
    text = json.dumps(slack.NOTIFIER.build_payload(note, _routed("http://h", "slack"), now=NOW))
    assert "env=prod, source=auditor, team=storage" in text
    assert "https://auditor.example.com/disks/disk_7|Open in the auditor" in text
    assert finding_alert(_finding(7), status=AlertStatus.FIRING).disk_id == "disk_7"
    body = email.render_text(note, now=NOW, settings=_routed("http://h", "slack"))
    assert "Labels: env=prod, source=auditor, team=storage" in body
    assert "Link: https://auditor.example.com/disks/disk_7" in body


@pytest.mark.parametrize(("options", "problem"), [
    ({"labels": {"team-name": "x"}}, "invalid label name"),
    ({"labels": {"severity": "x"}}, "cannot be overridden"),
    ({"labels": {"source": "x"}}, "cannot be overridden"),
    ({"labels": {"team": ""}}, "empty value"),
    ({"external_url": "ftp://auditor"}, "http:// or https://"),
    ({"external_url": "https://auditor/?x=1"}, "http:// or https://"),
    ({"severity_map": {"urgent": "critical"}}, "severity_map"),
])
def test_routing_options_are_validated(options: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        _notifiers(x={"kind": "webhook", "url": "http://h", **options})


@pytest.mark.slow  # a real `auditor notify test` process, interrupted
def test_ctrl_c_during_a_hold_resolves_at_once_and_reports_each_channel(receiver: HttpReceiver,
                                                                         tmp_path: Path) -> None:
    config = tmp_path / "auditor.toml"
    config.write_text(f'[[notifiers]]\nkind = "pagerduty"\nname = "pd"\nrouting_key = "R0UTING"\n'
                      f'events_url = "{receiver.url}/v2/enqueue"\n')
    # SIGINT's default action in the child, as in a terminal: pytest-xdist workers ignore SIGINT, and an ignored
    # signal stays ignored across exec (as for a background job of a shell script).
    proc = subprocess.Popen([sys.executable, "-m", "auditor", "notify", "test", "--hold", "10m", "--config",
                             str(config)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=clean_env(), preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdout is not None
    first = proc.stdout.readline()  # printed once the trigger was accepted
    assert first.startswith("holding the test alert firing on pd for 10m"), first
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (out, err)
    assert "pd [pagerduty]: ok (HTTP 200), sent, resolved early (interrupted)" in out, out
    assert err.strip() == "interrupted" and "Traceback" not in err
    pd = [json.loads(r.body)["event_action"] for r in receiver.requests if r.path == "/v2/enqueue"]
    assert pd == ["trigger", "resolve"]
