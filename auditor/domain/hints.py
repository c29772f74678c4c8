"""What to do about each rule's finding: one line per rule id, sent in every alert (`remediation`).

The one table of remediation hints, keyed by rule id (`vocabulary.RULE_IDS`, plus the `audit-incomplete` alert):
what to change, and the Katapult API call that changes it (paths and bodies as in the Katapult Core API v1:
policies are created on a disk or a VM, changed with a PATCH of `properties`, and a trashed disk is restored
through its trash object). A test requires a hint for every rule id.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from auditor.vocabulary import (
    AUDIT_INCOMPLETE,
    DETACHED_FROM_COVERING_VM,
    DISK_IN_TRASH,
    DISK_NOT_FOUND,
    INTERVAL_TOO_INFREQUENT,
    NO_BACKUP_DATA,
    OBSERVED_INTERVAL_TOO_LONG,
    RETENTION_BELOW_MINIMUM,
    RETENTION_WINDOW_TOO_SHORT,
    SCHEDULE_STALE,
    UNPROTECTED_DISK,
)

_PATCH = "PATCH /disk_backup_policies/disk_backup_policy"

REMEDIATION: Final[Mapping[str, str]] = MappingProxyType({
    UNPROTECTED_DISK: (
        "Give the disk a backup policy, on the disk or on the VM it is attached to: POST "
        '/disks/disk/disk_backup_policies {"disk": {"id": …}, "properties": {"retention": …, "schedule": '
        '{"interval": …}}} (or POST /virtual_machines/virtual_machine/disk_backup_policies).'),
    RETENTION_BELOW_MINIMUM: (
        "Raise the policy's retention to at least rules.min_retention: "
        f'{_PATCH} {{"disk_backup_policy": {{"id": …}}, "properties": {{"retention": …}}}}.'),
    RETENTION_WINDOW_TOO_SHORT: (
        "Raise the policy's retention (or shorten its interval) until retention × interval covers "
        f'rules.min_retention_days: {_PATCH} {{"disk_backup_policy": {{"id": …}}, "properties": '
        '{"retention": …}}.'),
    INTERVAL_TOO_INFREQUENT: (
        "Make the policy run at least as often as rules.max_interval: "
        f'{_PATCH} {{"disk_backup_policy": {{"id": …}}, "properties": {{"schedule": {{"interval": "daily"}}}}}}.'),
    SCHEDULE_STALE: (
        "The policy's schedule stopped running: save its schedule again so Katapult plans the next backup "
        f'({_PATCH} {{"disk_backup_policy": {{"id": …}}, "properties": {{"schedule": {{…}}}}}}), '
        "and ask Katapult support if it stalls again."),
    DISK_NOT_FOUND: (
        "The disk no longer exists (GET /disks/disk answers 404 disk_not_found): correct or remove its id in "
        "audit.disks, or waive the finding if the disk was deleted on purpose."),
    DISK_IN_TRASH: (
        "Restore the disk from the trash before it is purged (POST /trash_objects/trash_object/restore "
        '{"trash_object": {"id": …}}), or remove it from audit.disks if it was deleted on purpose.'),
    OBSERVED_INTERVAL_TOO_LONG: (
        "The policy runs less often than its tier requires (frequency above 1, or skipped runs): set its schedule "
        f'to the tier\'s interval with frequency 1: {_PATCH} {{"disk_backup_policy": {{"id": …}}, "properties": '
        '{"schedule": {"interval": …, "frequency": 1}}}.'),
    NO_BACKUP_DATA: (
        "The policy has run (or should have) but holds no backup data: check the disk's backups in Katapult "
        "(GET /disk_backup_policies/disk_backup_policy?disk_backup_policy[id]=… total_size) and ask Katapult "
        "support why its runs store nothing."),
    DETACHED_FROM_COVERING_VM: (
        "The disk is detached from the VM whose policy is its only coverage: attach it again, or give the disk "
        'a policy of its own: POST /disks/disk/disk_backup_policies {"disk": {"id": …}, "properties": {…}}.'),
    AUDIT_INCOMPLETE: (
        "Make the listed targets readable again: check the Katapult token's scopes (disks:read, "
        "disk_backup_policies:read) and the errors in GET /api/v1/runs; GET /disks/disk?disk[id]=… must answer 200."),
})


def remediation_for(rule: str) -> str:
    """Returns the one-line remediation hint for a rule id ("" for ids without one, such as a test alert)."""
    return REMEDIATION.get(rule, "")
