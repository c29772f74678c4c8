"""The dashboard's routes: server-rendered pages over the service's read side, login, and "Run audit now".

No business logic: every number comes from `auditor.service.reports` / `auditor.service.dashboard`, the same code
the JSON API uses. Pages never show a secret: the token is only compared, and nothing here reads settings.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Hashable
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, urlencode

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.routing import APIRoute
from jinja2 import Environment, PackageLoader, StrictUndefined

from auditor.domain.models import Severity
from auditor.domain.rules import RULES
from auditor.errors import AuditorError, LeaseHeldError, StoreError
from auditor.service import dashboard
from auditor.service.reports import build_report, disk_detail, iso
from auditor.store.dashboard import SORT_KEYS, FindingSearch, SortKey
from auditor.web.auth import SESSION_COOKIE, SESSION_TTL, Session, Signer, is_https, safe_next
from auditor.web.charts import compliance_chart, severity_chart

if TYPE_CHECKING:  # only a type: importing auditor.api here would import this module back through create_app
    from auditor.api.deps import ApiDeps

FINDING_STATUSES = {"open": ("open",), "waived": ("waived",), "resolved": ("resolved",),
                    "all": ("open", "waived", "resolved")}
PAGE_SIZES = ("10", "25", "50", "100")
MAX_FORM = 8192  # bytes: a login or CSRF form is a few hundred
MAX_TEXT = 200
STYLESHEET = "dashboard.css"
OVERVIEW_CACHE_SIZE = 16  # 3 windows, a few minutes each
FINDINGS_CACHE_SIZE = 512  # pages of findings searches (~50 rows each)


class BadRequest(Exception):
    """A query parameter a page does not accept (answered 400 with the reason)."""


class _LoginRequired(Exception):
    def __init__(self, target: str) -> None:
        super().__init__(target)
        self.target = target


def _environment() -> Environment:
    env = Environment(loader=PackageLoader("auditor.web", "templates"), autoescape=True, undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["iso"] = iso
    env.filters["quote"] = lambda value: quote(str(value), safe="")
    env.filters["ago"] = lambda value, now: dashboard.human_age(now - value) if value else "never"
    env.filters["duration"] = _duration
    env.filters["pct"] = lambda value: "n/a" if value is None else f"{value:.1f}%"
    return env


def _duration(run: Any) -> str:
    if run.finished_at is None:
        return "—"
    seconds = (run.finished_at - run.started_at).total_seconds()
    return f"{seconds:.2f}s" if seconds < 10 else f"{seconds:.0f}s"


def _text(value: str | None, *, name: str) -> str | None:
    """Returns a free-text parameter stripped, or None if empty; BadRequest if too long or with control chars."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    if len(value) > MAX_TEXT or any(ord(c) < 0x20 or c == "\x7f" for c in value):
        raise BadRequest(f"{name} must be at most {MAX_TEXT} printable characters")
    return value


def _choice(value: str | None, allowed: Any, *, name: str, default: str | None = None) -> str | None:
    if value is None or value == "":
        return default
    if value not in allowed:
        raise BadRequest(f"{name} must be one of: {', '.join(allowed)}")
    return value


def _page_number(value: str | None) -> int:
    if value is None or value == "":
        return 1
    if not value.isdigit() or not 1 <= int(value) <= 1_000_000:
        raise BadRequest("page must be a positive whole number")
    return int(value)


