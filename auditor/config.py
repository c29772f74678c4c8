"""Typed configuration: one TOML file plus `AUDITOR_<SECTION>__<KEY>` environment overrides, validated once.

Secrets (the Katapult token, the API token, webhook URLs, routing keys, passwords) are `SecretStr`: their repr
and str are masked, so they cannot reach a log line or an error message by accident.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import re
import tomllib
import types
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from auditor.errors import ConfigError

# Severities, rule ids, intervals and durations are the vocabulary's, which the domain shares; RULE_IDS and the
# duration functions stay importable from here.
from auditor.vocabulary import AUDIT_INCOMPLETE, IntervalName, PolicyTargetName, SeverityName, format_instant
from auditor.vocabulary import RULE_IDS as RULE_IDS
from auditor.vocabulary import format_duration as format_duration
from auditor.vocabulary import parse_duration as parse_duration

ENV_PREFIX = "AUDITOR_"
CONFIG_ENV = "AUDITOR_CONFIG"
TOKEN_ENV = "KATAPULT_API_TOKEN"
WRITE_TOKEN_ENV = "KATAPULT_WRITE_TOKEN"
DEFAULT_CONFIG_PATH = Path("config/auditor.toml")

# Katapult ids are `<prefix>_` plus 16 alphanumerics today; dashes and underscores are accepted after the prefix
# (older and imported objects), whitespace, other characters and anything over 64 characters are not.
# Organizations may also be named by their sub-domain.
ID_MAX = 64
_DISK_ID = re.compile(rf"^disk_[A-Za-z0-9_-]{{1,{ID_MAX - 5}}}$")
_ORG_ID = re.compile(rf"^org_[A-Za-z0-9_-]{{1,{ID_MAX - 4}}}$")
_SUB_DOMAIN = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
MiB = 1024 * 1024


def check_disk_id(value: str) -> str:
    """Returns the disk id if it has Katapult's id format (`disk_` plus alphanumerics), else ValueError."""
    if not _DISK_ID.match(value):
        raise ValueError(f"{value[:80]!r} is not a Katapult disk id (disk_ followed by up to "
                         f"{ID_MAX - 5} letters, digits, dashes or underscores)")
    return value


# `audit.organizations = ["*"]`: every organization the token can see (GET /organizations, listed each cycle).
EVERY_ORGANIZATION = "*"


def check_org_ref(value: str) -> str:
    """Returns the organization reference if it is an org id (`org_…`) or a sub-domain, else ValueError."""
    if not (_ORG_ID.match(value) or _SUB_DOMAIN.match(value)):
        raise ValueError(f"{value[:80]!r} is neither a Katapult organization id (org_ followed by letters, digits, "
                         "dashes or underscores) nor a sub-domain (lowercase letters, digits and dashes)")
    return value


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]


def at_least(minimum: timedelta) -> AfterValidator:
    """Returns a validator that refuses durations shorter than `minimum` ("must be at least 3s")."""
    def check(value: timedelta) -> timedelta:
        if value < minimum:
            raise ValueError(f"must be at least {format_duration(minimum)}")
        return value

    return AfterValidator(check)


def _unique(check: Callable[[str], str]) -> Callable[[list[str]], list[str]]:
    def validate(value: list[str]) -> list[str]:
        return list(dict.fromkeys(check(item) for item in value))

    return validate


def _audited_org(value: str) -> str:
    return value if value == EVERY_ORGANIZATION else check_org_ref(value)


DiskIds = Annotated[list[str], AfterValidator(_unique(check_disk_id))]
OrgRefs = Annotated[list[str], AfterValidator(_unique(check_org_ref))]
# audit.organizations: references, or "*" for every organization the token can see.
AuditedOrgs = Annotated[list[str], AfterValidator(_unique(_audited_org))]
GroupLabel = Literal["rule", "severity", "disk_id", "tier"]
# Alert labels the auditor sets itself; a notifier's static `labels` may not override them.
RESERVED_LABELS = ("alertname", "severity", "fingerprint", "source", "disk_id", "policy_id", "test", "tier")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


