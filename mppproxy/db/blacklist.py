"""The shared auto-blacklist in SQL (``BlacklistStore`` of
``policy/services.py``): spam traps and thresholds ``add`` client networks,
the ``blacklist`` check asks ``lookup`` for every transaction.

Rows are keyed by the network in CIDR form, as ``client_key`` writes it
(``192.0.2.7/32``, ``192.0.2.0/24``, ``2001:db8::/64``).  A lookup asks
for every network that could cover the address (33 for IPv4, 129 for
IPv6: an IN over the primary key), so any prefix a policy uses is found.

Cache: a listing is kept until it expires, an absence for
``cache_seconds`` (other nodes' entries show within that time), and a
local ``add`` is visible at once.  Both are bounded.
"""
from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Any, Optional

from sqlalchemy import case, func, select
from sqlalchemy.dialects.mysql import insert as mysql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, Engine

from mppproxy.db.cache import DEFAULT_SIZE, ExpiringCache
from mppproxy.db.engine import WRITE
from mppproxy.db.models import REASON_LENGTH, StateTables, clip
from mppproxy.policy.patterns import parse_ip
from mppproxy.policy.services import BlacklistEntry

if TYPE_CHECKING:
    from mppproxy.db.state import StateDatabase

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def normalise_network(network: str) -> str:
    """``network`` in the form ``client_key`` writes (host bits cleared,
    IPv4-mapped IPv6 as IPv4); ValueError if it is not a network."""
    net = ipaddress.ip_network(network, strict=False)
    if net.version == 6 and net.network_address.ipv4_mapped is not None and net.prefixlen >= 96:
        net = ipaddress.ip_network(f"{net.network_address.ipv4_mapped}/{net.prefixlen - 96}")
    return str(net)


def network_of(ip: IPAddress, prefix: int) -> str:
    bits = ip.max_prefixlen
    mask = ((1 << bits) - 1) ^ ((1 << (bits - prefix)) - 1)
    return f"{type(ip)(int(ip) & mask)}/{prefix}"


def covering_networks(ip: IPAddress) -> list[str]:
    """Every network containing ``ip``, from /0 to the address itself."""
    return [network_of(ip, p) for p in range(ip.max_prefixlen + 1)]


class SqlBlacklistStore:
    def __init__(self, database: "StateDatabase", cache_seconds: float,
                 cache_size: int = DEFAULT_SIZE):
        self._db = database
        self.cache_seconds = cache_seconds
        self.cache_size = cache_size
        # Known listings by network, and how many use each (version, prefix):
        # a lookup only builds the networks of prefixes in use.
        self._listed: dict[str, BlacklistEntry] = {}
        self._prefixes: dict[tuple[int, int], int] = {}
        # Addresses the database did not list a moment ago.
        self._absent: ExpiringCache[str, bool] = ExpiringCache(cache_size)

    def _now(self) -> float:
        return float(self._db.clock.seconds())

    async def lookup(self, client_ip: str) -> Optional[BlacklistEntry]:
        """The unexpired entry covering ``client_ip`` at any prefix, or None."""
        ip = parse_ip(client_ip)
        if ip is None:
            return None
        now = self._now()
        entry = self._cached(ip, now)
        if entry is not None:
            return entry
        if self._absent.get(str(ip), now):
            return None
        entry = await self._db.run(_lookup, self._db.tables, covering_networks(ip), now)
        if entry is not None:
            self._remember(entry, now)
        elif self.cache_seconds > 0:
            self._absent.put(str(ip), True, now + self.cache_seconds, now)
        return entry

    async def add(self, network: str, seconds: float, reason: str) -> None:
        """List ``network`` for ``seconds`` from now; an existing entry is
        extended, never shortened.  This node sees it at once."""
        network = normalise_network(network)
        now = self._now()
        reason = clip(reason, REASON_LENGTH)
        self._remember(BlacklistEntry(network, reason, now + seconds), now)
        entry = await self._db.run(_add, self._db.tables, network, now, now + seconds, reason)
        self._remember(entry, self._now())

    # -- the cache ---------------------------------------------------------

    def _cached(self, ip: IPAddress, now: float) -> Optional[BlacklistEntry]:
        best: Optional[BlacklistEntry] = None
        for version, prefix in list(self._prefixes):
            if version != ip.version:
                continue
            network = network_of(ip, prefix)
            entry = self._listed.get(network)
            if entry is None:
                continue
            if entry.expires <= now:
                self._forget(network)
            elif best is None or entry.expires > best.expires:
                best = entry
        return best

    def _remember(self, entry: BlacklistEntry, now: float) -> None:
        old = self._listed.get(entry.network)
        if old is not None:
            if old.expires >= entry.expires:
                return
            self._forget(entry.network)
        if entry.expires <= now:
            return
        if len(self._listed) >= self.cache_size:
            for network in [n for n, e in self._listed.items() if e.expires <= now]:
                self._forget(network)
            while len(self._listed) >= self.cache_size:
                self._forget(next(iter(self._listed)))
        self._listed[entry.network] = entry
        key = _prefix_key(entry.network)
        self._prefixes[key] = self._prefixes.get(key, 0) + 1

    def _forget(self, network: str) -> None:
        if self._listed.pop(network, None) is None:
            return
        key = _prefix_key(network)
        left = self._prefixes[key] - 1
        if left:
            self._prefixes[key] = left
        else:
            del self._prefixes[key]

    def clear_cache(self) -> None:
        self._listed.clear()
        self._prefixes.clear()
        self._absent.clear()


