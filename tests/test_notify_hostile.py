"""Notifiers against hostile receivers and hostile input: absurd Retry-After values, receivers that echo requests
(credentials and all) back in their error bodies, huge bodies, and exceptions nobody mapped. A send raises
NotifyError and nothing else, no form of a secret reaches a message, a result or a log record, and no wait
overflows a datetime."""

from __future__ import annotations

import base64
import io
import json
import logging
from dataclasses import dataclass, field, replace
from datetime import timedelta
from functools import partial
from typing import Any

import httpx
import notify_support
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from notify_support import ALERT, NOTE, NOW
from profiles import examples
from pydantic import SecretStr
from receivers import HttpReceiver, Reply, SmtpReceiver, free_port

from auditor.config import (
    AlertmanagerNotifier,
    EmailNotifier,
    NotifierCommon,
    PagerDutyNotifier,
    SlackNotifier,
    WebhookNotifier,
)
from auditor.domain.alerts import Notification
from auditor.domain.retry import RETRY_AFTER_CEILING, clamp_retry_after, parse_retry_after
from auditor.domain.retry import backoff as shared_backoff
from auditor.errors import NotifyError
from auditor.log import JsonFormatter, SecretScrubber, secret_forms
from auditor.notify import NOTIFIERS
from auditor.notify.base import MAX_BODY_BYTES, excerpt, url_secrets
from auditor.notify.dispatch import Dispatcher
from auditor.notify.policy import BACKOFF_BASE, BACKOFF_CAP

backoff = partial(shared_backoff, base=BACKOFF_BASE, cap=BACKOFF_CAP)  # the delivery stage's

HOUR = timedelta(hours=1)

# Credentials in a notifier URL, percent-encoded as a URL needs them; chosen so that the Basic auth token httpx
# builds from them contains "/" (which JSON encoders may escape as "\/").
USER, RAW_USER = "ops@acme", "ops%40acme"
PASSWORD, RAW_PASSWORD = "pa:ss/w0rd??", "pa%3Ass%2Fw0rd%3F%3F"
USERINFO = f"{RAW_USER}:{RAW_PASSWORD}"
BASIC = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
PATH_TOKEN = "T0kenPathSegment9"
QUERY_TOKEN = "q-T0ken-5ecret"
ROUTING_KEY = "R0UTINGKEYa1b2c3d4e5f6a7b8c9d0e1"
HMAC_SECRET = "hmac-Sh4red-S3cret"
HOOK_URL = f"http://{USERINFO}@hooks.test/hook/{PATH_TOKEN}?token={QUERY_TOKEN}"
FORMS = (
    HOOK_URL,
    USER,
    RAW_USER,
    PASSWORD,
    RAW_PASSWORD,
    USERINFO,
    f"{USER}:{PASSWORD}",
    BASIC,
    f"Basic {BASIC}",
    PATH_TOKEN,
    QUERY_TOKEN,
    ROUTING_KEY,
    HMAC_SECRET,
)
assert "/" in BASIC

HTTP_KINDS = ("webhook", "alertmanager", "pagerduty", "slack")


def credential_settings(kind: str) -> Any:
    """Returns settings of `kind` whose URL carries user, password and a token (PagerDuty: its events_url)."""
    if kind == "webhook":
        return WebhookNotifier(kind="webhook", name="hook", url=SecretStr(HOOK_URL), secret=SecretStr(HMAC_SECRET))
    if kind == "alertmanager":
        url = f"http://{USERINFO}@am.test/am?token={QUERY_TOKEN}"
        return AlertmanagerNotifier(kind="alertmanager", name="am", url=SecretStr(url))
    if kind == "pagerduty":
        url = f"http://{USERINFO}@pd.test/v2/enqueue?token={QUERY_TOKEN}"
        return PagerDutyNotifier(kind="pagerduty", name="pd", routing_key=SecretStr(ROUTING_KEY), events_url=url)
    url = f"http://{USERINFO}@slack.test/services/T0/B0/{PATH_TOKEN}"
    return SlackNotifier(kind="slack", name="chat", webhook_url=SecretStr(url))


