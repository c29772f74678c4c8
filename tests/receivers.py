"""Local receivers for notifier tests: a recording HTTP app served by uvicorn, and a recording SMTP server.

Both run on a loopback port in a background thread with their own event loop, so one server can outlive a test's
event loop (start it once per module) and real timeouts and refused connections behave as in production.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any, cast

import httpx
import uvicorn
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """Returns a loopback port nothing listens on (bound, then released), for connection-refused tests."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def _bound_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((LOOPBACK, 0))
    return sock


class _LoopThread:
    """An event loop running in a daemon thread; `call` runs a coroutine on it and waits for the result."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def call(self, coro: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


# --------------------------------------------------------------------------------------------------- HTTP


@dataclass(frozen=True)
class Reply:
    """One scripted HTTP answer; `delay` holds the answer back (until the receiver is reset or stopped)."""

    status: int = 200
    body: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass(frozen=True)
class RecordedRequest:
    """One request as it arrived."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class RecordingApp:
    """ASGI app: records every request and answers with the next scripted Reply (then `default`)."""

    def __init__(self, *, default: Reply | None = None) -> None:
        self.default = default or Reply(200, "ok")
        self.requests: list[RecordedRequest] = []
        self._script: list[Reply] = []
        self._lock = threading.Lock()
        self._release: asyncio.Event | None = None

    def script(self, *replies: Reply) -> None:
        with self._lock:
            self._script.extend(replies)

    def reset(self) -> None:
        with self._lock:
            self._script.clear()
            self.requests.clear()

    def _next(self) -> Reply:
        with self._lock:
            return self._script.pop(0) if self._script else self.default

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            return
        chunks = []
        while True:
            event = await receive()
            chunks.append(event.get("body", b""))
            if not event.get("more_body"):
                break
        headers: dict[str, str] = {}
        for raw_name, raw_value in scope["headers"]:
            name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        with self._lock:
            self.requests.append(
                RecordedRequest(
                    method=scope["method"],
                    path=scope["path"],
                    query=scope["query_string"].decode("latin-1"),
                    headers=headers,
                    body=b"".join(chunks),
                )
            )
        reply = self._next()
        if reply.delay:
            if self._release is None:
                self._release = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._release.wait(), reply.delay)
        body = reply.body.encode()
        out_headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
        out_headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers.items()]
        await send({"type": "http.response.start", "status": reply.status, "headers": out_headers})
        await send({"type": "http.response.body", "body": body})

    def release_waiters(self) -> None:
        if self._release is not None:
            self._release.set()
            self._release = None


class GroupWaitRouter(RecordingApp):
    """An Alertmanager stand-in (POST /api/v2/alerts): like Alertmanager, it holds a new alert for `group_wait`,
    then posts the alerts still active (endsAt in the future) to the on-call receiver at `route_to`, as a webhook
    payload. An alert resolved within group_wait never reaches on-call."""

    def __init__(self, route_to: str, *, group_wait: float) -> None:
        super().__init__()
        self.route_to = route_to
        self.group_wait = group_wait
        self.active: dict[str, dict[str, Any]] = {}  # label set (JSON) -> the alert as last posted
        self._tasks: set[asyncio.Task[None]] = set()

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        await super().__call__(scope, receive, send)
        if scope.get("type") != "http" or not scope["path"].endswith("/api/v2/alerts"):
            return
        new = False
        for alert in self.requests[-1].json():
            key = json.dumps(alert["labels"], sort_keys=True)
            new = new or key not in self.active
            self.active[key] = alert
        if new:
            task = asyncio.get_running_loop().create_task(self._route())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _route(self) -> None:
        await asyncio.sleep(self.group_wait)
        now = datetime.now(UTC)
        firing = [a for a in self.active.values()
                  if datetime.fromisoformat(a["endsAt"].replace("Z", "+00:00")) > now]
        if firing:
            async with httpx.AsyncClient() as client:
                await client.post(self.route_to, json={"version": "4", "status": "firing", "alerts": firing})


