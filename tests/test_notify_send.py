"""Every notifier against a real loopback receiver: what arrives, the status matrix, and that no secret leaks."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import replace
from typing import Any

import httpx
import notify_support
import pytest
from notify_support import ALERT, NOTE, NOW
from pydantic import SecretStr
from receivers import HttpReceiver, Reply, SmtpReceiver, free_port

from auditor.config import (
    AlertmanagerNotifier,
    EmailNotifier,
    NotifierCommon,
    PagerDutyNotifier,
    SlackNotifier,
    TeamsNotifier,
    WebhookNotifier,
)
from auditor.domain.alerts import AlertStatus, Notification
from auditor.errors import NotifyError
from auditor.notify import NOTIFIERS, DeliveryResult, notifier_for

HOOK_TOKEN = "hk9Qw2Zr7Xp4Lm8Vt3Nb"
HMAC_SECRET = "hmac-Sh4red-S3cret"
ROUTING_KEY = "R0UTINGKEYa1b2c3d4e5f6a7b8c9d0e1"
SLACK_TOKEN = "xS1ackT0kenAbCdEfGhIjKl"
TEAMS_SIG = "tEaMsW0rkfl0wS1gnature"
AM_TOKEN = "amPr0xyT0ken9876"
SMTP_PASSWORD = "sm7p-Pa55word-xyz"
HTTP_KINDS = ("webhook", "alertmanager", "pagerduty", "slack", "teams")

THREE = replace(
    NOTE,
    alerts=(
        ALERT,
        replace(ALERT, fingerprint="3333cccc4444dddd", disk_id="dsk_2"),
        replace(ALERT, fingerprint="5555eeee6666ffff", status=AlertStatus.RESOLVED, ends_at=NOW),
    ),
)


def http_settings(kind: str, base: str, **kw: Any) -> Any:
    """Returns settings of `kind` pointing at `base`, each carrying its secret in the usual place."""
    if kind == "webhook":
        return WebhookNotifier(
            kind="webhook",
            name="hook",
            url=SecretStr(f"{base}/hooks/{HOOK_TOKEN}"),
            secret=SecretStr(HMAC_SECRET),
            **kw,
        )
    if kind == "alertmanager":
        return AlertmanagerNotifier(kind="alertmanager", name="am", url=SecretStr(f"{base}/am?token={AM_TOKEN}"), **kw)
    if kind == "pagerduty":
        return PagerDutyNotifier(
            kind="pagerduty", name="pd", routing_key=SecretStr(ROUTING_KEY), events_url=f"{base}/v2/enqueue", **kw
        )
    if kind == "teams":
        return TeamsNotifier(
            kind="teams", name="teams", webhook_url=SecretStr(f"{base}/workflows/w1/invoke?sig={TEAMS_SIG}"), **kw
        )
    return SlackNotifier(
        kind="slack", name="chat", webhook_url=SecretStr(f"{base}/services/T000/B000/{SLACK_TOKEN}"), **kw
    )


def email_settings(port: int, **kw: Any) -> EmailNotifier:
    data = {
        "kind": "email",
        "name": "mail",
        "host": "127.0.0.1",
        "port": port,
        "from": "Auditor <auditor@example.com>",
        "to": ["ops@example.com", "dba@example.com"],
        "security": "none",
        "timeout_seconds": 5,
    }
    return EmailNotifier.model_validate({**data, **kw})


SECRETS = (HOOK_TOKEN, HMAC_SECRET, ROUTING_KEY, SLACK_TOKEN, AM_TOKEN, SMTP_PASSWORD)


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text


KIND_SECRETS = {
    "webhook": (HOOK_TOKEN, HMAC_SECRET),
    "alertmanager": (AM_TOKEN,),
    "pagerduty": (ROUTING_KEY,),
    "slack": (SLACK_TOKEN,),
    "teams": (TEAMS_SIG,),
}


def echo_body(kind: str, base: str) -> str:
    """Returns an error body quoting the notifier's secrets (and its whole URL) back, as careless receivers do."""
    settings = http_settings(kind, base)
    url = getattr(settings, "url", None) or getattr(settings, "webhook_url", None)
    quoted = [url.get_secret_value()] if url is not None else []
    return "error: bad request to " + " ".join([*quoted, *KIND_SECRETS[kind]]) + " " + "x" * 500


