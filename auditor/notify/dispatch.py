"""The one HTTP client every notifier shares, and a single-attempt `send` by notifier settings."""

from __future__ import annotations

import logging
import traceback
from datetime import datetime
from types import TracebackType

import httpx

from auditor.config import NotifierCommon
from auditor.domain.alerts import Notification
from auditor.errors import NotifyError
from auditor.notify.base import DeliveryResult, describe, excerpt, settings_secrets
from auditor.notify.registry import notifier_for

logger = logging.getLogger(__name__)


def unexpected_error(exc: Exception, settings: NotifierCommon) -> NotifyError:
    """Returns the NotifyError for an exception a notifier let through: temporary for transport trouble (httpx,
    OSError, timeouts), permanent for anything else (a payload or settings bug fails the same way next time)."""
    name = describe(settings)
    detail = excerpt(str(exc), settings_secrets(settings))
    # InvalidURL, StreamError and CookieConflict are not HTTPError: they are bugs or settings, not the network.
    is_transport = isinstance(exc, httpx.HTTPError | OSError | TimeoutError)
    what = "transport error" if is_transport else "could not build or send the notification"
    return NotifyError(
        f"{name}: {what} (unexpected {type(exc).__name__}" + (f": {detail})" if detail else ")"),
        permanent=not is_transport,
    )


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
        """Makes one delivery attempt; raises NotifyError, and nothing else, on failure."""
        try:
            return await notifier_for(settings).send(self.http, notification, settings, now=now)
        except NotifyError:
            raise
        except Exception as exc:  # the delivery stage branches on NotifyError.permanent; anything else is a bug here
            error = unexpected_error(exc, settings)
            # Where it came from, without the exception's text (it may quote a secret): enough to find the bug.
            where = "".join(traceback.format_list(traceback.extract_tb(exc.__traceback__)))
            logger.error("%s (notification %s) from:\n%s", error, notification.id, where.rstrip())
            raise error from None

    async def aclose(self) -> None:
        """Closes the HTTP client."""
        await self.http.aclose()

    async def __aenter__(self) -> Dispatcher:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()
