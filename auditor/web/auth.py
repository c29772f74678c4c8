"""Dashboard sessions and CSRF tokens (signed cookies), their revocation on logout, and the login throttle.

A session is `base64url(payload).base64url(HMAC-SHA256(key, payload))` with the payload `{"sid", "exp"}`; the
expiry is inside the signed payload, so a stolen or replayed cookie dies after SESSION_TTL whatever the browser
does with Max-Age. The key is derived from the API token alone (no per-process salt), so every replica accepts
the others' sessions, and changing the token logs everyone out. A CSRF token is an HMAC of the session id under a
separate label: it is tied to the session, and a page on another site can neither read nor forge it.

Logging out revokes the session on the server: its id is stored (auditor.service.sessions) until it would have
expired, and every replica refuses the cookie from then on — at most REVOCATION_TTL later where a replica caches
its lookups (`Revocations`). Failed logins are throttled per client address (`LoginThrottle`, `client_address`).

Without an API token the dashboard is open; sessions then only carry the CSRF binding (the key is a public
constant: what stops a cross-site POST is the SameSite=Strict cookie the attacker's page cannot make the browser
send, plus the token it cannot read).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import math
import secrets
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from pydantic import SecretStr

from auditor.service import sessions

if TYPE_CHECKING:
    from auditor.service.services import Services

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


# ---- failed logins throttled per client address ----------------------------------------------------------------

FREE_FAILURES = 5  # wrong tokens an address may send before it has to wait
FIRST_WAIT = timedelta(seconds=30)  # the wait after the FREE_FAILURES-th failure; doubled by each further one
MAX_WAIT = timedelta(minutes=15)
FORGET_AFTER = timedelta(hours=1)  # an address with no failure for this long starts afresh
MAX_ADDRESSES = 10_000  # addresses remembered at once (least recently failed forgotten first)


@dataclass(slots=True)
class _Failures:
    count: int
    last: datetime
    wait_until: datetime | None = None


@dataclass
class LoginThrottle:
    """Failed dashboard logins per client address, in this process: after FREE_FAILURES wrong tokens the address
    waits FIRST_WAIT, each further wrong token doubles the wait (up to MAX_WAIT); a right token resets it.

    A login tried while the address waits is refused without looking at the token (so the right token does not
    work either until the wait is over) and is not counted as a failure. `failures` and `refused` are the counters
    /metrics shows. Replicas each keep their own: behind a load balancer spreading one address over N replicas,
    it gets up to N × FREE_FAILURES tries before its first wait.
    """

    failures: int = 0
    refused: int = 0
    _by_address: OrderedDict[str, _Failures] = field(default_factory=OrderedDict, repr=False)

    def seconds_to_wait(self, address: str, *, now: datetime) -> int | None:
        """Returns the whole seconds `address` must still wait before its next login (counted as refused), or None
        when it may try now."""
        entry = self._by_address.get(address)
        if entry is None or entry.wait_until is None or now >= entry.wait_until:
            return None
        self.refused += 1
        return max(1, math.ceil((entry.wait_until - now).total_seconds()))

    def failed(self, address: str, *, now: datetime) -> None:
        """Counts a wrong token from `address` (its wait starts at the FREE_FAILURES-th)."""
        self.failures += 1
        entry = self._by_address.pop(address, None)
        if entry is None or now - entry.last >= FORGET_AFTER:
            entry = _Failures(0, now)
        entry.count += 1
        entry.last = now
        if entry.count >= FREE_FAILURES:
            doublings = min(entry.count - FREE_FAILURES, 16)  # 30 s × 2^16 is far past MAX_WAIT already
            entry.wait_until = now + min(FIRST_WAIT * 2 ** doublings, MAX_WAIT)
        self._by_address[address] = entry  # most recently failed last
        self._forget(now)

    def succeeded(self, address: str) -> None:
        """Forgets the failures of `address` (the right token was given)."""
        self._by_address.pop(address, None)

    def _forget(self, now: datetime) -> None:
        while self._by_address:
            oldest = next(iter(self._by_address.values()))
            if len(self._by_address) <= MAX_ADDRESSES and now - oldest.last < FORGET_AFTER:
                break
            self._by_address.popitem(last=False)


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def trusted_networks(items: Sequence[str]) -> tuple[Network, ...]:
    """Returns the networks of `api.trusted_proxies` (validated when the settings were loaded)."""
    return tuple(ipaddress.ip_network(item, strict=False) for item in items)


def _is_trusted(address: str, trusted: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address.strip().strip("[]"))
    except ValueError:
        return False
    return any(ip in net for net in trusted)


def client_address(peer: str | None, forwarded_for: str | None, *, trusted: Sequence[Network]) -> str:
    """Returns the address a login is attributed to: the connecting peer, unless the peer is a trusted proxy.

    From a trusted proxy, X-Forwarded-For is read from the right (each proxy appends the address it was connected
    from) and the first address that is not itself a trusted proxy is the client; everything left of it could have
    been written by the client and is ignored. Without trusted proxies the header is never read: anyone can send it.
    """
    address = peer or "unknown"
    if not forwarded_for or not trusted or not _is_trusted(address, trusted):
        return address
    for hop in reversed([h.strip() for h in forwarded_for.split(",") if h.strip()]):
        if not _is_trusted(hop, trusted):
            return hop[:64]
        address = hop
    return address


# ---- sessions revoked on the server -------------------------------------------------------------------------

REVOCATION_TTL = timedelta(seconds=1)  # how long the daemon's replicas trust a "not revoked" lookup
REVOCATION_CACHE = 4096  # sessions whose lookup is remembered


class Revocations:
    """Whether a session was revoked (logged out), asked of the database through the service.

    A "revoked" answer is kept until the session expires (a revocation is never undone); a "not revoked" one for
    `ttl` at most, so a cookie logged out on any replica is refused by this one within `ttl` (0: every request
    asks the database).
    """

    def __init__(self, services: Services, *, ttl: timedelta, size: int = REVOCATION_CACHE) -> None:
        self._services = services
        self._ttl = ttl
        self._size = size
        self._seen: OrderedDict[str, tuple[bool, datetime]] = OrderedDict()

    async def is_revoked(self, session: Session, *, now: datetime) -> bool:
        """Returns whether `session` was revoked on any replica (at most `ttl` stale)."""
        held = self._seen.get(session.sid)
        if held is not None and (held[0] or now - held[1] < self._ttl):
            self._seen.move_to_end(session.sid)
            return held[0]
        revoked = session.sid in await sessions.read_revoked_sessions(self._services, sids=[session.sid])
        self._remember(session.sid, revoked, now)
        return revoked

    async def revoke(self, session: Session) -> None:
        """Revokes `session` for every replica (stored until it would have expired)."""
        await sessions.revoke_session(self._services, sid=session.sid, expires=session.expires)
        self._remember(session.sid, True, session.expires)

    def _remember(self, sid: str, revoked: bool, at: datetime) -> None:
        self._seen[sid] = (revoked, at)
        self._seen.move_to_end(sid)
        while len(self._seen) > self._size:
            self._seen.popitem(last=False)


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