def assert_no_form(*texts: str, forms: tuple[str, ...] = FORMS) -> None:
    for text in texts:
        for form in forms:
            for variant in (form, form.replace("/", "\\/")):
                assert variant not in text, f"{variant!r} leaked in {text[:400]!r}"


@dataclass
class EchoApp:
    """An ASGI receiver that answers `status` and quotes the request (line and headers) back in the body, as
    plain text or as JSON with "/" escaped (PHP's json_encode); `crash` makes it raise instead."""

    status: int = 500
    is_json: bool = False
    crash: type[Exception] | None = None
    body: str | None = None
    headers: list[dict[str, str]] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        chunks = []
        while True:
            event = await receive()
            chunks.append(event.get("body", b""))
            if not event.get("more_body"):
                break
        # Credentials first, so they fall inside any excerpt rather than being cut off after it.
        pairs = sorted(scope["headers"], key=lambda kv: kv[0] != b"authorization")
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in pairs}
        self.headers.append(headers)
        self.bodies.append(b"".join(chunks))
        target = f"{scope['path']}?{scope['query_string'].decode('latin-1')}"
        if self.crash is not None:
            raise self.crash(f"connection reset while answering {target} for {headers.get('authorization')}")
        if self.body is not None:
            text = self.body
        elif self.is_json:
            text = json.dumps({"error": "boom", "target": target, "headers": headers}).replace("/", "\\/")
        else:
            text = f"boom: {scope['method']} {target}\n" + "\n".join(f"{k}: {v}" for k, v in headers.items())
        await send({"type": "http.response.start", "status": self.status,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
        await send({"type": "http.response.body", "body": text.encode()})


debug_logs = notify_support.debug_logs
http_server = notify_support.http_server
receiver = notify_support.receiver
smtp_server = notify_support.smtp_server
smtp = notify_support.smtp


async def dispatch(app: Any, settings: NotifierCommon, note: Notification = NOTE) -> Any:
    async with Dispatcher(transport=httpx.ASGITransport(app=app)) as dispatcher:
        return await dispatcher.send(note, settings, now=NOW)


# ------------------------------------------------------------------------------------------- Retry-After


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("1e12", RETRY_AFTER_CEILING),
        ("99999999999999999999", RETRY_AFTER_CEILING),
        ("9" * 400, RETRY_AFTER_CEILING),  # float() says inf
        ("1e308", RETRY_AFTER_CEILING),
        ("-5", None),
        ("-1e400", None),
        ("nan", None),
        ("inf", None),
        ("-Infinity", None),
        ("1_000", None),  # float() reads these, but they are no number on the wire
        ("\u0663", None),
        ("garbage", None),
        ("\x00", None),
        ("Fri, 31 Dec 9999 23:59:59 GMT", RETRY_AFTER_CEILING),
        ("Fri, 31 Dec 9999 23:59:59 -2359", RETRY_AFTER_CEILING),
        ("Mon, 01 Jan 0001 00:00:00 GMT", 0.0),
        ("Sat, 01 Jan 0001 00:00:00 +2359", 0.0),
        ("Mon, 01 Jan 99999999999999999999 00:00:00 GMT", None),
        ("Mon, 01 Jan 2026 00:00:00 +99999999999999999999", None),
        ("Sat, 28 Nov 2026 07:00:30 GMT", 30.0),
    ],
)
def test_parse_retry_after_is_finite_and_bounded_for_hostile_values(value: str, seconds: float | None) -> None:
    assert parse_retry_after(value, now=NOW) == seconds


RETRY_AFTER_TEXT = st.one_of(
    st.text(max_size=60),
    st.from_regex(r"[+-]?\d{0,40}(\.\d{0,6})?([eE][+-]?\d{1,6})?", fullmatch=True),
    st.builds(
        "{}, {:02d} {} {} {:02d}:00:00 {}".format,
        st.sampled_from(["Mon", "Sat", "Foo"]),
        st.integers(0, 40),
        st.sampled_from(["Jan", "Dec", "Xyz"]),
        st.integers(0, 10**25),
        st.integers(0, 99),
        st.sampled_from(["GMT", "-0000", "+2359", "-2359", "+9999", "+99999999999999999999", ""]),
    ),
)


