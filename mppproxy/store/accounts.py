"""The web console's accounts (issue 13), in the archive store's database:
superadmins, who see every domain, and domain administrators, who see only
the domains listed on their account.

Floor 1 (a leaf, beside ``store.py``): the console (``mppproxy/web/``) and
``mppproxy admin`` (``accounts_cli.py``) call it.  Every method blocks
(SQLAlchemy, and argon2, which takes tens of milliseconds and 64 MiB on
purpose): callers with a reactor run them in its thread pool.

Passwords are hashed with argon2id (argon2-cffi's defaults, RFC 9106's
"low memory" profile); a hash made with older parameters is replaced at
the next successful login (``verify``).  ``verify`` spends the same work
for a name that does not exist as for a wrong password, so the time of an
answer does not tell which names exist.  Account changes are audited in
the store's audit table (``admin-add``, ``admin-passwd``...), with no row.
"""
from __future__ import annotations

import json
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.engine import Row
from sqlalchemy.exc import IntegrityError

from mppproxy.store.schema import ADMIN_NAME_LENGTH
from mppproxy.store.store import ArchiveStore, StoreError, _epoch, _utc

# The account the first start makes when there is none.
FIRST_ADMIN = "admin"
# Characters of an account name: it appears in audit rows and log lines.
_NAME = re.compile(r"^[a-z0-9][a-z0-9._@+-]*$")
# RFC 1035 2.3.4 / RFC 1123 2.1: labels of letters, digits and hyphens, a
# name of at most 253 characters (IDNA names in their A-label form).
_DOMAIN = re.compile(r"^(?=.{1,253}$)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\.)*"
                     r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")
# NIST SP 800-63B 5.1.1.2: at least 8 characters for a password a person
# chooses; no composition rules.  Bounded above so hashing stays cheap to
# refuse (argon2 hashes any length, a 1 MB one costs the server).
MIN_PASSWORD = 8
MAX_PASSWORD = 1024

_hasher = PasswordHasher()
# What verify() checks a name that has no account against, so both answers
# cost the same.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


class AccountError(StoreError):
    """An account operation cannot be done; the text says why."""


@dataclass(frozen=True)
class WebAdmin:
    """One console account (the hash stays out of ``repr``)."""

    id: int
    name: str
    superadmin: bool
    domains: tuple[str, ...]
    created: float
    last_login: Optional[float]
    disabled: bool
    must_change: bool
    password_hash: str = field(repr=False, compare=False)

    def scope(self) -> Optional[tuple[str, ...]]:
        """The domains this account may see, for ``Search.domains``; None
        for a superadmin (every domain)."""
        return None if self.superadmin else self.domains

    def to_json(self) -> dict[str, Any]:
        """For ``mppproxy admin list --json`` (no hash)."""
        return {"id": self.id, "name": self.name, "superadmin": self.superadmin,
                "domains": list(self.domains), "created": self.created,
                "last_login": self.last_login, "disabled": self.disabled,
                "must_change": self.must_change}


def check_name(name: str) -> str:
    """The account name, lower-cased, or AccountError."""
    value = name.strip().lower()
    if not value or len(value) > ADMIN_NAME_LENGTH or not _NAME.match(value):
        raise AccountError(f"{name!r} is not an account name (1 to {ADMIN_NAME_LENGTH} "
                           f"letters, digits and . _ @ + -, starting with a letter or digit)")
    return value


def check_domains(domains: Sequence[str]) -> tuple[str, ...]:
    """Lower-cased domain names without a trailing dot, in order, once
    each; AccountError for anything that is not one."""
    out: list[str] = []
    for domain in domains:
        value = domain.strip().rstrip(".").lower()
        try:
            value = value.encode("idna").decode("ascii") if not value.isascii() else value
        except UnicodeError:
            raise AccountError(f"{domain!r} is not a domain name") from None
        if not _DOMAIN.match(value):
            raise AccountError(f"{domain!r} is not a domain name")
        if value not in out:
            out.append(value)
    return tuple(out)


def check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise AccountError(f"a password needs at least {MIN_PASSWORD} characters")
    if len(password) > MAX_PASSWORD:
        raise AccountError(f"a password may have at most {MAX_PASSWORD} characters")


def new_password() -> str:
    """A random password (one-time passwords): 20 characters, ~120 bits."""
    return secrets.token_urlsafe(15)


class Accounts:
    """The accounts of one store (its engine and table prefix)."""

    def __init__(self, store: ArchiveStore) -> None:
        self.store = store
        self.table = store.tables.web_admins

    def _admin(self, row: Row[Any]) -> WebAdmin:
        try:
            domains = tuple(str(d) for d in json.loads(row.domains or "[]"))
        except (ValueError, TypeError):
            domains = ()  # a row edited by hand into nonsense sees nothing
        created = _epoch(row.created)
        return WebAdmin(id=int(row.id), name=row.name, superadmin=bool(row.superadmin),
                        domains=domains, created=created if created is not None else 0.0,
                        last_login=_epoch(row.last_login), disabled=bool(row.disabled),
                        must_change=bool(row.must_change), password_hash=row.password_hash)

    # -- reading -----------------------------------------------------------

    def get(self, admin_id: int) -> Optional[WebAdmin]:
        with self.store._read() as conn:
            row = conn.execute(select(self.table).where(self.table.c.id == admin_id)).first()
        return self._admin(row) if row is not None else None

    def by_name(self, name: str) -> Optional[WebAdmin]:
        with self.store._read() as conn:
            row = conn.execute(select(self.table)
                               .where(self.table.c.name == name.strip().lower())).first()
        return self._admin(row) if row is not None else None

    def list(self) -> list[WebAdmin]:
        with self.store._read() as conn:
            rows = conn.execute(select(self.table).order_by(self.table.c.name)).all()
        return [self._admin(row) for row in rows]

    def count(self) -> int:
        with self.store._read() as conn:
            return int(conn.execute(select(func.count()).select_from(self.table)).scalar_one())

    # -- changing ----------------------------------------------------------

    def add(self, name: str, password: str, superadmin: bool, domains: Sequence[str],
            actor: str, origin: str, must_change: bool = False) -> WebAdmin:
        """A new account; AccountError when the name is taken or a value
        is not good.  A domain admin needs at least one domain."""
        name = check_name(name)
        scope = check_domains(domains)
        check_password(password)
        if not superadmin and not scope:
            raise AccountError("a domain administrator needs at least one domain "
                               "(or make the account a superadmin)")
        digest = _hasher.hash(password)
        try:
            with self.store._write() as conn:
                conn.execute(insert(self.table).values(
                    name=name, password_hash=digest, superadmin=superadmin,
                    domains=json.dumps(list(scope)), created=_utc(time.time()),
                    last_login=None, disabled=False, must_change=must_change))
                self.store._audit(conn, actor, origin, "admin-add", None,
                                  f"{name}: " + ("superadmin" if superadmin
                                                 else "domains " + ", ".join(scope)))
        except IntegrityError:
            raise AccountError(f"an account named {name!r} exists already") from None
        found = self.by_name(name)
        assert found is not None
        return found

    def set_password(self, name: str, password: str, actor: str, origin: str,
                     must_change: bool = False) -> None:
        """A new password; the sessions of the old one end (a session
        carries a fingerprint of the hash it logged in with)."""
        check_password(password)
        digest = _hasher.hash(password)
        with self.store._write() as conn:
            done = conn.execute(update(self.table).where(self.table.c.name == check_name(name))
                                .values(password_hash=digest, must_change=must_change)).rowcount
            if not done:
                raise AccountError(f"no account named {name!r}")
            self.store._audit(conn, actor, origin, "admin-passwd", None, check_name(name))

    def set_disabled(self, name: str, disabled: bool, actor: str, origin: str) -> None:
        with self.store._write() as conn:
            done = conn.execute(update(self.table).where(self.table.c.name == check_name(name))
                                .values(disabled=disabled)).rowcount
            if not done:
                raise AccountError(f"no account named {name!r}")
            self.store._audit(conn, actor, origin,
                              "admin-disable" if disabled else "admin-enable", None,
                              check_name(name))

    def remove(self, name: str, actor: str, origin: str) -> bool:
        """Remove an account (its sessions end at their next request);
        False when there was none."""
        with self.store._write() as conn:
            done = conn.execute(delete(self.table)
                                .where(self.table.c.name == name.strip().lower())).rowcount
            if done:
                self.store._audit(conn, actor, origin, "admin-remove", None,
                                  name.strip().lower())
        return bool(done)

    def verify(self, name: str, password: str) -> Optional[WebAdmin]:
        """The account when ``password`` is its password and it is not
        disabled; None otherwise, after the same work either way."""
        admin = self.by_name(name) if name.strip() else None
        digest = admin.password_hash if admin is not None else _DUMMY_HASH
        try:
            _hasher.verify(digest, password[:MAX_PASSWORD])
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return None
        if admin is None or admin.disabled:
            return None
        if _hasher.check_needs_rehash(digest):
            with self.store._write() as conn:
                conn.execute(update(self.table).where(self.table.c.id == admin.id)
                             .values(password_hash=_hasher.hash(password)))
        return admin

    def record_login(self, admin_id: int) -> None:
        with self.store._write() as conn:
            conn.execute(update(self.table).where(self.table.c.id == admin_id)
                         .values(last_login=_utc(time.time())))

    def ensure_first_admin(self, actor: str, origin: str) -> Optional[str]:
        """When there is no account at all: the superadmin ``admin`` with
        a random one-time password, returned (None when accounts exist,
        or another process made the first one at the same moment)."""
        if self.count():
            return None
        password = new_password()
        try:
            self.add(FIRST_ADMIN, password, True, (), actor, origin, must_change=True)
        except AccountError:
            return None  # another process of this node (or another node) was first
        return password
