"""A dead-man's switch client speaking the healthchecks.io ping protocol around audit cycles.

healthchecks.io Pinging API: `POST <url>/start` signals a start, `POST <url>` success and `POST <url>/fail`
failure; a 2xx answer means the ping was recorded, and the request body (up to 100 kB) is stored as the ping's log.
Pings are fire-and-forget: callers queue them synchronously and one worker task per Heartbeat sends them in order,
so a slow or hanging receiver can never delay or fail a cycle. The ping URL is a secret (whoever holds it can
report on the check's behalf) and never appears in logs or messages.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from types import TracebackType
from typing import NamedTuple

import httpx

from auditor.config import HeartbeatSettings
from auditor.domain.retry import backoff, parse_retry_after
from auditor.notify.base import excerpt, is_temporary_status, scrub, url_secrets

logger = logging.getLogger(__name__)

# We send one summary line; healthchecks.io stores up to 100 kB, so this leaves ample room and bounds the request.
MAX_BODY_BYTES = 10_000
REASON_CHARS = 300
ELLIPSIS = "…"
BACKOFF_BASE = 1.0
BACKOFF_CAP = 4.0
# A receiver's Retry-After is honoured up to this: the queue behind the ping must keep moving.
MAX_RETRY_AFTER = 10.0
# Cycles queue two pings each; a backlog this deep means the receiver has been unreachable for many cycles.
MAX_QUEUED = 32
HEADERS = {"Content-Type": "text/plain; charset=utf-8"}
SUFFIXES = {"start": "/start", "success": "", "fail": "/fail"}


def summary_line(
    *,
    status: str,
    targets: int,
    disks: int,
    unknown: int,
    opened: int,
    resolved: int,
    requests: int,
    run_id: str | None,
    reason: str | None = None,
) -> str:
    """Returns the one-line ping body summarising a cycle, e.g. "complete run r1: 12 targets, 340 disks, …"."""
    head = f"{status} run {run_id}" if run_id else f"{status} run"
    line = (
        f"{head}: {targets} targets, {disks} disks, {unknown} unknown, {opened} findings opened, "
        f"{resolved} resolved, {requests} requests"
    )
    if reason:
        flat = " ".join(reason.split())
        if len(flat) > REASON_CHARS:
            flat = flat[:REASON_CHARS].rstrip() + ELLIPSIS
        line += f"; reason: {flat}"
    return line


def ping_body(text: str) -> bytes:
    """Returns `text` as the UTF-8 ping body: one line, at most MAX_BODY_BYTES bytes (cut on a character)."""
    data = " ".join(text.split()).encode("utf-8")
    if len(data) <= MAX_BODY_BYTES:
        return data
    marker = ELLIPSIS.encode("utf-8")
    # "ignore" drops a multi-byte character the cut split in half, so the body stays valid UTF-8.
    kept = data[: MAX_BODY_BYTES - len(marker)].decode("utf-8", "ignore").encode("utf-8")
    return kept + marker


class _Failure(NamedTuple):
    reason: str
    is_retryable: bool
    retry_after: float | None = None


class Heartbeat:
    """Pings a healthchecks.io-style URL around audit cycles; never delays or fails a cycle."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 10.0,
        max_attempts: int = 3,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if timeout <= 0 or max_attempts < 1:
            raise ValueError("heartbeat needs timeout > 0 and max_attempts >= 1")
        try:
            self._url = httpx.URL(url)
        except httpx.InvalidURL:
            raise ValueError("the heartbeat URL is not a valid URL") from None  # the message would quote it
        # httpx logs every request's full URL at INFO, and the ping URL is a secret (as in Dispatcher).
        for name in ("httpx", "httpcore"):
            if logging.getLogger(name).getEffectiveLevel() < logging.WARNING:
                logging.getLogger(name).setLevel(logging.WARNING)
        self._secrets = url_secrets(url)
        self._timeout = timeout
        self._max_attempts = max_attempts
        self._sleep = sleep
        # Redirects are not followed: following one could carry the secret URL's ping elsewhere.
        self._http = httpx.AsyncClient(transport=transport, follow_redirects=False, timeout=httpx.Timeout(timeout))
        self._queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(maxsize=MAX_QUEUED)
        self._worker: asyncio.Task[None] | None = None
        self._is_in_flight = False
        self._is_closed = False
        self.sent = 0
        self.failures = 0

    @classmethod
    def from_settings(
        cls, settings: HeartbeatSettings, *, transport: httpx.AsyncBaseTransport | None = None
    ) -> Heartbeat | None:
        """Returns a Heartbeat for [heartbeat], or None when no URL is configured."""
        if settings.url is None or not settings.is_enabled:
            return None
        return cls(
            settings.url.get_secret_value(),
            timeout=settings.timeout_seconds,
            max_attempts=settings.max_attempts,
            transport=transport,
        )

    @property
    def pending(self) -> int:
        """Returns how many pings are queued or being sent."""
        return self._queue.qsize() + int(self._is_in_flight)

    def start(self, body: str = "") -> None:
        """Queues a start ping (POST url/start) and returns at once; call it from the event loop."""
        self._enqueue("start", body)

    def success(self, body: str) -> None:
        """Queues a success ping (POST url) and returns at once; call it from the event loop."""
        self._enqueue("success", body)

    def fail(self, body: str) -> None:
        """Queues a failure ping (POST url/fail) and returns at once; call it from the event loop."""
        self._enqueue("fail", body)

    # The bound is the API (a shutdown budget), and running out of it is not an error: asyncio.timeout around
    # the call would cancel nothing we own and raise where callers want a quiet return.
    async def flush(self, timeout: float) -> None:  # noqa: ASYNC109
        """Waits up to `timeout` seconds for queued and in-flight pings to finish; never raises for them."""
        try:
            async with asyncio.timeout(max(timeout, 0.0)):
                await self._queue.join()
        except TimeoutError:
            logger.debug("heartbeat: %d ping(s) still pending after %gs", self.pending, timeout)

    async def aclose(self) -> None:
        """Cancels pings still pending (counting them as failures) and closes the HTTP client."""
        if self._is_closed:
            return
        self._is_closed = True
        dropped = self.pending
        worker, self._worker = self._worker, None
        if worker is not None and not worker.done():
            worker.cancel()
            # asyncio.wait neither raises the worker's CancelledError nor swallows one aimed at us.
            await asyncio.wait({worker})
        while not self._queue.empty():
            self._queue.get_nowait()
            self._queue.task_done()
        if dropped:
            self.failures += dropped
            logger.warning("heartbeat: %d ping(s) given up at shutdown", dropped)
        await self._http.aclose()

    async def __aenter__(self) -> Heartbeat:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def _enqueue(self, kind: str, body: str) -> None:
        if self._is_closed:
            logger.debug("heartbeat ping %s ignored: heartbeat closed", kind)
            return
        loop = asyncio.get_running_loop()  # before queueing: a ping queued with no worker would never go
        try:
            self._queue.put_nowait((kind, ping_body(body)))
        except asyncio.QueueFull:
            self.failures += 1
            logger.warning("heartbeat ping %s dropped: %d pings already waiting", kind, self._queue.qsize())
            return
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._work(), name="heartbeat")

    async def _work(self) -> None:
        while True:
            kind, body = await self._queue.get()
            self._is_in_flight = True
            try:
                await self._deliver(kind, body)
            except Exception as exc:  # a bug here must not kill the worker or surface as an unretrieved exception
                self.failures += 1
                logger.warning("heartbeat ping %s failed: unexpected %s", kind, type(exc).__name__)
            finally:
                self._is_in_flight = False
                self._queue.task_done()

    async def _deliver(self, kind: str, body: bytes) -> None:
        url = self._url.copy_with(path=self._url.path.rstrip("/") + SUFFIXES[kind])  # keeps any ?query
        attempt = 0
        failure = _Failure("not attempted", is_retryable=False)
        while attempt < self._max_attempts:
            attempt += 1
            outcome = await self._attempt(url, body)
            if outcome is None:
                self.sent += 1
                logger.debug("heartbeat ping %s delivered (attempt %d)", kind, attempt)
                return
            failure = outcome
            if not failure.is_retryable or attempt == self._max_attempts:
                break
            # No jitter: one client pinging one check makes no herd, and a fixed schedule keeps shutdown bounded.
            delay = backoff(attempt, retry_after=failure.retry_after, base=BACKOFF_BASE, cap=BACKOFF_CAP,
                            random=lambda: 1.0)
            await self._sleep(min(delay, MAX_RETRY_AFTER))
        self.failures += 1
        logger.warning("heartbeat ping %s failed after %d attempt(s): %s", kind, attempt, failure.reason)

    async def _attempt(self, url: httpx.URL, body: bytes) -> _Failure | None:
        """Makes one POST; returns None when delivered, else why not and whether to retry."""
        try:
            # httpx's timeout bounds each phase; this bounds the whole attempt (a receiver trickling bytes).
            async with asyncio.timeout(self._timeout):
                response = await self._http.post(url, content=body, headers=HEADERS)
        except (TimeoutError, httpx.TimeoutException):
            return _Failure(f"timeout after {self._timeout:g}s", is_retryable=True)
        except httpx.UnsupportedProtocol:
            return _Failure("the configured URL has an unsupported scheme", is_retryable=False)
        except httpx.TransportError as exc:
            detail = scrub(str(exc), self._secrets) or "no detail"
            return _Failure(f"transport error ({type(exc).__name__}: {detail})", is_retryable=True)
        except httpx.InvalidURL:
            return _Failure("the configured URL is not valid", is_retryable=False)
        except httpx.HTTPError as exc:
            return _Failure(f"request failed ({type(exc).__name__})", is_retryable=True)
        status = response.status_code
        if 200 <= status < 300:
            return None
        detail = excerpt(response.text, self._secrets)
        reason = f"HTTP {status}" + (f": {detail}" if detail else "")
        if is_temporary_status(status):
            retry_after = parse_retry_after(response.headers.get("Retry-After"), now=datetime.now(UTC))
            return _Failure(reason, is_retryable=True, retry_after=retry_after)
        # healthchecks.io answers 404 for an unknown check and 409 for an ambiguous slug: retrying cannot help.
        return _Failure(reason, is_retryable=False)
