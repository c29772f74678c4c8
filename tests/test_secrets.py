"""Secrets never leak: not in logs, error messages, the database, reports or reprs."""

from __future__ import annotations

import json
import logging
import time

import httpx
import pytest
from receivers import HttpReceiver
from sqlalchemy import select

from auditor.config import Settings, load_settings
from auditor.fake import Fleet, create_app
from auditor.service import open_services
from auditor.service.clock import utcnow
from auditor.service.cycle import run_cycle
from auditor.service.delivery import drain
from auditor.service.queries import build_report
from auditor.store.tables import metadata

TOKEN = "kat-SECRET-token-5f3a9c"
HOOK_PATH = "/hooks/T0SECRETPATH/B0SECRETPATH"
HMAC_SECRET = "hmac-SECRET-value-77"


async def _dump_database(rt: object) -> str:
    engine = rt.store.engine  # type: ignore[attr-defined]
    chunks = []
    async with engine.connect() as conn:
        for table in metadata.sorted_tables:
            rows = (await conn.execute(select(table))).all()
            chunks.append(json.dumps([list(r) for r in rows], default=str))
    return "\n".join(chunks)


@pytest.fixture(scope="module")
def receiver():  # type: ignore[no-untyped-def]
    with HttpReceiver() as r:
        yield r


async def test_no_secret_in_logs_database_or_report(db_url: str, receiver: HttpReceiver,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    fleet = Fleet(tokens={TOKEN})
    org = fleet.add_org("acme")
    d1 = fleet.add_disk(org.id, "one")
    fleet.add_policy(d1.id, retention=1, interval="daily", next_invocation_at=int(time.time()) + 60)
    settings = Settings(**{
        "katapult": {"api_url": "http://fake/core/v1", "max_attempts": 1},
        "database": {"url": db_url},
        "audit": {"disks": [d1.id, "disk_doesnotexist0000"], "organizations": ["acme", "org_missing"]},
        "notifiers": [{"kind": "webhook", "name": "hook", "url": receiver.url + HOOK_PATH, "secret": HMAC_SECRET,
                       "min_severity": "low"}],
    })
    assert TOKEN not in repr(settings) and HOOK_PATH not in repr(settings) and HMAC_SECRET not in repr(settings)
    transport = httpx.ASGITransport(app=create_app(fleet))
    async with open_services(settings, transport=transport, token=TOKEN) as rt:
        assert TOKEN not in repr(rt.client)
        outcome = await run_cycle(rt)
        assert outcome.errors, "org_missing should be reported as an error"
        await drain(rt, within=10)
        report = await build_report(rt.store, now=utcnow())
        dump = await _dump_database(rt)
    assert receiver.requests, "the webhook should have been called"
    text = json.dumps(report) + dump + caplog.text + str(outcome.errors)
    for secret in (TOKEN, HOOK_PATH, "T0SECRETPATH", HMAC_SECRET):
        idx = text.find(secret)
        assert idx < 0, f"secret {secret[:6]}… leaked: {text[max(0, idx - 300):idx + 50]!r}"


async def test_wrong_token_error_names_no_token(db_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    fleet = Fleet(tokens={"the-right-one"})
    org = fleet.add_org("acme")
    disk = fleet.add_disk(org.id, "one")
    settings = Settings(**{"katapult": {"api_url": "http://fake/core/v1"}, "database": {"url": db_url},
                           "audit": {"disks": [disk.id]}})
    async with open_services(settings, transport=httpx.ASGITransport(app=create_app(fleet)), token=TOKEN) as rt:
        outcome = await run_cycle(rt)
    assert outcome.status.value == "failed"
    assert outcome.errors[0].code == "invalid_api_token"
    assert TOKEN not in caplog.text and TOKEN not in str(outcome.errors)


def test_token_file_and_env(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("KATAPULT_API_TOKEN", raising=False)
    secret_file = tmp_path / "token"
    secret_file.write_text(TOKEN + "\n")
    cfg = tmp_path / "a.toml"
    cfg.write_text(f'[katapult]\napi_token_file = "{secret_file}"\n')
    settings = load_settings(cfg)
    assert settings.katapult.token().get_secret_value() == TOKEN
    assert TOKEN not in repr(settings.katapult.token()) and TOKEN not in str(settings.katapult.token())
    monkeypatch.setenv("KATAPULT_API_TOKEN", "from-env-123")
    assert load_settings(None).katapult.token().get_secret_value() == "from-env-123"
