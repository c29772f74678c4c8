"""The notifier contract, its result type, and the helpers every channel shares (times, HTTP, secret scrubbing).

A notifier does one attempt and nothing else: build the payload (a pure function of the notification, its
settings and `now`), make one HTTP request (or one SMTP session), and either return a `DeliveryResult` or raise
`NotifyError`. Retry, dedup, grouping and repeat live once, in the delivery stage.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import Any, Protocol, TypeAlias, TypeVar
from urllib.parse import quote

import httpx
from pydantic import SecretStr

from auditor.config import NotifierCommon
from auditor.domain.alerts import Alert, AlertStatus, Notification
from auditor.domain.retry import parse_retry_after
from auditor.errors import NotifyError
from auditor.log import redact, secret_forms

logger = logging.getLogger(__name__)

Payload: TypeAlias = dict[str, Any] | list[dict[str, Any]] | EmailMessage
SettingsT_contra = TypeVar("SettingsT_contra", bound=NotifierCommon, contravariant=True)

# Alertmanager's webhook sends Go's zero time as the endsAt of an alert that is still firing.
ZERO_TIME = "0001-01-01T00:00:00Z"
TEST_LABEL = "test"
# Every alert names where it came from, so a shared Alertmanager can route the auditor's alerts as one source.
SOURCE_LABEL = "source"
SOURCE_VALUE = "auditor"
TEST_ANNOTATION = "This is a test notification from the Katapult backup auditor; no action is needed."
BODY_EXCERPT_CHARS = 200
# Only this much of a response body is read: an excerpt needs a few hundred characters, and a hostile or broken
# receiver must not make us hold megabytes.
MAX_BODY_BYTES = 64 * 1024
REDACTED = "[redacted]"


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    """One successful attempt: the final HTTP status (None for SMTP) and a detail safe to store and show."""

    status_code: int | None
    detail: str


class Notifier(Protocol[SettingsT_contra]):
    """One channel kind: a pure payload builder and a single-attempt sender."""

    kind: str

    def build_payload(self, notification: Notification, settings: SettingsT_contra, *, now: datetime) -> Payload:
        """Returns exactly what `send` puts on the wire (JSON body, list of bodies, or an email)."""
        ...

    async def send(
        self, http: httpx.AsyncClient, notification: Notification, settings: SettingsT_contra, *, now: datetime
    ) -> DeliveryResult:
        """Delivers the notification in one attempt; raises NotifyError (with `permanent`) on failure."""
        ...


def rfc3339(value: datetime) -> str:
    """Returns `value` as RFC 3339 UTC with a Z suffix (naive times are taken as UTC), fractions only if set."""
    utc = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    text = utc.strftime("%Y-%m-%dT%H:%M:%S")
    if utc.microsecond:
        text += f".{utc.microsecond:06d}".rstrip("0")
    return text + "Z"


def human_time(value: datetime) -> str:
    """Returns a time as people read it in chat and mail: RFC 3339 UTC in whole seconds (fractions dropped)."""
    return rfc3339(value.replace(microsecond=0))


def headline(notification: Notification) -> str:
    """Returns Alertmanager's default title: "[FIRING:3] unprotected-disk" or "[RESOLVED] …", "[TEST] " first."""
    firing = sum(1 for a in notification.alerts if a.status is AlertStatus.FIRING)
    state = f"FIRING:{firing}" if firing else "RESOLVED"
    # Alertmanager's SortedPairs: alertname first, the other labels by name.
    pairs = sorted(notification.group_labels.items(), key=lambda kv: (kv[0] != "alertname", kv[0]))
    what = " ".join(v for _, v in pairs if v)
    if not what:
        what = " ".join(sorted({a.rule for a in notification.alerts})) or "no alerts"
    return ("[TEST] " if notification.is_test else "") + f"[{state}] {what}"


def json_body(payload: Any) -> bytes:
    """Returns the compact UTF-8 JSON bytes that are sent (and, for the webhook, signed)."""
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate (JSON from the API may carry "\ud800" in a name) cannot be UTF-8: send U+FFFD instead
        # of failing the notification on every attempt.
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode("utf-8")


