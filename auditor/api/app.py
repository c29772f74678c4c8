"""`create_app(deps)`: the FastAPI application of the reports API, wired from what the daemon passes in."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from auditor import __version__
from auditor.api.deps import ApiDeps
from auditor.api.docs import add_offline_docs
from auditor.api.routes import api_router, ops_router
from auditor.errors import AuditorError, StoreError
from auditor.web import PageHeaders, dashboard_router

# A stateless declaration (it parses the header and documents the scheme in OpenAPI); it holds no token.
BEARER = HTTPBearer(auto_error=False, description="The token of `api.token` / `api.token_file`.")


def bearer_guard(token: SecretStr) -> Callable[..., Awaitable[None]]:
    """Returns a dependency that answers 401 unless the request carries `Authorization: Bearer <token>`."""
    expected = token.get_secret_value().encode()

    async def require_token(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)],
    ) -> None:
        given = credentials.credentials.encode() if credentials is not None else b""
        # Constant time, so the comparison does not reveal how much of a guess was right.
        if not hmac.compare_digest(given, expected):
            raise HTTPException(status_code=401, detail="missing or invalid bearer token",
                                headers={"WWW-Authenticate": "Bearer"})

    return require_token


async def _store_unavailable(_request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": f"database unavailable: {exc}"}, status_code=503)


async def _unavailable(_request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=503)


def create_app(deps: ApiDeps) -> FastAPI:
    """Returns the API application: /healthz, /readyz, /metrics open; /api/v1/* behind the token when set."""
    app = FastAPI(
        title="Katapult backup-policy auditor",
        version=__version__,
        description="Compliance reports, findings, disk history and audit runs, read from the auditor's "
                    "database; /metrics for Prometheus. Nothing here calls Katapult except POST /api/v1/audit.",
        docs_url=None, redoc_url=None,  # replaced by add_offline_docs: FastAPI's own pages load a CDN
    )
    add_offline_docs(app)
    # A database that stops answering is a 503 with the reason on every route, never a 500 traceback.
    app.add_exception_handler(StoreError, _store_unavailable)
    app.add_exception_handler(AuditorError, _unavailable)
    app.include_router(ops_router(deps))
    guard = [Depends(bearer_guard(deps.token))] if deps.token is not None else []
    app.include_router(api_router(deps, is_guarded=bool(guard)), prefix="/api/v1", dependencies=guard)
    # The dashboard (/, /findings, /disks/…, /login…): its own session login when a token is set; CSP and friends.
    app.include_router(dashboard_router(deps))
    app.add_middleware(PageHeaders)
    return app