async def _form(request: Request) -> dict[str, str]:
    """Returns an url-encoded form's fields (first value of each); at most MAX_FORM bytes are read."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM:
            raise BadRequest("form too large")
    if request.headers.get("content-type", "").split(";")[0].strip() not in ("application/x-www-form-urlencoded",
                                                                            ""):
        raise BadRequest("expected an url-encoded form")
    try:
        fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=20)
    except (UnicodeDecodeError, ValueError):
        raise BadRequest("malformed form") from None
    return {k: v[0] for k, v in fields.items()}


class _DataVersion:
    """The data's version: the latest run (id, finish time) and the UTC day, as the API's response cache keys it.

    With `version_ttl` (the daemon: 1 s) the latest run is looked up at most that often.
    """

    def __init__(self, deps: ApiDeps) -> None:
        self.deps = deps
        self._value: Hashable = None
        self._checked = -1.0

    async def get(self) -> Hashable:
        """Returns the current version (looked up again after `version_ttl`)."""
        ttl = self.deps.version_ttl
        if ttl <= 0 or time.monotonic() - self._checked >= ttl:
            run = await self.deps.store.latest_run()
            self._value = ((run.id, run.finished_at) if run else None, self.deps.clock().date())
            self._checked = time.monotonic()
        return self._value


class _Memo:
    """A small LRU of computed values, keyed by what they depend on (the data version among it); concurrent misses
    build a value once. Values are read-only once stored: pages render from them, never change them."""

    def __init__(self, *, size: int) -> None:
        self.size = size
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._building: dict[Hashable, asyncio.Lock] = {}

    async def get(self, key: Hashable, build: Callable[[], Awaitable[Any]]) -> Any:
        """Returns the value for `key`, building it if missing (a failed build stores nothing)."""
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        lock = self._building.setdefault(key, asyncio.Lock())  # misses of different keys build side by side
        try:
            async with lock:
                if key not in self._items:
                    self._items[key] = await build()
                    while len(self._items) > self.size:
                        self._items.popitem(last=False)
                return self._items[key]
        finally:
            if not lock.locked() and self._building.get(key) is lock:
                del self._building[key]


class _ReportCache:
    """The compliance report, rebuilt when a run commits or the UTC day changes (as the API's response cache)."""

    def __init__(self, version: _DataVersion) -> None:
        self.version = version
        self._key: Hashable = None
        self._value: dict[str, Any] | None = None
        self._lock = asyncio.Lock()

    async def get(self, build: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
        """Returns the cached report, building it if the data changed."""
        key = await self.version.get()
        async with self._lock:
            if self._value is None or key != self._key:
                self._value, self._key = await build(), key
            return self._value


def dashboard_router(deps: ApiDeps) -> APIRouter:
    """Returns the dashboard: /, /findings, /disks/{id}, /runs, /notifications, /waivers, /login, /logout, /audit."""
    env = _environment()
    signer = Signer(deps.token)
    version = _DataVersion(deps)
    reports = _ReportCache(version)
    # What the pages compute from the data, per data version (a run commits: new keys; old ones age out). The HTML
    # is still rendered per request: it carries the viewer's CSRF token.
    overviews = _Memo(size=OVERVIEW_CACHE_SIZE)  # per (window, version, minute): trend, charts, banners
    finding_pages = _Memo(size=FINDINGS_CACHE_SIZE)  # per (search, page, version): a page and the total
    counts = _Memo(size=FINDINGS_CACHE_SIZE)  # per (filters, version): how many findings match
    sources = _Memo(size=4)  # per version: the organization filter's choices
    css = resources.files("auditor.web").joinpath("static", STYLESHEET).read_bytes()
    css_version = hashlib.sha256(css).hexdigest()[:12]

    def render(request: Request, name: str, *, viewer: Session | None, status: int = 200,
               **context: Any) -> HTMLResponse:
        page = env.get_template(name).render(
            request_path=request.url.path, viewer=viewer, is_guarded=signer.is_guarded,
            csrf=signer.csrf(viewer) if viewer is not None else "", css_url=f"/static/{STYLESHEET}?v={css_version}",
            now=deps.clock(), **context)
        return HTMLResponse(page, status_code=status)

    def session_of(request: Request) -> Session | None:
        return signer.verify(request.cookies.get(SESSION_COOKIE), now=deps.clock())

    def viewer_of(request: Request) -> Session:
        """Returns the viewer's session: login first when guarded; an open dashboard hands one out."""
        session = session_of(request)
        if session is not None:
            return session
        if signer.is_guarded:
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            raise _LoginRequired(target)
        session, cookie = signer.issue(now=deps.clock())
        request.state.new_session = cookie
        return session

    class PageRoute(APIRoute):
        """A page: login redirects, HTML errors (400, 503) instead of JSON, and the session cookie set."""

        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def run(request: Request) -> Response:
                try:
                    response = await handler(request)
                except _LoginRequired as exc:
                    response = RedirectResponse(f"/login?{urlencode({'next': exc.target})}", status_code=303)
                except BadRequest as exc:
                    response = render(request, "error.html", viewer=session_of(request), status=400,
                                      title="Bad request", message=str(exc))
                except StoreError as exc:
                    response = render(request, "error.html", viewer=session_of(request), status=503,
                                      title="Database unavailable", message=f"The database does not answer: {exc}")
                cookie = getattr(request.state, "new_session", None)
                if cookie is not None:
                    response.set_cookie(SESSION_COOKIE, cookie, max_age=int(SESSION_TTL.total_seconds()), path="/",
                                        httponly=True, samesite="strict", secure=is_https(
                                            request.url.scheme, request.headers.get("x-forwarded-proto")))
                return response

            return run

    router = APIRouter(route_class=PageRoute, include_in_schema=False)

    @router.get(f"/static/{STYLESHEET}")
    async def stylesheet() -> Response:
        return Response(css, media_type="text/css; charset=utf-8",
                        headers={"Cache-Control": "public, max-age=86400, immutable"})

    # ---- login -----------------------------------------------------------------------------------------

    @router.get("/login")
    async def login_form(request: Request) -> Response:
        target = safe_next(request.query_params.get("next"))
        if not signer.is_guarded or session_of(request) is not None:
            return RedirectResponse(target, status_code=303)
        return render(request, "login.html", viewer=None, next=target, failed=False)

    @router.post("/login")
    async def login(request: Request) -> Response:
        form = await _form(request)
        target = safe_next(form.get("next"))
        if not signer.is_guarded:
            return RedirectResponse(target, status_code=303)
        if not signer.check_token(form.get("token", "")):
            # The submitted text is never echoed back: it may be a near-miss of the real token.
            return render(request, "login.html", viewer=None, status=401, next=target, failed=True)
        _session, cookie = signer.issue(now=deps.clock())
        request.state.new_session = cookie
        return RedirectResponse(target, status_code=303)

    @router.post("/logout")
    async def logout(request: Request) -> Response:
        form = await _form(request)
        session = session_of(request)
        if session is not None and not signer.check_csrf(session, form.get("csrf")):
            return render(request, "error.html", viewer=session, status=403, title="Forbidden",
                          message="The form was not sent by this dashboard (missing or wrong CSRF token).")
        response = RedirectResponse("/login" if signer.is_guarded else "/", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict",
                               secure=is_https(request.url.scheme, request.headers.get("x-forwarded-proto")))
        return response

    # ---- pages -----------------------------------------------------------------------------------------

    @router.get("/")
    async def overview(request: Request) -> Response:
        viewer = viewer_of(request)
        days = int(_choice(request.query_params.get("days"), [str(d) for d in dashboard.TREND_DAYS], name="days",
                           default="7") or 7)
        now = deps.clock()

        async def build() -> dict[str, Any]:
            # Computed once per window, data version and minute: the window's end and the banners' "overdue" text
            # move with the clock, so a view is at most a minute behind it (the data itself, never: a run that
            # commits changes the version).
            waivers, problems = deps.waivers()

            async def report() -> dict[str, Any]:
                return await build_report(deps.store, now=now, waivers=waivers, waiver_problems=problems)

            data = await dashboard.overview(deps.store, now=now, interval=deps.interval, days=days,
                                            report=await reports.get(report))
            gap = 2 * deps.interval
            return {"data": data,
                    "charts": [compliance_chart(data.trend, start=data.trend_start, end=now, gap=gap),
                               severity_chart(data.trend, start=data.trend_start, end=now, gap=gap)],
                    "unknown": [d for d in data.report["disks"] if d["status"] == "unknown"]}

        minute = now.replace(second=0, microsecond=0)
        view = await overviews.get(("overview", days, await version.get(), minute), build)
        return render(request, "overview.html", viewer=viewer, nav="overview", days=days,
                      trend_days=dashboard.TREND_DAYS, severities=[s.value for s in reversed(Severity)], **view)

    @router.post("/audit")
    async def run_audit(request: Request) -> Response:
        form = await _form(request)
        session = session_of(request)
        if not signer.check_csrf(session, form.get("csrf")):
            return render(request, "error.html", viewer=session, status=403, title="Forbidden",
                          message="The form was not sent by this dashboard (missing or wrong CSRF token). "
                                  "Reload the page and try again.")
        try:
            run_id = await deps.trigger()
        except LeaseHeldError:
            return RedirectResponse("/runs?audit=busy", status_code=303)
        except AuditorError:  # e.g. the daemon is still starting
            return RedirectResponse("/runs?audit=unavailable", status_code=303)
        if run_id is None:
            return RedirectResponse("/runs?audit=busy", status_code=303)
        return RedirectResponse(f"/runs?{urlencode({'audit': 'started', 'run': run_id})}", status_code=303)

    @router.get("/findings")
    async def findings(request: Request) -> Response:
        viewer = viewer_of(request)
        q = request.query_params
        status = _choice(q.get("status"), FINDING_STATUSES, name="status", default="open") or "open"
        sort = _choice(q.get("sort"), SORT_KEYS, name="sort", default="severity") or "severity"
        direction = _choice(q.get("dir"), ("asc", "desc"), name="dir", default="desc")
        size = _choice(q.get("size"), PAGE_SIZES, name="size", default="50") or "50"
        search = FindingSearch(
            statuses=FINDING_STATUSES[status],
            rule=_choice(q.get("rule"), list(RULES), name="rule"),
            severity=_choice(q.get("severity"), [s.value for s in Severity], name="severity"),
            org=_text(q.get("org"), name="org"),
            text=_text(q.get("disk"), name="disk"),
            sort=_sort_key(sort), descending=direction == "desc", limit=int(size))
        page = _page_number(q.get("page"))
        current = await version.get()

        async def choices() -> list[str]:
            return await dashboard.disk_sources(deps.store)

        async def count() -> int:
            return await dashboard.count_findings(deps.store, search)

        async def build() -> dashboard.FindingsResult:
            # The total depends on the filters only: counted once for all their orders and pages.
            filters_only = (search.statuses, search.rule, search.severity, search.org, search.text)
            return await dashboard.search_findings(
                deps.store, search, page=page, sources=await sources.get(("sources", current), choices),
                total=await counts.get(("count", filters_only, current), count))

        result = await finding_pages.get(("findings", search, page, current), build)
        filters = {"status": status, "rule": search.rule or "", "severity": search.severity or "",
                   "org": search.org or "", "disk": search.text or "", "sort": sort, "dir": direction or "desc",
                   "size": size}

        def url_with(**changes: Any) -> str:
            params = {k: v for k, v in {**filters, **changes}.items() if v not in ("", None)}
            return "/findings?" + urlencode(params)

        return render(request, "findings.html", viewer=viewer, nav="findings", result=result, filters=filters,
                      url_with=url_with, rules=list(RULES), severities=[s.value for s in reversed(Severity)],
                      statuses=list(FINDING_STATUSES), sort_keys=SORT_KEYS, page_sizes=PAGE_SIZES,
                      page_size=int(size))

    @router.get("/disks/{disk_id:path}")
    async def disk(request: Request, disk_id: str) -> Response:
        viewer = viewer_of(request)
        if not disk_id or len(disk_id) > 256 or any(ord(c) <= 0x20 or c == "\x7f" for c in disk_id):
            raise BadRequest("not a disk id")
        detail = await disk_detail(deps.store, disk_id)
        if detail is None:
            return render(request, "error.html", viewer=viewer, status=404, title="Unknown disk",
                          message=f"The auditor does not know the disk {disk_id}.")
        by_fp = {f["fingerprint"]: f for f in detail["findings"]}
        return render(request, "disk.html", viewer=viewer, nav="findings", d=detail, by_fp=by_fp)

    @router.get("/runs")
    async def runs(request: Request) -> Response:
        viewer = viewer_of(request)
        notice = _choice(request.query_params.get("audit"), ("started", "busy", "unavailable"), name="audit")
        started = _text(request.query_params.get("run"), name="run") if notice == "started" else None
        records = await deps.store.list_runs(limit=50)
        return render(request, "runs.html", viewer=viewer, nav="runs", runs=records, notice=notice,
                      started=started)

    @router.get("/notifications")
    async def notifications(request: Request) -> Response:
        viewer = viewer_of(request)
        states, recent = await dashboard.notifications(deps.store, limit=50)
        return render(request, "notifications.html", viewer=viewer, nav="notifications", states=states,
                      recent=recent, delivery_states=dashboard.DELIVERY_STATES)

    @router.get("/waivers")
    async def waivers(request: Request) -> Response:
        viewer = viewer_of(request)
        valid, problems = deps.waivers()
        now = deps.clock()
        view = dashboard.waiver_view(valid, problems, now=now)
        return render(request, "waivers.html", viewer=viewer, nav="waivers", view=view, today=now.date())

    return router


def _sort_key(value: str) -> SortKey:
    for key in SORT_KEYS:
        if key == value:
            return key
    raise BadRequest(f"sort must be one of: {', '.join(SORT_KEYS)}")


__all__ = ["dashboard_router"]