@settings(max_examples=examples(300), deadline=None)
@given(value=RETRY_AFTER_TEXT, attempt=st.integers(-5, 10**12))
def test_any_retry_after_gives_a_wait_that_fits_a_datetime(value: str, attempt: int) -> None:
    seconds = parse_retry_after(value, now=NOW)
    assert seconds is None or 0.0 <= seconds <= RETRY_AFTER_CEILING
    wait = backoff(attempt, retry_after=seconds, max_retry_after=HOUR)
    assert 0.0 <= wait <= 3600.0
    assert NOW + timedelta(seconds=wait) >= NOW


@pytest.mark.parametrize("retry_after", [1e12, 1e20, 1e308, float("inf"), float("-inf"), float("nan"), -5.0, 2.0**31])
@pytest.mark.parametrize("attempt", [1, 10, 10**9])
def test_backoff_never_overflows_for_hostile_retry_after(retry_after: float, attempt: int) -> None:
    for maximum in (HOUR, timedelta(minutes=5), timedelta(0), timedelta(days=-1)):
        wait = backoff(attempt, retry_after=retry_after, max_retry_after=maximum, random=lambda: 1.0)
        assert 0.0 <= wait <= max(900.0, maximum.total_seconds())
        NOW + timedelta(seconds=wait)  # must not raise OverflowError


def test_backoff_honours_retry_after_up_to_the_maximum() -> None:
    assert backoff(1, retry_after=7200.0, max_retry_after=HOUR, random=lambda: 0.0) == 3600.0
    assert backoff(1, retry_after=120.0, max_retry_after=HOUR, random=lambda: 0.0) == 120.0
    assert backoff(1, retry_after=7200.0, max_retry_after=timedelta(hours=3), random=lambda: 0.0) == 7200.0
    assert backoff(1, retry_after=7200.0, random=lambda: 0.0) == 7200.0  # no maximum: only the parser's ceiling


@pytest.mark.parametrize(
    ("seconds", "clamped"),
    [(None, None), (float("nan"), None), (-1.0, 0.0), (0.0, 0.0), (59.5, 59.5), (3600.0, 3600.0), (1e300, 3600.0),
     (float("inf"), 3600.0), (float("-inf"), 0.0)],
)
def test_clamp_retry_after(seconds: float | None, clamped: float | None) -> None:
    assert clamp_retry_after(seconds, maximum=HOUR) == clamped
    assert clamp_retry_after(5.0, maximum=timedelta(seconds=-1)) == 0.0


@pytest.mark.parametrize("header", ["99999999999999999999", "Fri, 31 Dec 9999 23:59:59 GMT", "1e12"])
async def test_absurd_retry_after_from_a_receiver_waits_at_most_the_maximum(
    header: str, receiver: HttpReceiver
) -> None:
    receiver.script(Reply(429, "slow down", {"Retry-After": header}))
    settings = WebhookNotifier(kind="webhook", name="hook", url=SecretStr(f"{receiver.url}/hook"))
    async with httpx.AsyncClient(trust_env=False) as http:
        with pytest.raises(NotifyError) as caught:
            await NOTIFIERS["webhook"].send(http, NOTE, settings, now=NOW)
    assert caught.value.retry_after == RETRY_AFTER_CEILING
    wait = backoff(1, retry_after=caught.value.retry_after, max_retry_after=HOUR, random=lambda: 0.0)
    assert wait == 3600.0
    assert NOW + timedelta(seconds=wait) == NOW + HOUR


# ------------------------------------------------------------------------------- credentials in URLs


def test_url_secret_forms_cover_every_wire_form_of_the_userinfo() -> None:
    forms = url_secrets(HOOK_URL)
    for form in (*FORMS[:11], "pa%3Ass%2Fw0rd%3F%3F", BASIC.replace("/", "\\/")):
        assert form in forms
    assert forms == secret_forms(HOOK_URL)  # one definition, shared with the log scrubber


