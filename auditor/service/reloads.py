"""What the running daemon reports about its configuration: the fingerprint in force, when it was loaded and how
the last reload (SIGHUP) went. `/metrics` shows it; the daemon updates it."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class ConfigStatus:
    """The configuration in force (its fingerprint, Unix time it was loaded) and the reloads that failed."""

    fingerprint: str
    loaded_at: float
    is_last_reload_ok: bool = True
    reload_failures: int = 0

    def succeeded(self, fingerprint: str, *, at: float | None = None) -> None:
        """Records a reload that took effect (or changed nothing)."""
        self.fingerprint = fingerprint
        self.loaded_at = time.time() if at is None else at
        self.is_last_reload_ok = True

    def failed(self) -> None:
        """Records a reload refused: the configuration in force stays."""
        self.is_last_reload_ok = False
        self.reload_failures += 1
