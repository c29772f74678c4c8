"""Reloading the configuration (SIGHUP), below the process: what changed and what needs a restart, the
fingerprint, the metrics, the log scrubber learning new secrets, and Services rewired on the same store."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest
from pydantic import SecretStr

from auditor.api import CycleMetrics
from auditor.api.metrics import render
from auditor.config import RESTART_KEYS, Settings, check_runnable, config_fingerprint, plan_reload, settings_from
from auditor.errors import ConfigError
from auditor.log import SecretScrubber, update_logging
from auditor.service.reloads import ConfigStatus
from auditor.service.services import Services, close_replaced, rewire
from auditor.store.repo import Store

BASE = {"audit": {"organizations": ["org_aaaaaaaaaaaaaaaa"]}, "database": {"url": "sqlite:///one.db"},
        "api": {"listen": "127.0.0.1:8080"}}


def settings(**tables: dict[str, object]) -> Settings:
    data = {key: dict(value) for key, value in BASE.items()}
    for key, value in tables.items():
        data[key] = {**data.get(key, {}), **value}
    return settings_from(data, {})


def test_a_reloadable_key_takes_effect_and_a_restart_key_keeps_its_running_value() -> None:
    old = settings()
    new = settings(rules={"min_retention": 3}, database={"url": "postgresql+psycopg://u:pw@db/auditor"},
                   api={"listen": "0.0.0.0:9090"}, log={"level": "debug", "format": "text"},
                   audit={"interval": "1m"})
    plan = plan_reload(old, new)
    assert set(plan.changed) == {"rules.min_retention", "log.level", "audit.interval"}
    assert set(plan.restart) == {"database.url", "api.listen", "log.format"}
    effective = plan.settings
    assert effective.rules.min_retention == 3 and effective.log.level == "debug"
    assert effective.audit.interval.total_seconds() == 60
    assert effective.database.url.get_secret_value() == "sqlite:///one.db"
    assert effective.api.listen == "127.0.0.1:8080" and effective.log.format == "auto"


def test_nothing_changed_is_an_empty_plan_with_the_same_settings() -> None:
    plan = plan_reload(settings(), settings())
    assert plan.changed == () and plan.restart == ()
    assert plan.settings == settings()


def test_lists_are_one_key_each_and_secrets_compare_by_value() -> None:
    hook = {"kind": "webhook", "name": "hook", "url": "https://hooks.example/one"}
    old = settings_from({**BASE, "notifiers": [hook]}, {})
    rotated = settings_from({**BASE, "notifiers": [{**hook, "url": "https://hooks.example/two"}],
                             "tiers": [{"name": "gold", "match": {"organizations": ["org_aaaaaaaaaaaaaaaa"]},
                                        "min_retention": 30}],
                             "waivers": [{"rule": "no-policy", "disk_id": "disk_aaaaaaaaaaaaaaaa",
                                          "reason": "r", "owner": "o", "expires": "2999-01-01"}]}, {})
    plan = plan_reload(old, rotated)
    assert set(plan.changed) == {"notifiers", "tiers", "waivers"} and plan.restart == ()


def test_every_restart_key_is_a_real_key() -> None:
    from auditor.config import _leaves

    assert set(RESTART_KEYS) <= set(_leaves(Settings()))


def test_the_fingerprint_is_stable_changes_with_the_config_and_never_holds_a_secret() -> None:
    a, b = settings(api={"token": "first-secret"}), settings(api={"token": "other-secret"})
    assert len(config_fingerprint(a)) == 64 and int(config_fingerprint(a), 16) >= 0
    assert config_fingerprint(a) == config_fingerprint(settings(api={"token": "first-secret"}))
    assert config_fingerprint(a) == config_fingerprint(b)  # secrets are redacted before hashing
    assert config_fingerprint(settings(rules={"min_retention": 3})) != config_fingerprint(settings())


def test_check_runnable_names_every_problem(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("KATAPULT_API_TOKEN", raising=False)
    broken = settings_from({"api": {"token_file": str(tmp_path / "missing")}}, {})
    with pytest.raises(ConfigError) as caught:
        check_runnable(broken)
    lines = caught.value.problems
    assert len(lines) == 3
    assert lines[0].startswith("katapult token: not set") and lines[1].startswith("api.token_file: cannot read")
    assert lines[2].startswith("audit: nothing to audit")
    monkeypatch.setenv("KATAPULT_API_TOKEN", "tok")
    assert check_runnable(settings(api={"token": "t"})) == (SecretStr("tok"), SecretStr("t"))


def test_the_metrics_show_the_config_in_force_and_the_failed_reloads() -> None:
    status = ConfigStatus(fingerprint="0123456789ab", loaded_at=1700000000.0)
    text = render(CycleMetrics(), None, config=status).decode()
    assert 'auditor_config_info{fingerprint="0123456789ab"} 1.0' in text
    assert "auditor_config_last_reload_success 1.0" in text
    assert "auditor_config_reload_failures_total 0.0" in text
    assert "auditor_config_last_reload_success_timestamp_seconds 1.7e+09" in text
    status.failed()
    text = render(CycleMetrics(), None, config=status).decode()
    assert "auditor_config_last_reload_success 0.0" in text and "auditor_config_reload_failures_total 1.0" in text
    status.succeeded("ba9876543210", at=1700000100.0)
    text = render(CycleMetrics(), None, config=status).decode()
    assert 'auditor_config_info{fingerprint="ba9876543210"} 1.0' in text
    assert "auditor_config_last_reload_success 1.0" in text and "auditor_config_reload_failures_total 1.0" in text
    assert "auditor_config" not in render(CycleMetrics(), None).decode()  # not a daemon: no reloads to report


def test_update_logging_masks_new_secrets_and_sets_the_level() -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(SecretScrubber(["old-secret-value"]))
    root.handlers[:] = [handler]
    try:
        update_logging(level="warning", secrets=["new-secret-value"])
        assert root.level == logging.WARNING
        logging.getLogger("t").warning("old-secret-value and new-secret-value")
        assert out.getvalue().strip() == "*** and ***"
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])


async def test_rewire_keeps_the_store_and_holder_and_closes_only_what_it_replaced(tmp_path: Path) -> None:
    first = settings_from({**BASE, "database": {"url": f"sqlite:///{tmp_path / 'a.db'}"},
                           "notifiers": [{"kind": "webhook", "name": "hook", "url": "https://hooks.example/x"}]},
                          {})
    from auditor.notify.dispatch import Dispatcher
    from auditor.service.services import client_from

    old = Services(settings=first, store=Store.from_url(first.database.url.get_secret_value()),
                   client=client_from(first, token="t"), dispatcher=Dispatcher())
    second = first.model_copy(update={"rules": first.rules.model_copy(update={"min_retention": 1}),
                                      "notifiers": []})
    new = rewire(old, second, token="t")
    assert new.store is old.store and new.holder is old.holder and new.settings is second
    assert new.rules is not old.rules and new.client is not old.client and new.dispatcher is None
    assert old.client is not None and old.dispatcher is not None
    await close_replaced(old, new)
    assert old.client._http.is_closed and old.dispatcher.http.is_closed  # type: ignore[attr-defined]
    assert new.client is not None and not new.client._http.is_closed  # type: ignore[attr-defined]
    await new.aclose()


def test_run_help_mentions_sighup() -> None:
    from click.testing import CliRunner

    from auditor.cli import main

    result = CliRunner().invoke(main, ["run", "--help"])
    assert result.exit_code == 0 and "SIGHUP reloads the configuration" in " ".join(result.output.split())
