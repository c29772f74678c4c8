"""Schemathesis against the app's own OpenAPI: whatever it sends, valid or not, no response is a server error."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any

import httpx
import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from profiles import examples
from schemathesis.checks import not_a_server_error
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from auditor.api import ApiDeps, create_app
from auditor.config import Settings
from auditor.fake import create_app as fake_app
from auditor.fake import demo_fleet
from auditor.fake.fleet import fake_id
from auditor.service import Services, open_services
from auditor.service.cycle import run_cycle
from auditor.store import engine as db
from auditor.store.repo import Store


async def _seed(settings: Settings) -> None:
    fleet, _ = demo_fleet(now=int(time.time()))
    fleet.rate_limit_per_minute = 100_000
    async with open_services(settings, transport=httpx.ASGITransport(app=fake_app(fleet)),
                            token="fake-token") as runtime:
        await run_cycle(runtime)
        fleet.update_policy(fake_id("dbp", "demo:legacy-db-data"), retention=30)
        await run_cycle(runtime)


async def _busy() -> str | None:
    # POST /api/v1/audit stays harmless here: the trigger always answers "a cycle is already running".
    return None


def _openapi() -> dict[str, Any]:
    """Returns the app's OpenAPI document (the schema does not depend on the data, so no database is opened)."""
    store = Store.from_url("sqlite:///:memory:")  # never connected: building the document reads no data
    services = Services(settings=Settings(audit={"interval": timedelta(minutes=15)}), store=store)
    return create_app(ApiDeps(services=services, trigger=_busy)).openapi()


# The document is loaded at import, as `parametrize` needs it at collection; `from_fixture` would build it from
# a fixture but does not work with pytest 9 (it sets `request.node._nodeid`, which pytest no longer has).
schema = schemathesis.openapi.from_dict(_openapi())


@pytest.fixture
def seeded_app(db_url: str) -> FastAPI:
    """The app over a store holding two real audits of the demo fleet."""
    _, targets = demo_fleet(now=int(time.time()))
    config = Settings(**{
        "katapult": {"api_url": "http://fake/core/v1", "per_page": 10, "max_requests_per_minute": 60000},
        "database": {"url": db_url},
        "audit": {"disks": targets.disks, "organizations": targets.organizations},
    })
    asyncio.run(_seed(config))
    # Schemathesis calls the ASGI app from its own event loop thread; without a pool every connection is opened
    # and closed in that loop.
    store = Store(create_async_engine(db.async_url(db_url), poolclass=NullPool))
    return create_app(ApiDeps(services=Services(settings=config, store=store), trigger=_busy))


@schema.parametrize()
@settings(max_examples=examples(25), deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case: schemathesis.Case, seeded_app: FastAPI) -> None:
    case.call_and_validate(app=seeded_app, checks=[not_a_server_error])
