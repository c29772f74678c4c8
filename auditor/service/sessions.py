"""Dashboard sessions ended on the server: logged-out session ids, stored so that every replica refuses them.

A session is a signed cookie (auditor.web.auth) that would stay valid until its expiry; logging out records its id
here until then. The dashboard asks `read_revoked_sessions` when a cookie comes back (through a short per-process
cache: auditor.web.auth.Revocations).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from auditor.store import queries, writes

if TYPE_CHECKING:
    from auditor.service.services import Services


async def revoke_session(services: Services, *, sid: str, expires: datetime) -> None:
    """Records the session as revoked until `expires` (when its cookie dies anyway); revocations already past their
    expiry are deleted in the same transaction."""
    await services.store.write(writes.revoke_session, sid, expires=expires, now=services.clock())


async def read_revoked_sessions(services: Services, *, sids: Sequence[str]) -> set[str]:
    """Returns which of the session ids are revoked (and not yet expired)."""
    return await services.store.read(queries.revoked_session_ids, sids, now=services.clock())


__all__ = ["read_revoked_sessions", "revoke_session"]
