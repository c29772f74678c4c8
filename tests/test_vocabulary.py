"""The shared vocabulary: every value defined once, and every shape a duration is printed in kept as it is.

The guards read the source of `auditor/` (not the running program), so a second definition fails here the day it
is written, whether or not anything imports it yet.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from datetime import timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any, get_args

import pytest

import auditor
from auditor import vocabulary as v
from auditor.vocabulary import DurationStyle, format_duration, format_percent

PACKAGE = Path(auditor.__file__).resolve().parent
VOCABULARY = "vocabulary.py"
RETRY = "domain/retry.py"

# Each closed set of strings, as the vocabulary defines it.
SETS: dict[str, frozenset[str]] = {
    "severities": frozenset(get_args(v.SeverityName)),
    "finding statuses": frozenset(get_args(v.FindingStatusName)),
    "run statuses": frozenset(get_args(v.RunStatusName)),
    "disk statuses and verdicts": frozenset(get_args(v.DiskVerdictName)),
    "intervals": frozenset(get_args(v.IntervalName)),
    "rule ids": frozenset((*v.RULE_IDS, v.AUDIT_INCOMPLETE)),
}
# Where a function of this name may be defined: one place each.
HOMES = {
    "format_duration": VOCABULARY,
    "parse_duration": VOCABULARY,
    "parse_retry_after": RETRY,
    "clamp_retry_after": RETRY,
    "backoff": RETRY,
}
# The fake plays Katapult: it spells Katapult's wire values (interval names) itself, so that the client is tested
# against an independent copy of them rather than against its own definitions.
INDEPENDENT = ("fake/",)


def sources() -> Iterator[tuple[str, ast.Module]]:
    """Yields (path relative to the package, parsed module) for every module of the auditor."""
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(PACKAGE).as_posix(), ast.parse(path.read_text(encoding="utf-8"))


def strings(nodes: list[ast.expr]) -> set[str]:
    return {n.value for n in nodes if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def collections(tree: ast.Module) -> Iterator[tuple[int, set[str]]]:
    """Yields (line, strings) for every literal a closed set could be copied into: a tuple, list or set display,
    a Literal[...] and the member values of a class body (an enum)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Tuple | ast.List | ast.Set):
            yield node.lineno, strings(node.elts)
        elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == "Literal":
            yield node.lineno, strings(node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice])
        elif isinstance(node, ast.ClassDef):
            yield node.lineno, strings([s.value for s in node.body if isinstance(s, ast.Assign)])


def copies_of_sets(module: str, tree: ast.Module) -> list[str]:
    """Returns one line per literal in the module holding two or more values of a set, at least half of its strings
    being that set's (a list of column titles that mentions two statuses is not a copy of the statuses)."""
    found = []
    for line, found_strings in collections(tree):
        for name, values in SETS.items():
            shared = found_strings & values
            if len(shared) >= 2 and 2 * len(shared) >= len(found_strings):
                found.append(f"{module}:{line}: {name} {sorted(shared)}")
    return found


# ---- one definition of each value -------------------------------------------------------------------------


def test_the_enums_are_their_literals_in_order() -> None:
    pairs: list[tuple[type[StrEnum], Any]] = [
        (v.Severity, v.SeverityName), (v.FindingStatus, v.FindingStatusName), (v.RunStatus, v.RunStatusName),
        (v.DiskStatus, v.DiskStatusName), (v.DiskVerdict, v.DiskVerdictName), (v.Interval, v.IntervalName),
    ]
    for enum, literal in pairs:
        assert [member.value for member in enum] == list(get_args(literal)), enum.__name__
    assert set(v.DiskStatus) < set(v.DiskVerdict)


def test_the_vocabulary_classes_are_defined_only_in_the_vocabulary() -> None:
    names = {"Severity", "FindingStatus", "RunStatus", "DiskStatus", "DiskVerdict", "Interval"}
    elsewhere = [f"{module}:{node.lineno}: class {node.name}" for module, tree in sources() if module != VOCABULARY
                 for node in ast.walk(tree) if isinstance(node, ast.ClassDef) and node.name in names]
    assert elsewhere == []


