"""The evidence export's files other than the period report's: runs as CSV, JSON files, the SHA-256 manifest."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Mapping, Sequence
from typing import Any

from auditor.render.cells import csv_cell

RUN_CSV_COLUMNS = ("id", "trigger", "status", "started_at", "finished_at", "targets_checked", "disks_read",
                   "disks_unknown", "api_requests", "api_retries", "api_rate_limited", "findings_opened",
                   "findings_resolved", "error_count", "errors")


def runs_csv(runs: Sequence[Mapping[str, Any]]) -> str:
    """Returns the runs as CSV (one row a run; `errors` is the run's error list as JSON)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(RUN_CSV_COLUMNS)
    for r in runs:
        row = {**r, "error_count": len(r["errors"]), "errors": json.dumps(r["errors"], sort_keys=True)}
        writer.writerow([csv_cell(row[c]) for c in RUN_CSV_COLUMNS])
    return buf.getvalue()


def json_bytes(value: Any) -> bytes:
    """Returns a JSON file's bytes: indented, keys sorted, one final newline (the same value, the same bytes)."""
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()


def manifest(files: Mapping[str, bytes]) -> bytes:
    """Returns `sha256sum` lines (`<sha256>  <file>`) for the files, sorted by name."""
    return "".join(f"{hashlib.sha256(files[name]).hexdigest()}  {name}\n" for name in sorted(files)).encode()