class _QuietServer(uvicorn.Server):
    # The test process owns its signals (as the daemon does): never install handlers.
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpReceiver:
    """A RecordingApp served by uvicorn on 127.0.0.1:<random port> in a background thread."""

    def __init__(self, app: RecordingApp | None = None) -> None:
        self.app = app or RecordingApp()
        self._sock = _bound_socket()
        self.port = int(self._sock.getsockname()[1])
        config = uvicorn.Config(
            self.app, lifespan="off", log_level="warning", access_log=False, timeout_graceful_shutdown=1
        )
        self._server = _QuietServer(config)
        self._loop = _LoopThread("http-receiver")
        self._serving: concurrent.futures.Future[None] | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def requests(self) -> list[RecordedRequest]:
        return self.app.requests

    def script(self, *replies: Reply) -> None:
        self.app.script(*replies)

    def start(self) -> HttpReceiver:
        self._serving = asyncio.run_coroutine_threadsafe(self._server.serve(sockets=[self._sock]), self._loop.loop)
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.002)
        return self

    def reset(self) -> None:
        """Forgets requests and script, and lets any held-back reply go."""
        self._loop.loop.call_soon_threadsafe(self.app.release_waiters)
        self.app.reset()

    def stop(self) -> None:
        self._loop.loop.call_soon_threadsafe(self.app.release_waiters)
        self._server.should_exit = True
        if self._serving is not None:
            self._serving.result(5)
        self._loop.stop()
        self._sock.close()

    def __enter__(self) -> HttpReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------------- SMTP


@dataclass(frozen=True)
class ReceivedMail:
    """One message the SMTP server accepted."""

    mail_from: str
    rcpt_tos: list[str]
    raw: bytes
    login: str | None

    @property
    def message(self) -> EmailMessage:
        return message_from_bytes(self.raw, policy=policy.default)


class RecordingSMTPHandler:
    """aiosmtpd handler: records messages; answers DATA and RCPT from scripts (then 250)."""

    def __init__(self) -> None:
        self.messages: list[ReceivedMail] = []
        self.data_replies: list[str] = []
        self.rcpt_reply: str | None = None
        self.data_delay = 0.0
        self.credentials: tuple[str, str] | None = None
        self.auth_attempts: list[tuple[str, str]] = []
        self._release: asyncio.Event | None = None

    def release_waiters(self) -> None:
        if self._release is not None:
            self._release.set()
            self._release = None

    def reset(self) -> None:
        self.messages.clear()
        self.data_replies.clear()
        self.rcpt_reply = None
        self.data_delay = 0.0
        self.credentials = None
        self.auth_attempts.clear()

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if self.rcpt_reply is not None:
            return self.rcpt_reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.data_delay:
            if self._release is None:
                self._release = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._release.wait(), self.data_delay)
        if self.data_replies:
            return self.data_replies.pop(0)
        auth = session.auth_data
        login = auth.login.decode() if isinstance(auth, LoginPassword) else None
        self.messages.append(
            ReceivedMail(
                mail_from=envelope.mail_from or "",
                rcpt_tos=list(envelope.rcpt_tos),
                raw=cast(bytes, envelope.original_content or envelope.content or b""),
                login=login,
            )
        )
        return "250 Message accepted for delivery"

    def authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        assert isinstance(auth_data, LoginPassword)
        attempt = (auth_data.login.decode(), auth_data.password.decode())
        self.auth_attempts.append(attempt)
        if self.credentials is not None and attempt == self.credentials:
            return AuthResult(success=True, auth_data=auth_data)
        return AuthResult(success=False, handled=False)


class SmtpReceiver:
    """An aiosmtpd server on 127.0.0.1:<random port> (plain SMTP, AUTH allowed without TLS) in a thread."""

    def __init__(self) -> None:
        self.handler = RecordingSMTPHandler()
        self._loop = _LoopThread("smtp-receiver")
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def messages(self) -> list[ReceivedMail]:
        return self.handler.messages

    def _protocol(self) -> SMTP:
        return SMTP(
            self.handler,
            hostname="localhost",
            auth_require_tls=False,
            authenticator=self.handler.authenticate,
            loop=self._loop.loop,
        )

    async def _start(self) -> asyncio.Server:
        return await self._loop.loop.create_server(self._protocol, LOOPBACK, 0)

    def start(self) -> SmtpReceiver:
        self._server = self._loop.call(self._start())
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    def reset(self) -> None:
        self._loop.loop.call_soon_threadsafe(self.handler.release_waiters)
        self.handler.reset()

    def stop(self) -> None:
        self._loop.loop.call_soon_threadsafe(self.handler.release_waiters)
        if self._server is not None:
            self._loop.loop.call_soon_threadsafe(self._server.close)
        self._loop.stop()

    def __enter__(self) -> SmtpReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