def test_durations_and_retries_are_computed_in_one_place() -> None:
    found = []
    for module, tree in sources():
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            home = HOMES.get(node.name)
            if home is None and ("retry_after" in node.name or "backoff" in node.name):
                home = RETRY
            if home is not None and module != home:
                found.append(f"{module}:{node.lineno}: def {node.name} (belongs in {home})")
    assert found == []


def test_no_duration_is_broken_into_units_outside_the_vocabulary() -> None:
    # divmod(seconds, 3600) or seconds // 60 is a duration formatter being written again: use format_duration.
    units = {60, 3600, 86400}
    found = []
    for module, tree in sources():
        if module == VOCABULARY:
            continue
        for node in ast.walk(tree):
            divisor = None
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "divmod":
                divisor = node.args[1] if len(node.args) == 2 else None
            elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.FloorDiv | ast.Mod):
                divisor = node.right
            if isinstance(divisor, ast.Constant) and divisor.value in units:
                found.append(f"{module}:{node.lineno}: {ast.unparse(node)}")
    assert found == []


def test_http_dates_are_parsed_only_by_the_retry_after_parser() -> None:
    def identifier(node: ast.AST) -> str:
        if isinstance(node, ast.Name):
            return node.id
        if isinstance(node, ast.Attribute):
            return node.attr
        return node.name if isinstance(node, ast.alias) else ""

    # email.utils.parsedate* reads a Retry-After HTTP-date: a second use is a second Retry-After parser.
    found = [f"{module}:{getattr(node, 'lineno', '?')}: {identifier(node)}" for module, tree in sources()
             if module != RETRY for node in ast.walk(tree) if identifier(node).startswith("parsedate")]
    assert found == []


def test_rule_ids_are_spelled_only_in_the_vocabulary() -> None:
    # Docstrings and comments may name a rule; a string that *is* a rule id is a second definition of it.
    found = [f"{module}:{node.lineno}: {node.value!r}" for module, tree in sources() if module != VOCABULARY
             for node in ast.walk(tree)
             if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in SETS["rule ids"]]
    assert found == []


def test_no_closed_set_is_written_out_again() -> None:
    found = [line for module, tree in sources()
             if module != VOCABULARY and not module.startswith(INDEPENDENT) for line in copies_of_sets(module, tree)]
    assert found == []


@pytest.mark.parametrize("source", [
    'SEVERITIES = ("low", "medium", "high", "critical")',
    'Status = Literal["open", "resolved", "waived", "all"]',
    'class Level(StrEnum):\n    LOW = "low"\n    HIGH = "high"\n',
    'DONE = {"complete", "partial", "failed", "error"}',
])
def test_the_set_guard_sees_a_copy(source: str) -> None:
    assert copies_of_sets("example.py", ast.parse(source))


@pytest.mark.parametrize("source", [
    'COLUMNS = ("disk", "name", "compliance", "noncompliant", "unknown", "no data")',
    'class ChangeKind(StrEnum):\n    OPENED = "opened"\n    REOPENED = "reopened"\n    RESOLVED = "resolved"\n'
    '    WAIVED = "waived"\n    UNWAIVED = "unwaived"\n',
    'PD_SEVERITIES = frozenset({"critical", "error", "warning", "info"})',
])
def test_the_set_guard_leaves_other_vocabularies_alone(source: str) -> None:
    assert copies_of_sets("example.py", ast.parse(source)) == []


# ---- durations: one parser, one formatter, every shape unchanged ------------------------------------------


