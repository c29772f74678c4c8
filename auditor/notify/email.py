"""The `email` notifier: one multipart/alternative message (plain text and HTML) per notification, over SMTP.

`security` picks the transport: "tls" is implicit TLS from the first byte (usually port 465), "starttls" requires
the server to offer STARTTLS and upgrades before authenticating (usually 587), "none" is plain SMTP (a local relay).
SMTP replies map to NotifyError by their code: 5xx is permanent, 4xx temporary (RFC 5321 §4.2.1).
Each alert lists the notifier's static labels (and source=auditor) and, with `external_url` set, a link to its
disk's page.
"""

from __future__ import annotations

import base64
import html
import logging
from collections.abc import Iterable
from datetime import datetime
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr

import aiosmtplib
import httpx

from auditor.config import EmailNotifier, NotifierCommon
from auditor.domain.alerts import Alert, AlertStatus, Notification
from auditor.errors import NotifyError
from auditor.notify.base import (
    TEST_ANNOTATION,
    DeliveryResult,
    describe,
    excerpt,
    generator_url,
    headline,
    human_time,
    settings_secrets,
    static_labels,
)
from auditor.vocabulary import format_duration

logger = logging.getLogger(__name__)

SUBJECT_SUFFIX = " (auditor)"
FALLBACK_DOMAIN = "katapult-backup-auditor.invalid"


def subject(notification: Notification) -> str:
    """Returns the subject line, e.g. "[FIRING:3] unprotected-disk (auditor)"."""
    # Header values may not contain line breaks (the email package refuses them), and labels come from the API.
    return " ".join((headline(notification) + SUBJECT_SUFFIX).split())


def _when(alert: Alert, *, now: datetime) -> str:
    if alert.status is AlertStatus.FIRING:
        return f"Since {human_time(alert.starts_at)}"
    ended = alert.ends_at or now
    lasted = format_duration(ended - alert.starts_at, style="alert")
    return f"Lasted {lasted} ({human_time(alert.starts_at)} to {human_time(ended)})"


def _facts(alert: Alert, settings: NotifierCommon | None = None) -> list[tuple[str, str]]:
    facts = [("Rule", alert.rule), ("Severity", alert.severity.value)]
    if alert.disk_id:
        facts.append(("Disk", f"{alert.disk_name} ({alert.disk_id})" if alert.disk_name else alert.disk_id))
    if alert.organization:
        facts.append(("Organization", alert.organization))
    if alert.policy_id:
        facts.append(("Policy", alert.policy_id))
    facts.append(("Fingerprint", alert.fingerprint))
    if alert.remediation and alert.status is AlertStatus.FIRING:
        facts.append(("What to do", alert.remediation))
    if alert.runbook_url:
        facts.append(("Runbook", alert.runbook_url))
    if settings is not None:
        facts.append(("Labels", ", ".join(f"{k}={v}" for k, v in sorted(static_labels(settings).items()))))
        link = generator_url(alert, settings)
        if link:
            facts.append(("Link", link))
    return facts


def render_text(notification: Notification, *, now: datetime, settings: NotifierCommon | None = None) -> str:
    """Returns the plain-text body."""
    lines = [headline(notification), ""]
    if notification.is_test:
        lines += [TEST_ANNOTATION, ""]
    for alert in notification.alerts:
        lines.append(f"[{alert.status.value.upper()}] {alert.summary}")
        lines += [f"  {label}: {value}" for label, value in _facts(alert, settings)]
        lines.append(f"  {_when(alert, now=now)}")
        if alert.description:
            lines.append(f"  {alert.description}")
        lines.append("")
    lines.append("-- Katapult backup auditor")
    return "\n".join(lines) + "\n"


def render_html(notification: Notification, *, now: datetime, settings: NotifierCommon | None = None) -> str:
    """Returns the HTML body; every interpolated value is HTML-escaped."""
    e = html.escape
    parts = ["<!DOCTYPE html>", "<html><body>", f"<h2>{e(headline(notification))}</h2>"]
    if notification.is_test:
        parts.append(f"<p><em>{e(TEST_ANNOTATION)}</em></p>")
    for alert in notification.alerts:
        colour = "#c0392b" if alert.status is AlertStatus.FIRING else "#27ae60"
        parts.append(f'<h3 style="color:{colour}">[{e(alert.status.value.upper())}] {e(alert.summary)}</h3>')
        parts.append("<table>")
        parts += [f'<tr><th align="left">{e(k)}</th><td>{_cell(k, v)}</td></tr>' for k, v in _facts(alert, settings)]
        parts.append("</table>")
        parts.append(f"<p>{e(_when(alert, now=now))}</p>")
        if alert.description:
            parts.append(f"<p>{e(alert.description)}</p>")
    parts += ["<p><small>Katapult backup auditor</small></p>", "</body></html>"]
    return "\n".join(parts) + "\n"


def _cell(key: str, value: str) -> str:
    if key in ("Link", "Runbook"):  # http(s) URLs only: external_url and runbook_url are validated as such
        return f'<a href="{html.escape(value)}">{html.escape(value)}</a>'
    return html.escape(value)


