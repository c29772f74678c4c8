"""docker-compose.yml and the Dockerfile, checked by structure (there is no Docker engine on these machines)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from auditor.config import DaemonSettings, parse_duration, settings_from

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def test_services_and_build(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"auditor", "postgres"} <= set(services)
    auditor = services["auditor"]
    assert auditor["build"]["context"] == "."
    assert (ROOT / auditor["build"].get("dockerfile", "Dockerfile")).is_file()
    assert auditor["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["postgres"]["image"].startswith("postgres:")
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    # The API is published on loopback only.
    assert all(str(p).startswith("127.0.0.1:") for p in auditor["ports"])


def test_token_is_a_compose_secret(compose: dict[str, Any]) -> None:
    auditor = compose["services"]["auditor"]
    env = env_of(auditor)
    secret_names = [s if isinstance(s, str) else s["source"] for s in auditor["secrets"]]
    for key in ("AUDITOR_API__TOKEN_FILE", "AUDITOR_KATAPULT__API_TOKEN_FILE"):
        name = env[key].removeprefix("/run/secrets/")
        assert env[key] == f"/run/secrets/{name}" and name in secret_names, key
        assert "file" in compose["secrets"][name]
    # No token in plain text anywhere in the service's environment.
    assert "AUDITOR_API__TOKEN" not in env and "KATAPULT_API_TOKEN" not in env


def test_healthcheck_hits_readyz(compose: dict[str, Any]) -> None:
    check = compose["services"]["auditor"]["healthcheck"]
    assert "/readyz" in " ".join(check["test"])
    assert parse_duration(check["start_period"]).total_seconds() >= 30


def test_stop_grace_period_exceeds_shutdown_grace(compose: dict[str, Any]) -> None:
    auditor = compose["services"]["auditor"]
    env = env_of(auditor)
    grace = parse_duration(env.get("AUDITOR_DAEMON__SHUTDOWN_GRACE", DaemonSettings().shutdown_grace))
    assert parse_duration(auditor["stop_grace_period"]) > grace
    assert auditor.get("stop_signal", "SIGTERM") == "SIGTERM"


def test_database_is_postgres_on_a_named_volume(compose: dict[str, Any]) -> None:
    volumes = compose["volumes"]
    mounts = compose["services"]["postgres"]["volumes"]
    named = [m.split(":", 1)[0] for m in mounts if m.split(":", 1)[1].startswith("/var/lib/postgresql/data")]
    assert named and named[0] in volumes and not named[0].startswith((".", "/"))
    url = env_of(compose["services"]["auditor"])["AUDITOR_DATABASE__URL"]
    assert url.startswith("postgresql+psycopg://") and "@postgres:5432/" in url


def test_the_environment_is_valid_configuration(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("AUDITOR_"):
            monkeypatch.delenv(key)
    for key, value in env_of(compose["services"]["auditor"]).items():
        monkeypatch.setenv(key, re.sub(r"\$\{[^}]*\}", "pw", value))
    settings = settings_from({})  # unknown keys or bad values would raise here
    assert settings.api.port == 8080 and settings.api.token_file == "/run/secrets/api_token"
    assert settings.database.url.get_secret_value().startswith("postgresql+psycopg://auditor:pw@postgres")


def test_dockerfile_runs_the_daemon() -> None:
    text = (ROOT / "Dockerfile").read_text()
    cmd = [line for line in text.splitlines() if line.startswith("CMD ")]
    assert json.loads(cmd[-1].removeprefix("CMD ")) == ["auditor", "run"]
    assert re.search(r"^USER (?!root)\S+", text, re.MULTILINE), "runs as an unprivileged user"
    assert re.search(r"^EXPOSE 8080$", text, re.MULTILINE)
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert {".venv", ".git", "*_token.txt", ".env", "config/auditor.toml"} <= set(ignored)


def test_the_auditor_scales_to_replicas(compose: dict[str, Any]) -> None:
    # `docker compose up --scale auditor=2`: no fixed container name, and a host port range with room for
    # every replica (a single fixed host port would make the second replica fail to start).
    auditor = compose["services"]["auditor"]
    assert "container_name" not in auditor
    [port] = auditor["ports"]
    match = re.fullmatch(r"127\.0\.0\.1:(\d+)-(\d+):8080", str(port))
    assert match and int(match.group(2)) - int(match.group(1)) + 1 >= 2, port
    ttl = parse_duration(env_of(auditor)["AUDITOR_DAEMON__LEADER_TTL"])
    assert DaemonSettings(leader_ttl=ttl).leader_ttl == ttl
    # The standby must be able to pass the healthcheck: /readyz on any replica reads the shared database.
    assert "/readyz" in " ".join(auditor["healthcheck"]["test"])
