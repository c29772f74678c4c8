"""/docs and /redoc work offline: both are the vendored ReDoc, every asset they load is served by the app itself, and
ships with its licence."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import zipfile
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from auditor.api import ApiDeps, create_app
from auditor.api.docs import ASSETS_URL, REDOC_DIR, REDOC_SHA256, REDOC_VERSION, docs_assets
from auditor.config import Settings
from auditor.service import Services
from auditor.store.repo import Store

ROOT = Path(__file__).resolve().parent.parent
PAGES = ("/docs", "/redoc")
# What a browser fetches from the page: tag attributes and ReDoc's `spec-url`.
REFERENCE = re.compile(r"""(?:\bsrc|\bhref|\bspec-url)\s*=\s*["']([^"']+)["']""")
EXPECTED_TYPES = {".js": "text/javascript", ".json": "application/json"}
BUNDLE = f"{ASSETS_URL}/redoc/redoc.standalone.js"


async def _no_trigger() -> str | None:
    return None


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    # The docs never touch the database; an unmigrated SQLite file is enough to build the app.
    s = Store.from_url(f"sqlite:///{tmp_path / 'docs.db'}")
    try:
        yield s
    finally:
        await s.close()


def client(store: Store, *, root_path: str = "", token: str | None = "docs-test-token") -> httpx.AsyncClient:
    services = Services(settings=Settings(audit={"interval": timedelta(minutes=15)}), store=store)
    deps = ApiDeps(services=services, trigger=_no_trigger, token=SecretStr(token) if token else None)
    transport = httpx.ASGITransport(app=create_app(deps), root_path=root_path)
    return httpx.AsyncClient(transport=transport, base_url="http://api")


def references(html: str) -> list[str]:
    """Returns what a browser fetches for the page (an inline `data:` URI, the empty favicon, fetches nothing)."""
    return [ref for ref in REFERENCE.findall(html) if not ref.startswith("data:")]


@pytest.mark.parametrize("page", PAGES)
async def test_page_references_only_same_origin_assets_that_answer(store: Store, page: str) -> None:
    # The token is set, and still the page and its assets need none: the guard covers /api/* only, as before.
    async with client(store) as api:
        response = await api.get(page)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/html")
        html = response.text
        assert "http://" not in html and "https://" not in html, html
        refs = references(html)
        assert "/openapi.json" in refs
        assert any(r.endswith(".js") for r in refs), refs
        for ref in refs:
            # Relative to this origin: an absolute path, never a protocol-relative `//host/…`.
            assert ref.startswith("/") and not ref.startswith("//"), ref
            asset = await api.get(ref)
            assert asset.status_code == 200, ref
            suffix = Path(ref).suffix
            assert asset.headers["content-type"].startswith(EXPECTED_TYPES[suffix]), (ref, asset.headers)
            assert len(asset.content) > 0
        assert (await api.get("/api/v1/report")).status_code == 401


async def test_both_pages_are_the_vendored_redoc(store: Store) -> None:
    async with client(store) as api:
        pages = [(await api.get(page)).text for page in PAGES]
        assert pages[0] == pages[1]
        assert BUNDLE in references(pages[0])
        assert '<redoc spec-url="/openapi.json">' in pages[0]
        assert "swagger" not in pages[0].lower()
        # Swagger UI's OAuth2 redirect page went with Swagger UI: the API's only auth is a bearer token.
        assert (await api.get("/docs/oauth2-redirect")).status_code == 404


async def test_served_assets_are_the_shipped_files(store: Store) -> None:
    async with client(store) as api:
        for name, asset in docs_assets().items():
            response = await api.get(f"{ASSETS_URL}/{name}")
            assert response.status_code == 200, name
            assert response.content == asset.file.read_bytes(), name
            assert response.headers["x-content-type-options"] == "nosniff"
        # Only the table is served: not the rest of the vendored directories, nothing outside them.
        for path in ("swagger-ui/swagger-ui-bundle.js", "redoc/redoc.standalone.js.map", "redoc/../docs.py",
                     "redoc/%2e%2e/docs.py", "nothing"):
            assert (await api.get(f"{ASSETS_URL}/{path}")).status_code == 404, path


async def test_pages_follow_the_root_path_behind_a_proxy(store: Store) -> None:
    async with client(store, root_path="/auditor") as api:
        for page in PAGES:
            refs = references((await api.get(page)).text)
            assert refs and all(r.startswith("/auditor/") for r in refs), refs


async def test_docs_routes_stay_out_of_the_schema(store: Store) -> None:
    async with client(store, token=None) as api:
        paths = set((await api.get("/openapi.json")).json()["paths"])
    assert not {p for p in paths if p.startswith(("/docs", "/redoc"))}, paths


@pytest.mark.slow
def test_pages_need_no_docs_ui_package() -> None:
    # Swagger UI used to come from the `swagger-ui-bundle-v2` package, which an old environment may still hold: the
    # pages must work with it unimportable (a fresh process, so no earlier import can hide a new one).
    script = """
import asyncio, sys
sys.modules["swagger_ui_bundle"] = None  # `import swagger_ui_bundle` now raises ImportError
import httpx
from fastapi import FastAPI
from auditor.api.docs import add_offline_docs

async def main():
    app = FastAPI(docs_url=None, redoc_url=None)
    add_offline_docs(app)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as api:
        for path in ("/docs", "/redoc", "/docs-assets/redoc/redoc.standalone.js"):
            response = await api.get(path)
            assert response.status_code == 200, (path, response.status_code)

asyncio.run(main())
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_redoc_is_shipped_unmodified_with_its_licence() -> None:
    bundle = (REDOC_DIR / "redoc.standalone.js").read_bytes()
    assert hashlib.sha256(bundle).hexdigest() == REDOC_SHA256
    assert bundle.startswith(b"/*! For license information please see redoc.standalone.js.LICENSE.txt */")
    licence = (REDOC_DIR / "LICENSE").read_text()
    assert "The MIT License" in licence and "Rebilly" in licence
    notices = (REDOC_DIR / "redoc.standalone.js.LICENSE.txt").read_text()
    assert f'Version: "{REDOC_VERSION}"' in notices


@pytest.mark.slow
def test_wheel_ships_redoc_with_its_licence(tmp_path: Path) -> None:
    # Built the way the Dockerfile builds it (`pip wheel .`): hatch leaves out files .gitignore matches, so check
    # the real wheel rather than the tree.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(tmp_path),
                    str(ROOT)], check=True, timeout=300)
    [wheel] = tmp_path.glob("auditor-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        shipped = {n: zf.read(n) for n in names if n.startswith("auditor/api/docs_assets/")}
        metadata = next(zf.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    for name in ("LICENSE", "redoc.standalone.js", "redoc.standalone.js.LICENSE.txt"):
        path = f"auditor/api/docs_assets/redoc/{name}"
        assert shipped.get(path) == (REDOC_DIR / name).read_bytes(), path
    assert "Requires-Dist: swagger-ui-bundle" not in metadata