def test_short_user_names_are_skipped_but_never_passwords_or_tokens() -> None:
    forms = secret_forms("https://ab:x9@hooks.example.com/hook")
    assert "ab" not in forms  # would shred every "ab" in a log line
    assert "x9" in forms
    assert base64.b64encode(b"ab:x9").decode() in forms
    # A URL whose user name is the token (https://TOKEN@host) scrubs it, and what httpx sends for it ("TOKEN:").
    forms = secret_forms("https://tok3n-as-user@hooks.example.com/")
    assert "tok3n-as-user" in forms and base64.b64encode(b"tok3n-as-user:").decode() in forms


def test_plain_secrets_and_host_less_urls_are_taken_whole() -> None:
    assert secret_forms("hunter2-token") == ["hunter2-token"]
    assert secret_forms("") == []
    assert all(form.startswith("sqlite:") for form in secret_forms("sqlite:////var/lib/auditor/auditor.db"))


def test_excerpt_scrubs_every_form() -> None:
    text = " | ".join(
        [*FORMS, json.dumps({"authorization": f"Basic {BASIC}"}).replace("/", "\\/"), "pa%3ass%2fw0rd"]
    )
    out = excerpt(text, url_secrets(HOOK_URL) + secret_forms(ROUTING_KEY) + secret_forms(HMAC_SECRET))
    assert "[redacted]" in out
    assert_no_form(out)


@pytest.mark.parametrize("is_json", [False, True], ids=["text", "json"])
@pytest.mark.parametrize("kind", HTTP_KINDS)
async def test_receiver_echoing_request_headers_leaks_no_credential(
    kind: str, is_json: bool, caplog: pytest.LogCaptureFixture
) -> None:
    app = EchoApp(500, is_json=is_json)
    with pytest.raises(NotifyError) as caught:
        await dispatch(app, credential_settings(kind))
    # httpx did put the credentials on the wire, and the receiver did quote them back.
    assert app.headers[0]["authorization"] == f"Basic {BASIC}"
    error = caught.value
    assert (error.permanent, error.status_code) == (False, 500)
    assert "[redacted]" in str(error)
    assert_no_form(str(error), caplog.text)


async def test_receiver_cutting_its_echo_at_our_read_limit_leaks_no_partial_secret() -> None:
    # The body is read up to MAX_BODY_BYTES only; that cut may fall inside a quoted secret, whose first part
    # would then be no secret anyone could match.
    body = " " * (MAX_BODY_BYTES - 30) + f"Authorization: Basic {BASIC} url {HOOK_URL}"
    with pytest.raises(NotifyError) as caught:
        await dispatch(EchoApp(500, body=body), credential_settings("webhook"))
    message = str(caught.value)
    for form in FORMS:
        for start in range(max(len(form) - 5, 1)):
            assert form[start:start + 6] not in message, message


async def test_huge_error_body_is_cut_and_scrubbed() -> None:
    body = f"{QUERY_TOKEN} " + "x" * 2_000_000 + f" {QUERY_TOKEN}"
    with pytest.raises(NotifyError) as caught:
        await dispatch(EchoApp(503, body=body), credential_settings("alertmanager"))
    assert len(str(caught.value)) < 320
    assert str(caught.value).startswith("alertmanager notifier 'am': HTTP 503: [redacted] xxx")
    assert_no_form(str(caught.value))


SMTP_USER, SMTP_PASSWORD = "ops", "pw4!"  # a short password is still a password
SMTP_FORMS = (
    SMTP_PASSWORD,
    base64.b64encode(SMTP_PASSWORD.encode()).decode(),
    base64.b64encode(f"\0{SMTP_USER}\0{SMTP_PASSWORD}".encode()).decode(),
)


def email_settings(port: int) -> EmailNotifier:
    return EmailNotifier.model_validate({
        "kind": "email", "name": "mail", "host": "127.0.0.1", "port": port, "from": "auditor@example.com",
        "to": ["ops@example.com"], "security": "none", "timeout_seconds": 5, "username": SMTP_USER,
        "password": SMTP_PASSWORD,
    })


