"""Signed session cookies for the web console (issue 13: "signed cookies
that work across worker processes").

Floor 3 (``mppproxy/web/``).  Nothing is kept on the server: the cookie
itself says who is logged in, since when and when last seen, signed with
HMAC-SHA256 under a key derived from ``web.secret_file`` (RFC 2104), so
any process holding the key file accepts it.  What it holds::

    v1.<admin id>.<issued>.<last seen>.<nonce>.<password fingerprint>.<mac>

* the MAC is checked first, in constant time (``hmac.compare_digest``);
  nothing of an unverified cookie is used;
* ``issued`` bounds the session's whole life (``web.session_lifetime``),
  ``last seen`` its idle time (``web.session_idle``): each request that
  passes re-issues the cookie with a new ``last seen``;
* the nonce (128 random bits per login) makes each login's cookie, and its
  CSRF token (``csrf.py``), its own;
* the fingerprint is an HMAC of the account's password hash: a new
  password ends every session made with the old one.  The console also
  reads the account on every request (it may have been removed or
  disabled since the cookie was made).

A cookie cannot be revoked before it expires except by those account
changes, or by replacing the key file (which ends every session).
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass, replace
from typing import Optional

VERSION = "v1"
# A cookie issued this far in the future (seconds) is refused: the clocks
# of a node's processes agree, and a forged time must not stretch a session.
CLOCK_SKEW = 60.0


def derive_key(secret: bytes, purpose: str) -> bytes:
    """A key of its own for each use of the one secret (sessions, CSRF
    tokens, password fingerprints), so no MAC can stand in for another."""
    return hmac.new(secret, f"mppproxy web {purpose}".encode("ascii"), hashlib.sha256).digest()


def _mac(key: bytes, text: str) -> str:
    digest = hmac.new(key, text.encode("ascii"), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")


@dataclass(frozen=True)
class Session:
    """One verified login."""

    admin_id: int
    issued: int
    last_seen: int
    nonce: str
    fingerprint: str


class SessionCodec:
    """Issues, signs and verifies session cookies."""

    def __init__(self, secret: bytes, idle: float, lifetime: float) -> None:
        self._key = derive_key(secret, "session v1")
        self._fingerprint_key = derive_key(secret, "password fingerprint v1")
        self.idle = idle
        self.lifetime = lifetime

    def fingerprint(self, password_hash: str) -> str:
        """What a cookie keeps of the password hash it logged in with."""
        return _mac(self._fingerprint_key, password_hash.encode("utf-8").hex())[:22]

    def issue(self, admin_id: int, password_hash: str, now: float) -> Session:
        return Session(admin_id, int(now), int(now), secrets.token_hex(16),
                       self.fingerprint(password_hash))

    def touch(self, session: Session, now: float) -> Session:
        """The same session, seen now (the re-issued cookie)."""
        return replace(session, last_seen=max(session.last_seen, int(now)))

    def encode(self, session: Session) -> str:
        payload = (f"{VERSION}.{session.admin_id}.{session.issued}.{session.last_seen}."
                   f"{session.nonce}.{session.fingerprint}")
        return f"{payload}.{_mac(self._key, payload)}"

    def decode(self, value: str, now: float) -> Optional[Session]:
        """The session of a cookie that is genuine and not expired; None
        for anything else (forged, altered, old, from another key)."""
        if len(value) > 400 or not value.isascii():
            return None
        payload, _, mac = value.rpartition(".")
        if not payload or not hmac.compare_digest(_mac(self._key, payload), mac):
            return None
        parts = payload.split(".")
        if len(parts) != 6 or parts[0] != VERSION:
            return None
        try:
            admin_id, issued, last_seen = int(parts[1]), int(parts[2]), int(parts[3])
        except ValueError:
            return None
        if issued > now + CLOCK_SKEW or last_seen < issued:
            return None
        if now - issued > self.lifetime or now - last_seen > self.idle:
            return None
        return Session(admin_id, issued, last_seen, parts[4], parts[5])
