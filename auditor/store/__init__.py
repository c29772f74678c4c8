"""Persistence: SQLAlchemy tables, engine set-up, Alembic migrations and the repository; `reads` (and `reads_core`)
give one-shot commands the current report's reads without the ORM."""

from __future__ import annotations