def _prefix_key(network: str) -> tuple[int, int]:
    address, prefix = network.rsplit("/", 1)
    return (6 if ":" in address else 4, int(prefix))


# -- in the database thread ----------------------------------------------------

def _lookup(engine: Engine, t: StateTables, networks: list[str],
            now: float) -> Optional[BlacklistEntry]:
    b = t.blacklist
    with engine.connect() as conn:
        row = conn.execute(
            select(b.c.network, b.c.reason, b.c.expires)
            .where(b.c.network.in_(networks), b.c.expires > now)
            .order_by(b.c.expires.desc()).limit(1)).first()
    if row is None:
        return None
    return BlacklistEntry(row.network, row.reason, float(row.expires))


def _add(engine: Engine, t: StateTables, network: str, now: float, expires: float,
         reason: str) -> BlacklistEntry:
    b = t.blacklist
    values: dict[str, Any] = {"network": network, "reason": reason, "created": now,
                              "expires": expires}
    with engine.connect().execution_options(**WRITE) as conn, conn.begin():
        _upsert(conn, t, values, now)
        row = conn.execute(select(b.c.network, b.c.reason, b.c.expires)
                           .where(b.c.network == network)).one()
    return BlacklistEntry(row.network, row.reason, float(row.expires))


def _upsert(conn: Connection, t: StateTables, values: dict[str, Any], now: float) -> None:
    """Insert, or extend (never shorten) the existing entry in one
    statement, so two nodes listing one network at once both succeed."""
    b = t.blacklist
    dialect = conn.dialect.name
    if dialect == "sqlite":
        stmt = sqlite_insert(b).values(**values)
        new = stmt.excluded
        conn.execute(stmt.on_conflict_do_update(index_elements=[b.c.network], set_={
            # A listing that had run out starts again.
            "created": case((b.c.expires <= now, new.created), else_=b.c.created),
            "reason": case((new.expires > b.c.expires, new.reason), else_=b.c.reason),
            "expires": func.max(b.c.expires, new.expires),
        }))
    elif dialect in ("mysql", "mariadb"):
        stmt = mysql_insert(b).values(**values)
        new = stmt.inserted
        # MySQL assigns left to right, each seeing the ones before: expires last.
        conn.execute(stmt.on_duplicate_key_update([
            ("created", case((b.c.expires <= now, new.created), else_=b.c.created)),
            ("reason", case((new.expires > b.c.expires, new.reason), else_=b.c.reason)),
            ("expires", func.greatest(b.c.expires, new.expires)),
        ]))
    else:
        raise NotImplementedError(f"no blacklist upsert for {dialect}")