async def send(kind: str, http: httpx.AsyncClient, settings: NotifierCommon, note: Notification = NOTE) -> Any:
    return await NOTIFIERS[kind].send(http, note, settings, now=NOW)


http_server = notify_support.http_server
receiver = notify_support.receiver
smtp_server = notify_support.smtp_server
smtp = notify_support.smtp
http = notify_support.http
debug_logs = notify_support.debug_logs


# ------------------------------------------------------------------------------------------ what arrives


async def test_webhook_sends_signed_alertmanager_payload(receiver: HttpReceiver, http: httpx.AsyncClient) -> None:
    settings = http_settings("webhook", receiver.url)
    result = await send("webhook", http, settings, THREE)
    assert result == DeliveryResult(status_code=200, detail="webhook notifier 'hook': HTTP 200, 3 alert(s)")
    [request] = receiver.requests
    assert (request.method, request.path) == ("POST", f"/hooks/{HOOK_TOKEN}")
    assert request.headers["content-type"] == "application/json"
    assert request.headers["idempotency-key"] == "ntf_0001"
    expected = "sha256=" + hmac.new(HMAC_SECRET.encode(), request.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(request.headers["x-auditor-signature"], expected)
    assert request.json() == NOTIFIERS["webhook"].build_payload(THREE, settings, now=NOW)
    assert request.json()["version"] == "4"


async def test_webhook_without_secret_is_unsigned(receiver: HttpReceiver, http: httpx.AsyncClient) -> None:
    settings = WebhookNotifier(kind="webhook", name="hook", url=SecretStr(f"{receiver.url}/plain"))
    await send("webhook", http, settings)
    [request] = receiver.requests
    assert "x-auditor-signature" not in request.headers
    assert request.headers["idempotency-key"] == "ntf_0001"


async def test_webhook_signature_changes_with_body(receiver: HttpReceiver, http: httpx.AsyncClient) -> None:
    settings = http_settings("webhook", receiver.url)
    await send("webhook", http, settings, NOTE)
    await send("webhook", http, settings, THREE)
    first, second = receiver.requests
    assert first.headers["x-auditor-signature"] != second.headers["x-auditor-signature"]


async def test_alertmanager_posts_to_api_v2_alerts(receiver: HttpReceiver, http: httpx.AsyncClient) -> None:
    settings = http_settings("alertmanager", receiver.url)
    result = await send("alertmanager", http, settings, THREE)
    assert result.status_code == 200
    [request] = receiver.requests
    assert (request.method, request.path, request.query) == ("POST", "/am/api/v2/alerts", f"token={AM_TOKEN}")
    body = request.json()
    assert body == NOTIFIERS["alertmanager"].build_payload(THREE, settings, now=NOW)
    assert [a["endsAt"] for a in body] == ["2026-11-28T19:00:00Z", "2026-11-28T19:00:00Z", "2026-11-28T07:00:00Z"]


async def test_pagerduty_posts_one_event_per_alert_in_order(receiver: HttpReceiver, http: httpx.AsyncClient) -> None:
    receiver.script(*[Reply(202, '{"status":"success","message":"Event processed"}')] * 3)
    settings = http_settings("pagerduty", receiver.url)
    result = await send("pagerduty", http, settings, THREE)
    assert result == DeliveryResult(status_code=202, detail="pagerduty notifier 'pd': 3 event(s) accepted (HTTP 202)")
    assert [r.path for r in receiver.requests] == ["/v2/enqueue"] * 3
    events = [r.json() for r in receiver.requests]
    assert [(e["event_action"], e["dedup_key"]) for e in events] == [
        ("trigger", "1111aaaa2222bbbb"),
        ("trigger", "3333cccc4444dddd"),
        ("resolve", "5555eeee6666ffff"),
    ]
    assert events == NOTIFIERS["pagerduty"].build_payload(THREE, settings, now=NOW)
    assert all(e["routing_key"] == ROUTING_KEY for e in events)


async def test_pagerduty_stops_at_the_first_failure(receiver: HttpReceiver, http: httpx.AsyncClient) -> None:
    receiver.script(Reply(202), Reply(503, echo_body("pagerduty", receiver.url)), Reply(202))
    with pytest.raises(NotifyError) as caught:
        await send("pagerduty", http, http_settings("pagerduty", receiver.url), THREE)
    assert len(receiver.requests) == 2
    assert caught.value.permanent is False
    assert caught.value.status_code == 503
    assert "(event 2 of 3)" in str(caught.value)
    assert_no_secret(str(caught.value))


async def test_slack_posts_blocks(receiver: HttpReceiver, http: httpx.AsyncClient) -> None:
    settings = http_settings("slack", receiver.url)
    result = await send("slack", http, settings)
    assert result.status_code == 200
    [request] = receiver.requests
    assert request.path == f"/services/T000/B000/{SLACK_TOKEN}"
    assert request.json() == NOTIFIERS["slack"].build_payload(NOTE, settings, now=NOW)


async def test_non_ascii_text_arrives_intact(receiver: HttpReceiver, http: httpx.AsyncClient) -> None:
    note = replace(NOTE, alerts=(replace(ALERT, summary="Disque « dsk_1 » sans sauvegarde — ☂"),))
    await send("webhook", http, http_settings("webhook", receiver.url), note)
    assert receiver.requests[0].json()["alerts"][0]["annotations"]["summary"] == "Disque « dsk_1 » sans sauvegarde — ☂"


# ----------------------------------------------------------------------------------------- status matrix


@pytest.mark.parametrize("kind", HTTP_KINDS)
@pytest.mark.parametrize("status", [200, 201, 202, 204])
async def test_2xx_is_delivered(kind: str, status: int, receiver: HttpReceiver, http: httpx.AsyncClient) -> None:
    receiver.script(Reply(status))
    result = await send(kind, http, http_settings(kind, receiver.url))
    assert result.status_code == status
    assert_no_secret(result.detail)


@pytest.mark.parametrize("kind", HTTP_KINDS)
@pytest.mark.parametrize(
    ("status", "headers", "retry_after"),
    [
        (429, {}, None),
        (429, {"Retry-After": "17"}, 17.0),
        (429, {"Retry-After": "Sat, 28 Nov 2026 07:02:00 GMT"}, 120.0),
        (500, {}, None),
        (502, {}, None),
        (503, {"Retry-After": "5"}, 5.0),
        (504, {}, None),
    ],
)
async def test_429_and_5xx_are_temporary(
    kind: str,
    status: int,
    headers: dict[str, str],
    retry_after: float | None,
    receiver: HttpReceiver,
    http: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    receiver.script(Reply(status, echo_body(kind, receiver.url), headers))
    settings = http_settings(kind, receiver.url)
    with pytest.raises(NotifyError) as caught:
        await send(kind, http, settings)
    error = caught.value
    assert (error.permanent, error.status_code, error.retry_after) == (False, status, retry_after)
    assert str(error).startswith(f"{kind} notifier {settings.name!r}: HTTP {status}")
    assert "[redacted]" in str(error)
    assert len(str(error)) < 320  # the body is cut to ~200 characters
    assert_no_secret(str(error), caplog.text)


@pytest.mark.parametrize("kind", HTTP_KINDS)
@pytest.mark.parametrize("status", [301, 400, 401, 403, 404, 410, 413, 422])
async def test_other_4xx_are_permanent(
    kind: str, status: int, receiver: HttpReceiver, http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.script(Reply(status, echo_body(kind, receiver.url), {"Retry-After": "30"}))
    with pytest.raises(NotifyError) as caught:
        await send(kind, http, http_settings(kind, receiver.url))
    error = caught.value
    assert (error.permanent, error.status_code, error.retry_after) == (True, status, None)
    assert f"HTTP {status}" in str(error)
    assert_no_secret(str(error), caplog.text)


@pytest.mark.parametrize("kind", HTTP_KINDS)
async def test_timeout_is_temporary(
    kind: str, receiver: HttpReceiver, http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.script(Reply(200, delay=5.0))
    settings = http_settings(kind, receiver.url, timeout_seconds=0.2)
    with pytest.raises(NotifyError) as caught:
        await send(kind, http, settings)
    assert caught.value.permanent is False
    assert caught.value.status_code is None
    assert "timed out after 0.2s" in str(caught.value)
    assert_no_secret(str(caught.value), caplog.text)


@pytest.mark.parametrize("kind", HTTP_KINDS)
async def test_connection_refused_is_temporary(
    kind: str, http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    settings = http_settings(kind, f"http://127.0.0.1:{free_port()}")
    with pytest.raises(NotifyError) as caught:
        await send(kind, http, settings)
    assert caught.value.permanent is False
    assert "ConnectError" in str(caught.value)
    assert_no_secret(str(caught.value), caplog.text)


async def test_unsupported_scheme_is_permanent(http: httpx.AsyncClient) -> None:
    settings = SlackNotifier(kind="slack", name="chat", webhook_url=SecretStr(f"ftp://hooks.example.com/{SLACK_TOKEN}"))
    with pytest.raises(NotifyError) as caught:
        await send("slack", http, settings)
    assert caught.value.permanent is True
    assert_no_secret(str(caught.value))


async def test_secret_in_settings_repr_is_masked() -> None:
    # The delivery stage may log settings objects; SecretStr keeps their repr clean.
    for kind in HTTP_KINDS:
        assert_no_secret(repr(http_settings(kind, "http://127.0.0.1:1")), str(http_settings(kind, "http://x")))


# --------------------------------------------------------------------------------------------------- email


async def test_email_is_delivered(smtp: SmtpReceiver, http: httpx.AsyncClient) -> None:
    settings = email_settings(smtp.port)
    result = await notifier_for(settings).send(http, THREE, settings, now=NOW)
    assert result.status_code is None
    assert result.detail.startswith("email notifier 'mail': accepted for 2 of 2 recipient(s)")
    [mail] = smtp.messages
    assert mail.mail_from == "auditor@example.com"
    assert mail.rcpt_tos == ["ops@example.com", "dba@example.com"]
    message = mail.message
    assert message["Subject"] == "[FIRING:2] unprotected-disk (auditor)"
    assert message["Message-ID"] == "<ntf_0001@example.com>"
    assert message.get_content_type() == "multipart/alternative"
    plain, rich = message.get_body(("plain",)), message.get_body(("html",))
    assert plain is not None and "Disk dsk_1 has no backup policy" in plain.get_content()
    assert rich is not None and "<h2>[FIRING:2] unprotected-disk</h2>" in rich.get_content()


async def test_email_authenticates_when_configured(
    smtp: SmtpReceiver, http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    smtp.handler.credentials = ("auditor", SMTP_PASSWORD)
    settings = email_settings(smtp.port, username="auditor", password=SMTP_PASSWORD)
    result = await notifier_for(settings).send(http, NOTE, settings, now=NOW)
    assert [m.login for m in smtp.messages] == ["auditor"]
    assert_no_secret(result.detail, caplog.text)


async def test_email_bad_password_is_permanent_and_not_shown(
    smtp: SmtpReceiver, http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    smtp.handler.credentials = ("auditor", "the-right-one")
    settings = email_settings(smtp.port, username="auditor", password=SMTP_PASSWORD)
    with pytest.raises(NotifyError) as caught:
        await notifier_for(settings).send(http, NOTE, settings, now=NOW)
    # aiosmtplib tries each mechanism the server offers (PLAIN, then LOGIN) before giving up.
    assert set(smtp.handler.auth_attempts) == {("auditor", SMTP_PASSWORD)}
    assert (caught.value.permanent, caught.value.status_code) == (True, 535)
    assert smtp.messages == []
    assert_no_secret(str(caught.value), caplog.text)


@pytest.mark.parametrize(
    ("reply", "permanent", "code"),
    [("451 4.3.0 Try again later", False, 451), ("554 5.7.1 Message rejected", True, 554)],
)
async def test_email_data_reply_maps_by_code(
    reply: str, permanent: bool, code: int, smtp: SmtpReceiver, http: httpx.AsyncClient
) -> None:
    smtp.handler.data_replies.append(reply)
    settings = email_settings(smtp.port)
    with pytest.raises(NotifyError) as caught:
        await notifier_for(settings).send(http, NOTE, settings, now=NOW)
    assert (caught.value.permanent, caught.value.status_code) == (permanent, code)
    assert f"SMTP {code}" in str(caught.value)


@pytest.mark.parametrize(("reply", "permanent"), [("550 5.1.1 No such user", True), ("450 4.2.1 Mailbox busy", False)])
async def test_email_refused_recipients(
    reply: str, permanent: bool, smtp: SmtpReceiver, http: httpx.AsyncClient
) -> None:
    smtp.handler.rcpt_reply = reply
    settings = email_settings(smtp.port)
    with pytest.raises(NotifyError) as caught:
        await notifier_for(settings).send(http, NOTE, settings, now=NOW)
    assert caught.value.permanent is permanent
    assert "recipient" in str(caught.value)


async def test_email_timeout_is_temporary(smtp: SmtpReceiver, http: httpx.AsyncClient) -> None:
    smtp.handler.data_delay = 5.0
    settings = email_settings(smtp.port, timeout_seconds=0.3)
    with pytest.raises(NotifyError) as caught:
        await notifier_for(settings).send(http, NOTE, settings, now=NOW)
    assert caught.value.permanent is False
    assert "timed out" in str(caught.value)


async def test_email_connection_refused_is_temporary(http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture) -> None:
    settings = email_settings(free_port(), username="auditor", password=SMTP_PASSWORD)
    with pytest.raises(NotifyError) as caught:
        await notifier_for(settings).send(http, NOTE, settings, now=NOW)
    assert caught.value.permanent is False
    assert_no_secret(str(caught.value), caplog.text)


async def test_email_starttls_required_but_not_offered_is_permanent(
    smtp: SmtpReceiver, http: httpx.AsyncClient
) -> None:
    settings = email_settings(smtp.port, security="starttls", username="auditor", password=SMTP_PASSWORD)
    with pytest.raises(NotifyError) as caught:
        await notifier_for(settings).send(http, NOTE, settings, now=NOW)
    assert caught.value.permanent is True
    assert smtp.handler.auth_attempts == []  # never authenticates in the clear when TLS was asked for
    assert_no_secret(str(caught.value))


async def test_email_implicit_tls_against_plain_server_is_temporary(
    smtp: SmtpReceiver, http: httpx.AsyncClient
) -> None:
    settings = email_settings(smtp.port, security="tls", timeout_seconds=2)
    with pytest.raises(NotifyError) as caught:
        await notifier_for(settings).send(http, NOTE, settings, now=NOW)
    assert caught.value.permanent is False
    assert smtp.messages == []


def test_http_kinds_and_email_are_the_whole_registry() -> None:
    assert set(NOTIFIERS) == {*HTTP_KINDS, "email"}
