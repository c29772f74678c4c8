"""Every read has one definition: `auditor.store.queries`. No other module of the auditor builds a SELECT, and no
other module defines a function named like one of its queries (a second copy of a read would need one of the two)."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import auditor
from auditor.store import queries

ROOT = Path(auditor.__file__).parent
QUERY_MODULE = ROOT / "store" / "queries.py"


def _modules() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.py") if p != QUERY_MODULE)


def _query_names() -> set[str]:
    return {name for name, fn in vars(queries).items()
            if inspect.isfunction(fn) and fn.__module__ == queries.__name__ and not name.startswith("_")}


def _selects(tree: ast.AST) -> list[int]:
    """Returns the lines of `select(...)` calls and of SQL text that selects FROM a table (not `SELECT 1` or a
    lock function)."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            fn = node.func
            name = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else ""
            if name == "select":
                lines.append(node.lineno)
            if name in ("text", "execute", "exec_driver_sql") and node.args and isinstance(node.args[0], ast.Constant) \
                    and str(node.args[0].value).lstrip().upper().startswith("SELECT") \
                    and " FROM " in str(node.args[0].value).upper():
                lines.append(node.lineno)
    return lines


def test_only_the_query_module_builds_selects() -> None:
    found = {str(p.relative_to(ROOT)): lines for p in _modules() if (lines := _selects(ast.parse(p.read_text())))}
    assert found == {}, f"reads outside auditor/store/queries.py: {found}"


def test_no_other_module_defines_a_query_of_the_same_name() -> None:
    names = _query_names()
    assert {"latest_run", "all_findings", "disk_history", "current_policy_ids"} <= names  # the scan sees them
    clashes = {}
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name in names:
                clashes.setdefault(str(path.relative_to(ROOT)), []).append(node.name)
    assert clashes == {}, f"a second definition of a query: {clashes}"


def test_the_scan_finds_a_second_definition(tmp_path: Path) -> None:
    # The checks above can fail: a module with its own SELECT and its own `latest_run` is caught by both.
    copy = "from sqlalchemy import select\n\ndef latest_run(conn):\n    return conn.execute(select(1)).first()\n"
    tree = ast.parse(copy)
    assert _selects(tree) == [4]
    assert any(isinstance(n, ast.FunctionDef) and n.name in _query_names() for n in ast.walk(tree))
    assert _selects(ast.parse('conn.exec_driver_sql("select id from disks")')) == [1]
    assert _selects(ast.parse('conn.execute(text("SELECT 1"))')) == []