class Section(BaseModel):
    """A config table: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)


def _read_secret_file(path: str, key: str) -> SecretStr:
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError([f"{key}: cannot read {path}: {exc.strerror}"]) from None
    if not text:
        raise ConfigError([f"{key}: {path} is empty"])
    return SecretStr(text)


class KatapultSettings(Section):
    """[katapult]: where and how fast to talk to Katapult."""

    api_url: str = "https://api.katapult.io/core/v1"
    api_token_file: str = ""
    # The credential with the disk_backup_policies write scope: loaded by `auditor apply` only, never by the daemon,
    # `plan` or any other command.
    write_token_file: str = ""
    timeout_seconds: float = Field(default=30, gt=0, le=600)
    max_requests_per_minute: int = Field(default=1000, gt=0)
    max_concurrency: int = Field(default=8, ge=1, le=64)
    per_page: int = Field(default=200, ge=1, le=200)
    max_attempts: int = Field(default=6, ge=1, le=20)
    # A larger response body fails that request (its disk or organization becomes unknown); read as a stream.
    max_response_bytes: int = Field(default=16 * MiB, ge=4096)

    @field_validator("api_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("must be an http(s) URL like https://api.katapult.io/core/v1")
        return value.rstrip("/")

    def token(self) -> SecretStr:
        """Returns the Katapult API token from `api_token_file` or env KATAPULT_API_TOKEN; ConfigError if unset."""
        if self.api_token_file:
            return _read_secret_file(self.api_token_file, "katapult.api_token_file")
        value = os.environ.get(TOKEN_ENV, "").strip()
        if not value:
            raise ConfigError(
                [f"katapult token: not set (set env {TOKEN_ENV} or katapult.api_token_file)"]
            )
        return SecretStr(value)

    def write_token(self) -> SecretStr:
        """Returns the write token from `write_token_file` or env KATAPULT_WRITE_TOKEN; ConfigError if unset (only
        `auditor apply` calls this)."""
        if self.write_token_file:
            return _read_secret_file(self.write_token_file, "katapult.write_token_file")
        value = os.environ.get(WRITE_TOKEN_ENV, "").strip()
        if not value:
            raise ConfigError([f"katapult write token: not set (set env {WRITE_TOKEN_ENV} or "
                               "katapult.write_token_file)"])
        return SecretStr(value)


_URL_PORT = re.compile(r"[\w+]+://(?:[^:/]*(?::[^@]*)?@)?(?:\[[^/?]+\]|[^/:?]+)?(?::(?P<port>[^/?]*))?")


class DatabaseSettings(Section):
    """[database]: SQLite file (embedded default) or PostgreSQL."""

    url: SecretStr = SecretStr("sqlite:///auditor.db")
    auto_migrate: bool = True

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: SecretStr) -> SecretStr:
        raw = value.get_secret_value()
        if not re.match(r"^(sqlite|postgresql)(\+\w+)?://", raw):
            raise ValueError("must start with sqlite:/// or postgresql+psycopg://")
        # The port as SQLAlchemy's URL grammar finds it (the URL itself is a secret: never quoted).
        port = _URL_PORT.match(raw)
        if port and port["port"] and not port["port"].isdigit():
            raise ValueError("the port must be a number, as in postgresql+psycopg://user:password@host:5432/db")
        return value


class AuditSettings(Section):
    """[audit]: what to audit and how often."""

    interval: Annotated[Duration, at_least(timedelta(seconds=1))] = timedelta(minutes=15)
    disks: DiskIds = Field(default_factory=list)
    organizations: AuditedOrgs = Field(default_factory=list)
    jitter: Duration = timedelta(seconds=10)
    # How long a VM's disk attachment states (GET /virtual_machines/virtual_machine/disks) are trusted in
    # organization mode before they are read again; a disk that moved is read again at once.
    attachment_refresh: Annotated[Duration, at_least(timedelta(seconds=1))] = timedelta(hours=24)


class DaemonSettings(Section):
    """[daemon]: the long-running service."""

    shutdown_grace: Duration = timedelta(seconds=20)
    db_retry_max: Duration = timedelta(seconds=60)
    # Leadership (and the cycle lease) expire this long after the holder last renewed them; renewed every ttl/3.
    leader_ttl: Annotated[Duration, at_least(timedelta(seconds=3))] = timedelta(seconds=30)


class ApiSettings(Section):
    """[api]: the HTTP reports API."""

    listen: str = "127.0.0.1:8080"
    token_file: str = ""
    token: SecretStr | None = None
    # Reverse proxies whose X-Forwarded-For is believed (addresses or networks, e.g. "10.0.0.0/8"): only a request
    # arriving from one of them is attributed to the address the header names (the login throttle's client).
    trusted_proxies: list[str] = []

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                ipaddress.ip_network(item.strip(), strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or network (e.g. 10.0.0.0/8)") from None
        return [item.strip() for item in value]

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError("must be HOST:PORT, e.g. 127.0.0.1:8080")
        return value

    @property
    def host(self) -> str:
        """Returns the listen host (brackets stripped from IPv6)."""
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        """Returns the listen port."""
        return int(self.listen.rpartition(":")[2])

    def resolved_token(self) -> SecretStr | None:
        """Returns the bearer token that guards /api/*, or None when the API is open."""
        if self.token_file:
            return _read_secret_file(self.token_file, "api.token_file")
        if self.token is not None and self.token.get_secret_value():
            return self.token
        return None


_Ids = TypeVar("_Ids", list[str], dict[str, SeverityName])


def _rule_ids(ids: _Ids) -> _Ids:
    unknown = sorted(set(ids) - set(RULE_IDS))
    if unknown:
        raise ValueError(f"unknown rule id(s) {', '.join(unknown)}; known: {', '.join(RULE_IDS)}")
    return ids


RuleIds = Annotated[list[str], AfterValidator(_rule_ids)]  # rule ids; unknown ones are errors
RuleSeverities = Annotated[dict[str, SeverityName], AfterValidator(_rule_ids)]  # rule id -> severity


class RuleOverride(Section):
    """[[rules.overrides]]: stricter or looser parameters for some disks."""

    disks: DiskIds = Field(min_length=1)
    min_retention: int | None = Field(default=None, ge=0)
    min_retention_days: float | None = Field(default=None, ge=0)
    max_interval: IntervalName | None = None
    stale_grace: Duration | None = None


class RulesSettings(Section):
    """[rules]: compliance thresholds."""

    min_retention: int = Field(default=7, ge=0)
    min_retention_days: float = Field(default=7, ge=0)
    max_interval: IntervalName = "daily"
    stale_grace: Duration = timedelta(hours=1)
    severity: RuleSeverities = Field(default_factory=dict)
    disabled: RuleIds = Field(default_factory=list)
    overrides: list[RuleOverride] = Field(default_factory=list)


_TIER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
ANY_VALUE = "*"


def _annotation_conditions(value: dict[str, Any]) -> dict[str, str | list[str]]:
    """Checks `disk_annotations` / `vm_annotations`: key -> value, list of values (any of them) or "*"."""
    out: dict[str, str | list[str]] = {}
    for key, wanted in value.items():
        if not isinstance(key, str) or not key.strip():
            raise ValueError("annotation keys must be non-empty strings")
        if isinstance(wanted, str):
            if not wanted:
                raise ValueError(f"annotation {key!r}: the value must not be empty (use \"*\" for any value)")
            out[key] = wanted
        elif isinstance(wanted, list) and wanted and all(isinstance(v, str) and v for v in wanted):
            if ANY_VALUE in wanted:
                raise ValueError(f"annotation {key!r}: \"*\" stands alone, not inside a list of values")
            out[key] = list(dict.fromkeys(wanted))
        else:
            raise ValueError(f"annotation {key!r}: expected a value, a non-empty list of values or \"*\", "
                             f"got {wanted!r}"[:200])
    return out


AnnotationConditions = Annotated[dict[str, Any], AfterValidator(_annotation_conditions)]


class TierMatchSettings(Section):
    """[[tiers]].match: the conditions a disk must meet (all of them)."""

    disk_annotations: AnnotationConditions = Field(default_factory=dict)
    vm_annotations: AnnotationConditions = Field(default_factory=dict)
    organizations: OrgRefs = Field(default_factory=list)

    @model_validator(mode="after")
    def _not_empty(self) -> TierMatchSettings:
        if not (self.disk_annotations or self.vm_annotations or self.organizations):
            raise ValueError("needs at least one of disk_annotations, vm_annotations, organizations")
        return self


def _whole_number(value: object) -> object:
    """Returns the value if it is an integer (not a bool, a float or a string of digits), else ValueError."""
    # A template's integers go to Katapult as they are: "14" (a string) or 14.5 is refused here rather than coerced,
    # so a mistyped template fails check-config instead of being read as something else. The environment's strings
    # of digits are integers already (`env_overrides`).
    if isinstance(value, bool) or not isinstance(value, int):
        kind = {bool: "a boolean", str: "a string", float: "a decimal number"}.get(type(value), "not a number")
        raise ValueError(f"must be an integer, written without quotes (this is {kind})")
    return value


WholeNumber = Annotated[int, BeforeValidator(_whole_number)]


class PolicyTemplatePart(Section):
    """A tier's `remediation = { … }`: the keys of the default template it changes."""

    interval: IntervalName | None = None
    retention: WholeNumber | None = Field(default=None, ge=1, le=2**31 - 1)
    frequency: WholeNumber | None = Field(default=None, ge=1, le=1000)
    time: WholeNumber | None = Field(default=None, ge=0, le=23)
    minute: WholeNumber | None = Field(default=None, ge=0, le=59)
    target: PolicyTargetName | None = None


class PolicyTemplate(Section):
    """[remediation].policy: the policy `auditor plan` creates, and the retention and interval it raises to."""

    interval: IntervalName = "daily"
    retention: WholeNumber = Field(default=14, ge=1, le=2**31 - 1)
    frequency: WholeNumber = Field(default=1, ge=1, le=1000)
    time: WholeNumber = Field(default=2, ge=0, le=23)
    minute: WholeNumber = Field(default=0, ge=0, le=59)
    target: PolicyTargetName = "disk"

    def merged(self, part: PolicyTemplatePart | None) -> PolicyTemplate:
        """Returns this template with the keys `part` sets replaced."""
        if part is None:
            return self
        return self.model_copy(update=part.model_dump(exclude_none=True))


class RemediationSettings(Section):
    """[remediation]: `auditor plan` and `auditor apply`."""

    enabled: bool = False
    plan_ttl: Annotated[Duration, at_least(timedelta(seconds=1))] = timedelta(hours=1)
    max_changes: int = Field(default=50, ge=1, le=100_000)
    policy: PolicyTemplate = PolicyTemplate()


class TierSettings(Section):
    """[[tiers]]: rules chosen by a disk's annotations, its VM's annotations and its organization."""

    name: str
    match: TierMatchSettings
    min_retention: int | None = Field(default=None, ge=0)
    min_retention_days: float | None = Field(default=None, ge=0)
    max_interval: IntervalName | None = None
    stale_grace: Duration | None = None
    severity: RuleSeverities = Field(default_factory=dict)
    disabled: RuleIds | None = None
    exempt: bool = False
    reason: str = ""
    remediation: PolicyTemplatePart | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _TIER_NAME.match(value):
            raise ValueError(f"{value[:80]!r} is not a tier name (letters, digits, '.', '_' or '-', at most 64, "
                             "starting with a letter or digit)")
        return value

    @model_validator(mode="after")
    def _exemption(self) -> TierSettings:
        if self.exempt:
            if not self.reason.strip():
                raise ValueError("an exempt tier needs a reason (it is shown with every exempt disk)")
            given = [k for k in ("min_retention", "min_retention_days", "max_interval", "stale_grace", "disabled",
                                 "remediation")
                     if getattr(self, k) is not None] + (["severity"] if self.severity else [])
            if given:
                raise ValueError(f"an exempt tier is not judged by any rule: remove {', '.join(given)}")
        return self


class NotifierCommon(Section):
    """Options every notifier has."""

    name: str = Field(min_length=1)
    min_severity: SeverityName = "high"
    rules: list[str] = Field(default_factory=list)
    send_resolved: bool = True
    group_by: list[GroupLabel] = Field(default_factory=lambda: list[GroupLabel](["rule"]))
    repeat_interval: Duration = timedelta(hours=4)
    timeout_seconds: float = Field(default=10, gt=0, le=120)
    # Routing conventions: static labels merged into every alert, the base URL operators reach the auditor's
    # dashboard at (each alert's generatorURL is `{external_url}/disks/{disk_id}`), and the label value sent
    # for each of our severities (unmapped ones are sent as they are).
    labels: dict[str, str] = Field(default_factory=dict)
    external_url: str = ""
    severity_map: dict[SeverityName, str] = Field(default_factory=dict)

    @field_validator("rules")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        known = set(RULE_IDS) | {AUDIT_INCOMPLETE}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown rule id(s) {', '.join(unknown)}")
        return value

    @field_validator("labels")
    @classmethod
    def _label_names(cls, value: dict[str, str]) -> dict[str, str]:
        # Prometheus/Alertmanager label names: [a-zA-Z_][a-zA-Z0-9_]*; names starting "__" are reserved there.
        bad = sorted(k for k in value if not _LABEL_NAME.fullmatch(k) or k.startswith("__"))
        if bad:
            raise ValueError(f"invalid label name(s) {', '.join(map(repr, bad))}: use [a-zA-Z_][a-zA-Z0-9_]*")
        taken = sorted(set(value) & set(RESERVED_LABELS))
        if taken:
            raise ValueError(f"label(s) {', '.join(taken)} are set by the auditor and cannot be overridden")
        empty = sorted(k for k, v in value.items() if not v)
        if empty:
            raise ValueError(f"label(s) {', '.join(empty)} have an empty value (Alertmanager drops those)")
        return value

    @field_validator("external_url")
    @classmethod
    def _external_url(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if value and not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", value):
            raise ValueError("must be an http:// or https:// URL without query or fragment")
        return value

    @field_validator("severity_map")
    @classmethod
    def _severity_values(cls, value: dict[str, str]) -> dict[str, str]:
        empty = sorted(k for k, v in value.items() if not v.strip())
        if empty:
            raise ValueError(f"severity_map values must not be empty ({', '.join(empty)})")
        return value


class WebhookNotifier(NotifierCommon):
    """An Alertmanager-format webhook (payload version 4)."""

    kind: Literal["webhook"]
    url: SecretStr
    secret: SecretStr | None = None


class AlertmanagerNotifier(NotifierCommon):
    """An existing Alertmanager, fed through POST /api/v2/alerts."""

    kind: Literal["alertmanager"]
    url: SecretStr


class PagerDutyNotifier(NotifierCommon):
    """PagerDuty Events API v2."""

    kind: Literal["pagerduty"]
    routing_key: SecretStr
    events_url: str = "https://events.pagerduty.com/v2/enqueue"


class SlackNotifier(NotifierCommon):
    """A Slack incoming webhook."""

    kind: Literal["slack"]
    webhook_url: SecretStr


class TeamsNotifier(NotifierCommon):
    """A Microsoft Teams Workflows webhook ("Post to a channel when a webhook request is received")."""

    kind: Literal["teams"]
    webhook_url: SecretStr


class EmailNotifier(NotifierCommon):
    """Mail over SMTP."""

    kind: Literal["email"]
    host: str = Field(min_length=1)
    port: int = Field(default=587, ge=1, le=65535)
    from_: str = Field(alias="from", min_length=3)
    to: list[str] = Field(min_length=1)
    username: str = ""
    password: SecretStr | None = None
    security: Literal["starttls", "tls", "none"] = "starttls"

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


NotifierSettings = Annotated[
    WebhookNotifier | AlertmanagerNotifier | PagerDutyNotifier | SlackNotifier | TeamsNotifier | EmailNotifier,
    Field(discriminator="kind"),
]


class NotifySettings(Section):
    """[notify]: the delivery stage shared by every notifier."""

    # A receiver's Retry-After (seconds or HTTP-date) is clamped to [0, max_retry_after].
    max_retry_after: Duration = timedelta(hours=1)
    # A runbook link added to every alert: an http(s) URL template where {rule} stands for the rule id
    # ("https://wiki.example.com/runbooks/auditor#{rule}"); "" adds none.
    runbook_url: str = ""

    @field_validator("runbook_url")
    @classmethod
    def _runbook_url(cls, value: str) -> str:
        if not value:
            return value
        if not re.match(r"^https?://[^/\s{}]+", value) or any(c.isspace() for c in value):
            raise ValueError("must be an http(s) URL like https://wiki.example.com/runbooks/{rule}")
        if "{" in value.replace("{rule}", "") or "}" in value.replace("{rule}", ""):
            raise ValueError("the only placeholder is {rule} (the rule id)")
        return value


class HeartbeatSettings(Section):
    """[heartbeat]: a dead-man's switch speaking the healthchecks.io ping protocol (url, url/start, url/fail)."""

    url: SecretStr | None = None
    timeout_seconds: float = Field(default=10, gt=0, le=60)
    max_attempts: int = Field(default=3, ge=1, le=10)

    @field_validator("url")
    @classmethod
    def _url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and value.get_secret_value() and not re.match(
                r"^https?://[^/\s]+", value.get_secret_value()):
            raise ValueError("must be an http(s) URL like https://hc-ping.com/<uuid>")
        return value

    @property
    def is_enabled(self) -> bool:
        """Returns whether a heartbeat URL is configured."""
        return self.url is not None and bool(self.url.get_secret_value())


class HistorySettings(Section):
    """[history]: how long run summaries, verdict intervals, events and delivered notifications are kept."""

    keep: Annotated[Duration, at_least(timedelta(days=1))] = timedelta(days=400)


class LogSettings(Section):
    """[log]: level and format (json when not on a terminal, unless set)."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "text"] = "auto"


class Settings(BaseModel):
    """The whole configuration (`load_settings` reads it from the file and the environment)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    katapult: KatapultSettings = KatapultSettings()
    database: DatabaseSettings = DatabaseSettings()
    audit: AuditSettings = AuditSettings()
    daemon: DaemonSettings = DaemonSettings()
    api: ApiSettings = ApiSettings()
    rules: RulesSettings = RulesSettings()
    tiers: list[TierSettings] = Field(default_factory=list)
    waivers: list[dict[str, Any]] = Field(default_factory=list)
    notifiers: list[NotifierSettings] = Field(default_factory=list)
    notify: NotifySettings = NotifySettings()
    heartbeat: HeartbeatSettings = HeartbeatSettings()
    history: HistorySettings = HistorySettings()
    log: LogSettings = LogSettings()
    remediation: RemediationSettings = RemediationSettings()

    @model_validator(mode="after")
    def _unique_notifier_names(self) -> Settings:
        names = [n.name for n in self.notifiers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"notifier names must be unique: {', '.join(dupes)}")
        tiers = [t.name for t in self.tiers]
        dupes = sorted({n for n in tiers if tiers.count(n) > 1})
        if dupes:
            raise ValueError(f"tier names must be unique: {', '.join(dupes)}")
        return self



def _env_name(loc: tuple[str | int, ...]) -> str | None:
    # A key inside a list (notifiers[0].url) is set through the whole list as JSON: AUDITOR_NOTIFIERS='[...]'.
    parts: list[str] = []
    for p in loc:
        if isinstance(p, int):
            break
        parts.append(str(p))
    return ENV_PREFIX + "__".join(p.upper() for p in parts) if parts else None


_NOTIFIER_KINDS = {"webhook", "alertmanager", "pagerduty", "slack", "teams", "email"}


def _format_loc(loc: tuple[str | int, ...]) -> tuple[str, tuple[str | int, ...]]:
    out = ""
    clean: list[str | int] = []
    for i, part in enumerate(loc):
        # Discriminated unions add the tag to the location; drop it so the key reads as written.
        if i >= 2 and loc[0] == "notifiers" and isinstance(loc[i - 1], int) and part in _NOTIFIER_KINDS:
            continue
        if part == "from_":
            part = "from"
        clean.append(part)
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out, tuple(clean)


def format_validation_error(exc: ValidationError) -> list[str]:
    """Returns one line per problem, naming the key and the env var that sets it."""
    lines = []
    for err in exc.errors():
        key, clean = _format_loc(tuple(err["loc"]))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required value is missing"
        elif err["type"] == "union_tag_invalid":
            given = (err.get("ctx") or {}).get("tag", "")
            msg = f"unknown notifier kind {given!r}; known: {', '.join(sorted(_NOTIFIER_KINDS))}"
        env = _env_name(clean)
        lines.append(f"{key or '(top level)'}: {msg}" + (f" (env {env})" if env else ""))
    return lines


def resolve_config_path(path: str | Path | None) -> Path | None:
    """Returns the config file to read: the argument, else $AUDITOR_CONFIG, else config/auditor.toml if present."""
    if path:
        return Path(path)
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.is_file() else None


# ---- environment overrides ---------------------------------------------------------------------------------
# `AUDITOR_<SECTION>__<KEY>` sets [section].key; "__" separates the levels (AUDITOR_RULES__SEVERITY sets the
# table rules.severity), names are matched without regard to case, and a value whose key holds a list or a table
# is JSON (AUDITOR_AUDIT__DISKS='["disk_a"]', AUDITOR_NOTIFIERS='[{...}]'). Variables naming no top-level key
# (AUDITOR_CONFIG, AUDITOR_TEST_POSTGRES_URL) are not settings; an unknown key below one is an error, as in the
# file. The environment beats the file: tables merge key by key, any other value replaces the file's.

ENV_DELIMITER = "__"


def _unwrap(annotation: Any) -> Any:
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    return annotation


def _is_complex(annotation: Any) -> bool:
    annotation = _unwrap(annotation)
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        return any(_is_complex(a) for a in get_args(annotation) if a is not type(None))
    if origin in (list, dict, tuple, set, frozenset) or annotation in (list, dict, tuple, set, frozenset):
        return True
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _is_whole_number_key(path: list[str]) -> bool:
    """Returns whether the key a path names is a `WholeNumber` (which takes integers only, not strings)."""
    parent = _unwrap(_target(path[:-1]))
    if not (isinstance(parent, type) and issubclass(parent, BaseModel)):
        return False
    field = parent.model_fields.get(path[-1])
    if field is None:
        return False
    marks = list(field.metadata)
    for annotation in (field.annotation, *get_args(field.annotation)):
        marks += getattr(annotation, "__metadata__", ())
    return any(isinstance(m, BeforeValidator) and m.func is _whole_number for m in marks)


_DIGITS = re.compile(r"\s*[+-]?[0-9]+\s*")


def _target(path: list[str]) -> Any:
    """Returns the annotation of the key a path names (None when no such key: the value stays a string)."""
    annotation: Any = Settings
    for part in path:
        annotation = _unwrap(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(part)
            if field is None:
                return None
            annotation = field.annotation
        elif get_origin(annotation) is dict:
            annotation = get_args(annotation)[1]
        else:
            return None
    return annotation


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def env_overrides(environ: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
    """Returns what the environment sets, as the file's nested tables, and one error line per variable whose
    value is not the JSON its key needs (the value itself is never quoted: it may be a secret)."""
    found: list[tuple[list[str], str, str]] = []
    for name, value in environ.items():
        if not name.upper().startswith(ENV_PREFIX):
            continue
        path = name[len(ENV_PREFIX):].lower().split(ENV_DELIMITER)
        if path[0] in Settings.model_fields and all(path):
            found.append((path, name, value))
    out: dict[str, Any] = {}
    problems: list[str] = []
    # Shorter paths first: AUDITOR_KATAPULT='{...}' is the base AUDITOR_KATAPULT__PER_PAGE then refines.
    for path, name, value in sorted(found, key=lambda f: (len(f[0]), f[0])):
        decoded: Any = value
        if _is_complex(_target(path)):
            try:
                decoded = json.loads(value)
            except ValueError as exc:
                reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "not JSON"
                problems.append(f"{'.'.join(path)}: not valid JSON ({reason} at character "
                                f"{getattr(exc, 'pos', 0)}): lists and tables are set as JSON, e.g. "
                                f"'[\"a\", \"b\"]' or '{{\"key\": \"value\"}}' (env {name})")
                continue
        elif _DIGITS.fullmatch(value) and _is_whole_number_key(path):
            # An environment variable is a string: its digits set a key that takes integers only (as the file's 14
            # does); other scalar keys stay strings, which validation converts as it sees fit.
            with contextlib.suppress(ValueError):  # more digits than int() converts: left to validation
                decoded = int(value)
        nested: Any = decoded
        for part in reversed(path):
            nested = {part: nested}
        out = _merge(out, nested)
    return out, problems


def settings_from(data: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Settings:
    """Returns validated settings from the file's tables with the environment's overrides on top, or raises
    ConfigError (one line a problem, naming the key and the variable that sets it)."""
    overrides, problems = env_overrides(os.environ if environ is None else environ)
    try:
        settings = Settings(**_merge(dict(data), overrides))
    except ValidationError as exc:
        raise ConfigError(problems + format_validation_error(exc)) from None
    if problems:
        raise ConfigError(problems)
    return settings


def load_settings(path: str | Path | None = None) -> Settings:
    """Returns validated settings from the TOML file and environment, or raises ConfigError (one line a problem)."""
    resolved = resolve_config_path(path)
    data: dict[str, Any] = {}
    if resolved is not None:
        try:
            with resolved.open("rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError([f"config file {resolved}: not found"]) from None
        except OSError as exc:
            raise ConfigError([f"config file {resolved}: cannot read ({exc.strerror})"]) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"config file {resolved}: not valid TOML: {exc}"]) from None
    return settings_from(data)


# ---- what a running daemon needs, and reloading it (SIGHUP) ------------------------------------------------


def check_runnable(settings: Settings) -> tuple[SecretStr, SecretStr | None]:
    """Returns the Katapult token and the API token `auditor run` needs, or raises ConfigError (one line a
    problem): the tokens must be readable and something must be named to audit."""
    problems: list[str] = []
    katapult_token = api_token = None
    try:
        katapult_token = settings.katapult.token()
    except ConfigError as err:
        problems += err.problems
    try:
        api_token = settings.api.resolved_token()
    except ConfigError as err:
        problems += err.problems
    if not settings.audit.disks and not settings.audit.organizations:
        problems.append("audit: nothing to audit: set audit.disks and/or audit.organizations "
                        "(env AUDITOR_AUDIT__DISKS / AUDITOR_AUDIT__ORGANIZATIONS)")
    if problems or katapult_token is None:
        raise ConfigError(problems)
    return katapult_token, api_token


def db_url_password(url: str) -> str | None:
    """Returns the password in a database URL, percent-decoded, or None."""
    from urllib.parse import unquote, urlsplit

    try:
        password = urlsplit(url).password
    except ValueError:
        return None
    return unquote(password) if password else None


def configured_secrets(settings: Settings) -> list[str]:
    """Returns every secret the settings hold, for the log scrubber (notifier URLs, keys and passwords, the API
    token, the heartbeat URL, the database password)."""
    secrets: list[str] = []
    for n in settings.notifiers:
        for attr in ("url", "secret", "routing_key", "webhook_url", "password"):
            value = getattr(n, attr, None)
            if isinstance(value, SecretStr):
                secrets.append(value.get_secret_value())
    if settings.api.token is not None:
        secrets.append(settings.api.token.get_secret_value())
    if settings.heartbeat.url is not None:
        secrets.append(settings.heartbeat.url.get_secret_value())
    # The scrubber masks every form a secret takes on the wire (a URL's user:password as basic auth,
    # percent-encoded, base64) — except for the database URL, whose user and database names are ordinary words
    # ("auditor"): only its password is secret (the URL itself is only ever logged masked, see safe_url).
    db_password = db_url_password(settings.database.url.get_secret_value())
    if db_password:
        secrets.append(db_password)
    return [s for s in secrets if s]


# Keys a running daemon cannot take on without a restart; a reload that changes one logs it and keeps the old value.
RESTART_KEYS: dict[str, str] = {
    "database.url": "the database is opened (and migrated) once, at start",
    "database.auto_migrate": "migrations run once, at start",
    "api.listen": "the listening socket is bound at start",
    "log.format": "the log handler is set up once, at start",
    "daemon.leader_ttl": "the leader and cycle leases are renewed on the period it sets since start",
    "daemon.shutdown_grace": "the API server's graceful-shutdown timeout is set at start",
    "daemon.db_retry_max": "it only paces the wait for the database at start",
}


def _leaves(model: BaseModel, prefix: str = "") -> dict[str, Any]:
    """Returns every key of a settings model as `section.key` -> value; lists (tiers, notifiers, waivers,
    rules.overrides) are one key each."""
    out: dict[str, Any] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        key = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            out.update(_leaves(value, f"{key}."))
        else:
            out[key] = value
    return out


def _replaced(settings: Settings, key: str, value: Any) -> Settings:
    section_name, _, name = key.partition(".")
    section: BaseModel = getattr(settings, section_name)
    return settings.model_copy(update={section_name: section.model_copy(update={name: value})})


class ReloadPlan(BaseModel):
    """What a reload changes: the keys that take effect, the keys that need a restart (their old value is kept)
    and the settings in force afterwards."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    changed: tuple[str, ...]
    restart: tuple[str, ...]
    settings: Settings


def plan_reload(old: Settings, new: Settings) -> ReloadPlan:
    """Returns what replacing `old` by `new` in a running daemon changes (keys compared value by value; secrets by
    their value, never shown)."""
    before, after = _leaves(old), _leaves(new)
    differing = [key for key in after if before.get(key) != after[key]]
    restart = tuple(key for key in differing if key in RESTART_KEYS)
    effective = new
    for key in restart:
        effective = _replaced(effective, key, before[key])
    return ReloadPlan(changed=tuple(k for k in differing if k not in RESTART_KEYS), restart=restart,
                      settings=effective)


REDACTED = "<redacted>"  # what a secret reads as in a stored or exported configuration


def _plain(value: Any) -> Any:
    """Returns a JSON-ready copy of a settings value with every secret redacted (an empty secret stays empty)."""
    if isinstance(value, SecretStr):
        return REDACTED if value.get_secret_value() else ""
    if isinstance(value, BaseModel):
        return {name: _plain(getattr(value, name)) for name in sorted(type(value).model_fields)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, list | tuple | set | frozenset):
        items = [_plain(v) for v in value]
        return sorted(items, key=json.dumps) if isinstance(value, set | frozenset) else items
    if isinstance(value, timedelta):
        return format_duration(value, style="export")
    if isinstance(value, datetime):
        return format_instant(value.astimezone(UTC) if value.tzinfo else value)
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def _masked_database_url(url: str) -> str:
    """Returns the database URL with its password masked, or REDACTED when it does not parse."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return REDACTED


def redacted_config(settings: Settings) -> dict[str, Any]:
    """Returns the effective configuration as plain JSON values with every secret redacted: what a run records
    as the configuration it ran with, and what its fingerprint is the hash of.

    Secrets are the `SecretStr` settings (API token, notifier URLs, routing keys and passwords, the heartbeat
    URL); they read "<redacted>" ("" when unset). The database URL keeps all but its password. Durations are
    written as in the file ("6h"), the email notifier's sender as `from`.
    """
    out: dict[str, Any] = _plain(settings)
    out["database"]["url"] = _masked_database_url(settings.database.url.get_secret_value())
    # The email notifier's sender is `from` in the file (a Python keyword, so `from_` in the model).
    for notifier in out["notifiers"]:
        if "from_" in notifier:
            notifier["from"] = notifier.pop("from_")
    return out


def canonical_json(value: Any) -> bytes:
    """Returns the canonical JSON of a plain value (keys sorted, no whitespace, UTF-8): what fingerprints hash."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def fingerprint_of(config: Mapping[str, Any]) -> str:
    """Returns the SHA-256 (64 hex digits) of a redacted configuration's canonical JSON."""
    return hashlib.sha256(canonical_json(config)).hexdigest()


def config_fingerprint(settings: Settings) -> str:
    """Returns the configuration's fingerprint: the SHA-256 of `redacted_config(settings)` as canonical JSON.
    Equal settings give equal fingerprints on any replica; a change to a secret's value alone does not change it,
    so anyone holding a stored configuration can recompute its fingerprint."""
    return fingerprint_of(redacted_config(settings))
