"""The shared auto-blacklist in SQL (``BlacklistStore`` of
``policy/services.py``; ``BlacklistEntry`` is defined here, where entries
are made): spam traps and thresholds ``add`` client networks,
the ``blacklist`` check asks ``lookup`` for every transaction.

Rows are keyed by the network in CIDR form, as ``client_key`` writes it
(``192.0.2.7/32``, ``192.0.2.0/24``, ``2001:db8::/64``).  A lookup asks
for every network that could cover the address (33 for IPv4, 129 for
IPv6: an IN over the primary key), so any prefix a policy uses is found.

Mirror (the hot path): with ``cache_seconds`` > 0 every unexpired entry
is held in memory, loaded when the database starts and loaded again every
half ``cache_seconds`` (one SELECT of the whole table), so a lookup is a
few set probes and never waits for the database; a local ``add`` is
visible at once and other nodes' entries within ``cache_seconds``.  An
auto-blacklist holds the clients of the last hours, thousands of rows, not
millions; past ``MIRROR_MAX_ROWS`` (or with ``cache_seconds`` = 0, or
while the last good load is older than ``cache_seconds``: the database is
not answering) lookups ask the database per client instead, with a
listing kept until it expires and an absence for ``cache_seconds``.

Database (``batch.py``): lookups that miss the cache and adds are done in
batches, one transaction each, in the order they came: one SELECT for
every network the batch's lookups and adds name, the lookups answered in
Python from those rows and the adds before them, then one executemany
upsert for the adds (which extends, never shortens, an entry another node
wrote meanwhile) and one SELECT of what the adds left.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Union

from sqlalchemy import select
from sqlalchemy.engine import Engine

from twisted.internet import defer
from twisted.internet.task import LoopingCall

from mppproxy.db.base import Database
from mppproxy.db.batch import Batcher
from mppproxy.db.cache import DEFAULT_SIZE, ExpiringCache
from mppproxy.db.engine import cursor_in_transaction, placeholders
from mppproxy.db.models import REASON_LENGTH, StateTables, clip
from mppproxy.logsetup import Logger
from mppproxy.match import V4_MASKS, V6_MASKS, network_of, parse_ip, v4_text, v6_text

log = Logger()

# Entries held in memory at most (~200 bytes each); a larger blacklist is
# asked per client.
MIRROR_MAX_ROWS = 100_000

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class BlacklistEntry:
    """One auto-blacklisted client network."""

    network: str  # CIDR, "192.0.2.7/32" or "192.0.2.0/24"
    reason: str  # "spamtrap", "threshold messages", "threshold spam", ...
    expires: float  # Unix time


def normalise_network(network: str) -> str:
    """``network`` in the form ``client_key`` writes (host bits cleared,
    IPv4-mapped IPv6 as IPv4); ValueError if it is not a network."""
    net = ipaddress.ip_network(network, strict=False)
    if net.version == 6 and net.network_address.ipv4_mapped is not None and net.prefixlen >= 96:
        net = ipaddress.ip_network(f"{net.network_address.ipv4_mapped}/{net.prefixlen - 96}")
    return str(net)


def covering_networks(ip: IPAddress) -> list[str]:
    """Every network containing ``ip``, from /0 to the address itself,
    written as ``str(ipaddress.ip_network(...))`` writes them (but ~20x
    faster: a lookup that misses the cache builds 33 or 129 of them)."""
    n = int(ip)
    masks, text = (V4_MASKS, v4_text) if ip.version == 4 else (V6_MASKS, v6_text)
    out = []
    last, address = -1, ""
    for prefix, mask in enumerate(masks):
        network = n & mask
        if network != last:  # most added bits are zero: the text is the same
            last, address = network, text(network)
        out.append(f"{address}/{prefix}")
    return out


class _Lookup(NamedTuple):
    """A lookup that missed the cache: the networks covering one address."""

    networks: list[str]
    now: float


class _Add(NamedTuple):
    network: str
    reason: str
    now: float
    expires: float


class SqlBlacklistStore:
    def __init__(self, database: Database, cache_seconds: float,
                 cache_size: int = DEFAULT_SIZE, mirror_max_rows: int = MIRROR_MAX_ROWS):
        self._db = database
        self.cache_seconds = cache_seconds
        self.cache_size = cache_size
        self.mirror_max_rows = mirror_max_rows
        # When the mirror's last good load began (database clock); None:
        # no mirror, lookups ask the database.
        self.mirrored_at: Optional[float] = None
        # Local adds not yet certain to be in a load: network -> (entry, when).
        self._local: dict[str, tuple[BlacklistEntry, float]] = {}
        self._mirror_loop = LoopingCall(self.refresh_mirror)
        self._mirror_loop.clock = database.clock
        self._mirror_failing = False
        # Known listings by network, and how many use each (version, prefix):
        # a lookup only builds the networks of prefixes in use.
        self._listed: dict[str, BlacklistEntry] = {}
        self._prefixes: dict[tuple[int, int], int] = {}
        # Addresses the database did not list a moment ago.
        self._absent: ExpiringCache[str, bool] = ExpiringCache(cache_size)
        # The engine exists before the stores; its dialect needs no connection.
        self._sql = _Sql(database.tables, database.engine.dialect)
        self.batcher: Batcher[Union[_Lookup, _Add], Optional[BlacklistEntry]] = \
            Batcher(database, self._job)

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
        if self.mirror_fresh(now) or self._absent.get(str(ip), now):
            return None
        entry = await self.batcher.submit(_Lookup(covering_networks(ip), now))
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
        entry = BlacklistEntry(network, reason, now + seconds)
        self._remember(entry, now)
        self._local[network] = (entry, now)
        stored = await self.batcher.submit(_Add(network, reason, now, now + seconds))
        assert stored is not None  # an add's answer is its entry (blacklist_batch)
        self._remember(stored, self._now())

    def _job(self, engine: Engine, items: list[Union[_Lookup, _Add]],
             now: float) -> list[Optional[BlacklistEntry]]:
        return blacklist_batch(engine, self._sql, items)

    # -- the mirror --------------------------------------------------------

    def start_mirror(self) -> defer.Deferred[None]:
        """Load the mirror now and every half ``cache_seconds`` (nothing
        with ``cache_seconds`` = 0).  Fires when the first load is done
        (or failed: logged, lookups then ask the database)."""
        if self.cache_seconds <= 0 or self._mirror_loop.running:
            return defer.succeed(None)
        d = self._mirror_loop.start(self.cache_seconds / 2, now=False)
        d.addErrback(lambda f: log.failure("blacklist mirror stopped", f))
        return self.refresh_mirror()

    def stop_mirror(self) -> None:
        if self._mirror_loop.running:
            self._mirror_loop.stop()

    def mirror_fresh(self, now: float) -> bool:
        """Whether an address absent from memory is absent from the
        database as of less than ``cache_seconds`` ago."""
        return self.mirrored_at is not None and now - self.mirrored_at < self.cache_seconds

    def refresh_mirror(self) -> defer.Deferred[None]:
        """Load every unexpired entry; never fails (a failure is logged
        once per outage and the mirror ages out)."""
        started = self._now()
        d = self._db.run(_load_all, self._db.tables, started, self.mirror_max_rows + 1)
        d.addCallbacks(self._mirror_loaded, self._mirror_failed, callbackArgs=(started,))
        return d

    def _mirror_loaded(self, rows: list[tuple[str, str, float]], started: float) -> None:
        if self._mirror_failing:
            log.info("blacklist mirror loaded again from {database}", database=self._db.name)
            self._mirror_failing = False
        if len(rows) > self.mirror_max_rows:
            if self.mirrored_at is not None:
                log.info("auto-blacklist holds more than {n} entries: asked per client from "
                         "now on", n=self.mirror_max_rows)
            self.mirrored_at = None
            return
        self._listed.clear()
        self._prefixes.clear()
        self._absent.clear()
        for network, reason, expires in rows:
            self._remember(BlacklistEntry(network, reason, expires), started, bounded=False)
        # A local add whose row the load may have missed (written after
        # it read) stays until a load that began after the add.
        now = self._now()
        for network, (entry, added) in list(self._local.items()):
            if added < started - self.cache_seconds:
                del self._local[network]
            else:
                self._remember(entry, now, bounded=False)
        self.mirrored_at = started

    def _mirror_failed(self, failure: Any) -> None:
        if not self._mirror_failing:
            log.warn("blacklist mirror not loaded: {error}; lookups ask the database while its "
                     "last load is older than {seconds}s", error=failure.getErrorMessage(),
                     seconds=self.cache_seconds)
            self._mirror_failing = True

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

    def _remember(self, entry: BlacklistEntry, now: float, bounded: bool = True) -> None:
        old = self._listed.get(entry.network)
        if old is not None:
            if old.expires >= entry.expires:
                return
            self._forget(entry.network)
        if entry.expires <= now:
            return
        if self.mirrored_at is not None and len(self._listed) >= self.mirror_max_rows:
            # Grown past the mirror's bound by adds: a cache from now on.
            self.mirrored_at = None
        if bounded and self.mirrored_at is None and len(self._listed) >= self.cache_size:
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


def _load_all(engine: Engine, tables: StateTables, now: float,
              limit: int) -> list[tuple[str, str, float]]:
    """Every unexpired entry (at most ``limit``), for the mirror."""
    b = tables.blacklist
    query = select(b.c.network, b.c.reason, b.c.expires).where(b.c.expires > now).limit(limit)
    with engine.connect() as conn:
        return [(r[0], r[1], float(r[2])) for r in conn.execute(query)]


def _prefix_key(network: str) -> tuple[int, int]:
    address, prefix = network.rsplit("/", 1)
    return (6 if ":" in address else 4, int(prefix))


# -- in the database thread ----------------------------------------------------

# Networks per SELECT: a lookup names 33 (IPv4) or 129 (IPv6).  Far below
# SQLite's 32766 bound variables (3.32+) and MySQL's packet size.
_IN_CHUNK = 2000


class _Sql:
    """The batch job's statements for one dialect, as the DB-API driver
    takes them (``engine.cursor_in_transaction``), built once."""

    def __init__(self, t: StateTables, dialect: Any):
        b = dialect.identifier_preparer.quote(t.blacklist.name)
        self._dialect = dialect
        self._rows = f"SELECT network, reason, expires FROM {b} WHERE network IN "
        insert = (f"INSERT INTO {b} (network, reason, created, expires) "
                  f"VALUES {placeholders(dialect, 4)}")
        # Insert, or extend (never shorten) the existing entry in one
        # statement, so two nodes listing one network at once both succeed.
        # A listing that had run out starts again (created).
        if dialect.name == "sqlite":
            self.upsert = insert + (
                " ON CONFLICT (network) DO UPDATE SET "
                f"created = CASE WHEN {b}.expires <= excluded.created THEN excluded.created "
                f"ELSE {b}.created END, "
                f"reason = CASE WHEN excluded.expires > {b}.expires THEN excluded.reason "
                f"ELSE {b}.reason END, "
                f"expires = max({b}.expires, excluded.expires)")
        elif dialect.name in ("mysql", "mariadb"):
            # MySQL assigns left to right, each seeing the ones before: expires last.
            self.upsert = insert + (
                " ON DUPLICATE KEY UPDATE "
                "created = CASE WHEN expires <= VALUES(created) THEN VALUES(created) "
                "ELSE created END, "
                "reason = CASE WHEN VALUES(expires) > expires THEN VALUES(reason) ELSE reason END, "
                "expires = GREATEST(expires, VALUES(expires))")
        else:
            raise NotImplementedError(f"no blacklist upsert for {dialect.name}")

    def rows(self, cur: Any, networks: list[str]) -> list[tuple[Any, ...]]:
        if not networks:  # an empty IN () is an error on MySQL
            return []
        cur.execute(self._rows + placeholders(self._dialect, len(networks)), networks)
        found: list[tuple[Any, ...]] = cur.fetchall()
        return found


def blacklist_batch(engine: Engine, sql: _Sql,
                    items: list[Union[_Lookup, _Add]]) -> list[Optional[BlacklistEntry]]:
    """Each lookup's entry (None: not listed) and each add's entry as the
    database now holds it, in order, in one transaction."""
    adds = [item for item in items if isinstance(item, _Add)]
    networks = sorted({n for item in items
                       for n in (item.networks if isinstance(item, _Lookup) else (item.network,))})
    with cursor_in_transaction(engine, write=bool(adds)) as cur:
        # network -> (reason, expires), as the batch found them and as its
        # adds so far leave them.
        listed: dict[str, tuple[str, float]] = {}
        for i in range(0, len(networks), _IN_CHUNK):
            for r in sql.rows(cur, networks[i:i + _IN_CHUNK]):
                listed[r[0]] = (r[1], float(r[2]))
        answers: list[Optional[BlacklistEntry]] = []
        for item in items:
            if isinstance(item, _Add):
                old = listed.get(item.network)
                if old is None or item.expires > old[1]:
                    listed[item.network] = (item.reason, item.expires)
                answers.append(None)  # filled in below
                continue
            best: Optional[tuple[str, str, float]] = None
            for network in item.networks:
                entry = listed.get(network)
                if entry is not None and entry[1] > item.now and (best is None or entry[1] > best[2]):
                    best = (network, entry[0], entry[1])
            answers.append(None if best is None else BlacklistEntry(*best))
        if not adds:
            return answers
        # In network order (stable: one network's adds keep theirs), so two
        # nodes' batches lock rows in the same order.
        cur.executemany(sql.upsert, [(a.network, a.reason, a.now, a.expires)
                                     for a in sorted(adds, key=lambda a: a.network)])
        written = {r[0]: BlacklistEntry(r[0], r[1], float(r[2]))
                   for r in sql.rows(cur, sorted({a.network for a in adds}))}
    return [written[item.network] if isinstance(item, _Add) else answer
            for item, answer in zip(items, answers)]
