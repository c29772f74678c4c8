"""Running the fake Katapult on a loopback port: in the caller's event loop, or in a thread for sync tests."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from types import TracebackType

import uvicorn

from auditor.fake.app import PREFIX, FakeKatapult, create_app
from auditor.fake.fleet import Fleet

STARTUP_TIMEOUT_SECONDS = 10.0


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signals to its owner (stop it via `should_exit`) and reports listening."""

    def __init__(self, config: uvicorn.Config, *, on_started: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_started = on_started

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Captures nothing: uvicorn would re-raise SIGTERM after shutdown (STYLE: the owner decides)."""
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """Starts listening, then reports it."""
        await super().startup(sockets=sockets)
        if self.started:
            self._on_started()


def base_url(host: str, port: int) -> str:
    """Returns the API base URL (including /core/v1) for a host and port."""
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}{PREFIX}"


def _bind(host: str, port: int) -> socket.socket:
    """Returns a socket bound to host:port (port 0 picks a free one), so the port is known before serving."""
    # IPPROTO_TCP (not 0) lets asyncio switch Nagle off on accepted connections; otherwise every small
    # response waits ~40 ms for a delayed ACK.
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def _server(app: FakeKatapult, *, on_started: Callable[[], None]) -> _Server:
    """Returns a quiet uvicorn server for the fake app (no access log, no logging setup of its own)."""
    config = uvicorn.Config(app, log_config=None, log_level="warning", access_log=False, lifespan="off")
    return _Server(config, on_started=on_started)


async def serve(
    fleet: Fleet,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    ready: asyncio.Event | None = None,
    on_ready: Callable[[str], None] | None = None,
    app: FakeKatapult | None = None,
) -> None:
    """Serves `fleet` on host:port until cancelled; sets `ready` and calls `on_ready(base_url)` when up.

    Pass `app` (made by `create_app(fleet)`) to keep a handle for `app.replace_fleet` while it serves.
    """
    sock = _bind(host, port)
    url = base_url(host, sock.getsockname()[1])

    def started() -> None:
        if on_ready is not None:
            on_ready(url)
        if ready is not None:
            ready.set()

    server = _server(app if app is not None else create_app(fleet), on_started=started)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        server.should_exit = True
        await task
        raise
    finally:
        sock.close()


class FakeServer:
    """Context manager serving the fake on a free loopback port from a thread (see `.url`, `.fleet`)."""

    def __init__(self, fleet: Fleet | None = None, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.fleet = fleet if fleet is not None else Fleet()
        self.host = host
        self._requested_port = port
        self._sock: socket.socket | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None

    @property
    def port(self) -> int:
        """Returns the port the server listens on (only while started)."""
        if self._sock is None:
            raise RuntimeError("FakeServer is not running")
        port: int = self._sock.getsockname()[1]
        return port

    @property
    def url(self) -> str:
        """Returns the base URL including /core/v1."""
        return base_url(self.host, self.port)

    def start(self) -> None:
        """Starts serving in a background thread and returns once the server accepts connections."""
        if self._thread is not None:
            raise RuntimeError("FakeServer is already running")
        self._sock = _bind(self.host, self._requested_port)
        listening = threading.Event()
        server = self._server = _server(create_app(self.fleet), on_started=listening.set)
        sock = self._sock
        self._failure = None

        def run() -> None:
            try:
                asyncio.run(server.serve(sockets=[sock]))
            except BaseException as exc:  # handed to the starting thread, which re-raises it
                self._failure = exc

        self._thread = threading.Thread(target=run, name="fake-katapult", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while not listening.wait(0.02):
            if not self._thread.is_alive() or time.monotonic() > deadline:
                failure = self._failure
                self.stop()
                raise RuntimeError("the fake Katapult server did not start") from failure
            time.sleep(0.01)

    def stop(self) -> None:
        """Stops the server and waits for its thread."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=STARTUP_TIMEOUT_SECONDS)
        if self._sock is not None:
            self._sock.close()
        self._server = self._thread = self._sock = None

    def __enter__(self) -> FakeServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