SHAPES: list[tuple[DurationStyle, timedelta | float | None, str]] = [
    # The configuration's syntax (check-config, config errors, notifier warnings).
    ("config", timedelta(0), "0s"),
    ("config", timedelta(seconds=90), "90s"),
    ("config", timedelta(minutes=15), "15m"),
    ("config", timedelta(days=7), "7d"),
    ("config", timedelta(milliseconds=500), "500ms"),
    ("config", timedelta(seconds=1.5), "1.5s"),
    ("config", timedelta(seconds=-120), "-2m"),
    # The evidence export's spelling of the same syntax.
    ("export", timedelta(0), "0d"),
    ("export", timedelta(milliseconds=500), "0.5s"),
    ("export", timedelta(days=400), "400d"),
    ("export", timedelta(seconds=1234567.5), "1234567.5s"),
    # The period compliance report.
    ("report", None, "–"),
    ("report", 7, "7s"),
    ("report", 367, "6m 7s"),
    ("report", 3 * 3600, "3h 0m"),
    ("report", 2 * 86400 + 3 * 3600 + 59, "2d 3h"),
    # How long an alert lasted (Slack, Teams, email).
    ("alert", timedelta(seconds=45), "45s"),
    ("alert", timedelta(hours=3, minutes=12, seconds=40), "3h 12m"),
    ("alert", timedelta(days=1, minutes=5), "1d 5m"),
    ("alert", timedelta(seconds=-5), "0s"),
    # The dashboard's ages.
    ("age", timedelta(seconds=59), "59s"),
    ("age", timedelta(minutes=12, seconds=30), "12 min"),
    ("age", timedelta(hours=5, minutes=3), "5 h 3 min"),
    ("age", timedelta(days=3), "3 d"),
    ("age", timedelta(days=3, hours=4, minutes=59), "3 d 4 h"),
    # How late a scheduled backup is, in a schedule-stale finding's message.
    ("overdue", timedelta(minutes=12, seconds=59), "12m"),
    ("overdue", timedelta(hours=1, minutes=5), "1h 05m"),
    ("overdue", timedelta(days=2), "48h 00m"),
    # A wait announced to people, rounded up.
    ("wait", 40.2, "41s"),
    ("wait", 119.0, "119s"),
    ("wait", 121.0, "3m"),
    ("wait", 7201.0, "3h"),
    # A run's wall time on the dashboard.
    ("elapsed", timedelta(seconds=1.234), "1.23s"),
    ("elapsed", timedelta(seconds=42.4), "42s"),
]


@pytest.mark.parametrize(("style", "value", "text"), SHAPES)
def test_each_duration_shape_is_kept(style: DurationStyle, value: timedelta | float | None, text: str) -> None:
    assert format_duration(value, style=style) == text


def test_every_duration_style_is_tested() -> None:
    assert {style for style, _, _ in SHAPES} == set(get_args(DurationStyle))


def test_the_config_syntax_reads_back_what_it_writes() -> None:
    for seconds in (0, 0.25, 1, 59, 61, 90, 3600, 5400, 86400, 7 * 86400, 400 * 86400):
        value = timedelta(seconds=seconds)
        assert v.parse_duration(format_duration(value)) == value


@pytest.mark.parametrize(("value", "decimals", "sep", "text"), [
    (None, 1, "", "n/a"), (0.0, 1, "", "0%"), (100.0, 1, "", "100%"), (0.021, 1, "", "< 0.1%"),
    (99.97, 1, "", "> 99.9%"), (99.94, 1, "", "99.9%"), (50.0, 1, "", "50%"), (66.666, 1, "", "66.7%"),
    (0.021, 3, " ", "0.021 %"), (0.0004, 3, " ", "< 0.001 %"), (99.9996, 3, " ", "> 99.999 %"),
    (83.333, 3, " ", "83.333 %"), (0.05, 1, " ", "0.1 %"), (0.04, 1, " ", "< 0.1 %"),
])
def test_percentages_are_never_0_or_100_when_they_are_not(value: float | None, decimals: int, sep: str,
                                                            text: str) -> None:
    assert format_percent(value, decimals=decimals, sep=sep) == text
