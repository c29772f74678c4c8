"""`auditor demo --once` on a fresh database shows findings of every rule and the alerts it sent."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from auditor.domain.rules import RULES


@pytest.mark.slow  # a real `auditor demo` process
def test_demo_once_shows_every_rule_and_alerts(tmp_path: Path) -> None:
    # The demo reads no config and no AUDITOR_* variables: a production override in the environment (here an
    # unreachable Katapult and a PostgreSQL that is not there) must not point it anywhere but its fake and file.
    env = {**os.environ, "AUDITOR_KATAPULT__API_URL": "http://127.0.0.1:9/core/v1",
           "AUDITOR_DATABASE__URL": "postgresql+psycopg://nobody@127.0.0.1:9/none"}
    proc = subprocess.run(
        [sys.executable, "-m", "auditor", "demo", "--once", "--db", str(tmp_path / "demo.db")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    for rule in RULES:
        assert rule in proc.stdout, f"the demo report shows no {rule} finding"
    assert "[demo webhook] FIRING" in proc.stdout
    assert "Traceback" not in proc.stderr
