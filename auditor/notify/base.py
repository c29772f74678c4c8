"""The notifier contract, its result type, and the helpers every channel shares (times, HTTP, secret scrubbing).

A notifier does one attempt and nothing else: build the payload (a pure function of the notification, its
settings and `now`), make one HTTP request (or one SMTP session), and either return a `DeliveryResult` or raise
`NotifyError`. Retry, dedup, grouping and repeat live once, in the delivery stage.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import parsedate_to_datetime
from typing import Any, Protocol, TypeAlias, TypeVar
from urllib.parse import unquote, urlsplit

import httpx

from auditor.config import NotifierCommon
from auditor.domain.alerts import Alert, AlertStatus, Notification
from auditor.errors import NotifyError

logger = logging.getLogger(__name__)

Payload: TypeAlias = dict[str, Any] | list[dict[str, Any]] | EmailMessage
SettingsT_contra = TypeVar("SettingsT_contra", bound=NotifierCommon, contravariant=True)

# Alertmanager's webhook sends Go's zero time as the endsAt of an alert that is still firing.
ZERO_TIME = "0001-01-01T00:00:00Z"
TEST_LABEL = "test"
TEST_ANNOTATION = "This is a test notification from the Katapult backup auditor; no action is needed."
BODY_EXCERPT_CHARS = 200
REDACTED = "[redacted]"
# Secret fragments shorter than this are not scrubbed on their own: replacing "v2" or "api" everywhere would
# mangle the excerpt without protecting anything.
_MIN_FRAGMENT = 6


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


def humanize(delta: timedelta) -> str:
    """Returns a short duration like "3h 12m", "2d 5h", "12m" or "45s" (the two largest non-zero units)."""
    total = max(int(delta.total_seconds()), 0)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    parts = [f"{n}{unit}" for n, unit in ((days, "d"), (hours, "h"), (minutes, "m"), (seconds, "s")) if n]
    return " ".join(parts[:2]) if parts else "0s"


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
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def alert_labels(alert: Alert, *, is_test: bool) -> dict[str, str]:
    """Returns the alert's Alertmanager labels without empty values (Alertmanager drops them), plus test="true"."""
    labels = {k: v for k, v in alert.labels().items() if v}
    if is_test:
        labels[TEST_LABEL] = "true"
    return labels


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


def parse_retry_after(value: str | None, *, now: datetime) -> float | None:
    """Returns the seconds a Retry-After header asks for (delta-seconds or HTTP-date, RFC 9110 §10.2.3)."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(seconds, 0.0) if math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; parsedate_to_datetime returns naive for "-0000"
        when = when.replace(tzinfo=UTC)
    return max((when - now).total_seconds(), 0.0)


def url_secrets(url: str) -> list[str]:
    """Returns the parts of a secret-bearing URL that must never be shown: the URL, its path, query and password."""
    parts = [url, url.rstrip("/")]
    try:
        split = urlsplit(url)
    except ValueError:
        return parts
    if split.password:
        parts += [split.password, unquote(split.password)]
    if split.path.strip("/"):
        parts += [split.path, split.path.rstrip("/"), unquote(split.path)]
        # Slack, Teams and friends carry the secret as path segments; a 404 page may echo just one of them.
        parts += [segment for segment in split.path.split("/") if len(segment) >= 8]
    if split.query:
        parts.append(split.query)
        parts += [pair.partition("=")[2] for pair in split.query.split("&")]
    return parts


def scrub(text: str, secrets: Iterable[str]) -> str:
    """Returns `text` with every secret (longest first) replaced by [redacted]."""
    for secret in sorted({s for s in secrets if len(s) >= _MIN_FRAGMENT}, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


def excerpt(text: str, secrets: Iterable[str]) -> str:
    """Returns a one-line, scrubbed excerpt of a response body (at most ~200 characters)."""
    # Scrubbed before truncation, so a cut can never leave part of a secret behind.
    flat = re.sub(r"\s+", " ", scrub(text, secrets)).strip()
    if len(flat) > BODY_EXCERPT_CHARS:
        flat = flat[:BODY_EXCERPT_CHARS].rstrip() + "…"
    return flat


def describe(settings: NotifierCommon) -> str:
    """Returns how a notifier is named in messages: its kind and configured name, never its target."""
    return f"{getattr(settings, 'kind', 'notifier')} notifier {settings.name!r}"


def is_temporary_status(status: int) -> bool:
    """Returns whether an HTTP error status is worth retrying: 408, 429 and every 5xx."""
    return status in (408, 429) or status >= 500


async def post(
    http: httpx.AsyncClient,
    url: str,
    *,
    body: bytes,
    settings: NotifierCommon,
    headers: Mapping[str, str],
    secrets: Iterable[str],
    now: datetime,
) -> httpx.Response:
    """POSTs `body` once and returns the 2xx response; raises NotifyError (never naming the URL) otherwise."""
    secrets = list(secrets)
    name = describe(settings)
    try:
        response = await http.post(
            url,
            content=body,
            headers={"Content-Type": "application/json", **headers},
            timeout=settings.timeout_seconds,
        )
    except httpx.TimeoutException as exc:
        raise NotifyError(
            f"{name}: timed out after {settings.timeout_seconds:g}s ({type(exc).__name__})", permanent=False
        ) from None
    except httpx.UnsupportedProtocol:
        raise NotifyError(f"{name}: the configured URL has an unsupported scheme", permanent=True) from None
    except httpx.TransportError as exc:
        raise NotifyError(
            f"{name}: transport error ({type(exc).__name__}: {scrub(str(exc), secrets) or 'no detail'})",
            permanent=False,
        ) from None
    except httpx.InvalidURL:
        raise NotifyError(f"{name}: the configured URL is not valid", permanent=True) from None
    except httpx.HTTPError as exc:
        raise NotifyError(f"{name}: request failed ({type(exc).__name__})", permanent=False) from None
    status = response.status_code
    if 200 <= status < 300:
        return response
    detail = excerpt(response.text, secrets)
    message = f"{name}: HTTP {status}" + (f": {detail}" if detail else "")
    if is_temporary_status(status):
        retry_after = parse_retry_after(response.headers.get("Retry-After"), now=now)
        raise NotifyError(message, permanent=False, status_code=status, retry_after=retry_after)
    # Any other 4xx (and an unexpected 3xx: redirects are not followed) will fail the same way next time.
    raise NotifyError(message, permanent=True, status_code=status)
