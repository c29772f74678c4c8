"""One headless Chromium per test process, driven by Playwright's sync API, lent to one test at a time.

Playwright's sync API runs its event loop in a greenlet of this thread and marks that loop as the thread's running
loop between calls (playwright/_impl/_greenlets.py, wait_for_future). While that mark is set, `asyncio.run` and
pytest-asyncio refuse to start a loop, so a browser simply kept open would break the async tests that follow it.
`Chromium.lend` therefore sets the mark only while a test holds the browser, and clears it afterwards: between
browser tests Playwright's loop is idle (no sync call is in progress), exactly as between two sync calls.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM = os.environ.get("AUDITOR_CHROMIUM", "/usr/bin/chromium")


def missing() -> str | None:
    """Returns why the browser tests cannot run here (None when they can)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as exc:  # pragma: no cover - the test extra installs it
        return f"playwright is not installed: {exc}"
    if not Path(CHROMIUM).exists():
        return f"Chromium not found at {CHROMIUM} (Debian package `chromium`; .ci/run installs it)"
    return None


class Chromium:
    """Starts Playwright and Chromium on first use; `close` stops both."""

    def __init__(self) -> None:
        self._manager: Any = None
        self._browser: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _start(self) -> None:
        from playwright.sync_api import sync_playwright

        manager = sync_playwright()
        playwright = manager.start()
        self._loop = asyncio._get_running_loop()  # Playwright's, marked running by the call that just returned
        try:
            self._browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        except BaseException:
            manager.__exit__(None, None, None)
            asyncio._set_running_loop(None)
            raise
        self._manager = manager

    @contextmanager
    def lend(self) -> Iterator[Any]:
        """Yields the browser for one test; closes the contexts the test left open."""
        if self._browser is None:
            self._start()
        else:
            asyncio._set_running_loop(self._loop)
        try:
            yield self._browser
        finally:
            try:
                for context in list(self._browser.contexts):
                    context.close()
            finally:
                asyncio._set_running_loop(None)

    def close(self) -> None:
        if self._manager is None:
            return
        asyncio._set_running_loop(self._loop)
        try:
            self._browser.close()
        finally:
            self._manager.__exit__(None, None, None)
            asyncio._set_running_loop(None)
            self._manager = self._browser = self._loop = None
