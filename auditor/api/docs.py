"""Offline /docs and /redoc: Swagger UI and ReDoc served by this process from same-origin paths, never from a CDN.

FastAPI's built-in pages load their JavaScript and CSS from jsDelivr (and ReDoc's fonts from Google), so on a host
without internet access they are blank. Here the same pages are built with FastAPI's own `get_swagger_ui_html` /
`get_redoc_html`, pointed at files under `/docs-assets/`:

- Swagger UI comes from the installed `swagger-ui-bundle-v2` package (Apache-2.0; its LICENSE is in the
  distribution's metadata), which exposes the `swagger-ui-dist` directory as `swagger_ui_bundle.swagger_ui_path`.
- ReDoc is shipped in this package, since the PyPI packages that bundle it leave out its licence
  (fastapi-offline, fastapi-standalone-docs) or need Django (drf-spectacular-sidecar). `docs_assets/redoc/` holds
  `redoc.standalone.js` from the npm package `redoc` at `REDOC_VERSION`, unmodified (`REDOC_SHA256`), with ReDoc's
  MIT `LICENSE` and the bundle's third-party notices (`redoc.standalone.js.LICENSE.txt`, which the bundle's first
  line points to and which is served beside it). To update: `npm pack redoc@<version>`, copy `package/LICENSE` and
  `package/bundles/redoc.standalone.js*` (not the source map), then change both constants.

Only the files the two pages use are served (an explicit table, not the whole vendored directory). Like the pages
they replace, they are public: the bearer token guards /api/* only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import swagger_ui_bundle  # type: ignore[import-untyped]  # ships no py.typed
from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, PlainTextResponse
from starlette.requests import Request
from starlette.responses import Response

DOCS_URL = "/docs"
REDOC_URL = "/redoc"
ASSETS_URL = "/docs-assets"
REDOC_VERSION = "2.5.4"
REDOC_SHA256 = "dcaf76612bc4a3fbcc923a8966dee2f6146a5f32e5ce1b6f02dd60cbbf89500b"
REDOC_DIR = Path(__file__).parent / "docs_assets" / "redoc"

JS = "text/javascript; charset=utf-8"
CSS = "text/css; charset=utf-8"
TEXT = "text/plain; charset=utf-8"
PNG = "image/png"
# The file names only change with a dependency upgrade; an hour of caching spares reloads without pinning old copies.
_CACHE = {"Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"}


@dataclass(frozen=True, slots=True)
class Asset:
    """One served file: where it is on disk and the content type it is served with."""

    file: Path
    media_type: str


def swagger_ui_dir() -> Path:
    """Returns the installed `swagger-ui-dist` directory of `swagger-ui-bundle-v2`."""
    return Path(str(swagger_ui_bundle.swagger_ui_path))


def docs_assets() -> dict[str, Asset]:
    """Returns the files served under `ASSETS_URL`, by their path below it."""
    swagger = swagger_ui_dir()
    return {
        "swagger-ui/swagger-ui-bundle.js": Asset(swagger / "swagger-ui-bundle.js", JS),
        "swagger-ui/swagger-ui.css": Asset(swagger / "swagger-ui.css", CSS),
        "swagger-ui/favicon-32x32.png": Asset(swagger / "favicon-32x32.png", PNG),
        "redoc/redoc.standalone.js": Asset(REDOC_DIR / "redoc.standalone.js", JS),
        "redoc/redoc.standalone.js.LICENSE.txt": Asset(REDOC_DIR / "redoc.standalone.js.LICENSE.txt", TEXT),
        "redoc/LICENSE": Asset(REDOC_DIR / "LICENSE", TEXT),
    }


def add_offline_docs(app: FastAPI) -> None:
    """Adds /docs, its OAuth2 redirect page, /redoc and `/docs-assets/*` to an app created with both docs URLs None."""
    if app.openapi_url is None:
        return
    openapi_url = app.openapi_url
    assets = docs_assets()
    favicon = f"{ASSETS_URL}/swagger-ui/favicon-32x32.png"

    def root(request: Request) -> str:
        # Behind a proxy that strips a prefix the pages must still point at the right URLs, as FastAPI's own do.
        return str(request.scope.get("root_path", "")).rstrip("/")

    async def swagger_ui(request: Request) -> Response:
        prefix = root(request)
        redirect = app.swagger_ui_oauth2_redirect_url
        return get_swagger_ui_html(
            openapi_url=f"{prefix}{openapi_url}",
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{prefix}{ASSETS_URL}/swagger-ui/swagger-ui-bundle.js",
            swagger_css_url=f"{prefix}{ASSETS_URL}/swagger-ui/swagger-ui.css",
            swagger_favicon_url=f"{prefix}{favicon}",
            oauth2_redirect_url=f"{prefix}{redirect}" if redirect else None,
            init_oauth=app.swagger_ui_init_oauth,
            swagger_ui_parameters=app.swagger_ui_parameters,
        )

    async def oauth2_redirect(_request: Request) -> Response:
        return get_swagger_ui_oauth2_redirect_html()

    async def redoc(request: Request) -> Response:
        prefix = root(request)
        return get_redoc_html(
            openapi_url=f"{prefix}{openapi_url}",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{prefix}{ASSETS_URL}/redoc/redoc.standalone.js",
            redoc_favicon_url=f"{prefix}{favicon}",
            # ReDoc falls back to the page's own fonts; Google Fonts would be one more external host.
            with_google_fonts=False,
        )

    async def asset(request: Request) -> Response:
        found = assets.get(str(request.path_params["name"]))
        if found is None:
            return PlainTextResponse("not found", status_code=404)
        return FileResponse(found.file, media_type=found.media_type, headers=_CACHE)

    app.add_route(DOCS_URL, swagger_ui, methods=["GET"], include_in_schema=False)
    if app.swagger_ui_oauth2_redirect_url:
        app.add_route(app.swagger_ui_oauth2_redirect_url, oauth2_redirect, methods=["GET"], include_in_schema=False)
    app.add_route(REDOC_URL, redoc, methods=["GET"], include_in_schema=False)
    app.add_route(f"{ASSETS_URL}/{{name:path}}", asset, methods=["GET"], include_in_schema=False)

