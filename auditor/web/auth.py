"""Dashboard sessions and CSRF tokens: signed cookies, no server-side state, the same on every replica.

A session is `base64url(payload).base64url(HMAC-SHA256(key, payload))` with the payload `{"sid", "exp"}`; the
expiry is inside the signed payload, so a stolen or replayed cookie dies after SESSION_TTL whatever the browser
does with Max-Age. The key is derived from the API token alone (no per-process salt), so every replica accepts
the others' sessions, and changing the token logs everyone out. A CSRF token is an HMAC of the session id under a
separate label: it is tied to the session, and a page on another site can neither read nor forge it.

Without an API token the dashboard is open; sessions then only carry the CSRF binding (the key is a public
constant: what stops a cross-site POST is the SameSite=Strict cookie the attacker's page cannot make the browser
send, plus the token it cannot read).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from pydantic import SecretStr

SESSION_COOKIE = "auditor_session"
SESSION_TTL = timedelta(hours=12)
_KEY_LABEL = b"auditor dashboard session key v1"
_OPEN_KEY = hashlib.sha256(b"auditor dashboard without api.token").digest()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True, slots=True)
class Session:
    """A verified session: its id (what CSRF tokens bind to) and when it expires."""

    sid: str
    expires: datetime


class Signer:
    """Issues and verifies session cookies and CSRF tokens under one key."""

    def __init__(self, token: SecretStr | None) -> None:
        self.token = token
        # HMAC-SHA256 keyed by a fixed label over the token: deterministic (replicas agree), and the cookie key is
        # never the token itself, so a leaked signature says nothing about the token.
        self._key = (hmac.new(_KEY_LABEL, token.get_secret_value().encode(), hashlib.sha256).digest()
                     if token is not None else _OPEN_KEY)

    @property
    def is_guarded(self) -> bool:
        """Returns whether pages need a login (an API token is configured)."""
        return self.token is not None

    def check_token(self, given: str) -> bool:
        """Returns whether `given` is the API token (constant time)."""
        if self.token is None:
            return False
        return hmac.compare_digest(given.encode(), self.token.get_secret_value().encode())

    def _sign(self, label: bytes, payload: bytes) -> bytes:
        return hmac.new(self._key, label + b"\x00" + payload, hashlib.sha256).digest()

    def issue(self, *, now: datetime) -> tuple[Session, str]:
        """Returns a new session expiring SESSION_TTL from `now`, and its cookie value."""
        session = Session(secrets.token_hex(16), now + SESSION_TTL)
        payload = json.dumps({"sid": session.sid, "exp": int(session.expires.timestamp())},
                             separators=(",", ":")).encode()
        return session, f"{_b64(payload)}.{_b64(self._sign(b'session', payload))}"

    def verify(self, cookie: str | None, *, now: datetime) -> Session | None:
        """Returns the session of a cookie if its signature is ours and it has not expired, else None."""
        if not cookie or cookie.count(".") != 1 or len(cookie) > 512:
            return None
        body, sig = cookie.split(".")
        try:
            payload, given = _unb64(body), _unb64(sig)
        except ValueError:
            return None
        if not hmac.compare_digest(given, self._sign(b"session", payload)):
            return None
        try:
            data = json.loads(payload)
            sid, exp = str(data["sid"]), int(data["exp"])
        except (ValueError, KeyError, TypeError):
            return None
        expires = datetime.fromtimestamp(exp, tz=now.tzinfo)
        return Session(sid, expires) if now < expires else None

    def csrf(self, session: Session) -> str:
        """Returns the CSRF token of a session (what its forms carry)."""
        return _b64(self._sign(b"csrf", session.sid.encode()))

    def check_csrf(self, session: Session | None, given: str | None) -> bool:
        """Returns whether `given` is the CSRF token of `session` (False without a session or a token)."""
        if session is None or not given:
            return False
        return hmac.compare_digest(given.encode(), self.csrf(session).encode())


def is_https(scheme: str, forwarded_proto: str | None) -> bool:
    """Returns whether the browser reached us over HTTPS (directly, or through a proxy saying so)."""
    if scheme == "https":
        return True
    # X-Forwarded-Proto may list one scheme per hop ("https, http"): the first is what the browser used.
    return (forwarded_proto or "").split(",")[0].strip().lower() == "https"


def safe_next(target: str | None) -> str:
    """Returns `target` if it is a path on this site, else "/" (never an open redirect)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    if any(ord(c) < 0x21 or c == "\x7f" for c in target):
        return "/"
    return target
