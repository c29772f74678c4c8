"""Hypothesis profiles: `full` (the default, and `make test`) and `check` (`make check`), chosen by
AUDITOR_HYPOTHESIS_PROFILE.

A test that asks for its own number of examples writes `max_examples=examples(N)`: N under `full`, a tenth of it
(at least 10) under `check`, so the fast loop still runs every property, on fewer inputs. Neither profile has a
deadline: with xdist the machine is busy on purpose, and a hung example is caught by the per-test timeout instead.
"""

from __future__ import annotations

import os

from hypothesis import settings

PROFILE_VARIABLE = "AUDITOR_HYPOTHESIS_PROFILE"
PROFILES = ("full", "check")

settings.register_profile("full", deadline=None, print_blob=True)
settings.register_profile("check", max_examples=10, deadline=None, print_blob=True)


def profile() -> str:
    """Returns the profile in effect (AUDITOR_HYPOTHESIS_PROFILE, else full)."""
    name = os.environ.get(PROFILE_VARIABLE, "full") or "full"
    if name not in PROFILES:
        raise ValueError(f"{PROFILE_VARIABLE}={name!r}: expected one of {', '.join(PROFILES)}")
    return name


def load_hypothesis_profile() -> None:
    settings.load_profile(profile())


def examples(full: int) -> int:
    """Returns the number of examples for a test that asks for `full` under the full profile."""
    return full if profile() == "full" else max(10, full // 10)
