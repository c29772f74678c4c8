"""Persistence: SQLAlchemy tables, engine set-up, Alembic migrations and the repository."""

from __future__ import annotations
