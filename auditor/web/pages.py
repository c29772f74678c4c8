"""The dashboard's routes: server-rendered pages over the service's read side, login, and "Run audit now".

No business logic: every number comes from the service's queries (`auditor.service.queries`, shaped by `reports`
and `dashboard`), the same code the JSON API uses. Pages never show a secret: the token is only compared, and the
only setting read here is audit.interval.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Hashable
from datetime import datetime, timedelta
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, urlencode

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.routing import APIRoute
from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup, escape

from auditor.domain.listings import ALL_STATUSES, SORT_KEYS, FindingSearch, SortKey
from auditor.domain.models import Severity
from auditor.domain.rules import RULES
from auditor.errors import AuditorError, LeaseHeldError, StoreError
from auditor.service import dashboard, queries
from auditor.service.remediation import read_planned_fixes
from auditor.service.reports import iso
from auditor.service.versions import DataVersion, SingleFlight, data_version
from auditor.vocabulary import format_duration, format_percent
from auditor.web.auth import (
    SESSION_COOKIE,
    SESSION_TTL,
    Revocations,
    Session,
    Signer,
    client_address,
    is_https,
    safe_next,
    trusted_networks,
)
from auditor.web.charts import compliance_chart, severity_chart
from auditor.web.snapshots import LRU, Built, Slotted, Snapshots, slot

if TYPE_CHECKING:  # only types: importing auditor.api here would import this module back through create_app
    from auditor.api.deps import ApiDeps
    from auditor.service.services import Services

FINDING_STATUSES = {**{s: (s,) for s in ALL_STATUSES}, "all": ALL_STATUSES}
PAGE_SIZES = ("10", "25", "50", "100")
MAX_FORM = 8192  # bytes: a login or CSRF form is a few hundred
MAX_TEXT = 200
STYLESHEET = "dashboard.css"
OVERVIEW_CACHE_SIZE = 8  # rendered overviews: one per trend window (the latest minute's), per snapshot
FINDING_VIEWS = 128  # rendered findings views (filters, order, page size; ~10 kB each without their rows)
FINDING_PAGES = 1024  # per page of a view: the range it shows and its pager (a few hundred bytes)
# The overview's trend window ends when its page was rendered (a page is rendered once a minute per window): while
# the next minute's renders in a worker thread, the last one (the same data) is served if at most this old.
OVERVIEW_STALE = timedelta(minutes=5)
SIGNED_IN = True  # what the cached pages' templates see as the viewer: pages are only ever served to a session


class BadRequest(Exception):
    """A query parameter a page does not accept (answered 400 with the reason)."""


class _LoginRequired(Exception):
    def __init__(self, target: str) -> None:
        super().__init__(target)
        self.target = target


def _environment() -> Environment:
    # auto_reload off: the templates ship with the package, so no stat() of their files on every render.
    env = Environment(loader=PackageLoader("auditor.web", "templates"), autoescape=True, undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True, auto_reload=False)
    env.filters["iso"] = iso
    env.filters["quote"] = lambda value: quote(str(value), safe="")
    env.filters["duration"] = _duration
    env.filters["span"] = lambda seconds: format_duration(seconds, style="report")
    env.filters["pct"] = lambda value: format_percent(value, decimals=1)
    return env


def _duration(run: Any) -> str:
    if run.finished_at is None:
        return "—"
    return format_duration(run.finished_at - run.started_at, style="elapsed")


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


class _Memo:
    """A small LRU of computed values, keyed by what they depend on (the data version among it); concurrent misses
    build a value once. Values are read-only once stored: pages render from them, never change them. (The findings
    searches that the snapshot's index cannot answer, in SQL.)"""

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


def dashboard_router(deps: ApiDeps) -> APIRouter:
    """Returns the dashboard: /, /findings, /disks/{id}, /runs, /notifications, /waivers, /login, /logout, /audit."""
    env = _environment()
    signer = Signer(deps.token)
    services = deps.services
    revocations = Revocations(services, ttl=timedelta(seconds=deps.revocation_ttl))
    throttle = deps.logins
    proxies = trusted_networks(services.settings.api.trusted_proxies)
    clock = services.clock
    interval = services.settings.audit.interval
    version = DataVersion(services, ttl=deps.version_ttl)
    macros: Any = env.get_template("macros.html").module
    css = resources.files("auditor.web").joinpath("static", STYLESHEET).read_bytes()
    css_version = hashlib.sha256(css).hexdigest()[:12]
    css_url = f"/static/{STYLESHEET}?v={css_version}"

    def html(name: str, **context: Any) -> str:
        return env.get_template(name).render(is_guarded=signer.is_guarded, css_url=css_url, **context)

    def render(request: Request, name: str, *, viewer: Session | None, status: int = 200,
               **context: Any) -> HTMLResponse:
        now = clock()
        page = html(name, request_path=request.url.path, viewer=viewer,
                    csrf=signer.csrf(viewer) if viewer is not None else "", read_at=iso(now), **context)
        return HTMLResponse(page, status_code=status)

    def slotted(name: str, **context: Any) -> Slotted:
        """Renders a page once for every viewer: the CSRF token and the time it is read at are slots."""
        return Slotted(html(name, viewer=SIGNED_IN, csrf=slot("csrf"), read_at=slot("read_at"), **context))

    def send(viewer: Session, page: Slotted, **values: str | bytes) -> HTMLResponse:
        return HTMLResponse(page.fill({"csrf": signer.csrf(viewer), "read_at": iso(clock()) or "", **values}))

    # ---- the snapshot of the data and the pages rendered from it ------------------------------------------
    # One snapshot per data version (the latest run, the UTC day): read and prepared in a worker thread, once, for
    # every request that needs it. Pages are rendered from it once (the overview once a minute per window) and
    # served with the viewer's CSRF token and the time filled in; a new snapshot drops them.

    async def build_snapshot() -> tuple[Hashable, dashboard.Snapshot, dict[str, bytes]]:
        async def read_with_rows(own: Services) -> tuple[dashboard.Snapshot, dict[str, bytes]]:
            snap = await queries.read_snapshot(own)
            # What the remediation plan does about each open finding: shown in its row.
            fixes = await read_planned_fixes(own)
            # Each finding's table row, rendered (and encoded) here too: a findings page joins 50 of them.
            rows = {item.finding.fingerprint: str(macros.finding_row(item, fixes.get(item.finding.fingerprint)))
                    .encode() for item in (snap.index.items if snap.index is not None else ())}
            return snap, rows

        snap, rows = await queries.off_loop(services, read=read_with_rows)
        return data_version(snap.latest, snap.built_at), snap, rows

    snapshots = Snapshots(build_snapshot)
    overview_pages: LRU[tuple[int, int], tuple[datetime, Slotted]] = LRU(size=OVERVIEW_CACHE_SIZE)
    overview_builds = SingleFlight()
    finding_views: LRU[Hashable, Slotted] = LRU(size=FINDING_VIEWS)
    finding_pagers: LRU[Hashable, tuple[str, str]] = LRU(size=FINDING_PAGES)
    # Searches the snapshot's index does not cover (resolved findings, when there are too many to hold), in SQL.
    sql_pages = _Memo(size=FINDING_PAGES)  # per (search, page, snapshot): a page (its rows rendered) and the total
    sql_counts = _Memo(size=FINDING_PAGES)  # per (filters, snapshot): how many findings match
    serving = [0]  # the serial of the newest snapshot pages were rendered from

    async def current() -> Built:
        """Returns the snapshot of the current data version (waiting for its build if a run just committed)."""
        value, seen_at = await version.get()
        built = await snapshots.get(value, seen_at)
        if built.serial > serving[0]:  # pages of older snapshots are never served again
            serving[0] = built.serial
            overview_pages.clear()
            finding_views.clear()
            finding_pagers.clear()
        return built

    def render_overview(built: Built, days: int, now: datetime) -> Slotted:
        """Renders the overview with its trend window ending at `now` (in a worker thread: the charts are CPU)."""
        snap = built.snapshot
        trend, start = snap.trend(days=days, now=now)
        gap = 2 * interval
        return slotted("overview.html", nav="overview", days=days, trend_days=dashboard.TREND_DAYS,
                       severities=[s.value for s in reversed(Severity)], report=snap.report,
                       compliance_pct=snap.compliance_pct, unknown=snap.unknown, trend_runs=len(trend),
                       top=snap.top_open, top_limit=dashboard.TOP_FINDINGS,
                       charts=[compliance_chart(trend, start=start, end=now, gap=gap),
                               severity_chart(trend, start=start, end=now, gap=gap)],
                       banners=slot("banners"), last_good_ago=slot("last_good_ago"))

    async def overview_page(built: Built, days: int, now: datetime) -> Slotted:
        """Returns the overview of `days` rendered this minute; while that renders, the previous minute's (if at
        most OVERVIEW_STALE old: the same data, its window ending a little earlier)."""
        minute = now.replace(second=0, microsecond=0)
        held = overview_pages.get((built.serial, days))
        if held is not None and held[0] == minute:
            return held[1]

        async def build() -> Slotted:
            page = await asyncio.to_thread(render_overview, built, days, now)
            latest = overview_pages.get((built.serial, days))
            if built.serial == serving[0] and (latest is None or latest[0] < minute):
                overview_pages.put((built.serial, days), (minute, page))
            return page

        flight = overview_builds.start((built.serial, days, minute), build)
        if held is not None and abs(minute - held[0]) <= OVERVIEW_STALE:
            return held[1]
        return await asyncio.shield(flight)

    async def session_of(request: Request) -> Session | None:
        """Returns the request's session: signed by us, not expired and (when guarded) not logged out."""
        now = clock()
        session = signer.verify(request.cookies.get(SESSION_COOKIE), now=now)
        # Only a guarded dashboard's sessions are revoked: an open one's carry nothing but the CSRF binding.
        if session is not None and signer.is_guarded and await revocations.is_revoked(session, now=now):
            session = None
        request.state.viewer = session
        return session

    def known_viewer(request: Request) -> Session | None:
        """The session this request was found to have (None if not looked at yet): for error pages, which must
        not ask the database again (it may be why they are shown)."""
        viewer: Session | None = getattr(request.state, "viewer", None)
        return viewer

    async def viewer_of(request: Request) -> Session:
        """Returns the viewer's session: login first when guarded; an open dashboard hands one out."""
        session = await session_of(request)
        if session is not None:
            return session
        if signer.is_guarded:
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            raise _LoginRequired(target)
        session, cookie = signer.issue(now=clock())
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
                    response = render(request, "error.html", viewer=known_viewer(request), status=400,
                                      title="Bad request", message=str(exc))
                except StoreError as exc:
                    response = render(request, "error.html", viewer=known_viewer(request), status=503,
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
        if not signer.is_guarded or await session_of(request) is not None:
            return RedirectResponse(target, status_code=303)
        return render(request, "login.html", viewer=None, next=target, failed=False)

    @router.post("/login")
    async def login(request: Request) -> Response:
        form = await _form(request)
        target = safe_next(form.get("next"))
        if not signer.is_guarded:
            return RedirectResponse(target, status_code=303)
        now = clock()
        address = client_address(request.client.host if request.client else None,
                                 request.headers.get("x-forwarded-for"), trusted=proxies)
        wait = throttle.seconds_to_wait(address, now=now)
        if wait is not None:
            # Refused before the token is looked at: while an address waits, not even the right token opens.
            response = render(request, "login.html", viewer=None, status=429, next=target, failed=False,
                              retry_after=wait)
            response.headers["Retry-After"] = str(wait)
            return response
        if not signer.check_token(form.get("token", "")):
            throttle.failed(address, now=now)
            # The submitted text is never echoed back: it may be a near-miss of the real token.
            return render(request, "login.html", viewer=None, status=401, next=target, failed=True)
        throttle.succeeded(address)
        _session, cookie = signer.issue(now=now)
        request.state.new_session = cookie
        return RedirectResponse(target, status_code=303)

    @router.post("/logout")
    async def logout(request: Request) -> Response:
        form = await _form(request)
        session = await session_of(request)
        if session is not None and not signer.check_csrf(session, form.get("csrf")):
            return render(request, "error.html", viewer=session, status=403, title="Forbidden",
                          message="The form was not sent by this dashboard (missing or wrong CSRF token).")
        if session is not None and signer.is_guarded:
            # Ended on the server: the cookie, if replayed, is refused by every replica (not just forgotten here).
            await revocations.revoke(session)
        response = RedirectResponse("/login" if signer.is_guarded else "/", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict",
                               secure=is_https(request.url.scheme, request.headers.get("x-forwarded-proto")))
        return response

    # ---- pages -----------------------------------------------------------------------------------------

    @router.get("/")
    async def overview(request: Request) -> Response:
        viewer = await viewer_of(request)
        chosen = _choice(request.query_params.get("days"), [str(d) for d in dashboard.TREND_DAYS], name="days",
                         default="")
        built = await current()
        now = clock()
        days = int(chosen) if chosen else dashboard.default_trend_days(built.snapshot.history, now=now)
        page = await overview_page(built, days, now)
        # What moves with the clock, per request: the banners (overdue) and the last good run's age.
        snap = built.snapshot
        banners = Markup("\n").join(macros.banner(b) for b in snap.banners(now=now, interval=interval))
        good = snap.last_good.finished_at if snap.last_good is not None else None
        age = f"{format_duration(now - good, style='age')} ago" if good is not None else "never"
        return send(viewer, page, banners=str(banners), last_good_ago=str(escape(age)))

    @router.post("/audit")
    async def run_audit(request: Request) -> Response:
        form = await _form(request)
        session = await session_of(request)
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
        viewer = await viewer_of(request)
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
            tier=_text(q.get("tier"), name="tier"),
            sort=_sort_key(sort), descending=direction == "desc", limit=int(size))
        page = _page_number(q.get("page"))
        built = await current()
        snap = built.snapshot
        if snap.index is not None and snap.index.covers(search.statuses):
            result = snap.index.page(search, page=page, sources=snap.sources, tiers=snap.tiers)
            rows = b"\n".join([built.rows[item.finding.fingerprint] for item in result.items])
        else:
            result, rows = await sql_page(built, search, page)
        view_key = (built.serial, status, search)
        view = finding_views.get(view_key)
        pieces = finding_pagers.get((view_key, result.page))
        if view is None or pieces is None:
            filters = {"status": status, "rule": search.rule or "", "severity": search.severity or "",
                       "org": search.org or "", "disk": search.text or "", "sort": sort, "dir": direction or "desc",
                       "size": size, "tier": search.tier or ""}

            def url_with(**changes: Any) -> str:
                params = {k: v for k, v in {**filters, **changes}.items() if v not in ("", None)}
                return "/findings?" + urlencode(params)

            if view is None:
                # Rendered once per view (filters, order, page size) and snapshot; a page fills in its rows, the
                # range it shows and its pager.
                view = slotted("findings.html", nav="findings", total=result.total, sources=result.sources,
                               tiers=result.tiers,
                               filters=filters, url_with=url_with, rules=list(RULES),
                               severities=[s.value for s in reversed(Severity)], statuses=list(FINDING_STATUSES),
                               sort_keys=SORT_KEYS, page_sizes=PAGE_SIZES, showing=slot("showing"),
                               rows=slot("rows"), pager=slot("pager"))
            if pieces is None:
                first = (result.page - 1) * search.limit + 1
                pieces = (f", showing {first}–{first + len(result.items) - 1}" if result.items else "",
                          str(macros.pager(result.page, result.pages, url_with)))
            if built.serial == serving[0]:
                finding_views.put(view_key, view)
                finding_pagers.put((view_key, result.page), pieces)
        return send(viewer, view, showing=pieces[0], rows=rows, pager=pieces[1])

    async def sql_page(built: Built, search: FindingSearch, page: int) -> tuple[dashboard.FindingsResult, bytes]:
        """A findings search the snapshot's index does not cover, in SQL, and its rows (memoized per snapshot)."""

        async def count() -> int:
            return await queries.count_findings(services, search=search)

        async def build() -> tuple[dashboard.FindingsResult, bytes]:
            # The total depends on the filters only: counted once for all their orders and pages.
            filters_only = (search.statuses, search.rule, search.severity, search.org, search.text, search.tier)
            result = await queries.read_search_page(
                services, search=search, page=page, sources=built.snapshot.sources,
                total=await sql_counts.get(("count", filters_only, built.serial), count))
            return result, "\n".join(macros.finding_row(item) for item in result.items).encode()

        found: tuple[dashboard.FindingsResult, bytes] = await sql_pages.get(("findings", search, page, built.serial),
                                                                          build)
        return found

    @router.get("/disks/{disk_id:path}")
    async def disk(request: Request, disk_id: str) -> Response:
        viewer = await viewer_of(request)
        if not disk_id or len(disk_id) > 256 or any(ord(c) <= 0x20 or c == "\x7f" for c in disk_id):
            raise BadRequest("not a disk id")
        detail = await queries.read_disk_detail(services, disk_id=disk_id)
        if detail is None:
            return render(request, "error.html", viewer=viewer, status=404, title="Unknown disk",
                          message=f"The auditor does not know the disk {disk_id}.")
        by_fp = {f["fingerprint"]: f for f in detail["findings"]}
        return render(request, "disk.html", viewer=viewer, nav="findings", d=detail, by_fp=by_fp)

    @router.get("/runs")
    async def runs(request: Request) -> Response:
        viewer = await viewer_of(request)
        notice = _choice(request.query_params.get("audit"), ("started", "busy", "unavailable"), name="audit")
        started = _text(request.query_params.get("run"), name="run") if notice == "started" else None
        records = await queries.read_recent_runs(services, limit=50)
        return render(request, "runs.html", viewer=viewer, nav="runs", runs=records, notice=notice,
                      started=started)

    @router.get("/notifications")
    async def notifications(request: Request) -> Response:
        viewer = await viewer_of(request)
        states, recent = await queries.read_notifier_states(services, limit=50)
        return render(request, "notifications.html", viewer=viewer, nav="notifications", states=states,
                      recent=recent, delivery_states=dashboard.DELIVERY_STATES)

    @router.get("/waivers")
    async def waivers(request: Request) -> Response:
        viewer = await viewer_of(request)
        view = await queries.read_waivers(services)
        return render(request, "waivers.html", viewer=viewer, nav="waivers", view=view, today=view.today)

    return router


def _sort_key(value: str) -> SortKey:
    for key in SORT_KEYS:
        if key == value:
            return key
    raise BadRequest(f"sort must be one of: {', '.join(SORT_KEYS)}")


__all__ = ["dashboard_router"]
