"""deploy/: the Prometheus rules pass promtool (syntax and unit tests) and, like the Grafana dashboard, use only
metrics and labels a real /metrics scrape of the auditor exposes. The Docker image installs requirements.lock, which
pins every runtime dependency of pyproject.toml with its hashes."""

from __future__ import annotations

import fnmatch
import importlib.metadata
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from auditor.api import ApiDeps, CycleMetrics, create_app
from auditor.config import Settings
from auditor.fake import Fleet, demo_fleet
from auditor.fake import create_app as fake_app
from auditor.service import open_services
from auditor.service.cycle import run_cycle
from auditor.service.delivery import deliver_due

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERTS_TEST = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "auditor.json"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
PYPROJECT = ROOT / "pyproject.toml"
LOCK = ROOT / "requirements.lock"
DOCKERFILE = ROOT / "Dockerfile"
MAKEFILE = ROOT / "Makefile"
# The image's interpreter and platform, which `make lock` resolves for: environment markers are evaluated for it.
LOCK_PYTHON = "3.11"
LOCK_TARGET = {"python_version": LOCK_PYTHON, "python_full_version": f"{LOCK_PYTHON}.0", "sys_platform": "linux",
               "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
               "implementation_name": "cpython", "platform_python_implementation": "CPython"}
# How `uv pip compile` names pyproject.toml in a `# via` annotation.
VIA_PYPROJECT = "auditor (pyproject.toml)"
SHA256 = re.compile(r"--hash=sha256:[0-9a-f]{64}")

# Series Prometheus itself makes for every target, and labels it adds to every scraped series.
PROMETHEUS_SERIES = {"up"}
TARGET_LABELS = {"job", "instance"}
PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
                "group_right", "inf", "nan"}


