"""Exact payloads of every notifier kind (pure builders, no I/O), and the registry."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from email.message import EmailMessage
from typing import Any, get_args

import pytest
from notify_support import DISK_1, DISK_2, NOW, STALE, notification
from pydantic import SecretStr

from auditor.config import (
    AlertmanagerNotifier,
    EmailNotifier,
    NotifierCommon,
    NotifierSettings,
    PagerDutyNotifier,
    SlackNotifier,
    WebhookNotifier,
)
from auditor.domain.alerts import AUDIT_INCOMPLETE, Alert, AlertStatus
from auditor.domain.hints import REMEDIATION
from auditor.domain.models import Severity
from auditor.domain.retry import parse_retry_after
from auditor.errors import ConfigError
from auditor.notify import NOTIFIERS, notifier_for
from auditor.notify.alertmanager import NOTIFIER as ALERTMANAGER
from auditor.notify.alertmanager import alerts_url
from auditor.notify.base import headline, rfc3339, scrub, url_secrets
from auditor.notify.email import NOTIFIER as EMAIL
from auditor.notify.pagerduty import NOTIFIER as PAGERDUTY
from auditor.notify.slack import NOTIFIER as SLACK
from auditor.notify.slack import escape
from auditor.notify.webhook import NOTIFIER as WEBHOOK
from auditor.notify.webhook import sign
from auditor.vocabulary import format_duration

TEST_NOTE = "This is a test notification from the Katapult backup auditor; no action is needed."

INCOMPLETE = Alert(
    fingerprint="7777000088889999",
    rule=AUDIT_INCOMPLETE,
    severity=Severity.HIGH,
    status=AlertStatus.FIRING,
    summary="Audit incomplete: 3 of 40 disks could not be read",
    description="Katapult answered 503 for 3 disks.",
    starts_at=datetime(2026, 11, 28, 6, 45, tzinfo=UTC),
)

FIRING = notification("ntf_01", "ops", DISK_1, DISK_2)
RESOLVED = notification("ntf_02", "ops", STALE)


def webhook_settings(**kw: Any) -> WebhookNotifier:
    return WebhookNotifier(kind="webhook", name="ops", url=SecretStr("https://hooks.example.com/h/s3cr3t-path"), **kw)


def am_settings(**kw: Any) -> AlertmanagerNotifier:
    return AlertmanagerNotifier(kind="alertmanager", name="am", url=SecretStr("http://alertmanager:9093"), **kw)


def pd_settings(**kw: Any) -> PagerDutyNotifier:
    return PagerDutyNotifier(
        kind="pagerduty", name="pd", routing_key=SecretStr("R0UTINGKEY0123456789abcdef012345"), **kw
    )


def slack_settings(**kw: Any) -> SlackNotifier:
    return SlackNotifier(
        kind="slack", name="chat", webhook_url=SecretStr("https://hooks.slack.com/services/T0/B0/XXXXXXXXXXXX"), **kw
    )


def email_settings(**kw: Any) -> EmailNotifier:
    return EmailNotifier.model_validate(
        {
            "kind": "email",
            "name": "mail",
            "host": "smtp.example.com",
            "from": "Auditor <auditor@example.com>",
            "to": ["ops@example.com", "dba@example.com"],
            **kw,
        }
    )


# ------------------------------------------------------------------------------------------ shared helpers


def test_rfc3339_is_utc_with_z_and_only_needed_fractions() -> None:
    assert rfc3339(NOW) == "2026-11-28T07:00:00Z"
    assert rfc3339(DISK_2.starts_at) == "2026-11-28T05:30:15.25Z"
    plus_two = datetime(2026, 11, 28, 9, 0, tzinfo=UTC).astimezone(timezone(timedelta(hours=2)))
    assert rfc3339(plus_two) == "2026-11-28T09:00:00Z"


@pytest.mark.parametrize(
    ("delta", "text"),
    [
        (timedelta(0), "0s"),
        (timedelta(seconds=45), "45s"),
        (timedelta(minutes=12), "12m"),
        (timedelta(hours=3, minutes=12, seconds=40), "3h 12m"),
        (timedelta(hours=3), "3h"),
        (timedelta(days=2, hours=5, minutes=1), "2d 5h"),
        (timedelta(seconds=-5), "0s"),
    ],
)
def test_lasted(delta: timedelta, text: str) -> None:
    assert format_duration(delta, style="alert") == text


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, None),
        ("", None),
        ("120", 120.0),
        (" 7 ", 7.0),
        ("1.5", 1.5),
        ("-3", None),  # not a delay: the caller waits as it would without one
        ("Sat, 28 Nov 2026 07:01:30 GMT", 90.0),
        ("Sat, 28 Nov 2026 06:00:00 GMT", 0.0),
        ("soon", None),
        ("nan", None),
    ],
)
def test_parse_retry_after(value: str | None, seconds: float | None) -> None:
    assert parse_retry_after(value, now=NOW) == seconds


def test_scrub_removes_url_parts_longest_first() -> None:
    url = "https://user:pa55word@hooks.example.com/services/T0/B0/XXXXXXXXXXXX?token=abcdef123"
    text = f"bad {url} path /services/T0/B0/XXXXXXXXXXXX seg XXXXXXXXXXXX q abcdef123 pw pa55word"
    out = scrub(text, url_secrets(url))
    for secret in ("XXXXXXXXXXXX", "abcdef123", "pa55word", "hooks.example.com/services"):
        assert secret not in out
    assert out.startswith("bad [redacted]")


def test_headline_follows_alertmanager_default_title() -> None:
    assert headline(FIRING) == "[FIRING:2] unprotected-disk"
    assert headline(RESOLVED) == "[RESOLVED] schedule-stale"
    grouped = replace(FIRING, group_labels={"severity": "high", "alertname": "unprotected-disk", "disk_id": "dsk_1"})
    assert headline(grouped) == "[FIRING:2] unprotected-disk dsk_1 high"
    ungrouped = replace(FIRING, group_labels={}, alerts=(DISK_1, STALE))
    assert headline(ungrouped) == "[FIRING:1] schedule-stale unprotected-disk"
    assert headline(replace(FIRING, is_test=True)) == "[TEST] [FIRING:2] unprotected-disk"


# ------------------------------------------------------------------------------------------------- webhook


def test_webhook_firing_payload_is_alertmanager_v4() -> None:
    assert WEBHOOK.build_payload(FIRING, webhook_settings(), now=NOW) == {
        "version": "4",
        "groupKey": '{}:{alertname="unprotected-disk"}',
        "truncatedAlerts": 0,
        "status": "firing",
        "receiver": "ops",
        "groupLabels": {"alertname": "unprotected-disk"},
        "commonLabels": {"alertname": "unprotected-disk", "source": "auditor"},
        "commonAnnotations": {"remediation": REMEDIATION["unprotected-disk"]},
        "externalURL": "",
        "alerts": [
            {
                "status": "firing",
                "labels": {
                    "alertname": "unprotected-disk",
                    "disk_id": "dsk_1",
                    "severity": "critical",
                    "fingerprint": "1111aaaa2222bbbb", "source": "auditor",
                },
                "annotations": {
                    "summary": "Disk dsk_1 has no backup policy",
                    "description": "No backup policy covers disk dsk_1 (web-1).",
                    "remediation": REMEDIATION["unprotected-disk"],
                },
                "startsAt": "2026-11-28T04:00:00Z",
                "endsAt": "0001-01-01T00:00:00Z",
                "generatorURL": "",
                "fingerprint": "1111aaaa2222bbbb",
            },
            {
                "status": "firing",
                "labels": {
                    "alertname": "unprotected-disk",
                    "disk_id": "dsk_2",
                    "severity": "high",
                    "fingerprint": "3333cccc4444dddd", "source": "auditor",
                },
                "annotations": {
                    "summary": "Disk dsk_2 has no backup policy",
                    "description": "No backup policy covers disk dsk_2 (db-1).",
                    "remediation": REMEDIATION["unprotected-disk"],
                },
                "startsAt": "2026-11-28T05:30:15.25Z",
                "endsAt": "0001-01-01T00:00:00Z",
                "generatorURL": "",
                "fingerprint": "3333cccc4444dddd",
            },
        ],
    }


def test_webhook_resolved_payload_carries_end_time_and_common_annotations() -> None:
    payload = WEBHOOK.build_payload(RESOLVED, webhook_settings(), now=NOW)
    assert payload["status"] == "resolved"
    assert payload["commonLabels"] == {
        "alertname": "schedule-stale",
        "disk_id": "dsk_3",
        "policy_id": "dbp_9",
        "severity": "medium",
        "fingerprint": "5555eeee6666ffff", "source": "auditor",
    }
    assert payload["commonAnnotations"] == {
        "summary": "Policy dbp_9 on dsk_3 missed its run",
        "description": "next_invocation_at is 2h in the past.",
        "remediation": REMEDIATION["schedule-stale"],
    }
    assert payload["alerts"][0]["status"] == "resolved"
    assert payload["alerts"][0]["endsAt"] == "2026-11-28T07:00:00Z"


def test_webhook_mixed_group_is_firing_and_resolved_alert_without_end_uses_now() -> None:
    open_ended = replace(STALE, ends_at=None, rule="unprotected-disk")
    payload = WEBHOOK.build_payload(replace(FIRING, alerts=(DISK_1, open_ended)), webhook_settings(), now=NOW)
    assert payload["status"] == "firing"
    assert [a["endsAt"] for a in payload["alerts"]] == ["0001-01-01T00:00:00Z", "2026-11-28T07:00:00Z"]


def test_webhook_audit_incomplete_drops_empty_labels() -> None:
    note = replace(FIRING, alerts=(INCOMPLETE,), group_labels={"alertname": AUDIT_INCOMPLETE})
    labels = WEBHOOK.build_payload(note, webhook_settings(), now=NOW)["alerts"][0]["labels"]
    assert labels == {"alertname": "audit-incomplete", "severity": "high", "fingerprint": "7777000088889999",
                      "source": "auditor"}


def test_webhook_test_notification_is_labelled_as_test() -> None:
    payload = WEBHOOK.build_payload(replace(FIRING, is_test=True), webhook_settings(), now=NOW)
    assert payload["commonLabels"] == {"alertname": "unprotected-disk", "source": "auditor", "test": "true"}
    assert payload["commonAnnotations"] == {"test": TEST_NOTE, "remediation": REMEDIATION["unprotected-disk"]}
    for alert in payload["alerts"]:
        assert alert["labels"]["test"] == "true"
        assert alert["annotations"]["test"] == TEST_NOTE


def test_webhook_payload_is_deterministic_json() -> None:
    first = json.dumps(WEBHOOK.build_payload(FIRING, webhook_settings(), now=NOW))
    assert first == json.dumps(WEBHOOK.build_payload(FIRING, webhook_settings(), now=NOW))


def test_sign_is_hmac_sha256_hex() -> None:
    # Independent reference: HMAC-SHA256("key", "The quick brown fox jumps over the lazy dog") from RFC 4231-style
    # published vectors (Wikipedia's HMAC article).
    assert sign(b"The quick brown fox jumps over the lazy dog", "key") == (
        "sha256=f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"
    )


# -------------------------------------------------------------------------------------------- alertmanager


def test_alertmanager_payload_is_postable_alerts() -> None:
    note = replace(FIRING, alerts=(DISK_1, STALE))
    assert ALERTMANAGER.build_payload(note, am_settings(), now=NOW) == [
        {
            "labels": {
                "alertname": "unprotected-disk",
                "disk_id": "dsk_1",
                "severity": "critical",
                "fingerprint": "1111aaaa2222bbbb", "source": "auditor",
            },
            "annotations": {
                "summary": "Disk dsk_1 has no backup policy",
                "description": "No backup policy covers disk dsk_1 (web-1).",
                "remediation": REMEDIATION["unprotected-disk"],
            },
            "startsAt": "2026-11-28T04:00:00Z",
            # default repeat_interval 4h: kept alive for 3 x 4h
            "endsAt": "2026-11-28T19:00:00Z",
            "generatorURL": "",
        },
        {
            "labels": {
                "alertname": "schedule-stale",
                "disk_id": "dsk_3",
                "policy_id": "dbp_9",
                "severity": "medium",
                "fingerprint": "5555eeee6666ffff", "source": "auditor",
            },
            "annotations": {
                "summary": "Policy dbp_9 on dsk_3 missed its run",
                "description": "next_invocation_at is 2h in the past.",
                "remediation": REMEDIATION["schedule-stale"],
            },
            "startsAt": "2026-11-28T03:48:00Z",
            "endsAt": "2026-11-28T07:00:00Z",
            "generatorURL": "",
        },
    ]


@pytest.mark.parametrize(
    ("repeat", "ends"),
    [
        (timedelta(0), "2026-11-28T08:00:00Z"),
        (timedelta(minutes=10), "2026-11-28T08:00:00Z"),
        (timedelta(minutes=20), "2026-11-28T08:00:00Z"),
        (timedelta(hours=1), "2026-11-28T10:00:00Z"),
    ],
)
def test_alertmanager_firing_lifetime_is_three_repeats_at_least_an_hour(repeat: timedelta, ends: str) -> None:
    payload = ALERTMANAGER.build_payload(FIRING, am_settings(repeat_interval=repeat), now=NOW)
    assert payload[0]["endsAt"] == ends


def test_alertmanager_test_alerts_carry_test_label() -> None:
    payload = ALERTMANAGER.build_payload(replace(FIRING, is_test=True), am_settings(), now=NOW)
    assert payload[0]["labels"]["test"] == "true"
    assert payload[0]["annotations"]["test"] == TEST_NOTE


@pytest.mark.parametrize(
    "base", ["http://am:9093", "http://am:9093/", "http://am:9093/api/v2/alerts", "http://am:9093/api/v2/alerts/"]
)
def test_alerts_url(base: str) -> None:
    assert alerts_url(base) == "http://am:9093/api/v2/alerts"


def test_alerts_url_keeps_a_path_prefix_credentials_and_query() -> None:
    assert alerts_url("https://gw.example.com/alertmanager") == "https://gw.example.com/alertmanager/api/v2/alerts"
    assert (
        alerts_url("https://u:p@gw.example.com/am/?token=abc")
        == "https://u:p@gw.example.com/am/api/v2/alerts?token=abc"
    )


# ----------------------------------------------------------------------------------------------- pagerduty


def test_pagerduty_one_event_per_alert() -> None:
    note = replace(FIRING, alerts=(DISK_1, STALE))
    assert PAGERDUTY.build_payload(note, pd_settings(), now=NOW) == [
        {
            "routing_key": "R0UTINGKEY0123456789abcdef012345",
            "event_action": "trigger",
            "dedup_key": "1111aaaa2222bbbb",
            "payload": {
                "summary": "Disk dsk_1 has no backup policy",
                "source": "dsk_1",
                "severity": "critical",
                "timestamp": "2026-11-28T04:00:00Z",
                "component": "dsk_1",
                "group": "unprotected-disk",
                "class": "unprotected-disk",
                "custom_details": {
                    "rule": "unprotected-disk",
                    "severity": "critical",
                    "description": "No backup policy covers disk dsk_1 (web-1).",
                    "fingerprint": "1111aaaa2222bbbb", "source": "auditor",
                    "starts_at": "2026-11-28T04:00:00Z",
                    "disk_id": "dsk_1",
                    "remediation": REMEDIATION["unprotected-disk"],
                },
            },
        },
        {
            "routing_key": "R0UTINGKEY0123456789abcdef012345",
            "event_action": "resolve",
            "dedup_key": "5555eeee6666ffff",
        },
    ]


@pytest.mark.parametrize(
    ("severity", "pd"),
    [(Severity.CRITICAL, "critical"), (Severity.HIGH, "error"), (Severity.MEDIUM, "warning"), (Severity.LOW, "info")],
)
def test_pagerduty_severity_mapping(severity: Severity, pd: str) -> None:
    note = replace(FIRING, alerts=(replace(DISK_1, severity=severity),))
    assert PAGERDUTY.build_payload(note, pd_settings(), now=NOW)[0]["payload"]["severity"] == pd


def test_pagerduty_audit_incomplete_uses_auditor_as_source() -> None:
    event = PAGERDUTY.build_payload(replace(FIRING, alerts=(INCOMPLETE,)), pd_settings(), now=NOW)[0]
    assert event["payload"]["source"] == "katapult-backup-auditor"
    assert "component" not in event["payload"]
    assert event["payload"]["group"] == event["payload"]["class"] == "audit-incomplete"
    assert event["payload"]["custom_details"] == {
        "rule": "audit-incomplete",
        "severity": "high",
        "description": "Katapult answered 503 for 3 disks.",
        "fingerprint": "7777000088889999", "source": "auditor",
        "starts_at": "2026-11-28T06:45:00Z",
        "remediation": REMEDIATION["audit-incomplete"],
    }


def test_pagerduty_summary_is_at_most_1024_chars() -> None:
    long = replace(DISK_1, summary="x" * 2000)
    summary = PAGERDUTY.build_payload(replace(FIRING, alerts=(long,)), pd_settings(), now=NOW)[0]["payload"]["summary"]
    assert len(summary) == 1024
    assert summary.endswith("…")
    exact = replace(DISK_1, summary="y" * 1024)
    summary = PAGERDUTY.build_payload(replace(FIRING, alerts=(exact,)), pd_settings(), now=NOW)[0]["payload"]["summary"]
    assert summary == "y" * 1024


def test_pagerduty_test_event_is_marked() -> None:
    event = PAGERDUTY.build_payload(replace(FIRING, is_test=True), pd_settings(), now=NOW)[0]
    assert event["payload"]["summary"] == "[TEST] Disk dsk_1 has no backup policy"
    assert event["payload"]["custom_details"]["test"] is True


# --------------------------------------------------------------------------------------------------- slack


def test_slack_firing_message() -> None:
    assert SLACK.build_payload(FIRING, slack_settings(), now=NOW) == {
        "text": "[FIRING:2] unprotected-disk: Disk dsk_1 has no backup policy; Disk dsk_2 has no backup policy",
        "blocks": [
            {"type": "header", "text": {"type": "plain_text", "text": "[FIRING:2] unprotected-disk", "emoji": True}},
            {
                "type": "section",
                "text": {
                    "type": "mrkdwn",
                    "text": ":red_circle: *Disk dsk_1 has no backup policy*\n"
                    "`unprotected-disk` · critical · disk `dsk_1`\n"
                    "No backup policy covers disk dsk_1 (web-1).\n"
                    f"*What to do:* {escape(REMEDIATION['unprotected-disk'])}\n"
                    "Since 2026-11-28T04:00:00Z",
                },
            },
            {
                "type": "section",
                "text": {
                    "type": "mrkdwn",
                    "text": ":red_circle: *Disk dsk_2 has no backup policy*\n"
                    "`unprotected-disk` · high · disk `dsk_2`\n"
                    "No backup policy covers disk dsk_2 (db-1).\n"
                    f"*What to do:* {escape(REMEDIATION['unprotected-disk'])}\n"
                    "Since 2026-11-28T05:30:15Z",  # whole seconds for people (the alert started at 05:30:15.25)
                },
            },
            {"type": "context",
             "elements": [{"type": "mrkdwn", "text": "Katapult backup auditor · notifier chat · source=auditor"}]},
        ],
    }


def test_slack_resolved_message_says_how_long_it_lasted() -> None:
    payload = SLACK.build_payload(RESOLVED, slack_settings(), now=NOW)
    assert payload["blocks"][0]["text"]["text"] == "[RESOLVED] schedule-stale"
    assert payload["blocks"][1]["text"]["text"] == (
        ":large_green_circle: *Resolved:* Policy dbp_9 on dsk_3 missed its run\n"
        "`schedule-stale` · medium · disk `dsk_3` · policy `dbp_9`\n"
        "next_invocation_at is 2h in the past.\n"
        "Lasted 3h 12m (until 2026-11-28T07:00:00Z)"
    )


def test_slack_caps_sections_at_20_then_and_n_more() -> None:
    alerts = tuple(replace(DISK_1, fingerprint=f"{i:016x}", summary=f"alert {i}") for i in range(23))
    payload = SLACK.build_payload(replace(FIRING, alerts=alerts), slack_settings(), now=NOW)
    sections = [b for b in payload["blocks"] if b["type"] == "section"]
    assert len(sections) == 21
    assert sections[-1]["text"]["text"] == "…and 3 more"
    assert len(payload["blocks"]) <= 50
    assert payload["text"].endswith("alert 4; and 18 more")


def test_slack_escapes_mrkdwn_and_clips_header() -> None:
    nasty = replace(DISK_1, summary="<!channel> & <http://evil|click>", description="a < b")
    long_group = {"alertname": "unprotected-disk", "disk_id": "d" * 200}
    payload = SLACK.build_payload(replace(FIRING, alerts=(nasty,), group_labels=long_group), slack_settings(), now=NOW)
    section = payload["blocks"][1]["text"]["text"]
    assert "<!channel>" not in section and "<http" not in section
    assert "&lt;!channel&gt; &amp; &lt;http://evil|click&gt;" in section
    assert "a &lt; b" in section
    assert "<!channel>" not in payload["text"]
    assert len(payload["blocks"][0]["text"]["text"]) == 150


def test_slack_test_message_says_so() -> None:
    payload = SLACK.build_payload(replace(FIRING, is_test=True), slack_settings(), now=NOW)
    assert payload["blocks"][0]["text"]["text"].startswith("[TEST] ")
    assert payload["blocks"][1]["text"]["text"] == f":test_tube: {TEST_NOTE}"


# --------------------------------------------------------------------------------------------------- email


def test_email_headers_and_parts() -> None:
    message = EMAIL.build_payload(
        replace(FIRING, alerts=(DISK_1, DISK_2, replace(DISK_1, fingerprint="f3"))), email_settings(), now=NOW
    )
    assert isinstance(message, EmailMessage)
    assert message["Subject"] == "[FIRING:3] unprotected-disk (auditor)"
    assert message["From"] == "Auditor <auditor@example.com>"
    assert message["To"] == "ops@example.com, dba@example.com"
    assert message["Date"] == "Sat, 28 Nov 2026 07:00:00 +0000"
    assert message["Message-ID"] == "<ntf_01@example.com>"
    assert message["Auto-Submitted"] == "auto-generated"
    assert message.get_content_type() == "multipart/alternative"
    plain = message.get_body(("plain",))
    rich = message.get_body(("html",))
    assert plain is not None and rich is not None
    text = plain.get_content()
    assert text.startswith("[FIRING:3] unprotected-disk\n\n[FIRING] Disk dsk_1 has no backup policy\n")
    assert "  Disk: dsk_2\n" in text
    assert "  Since 2026-11-28T04:00:00Z\n" in text
    assert "<h2>[FIRING:3] unprotected-disk</h2>" in rich.get_content()


def test_email_resolved_subject_and_duration() -> None:
    message = EMAIL.build_payload(RESOLVED, email_settings(), now=NOW)
    assert message["Subject"] == "[RESOLVED] schedule-stale (auditor)"
    body = message.get_body(("plain",))
    assert body is not None
    assert "  Lasted 3h 12m (2026-11-28T03:48:00Z to 2026-11-28T07:00:00Z)\n" in body.get_content()


def test_email_html_escapes_every_value() -> None:
    nasty = replace(
        DISK_1,
        summary="<script>alert(1)</script>",
        description='"quoted" & <b>bold</b>',
        disk_id="dsk_<i>",
        policy_id="p'1",
    )
    message = EMAIL.build_payload(
        replace(FIRING, alerts=(nasty,), group_labels={"alertname": "<x>"}), email_settings(), now=NOW
    )
    rich = message.get_body(("html",))
    assert rich is not None
    html = rich.get_content()
    for raw in ("<script>", "<b>bold", "<i>", "p'1", "<x>", '"quoted"'):
        assert raw not in html
    for escaped in ("&lt;script&gt;", "&lt;b&gt;bold", "dsk_&lt;i&gt;", "p&#x27;1", "&lt;x&gt;", "&quot;quoted&quot;"):
        assert escaped in html


def test_email_subject_never_carries_line_breaks() -> None:
    note = replace(FIRING, group_labels={"alertname": "unprotected-disk", "disk_id": "dsk\r\nBcc: x@evil"})
    assert EMAIL.build_payload(note, email_settings(), now=NOW)["Subject"] == (
        "[FIRING:2] unprotected-disk dsk Bcc: x@evil (auditor)"
    )


def test_email_test_notification_is_marked() -> None:
    message = EMAIL.build_payload(replace(FIRING, is_test=True), email_settings(), now=NOW)
    assert message["Subject"] == "[TEST] [FIRING:2] unprotected-disk (auditor)"
    body = message.get_body(("plain",))
    assert body is not None and TEST_NOTE in body.get_content()


# ------------------------------------------------------------------------------------------------ registry


def test_registry_covers_every_configurable_kind() -> None:
    union = get_args(NotifierSettings)[0]
    kinds = {get_args(model.model_fields["kind"].annotation)[0] for model in get_args(union)}
    assert set(NOTIFIERS) == kinds
    for kind, notifier in NOTIFIERS.items():
        assert notifier.kind == kind


@pytest.mark.parametrize(
    "settings", [webhook_settings(), am_settings(), pd_settings(), slack_settings(), email_settings()]
)
def test_notifier_for_picks_by_kind(settings: Any) -> None:
    assert notifier_for(settings) is NOTIFIERS[settings.kind]


def test_notifier_for_unknown_kind_names_it() -> None:
    class Odd(NotifierCommon):
        kind: str = "carrier-pigeon"

    with pytest.raises(ConfigError, match="carrier-pigeon"):
        notifier_for(Odd(name="coo"))
