"""Routes: operations (/healthz, /readyz, /metrics) and the reports API (/api/v1/*). They read through the service's
queries (`auditor.service.queries`, `auditor.service.compliance`) and never touch the store."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AfterValidator

from auditor.api import metrics
from auditor.api.cache import Rendered, ResponseCache
from auditor.api.deps import ApiDeps
from auditor.api.models import (
    AuditStarted,
    Compliance,
    DeliveryStateName,
    DiskDetail,
    ErrorDetail,
    FindingsPage,
    FindingStatusFilter,
    Health,
    NotificationsPage,
    Readiness,
    RemediationPlan,
    Report,
    RuleId,
    RunsPage,
    SeverityName,
)
from auditor.domain.alerts import Delivery
from auditor.domain.listings import ALL_STATUSES, FindingQuery, decode_cursor
from auditor.domain.periods import parse_instant
from auditor.domain.remediation import PlanFilter
from auditor.errors import ConfigError, LeaseHeldError, PlanFilterError, UnknownDiskError
from auditor.service import queries
from auditor.service.compliance import read_period_report
from auditor.service.remediation import make_plan
from auditor.service.reports import finding_json, iso, run_json
from auditor.service.versions import DataVersion

# Ids are opaque strings without whitespace or control characters (PostgreSQL rejects NUL in text outright).
ID_PATTERN = r"^[^\x00-\x20\x7f]+$"
TIER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # [[tiers]].name
ID_MAX = 256
STORE_DOWN: dict[int | str, dict[str, Any]] = {
    503: {"model": ErrorDetail, "description": "The database does not answer (or the auditor is starting)."},
}


def _valid_cursor(value: str | None) -> str | None:
    """Returns the cursor if it is one of ours (ValueError otherwise, which FastAPI answers with 422)."""
    if value is not None:
        disk_id, fingerprint = decode_cursor(value)
        if "\x00" in disk_id or "\x00" in fingerprint:
            raise ValueError("invalid cursor")
    return value


def _valid_instant(value: str | None) -> str | None:
    """Returns the value if it is an ISO-8601 date or datetime (ValueError otherwise: FastAPI answers 422)."""
    if value is not None:
        parse_instant(value)
    return value


INSTANT_HELP = "ISO-8601 date (midnight UTC) or datetime (UTC unless it has an offset)."


def ops_router(deps: ApiDeps) -> APIRouter:
    """Returns /healthz, /readyz and /metrics (never behind the token: probes and scrapers use them)."""
    router = APIRouter(tags=["operations"])

    @router.get("/healthz", response_model=Health, summary="Liveness")
    async def healthz() -> dict[str, str]:
        """200 while the process is alive."""
        return {"status": "ok"}

    @router.get("/readyz", response_model=Readiness, summary="Readiness",
                responses={503: {"model": Readiness, "description": "Not ready; `reason` says why."}})
    async def readyz() -> JSONResponse:
        """200 when the database answers and the last complete or partial cycle finished < 2 × audit.interval ago.

        Failed cycles do not count: an auditor that fails every cycle is not ready, whatever it last finished.
        """
        leadership = deps.leadership() if deps.leadership is not None else None
        ready = await queries.read_readiness(deps.services)
        return _readiness(ready.reason, ready.last_cycle, leadership)

    @router.get("/metrics", summary="Prometheus metrics", response_class=Response,
                responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                                 "description": "Prometheus text exposition format 0.0.4."}})
    async def prometheus_metrics() -> Response:
        """Cycle durations, Katapult traffic, dashboard logins, open findings and disks by status (stored state)."""
        state = await queries.read_stored_state(deps.services)
        process = metrics.ProcessInfo(queries.build_info(deps.services),
                                      deps.services.settings.audit.interval.total_seconds())
        return Response(metrics.render(deps.cycles, state, config=deps.config, logins=deps.logins, process=process),
                        media_type=metrics.CONTENT_TYPE)

    return router


def notification_json(d: Delivery) -> dict[str, Any]:
    """Returns an outbox entry as /api/v1/notifications lists it (no payload secrets: notifications hold none)."""
    n = d.notification
    return {
        "id": d.id,
        "notifier": d.notifier,
        "kind": d.kind,
        "state": d.state.value,
        "status": n.status.value,
        "attempts": d.attempts,
        "created_at": iso(d.created_at),
        "next_attempt_at": iso(d.next_attempt_at),
        "delivered_at": iso(d.delivered_at),
        "last_status": d.last_status,
        "last_error": d.last_error,
        "is_test": n.is_test,
        "is_repeat": n.is_repeat,
        "group_labels": dict(n.group_labels),
        "alerts": [{"fingerprint": a.fingerprint, "rule": a.rule, "severity": a.severity.value,
                    "status": a.status.value, "disk_id": a.disk_id, "policy_id": a.policy_id,
                    "summary": a.summary} for a in n.alerts],
    }


def _readiness(reason: str | None, last: dict[str, Any] | None, leadership: dict[str, Any] | None) -> JSONResponse:
    body: dict[str, Any] = {"status": "not ready" if reason else "ready", "reason": reason, "last_cycle": last}
    if leadership is not None:
        body.update(leadership)
    return JSONResponse(body, status_code=503 if reason else 200)


def api_router(deps: ApiDeps, *, is_guarded: bool) -> APIRouter:
    """Returns the /api/v1 routes (the caller mounts them and adds the token guard)."""
    errors: dict[int | str, dict[str, Any]] = dict(STORE_DOWN)
    if is_guarded:
        errors[401] = {"model": ErrorDetail, "description": "Missing or wrong bearer token."}
    router = APIRouter(tags=["reports"], responses=errors)
    cache = ResponseCache()

    version = DataVersion(deps.services, ttl=deps.version_ttl)

    async def data_version() -> Hashable:
        # Findings, disks and snapshots change only when a run commits; the date moves waiver expiry and drift.
        # With `version_ttl` (the daemon: 1 s) the latest run is looked up at most that often, by one query that
        # every request due at that moment shares, so a busy API does not query per request.
        return (await version.get())[0]

    def respond(request: Request, rendered: Rendered) -> Response:
        headers = {"Vary": "Accept-Encoding"}
        if "gzip" in request.headers.get("accept-encoding", ""):
            headers["Content-Encoding"] = "gzip"
            return Response(rendered.gz, media_type="application/json", headers=headers)
        return Response(rendered.raw, media_type="application/json", headers=headers)

    @router.get("/report", response_model=Report, summary="Compliance report")
    async def report(request: Request) -> Response:
        """The same JSON as `auditor report --format json` (rebuilt once per audit run, not per request)."""

        async def build() -> dict[str, Any]:
            return await queries.read_report(deps.services)

        return respond(request, await cache.get(("report", await data_version()), build))

    @router.get("/compliance", response_model=Compliance, summary="Compliance over a period")
    async def compliance(
        from_: Annotated[str | None, AfterValidator(_valid_instant),
                         Query(alias="from", max_length=64, description="Start of the period, included. "
                               + INSTANT_HELP + " Default: `to` minus 30 days.")] = None,
        to: Annotated[str | None, AfterValidator(_valid_instant),
                      Query(max_length=64, description="End of the period, excluded. " + INSTANT_HELP
                            + " Default: now.")] = None,
    ) -> JSONResponse:
        """Time-weighted compliance over [from, to) (at most 400 days): coverage and gaps, the fleet per UTC day,
        each disk, each rule and the waivers in force; `from` not before `to`, or a longer span, is 422."""
        try:
            report = await read_period_report(deps.services,
                                              start=parse_instant(from_) if from_ is not None else None,
                                              end=parse_instant(to) if to is not None else None)
        except ValueError as exc:
            raise RequestValidationError([{"type": "value_error", "loc": ("query", "from"), "msg": str(exc),
                                           "input": from_}]) from None
        return JSONResponse(report)

    @router.get("/findings", response_model=FindingsPage, summary="Findings, paginated")
    async def findings(
        status: Annotated[FindingStatusFilter, Query(description="Lifecycle state; `all` lists every one.")]
        = "open",
        rule: Annotated[RuleId | None, Query(description="Only this rule.")] = None,
        severity: Annotated[SeverityName | None, Query(description="Only this severity.")] = None,
        disk_id: Annotated[str | None, Query(description="Only this disk.", max_length=ID_MAX,
                                             pattern=ID_PATTERN)] = None,
        limit: Annotated[int, Query(ge=1, le=1000, description="Page size.")] = 100,
        cursor: Annotated[str | None, AfterValidator(_valid_cursor),
                          Query(description="`next_cursor` of the previous page.", max_length=2048)] = None,
        tier: Annotated[str | None, Query(description="Only findings of disks in this `[[tiers]]` entry.",
                                          max_length=64, pattern=TIER_PATTERN)] = None,
        *,
        request: Request,
    ) -> Response:
        """Findings ordered by disk and fingerprint, with their lifecycle times."""
        statuses = ALL_STATUSES if status == "all" else (status,)
        query = FindingQuery(statuses=statuses, rule=rule.value if rule is not None else None, severity=severity,
                             disk_id=disk_id, limit=limit, cursor=cursor, tier=tier)

        async def build() -> dict[str, Any]:
            page, next_cursor = await queries.read_findings(deps.services, query=query)
            return {"findings": [finding_json(f, with_resolution=True) for f in page], "next_cursor": next_cursor}

        return respond(request, await cache.get(("findings", query, await data_version()), build))

    @router.get("/disks/{disk_id}", response_model=DiskDetail, summary="One disk's history",
                responses={404: {"model": ErrorDetail, "description": "The auditor does not know this disk."}})
    async def disk(disk_id: Annotated[str, Path(max_length=ID_MAX, pattern=ID_PATTERN)]) -> JSONResponse:
        """The disk's current policies, findings, policy snapshot history, drift and finding events."""
        detail = await queries.read_disk_detail(deps.services, disk_id=disk_id)
        if detail is None:
            return JSONResponse({"detail": f"disk {disk_id} is not known to the auditor"}, status_code=404)
        return JSONResponse(detail)

    @router.get("/plan", response_model=RemediationPlan, summary="Remediation plan (read-only)",
                responses={409: {"model": ErrorDetail, "description": "[remediation] is not enabled, or a template "
                                                                      "would itself be a finding."},
                           404: {"model": ErrorDetail, "description": "`disk_id` names a disk the auditor does not "
                                                                      "know."}})
    async def plan(
        tier: Annotated[str | None, Query(description="Only disks of this `[[tiers]]` entry.", max_length=64,
                                          pattern=TIER_PATTERN)] = None,
        rule: Annotated[RuleId | None, Query(description="Only findings of this rule.")] = None,
        disk_id: Annotated[str | None, Query(description="Only this disk.", max_length=ID_MAX,
                                             pattern=ID_PATTERN)] = None,
    ) -> JSONResponse:
        """The same JSON as `auditor plan --format json`: what `auditor apply` would change (nothing is applied over
        HTTP). A tier no `[[tiers]]` entry names is 422, as an unknown rule is; a disk the auditor does not know is
        404, as on /api/v1/disks/{disk_id}."""
        only = PlanFilter(tier=tier, rule=rule.value if rule is not None else None, disk=disk_id)
        try:
            document = await make_plan(deps.services, only=only)
        except PlanFilterError as exc:
            raise RequestValidationError([{"type": "value_error", "loc": ("query", exc.option), "msg": str(exc),
                                           "input": getattr(only, exc.option)}]) from None
        except UnknownDiskError as exc:
            return JSONResponse({"detail": str(exc)}, status_code=404)
        except ConfigError as exc:
            return JSONResponse({"detail": "; ".join(exc.problems)}, status_code=409)
        return JSONResponse(document)

    @router.get("/runs", response_model=RunsPage, summary="Recent audit runs")
    async def runs(limit: Annotated[int, Query(ge=1, le=500, description="How many, newest first.")] = 20,
                   ) -> JSONResponse:
        """Recent audit runs with their status, traffic and errors, newest first."""
        records = await queries.read_recent_runs(deps.services, limit=limit)
        return JSONResponse({"runs": [run_json(r) for r in records]})

    @router.get("/notifications", response_model=NotificationsPage, summary="Recent notifications")
    async def notifications(
        limit: Annotated[int, Query(ge=1, le=500, description="How many, newest first.")] = 50,
        state: Annotated[DeliveryStateName | None, Query(description="Only this delivery state.")] = None,
    ) -> JSONResponse:
        """Recent alert notifications and their delivery state (attempts, last status and error)."""
        entries = await queries.read_notifications(deps.services, limit=limit, state=state)
        return JSONResponse({"notifications": [notification_json(d) for d in entries]})

    @router.post("/audit", status_code=202, response_model=AuditStarted, summary="Run an audit cycle now",
                 responses={409: {"model": ErrorDetail, "description": "A cycle is already running."}})
    async def audit() -> JSONResponse:
        """Starts a cycle and returns at once (202); 409 if one is already running."""
        try:
            run_id = await deps.trigger()
        except LeaseHeldError as exc:
            return JSONResponse({"detail": str(exc), "holder": exc.holder, "since": exc.since}, status_code=409)
        if run_id is None:
            here = deps.leadership().get("replica") if deps.leadership is not None else None
            return JSONResponse({"detail": "an audit cycle is already running",
                                 "holder": here or "this process"}, status_code=409)
        return JSONResponse({"status": "started", "run": run_id}, status_code=202)

    return router