async def test_smtp_reply_quoting_a_short_password_is_scrubbed_in_the_result(
    smtp: SmtpReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    smtp.handler.credentials = (SMTP_USER, SMTP_PASSWORD)
    smtp.handler.data_replies.append("250 2.0.0 queued; you said " + " ".join(SMTP_FORMS))
    result = await dispatch(EchoApp(), email_settings(smtp.port))
    assert "[redacted]" in result.detail
    assert_no_form(result.detail, caplog.text, forms=SMTP_FORMS)


async def test_smtp_error_quoting_a_short_password_is_scrubbed(
    smtp: SmtpReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    smtp.handler.credentials = (SMTP_USER, SMTP_PASSWORD)
    smtp.handler.data_replies.append("554 5.7.1 rejected, password " + " ".join(SMTP_FORMS))
    with pytest.raises(NotifyError) as caught:
        await dispatch(EchoApp(), email_settings(smtp.port))
    assert (caught.value.permanent, caught.value.status_code) == (True, 554)
    assert_no_form(str(caught.value), caplog.text, forms=SMTP_FORMS)


# ---------------------------------------------------------------------------------------- log scrubbing


def test_log_scrubber_masks_every_form_in_message_exception_and_extras() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(SecretScrubber([HOOK_URL, ROUTING_KEY, HMAC_SECRET]))
    log = logging.getLogger("tests.notify_hostile.scrubber")
    log.propagate = False
    log.addHandler(handler)
    try:
        log.warning("receiver said %s and %s:%s", f"Authorization: Basic {BASIC}", USER, PASSWORD,
                    extra={"detail": f"query {QUERY_TOKEN} path /hook/{PATH_TOKEN}"})
        escaped = json.dumps(BASIC).replace("/", "\\/")
        try:
            raise RuntimeError(f"echo {RAW_USER}:{RAW_PASSWORD} {escaped}")
        except RuntimeError:
            log.exception("failed with %s", HOOK_URL)
    finally:
        log.removeHandler(handler)
    out = stream.getvalue()
    assert out.count("***") >= 6
    assert_no_form(out)


# ------------------------------------------------------------------------- only NotifyError leaves a send


async def test_payload_that_cannot_be_sent_is_a_permanent_notify_error(caplog: pytest.LogCaptureFixture) -> None:
    app = EchoApp(200)
    # A header value httpx cannot encode (ours, but a bug) raises UnicodeEncodeError while building the request.
    with pytest.raises(NotifyError) as caught:
        await dispatch(app, credential_settings("webhook"), replace(NOTE, id="ntf_\u2602"))
    assert caught.value.permanent is True
    assert "UnicodeEncodeError" in str(caught.value)
    assert app.headers == []
    assert_no_form(str(caught.value), caplog.text)


async def test_email_payload_bug_is_a_permanent_notify_error(caplog: pytest.LogCaptureFixture) -> None:
    # A line break in a header value makes the email package refuse to build the message (a ValueError).
    with pytest.raises(NotifyError) as caught:
        await dispatch(EchoApp(), email_settings(free_port()), replace(NOTE, id="ntf_1\r\nBcc: x@example.com"))
    assert caught.value.permanent is True
    assert_no_form(str(caught.value), caplog.text, forms=SMTP_FORMS)


async def test_unmapped_transport_exception_is_a_temporary_scrubbed_notify_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # ASGITransport re-raises what the app raised as it is: an OSError no notifier maps.
    app = EchoApp(crash=ConnectionResetError)
    with pytest.raises(NotifyError) as caught:
        await dispatch(app, credential_settings("webhook"))
    assert caught.value.permanent is False
    assert "ConnectionResetError" in str(caught.value) and "[redacted]" in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert_no_form(str(caught.value), caplog.text)


async def test_unexpected_error_in_a_payload_builder_is_permanent() -> None:
    unknown = NotifierCommon(name="odd")  # no kind: nothing can build its payload
    with pytest.raises(NotifyError) as caught:
        await dispatch(EchoApp(), unknown)
    assert caught.value.permanent is True
    assert "odd" in str(caught.value)


async def test_lone_surrogate_in_alert_text_is_delivered_as_replacement_character() -> None:
    app = EchoApp(200)
    note = replace(NOTE, alerts=(replace(ALERT, summary="disk \ud800 name"),))
    result = await dispatch(app, credential_settings("webhook"), note)
    assert result.status_code == 200
    [body] = app.bodies
    assert json.loads(body.decode("utf-8"))["alerts"][0]["annotations"]["summary"] == "disk \ufffd name"
