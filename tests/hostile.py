"""Hostile Katapult at the transport seam: the real fake's wire-shaped JSON with one part changed, on the way out.

`Tamper` wraps any ASGI app (normally `auditor.fake.create_app(fleet)`) and lets a test rewrite the answers to
some requests — a field replaced by arbitrary JSON, a disk lookup answering about another disk, a wrapped error
body with any detail — while everything else stays exactly what the fake serves. It records what it served, so a
test can judge the auditor against the bytes it was given. `AsgiServer` serves such an app on a loopback socket
for subprocess tests (the CLI), and `EchoHeadersApp` is a webhook receiver that fails quoting the request headers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import uvicorn

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PREFIX = "/core/v1"
DISK_POLICIES = "/disks/disk/disk_backup_policies"
VM_POLICIES = "/virtual_machines/virtual_machine/disk_backup_policies"
ORG_POLICIES = "/organizations/organization/disk_backup_policies"
ORG_DISKS = "/organizations/organization/disks"
DISK = "/disks/disk"
# The query parameter naming the looked-up object, per endpoint (README "Requests").
LOOKUP = {
    DISK_POLICIES: "disk[id]",
    DISK: "disk[id]",
    VM_POLICIES: "virtual_machine[id]",
    ORG_POLICIES: "organization[id]",
    ORG_DISKS: "organization[id]",
}

_MISSING = object()


@dataclass(frozen=True)
class Request:
    """What a request asked for: the endpoint (without /core/v1), the query and the method."""

    endpoint: str
    params: dict[str, str]
    method: str = "GET"

    @property
    def target(self) -> str | None:
        """Returns the looked-up object id (disk[id], virtual_machine[id] or organization[id])."""
        name = LOOKUP.get(self.endpoint)
        return self.params.get(name) if name else None

    @property
    def page(self) -> int:
        """Returns the requested page (1 when not given or not a number)."""
        raw = self.params.get("page", "1")
        return int(raw) if raw.isdigit() else 1


@dataclass
class Answer:
    """A rewritten response: a JSON value (`body`) or raw bytes; `chunked` drops Content-Length."""

    status: int
    body: Any = None
    raw: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    chunked: bool = False

    def encoded(self) -> bytes:
        """Returns the body bytes (JSON as Katapult sends it: compact, non-ASCII escaped)."""
        if self.raw is not None:
            return self.raw
        return json.dumps(self.body, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Exchange:
    """One request and the response actually served for it."""

    request: Request
    status: int
    body: bytes

    def json(self) -> Any:
        """Returns the served body decoded (strict: NaN/Infinity rejected), or _MISSING when it is not JSON."""
        try:
            return json.loads(self.body, parse_constant=_reject)
        except ValueError:
            return _MISSING


def _reject(name: str) -> Any:
    raise ValueError(name)


def is_json(value: Any) -> bool:
    """Returns whether `Exchange.json()` decoded something."""
    return value is not _MISSING


# A rewrite sees the request, the original status and decoded body (None if not JSON); None keeps the answer.
Rewrite = Callable[[Request, int, Any], Answer | None]


class Tamper:
    """ASGI middleware: serves the wrapped app's answers, rewritten by `rewrite`, and records every exchange."""

    def __init__(self, app: ASGIApp, rewrite: Rewrite | None = None) -> None:
        self.app = app
        self.rewrite = rewrite
        self.exchanges: list[Exchange] = []
        self._lock = threading.Lock()

    def served(self, endpoint: str, target: str | None = None) -> list[Exchange]:
        """Returns the exchanges for an endpoint (and looked-up object), in page order."""
        with self._lock:
            found = [e for e in self.exchanges if e.request.endpoint == endpoint
                     and (target is None or e.request.target == target)]
        return sorted(found, key=lambda e: e.request.page)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = str(scope["path"])
        endpoint = path[len(PREFIX):] if path.startswith(PREFIX) else path
        query = bytes(scope.get("query_string", b"")).decode("latin-1")
        request = Request(endpoint, dict(parse_qsl(query, keep_blank_values=True)), str(scope["method"]))
        start: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def capture(message: Message) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(bytes(message.get("body", b"")))

        await self.app(scope, receive, capture)
        status = int(start.get("status", 500))
        headers = [(bytes(k), bytes(v)) for k, v in start.get("headers", [])]
        body = b"".join(chunks)
        answer: Answer | None = None
        if self.rewrite is not None:
            try:
                decoded: Any = json.loads(body)
            except ValueError:
                decoded = None
            answer = self.rewrite(request, status, decoded)
        chunked = False
        if answer is not None:
            status, body, chunked = answer.status, answer.encoded(), answer.chunked
            replaced = {k.lower().encode("latin-1") for k in answer.headers}
            headers = [(k, v) for k, v in headers if k.lower() not in replaced and k.lower() != b"content-length"]
            headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in answer.headers.items()]
            if not chunked:
                headers.append((b"content-length", str(len(body)).encode()))
        with self._lock:
            self.exchanges.append(Exchange(request, status, body))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        if chunked:  # several body messages and no Content-Length: the client learns the size only by reading
            step = max(1, len(body) // 4)
            for i in range(0, len(body), step):
                await send({"type": "http.response.body", "body": body[i:i + step], "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        await send({"type": "http.response.body", "body": body})


def wrapped_error(status: int, code: str, description: str = "", detail: Any = None) -> Answer:
    """Returns a Katapult error answer: `{"error": {code, description, detail}}` plus X-Api-Schema."""
    body = {"error": {"code": code, "description": description, "detail": {} if detail is None else detail}}
    return Answer(status, body, headers={"X-Api-Schema": "json-error"})


# ---- JSON paths ------------------------------------------------------------------------------------------

Path = tuple[str | int, ...]


def paths(value: Any, prefix: Path = ()) -> list[Path]:
    """Returns the path of every node of a JSON value, the root (`()`) first, depth first."""
    out: list[Path] = [prefix]
    if isinstance(value, dict):
        for key, child in value.items():
            out += paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            out += paths(child, (*prefix, index))
    return out


def has_path(value: Any, path: Path) -> bool:
    """Returns whether `path` exists in `value`."""
    node = value
    for step in path:
        if isinstance(node, dict) and isinstance(step, str) and step in node:
            node = node[step]
        elif isinstance(node, list) and isinstance(step, int) and 0 <= step < len(node):
            node = node[step]
        else:
            return False
    return True


def substitute(value: Any, path: Path, new: Any, *, delete: bool = False) -> Any:
    """Returns a copy of `value` with the node at `path` replaced by `new` (or removed from its parent)."""
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        copy = dict(value)
        if not rest and delete:
            copy.pop(head, None)
        else:
            copy[head] = substitute(value[head], rest, new, delete=delete)
        return copy
    copied = list(value)
    if not rest and delete:
        del copied[head]  # type: ignore[arg-type]
    else:
        copied[head] = substitute(value[head], rest, new, delete=delete)  # type: ignore[index]
    return copied


# ---- serving an ASGI app on a loopback socket --------------------------------------------------------------


class _QuietServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # the test process owns its signals
        yield


class AsgiServer:
    """Serves an ASGI app on 127.0.0.1:<free port> from a background thread (`url` includes /core/v1)."""

    def __init__(self, app: ASGIApp) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = int(self._sock.getsockname()[1])
        config = uvicorn.Config(app, lifespan="off", log_level="warning", access_log=False,
                                timeout_graceful_shutdown=1)
        self._server = _QuietServer(config)
        self._thread: threading.Thread | None = None

    @property
    def base(self) -> str:
        """Returns http://127.0.0.1:PORT."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """Returns the Katapult base URL on this server."""
        return self.base + PREFIX

    def __enter__(self) -> AsgiServer:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._server.serve(sockets=[self._sock])),
                                        name="hostile-asgi", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the ASGI server did not start")
            time.sleep(0.005)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        self._sock.close()


# ---- a webhook receiver that fails and quotes the request headers --------------------------------------------


class EchoHeadersApp:
    """ASGI webhook receiver: answers every request 500 with the request's headers as JSON in the body."""

    def __init__(self) -> None:
        self.requests: list[dict[str, str]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        while True:
            message = await receive()
            if not message.get("more_body"):
                break
        headers = {bytes(k).decode("latin-1"): bytes(v).decode("latin-1") for k, v in scope["headers"]}
        self.requests.append(headers)
        body = json.dumps({"error": "internal error", "request_headers": headers}).encode()
        await send({"type": "http.response.start", "status": 500,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
