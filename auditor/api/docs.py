"""Offline /docs and /redoc: ReDoc served by this process from same-origin paths, never from a CDN.

FastAPI's built-in pages load their JavaScript and CSS from jsDelivr (and ReDoc's fonts from Google), so on a host
without internet access they are blank. Here both documented URLs show the same ReDoc page, built with FastAPI's
own `get_redoc_html` and pointed at files under `/docs-assets/`. One UI is enough for a read-mostly API whose only
auth is a static bearer token, and it is the one this package ships itself (Swagger UI came from an obscure PyPI
package, and its OAuth2 redirect page served no OAuth2 flow here).

ReDoc is shipped in this package, since the PyPI packages that bundle it leave out its licence (fastapi-offline,
fastapi-standalone-docs) or need Django (drf-spectacular-sidecar). `docs_assets/redoc/` holds
`redoc.standalone.js` from the npm package `redoc` at `REDOC_VERSION`, unmodified (`REDOC_SHA256`), with ReDoc's
MIT `LICENSE` and the bundle's third-party notices (`redoc.standalone.js.LICENSE.txt`, which the bundle's first
line points to and which is served beside it). To update: `npm pack redoc@<version>`, copy `package/LICENSE` and
`package/bundles/redoc.standalone.js*` (not the source map), then change both constants.

Only the files the page uses are served (an explicit table, not the whole vendored directory). Like the pages
they replace, they are public: the bearer token guards /api/* only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html
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
TEXT = "text/plain; charset=utf-8"
FAVICON = "data:,"
# The file names only change with a ReDoc upgrade; an hour of caching spares reloads without pinning old copies.
_CACHE = {"Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"}


@dataclass(frozen=True, slots=True)
class Asset:
    """One served file: where it is on disk and the content type it is served with."""

    file: Path
    media_type: str


def docs_assets() -> dict[str, Asset]:
    """Returns the files served under `ASSETS_URL`, by their path below it."""
    return {
        "redoc/redoc.standalone.js": Asset(REDOC_DIR / "redoc.standalone.js", JS),
        "redoc/redoc.standalone.js.LICENSE.txt": Asset(REDOC_DIR / "redoc.standalone.js.LICENSE.txt", TEXT),
        "redoc/LICENSE": Asset(REDOC_DIR / "LICENSE", TEXT),
    }


def add_offline_docs(app: FastAPI) -> None:
    """Adds /docs and /redoc (the same ReDoc page) and `/docs-assets/*` to an app created with both docs URLs None."""
    if app.openapi_url is None:
        return
    openapi_url = app.openapi_url
    assets = docs_assets()

    async def redoc(request: Request) -> Response:
        # Behind a proxy that strips a prefix the page must still point at the right URLs, as FastAPI's own do.
        prefix = str(request.scope.get("root_path", "")).rstrip("/")
        return get_redoc_html(
            openapi_url=f"{prefix}{openapi_url}",
            title=f"{app.title} - API docs",
            redoc_js_url=f"{prefix}{ASSETS_URL}/redoc/redoc.standalone.js",
            # An empty inline icon: ReDoc ships none, and FastAPI's default is fetched from its own site.
            redoc_favicon_url=FAVICON,
            # ReDoc falls back to the page's own fonts; Google Fonts would be one more external host.
            with_google_fonts=False,
        )

    async def asset(request: Request) -> Response:
        found = assets.get(str(request.path_params["name"]))
        if found is None:
            return PlainTextResponse("not found", status_code=404)
        return FileResponse(found.file, media_type=found.media_type, headers=_CACHE)

    # /docs is where the README and the startup log point; /redoc is FastAPI's usual address for the same page.
    for url in (DOCS_URL, REDOC_URL):
        app.add_route(url, redoc, methods=["GET"], include_in_schema=False)
    app.add_route(f"{ASSETS_URL}/{{name:path}}", asset, methods=["GET"], include_in_schema=False)