def _domain(address: str) -> str:
    _, addr = parseaddr(address)
    domain = addr.rpartition("@")[2].strip()
    return domain or FALLBACK_DOMAIN


def _smtp_secrets(settings: EmailNotifier) -> list[str]:
    if settings.password is None:
        return settings_secrets(settings)
    password = settings.password.get_secret_value()
    # AUTH PLAIN and AUTH LOGIN put these on the wire (aiosmtplib encodes UTF-8); a server error reply could
    # quote them back.
    plain = base64.b64encode(f"\0{settings.username}\0{password}".encode()).decode()
    return [*settings_secrets(settings), base64.b64encode(password.encode()).decode(), plain]


def _smtp_error(exc: Exception, *, settings: EmailNotifier, secrets: Iterable[str]) -> NotifyError:
    name = describe(settings)
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        codes = sorted({r.code for r in exc.recipients})
        return NotifyError(
            f"{name}: every recipient was refused (SMTP {', '.join(str(c) for c in codes)})",
            permanent=all(c >= 500 for c in codes),
            status_code=codes[-1] if codes else None,
        )
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        text = excerpt(exc.message, secrets)
        return NotifyError(
            f"{name}: SMTP {exc.code} ({type(exc).__name__})" + (f": {text}" if text else ""),
            permanent=exc.code >= 500,
            status_code=exc.code,
        )
    if isinstance(exc, aiosmtplib.SMTPTimeoutError | TimeoutError):
        return NotifyError(f"{name}: timed out after {settings.timeout_seconds:g}s", permanent=False)
    if isinstance(exc, aiosmtplib.SMTPServerDisconnected | aiosmtplib.SMTPConnectError | OSError):
        return NotifyError(
            f"{name}: SMTP connection failed ({type(exc).__name__}: {excerpt(str(exc), secrets) or 'no detail'})",
            permanent=False,
        )
    if isinstance(exc, aiosmtplib.SMTPException):
        # What is left is the server lacking what the settings demand (STARTTLS, AUTH, SMTPUTF8): only a config
        # change helps. aiosmtplib raises these as bare SMTPException or SMTPNotSupported.
        return NotifyError(f"{name}: {excerpt(str(exc), secrets)}", permanent=True)
    # A ValueError from aiosmtplib means the settings cannot work (e.g. an address it cannot encode).
    return NotifyError(f"{name}: could not send ({type(exc).__name__})", permanent=True)


class EmailChannel:
    """Mail over SMTP with aiosmtplib."""

    kind = "email"

    def build_payload(self, notification: Notification, settings: EmailNotifier, *, now: datetime) -> EmailMessage:
        """Returns the message: headers, a plain-text part and an HTML alternative."""
        message = EmailMessage()
        message["Subject"] = subject(notification)
        message["From"] = settings.from_
        message["To"] = ", ".join(settings.to)
        message["Date"] = format_datetime(now)
        # The outbox id makes a re-sent notification the same message, which mail clients can collapse.
        message["Message-ID"] = f"<{notification.id}@{_domain(settings.from_)}>"
        message["Auto-Submitted"] = "auto-generated"  # RFC 3834: no vacation auto-replies
        message["X-Auditor-Notification-Id"] = notification.id
        message.set_content(render_text(notification, now=now, settings=settings))
        message.add_alternative(render_html(notification, now=now, settings=settings), subtype="html")
        return message

    async def send(
        self, http: httpx.AsyncClient, notification: Notification, settings: EmailNotifier, *, now: datetime
    ) -> DeliveryResult:
        """Sends the message in one SMTP session (`http` is unused); raises NotifyError on failure."""
        message = self.build_payload(notification, settings, now=now)
        secrets = _smtp_secrets(settings)
        password = settings.password.get_secret_value() if settings.password is not None else None
        use_auth = bool(settings.username) and password is not None
        try:
            refused, reply = await aiosmtplib.send(
                message,
                hostname=settings.host,
                port=settings.port,
                username=settings.username if use_auth else None,
                password=password if use_auth else None,
                use_tls=settings.security == "tls",
                start_tls=settings.security == "starttls",
                timeout=settings.timeout_seconds,
            )
        except (aiosmtplib.SMTPException, OSError, ValueError) as exc:  # OSError covers TimeoutError and ssl
            raise _smtp_error(exc, settings=settings, secrets=secrets) from None
        accepted = len(settings.to) - len(refused)
        logger.debug(
            "%s: SMTP server accepted notification %s for %d recipient(s)",
            describe(settings),
            notification.id,
            accepted,
        )
        detail = f"{describe(settings)}: accepted for {accepted} of {len(settings.to)} recipient(s)"
        if refused:
            codes = sorted({r.code for r in refused.values()})
            detail += f" (refused: SMTP {', '.join(str(c) for c in codes)})"
        return DeliveryResult(status_code=None, detail=f"{detail}; server replied {excerpt(reply, secrets)!r}")


NOTIFIER = EmailChannel()
