"""The `teams` notifier: the exact Adaptive Card, delivery to a loopback receiver, retry classes, no leaked URL."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import notify_support
import pytest
from notify_support import DISK_1, NOW, STALE, notification
from pydantic import SecretStr
from receivers import HttpReceiver, Reply

from auditor.config import TeamsNotifier, load_settings
from auditor.domain.hints import REMEDIATION
from auditor.errors import ConfigError, NotifyError
from auditor.notify import NOTIFIERS, notifier_for
from auditor.notify.teams import NOTIFIER as TEAMS

SIG = "s1gN4tur3-0f-the-w0rkfl0w"
WORKFLOW_PATH = f"/workflows/abc123/triggers/manual/paths/invoke?api-version=2016-06-01&sig={SIG}"
SCHEMA = "http://adaptivecards.io/schemas/adaptive-card.json"

# dsk_2 without a description here, so that its card has no description block.
DISK_2 = replace(notify_support.DISK_2, description="")
FIRING = notification("ntf_01", "teams-ops", DISK_1, DISK_2)
RESOLVED = notification("ntf_02", "teams-ops", STALE)


def settings(url: str = f"https://prod-00.westeurope.logic.azure.com:443{WORKFLOW_PATH}", **kw: Any) -> TeamsNotifier:
    return TeamsNotifier(kind="teams", name="teams-ops", webhook_url=SecretStr(url), **kw)


def message(body: list[dict[str, Any]], actions: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "type": "message",
        "attachments": [
            {
                "contentType": "application/vnd.microsoft.card.adaptive",
                "contentUrl": None,
                "content": {
                    "type": "AdaptiveCard",
                    "$schema": SCHEMA,
                    "version": "1.4",
                    "msteams": {"width": "Full"},
                    "body": body,
                    "actions": actions,
                },
            }
        ],
    }


FOOTER = {
    "type": "TextBlock",
    "text": "Katapult backup auditor · notifier teams-ops · source=auditor",
    "size": "Small",
    "isSubtle": True,
    "separator": True,
    "wrap": True,
}


def literal(text: str, **style: Any) -> dict[str, Any]:
    # Data (summaries, descriptions, the headline) goes in TextRuns, which Teams shows as written: no markdown.
    return {"type": "RichTextBlock", "inlines": [{"type": "TextRun", "text": text, **style}]}


def title(text: str, color: str) -> dict[str, Any]:
    return literal(text, size="Large", weight="Bolder", color=color)


def heading(text: str, color: str) -> dict[str, Any]:
    return literal(text, weight="Bolder", color=color)


def facts(*pairs: tuple[str, str]) -> dict[str, Any]:
    return {"type": "FactSet", "facts": [{"title": t, "value": v} for t, v in pairs]}


def open_url(title_: str, url: str) -> dict[str, Any]:
    return {"type": "Action.OpenUrl", "title": title_, "url": url}


# ------------------------------------------------------------------------------------------------ payloads


def test_firing_card_exactly() -> None:
    payload = TEAMS.build_payload(FIRING, settings(), now=NOW)
    assert payload == message(
        [
            title("[FIRING:2] unprotected-disk", "Attention"),
            {
                "type": "Container",
                "separator": True,
                "items": [
                    heading("Disk dsk_1 has no backup policy", "Attention"),
                    facts(
                        ("Rule", "unprotected-disk"),
                        ("Severity", "critical"),
                        ("Disk", "dsk_1"),
                        ("Since", "2026-11-28T04:00:00Z"),
                    ),
                    literal("No backup policy covers disk dsk_1 (web-1).", isSubtle=True),
                    literal(f"What to do: {REMEDIATION['unprotected-disk']}"),
                ],
            },
            {
                "type": "Container",
                "separator": True,
                "items": [
                    heading("Disk dsk_2 has no backup policy", "Attention"),
                    facts(
                        ("Rule", "unprotected-disk"),
                        ("Severity", "high"),
                        ("Disk", "dsk_2"),
                        ("Since", "2026-11-28T05:30:15Z"),  # whole seconds (it started at 05:30:15.25)
                    ),
                    literal(f"What to do: {REMEDIATION['unprotected-disk']}"),
                ],
            },
            FOOTER,
        ],
        [],
    )
    # What goes on the wire is that payload as compact JSON.
    assert json.loads(json.dumps(payload)) == payload


def test_resolved_card_with_links_to_the_disk_page() -> None:
    linked = settings(external_url="https://auditor.example.com/")
    payload = TEAMS.build_payload(RESOLVED, linked, now=NOW)
    assert payload == message(
        [
            title("[RESOLVED] schedule-stale", "Good"),
            {
                "type": "Container",
                "separator": True,
                "items": [
                    heading("Resolved: Policy dbp_9 on dsk_3 missed its run", "Good"),
                    facts(
                        ("Rule", "schedule-stale"),
                        ("Severity", "medium"),
                        ("Disk", "dsk_3"),
                        ("Policy", "dbp_9"),
                        ("Resolved", "2026-11-28T07:00:00Z"),
                        ("Lasted", "3h 12m"),
                    ),
                    literal("next_invocation_at is 2h in the past.", isSubtle=True),
                    {"type": "ActionSet", "actions": [open_url("Open in the auditor", "https://auditor.example.com/disks/dsk_3")]},
                ],
            },
            FOOTER,
        ],
        [open_url("Open findings", "https://auditor.example.com/findings")],
    )


def test_disk_ids_are_quoted_in_links() -> None:
    linked = settings(external_url="https://a.example")
    odd = replace(FIRING, alerts=(replace(DISK_1, disk_id="dsk/1 ?x"),))
    card = TEAMS.build_payload(odd, linked, now=NOW)["attachments"][0]["content"]
    [action_set] = [i for i in card["body"][1]["items"] if i["type"] == "ActionSet"]
    assert action_set["actions"][0]["url"] == "https://a.example/disks/dsk%2F1%20%3Fx"


def test_static_labels_are_shown_in_the_footer() -> None:
    labelled = settings(labels={"team": "storage", "env": "prod"})
    body = TEAMS.build_payload(FIRING, labelled, now=NOW)["attachments"][0]["content"]["body"]
    assert body[-1]["text"] == "Katapult backup auditor · notifier teams-ops · env=prod, source=auditor, team=storage"


def test_test_notification_says_so_and_many_alerts_are_capped() -> None:
    alerts = tuple(replace(DISK_1, fingerprint=f"{i:016x}", disk_id=f"dsk_{i}") for i in range(23))
    card = TEAMS.build_payload(replace(FIRING, alerts=alerts, is_test=True), settings(), now=NOW)
    body = card["attachments"][0]["content"]["body"]
    assert body[0]["inlines"][0]["text"] == "[TEST] [FIRING:23] unprotected-disk"
    assert "no action is needed" in body[1]["text"]
    assert sum(1 for block in body if block["type"] == "Container") == 20
    assert body[-2]["text"] == "…and 3 more"


def test_registry_and_config_kind() -> None:
    assert NOTIFIERS["teams"] is TEAMS
    assert notifier_for(settings()) is TEAMS


def test_config_accepts_kind_teams(tmp_path: Path) -> None:
    cfg = tmp_path / "auditor.toml"
    cfg.write_text(
        '[[notifiers]]\nkind = "teams"\nname = "teams-ops"\nwebhook_url = "https://h.example/wf?sig=abc"\n'
    )
    [notifier] = load_settings(cfg).notifiers
    assert isinstance(notifier, TeamsNotifier)
    assert notifier.webhook_url.get_secret_value() == "https://h.example/wf?sig=abc"
    assert "sig=abc" not in repr(notifier)


def test_config_without_webhook_url_names_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "auditor.toml"
    cfg.write_text('[[notifiers]]\nkind = "teams"\nname = "teams-ops"\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(cfg)
    [line] = caught.value.problems
    assert line.startswith("notifiers[0].webhook_url: required value is missing"), line


# ------------------------------------------------------------------------------------------------ delivery


http_server = notify_support.http_server
receiver = notify_support.receiver
http = notify_support.http
debug_logs = notify_support.debug_logs


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        assert SIG not in text
        assert "abc123" not in text


async def test_delivers_the_card_to_a_loopback_receiver(
    receiver: HttpReceiver, http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.script(Reply(202, ""))
    result = await TEAMS.send(http, FIRING, settings(receiver.url + WORKFLOW_PATH), now=NOW)
    assert result.status_code == 202
    [request] = receiver.requests
    assert request.method == "POST"
    assert request.path == "/workflows/abc123/triggers/manual/paths/invoke"
    assert f"sig={SIG}" in request.query
    assert request.headers["content-type"] == "application/json"
    assert request.json() == TEAMS.build_payload(FIRING, settings(), now=NOW)
    assert_no_secret(result.detail, caplog.text)


def test_data_that_looks_like_markdown_is_shown_as_written() -> None:
    # A TextBlock would render a disk named like a markdown link as a link; data goes in TextRuns instead.
    sneaky = replace(DISK_1, summary="Disk [click me](https://evil.example) has **no** backup policy",
                     description="{{DATE(2017-02-14T06:00:00Z, SHORT)}} _x_")
    body = TEAMS.build_payload(replace(FIRING, alerts=(sneaky,)), settings(), now=NOW)["attachments"][0]["content"]
    container = body["body"][1]
    assert container["items"][0] == literal(sneaky.summary, weight="Bolder", color="Attention")
    assert container["items"][2] == literal(sneaky.description, isSubtle=True)
    text_blocks = [item for item in container["items"] if item["type"] == "TextBlock"]
    assert text_blocks == []


async def test_delivers_resolved_cards(receiver: HttpReceiver, http: httpx.AsyncClient) -> None:
    receiver.script(Reply(202, ""))
    await TEAMS.send(http, RESOLVED, settings(receiver.url + WORKFLOW_PATH), now=NOW)
    [request] = receiver.requests
    card = request.json()["attachments"][0]["content"]
    assert card["body"][0]["inlines"][0]["text"] == "[RESOLVED] schedule-stale"


def echo(url: str) -> str:
    return f"error posting to {url} (sig={SIG}) " + "x" * 300


@pytest.mark.parametrize(("status", "permanent"), [(500, False), (503, False), (429, False), (400, True), (404, True)])
async def test_retry_classification(
    status: int,
    permanent: bool,
    receiver: HttpReceiver,
    http: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = receiver.url + WORKFLOW_PATH
    receiver.script(Reply(status, echo(url), {"Retry-After": "7"}))
    with pytest.raises(NotifyError) as caught:
        await TEAMS.send(http, FIRING, settings(url), now=NOW)
    error = caught.value
    assert (error.permanent, error.status_code) == (permanent, status)
    assert error.retry_after == (None if permanent else 7.0)
    assert f"HTTP {status}" in str(error)
    assert "[redacted]" in str(error)
    assert_no_secret(str(error), caplog.text)


async def test_refused_connection_is_temporary_and_hides_the_url(
    http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    from receivers import free_port

    with pytest.raises(NotifyError) as caught:
        await TEAMS.send(http, FIRING, settings(f"http://127.0.0.1:{free_port()}{WORKFLOW_PATH}"), now=NOW)
    assert caught.value.permanent is False
    assert_no_secret(str(caught.value), caplog.text)
