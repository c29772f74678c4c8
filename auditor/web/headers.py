"""Security headers on the dashboard's pages (and only there: /api, /docs and the probes keep their own)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]

# No inline script or style anywhere: the pages use a same-origin stylesheet and classes, and no JavaScript.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; frame-ancestors 'none'; "
       "base-uri 'none'; form-action 'self'")
PAGE_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),  # for browsers that predate frame-ancestors
)
NO_STORE = (b"cache-control", b"no-store")  # pages show the fleet's state: not for shared caches or history

PAGES = frozenset({"/", "/login", "/logout", "/audit", "/findings", "/runs", "/notifications", "/waivers"})
PAGE_PREFIXES = ("/disks/", "/static/")


def is_page(path: str) -> bool:
    """Returns whether `path` is one of the dashboard's (pages, their forms' targets and the stylesheet)."""
    return path in PAGES or path.startswith(PAGE_PREFIXES)


class PageHeaders:
    """ASGI middleware: adds PAGE_HEADERS (and `Cache-Control: no-store` unless set) to the dashboard's responses."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] != "http" or not is_page(scope.get("path", "")):
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in dict(PAGE_HEADERS)]
                headers.extend(PAGE_HEADERS)
                if not any(k.lower() == NO_STORE[0] for k, _ in headers):
                    headers.append(NO_STORE)
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)
