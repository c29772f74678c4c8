"""The environment contract: `AUDITOR_<SECTION>__<KEY>` overrides the file, lists and tables as JSON, errors name
the key and the variable and never quote the value."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from profiles import examples
from pydantic import BaseModel

from auditor.config import Settings, env_overrides, settings_from
from auditor.errors import ConfigError

SECRET_URL = "https://hooks.example.invalid/T000/B000/env-SECRET-91c3"
FILE = {
    "katapult": {"api_url": "https://katapult.example/core/v1", "per_page": 50, "max_attempts": 4},
    "audit": {"disks": ["disk_fromfilefromfile"], "interval": "5m"},
    "rules": {"severity": {"schedule-stale": "low"}, "min_retention": 9},
}


def problems(data: dict[str, object], environ: dict[str, str]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        settings_from(data, environ)
    return list(caught.value.problems)


def test_a_nested_variable_beats_the_file_and_keeps_the_rest_of_its_table() -> None:
    s = settings_from(FILE, {"AUDITOR_KATAPULT__PER_PAGE": "200", "AUDITOR_AUDIT__INTERVAL": "20s"})
    assert s.katapult.per_page == 200
    assert s.katapult.max_attempts == 4 and s.katapult.api_url == "https://katapult.example/core/v1"
    assert s.audit.interval == timedelta(seconds=20) and s.audit.disks == ["disk_fromfilefromfile"]


def test_lists_are_json_and_replace_the_files_list() -> None:
    s = settings_from(FILE, {"AUDITOR_AUDIT__DISKS": '["disk_aaaaaaaaaaaaaaaa", "disk_bbbbbbbbbbbbbbbb"]'})
    assert s.audit.disks == ["disk_aaaaaaaaaaaaaaaa", "disk_bbbbbbbbbbbbbbbb"]


def test_tables_merge_key_by_key_with_the_file() -> None:
    s = settings_from(FILE, {"AUDITOR_RULES__SEVERITY": '{"disk-in-trash": "critical"}'})
    assert s.rules.severity == {"schedule-stale": "low", "disk-in-trash": "critical"}
    assert s.rules.min_retention == 9


def test_a_whole_section_as_json_then_refined_by_a_nested_variable() -> None:
    s = settings_from({}, {"AUDITOR_KATAPULT": '{"per_page": 5, "max_attempts": 9}',
                           "AUDITOR_KATAPULT__MAX_ATTEMPTS": "3"})
    assert (s.katapult.per_page, s.katapult.max_attempts) == (5, 3)


def test_names_are_matched_without_regard_to_case() -> None:
    assert settings_from({}, {"auditor_katapult__per_page": "7"}).katapult.per_page == 7


def test_variables_naming_no_setting_are_not_settings() -> None:
    s = settings_from({}, {"AUDITOR_CONFIG": "/etc/x.toml", "AUDITOR_TEST_POSTGRES_URL": "postgresql://x/y",
                           "AUDITOR_": "x", "AUDITOR_KATAPULT__": "x", "OTHER_KATAPULT__PER_PAGE": "1"})
    assert s == Settings()


def test_an_unknown_key_below_a_section_is_an_error_naming_the_variable() -> None:
    (line,) = problems({}, {"AUDITOR_KATAPULT__BOGUS": "1"})
    assert line == "katapult.bogus: unknown key (env AUDITOR_KATAPULT__BOGUS)"


def test_a_list_that_is_not_json_is_one_line_naming_the_key_and_variable() -> None:
    (line,) = problems(FILE, {"AUDITOR_AUDIT__DISKS": "disk_aaaaaaaaaaaaaaaa"})
    assert line.startswith("audit.disks: not valid JSON (") and line.endswith("(env AUDITOR_AUDIT__DISKS)")
    assert "disk_aaaaaaaaaaaaaaaa" not in line


def test_json_problems_and_validation_problems_are_reported_together() -> None:
    lines = problems({}, {"AUDITOR_AUDIT__DISKS": "[", "AUDITOR_KATAPULT__PER_PAGE": "500"})
    assert [line.split(":")[0] for line in lines] == ["audit.disks", "katapult.per_page"]


def test_a_broken_notifier_list_never_quotes_its_secret() -> None:
    broken = f'[{{"kind": "slack", "name": "ops", "webhook_url": "{SECRET_URL}"'
    (line,) = problems({}, {"AUDITOR_NOTIFIERS": broken})
    assert line.startswith("notifiers: not valid JSON") and "(env AUDITOR_NOTIFIERS)" in line
    assert SECRET_URL not in line and "SECRET" not in line


def test_a_notifier_list_from_the_environment_holds_its_secret_masked() -> None:
    s = settings_from({}, {"AUDITOR_NOTIFIERS": f'[{{"kind": "slack", "name": "ops", "webhook_url": "{SECRET_URL}"}}]'})
    (notifier,) = s.notifiers
    assert notifier.kind == "slack" and SECRET_URL not in repr(s)


def test_scalar_values_stay_strings_even_when_they_look_like_json() -> None:
    # A token or URL is never JSON-decoded: only keys holding lists or tables are.
    s = settings_from({}, {"AUDITOR_API__TOKEN": '["not", "a", "list"]', "AUDITOR_DATABASE__URL": "sqlite:///[x].db"})
    assert s.api.token is not None and s.api.token.get_secret_value() == '["not", "a", "list"]'
    assert s.database.url.get_secret_value() == "sqlite:///[x].db"


def test_overrides_are_nested_as_the_file_is() -> None:
    overrides, errors = env_overrides({"AUDITOR_RULES__SEVERITY": '{"disk-in-trash": "low"}',
                                       "AUDITOR_RULES__MIN_RETENTION": "3", "AUDITOR_LOG__LEVEL": "debug"})
    assert errors == []
    assert overrides == {"rules": {"severity": {"disk-in-trash": "low"}, "min_retention": "3"},
                         "log": {"level": "debug"}}


@pytest.mark.slow
def test_check_config_with_a_non_json_list_exits_78_without_a_traceback(tmp_path: Path) -> None:
    # `AUDITOR_AUDIT__DISKS=disk_a` (a plain word where the list's JSON belongs) is the usual slip.
    env = {"PATH": "/usr/bin:/bin", "AUDITOR_AUDIT__DISKS": "disk_aaaaaaaaaaaaaaaa"}
    proc = subprocess.run([sys.executable, "-m", "auditor", "check-config"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 78, proc.stderr
    assert "Traceback" not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("config error:")]
    assert line.startswith("config error: audit.disks: not valid JSON") and "(env AUDITOR_AUDIT__DISKS)" in line


@pytest.mark.parametrize("url", ["postgresql+psycopg://auditor:pw-SECRET@db:port/auditor",
                                 "postgresql+psycopg://auditor:pw-SECRET@db:54 32/auditor"])
def test_a_database_port_that_is_not_a_number_is_a_config_error_without_the_url(url: str) -> None:
    (line,) = problems({"database": {"url": url}}, {})
    assert line.startswith("database.url: the port must be a number") and "SECRET" not in line


@pytest.mark.parametrize("url", ["postgresql+psycopg://a:p:w@[::1]:5432/x", "postgresql+psycopg:///x?host=/run/pg",
                                 "postgresql+psycopg://a@/db?host=h1:5432&host=h2:5433", "sqlite:///a:b.db"])
def test_database_urls_with_colons_elsewhere_are_accepted(url: str) -> None:
    assert settings_from({"database": {"url": url}}, {}).database.url.get_secret_value() == url


@pytest.mark.parametrize(("value", "problem"), [
    (float("inf"), "at most 36500d"), (float("nan"), "got NaN"), (1e300, "at most 36500d"),
    (2**63, "at most 36500d"), (10**400, "at most 36500d"), ("99999999999d", "at most 36500d"),
    ("9" * 400 + "s", "at most 36500d"), (float("-inf"), "cannot be negative"), (-(10**400), "cannot be negative"),
])
def test_durations_out_of_range_are_one_config_error(value: object, problem: str) -> None:
    # timedelta() of these raises OverflowError (or gives a date past year 9999 once added to now).
    (line,) = problems({"audit": {"interval": value}}, {})
    assert line.startswith("audit.interval: ") and problem in line


def test_the_longest_duration_is_accepted() -> None:
    assert settings_from({"history": {"keep": "36500d"}}, {}).history.keep == timedelta(days=36500)


@pytest.mark.slow
def test_an_infinite_interval_in_toml_exits_78_without_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "auditor.toml").write_text("[audit]\ninterval = inf\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "auditor", "check-config", "--config", "auditor.toml"],
                          cwd=tmp_path, env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 78 and "Traceback" not in proc.stderr, proc.stderr
    assert "config error: audit.interval: a duration can be at most 36500d" in proc.stderr


# ---- any input: a config error or valid settings, never another exception ----------------------------------------

_SECTION_KEYS = [(section, key) for section, field in Settings.model_fields.items()
                 if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
                 for key in field.annotation.model_fields]
_ODD = st.sampled_from([math.inf, -math.inf, math.nan, 10**400, -(10**400), 2**63, 1e300, -1, 0, True, None, "", " ",
                        "\x00", "inf", "nan", "9" * 400, "99999999999d", "[/bold]", [], {}, [1], {"a": 1}])
_VALUES = st.one_of(_ODD, st.integers(), st.floats(), st.text(max_size=12))


@settings(max_examples=examples(300), deadline=None,
          suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(st.sampled_from(_SECTION_KEYS), _VALUES), max_size=4),
       st.dictionaries(st.sampled_from(["AUDITOR_KATAPULT", "AUDITOR_AUDIT__DISKS", "AUDITOR_AUDIT__INTERVAL",
                                        "AUDITOR_RULES__SEVERITY", "AUDITOR_NOTIFIERS", "AUDITOR_KATAPULT__PER_PAGE",
                                        "AUDITOR_DAEMON__LEADER_TTL__X", "AUDITOR_TIERS"]),
                       st.one_of(st.text(max_size=12), _VALUES.map(lambda v: json.dumps(v))), max_size=3))
def test_any_section_values_give_settings_or_config_errors(items: list[tuple[tuple[str, str], Any]],
                                                           environ: dict[str, str]) -> None:
    data: dict[str, dict[str, Any]] = {}
    for (section, key), value in items:
        data.setdefault(section, {})[key] = value
    try:
        settings_from(data, environ)
    except ConfigError as exc:
        assert exc.problems and all(line and "\n" not in line for line in exc.problems)


def test_every_organization_and_the_attachment_refresh() -> None:
    s = settings_from({"audit": {"organizations": ["*", "acme"], "attachment_refresh": "6h"}}, {})
    assert s.audit.organizations == ["*", "acme"] and s.audit.attachment_refresh == timedelta(hours=6)
    assert settings_from({}, {}).audit.attachment_refresh == timedelta(hours=24)
    env = settings_from({}, {"AUDITOR_AUDIT__ORGANIZATIONS": '["*"]', "AUDITOR_AUDIT__ATTACHMENT_REFRESH": "2h"})
    assert env.audit.organizations == ["*"] and env.audit.attachment_refresh == timedelta(hours=2)


@pytest.mark.parametrize(("audit", "key", "needle"), [
    ({"organizations": ["**"]}, "audit.organizations", "neither a Katapult organization id"),
    ({"organizations": ["org_*"]}, "audit.organizations", "neither a Katapult organization id"),
    ({"attachment_refresh": "0s"}, "audit.attachment_refresh", "at least 1s"),
    ({"attachment_refresh": "soon"}, "audit.attachment_refresh", "expected a duration"),
])
def test_bad_organizations_and_attachment_refresh_name_the_key(audit: dict[str, object], key: str,
                                                                needle: str) -> None:
    (line,) = problems({"audit": audit}, {})
    assert line.startswith(f"{key}") and needle in line
