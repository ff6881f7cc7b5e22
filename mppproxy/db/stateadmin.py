"""The auto-blacklist and the greylist for an administrator: list, add and
remove rows of the state database from a process without a reactor
(``mppproxy state``, ``state_cli.py``), as ``allowlist.py``'s blocking
functions serve ``mppproxy quarantine release --allow-sender``.

Floor 1 (``db/``): blocking SQLAlchemy Core on the caller's thread; every
error is SQLAlchemy's (the command turns it into a message and exit 3).

The proxies never see these writes at once: each answers from its
in-process caches and mirrors for up to ``database.cache_seconds``
(``blacklist.py``, ``greylist.py``), which is what the command tells the
operator.  What each change means to the running checks:

* a blacklist row (``add_blacklist``) is found by every lookup of an
  address inside its network until it expires; ``add_blacklist`` sets the
  reason and the expiry as given (an administrator may shorten one), where
  the proxies' own adds only ever extend;
* a greylist triplet removed (``remove_triplets``) starts again: its next
  attempt waits ``delay`` as a first one does;
* an auto-whitelist row (``whitelist_networks``) lets every triplet of its
  client network pass, for the policies whose greylisting has
  ``auto_whitelist_after`` > 0 (the only ones that read that table), until
  ``lifetime`` after its last use: each use extends it, as for a network
  that earned it.  Rows are keyed by the network at the policy's prefix
  (``ipv4_prefix``, ``ipv6_prefix``), as the check looks them up.

Queries use the tables' indexes: the blacklist by its key (the networks
covering an address) or its ``expires`` index, the greylist by
``client_net`` or its key.  A ``--sender`` or ``--recipient`` filter alone
reads the whole greylist table (no index on them: the proxies never ask by
sender); it is a table of rows that expire within days.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import os
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Optional

from sqlalchemy import and_, delete, or_, select
from sqlalchemy.dialects import mysql, sqlite
from sqlalchemy.engine import Engine, URL
from sqlalchemy.sql.elements import ColumnElement

from mppproxy.config.database import DatabaseConfig
from mppproxy.db.blacklist import covering_networks, normalise_network
from mppproxy.db.engine import WRITE, database_url, is_memory_sqlite, make_engine
from mppproxy.db.models import ADDRESS_LENGTH, REASON_LENGTH, StateTables, clip, create_missing


@dataclass(frozen=True)
class BlacklistRow:
    """One auto-blacklist entry as stored."""

    network: str
    reason: str
    created: float
    expires: float


@dataclass(frozen=True)
class TripletRow:
    """One greylist triplet as stored (``id``: its key, ``triplet_key``)."""

    id: str
    client_net: str
    sender: str
    recipient: str
    first_seen: float
    last_seen: float
    passed: bool
    expires: float


@dataclass(frozen=True)
class WhitelistRow:
    """One auto-whitelisted client network of the greylist."""

    client_net: str
    created: float
    last_seen: float
    expires: float


def covering(text: str) -> list[str]:
    """The networks, as stored, that contain the address or network
    ``text`` (the address's /32 or /128 and every shorter prefix; for a
    network, its own prefix and the shorter ones).  ValueError if ``text``
    is neither."""
    net = ipaddress.ip_network(normalise_network(text), strict=False)
    return covering_networks(net.network_address)[:net.prefixlen + 1]


def key_for(text: str, ipv4_prefix: int, ipv6_prefix: int) -> str:
    """The greylist's key for the client address or network ``text`` at a
    policy's prefixes; ValueError if ``text`` is wider than the prefix
    (one row could not hold it) or not an address."""
    net = ipaddress.ip_network(normalise_network(text), strict=False)
    prefix = ipv4_prefix if net.version == 4 else ipv6_prefix
    if net.prefixlen < prefix:
        raise ValueError(f"{text!r} is wider than the greylist's /{prefix} client networks: "
                         f"give one /{prefix} network (or an address in it) at a time")
    return str(ipaddress.ip_network(f"{net.network_address}/{prefix}", strict=False))


def sender_text(text: str) -> str:
    """An envelope address as the greylist stores it (lower case; the null
    sender ``<>`` as the empty string)."""
    t = text.strip()
    return "" if t in ("<>", '""') else t.lower()


class StateAdmin:
    """The state database's blacklist and greylist tables for one command:
    its own engine; ``close()`` (or the ``with`` block) disposes of it."""

    def __init__(self, engine: Engine, tables: StateTables):
        self.engine = engine
        self.tables = tables

    def create_tables(self) -> None:
        """Create the tables that are missing (a database the proxy has not
        used yet), as the proxy does at its start."""
        t = self.tables
        create_missing(self.engine, [t.blacklist, t.greylist, t.greylist_whitelist])

    # -- the auto-blacklist ------------------------------------------------

    def blacklist(self, now: float, client: Optional[str] = None,
                  limit: Optional[int] = None) -> list[BlacklistRow]:
        """Unexpired entries, latest expiry first; with ``client``, those
        whose network contains it."""
        b = self.tables.blacklist
        query = select(b.c.network, b.c.reason, b.c.created, b.c.expires).where(b.c.expires > now)
        if client is not None:
            query = query.where(b.c.network.in_(covering(client)))
        query = query.order_by(b.c.expires.desc(), b.c.network).limit(limit)
        with self.engine.connect() as conn:
            return [BlacklistRow(r[0], r[1], float(r[2]), float(r[3])) for r in conn.execute(query)]

    def add_blacklist(self, network: str, seconds: float, reason: str,
                      now: float) -> tuple[BlacklistRow, Optional[BlacklistRow]]:
        """List ``network`` until ``now + seconds`` with ``reason``, replacing
        an entry there (its reason and expiry, even an earlier one); the new
        row and the one replaced (None: none, or it had expired)."""
        network = normalise_network(network)
        b = self.tables.blacklist
        new = BlacklistRow(network, clip(reason, REASON_LENGTH), now, now + seconds)
        with self.engine.connect().execution_options(**WRITE) as conn, conn.begin():
            found = conn.execute(select(b.c.network, b.c.reason, b.c.created, b.c.expires)
                                 .where(b.c.network == network)).first()
            old = None if found is None else BlacklistRow(found[0], found[1], float(found[2]),
                                                          float(found[3]))
            conn.execute(self._upsert(b, dataclasses.asdict(new), ["reason", "created", "expires"]))
        return new, (old if old is not None and old.expires > now else None)

    def remove_blacklist(self, networks: list[str]) -> int:
        """Delete the entries of ``networks`` (as stored); how many there were."""
        if not networks:
            return 0
        b = self.tables.blacklist
        with self.engine.connect().execution_options(**WRITE) as conn, conn.begin():
            return int(conn.execute(delete(b).where(b.c.network.in_(networks))).rowcount)

    # -- the greylist ------------------------------------------------------

    def triplets(self, now: float, client: Optional[str] = None, sender: Optional[str] = None,
                 recipient: Optional[str] = None, ids: Optional[list[str]] = None,
                 limit: Optional[int] = None) -> list[TripletRow]:
        """Unexpired triplets matching every filter given, latest first
        seen first.  ``ids`` are keys or their leading hex digits (at least
        8); ``sender``/``recipient``: an address, or ``@domain`` for any
        address of that domain."""
        g = self.tables.greylist
        query = select(g.c.id, g.c.client_net, g.c.sender, g.c.recipient, g.c.first_seen,
                       g.c.last_seen, g.c.passed, g.c.expires).where(g.c.expires > now)
        for condition in self._triplet_filters(client, sender, recipient, ids):
            query = query.where(condition)
        query = query.order_by(g.c.first_seen.desc(), g.c.id).limit(limit)
        with self.engine.connect() as conn:
            return [TripletRow(r[0], r[1], r[2], r[3], float(r[4]), float(r[5]), bool(r[6]),
                               float(r[7])) for r in conn.execute(query)]

    def _triplet_filters(self, client: Optional[str], sender: Optional[str],
                         recipient: Optional[str],
                         ids: Optional[list[str]]) -> list[ColumnElement[bool]]:
        g = self.tables.greylist
        out: list[ColumnElement[bool]] = []
        if client is not None:
            out.append(g.c.client_net.in_(covering(client)))
        for column, value in ((g.c.sender, sender), (g.c.recipient, recipient)):
            if value is None:
                continue
            text = sender_text(value)
            if text.startswith("@"):
                out.append(column.like("%" + _like_escape(text), escape="\\"))
            else:
                out.append(column == clip(text, ADDRESS_LENGTH))
        if ids is not None:
            # A key prefix is a range of the primary key: hex digits sort
            # below "g", so every key starting with p is in [p, p + "g").
            out.append(or_(*[and_(g.c.id >= p, g.c.id < p + "g") for p in ids]))
        return out

    def remove_triplets(self, ids: list[str]) -> int:
        """Delete the triplets with these (whole) keys; how many there were."""
        if not ids:
            return 0
        g = self.tables.greylist
        with self.engine.connect().execution_options(**WRITE) as conn, conn.begin():
            return int(conn.execute(delete(g).where(g.c.id.in_(ids))).rowcount)

    def whitelist(self, now: float, client: Optional[str] = None,
                  limit: Optional[int] = None) -> list[WhitelistRow]:
        """Unexpired auto-whitelist rows, most recently used first."""
        w = self.tables.greylist_whitelist
        query = select(w.c.client_net, w.c.created, w.c.last_seen, w.c.expires) \
            .where(w.c.expires > now)
        if client is not None:
            query = query.where(w.c.client_net.in_(covering(client)))
        query = query.order_by(w.c.last_seen.desc(), w.c.client_net).limit(limit)
        with self.engine.connect() as conn:
            return [WhitelistRow(r[0], float(r[1]), float(r[2]), float(r[3]))
                    for r in conn.execute(query)]

    def whitelist_networks(self, networks: dict[str, float], now: float) -> list[WhitelistRow]:
        """Whitelist each network (a key as ``key_for`` gives it) as if it had
        just passed, for the lifetime given with it; the rows written."""
        w = self.tables.greylist_whitelist
        rows = [WhitelistRow(net, now, now, now + lifetime)
                for net, lifetime in sorted(networks.items())]
        with self.engine.connect().execution_options(**WRITE) as conn, conn.begin():
            for row in rows:
                conn.execute(self._upsert(w, dataclasses.asdict(row), ["last_seen", "expires"]))
        return rows

    def remove_whitelisted(self, networks: list[str]) -> int:
        """Delete the auto-whitelist rows of ``networks``; how many there were."""
        if not networks:
            return 0
        w = self.tables.greylist_whitelist
        with self.engine.connect().execution_options(**WRITE) as conn, conn.begin():
            return int(conn.execute(delete(w).where(w.c.client_net.in_(networks))).rowcount)

    # -- helpers -------------------------------------------------------------

    def _upsert(self, table: Any, row: dict[str, Any], update: list[str]) -> Any:
        """INSERT ``row``, or UPDATE the columns ``update`` of the row with
        its key: one statement, so a proxy writing the same key meanwhile
        cannot make it fail."""
        name = self.engine.dialect.name
        if name == "sqlite":
            stmt = sqlite.insert(table).values(**row)
            return stmt.on_conflict_do_update(
                index_elements=[c.name for c in table.primary_key.columns],
                set_={c: stmt.excluded[c] for c in update})
        if name in ("mysql", "mariadb"):
            mstmt = mysql.insert(table).values(**row)
            return mstmt.on_duplicate_key_update({c: mstmt.inserted[c] for c in update})
        raise NotImplementedError(f"no upsert for {name}")

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> StateAdmin:
        return self

    def __exit__(self, kind: Optional[type[BaseException]], value: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self.close()


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def state_url(db_config: DatabaseConfig, data_dir: str) -> URL:
    """The state database's URL as the proxy opens it (empty
    ``database.url``: SQLite at ``data_dir/state.sqlite``)."""
    return database_url(db_config, data_dir)


def missing_sqlite_file(url: URL) -> Optional[str]:
    """The path of a SQLite state database that does not exist yet, or
    None: a command that only reads must not create an empty one."""
    if url.get_backend_name() != "sqlite" or is_memory_sqlite(url):
        return None
    path = os.path.abspath(str(url.database))
    return None if os.path.exists(path) else path


def open_state_admin(db_config: DatabaseConfig, data_dir: str,
                     table_prefix: str = "mpp_") -> StateAdmin:
    """A ``StateAdmin`` for the state database ``[database]`` names.  No
    connection is made yet; a SQLite file's directory is made."""
    url = state_url(db_config, data_dir)
    if url.get_backend_name() == "sqlite" and not is_memory_sqlite(url):
        os.makedirs(os.path.dirname(str(url.database)), exist_ok=True)
    # A short-lived process: one connection, SQLite's own WAL checkpoints.
    config = dataclasses.replace(db_config, sqlite_in_reactor=False, pool_max=1, pool_min=1)
    return StateAdmin(make_engine(url, config), StateTables(table_prefix))