@pytest.fixture
def promtool() -> str:
    """The promtool binary; missing, it skips locally and fails in CI (like PostgreSQL in conftest)."""
    found = shutil.which("promtool")
    if found is None:
        if IN_CI:
            pytest.fail("CI=true but promtool is not installed (Debian package `prometheus`)")
        pytest.skip("promtool is not installed (Debian package `prometheus`)")
    return found


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def dashboard_panels() -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for panel in dashboard()["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))  # a collapsed row keeps its panels inside
    return found


def dashboard_expressions() -> list[str]:
    exprs = [t["expr"] for p in dashboard_panels() for t in p.get("targets", [])]
    for variable in dashboard()["templating"]["list"]:
        query = variable.get("query")
        if variable["type"] == "query":
            text = query["query"] if isinstance(query, dict) else query
            # label_values(metric, label) names a metric the same way an expression does.
            exprs.extend(re.findall(r"label_values\(\s*([^,\s)]+)", text))
    return exprs


def grafana_to_promql(expr: str) -> str:
    """Returns the expression with Grafana's variables replaced by what they stand for."""
    return expr.replace("$__rate_interval", "5m").replace("$__interval", "1m").replace("$job", ".+")


def metric_names(expr: str) -> set[str]:
    """Returns the metric names an expression selects (its identifiers that are not functions, keywords or labels)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', " ", expr)  # strings
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # range and subquery windows
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)  # label lists
    s = re.sub(r"(?<![\w:])\d+(?:\.\d+)?(?:e[+-]?\d+|ms|[smhdwy])?\b", " ", s)  # numbers and durations
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", s):
        if s[match.end():].lstrip().startswith("("):
            continue  # a function or an aggregation
        if match.group() not in PROMQL_WORDS:
            names.add(match.group())
    return names


def matched_labels(expr: str) -> list[tuple[str, str]]:
    """Returns (metric, label) for every label matcher `metric{label=...}` in the expression."""
    pairs = []
    for metric, matchers in re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}", expr):
        for label in re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", matchers):
            pairs.append((metric, label))
    return pairs


def test_metric_name_extraction() -> None:
    expr = ('max by (job, notifier) (delta(auditor_notifications{state="failed"}[1h])) > 0 or '
            'time() - max(auditor_last_successful_cycle_timestamp_seconds offset 1h) > 2 * scalar(a:b_seconds) '
            'unless on (job) up{job="auditor"} and rate(x_total[$__rate_interval]) > 1e3')
    assert metric_names(grafana_to_promql(expr)) == {
        "auditor_notifications", "auditor_last_successful_cycle_timestamp_seconds", "a:b_seconds", "up", "x_total"}
    assert matched_labels(expr) == [("auditor_notifications", "state"), ("up", "job")]


async def scrape_after_a_cycle(tmp_path: Path, *, healthy: bool = False) -> list[Sample]:
    """Returns the samples /metrics exposes after a real cycle against the fake Katapult.

    By default the demo fleet (findings of every severity) and a webhook that answers 400 and so gives up the
    cycle's notifications, so the outbox has a `failed` state too; `healthy`: one organization whose only disk is
    compliant, and no notifier. The process is a leader, as in the daemon, so `auditor_leader` is there.
    """
    if healthy:
        fleet = Fleet()
        org = fleet.add_org("healthy")
        disk = fleet.add_disk(org.id, "data")
        fleet.add_policy(disk.id, retention=30, next_invocation_at=int(time.time()) + 3600)
        audit: dict[str, Any] = {"organizations": [org.id]}
        notifiers: list[dict[str, Any]] = []
    else:
        fleet, targets = demo_fleet(now=int(time.time()))
        audit = {"disks": targets.disks, "organizations": targets.organizations}
        notifiers = [{"kind": "webhook", "name": "hook", "url": "http://receiver/alerts", "min_severity": "low"}]
    fleet.rate_limit_per_minute = 100_000
    settings = Settings(**{
        "katapult": {"api_url": "http://fake/core/v1", "per_page": 10, "max_requests_per_minute": 60000},
        "database": {"url": f"sqlite:///{tmp_path / 'auditor.db'}"},
        "audit": audit,
        "notifiers": notifiers,
    })
    refuse = httpx.MockTransport(lambda _request: httpx.Response(400, text="no"))
    async with open_services(settings, transport=httpx.ASGITransport(app=fake_app(fleet)), token="fake-token",
                             notify_transport=refuse) as services:
        outcome = await run_cycle(services)
        if healthy:
            assert outcome.status.value == "complete" and not outcome.open_findings, outcome
        await deliver_due(services)
        cycles = CycleMetrics(is_leader=True)
        cycles.record(outcome)

        async def no_trigger() -> str | None:
            return None

        deps = ApiDeps(services=services, trigger=no_trigger, cycles=cycles)
        transport = httpx.ASGITransport(app=create_app(deps))
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as api:
            response = await api.get("/metrics")
    assert response.status_code == 200
    samples = []
    for family in text_string_to_metric_families(response.text):
        if not healthy:
            assert family.samples, f"{family.name} has no sample after a cycle: the scrape would hide a name"
        samples.extend(family.samples)
    return samples


async def test_every_metric_the_rules_and_dashboard_use_is_exposed(tmp_path: Path) -> None:
    samples = await scrape_after_a_cycle(tmp_path)
    exposed: dict[str, set[str]] = {}
    for sample in samples:
        exposed.setdefault(sample.name, set()).update(sample.labels)
    states = {s.labels["state"] for s in samples if s.name == "auditor_notifications"}
    assert {"failed"} <= states, states
    # The suffixes prometheus_client adds are what the text format carries.
    assert {"auditor_cycles_total", "auditor_cycle_duration_seconds_bucket", "auditor_cycle_duration_seconds_sum",
            "auditor_cycle_duration_seconds_count", "auditor_leader"} <= set(exposed)
    assert {"auditor_build_info", "auditor_audit_interval_seconds", "process_start_time_seconds"} <= set(exposed)
    [build] = [s for s in samples if s.name == "auditor_build_info"]
    assert build.value == 1 and build.labels["database"] == "sqlite" and build.labels["version"], build
    assert build.labels["python"] == platform.python_version()
    [interval] = [s.value for s in samples if s.name == "auditor_audit_interval_seconds"]
    assert interval == 900  # the default audit.interval, 15m
    recorded = {r["record"] for r in alert_rules() if "record" in r}
    sources = {"alerts.yml": [r["expr"] for r in alert_rules() if "alert" in r],
               "auditor.json": [grafana_to_promql(e) for e in dashboard_expressions()]}
    for source, exprs in sources.items():
        used: set[str] = set()
        for expr in exprs:
            names = metric_names(expr)
            assert names, (source, expr)
            used |= names
            for metric, label in matched_labels(expr):
                if metric in exposed:
                    assert label in exposed[metric] | TARGET_LABELS, (source, metric, label, expr)
        unknown = used - set(exposed) - PROMETHEUS_SERIES - (recorded if source == "alerts.yml" else set())
        assert not unknown, f"{source} uses metrics the auditor does not expose: {sorted(unknown)}"


def test_dashboard_parses_and_covers_the_metrics() -> None:
    board = dashboard()
    panels = [p for p in dashboard_panels() if p["type"] != "row"]
    assert board["title"] and board["uid"] and len(panels) >= 10
    ids = [p["id"] for p in dashboard_panels()]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in board["templating"]["list"]}
    for panel in panels:
        assert panel["title"] and panel["targets"] and {"x", "y", "w", "h"} <= set(panel["gridPos"]), panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and target["refId"]
            assert set(re.findall(r"\$(\w+)", target["expr"])) <= variables | {"__rate_interval"}, target["expr"]
    used = set().union(*(metric_names(grafana_to_promql(e)) for e in dashboard_expressions()))
    wanted = {"auditor_cycle_duration_seconds_bucket", "auditor_cycles_total", "auditor_katapult_requests_total",
              "auditor_katapult_rate_limited_total", "auditor_open_findings", "auditor_disks",
              "auditor_notifications", "auditor_consecutive_failed_cycles", "auditor_leader"}
    assert wanted <= used, wanted - used


def test_rules_cover_the_failure_modes() -> None:
    rules = {r["alert"]: r for r in alert_rules() if "alert" in r}
    for name in ("AuditorDown", "AuditorNoSuccessfulCycle", "AuditorCyclesFailing", "AuditorOpenCriticalFindings",
                 "AuditorNotificationsFailing", "AuditorStoreDown", "AuditorNoLeader"):
        assert name in rules, name
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


def test_promtool_checks_the_rules(promtool: str) -> None:
    result = run(promtool, "check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests_fire_the_alerts(promtool: str) -> None:
    # The unit tests prove, among others, that AuditorCyclesFailing and AuditorNoSuccessfulCycle fire (and not
    # before their time) on synthetic series.
    tested = {t["alertname"] for case in yaml.safe_load(ALERTS_TEST.read_text())["tests"]
              for t in case["alert_rule_test"] if t.get("exp_alerts")}
    assert {"AuditorCyclesFailing", "AuditorNoSuccessfulCycle"} <= tested
    result = run(promtool, "test", "rules", ALERTS_TEST.name, cwd=ALERTS_TEST.parent)
    assert result.returncode == 0, result.stdout + result.stderr


# The alerts whose timing depends on audit.interval (or which must stay single for one cause at any interval).
INTERVAL_ALERTS = ("AuditorCyclesFailing", "AuditorNoSuccessfulCycle", "AuditorNeverCompletedCycle", "AuditorDown")


def test_the_rules_assume_no_interval() -> None:
    # No interval written into the rules: no constant vector, and no `for` long enough to stand for 2 x interval.
    text = ALERTS.read_text()
    assert "vector(" not in text and "900" not in text
    [interval] = [r for r in alert_rules() if r.get("record") == "auditor:audit_interval_seconds"]
    assert metric_names(interval["expr"]) == {"auditor_audit_interval_seconds"}
    for rule in alert_rules():
        window = rule.get("for", "0m")
        assert re.fullmatch(r"\d+m", window) and int(window[:-1]) <= 10, (rule.get("alert"), window)
    # ... and the unit tests fire each interval-dependent alert under two different audit intervals.
    fired: dict[str, set[str]] = {}
    for case in yaml.safe_load(ALERTS_TEST.read_text())["tests"]:
        intervals = {v["values"].split("x")[0] for v in case["input_series"]
                     if v["series"].startswith("auditor_audit_interval_seconds")}
        for t in case["alert_rule_test"]:
            if t.get("exp_alerts"):
                fired.setdefault(t["alertname"], set()).update(intervals)
    for name in INTERVAL_ALERTS:
        assert len(fired.get(name, set())) >= 2, (name, fired.get(name))


def test_promtool_catches_a_hard_coded_interval(promtool: str, tmp_path: Path) -> None:
    # The unit tests can fail: the same tests against rules that assume 15m fail at the 1h interval.
    broken = ALERTS.read_text().replace("expr: max by (job) (auditor_audit_interval_seconds)",
                                        "expr: max by (job) (auditor_audit_interval_seconds * 0 + 900)")
    assert broken != ALERTS.read_text()
    (tmp_path / "alerts.yml").write_text(broken)
    shutil.copy(ALERTS_TEST, tmp_path / "alerts_test.yml")
    result = run(promtool, "test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert result.returncode != 0 and "AuditorNoSuccessfulCycle" in result.stdout + result.stderr, result.stdout


def stat_panels() -> list[dict[str, Any]]:
    return [p for p in dashboard_panels() if p["type"] == "stat"]


async def test_grafana_stat_panels_show_zero_when_healthy(promtool: str, tmp_path: Path) -> None:
    # A real scrape of a healthy auditor (one compliant disk, a complete cycle, no notifier) fed to promtool: every
    # stat panel's query returns a value (never "No data"), 0 for the counts of trouble.
    samples = await scrape_after_a_cycle(tmp_path, healthy=True)
    series = []
    for sample in samples:
        labels = {**sample.labels, "job": "auditor", "instance": "a:8080"}
        text = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        series.append({"series": f"{sample.name}{{{text}}}", "values": f"{sample.value:g}x30"})
    expected = {"Consecutive failed cycles": 0, "Open critical findings": 0, "Failed notifications": 0,
                "Database up": 1, "Leaders": 1}
    rules, tests = [], []
    for i, panel in enumerate(stat_panels()):
        [target] = panel["targets"]
        expr = grafana_to_promql(target["expr"])
        rules.append({"record": f"stat:panel_{i}", "expr": expr})
        if panel["title"] in expected:
            tests.append({"expr": f"stat:panel_{i}", "eval_time": "10m",
                          "exp_samples": [{"labels": f"stat:panel_{i}", "value": expected[panel["title"]]}]})
        else:  # a value, whatever it is
            tests.append({"expr": f"count(stat:panel_{i})", "eval_time": "10m",
                          "exp_samples": [{"labels": "{}", "value": 1}]})
    assert set(expected) <= {p["title"] for p in stat_panels()}
    (tmp_path / "rules.yml").write_text(yaml.safe_dump({"groups": [{"name": "stats", "rules": rules}]}))
    (tmp_path / "test.yml").write_text(yaml.safe_dump({
        "rule_files": ["rules.yml"], "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": series, "promql_expr_test": tests}]}))
    result = run(promtool, "test", "rules", "test.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    # Without any auditor series the trouble counts show nothing rather than a reassuring 0.
    (tmp_path / "test.yml").write_text(yaml.safe_dump({
        "rule_files": ["rules.yml"], "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": [{"series": 'up{job="auditor", instance="a:8080"}',
                                                        "values": "0x30"}],
                   "promql_expr_test": [{"expr": f"count(stat:panel_{i})", "eval_time": "10m", "exp_samples": []}
                                        for i, _ in enumerate(stat_panels())]}]}))
    result = run(promtool, "test", "rules", "test.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_expressions_are_valid_promql(promtool: str, tmp_path: Path) -> None:
    # promtool parses every rule's expression: wrap each dashboard query in a recording rule.
    rules = [{"record": f"dashboard:query_{i}", "expr": grafana_to_promql(t["expr"])}
             for i, t in enumerate(t for p in dashboard_panels() for t in p.get("targets", []))]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run(promtool, "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


# ---- the image's lock ------------------------------------------------------------------------------------------


@dataclass
class Pin:
    """One entry of requirements.lock: the exact version, its hashes and what requires it (`# via`)."""

    version: str
    hashes: list[str] = field(default_factory=list)
    via: set[str] = field(default_factory=set)


def parse_lock(text: str) -> dict[str, Pin]:
    """Returns the lock's entries by canonical name; anything but `name==version --hash=…` lines and comments fails."""
    pins: dict[str, Pin] = {}
    current: Pin | None = None
    for line in text.replace("\\\n", " ").splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("#"):
            # After an entry, its comments are its `# via` block: `via parent` or `via` then one parent a line.
            parent = re.sub(r"^via(?:\s|$)", "", line.lstrip("#").strip()).strip()
            if current is not None and parent:
                current.via.add(parent)
            continue
        spec, _, options = line.partition(" --")
        options = f"--{options}" if options else ""
        assert not spec.startswith("-"), f"requirements.lock may hold pins only, not {line!r}"
        req = Requirement(spec)
        if req.marker is not None and not req.marker.evaluate(LOCK_TARGET):
            current = None
            continue
        [pinned] = req.specifier
        assert pinned.operator == "==" and "*" not in pinned.version and not req.url, f"not an exact pin: {spec}"
        current = pins[canonicalize_name(req.name)] = Pin(pinned.version, SHA256.findall(options))
        assert not SHA256.sub("", options).strip(), f"unexpected options in {line!r}"
    return pins


def extra_requirements(name: str, extra: str) -> list[str]:
    """Returns the distributions `name[extra]` adds on the lock's target (from the installed distribution's metadata:
    the test environment installs pyproject.toml's runtime dependencies)."""
    env = {**LOCK_TARGET, "extra": extra}
    added = []
    for text in importlib.metadata.requires(name) or []:
        req = Requirement(text)
        if req.marker is not None and "extra" in str(req.marker) and req.marker.evaluate(env):
            added.append(canonicalize_name(req.name))
    return added


def lock_problems(dependencies: list[str], pins: dict[str, Pin],
                  extras_of: Callable[[str, str], list[str]] = extra_requirements) -> list[str]:
    """Returns where pyproject.toml's runtime dependencies and the lock disagree (empty when they agree)."""
    problems = []
    direct = [r for r in map(Requirement, dependencies) if r.marker is None or r.marker.evaluate(LOCK_TARGET)]
    for req in direct:
        name = canonicalize_name(req.name)
        pin = pins.get(name)
        if pin is None:
            problems.append(f"{req} is not locked")
            continue
        if not req.specifier.contains(pin.version, prereleases=True):
            problems.append(f"{name}=={pin.version} is locked but pyproject.toml asks for {req}")
        for extra in sorted(req.extras):
            problems.extend(f"{dep}, which {name}[{extra}] needs, is not locked"
                            for dep in extras_of(name, extra) if dep not in pins)
    for name, pin in sorted(pins.items()):
        if not pin.hashes:
            problems.append(f"{name}=={pin.version} has no --hash")
        if not pin.via:
            problems.append(f"{name}=={pin.version} does not say what needs it (# via)")
    # Every pin must be needed: reachable from pyproject.toml's dependencies through `# via` (one left over from a
    # dependency pyproject.toml dropped still says it is needed by the project or by another leftover).
    needed = {canonicalize_name(r.name) for r in direct}
    parents = {n: {canonicalize_name(v) for v in pin.via if v != VIA_PYPROJECT} for n, pin in pins.items()}
    while grown := {n for n in pins.keys() - needed if parents[n] & needed}:
        needed |= grown
    problems.extend(f"{name}=={pins[name].version} is locked but nothing in pyproject.toml needs it"
                    for name in sorted(pins.keys() - needed))
    return problems


def runtime_dependencies() -> list[str]:
    deps: list[str] = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    return deps


def test_the_lock_pins_every_runtime_dependency_with_hashes() -> None:
    # Fails after a dependency is added, dropped or re-constrained in pyproject.toml until `make lock` is run.
    pins = parse_lock(LOCK.read_text())
    assert lock_problems(runtime_dependencies(), pins) == []
    assert {"greenlet", "psycopg-binary"} <= pins.keys()  # sqlalchemy[asyncio], psycopg[binary]


def test_the_lock_check_catches_drift() -> None:
    deps = runtime_dependencies()
    pins = parse_lock(LOCK.read_text())
    assert lock_problems([*deps, "swagger-ui-bundle-v2>=5.31"], pins) == ["swagger-ui-bundle-v2>=5.31 is not locked"]
    httpx_pin = pins["httpx"].version
    assert lock_problems([d if not d.startswith("httpx") else "httpx>999" for d in deps], pins) == [
        f"httpx=={httpx_pin} is locked but pyproject.toml asks for httpx>999"]
    # rich dropped: it and what only it needs are leftovers.
    leftovers = lock_problems([d for d in deps if not d.startswith("rich")], pins)
    assert leftovers and all(p.endswith("is locked but nothing in pyproject.toml needs it") for p in leftovers)
    assert {p.split("==")[0] for p in leftovers} >= {"rich", "pygments", "markdown-it-py"}
    no_hash = dict(pins, click=Pin(pins["click"].version, [], pins["click"].via))
    assert lock_problems(deps, no_hash) == [f"click=={pins['click'].version} has no --hash"]
    without_greenlet = {n: p for n, p in pins.items() if n != "greenlet"}
    assert "greenlet, which sqlalchemy[asyncio] needs, is not locked" in lock_problems(deps, without_greenlet)
    with pytest.raises(AssertionError, match="not an exact pin"):
        parse_lock("httpx>=0.27 --hash=sha256:" + "0" * 64)
    with pytest.raises(AssertionError, match="pins only"):
        parse_lock("--extra-index-url https://example.org/simple\n")


def dockerfile_commands() -> list[list[str]]:
    """Returns the commands of the Dockerfile's last stage (its RUN instructions split at `&&`), as argument lists."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    last_stage = re.split(r"^FROM ", text, flags=re.MULTILINE)[-1]
    return [shlex.split(command) for line in last_stage.splitlines() if line.startswith("RUN ")
            for command in line.removeprefix("RUN ").split("&&")]


def test_the_image_installs_the_lock_and_nothing_else() -> None:
    commands = dockerfile_commands()
    installs = [c for c in commands if c[:2] == ["pip", "install"]]
    [from_lock] = [c for c in installs if "-r" in c]
    lock_path = from_lock[from_lock.index("-r") + 1]
    assert Path(lock_path).name == LOCK.name
    assert "--require-hashes" in from_lock
    # --no-deps on every install: pip resolves nothing, so nothing outside the lock gets in.
    assert installs and all("--no-deps" in c for c in installs), installs
    assert installs[0] is from_lock and ["pip", "check"] in commands[commands.index(installs[-1]):]
    copied = re.findall(r"^COPY (\S+) (\S+)$", DOCKERFILE.read_text(), flags=re.MULTILINE)
    assert (LOCK.name, lock_path) in copied
    ignored = [p for p in (ROOT / ".dockerignore").read_text().splitlines() if p and not p.startswith(("#", "!"))]
    assert not [p for p in ignored if fnmatch.fnmatch(LOCK.name, p)], "the build context must hold the lock"


def test_the_lock_is_made_for_the_image_python() -> None:
    images = re.findall(r"^FROM python:(\d+\.\d+)\S*", DOCKERFILE.read_text(), flags=re.MULTILINE)
    assert images and set(images) == {LOCK_PYTHON}, images
    assert re.search(rf"--python-version {re.escape(LOCK_PYTHON)}\b", MAKEFILE.read_text())
    assert "make lock" in LOCK.read_text().split("\n", 3)[1]
