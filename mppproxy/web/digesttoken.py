"""The release tokens of user digests (issue 13): signed, expiring,
one-shot.

Floor 3 (``mppproxy/web/``).  A token is text safe in a URL path::

    d1.<row id>.<expires, epoch seconds>.<recipient, base64url>.<mac>

The MAC is HMAC-SHA256 (RFC 2104) over everything before it, under a key
derived from the console's secret (``web.secret_file``; ``derive_key``
gives each use of that secret its own key, so no session cookie or CSRF
token can stand in for a digest token).  It is checked in constant time
before anything in the token is used.  "One-shot" is not in the token:
the store keeps the SHA-256 of each spent token (``store/digests.py``)
until it expires.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from dataclasses import dataclass

from mppproxy.web.sessions import derive_key

VERSION = "d1"
# What the route accepts (a recipient of 512 characters fits).
PATTERN = r"d1\.[0-9]{1,18}\.[0-9]{1,12}\.[A-Za-z0-9_-]{1,700}\.[A-Za-z0-9_-]{43}"
_TOKEN = re.compile(PATTERN)


class TokenError(Exception):
    """A token that cannot be used; ``reason`` is "forged" or "expired"."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class DigestToken:
    row_id: int
    recipient: str
    expires: int
    text: str

    @property
    def digest(self) -> str:
        """What the store keeps of a spent token (never the token itself)."""
        return hashlib.sha256(self.text.encode("ascii")).hexdigest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TokenSigner:
    """Makes and checks digest tokens with one console secret."""

    def __init__(self, secret: bytes) -> None:
        self._key = derive_key(secret, "digest v1")

    def _mac(self, body: str) -> str:
        return _b64(hmac.new(self._key, body.encode("ascii"), hashlib.sha256).digest())

    def make(self, row_id: int, recipient: str, expires: float) -> str:
        body = f"{VERSION}.{int(row_id)}.{int(expires)}.{_b64(recipient.encode('utf-8'))}"
        return f"{body}.{self._mac(body)}"

    def verify(self, text: str, now: float) -> DigestToken:
        """The token's content; TokenError when it is not ours (any change
        to any part) or past its expiry."""
        if not _TOKEN.fullmatch(text):
            raise TokenError("forged")
        body, _, mac = text.rpartition(".")
        if not hmac.compare_digest(self._mac(body), mac):
            raise TokenError("forged")
        _, row_id, expires, recipient = body.split(".")
        try:
            address = _unb64(recipient).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):  # pragma: no cover - signed by us
            raise TokenError("forged") from None
        if now >= int(expires):
            raise TokenError("expired")
        return DigestToken(int(row_id), address, int(expires), text)
