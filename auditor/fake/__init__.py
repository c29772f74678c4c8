"""A faithful fake of the Katapult Core API v1 endpoints the auditor uses (tests, benchmarks, demo)."""

from __future__ import annotations

from auditor.fake.app import create_app
from auditor.fake.fleet import DemoTargets, Fault, Fleet, demo_fleet
from auditor.fake.server import FakeServer, serve

__all__ = ["DemoTargets", "FakeServer", "Fault", "Fleet", "create_app", "demo_fleet", "serve"]
