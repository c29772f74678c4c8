"""Tiers: which rules apply to a disk, decided by its annotations, its VM's annotations and its organization.

A tier (`[[tiers]]` in the configuration) is a set of conditions and the rule parameters for the disks that meet
them. The first tier, in file order, whose conditions all hold decides; an explicit `[[rules.overrides]]` entry for
the disk beats every tier; a disk no tier matches is judged by `[rules]`.

What is known about a disk's annotations can be partial: an organization's disk list that does not carry
annotations is complemented by filtered listings, which say "these disks have these annotations" and nothing
about the rest. Matching is therefore three-valued: a tier holds, does not hold, or cannot be decided because what
would decide it could not be read. An undecided tier before the deciding one makes the disk's tier unknown, and
the disk then has no verdict: it is never silently judged by the defaults.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

ANY_VALUE = "*"
DISK_SIDE = "disk"
VM_SIDE = "vm"

# A selector is the query of one filtered listing: (key, value) pairs that must all hold, or keys that must all be
# present (value None), never a mix (see `Condition`s expansion in `TierMatch.selectors`).
Selector = tuple[tuple[str, str | None], ...]


@dataclass(frozen=True, slots=True)
class Condition:
    """One annotation condition: the key with one of `values`, or the key with any value (`values` is None)."""

    key: str
    values: frozenset[str] | None



@dataclass(frozen=True, slots=True)
class TierMatch:
    """A tier's conditions; all must hold. Empty sides hold for every disk."""

    disk: tuple[Condition, ...] = ()
    vm: tuple[Condition, ...] = ()
    organizations: frozenset[str] = frozenset()

    def conditions(self, side: str) -> tuple[Condition, ...]:
        """Returns the conditions on the disk's (`DISK_SIDE`) or its VM's (`VM_SIDE`) annotations."""
        return self.disk if side == DISK_SIDE else self.vm

    def selectors(self, side: str) -> list[Selector]:
        """Returns the filtered listings that find the objects meeting one side's conditions.

        Conditions with values expand to one listing per combination of values (the API ANDs the pairs of one
        listing and has no OR); key-only conditions are one more listing of keys without values. An object meets
        the side when it is in one of the valued listings (if any) and in the key-only listing (if any).
        """
        conds = self.conditions(side)
        valued = [c for c in conds if c.values is not None]
        keyed = [c for c in conds if c.values is None]
        out: list[Selector] = []
        if valued:
            choices = [[(c.key, v) for v in sorted(c.values or ())] for c in valued]
            out.extend(tuple(combo) for combo in itertools.product(*choices))
        if keyed:
            out.append(tuple((c.key, None) for c in keyed))
        return out

    def covers(self, other: TierMatch) -> bool:
        """Returns whether every disk meeting `other`'s conditions also meets these (so `other` is shadowed)."""
        if self.organizations and not (other.organizations and other.organizations <= self.organizations):
            return False
        for side in (DISK_SIDE, VM_SIDE):
            theirs = {c.key: c for c in other.conditions(side)}
            for mine in self.conditions(side):
                their = theirs.get(mine.key)
                if their is None:
                    return False
                if mine.values is not None and (their.values is None or not their.values <= mine.values):
                    return False
        return True


@dataclass(frozen=True, slots=True)
class Tier:
    """A named tier: its conditions and what applies to the disks that meet them (parameters are in `RuleSet`)."""

    name: str
    match: TierMatch
    exempt: bool = False
    reason: str = ""


def conditions_from(table: Mapping[str, str | Sequence[str]]) -> tuple[Condition, ...]:
    """Returns conditions from a configuration table: key -> value, list of values, or "*"."""
    return tuple(Condition(key, None if value == ANY_VALUE else frozenset([value] if isinstance(value, str)
                                                                          else value))
                 for key, value in table.items())


def tier_from_tables(name: str, *, disk_annotations: Mapping[str, str | Sequence[str]],
                     vm_annotations: Mapping[str, str | Sequence[str]], organizations: Iterable[str],
                     exempt: bool = False, reason: str = "") -> Tier:
    """Returns a tier from its configuration's plain data (`[[tiers]]`)."""
    match = TierMatch(conditions_from(disk_annotations), conditions_from(vm_annotations), frozenset(organizations))
    return Tier(name, match, exempt=exempt, reason=reason)


@dataclass(frozen=True, slots=True)
class Annotations:
    """What is known of one object's annotations.

    `values` maps a key to its value, or to None when the key is known to be present with a value not known
    (a key-only listing). `complete` is true when `values` is the object's whole set (a lookup or a list item that
    carries annotations); otherwise only what listings reported is known, and `unread` names the tiers whose
    listings failed (for them, a key missing from `values` decides nothing).
    """

    values: Mapping[str, str | None]
    complete: bool = True
    unread: frozenset[str] = frozenset()
    error: str | None = None

    @classmethod
    def of(cls, pairs: Iterable[tuple[str, str]]) -> Annotations:
        """Returns the complete annotations of an object from its (key, value) pairs."""
        return cls(dict(pairs))