def severity_value(alert: Alert, settings: NotifierCommon | None) -> str:
    """Returns the severity label value sent for the alert: the notifier's `severity_map` entry, else ours."""
    if settings is None:
        return alert.severity.value
    mapped = next((v for k, v in settings.severity_map.items() if k == alert.severity.value), None)
    return mapped or alert.severity.value


def alert_labels(alert: Alert, *, is_test: bool, settings: NotifierCommon | None = None) -> dict[str, str]:
    """Returns the alert's Alertmanager labels without empty values (Alertmanager drops them): the notifier's
    static labels, ours (severity mapped), source="auditor", and test="true" on tests."""
    labels = dict(settings.labels) if settings is not None else {}
    # Config validation keeps static labels off our names, so ours never lose to them.
    labels.update({k: v for k, v in alert.labels().items() if v})
    labels["severity"] = severity_value(alert, settings)
    labels[SOURCE_LABEL] = SOURCE_VALUE
    if is_test:
        labels[TEST_LABEL] = "true"
    return labels


def static_labels(settings: NotifierCommon) -> dict[str, str]:
    """Returns the labels a notifier adds to every alert, source="auditor" included (for channels that show them)."""
    return {**settings.labels, SOURCE_LABEL: SOURCE_VALUE}


def generator_url(alert: Alert, settings: NotifierCommon) -> str:
    """Returns the alert's link into the auditor's dashboard: the disk's page, or the runs page for alerts
    without a disk (audit-incomplete); "" when the notifier has no external_url."""
    base = settings.external_url
    if not base:
        return ""
    if alert.disk_id:
        return f"{base}/disks/{quote(alert.disk_id, safe='')}"
    return f"{base}/runs"


def alert_annotations(alert: Alert, *, is_test: bool) -> dict[str, str]:
    """Returns the alert's Alertmanager annotations, plus a `test` annotation on test notifications."""
    annotations = dict(alert.annotations())
    if is_test:
        annotations[TEST_LABEL] = TEST_ANNOTATION
    return annotations


def common_items(mappings: Iterable[Mapping[str, str]]) -> dict[str, str]:
    """Returns the key/value pairs every mapping shares (empty when there are none)."""
    common: dict[str, str] | None = None
    for mapping in mappings:
        if common is None:
            common = dict(mapping)
        else:
            common = {k: v for k, v in common.items() if mapping.get(k) == v}
    return common or {}


def url_secrets(url: str) -> list[str]:
    """Returns every form of a secret-bearing URL that must never be shown (see `auditor.log.secret_forms`)."""
    return secret_forms(url)


def settings_secrets(settings: NotifierCommon) -> list[str]:
    """Returns every form of every secret in a notifier's settings: each SecretStr value and any URL."""
    forms: list[str] = []
    for field in type(settings).model_fields:
        if field == "external_url":  # a public dashboard address, shown in every payload: not a secret
            continue
        value = getattr(settings, field, None)
        if isinstance(value, SecretStr):
            forms += secret_forms(value.get_secret_value())
        elif isinstance(value, str) and "://" in value:  # a plain URL setting (PagerDuty's events_url) may hold
            forms += secret_forms(value)  # credentials or a token too
    return list(dict.fromkeys(forms))


def scrub(text: str, secrets: Iterable[str]) -> str:
    """Returns `text` with every secret replaced by [redacted]; pass forms from `secret_forms`/`url_secrets`."""
    return redact(text, secrets, mask=REDACTED)


def excerpt(text: str, secrets: Iterable[str], *, is_cut: bool = False) -> str:
    """Returns a one-line, scrubbed excerpt of a response body (at most ~200 characters); `is_cut` says the text
    was cut short on reading, so its end may hold the start of a secret."""
    secrets = [s for s in secrets if s]
    # Scrubbed before truncation, so our own cut can never leave part of a secret behind.
    text = scrub(text, secrets)
    if is_cut and secrets:
        # The read stopped at a byte limit, maybe inside a secret: drop a tail as long as any partial one could be.
        text = text[: max(len(text) - (max(map(len, secrets)) - 1), 0)] + " …"
    flat = re.sub(r"\s+", " ", text).strip()
    if len(flat) > BODY_EXCERPT_CHARS:
        flat = flat[:BODY_EXCERPT_CHARS].rstrip() + "…"
    return flat


