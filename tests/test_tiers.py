"""Tiers from Katapult annotations: matching, precedence, exemption, tier changes, failed reads and request counts,
through real cycles against the fake Katapult on SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from auditor.config import Settings
from auditor.domain.records import RunStatus
from auditor.domain.tiers import (
    DEFAULTS,
    NO_VM,
    Annotations,
    Condition,
    DiskFacts,
    Tier,
    TierMatch,
    Unknown,
    decide,
    shadowed,
)
from auditor.errors import ConfigError
from auditor.fake import Fault, Fleet, create_app
from auditor.service import open_services, ruleset_from
from auditor.service.collection import TIER_UNKNOWN
from auditor.service.cycle import run_cycle
from auditor.service.delivery import drain
from auditor.store import queries
from tests.test_audit_cycle import TOKEN, World, disk_of, findings_of, report_of, settings_for

DISKS = "/organizations/organization/disks"
VMS = "/organizations/organization/virtual_machines"
ORG_POLICIES = "/organizations/organization/disk_backup_policies"
VM_GET = "/virtual_machines/virtual_machine"
DISK_GET = "/disks/disk"
DISK_POLICIES = "/disks/disk/disk_backup_policies"
VM_POLICIES = "/virtual_machines/virtual_machine/disk_backup_policies"

GOLD = {"name": "gold", "match": {"disk_annotations": {"backup-tier": "gold"}}, "min_retention": 30,
        "min_retention_days": 30, "severity": {"retention-below-minimum": "high"}}
SCRATCH = {"name": "scratch", "match": {"vm_annotations": {"env": ["dev", "scratch"]}}, "exempt": True,
           "reason": "rebuilt from images; no backups needed"}


def with_tiers(settings: Settings, tiers: list[dict[str, Any]], **rules: Any) -> Settings:
    data = settings.model_dump()
    data["database"]["url"] = settings.database.url.get_secret_value()
    data["katapult"].pop("token", None)
    data["tiers"] = tiers
    data["rules"] = {**data["rules"], **rules}
    return Settings(**data)


class FailFiltered(httpx.AsyncBaseTransport):
    """The fake over ASGI, except that filtered listings (annotation filters) answer 503 service_unavailable."""

    def __init__(self, fleet: Fleet) -> None:
        self.inner = httpx.ASGITransport(app=create_app(fleet))
        self.failed = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if "annotations" in request.url.params.multi_items().__repr__():
            self.failed += 1
            return httpx.Response(503, json={"error": {"code": "service_unavailable", "description": "down",
                                                       "detail": {}}}, headers={"x-api-schema": "json-error"})
        return await self.inner.handle_async_request(request)


def by_endpoint(fleet: Fleet) -> dict[str, int]:
    return dict(fleet.stats.by_endpoint)


# ---- the domain: matching and precedence ------------------------------------------------------------------------

def tier(name: str, *, disk: dict[str, Any] | None = None, vm: dict[str, Any] | None = None,
         orgs: tuple[str, ...] = (), exempt: bool = False) -> Tier:
    def conds(table: dict[str, Any] | None) -> tuple[Condition, ...]:
        return tuple(Condition(k, None if v == "*" else frozenset([v] if isinstance(v, str) else v))
                     for k, v in (table or {}).items())
    return Tier(name, TierMatch(conds(disk), conds(vm), frozenset(orgs)), exempt=exempt, reason="r" if exempt else "")


def facts(disk: dict[str, str] | None = None, vm: dict[str, str] | None = None,
          orgs: frozenset[str] | None = None) -> DiskFacts:
    return DiskFacts(Annotations.of((disk or {}).items()),
                     NO_VM if vm is None else Annotations.of(vm.items()),
                     orgs if orgs is not None else frozenset({"org_a"}))


def test_first_matching_tier_wins_and_all_conditions_must_hold() -> None:
    tiers = [tier("gold", disk={"backup-tier": "gold", "team": "*"}), tier("any-gold", disk={"backup-tier": "gold"}),
             tier("dev", vm={"env": ["dev", "scratch"]}, orgs=("org_a",))]
    assert decide(tiers, facts({"backup-tier": "gold", "team": "x"})).name == "gold"
    assert decide(tiers, facts({"backup-tier": "gold"})).name == "any-gold"  # team missing: the next tier
    assert decide(tiers, facts({"backup-tier": "silver"})) is DEFAULTS
    hit = decide(tiers, facts(vm={"env": "scratch"}))
    assert hit.name == "dev" and hit.because == {"vm_annotations": {"env": "scratch"}, "organization": "org_a"}
    assert decide(tiers, facts(vm={"env": "scratch"}, orgs=frozenset({"org_b"}))) is DEFAULTS
    assert decide(tiers, facts(vm={"env": "prod"})) is DEFAULTS
    assert decide(tiers, facts()) is DEFAULTS  # no VM: VM conditions fail definitely


def test_an_unreadable_fact_before_the_deciding_tier_leaves_the_tier_unknown() -> None:
    tiers = [tier("gold", disk={"backup-tier": "gold"}), tier("dev", vm={"env": "dev"})]
    unread_vm = DiskFacts(Annotations.of([]), Unknown("503 service_unavailable"), frozenset())
    decision = decide(tiers, unread_vm)
    assert decision.unknown is not None and "503 service_unavailable" in decision.unknown
    # ...but a tier that matches first decides, whatever comes after it.
    assert decide(tiers, DiskFacts(Annotations.of([("backup-tier", "gold")]), Unknown("x"), frozenset())).name == "gold"
    # Partial knowledge (filtered listings): absence decides only for tiers whose listing was read.
    partial = Annotations({}, complete=False, unread=frozenset({"gold"}), error="boom")
    assert decide(tiers, DiskFacts(partial, NO_VM, frozenset())).unknown is not None
    read = Annotations({}, complete=False, unread=frozenset({"other"}))
    assert decide(tiers, DiskFacts(read, NO_VM, frozenset())) is DEFAULTS
    org_unknown = DiskFacts(Annotations.of([]), NO_VM, Unknown("unattached"))
    assert decide([tier("eu", orgs=("org_a",))], org_unknown).unknown is not None


def test_selectors_expand_values_and_keep_key_only_conditions_apart() -> None:
    t = tier("x", disk={"env": ["dev", "scratch"], "tier": "b", "owner": "*"})
    assert t.match.selectors("disk") == [(("env", "dev"), ("tier", "b")), (("env", "scratch"), ("tier", "b")),
                                         (("owner", None),)]
    assert t.match.selectors("vm") == []


def test_shadowed_tiers_are_found() -> None:
    tiers = [tier("wide", disk={"env": "*"}), tier("narrow", disk={"env": "dev", "team": "a"}),
             tier("vm", vm={"env": "dev"}), tier("org-only", orgs=("org_a", "org_b")),
             tier("org-sub", orgs=("org_a",), vm={"x": "y"}), tier("list", disk={"k": ["a", "b"]}),
             tier("sub-list", disk={"k": "a"})]
    assert [(t.name, e.name) for t, e in shadowed(tiers)] == [("narrow", "wide"), ("org-sub", "org-only"),
                                                            ("sub-list", "list")]


@given(st.dictionaries(st.sampled_from(["a", "b", "c"]), st.sampled_from(["1", "2"]), max_size=3),
       st.dictionaries(st.sampled_from(["a", "b"]), st.sampled_from(["1", "2", "*"]), min_size=1, max_size=2),
       st.dictionaries(st.sampled_from(["a", "b", "c"]), st.sampled_from(["1", "2", "*"]), min_size=1, max_size=3))
def test_a_shadowed_tier_never_decides(annotations: dict[str, str], first: dict[str, str],
                                       second: dict[str, str]) -> None:
    tiers = [tier("first", disk=first), tier("second", disk=second)]
    decision = decide(tiers, facts(annotations))
    if shadowed(tiers):
        assert decision.name != "second"
    # Listings give the same verdict as complete annotations (all selectors read).
    listed: dict[str, str | None] = {}
    for t in tiers:
        for selector in t.match.selectors("disk"):
            if all(annotations.get(k) == v if v is not None else k in annotations for k, v in selector):
                for k, v in selector:
                    if v is not None or listed.get(k) is None:
                        listed[k] = v
    partial = DiskFacts(Annotations(listed, complete=False), NO_VM, frozenset({"org_a"}))
    assert decide(tiers, partial).name == decision.name


# ---- configuration ------------------------------------------------------------------------------------------------

def test_tier_configuration_is_checked(tmp_path: Any) -> None:
    from auditor.config import load_settings
    path = tmp_path / "c.toml"
    path.write_text('''
[[tiers]]
name = "gold"
match = { disk_annotations = { "backup-tier" = "gold" }, colour = "red" }
[[tiers]]
name = "bad name"
match = { vm_annotations = { env = ["dev", "*"] } }
[[tiers]]
name = "scratch"
match = { organizations = ["Not An Org!"] }
exempt = true
[[tiers]]
name = "empty"
match = {}
[[tiers]]
name = "nothing"
match = { disk_annotations = { k = "v" } }
exempt = true
reason = "x"
min_retention = 3
''')
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    lines = caught.value.problems
    joined = "\n".join(lines)
    assert "tiers[0].match.colour: unknown key" in joined
    assert "tiers[1].name:" in joined and "tiers[1].match.vm_annotations:" in joined
    assert "tiers[2].match.organizations" in joined
    assert "tiers[3].match: needs at least one of" in joined
    assert "tiers[4]: an exempt tier is not judged by any rule: remove min_retention" in joined
    assert all(line.count("tiers[") <= 1 for line in lines)
    path.write_text('[[tiers]]\nname = "a"\nmatch = { organizations = ["acme"] }\n' * 2)
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert caught.value.problems == ["(top level): tier names must be unique: a"]


def test_tier_parameters_inherit_from_rules() -> None:
    settings = Settings(rules={"min_retention": 10, "max_interval": "weekly", "disabled": ["schedule-stale"],
                               "severity": {"interval-too-infrequent": "low"}},
                        tiers=[GOLD, {"name": "loose", "match": {"disk_annotations": {"x": "*"}}, "disabled": []}])
    rules = ruleset_from(settings.rules, settings.tiers)
    gold = rules.tier_rules["gold"]
    assert gold.params.min_retention == 30 and gold.params.max_interval.value == "weekly"
    assert gold.severity_of("retention-below-minimum").value == "high"
    assert gold.severity_of("interval-too-infrequent").value == "low"  # [rules].severity underneath
    assert gold.disabled == frozenset({"schedule-stale"})  # inherited
    assert rules.tier_rules["loose"].disabled == frozenset()  # its own (empty) list replaces [rules].disabled


# ---- real cycles: per-disk mode ---------------------------------------------------------------------------------

def world() -> tuple[World, dict[str, str]]:
    """gold (disk annotation, 14 backups: below gold's 30), plain (14: fine by [rules]), scratch (on a dev VM, no
    policy: exempt), prod (on a prod VM, 14 backups), loose (unattached, no annotations, 14)."""
    w = World()
    gold = w.disk("gold")
    w.fleet.set_annotations(gold.id, {"backup-tier": "gold"})
    w.policy(gold, "gold", retention=14)
    plain = w.disk("plain")
    w.policy(plain, "plain", retention=14)
    dev = w.vm("dev")
    w.fleet.set_annotations(dev.id, {"env": "dev"})
    scratch = w.disk("scratch", vm=dev)
    prod = w.vm("prod")
    w.fleet.set_annotations(prod.id, {"env": "prod"})
    prod_disk = w.disk("prod", vm=prod)
    w.policy(prod_disk, "prod", retention=14)
    return w, {"gold": gold.id, "plain": plain.id, "scratch": scratch.id, "prod": prod_disk.id}


async def run(settings: Settings, transport: httpx.AsyncBaseTransport, cycles: int = 1) -> dict[str, Any]:
    async with open_services(settings, transport=transport, token=TOKEN) as rt:
        for _ in range(cycles):
            outcome = await run_cycle(rt)
        report = await report_of(rt)
        report["_outcome"] = outcome
        return report


async def test_per_disk_tiers_precedence_and_exemption(db_url: str) -> None:
    w, ids = world()
    override = w.disk("override")
    w.fleet.set_annotations(override.id, {"backup-tier": "gold"})
    w.policy(override, "override", retention=14)
    base = settings_for(db_url, disks=[*ids.values(), override.id])
    settings = with_tiers(base, [GOLD, SCRATCH],
                          overrides=[{"disks": [override.id], "min_retention": 10}])
    rep = await run(settings, httpx.ASGITransport(app=create_app(w.fleet)))
    assert rep["_outcome"].status is RunStatus.COMPLETE
    gold = disk_of(rep, ids["gold"])
    assert gold["tier"] == "gold" and gold["status"] == "noncompliant" and gold["exemption"] is None
    gold_findings = findings_of(rep, ids["gold"])
    assert gold_findings[("retention-below-minimum", "dbp_gold")]["severity"] == "high"  # the tier's severity
    assert gold_findings[("retention-below-minimum", "dbp_gold")]["expected"] == {"min_retention": 30}
    assert ("retention-window-too-short", "dbp_gold") in gold_findings  # 14 days < 30
    assert disk_of(rep, ids["plain"])["tier"] is None and disk_of(rep, ids["plain"])["status"] == "compliant"
    scratch = disk_of(rep, ids["scratch"])
    assert scratch["status"] == "exempt" and scratch["tier"] == "scratch"
    assert scratch["exemption"] == {"reason": "rebuilt from images; no backups needed",
                                    "because": {"vm_annotations": {"env": "dev"}}}
    assert findings_of(rep, ids["scratch"]) == {}  # no policy at all, and no unprotected-disk finding
    assert disk_of(rep, ids["prod"])["tier"] is None and disk_of(rep, ids["prod"])["status"] == "compliant"
    # The override beats the tier: judged by min_retention 10, so 14 backups comply; its tier is not reported.
    assert disk_of(rep, override.id)["status"] == "compliant" and disk_of(rep, override.id)["tier"] is None
    summary = rep["summary"]
    assert summary["exempt"] == 1 and summary["compliant"] == 3 and summary["noncompliant"] == 1
    assert summary["by_tier"] == {"": 3, "gold": 1, "scratch": 1}
    # Requests: the disk lookup carries the disk's annotations; one VM lookup per VM (2), because a tier matches on
    # VM annotations; nothing else beyond the usual per-disk reads.
    calls = by_endpoint(w.fleet)
    assert calls[VM_GET] == 2
    assert calls[DISK_GET] == 5 and calls[DISK_POLICIES] == 5 and calls[VM_POLICIES] == 2
    assert VMS not in calls and DISKS not in calls


async def test_no_vm_lookups_without_vm_or_organization_tiers(db_url: str) -> None:
    w, ids = world()
    settings = with_tiers(settings_for(db_url, disks=list(ids.values())), [GOLD])
    rep = await run(settings, httpx.ASGITransport(app=create_app(w.fleet)))
    assert disk_of(rep, ids["gold"])["tier"] == "gold"
    assert VM_GET not in by_endpoint(w.fleet)


async def test_a_tier_change_between_cycles_resolves_opens_and_drifts(db_url: str) -> None:
    w, ids = world()
    settings = with_tiers(settings_for(db_url, disks=list(ids.values())), [GOLD, SCRATCH])
    async with open_services(settings, transport=httpx.ASGITransport(app=create_app(w.fleet)), token=TOKEN) as rt:
        first = await run_cycle(rt)
        assert first.status is RunStatus.COMPLETE
        w.fleet.set_annotations(ids["gold"], {})  # gold -> defaults: 14 backups comply with [rules]
        w.fleet.set_annotations(ids["plain"], {"backup-tier": "gold"})  # defaults -> gold: now too few
        w.fleet.set_annotations("vm_dev", {"env": "prod"})  # scratch disk loses its exemption: unprotected
        second = await run_cycle(rt)
        rep = await report_of(rt)
        assert disk_of(rep, ids["gold"])["status"] == "compliant" and disk_of(rep, ids["gold"])["tier"] is None
        assert disk_of(rep, ids["plain"])["tier"] == "gold"
        assert {r for r, _ in findings_of(rep, ids["plain"])} == {"retention-below-minimum",
                                                                  "retention-window-too-short"}
        assert disk_of(rep, ids["scratch"])["status"] == "noncompliant"
        assert set(findings_of(rep, ids["scratch"])) == {("unprotected-disk", None)}
        assert second.resolved == 2 and second.opened == 3
        drift = {(d["disk_id"], d["kind"]): d for d in rep["drift"]}
        assert drift[(ids["gold"], "tier-changed")]["before"] == {"tier": "gold"}
        assert drift[(ids["gold"], "tier-changed")]["after"] == {"tier": None}
        assert drift[(ids["plain"], "tier-changed")]["after"] == {"tier": "gold"}
        assert drift[(ids["scratch"], "tier-changed")]["before"] == {"tier": "scratch"}
        third = await run_cycle(rt)  # nothing changed: no new drift
        assert third.opened == 0 and third.resolved == 0
        rep = await report_of(rt)
        assert sum(1 for d in rep["drift"] if d["kind"] == "tier-changed") == 3


async def test_a_failed_vm_lookup_leaves_the_disk_unknown_not_defaulted(db_url: str) -> None:
    w, ids = world()
    w.fleet.faults["vm_prod"] = Fault.SERVER_ERROR
    # vm_prod's own policy list fails too (the same object): use a fleet where only the lookup fails instead.
    w.fleet.faults.pop("vm_prod")
    settings = with_tiers(settings_for(db_url, disks=list(ids.values())), [GOLD, SCRATCH])

    class FailVmLookup(httpx.AsyncBaseTransport):
        def __init__(self) -> None:
            self.inner = httpx.ASGITransport(app=create_app(w.fleet))

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            if request.url.path.endswith(VM_GET) and request.url.params.get("virtual_machine[id]") == "vm_prod":
                return httpx.Response(500, json={"error": {"code": "unhandled_exception", "description": "boom",
                                                           "detail": {}}}, headers={"x-api-schema": "json-error"})
            return await self.inner.handle_async_request(request)

    rep = await run(settings, FailVmLookup())
    assert rep["_outcome"].status is RunStatus.PARTIAL
    prod = disk_of(rep, ids["prod"])
    assert prod["status"] == "unknown" and prod["error"]["code"] == TIER_UNKNOWN
    assert "vm_prod" in prod["error"]["message"] and "scratch" in prod["error"]["message"]
    # A disk whose tier was decided before the unreadable fact mattered keeps its verdict.
    assert disk_of(rep, ids["gold"])["tier"] == "gold"
    assert disk_of(rep, ids["plain"])["status"] == "compliant"


async def test_an_unattached_disk_learns_its_organization_from_the_tiers_organization_listings(db_url: str) -> None:
    w, ids = world()
    elsewhere = w.disk("elsewhere", org=w.other)  # unattached, in an organization no tier names
    w.policy(elsewhere, "elsewhere", retention=14)
    eu = {"name": "eu", "match": {"organizations": [w.org.id]}, "min_retention": 20}
    settings = with_tiers(settings_for(db_url, disks=[*ids.values(), elsewhere.id]), [eu])
    async with open_services(settings, transport=httpx.ASGITransport(app=create_app(w.fleet)), token=TOKEN) as rt:
        for cycle in (1, 2):
            before = dict(w.fleet.stats.by_endpoint)
            outcome = await run_cycle(rt)
            rep = await report_of(rt)
            assert outcome.status is RunStatus.COMPLETE
            # Attached disks learn their organization from their VM; unattached ones from the listing of the
            # organization the tier names: the 4 disks of acme are 2 pages at per_page 2, once per cycle.
            listed = w.fleet.stats.by_endpoint["/organizations/organization/disks"] - before.get(
                "/organizations/organization/disks", 0)
            assert listed == 2, cycle
            assert disk_of(rep, ids["prod"])["tier"] == "eu" and disk_of(rep, ids["prod"])["status"] == "noncompliant"
            for name in ("gold", "plain"):
                assert disk_of(rep, ids[name])["tier"] == "eu", name
                assert disk_of(rep, ids[name])["status"] == "noncompliant", name
            # Found in none of the listings: not in those organizations, so judged by [rules] (14 backups: fine).
            assert disk_of(rep, elsewhere.id)["tier"] is None
            assert disk_of(rep, elsewhere.id)["status"] == "compliant"


async def test_an_unattached_disk_is_unknown_when_a_tier_organization_cannot_be_listed(db_url: str) -> None:
    w, ids = world()
    w.fleet.faults[w.other.id] = Fault.UNAVAILABLE
    tiers = [{"name": "eu", "match": {"organizations": [w.org.id]}, "min_retention": 20},
             {"name": "other", "match": {"organizations": [w.other.id]}, "min_retention": 10}]
    settings = with_tiers(settings_for(db_url, disks=list(ids.values())), tiers)
    rep = await run(settings, httpx.ASGITransport(app=create_app(w.fleet)))
    # Found in acme's listing: its organization is known whatever the other listing says.
    assert disk_of(rep, ids["gold"])["tier"] == "eu"
    # Neither listing readable: whether the disk is in either organization cannot be told.
    w.fleet.faults[w.org.id] = Fault.UNAVAILABLE
    rep = await run(settings, httpx.ASGITransport(app=create_app(w.fleet)))
    gold = disk_of(rep, ids["gold"])
    assert gold["status"] == "unknown" and gold["error"]["code"] == TIER_UNKNOWN
    assert "could not be read" in gold["error"]["message"]


# ---- real cycles: organization mode --------------------------------------------------------------------------------

@pytest.mark.parametrize("list_annotations", [False, True])
async def test_org_mode_tiers_and_request_counts(db_url: str, list_annotations: bool) -> None:
    w, ids = world()
    w.fleet.list_annotations = list_annotations
    for n in range(3):  # more gold disks, so the filtered listing pages (per_page 2)
        extra = w.disk(f"gold{n}")
        w.fleet.set_annotations(extra.id, {"backup-tier": "gold"})
        w.policy(extra, f"gold{n}", retention=40)
    settings = with_tiers(settings_for(db_url, orgs=[w.org.id]), [GOLD, SCRATCH])
    rep = await run(settings, httpx.ASGITransport(app=create_app(w.fleet)))
    assert rep["_outcome"].status is RunStatus.COMPLETE
    assert disk_of(rep, ids["gold"])["tier"] == "gold" and disk_of(rep, ids["gold"])["status"] == "noncompliant"
    assert all(disk_of(rep, f"disk_gold{n}")["status"] == "compliant" for n in range(3))
    assert disk_of(rep, ids["scratch"])["status"] == "exempt"
    assert disk_of(rep, ids["scratch"])["exemption"]["because"] == {"vm_annotations": {"env": "dev"}}
    assert disk_of(rep, ids["prod"])["tier"] is None
    calls = by_endpoint(w.fleet)
    disks_total, gold_disks, pp = 8, 4, 2
    listing = -(-disks_total // pp)
    # Disk annotations: from the list items when they carry them, else one filtered listing (4 gold disks: 2 pages).
    # VM annotations: one filtered VM listing per value of the scratch tier (dev: 1 VM, scratch: none) = 1 + 1.
    assert calls[DISKS] == listing + (0 if list_annotations else -(-gold_disks // pp))
    assert calls[VMS] == 2
    assert VM_GET not in calls and DISK_GET not in calls


async def test_org_mode_failed_filtered_listing_leaves_undecided_disks_unknown(db_url: str) -> None:
    w, ids = world()
    settings = with_tiers(settings_for(db_url, orgs=[w.org.id]), [GOLD, SCRATCH])
    transport = FailFiltered(w.fleet)
    rep = await run(settings, transport)
    assert transport.failed > 0
    assert rep["_outcome"].status is RunStatus.FAILED  # no disk has a verdict
    for name in ("gold", "plain", "scratch", "prod"):
        d = disk_of(rep, ids[name])
        assert d["status"] == "unknown" and d["error"]["code"] == TIER_UNKNOWN, (name, d)
        assert "service_unavailable" in d["error"]["message"]
    assert rep["findings"] == []  # nothing judged by the defaults


async def test_org_mode_list_annotations_need_no_disk_listing_even_when_filters_fail(db_url: str) -> None:
    w, ids = world()
    w.fleet.list_annotations = True
    settings = with_tiers(settings_for(db_url, orgs=[w.org.id]), [GOLD])  # disk-only tier: no VM listing at all
    transport = FailFiltered(w.fleet)
    rep = await run(settings, transport)
    assert transport.failed == 0 and rep["_outcome"].status is RunStatus.COMPLETE
    assert disk_of(rep, ids["gold"])["tier"] == "gold"


def test_the_example_configuration_tiers_load(tmp_path: Any) -> None:
    from pathlib import Path

    from auditor.config import load_settings
    text = (Path(__file__).parent.parent / "config" / "auditor.example.toml").read_text()
    start = text.index("# [[tiers]]")
    block = text[start:text.index("\n\n", start)]
    path = tmp_path / "tiers.toml"
    path.write_text("\n".join(line.removeprefix("#").removeprefix(" ") for line in block.splitlines()))
    settings = load_settings(path)
    assert [t.name for t in settings.tiers] == ["gold", "scratch"]
    assert settings.tiers[1].exempt and settings.tiers[1].match.vm_annotations == {"env": ["dev", "scratch"]}


@pytest.mark.slow  # real `auditor check-config` processes
def test_check_config_lists_tiers_and_shadowed_ones(tmp_path: Any) -> None:
    import subprocess
    import sys

    path = tmp_path / "c.toml"
    path.write_text('''
[audit]
organizations = ["acme"]
[[tiers]]
name = "wide"
match = { disk_annotations = { "env" = "*" } }
min_retention = 3
[[tiers]]
name = "narrow"
match = { disk_annotations = { "env" = "dev" }, organizations = ["org_otherother0000"] }
exempt = true
reason = "scratch"
''')
    done = subprocess.run([sys.executable, "-m", "auditor", "check-config", "--config", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "tier wide: when disk env=*: min_retention 3" in out
    assert "tier narrow: when disk env=dev and organization org_otherother0000: exempt (scratch)" in out
    assert "warning: tier narrow can never match: every disk it matches matches tier wide first" in out
    assert "not spelled as in audit.organizations" in out
    path.write_text('[[tiers]]\nname = "x"\nmatch = { disk_annotations = { k = 1 } }\n')
    bad = subprocess.run([sys.executable, "-m", "auditor", "check-config", "--config", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 78 and "tiers[0].match.disk_annotations" in bad.stderr + bad.stdout
    assert "Traceback" not in bad.stderr


async def test_reports_api_and_alerts_filter_and_label_by_tier(db_url: str) -> None:

    from auditor.api import ApiDeps
    from auditor.api import create_app as api_app
    from auditor.api.models import FindingsPage, Report
    from auditor.service.queries import current_report
    from tests.receivers import HttpReceiver

    w, ids = world()
    with HttpReceiver() as hook:
        settings = with_tiers(settings_for(db_url, disks=list(ids.values())), [GOLD, SCRATCH])
        data = settings.model_dump()
        data["database"]["url"] = db_url
        data["katapult"].pop("token", None)
        data["notifiers"] = [{"name": "hook", "kind": "webhook", "url": hook.url, "min_severity": "low",
                              "group_by": ["tier"]}]
        settings = Settings(**data)
        async with open_services(settings, transport=httpx.ASGITransport(app=create_app(w.fleet)),
                                 token=TOKEN) as rt:
            await run_cycle(rt)
            await drain(rt, within=10)
            deps = ApiDeps(services=rt, trigger=lambda: None)  # type: ignore[arg-type]
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api_app(deps)),
                                         base_url="http://api") as api:
                gold = (await api.get("/api/v1/findings", params={"tier": "gold"})).json()
                FindingsPage.model_validate(gold)
                assert {f["disk_id"] for f in gold["findings"]} == {ids["gold"]}
                assert (await api.get("/api/v1/findings", params={"tier": "scratch"})).json()["findings"] == []
                assert (await api.get("/api/v1/findings", params={"tier": "bad name!"})).status_code == 422
                report = (await api.get("/api/v1/report")).json()
                Report.model_validate(report)
                assert disk_of(report, ids["scratch"])["status"] == "exempt"
    one_tier = current_report(settings, tier="gold")
    assert [d["disk_id"] for d in one_tier["disks"]] == [ids["gold"]]
    assert one_tier["summary"]["disks_total"] == 1 and one_tier["summary"]["by_tier"] == {"gold": 1}
    assert {f["disk_id"] for f in one_tier["findings"]} == {ids["gold"]}
    bodies = [r.json() for r in hook.requests]
    alerts = [a for body in bodies for a in body["alerts"]]
    gold_alerts = [a for a in alerts if a["labels"].get("disk_id") == ids["gold"]]
    assert gold_alerts and all(a["labels"]["tier"] == "gold" for a in gold_alerts)
    assert all("tier" not in a["labels"] for a in alerts if a["labels"].get("disk_id") == ids["prod"])
    assert not any(a["labels"].get("disk_id") == ids["scratch"] for a in alerts)  # exempt: no alert
    groups = {body["groupLabels"].get("tier") for body in bodies}
    assert "gold" in groups


async def test_the_dashboard_shows_and_filters_by_tier(db_url: str) -> None:
    import re

    from auditor.api import ApiDeps
    from auditor.api import create_app as api_app

    async def no_trigger() -> str | None:
        return None

    w, ids = world()
    weak = w.disk("weak")  # a [rules] disk with a finding, so the unfiltered table has more rows
    w.policy(weak, "weak", retention=3)
    settings = with_tiers(settings_for(db_url, disks=[*ids.values(), weak.id]), [GOLD, SCRATCH])
    async with open_services(settings, transport=httpx.ASGITransport(app=create_app(w.fleet)), token=TOKEN) as rt:
        await run_cycle(rt)
        deps = ApiDeps(services=rt, trigger=no_trigger)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api_app(deps)),
                                     base_url="http://dash") as web:
            report = (await web.get("/api/v1/report")).json()
            overview = (await web.get("/")).text
            gold_page = (await web.get("/findings", params={"tier": "gold", "status": "all"})).text
            every = (await web.get("/findings", params={"status": "all"})).text
            scratch = (await web.get(f"/disks/{ids['scratch']}")).text
            gold_api = (await web.get("/api/v1/findings", params={"tier": "gold", "status": "all"})).json()
    assert f'data-metric="exempt">{report["summary"]["exempt"]}<' in overview and report["summary"]["exempt"] == 1
    assert re.search(r'data-metric="by_tier.gold"><a [^>]*>1<', overview)
    shown = re.findall(r'data-fingerprint="(\w+)"', gold_page)
    assert sorted(shown) == sorted(f["fingerprint"] for f in gold_api["findings"]) and shown
    assert len(re.findall(r'data-fingerprint="(\w+)"', every)) > len(shown)  # the filter changes the table
    assert '<option value="gold" selected>gold</option>' in gold_page
    assert 'data-metric="tier">scratch<' in scratch and "rebuilt from images; no backups needed" in scratch


async def test_an_alert_resolves_with_the_labels_it_fired_with_when_the_disk_changes_tier(db_url: str) -> None:
    from tests.receivers import HttpReceiver

    w, ids = world()
    with HttpReceiver() as hook:
        settings = with_tiers(settings_for(db_url, disks=list(ids.values())), [GOLD, SCRATCH])
        data = settings.model_dump()
        data["database"]["url"] = db_url
        data["katapult"].pop("token", None)
        data["notifiers"] = [{"name": "hook", "kind": "webhook", "url": hook.url, "min_severity": "low"}]
        settings = Settings(**data)
        async with open_services(settings, transport=httpx.ASGITransport(app=create_app(w.fleet)),
                                 token=TOKEN) as rt:
            await run_cycle(rt)
            await drain(rt, within=10)
            w.fleet.set_annotations(ids["gold"], {})  # gold -> defaults: its findings resolve
            w.fleet.set_annotations(ids["plain"], {"backup-tier": "gold"})  # defaults -> gold: findings open
            await run_cycle(rt)
            await drain(rt, within=10)
            found = await rt.store.read(queries.all_findings, statuses=["open", "resolved"])
            stored = {f.fingerprint: f for f in found}
        alerts = [a for r in hook.requests for a in r.json()["alerts"]]
    gold_fired = [a for a in alerts if a["labels"]["disk_id"] == ids["gold"] and a["status"] == "firing"]
    gold_resolved = [a for a in alerts if a["labels"]["disk_id"] == ids["gold"] and a["status"] == "resolved"]
    assert gold_fired and gold_resolved
    assert {a["labels"]["fingerprint"] for a in gold_resolved} == {a["labels"]["fingerprint"] for a in gold_fired}
    for resolved in gold_resolved:
        fired = next(a for a in gold_fired if a["labels"]["fingerprint"] == resolved["labels"]["fingerprint"])
        assert resolved["labels"] == fired["labels"] and resolved["labels"]["tier"] == "gold"
    plain = [a for a in alerts if a["labels"]["disk_id"] == ids["plain"]]
    assert plain and all(a["labels"]["tier"] == "gold" and a["status"] == "firing" for a in plain)
    assert {f.tier for f in stored.values() if f.disk_id == ids["plain"]} == {"gold"}
    assert {f.tier for f in stored.values() if f.disk_id == ids["gold"]} == {"gold"}  # kept while resolved
