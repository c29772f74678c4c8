"""What the configuration means to the domain: the rule set with its tiers, the audit targets, the waivers.

Standard library, the settings and the domain only, so the CLI's `check-config` uses these very definitions
without loading the store, httpx or the notifiers (benchmarks/cli_start.py times it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from auditor.config import PolicyTemplate, RuleOverride, RulesSettings, Settings, TierSettings
from auditor.domain.lifecycle import parse_waivers
from auditor.domain.models import Interval, Severity, Waiver, WaiverProblem
from auditor.domain.remediation import Template
from auditor.domain.remediation import template_problems as remediation_problems
from auditor.domain.rules import RULES, RuleParams, RuleSet, build_ruleset
from auditor.domain.tiers import Tier, tier_from_tables
from auditor.service.clock import utcnow


@dataclass(frozen=True, slots=True)
class Targets:
    """What to audit: explicit disk ids (per-disk endpoint) and organizations (org-wide endpoints)."""

    disks: tuple[str, ...] = ()
    organizations: tuple[str, ...] = ()


def _changes(source: RuleOverride | TierSettings) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    if source.min_retention is not None:
        changes["min_retention"] = source.min_retention
    if source.min_retention_days is not None:
        changes["min_retention_days"] = source.min_retention_days
    if source.max_interval is not None:
        changes["max_interval"] = Interval(source.max_interval)
    if source.stale_grace is not None:
        changes["stale_grace"] = source.stale_grace
    return changes


def tier_from(settings: TierSettings) -> Tier:
    """Returns the domain Tier for one [[tiers]] entry."""
    m = settings.match
    return tier_from_tables(settings.name, disk_annotations=m.disk_annotations, vm_annotations=m.vm_annotations,
                            organizations=m.organizations, exempt=settings.exempt, reason=settings.reason)


def ruleset_from(settings: RulesSettings, tiers: Sequence[TierSettings] = ()) -> RuleSet:
    """Returns the domain RuleSet for the [rules] table and the [[tiers]] entries."""
    default = RuleParams(
        min_retention=settings.min_retention,
        min_retention_days=settings.min_retention_days,
        max_interval=Interval(settings.max_interval),
        stale_grace=settings.stale_grace,
    )
    return build_ruleset(
        default=default,
        overrides=[(o.disks, _changes(o)) for o in settings.overrides],
        severity={rule: Severity(sev) for rule, sev in settings.severity.items()},
        disabled=settings.disabled,
        tiers=[(tier_from(t), _changes(t), {rule: Severity(sev) for rule, sev in t.severity.items()}, t.disabled)
               for t in tiers],
    )


def waivers_from(settings: Settings, *, now: datetime | None = None) -> tuple[list[Waiver], list[WaiverProblem]]:
    """Returns the configured waivers that apply now, and the problems of those that don't."""
    return parse_waivers(settings.waivers, known_rules=RULES.keys(), now=now or utcnow())


def targets_from(settings: Settings) -> Targets:
    """Returns the audit targets."""
    return Targets(tuple(settings.audit.disks), tuple(settings.audit.organizations))


__all__ = ["Targets", "ruleset_from", "targets_from", "tier_from", "waivers_from"]


def templates_from(settings: Settings) -> dict[str | None, Template]:
    """Returns the remediation templates in force: None for disks judged by [rules], each non-exempt tier's name
    for its disks ([remediation].policy with the tier's `remediation` on top)."""
    base = settings.remediation.policy
    out: dict[str | None, Template] = {None: _template(base)}
    for tier in settings.tiers:
        if not tier.exempt:
            out[tier.name] = _template(base.merged(tier.remediation))
    return out


def _template(p: PolicyTemplate) -> Template:
    return Template(Interval(p.interval), p.retention, p.frequency, p.time, p.minute, p.target)


def template_problems(settings: Settings, *, now: datetime | None = None) -> list[str]:
    """Returns one line per template that would itself be a finding under its tier's rules (a policy `auditor
    apply` creates or changes must never be one), naming the key that sets it."""
    now = now or utcnow()
    rules = ruleset_from(settings.rules, settings.tiers)
    templates = templates_from(settings)
    lines = [f"remediation.policy: {p} under [rules]"
             for p in remediation_problems(templates[None], rules.applied(""), now=now)]
    for index, tier in enumerate(settings.tiers):
        if tier.exempt:
            continue
        applied = rules.tier_rules[tier.name]
        key = f"tiers[{index}].remediation" if tier.remediation is not None else "remediation.policy"
        lines += [f"{key}: {p} under tier {tier.name}'s rules" for p in
                  remediation_problems(templates[tier.name], applied, now=now)]
    return lines
