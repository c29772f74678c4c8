"""One cell of a table in a text format: CSV (safe to open in a spreadsheet) and Markdown."""

from __future__ import annotations

from typing import Any

# A text cell a spreadsheet would take for a formula (first character =, +, -, @ or tab) is written with a leading
# apostrophe, so a disk named "=HYPERLINK(…)" in an export opened in a spreadsheet stays text ("CSV injection").
# Control characters other than tab and newline are written as \xNN: the csv module leaves a lone CR unquoted
# (our lines end in "\n"), and a reader would split the row there. Numbers are written as they are; None is empty.
_FORMULA_START = ("=", "+", "-", "@", "\t")
_CSV_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0)) if chr(c) not in "\t\n"}


def csv_cell(value: Any) -> str:
    """Returns one CSV cell: text a spreadsheet would evaluate is prefixed with an apostrophe, control characters
    other than tab and newline are shown as \\xNN."""
    if value is None:
        return ""
    if isinstance(value, str):
        text = value.translate(_CSV_CONTROL)
        return "'" + text if text.startswith(_FORMULA_START) else text
    return str(value)


def md_cell(text: Any, empty: str = "") -> str:
    """Returns one markdown table cell: `|` escaped, newlines as spaces, other control characters as \\xNN."""
    if text is None:
        return empty
    return str(text).replace("|", "\\|").replace("\n", " ").translate(_CSV_CONTROL)