NO_VM = Annotations({})  # a disk without a VM: every VM condition fails (definitely)


@dataclass(frozen=True, slots=True)
class Unknown:
    """Why a condition could not be decided."""

    reason: str


@dataclass(frozen=True, slots=True)
class DiskFacts:
    """What is known about one disk for tier purposes; None where it could not be read at all.

    `organizations` holds the references naming the disk's organization (its id and/or sub-domain).
    `vm` is `NO_VM` for a disk that is not attached to a VM.
    """

    disk: Annotations | Unknown
    vm: Annotations | Unknown
    organizations: frozenset[str] | Unknown


@dataclass(frozen=True, slots=True)
class TierDecision:
    """The tier a disk belongs to (None: the defaults), or why it cannot be decided (`unknown`).

    `because` records what made the tier match: the annotations and organization that met its conditions.
    """

    tier: Tier | None = None
    because: dict[str, Any] = field(default_factory=dict)
    unknown: str | None = None

    @property
    def name(self) -> str | None:
        """Returns the tier's name, or None for the defaults."""
        return self.tier.name if self.tier is not None else None

    @property
    def exempt(self) -> bool:
        """Returns whether the disk is exempt from every rule."""
        return self.tier is not None and self.tier.exempt


DEFAULTS = TierDecision()


def _side(tier: Tier, side: str, known: Annotations | Unknown) -> tuple[bool | None, dict[str, Any], str]:
    """Returns (holds?, matched annotations, why undecided) for one side of a tier."""
    conds = tier.match.conditions(side)
    if not conds:
        return True, {}, ""
    what = "disk" if side == DISK_SIDE else "virtual machine"
    if isinstance(known, Unknown):
        return None, {}, f"the {what}'s annotations could not be read ({known.reason})"
    matched: dict[str, Any] = {}
    for cond in conds:
        if cond.key not in known.values:
            break
        value = known.values[cond.key]
        if cond.values is not None and (value is None or value not in cond.values):
            break
        matched[cond.key] = value if value is not None else ANY_VALUE
    else:
        return True, matched, ""
    if known.complete or tier.name not in known.unread:
        return False, {}, ""
    return None, {}, f"the {what} listing for tier {tier.name!r} could not be read" + (
        f" ({known.error})" if known.error else "")


def _organizations(tier: Tier, known: frozenset[str] | Unknown) -> tuple[bool | None, str | None, str]:
    wanted = tier.match.organizations
    if not wanted:
        return True, None, ""
    if isinstance(known, Unknown):
        return None, None, f"the disk's organization is not known ({known.reason})"
    hit = sorted(known & wanted)
    return (True, hit[0], "") if hit else (False, None, "")


def decide(tiers: Sequence[Tier], facts: DiskFacts) -> TierDecision:
    """Returns the first tier whose conditions all hold, DEFAULTS when none does, or an undecided decision."""
    for tier in tiers:
        org_holds, org, org_why = _organizations(tier, facts.organizations)
        if org_holds is False:
            continue
        disk_holds, disk_matched, disk_why = _side(tier, DISK_SIDE, facts.disk)
        if disk_holds is False:
            continue
        vm_holds, vm_matched, vm_why = _side(tier, VM_SIDE, facts.vm)
        if vm_holds is False:
            continue
        if org_holds is None or disk_holds is None or vm_holds is None:
            why = org_why or disk_why or vm_why
            return TierDecision(unknown=f"tier {tier.name!r} cannot be decided: {why}")
        because: dict[str, Any] = {}
        if disk_matched:
            because["disk_annotations"] = disk_matched
        if vm_matched:
            because["vm_annotations"] = vm_matched
        if org is not None:
            because["organization"] = org
        return TierDecision(tier, because)
    return DEFAULTS


def needs(tiers: Sequence[Tier]) -> tuple[bool, bool, bool]:
    """Returns whether any tier reads (disk annotations, VM annotations, the organization)."""
    return (any(t.match.disk for t in tiers), any(t.match.vm for t in tiers),
            any(t.match.organizations for t in tiers))


def shadowed(tiers: Sequence[Tier]) -> list[tuple[Tier, Tier]]:
    """Returns (tier, earlier tier) for each tier that can never match because the earlier one always does first."""
    out = []
    for index, tier in enumerate(tiers):
        for earlier in tiers[:index]:
            if earlier.match.covers(tier.match):
                out.append((tier, earlier))
                break
    return out

