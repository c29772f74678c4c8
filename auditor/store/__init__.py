"""Persistence: SQLAlchemy tables, engine set-up, Alembic migrations and the repository; `reads` (and `reads_core`)
give the one-shot commands (report, findings, history) their reads without the ORM."""

from __future__ import annotations
