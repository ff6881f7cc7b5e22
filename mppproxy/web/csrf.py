"""CSRF tokens for the web console: every state change is a POST whose
form carries a token the attacker's page cannot know (OWASP's CSRF
prevention cheat sheet, "synchronizer token", here stateless).

Floor 3 (``mppproxy/web/``).  A logged-in form's token is an HMAC of the
session's per-login nonce (``sessions.py``): it changes with each login,
and another session's token is worth nothing.  The login form, before any
session, gets a token bound to a short-lived random "pre-login" cookie,
so a third-party page cannot log a browser into an account of its own
choosing (login CSRF).  The session cookie's ``SameSite=Strict`` is a
second line, not the only one.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets

from mppproxy.web.sessions import Session, derive_key

# The form field that carries the token, and the pre-login cookie.
FIELD = "csrf"
PRE_LOGIN_COOKIE = "mpp_login"


class Csrf:
    """Makes and checks tokens with a key derived from the console secret."""

    def __init__(self, secret: bytes) -> None:
        self._key = derive_key(secret, "csrf v1")

    def _token(self, kind: str, value: str) -> str:
        return hmac.new(self._key, f"{kind}\0{value}".encode("utf-8"),
                        hashlib.sha256).hexdigest()

    def for_session(self, session: Session) -> str:
        return self._token("session", session.nonce)

    def session_ok(self, session: Session, token: str) -> bool:
        return hmac.compare_digest(self.for_session(session), token)

    @staticmethod
    def new_pre_login() -> str:
        """The value of a new pre-login cookie."""
        return secrets.token_hex(16)

    def for_login(self, pre_login: str) -> str:
        return self._token("login", pre_login)

    def login_ok(self, pre_login: str, token: str) -> bool:
        return bool(pre_login) and hmac.compare_digest(self.for_login(pre_login), token)
