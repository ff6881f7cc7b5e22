"""The web console's API tokens (issue 13): bearer tokens an administrator
makes for scripts that use ``/api/v1/`` with the account's own scope.

Floor 1 (a leaf, beside ``accounts.py``): the console's API
(``mppproxy/web/api.py``), its token page and ``mppproxy admin token``
(``accounts_cli.py``) call it.  Every method blocks (SQLAlchemy): callers
with a reactor run them in its thread pool.

A token is ``mppt_`` and 43 characters of base64url: 32 bytes from
``secrets`` (256 bits).  It is shown once, when made; the table keeps its
SHA-256 only (``token_hash``), and a request finds its token by that hash
(a unique index).  Why not argon2, as for passwords: a slow hash defends
a *guessable* secret against a stolen table, by making each guess
expensive.  A 256-bit random token cannot be guessed at any speed, so one
SHA-256 is as strong, and it lets a request be checked with one indexed
lookup instead of ~0.1 s of argon2 work per API call.  The hash is
compared by the database's index (an attacker who can time it learns
only bits of a hash of a random value, which gives nothing to search).

A token acts as its administrator: the account's scope (superadmin, or
its domains) is read again on every request, and a removed or disabled
account's tokens stop working at once.  Made, listed and revoked
(deleted) tokens are audited in the store's audit table (``token-add``,
``token-revoke``) with no row.
"""
from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import Any, Optional

from sqlalchemy import delete, insert, select, update
from sqlalchemy.engine import Row

from mppproxy.store.accounts import AccountError, Accounts, WebAdmin, check_name
from mppproxy.store.schema import TOKEN_LABEL_LENGTH
from mppproxy.store.store import ArchiveStore, _epoch, _utc

PREFIX = "mppt_"
# Characters of a token shown in listings (the fixed prefix and 6 more):
# enough to tell one's tokens apart, far too few to help a guess.
SHOWN = len(PREFIX) + 6
# Longest validity a token may be given (days): ten years.
MAX_DAYS = 3650
# Seconds between the "last used" writes of one token: an API client
# making many calls a second must not write a row for each.
LAST_USED_EVERY = 60.0


class TokenError(AccountError):
    """A token operation cannot be done; the text says why."""


@dataclass(frozen=True)
class ApiToken:
    """One token as listed (never the token itself)."""

    id: int
    admin_id: int
    label: str
    prefix: str
    created: float
    expires: Optional[float]
    last_used: Optional[float]

    def expired(self, now: float) -> bool:
        return self.expires is not None and self.expires <= now

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "label": self.label, "prefix": self.prefix,
                "created": self.created, "expires": self.expires, "last_used": self.last_used}


def hash_token(token: str) -> str:
    """The stored form of ``token``: SHA-256, 64 hex digits."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def check_label(label: str) -> str:
    """A label: 1 to 64 printable characters (it appears in audit rows)."""
    value = label.strip()
    if not value or len(value) > TOKEN_LABEL_LENGTH or not value.isprintable():
        raise TokenError(f"label: {label!r} is not a label (1 to {TOKEN_LABEL_LENGTH} "
                         f"printable characters)")
    return value


class Tokens:
    """The API tokens of one store."""

    def __init__(self, store: ArchiveStore) -> None:
        self.store = store
        self.table = store.tables.web_tokens
        self.accounts = Accounts(store)

    def _token(self, row: Row[Any]) -> ApiToken:
        created = _epoch(row.created)
        return ApiToken(id=int(row.id), admin_id=int(row.admin_id), label=row.label,
                        prefix=row.prefix, created=created if created is not None else 0.0,
                        expires=_epoch(row.expires), last_used=_epoch(row.last_used))

    def add(self, admin: WebAdmin, label: str, days: Optional[float], actor: str,
            origin: str, now: Optional[float] = None) -> tuple[ApiToken, str]:
        """A new token for ``admin``: (its listing, the token itself, to
        be shown once).  ``days``: its validity (None: no end)."""
        label = check_label(label)
        if days is not None and not 0 < days <= MAX_DAYS:
            raise TokenError(f"expires: {days:g} days is not between 0 and {MAX_DAYS}")
        now = time.time() if now is None else now
        token = PREFIX + secrets.token_urlsafe(32)
        with self.store._write() as conn:
            result = conn.execute(insert(self.table).values(
                admin_id=admin.id, label=label, prefix=token[:SHOWN],
                token_hash=hash_token(token), created=_utc(now),
                expires=None if days is None else _utc(now + days * 86400.0), last_used=None))
            key = result.inserted_primary_key
            assert key is not None
            token_id = int(key[0])
            self.store._audit(conn, actor, origin, "token-add", None,
                              f"{admin.name}: token {token_id} {label!r}"
                              + (f", {days:g} days" if days is not None else ", no expiry"))
        found = self.get(token_id)
        assert found is not None
        return found, token

    def add_for(self, name: str, label: str, days: Optional[float], actor: str,
                origin: str) -> tuple[ApiToken, str]:
        """``add`` for the account named ``name`` (the CLI)."""
        admin = self.accounts.by_name(check_name(name))
        if admin is None:
            raise TokenError(f"no account named {name!r}")
        return self.add(admin, label, days, actor, origin)

    def get(self, token_id: int) -> Optional[ApiToken]:
        with self.store._read() as conn:
            row = conn.execute(select(self.table).where(self.table.c.id == token_id)).first()
        return self._token(row) if row is not None else None

    def list(self, admin_id: Optional[int] = None) -> list[ApiToken]:
        """Every token (of ``admin_id`` only, when given), oldest first."""
        query = select(self.table).order_by(self.table.c.id)
        if admin_id is not None:
            query = query.where(self.table.c.admin_id == admin_id)
        with self.store._read() as conn:
            return [self._token(row) for row in conn.execute(query)]

    def revoke(self, token_id: int, actor: str, origin: str,
               admin_id: Optional[int] = None) -> bool:
        """Delete the token (of ``admin_id`` only, when given: an
        administrator revokes their own); False when there is none."""
        where = self.table.c.id == token_id
        if admin_id is not None:
            where = where & (self.table.c.admin_id == admin_id)
        with self.store._write() as conn:
            row = conn.execute(select(self.table).where(where)).first()
            if row is None:
                return False
            conn.execute(delete(self.table).where(self.table.c.id == token_id))
            self.store._audit(conn, actor, origin, "token-revoke", None,
                              f"token {token_id} {row.label!r} of admin {row.admin_id}")
        return True

    def authenticate(self, token: str,
                     now: Optional[float] = None) -> Optional[tuple[ApiToken, WebAdmin]]:
        """The token and its administrator, when ``token`` is a live token
        of an enabled account; None otherwise (unknown, revoked, expired,
        account removed or disabled)."""
        if not token.startswith(PREFIX) or len(token) > 200:
            return None
        now = time.time() if now is None else now
        with self.store._read() as conn:
            row = conn.execute(select(self.table)
                               .where(self.table.c.token_hash == hash_token(token))).first()
        if row is None:
            return None
        found = self._token(row)
        if found.expired(now):
            return None
        admin = self.accounts.get(found.admin_id)
        if admin is None or admin.disabled:
            return None
        if found.last_used is None or now - found.last_used >= LAST_USED_EVERY:
            with self.store._write() as conn:
                conn.execute(update(self.table).where(self.table.c.id == found.id)
                             .values(last_used=_utc(now)))
        return found, admin
