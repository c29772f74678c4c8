"""Alerts to act on: summaries that name the disk and its organization, a remediation hint per rule id, the
[notify] runbook_url link on every channel, whole seconds for people, and PagerDuty events under 512 KB."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import Any

import httpx
import pytest
from notify_support import DISK_1, NOW, notification
from pydantic import SecretStr
from receivers import HttpReceiver

from auditor.config import (
    EmailNotifier,
    PagerDutyNotifier,
    Settings,
    SlackNotifier,
    TeamsNotifier,
    load_settings,
)
from auditor.domain.alerts import Alert, AlertStatus, notification_from_dict, notification_to_dict
from auditor.domain.hints import REMEDIATION, remediation_for
from auditor.domain.models import Severity
from auditor.errors import ConfigError
from auditor.fake import Fleet, create_app
from auditor.notify.base import json_body
from auditor.notify.email import NOTIFIER as EMAIL
from auditor.notify.pagerduty import NOTIFIER as PAGERDUTY
from auditor.notify.slack import NOTIFIER as SLACK
from auditor.notify.teams import NOTIFIER as TEAMS
from auditor.service import open_services
from auditor.service.cycle import run_cycle
from auditor.service.delivery import drain
from auditor.vocabulary import AUDIT_INCOMPLETE, RULE_IDS

RUNBOOK = "https://wiki.example.com/runbooks/auditor/{rule}"
# A Katapult Core API v1 call: a method and a path of the API (or the auditor's own runs, for audit-incomplete).
API_CALL = re.compile(r"\b(GET|POST|PATCH|DELETE) /(disks|virtual_machines|disk_backup_policies|trash_objects)/")

# ---- the remediation table ----------------------------------------------------------------------------------


def test_every_rule_id_has_a_one_line_remediation_hint_with_the_api_call() -> None:
    # One table keyed by rule id: every rule of the vocabulary (and the audit-incomplete alert) has a hint, and the
    # table holds nothing else.
    assert set(REMEDIATION) == {*RULE_IDS, AUDIT_INCOMPLETE}, set(REMEDIATION) ^ {*RULE_IDS, AUDIT_INCOMPLETE}
    for rule in (*RULE_IDS, AUDIT_INCOMPLETE):
        hint = remediation_for(rule)
        assert hint and "\n" not in hint and len(hint) <= 300, (rule, hint)
        assert API_CALL.search(hint), f"{rule}: the hint names no Katapult API call: {hint}"
    assert remediation_for("notifier-test") == ""


# ---- end to end: a cycle's alerts on a real local receiver -------------------------------------------------------


@pytest.fixture(scope="module")
def receiver() -> Iterator[HttpReceiver]:
    with HttpReceiver() as r:
        yield r


async def test_cycle_alerts_name_the_disk_its_organization_and_what_to_do(db_url: str,
                                                                          receiver: HttpReceiver) -> None:
    receiver.reset()
    fleet = Fleet()
    acme = fleet.add_org("acme")
    listed = fleet.add_disk(acme.id, "scratch-1")  # no policy, audited through its organization
    other = fleet.add_org("globex")
    named = fleet.add_disk(other.id, "lonely")  # no policy, named in audit.disks: organization not known
    stale = fleet.add_disk(acme.id, "web-1-system")
    fleet.add_policy(stale.id, retention=14, next_invocation_at=int(time.time()) - 7 * 86400)
    settings = Settings(**{
        "katapult": {"api_url": "http://fake/core/v1", "per_page": 5, "max_attempts": 1},
        "database": {"url": db_url},
        "audit": {"organizations": ["acme"], "disks": [named.id]},
        "notify": {"runbook_url": RUNBOOK},
        "notifiers": [{"kind": "webhook", "name": "hook", "url": receiver.url + "/alerts", "min_severity": "low",
                       "group_by": ["disk_id"]}],
    })
    async with open_services(settings, transport=httpx.ASGITransport(app=create_app(fleet)),
                             token="fake-token") as services:
        outcome = await run_cycle(services)
        assert outcome.status.value == "complete", outcome.errors
        assert (await drain(services, within=10)).pending == 0
    alerts = {a["labels"]["disk_id"] + " " + a["labels"]["alertname"]: a
              for r in receiver.requests for a in r.json()["alerts"]}
    scratch = alerts[f"{listed.id} unprotected-disk"]["annotations"]
    assert scratch["summary"] == f"unprotected-disk on disk scratch-1 ({listed.id}) of organization acme"
    assert scratch["disk_name"] == "scratch-1" and scratch["organization"] == "acme"
    assert scratch["remediation"] == REMEDIATION["unprotected-disk"]
    assert scratch["runbook_url"] == "https://wiki.example.com/runbooks/auditor/unprotected-disk"
    lonely = alerts[f"{named.id} unprotected-disk"]["annotations"]
    assert lonely["summary"] == f"unprotected-disk on disk lonely ({named.id}) of organization unknown"
    assert "organization" not in lonely
    [policy] = [p for p in fleet.policies.values() if p.target_id == stale.id]
    late = alerts[f"{stale.id} schedule-stale"]["annotations"]
    assert late["summary"] == (f"schedule-stale on disk web-1-system ({stale.id}) of organization acme, "
                               f"policy {policy.id}")
    assert late["remediation"] == REMEDIATION["schedule-stale"]
    assert late["runbook_url"].endswith("/schedule-stale")
    # Labels stay the alert's identity: none of the context is a label.
    assert not {"disk_name", "organization", "runbook_url"} & set(alerts[f"{stale.id} schedule-stale"]["labels"])


# ---- [notify] runbook_url --------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["wiki.example.com/{rule}", "https://wiki.example.com/{rules}",
                                   "https://wiki.example.com/{rule}/{disk}", "https://wiki example.com/{rule}",
                                   "ftp://wiki.example.com/{rule}"])
def test_a_bad_runbook_url_is_one_config_error_naming_the_key(value: str, tmp_path: Any) -> None:
    path = tmp_path / "auditor.toml"
    path.write_text(f'[notify]\nrunbook_url = "{value}"\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    [line] = str(caught.value).splitlines()
    assert line.startswith("notify.runbook_url: ") and "AUDITOR_NOTIFY__RUNBOOK_URL" in line, line


def test_runbook_url_without_placeholder_is_one_page_for_every_rule() -> None:
    assert Settings(**{"notify": {"runbook_url": "https://wiki.example.com/auditor"}}).notify.runbook_url
    assert Settings().notify.runbook_url == ""


RUNBOOK_ALERT = replace(DISK_1, runbook_url="https://wiki.example.com/runbooks/unprotected-disk",
                        disk_name="web-1", organization="acme")


def test_runbook_link_on_pagerduty_slack_teams_and_email() -> None:
    note = notification("ntf_rb", "ops", RUNBOOK_ALERT)
    url = RUNBOOK_ALERT.runbook_url
    pd = PagerDutyNotifier(kind="pagerduty", name="pd", routing_key=SecretStr("R" * 32))
    [event] = PAGERDUTY.build_payload(note, pd, now=NOW)
    assert {"href": url, "text": "Runbook: unprotected-disk"} in event["links"]
    details = event["payload"]["custom_details"]
    assert details["runbook_url"] == url and details["remediation"] == REMEDIATION["unprotected-disk"]
    assert details["disk_name"] == "web-1" and details["organization"] == "acme"

    slack = SlackNotifier(kind="slack", name="chat", webhook_url=SecretStr("https://hooks.slack.com/services/x"))
    [section] = [b for b in SLACK.build_payload(note, slack, now=NOW)["blocks"] if "accessory" in b]
    assert section["accessory"] == {"type": "button", "text": {"type": "plain_text", "text": "Runbook"},
                                    "url": url, "action_id": "runbook-0"}
    assert "*What to do:* " in section["text"]["text"]

    teams = TeamsNotifier(kind="teams", name="t", webhook_url=SecretStr("https://example.com/workflows/x"))
    card = TEAMS.build_payload(note, teams, now=NOW)["attachments"][0]["content"]
    actions = [a for item in card["body"] if item["type"] == "Container" for i in item["items"]
               if i["type"] == "ActionSet" for a in i["actions"]]
    assert {"type": "Action.OpenUrl", "title": "Runbook", "url": url} in actions
    facts = {f["title"]: f["value"] for item in card["body"] if item["type"] == "Container" for i in item["items"]
             if i["type"] == "FactSet" for f in i["facts"]}
    assert facts["Disk"] == "web-1 (dsk_1)" and facts["Organization"] == "acme"

    mail = EmailNotifier.model_validate({"kind": "email", "name": "m", "host": "smtp.example.com",
                                         "from": "a@example.com", "to": ["b@example.com"]})
    message = EMAIL.build_payload(note, mail, now=NOW)
    assert isinstance(message, EmailMessage)
    text = message.get_body(preferencelist=("plain",)).get_content()  # type: ignore[union-attr]
    assert f"  Runbook: {url}\n" in text and "  What to do: " in text and "  Organization: acme\n" in text
    html = message.get_body(preferencelist=("html",)).get_content()  # type: ignore[union-attr]
    assert f'<a href="{url}">' in html


def test_the_runbook_and_context_survive_the_outbox() -> None:
    note = notification("ntf_rb", "ops", RUNBOOK_ALERT)
    assert notification_from_dict(notification_to_dict(note)) == note
    # Entries queued before these fields existed still load.
    old = notification_to_dict(notification("ntf_old", "ops", DISK_1))
    assert notification_from_dict(old).alerts[0].runbook_url is None


# ---- whole seconds for people ------------------------------------------------------------------------------------


def test_human_channels_show_whole_seconds() -> None:
    started = datetime(2026, 11, 28, 5, 30, 15, 250_000, tzinfo=UTC)
    note = notification("ntf_s", "ops", replace(DISK_1, starts_at=started))
    slack = SlackNotifier(kind="slack", name="chat", webhook_url=SecretStr("https://hooks.slack.com/services/x"))
    teams = TeamsNotifier(kind="teams", name="t", webhook_url=SecretStr("https://example.com/workflows/x"))
    mail = EmailNotifier.model_validate({"kind": "email", "name": "m", "host": "smtp.example.com",
                                         "from": "a@example.com", "to": ["b@example.com"]})
    texts = [json_body(SLACK.build_payload(note, slack, now=NOW)).decode(),
             json_body(TEAMS.build_payload(note, teams, now=NOW)).decode(),
             str(EMAIL.build_payload(note, mail, now=NOW))]
    for text in texts:
        assert "2026-11-28T05:30:15Z" in text and "05:30:15.25" not in text
    # Machines keep the exact time (Alertmanager's startsAt, PagerDuty's timestamp).
    pd = PagerDutyNotifier(kind="pagerduty", name="pd", routing_key=SecretStr("R" * 32))
    assert PAGERDUTY.build_payload(note, pd, now=NOW)[0]["payload"]["timestamp"] == "2026-11-28T05:30:15.25Z"


# ---- PagerDuty's 512 KB ----------------------------------------------------------------------------------------


def _event_of(alert: Alert) -> dict[str, Any]:
    pd = PagerDutyNotifier(kind="pagerduty", name="pd", routing_key=SecretStr("R" * 32))
    [event] = PAGERDUTY.build_payload(notification("ntf_big", "ops", alert), pd, now=NOW)
    return event


@pytest.mark.parametrize("char", ["x", "é", "\u2603", "\n", '"'])
def test_pagerduty_events_stay_under_512_kb_clipped_with_a_note(char: str) -> None:
    big = replace(DISK_1, description=char * 600_000, status=AlertStatus.FIRING, severity=Severity.CRITICAL)
    event = _event_of(big)
    size = len(json_body(event))
    assert 500_000 < size <= 512_000, size  # 512 KB read as decimal: the stricter reading
    description = event["payload"]["custom_details"]["description"]
    assert description.startswith(char * 1000)
    assert re.search(r"\[clipped to fit PagerDuty's 512 KB event limit: \d+ of 600000 characters shown; ",
                     description), description[-200:]
    # A hostile disk name too: the longest text is clipped first, then the next while the event does not fit.
    both = _event_of(replace(big, disk_name="n" * 700_000))
    assert len(json_body(both)) <= 512_000
    details = both["payload"]["custom_details"]
    assert details["disk_name"].endswith("the full text is in the auditor]")
    assert details["description"].endswith("the full text is in the auditor]")


def test_a_pagerduty_event_that_fits_is_not_touched() -> None:
    event = _event_of(replace(DISK_1, description="d" * 400_000))
    assert event["payload"]["custom_details"]["description"] == "d" * 400_000