def describe(settings: NotifierCommon) -> str:
    """Returns how a notifier is named in messages: its kind and configured name, never its target."""
    return f"{getattr(settings, 'kind', 'notifier')} notifier {settings.name!r}"


def is_temporary_status(status: int) -> bool:
    """Returns whether an HTTP error status is worth retrying: 408, 429 and every 5xx."""
    return status in (408, 429) or status >= 500


async def read_capped(response: httpx.Response, *, limit: int = MAX_BODY_BYTES) -> tuple[str, bool]:
    """Returns up to `limit` bytes of a streamed response body as text, and whether the body was longer."""
    data = bytearray()
    async for chunk in response.aiter_bytes():
        data += chunk
        if len(data) > limit:
            return data[:limit].decode(response.encoding or "utf-8", "replace"), True
    return data.decode(response.encoding or "utf-8", "replace"), False


async def post(
    http: httpx.AsyncClient,
    url: str,
    *,
    body: bytes,
    settings: NotifierCommon,
    headers: Mapping[str, str],
    secrets: Iterable[str],
    now: datetime,
) -> int:
    """POSTs `body` once and returns the 2xx status; raises NotifyError (never naming the URL) otherwise."""
    secrets = list(secrets)
    name = describe(settings)
    try:
        async with http.stream(
            "POST",
            url,
            content=body,
            headers={"Content-Type": "application/json", **headers},
            timeout=settings.timeout_seconds,
        ) as response:
            # Read (capped) even on success, so the connection can be reused.
            text, is_cut = await read_capped(response)
    except httpx.TimeoutException as exc:
        raise NotifyError(
            f"{name}: timed out after {settings.timeout_seconds:g}s ({type(exc).__name__})", permanent=False
        ) from None
    except httpx.UnsupportedProtocol:
        raise NotifyError(f"{name}: the configured URL has an unsupported scheme", permanent=True) from None
    except httpx.TransportError as exc:
        raise NotifyError(
            f"{name}: transport error ({type(exc).__name__}: {excerpt(str(exc), secrets) or 'no detail'})",
            permanent=False,
        ) from None
    except httpx.InvalidURL:
        raise NotifyError(f"{name}: the configured URL is not valid", permanent=True) from None
    except httpx.HTTPError as exc:
        raise NotifyError(f"{name}: request failed ({type(exc).__name__})", permanent=False) from None
    status = response.status_code
    if 200 <= status < 300:
        return status
    detail = excerpt(text, secrets, is_cut=is_cut)
    message = f"{name}: HTTP {status}" + (f": {detail}" if detail else "")
    if is_temporary_status(status):
        retry_after = parse_retry_after(response.headers.get("Retry-After"), now=now)
        raise NotifyError(message, permanent=False, status_code=status, retry_after=retry_after)
    # Any other 4xx (and an unexpected 3xx: redirects are not followed) will fail the same way next time.
    raise NotifyError(message, permanent=True, status_code=status)


async def post_to_webhook(
    http: httpx.AsyncClient, notification: Notification, settings: NotifierCommon, *, url: str, payload: Any,
    now: datetime,
) -> DeliveryResult:
    """POSTs a JSON payload once to a chat webhook (Slack, Teams); raises NotifyError on failure."""
    body = json_body(payload)
    status = await post(http, url, body=body, settings=settings, headers={}, secrets=settings_secrets(settings),
                        now=now)
    logger.debug("%s accepted notification %s (HTTP %d)", describe(settings), notification.id, status)
    return DeliveryResult(
        status_code=status, detail=f"{describe(settings)}: HTTP {status}, {len(notification.alerts)} alert(s)"
    )
