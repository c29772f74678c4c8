"""The one HTTP client every notifier shares, and a single-attempt `send` by notifier settings."""

from __future__ import annotations

import logging
from datetime import datetime
from types import TracebackType

import httpx

from auditor.config import NotifierCommon
from auditor.domain.alerts import Notification
from auditor.notify.base import DeliveryResult
from auditor.notify.registry import notifier_for


class Dispatcher:
    """Owns the notifiers' HTTP client (httpx stays inside `auditor.notify`)."""

    def __init__(self, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        # httpx logs every request's full URL at INFO, and webhook URLs are secrets: whoever configures logging,
        # those lines must not be emitted while notifiers exist.
        for name in ("httpx", "httpcore"):
            if logging.getLogger(name).getEffectiveLevel() < logging.WARNING:
                logging.getLogger(name).setLevel(logging.WARNING)
        # Redirects are not followed: a webhook answering 3xx is misconfigured, and following it could carry
        # a secret-bearing URL elsewhere.
        self.http = httpx.AsyncClient(transport=transport, follow_redirects=False,
                                      timeout=httpx.Timeout(10.0, connect=5.0))

    async def send(self, notification: Notification, settings: NotifierCommon, *, now: datetime) -> DeliveryResult:
        """Makes one delivery attempt; raises NotifyError on failure."""
        return await notifier_for(settings).send(self.http, notification, settings, now=now)

    async def aclose(self) -> None:
        """Closes the HTTP client."""
        await self.http.aclose()

    async def __aenter__(self) -> Dispatcher:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()
