"""Each recipient domain's own allow and block lists in SQL
(``AllowListStore`` of ``policy/services.py``): domain administrators edit
them in the web console (issue 13), "release and allow this sender" adds to
the allow list, the ``access`` check reads them for every recipient
(issue #12).

Semantics.  An entry is (recipient domain D, kind, what): mail to
recipients at D from a sender or a client network that ``what`` matches
is allowed (kind ``allow``) or refused (kind ``block``).

* ``block``: the recipient is refused at RCPT, ``550 5.7.1`` from the
  ``domain_block`` reply template, naming the domain's administrator (RFC
  5321 4.2.2 / 4.2.3: 550 for a command refused for policy reasons; RFC
  3463 3.8: X.7.1 delivery not authorized).  Only that recipient: another
  domain's recipients in the same transaction are not touched.
* ``allow``: for each such recipient the ``access`` check answers
  ``WHITELIST_RECIPIENT``: that recipient's later pre-DATA checks
  (auto-blacklist, spam traps, thresholds, DNS lists, SPF, the score,
  greylisting) are skipped.  When EVERY recipient the policy engine let
  through is allowed this way, the transaction counts as whitelisted for
  the verdict (``TransactionRecord.allowed_for_all``; ``verdict.py``): the
  message is relayed whatever its spam score.  A virus or another hard
  scan result is still refused (the verdict looks at those first).
* What wins: the site's blacklists (the policy's access lists) first, then
  a domain's block, then the site's whitelists, then a domain's allow --
  and an auto-blacklisted client gets no allow pass.  An explicit "no"
  wins over a "yes"; a domain's block wins over its own allow of the same
  sender (``policy/checks/access.py``).

``what`` is a sender -- an address (``user@example.org``), ``@example.org``
(any sender of that domain) or ``.example.org`` (any sender of its
subdomains), as in the access lists (docs/configuration.md, "Lists");
``example.org`` and ``*.example.org`` are read as the latter two -- or a
client network, ``192.0.2.0/24`` or ``2001:db8::/48`` (an address alone is
its /32 or /128; host bits are cleared).  Case and a trailing dot are
ignored (everything is stored lower-cased).  ``user@`` (a local part in any
domain) and ``<>`` (bounces) are refused, and an allowed network must be
at least a /8 (IPv4) or a /16 (IPv6): too broad for a pass that skips
every check.  D is a recipient domain, matched exactly (a subdomain has
entries of its own).  A sender entry never matches the null sender; a
network entry matches whatever the sender.

Mirror (the hot path): with ``cache_seconds`` > 0 every entry is held in
memory, loaded when the database starts and again every half
``cache_seconds``, so a lookup is a dict probe (most domains have no
entries) and a few set probes, and never waits for the database; a local
add or removal is seen at once, other processes' within
``cache_seconds``.  Before the first load the mirror is empty (mail is
scored as usual).  A load that fails is logged once per outage and the
last mirror keeps serving: the lists change by hand, rarely, so a stale
one is right far more often than an empty one.

Past ``MIRROR_MAX_ROWS`` entries (or with ``cache_seconds`` = 0) each
(domain, sender, client) is asked of the database instead, in batches
(``batch.py``), the answer kept for ``cache_seconds``; a database that
fails then fails the check (``policy.on_error``, docs/design.md promise 4),
as the other state-database checks do.  The periodic load counts the rows
first, so it loads them again once they are few enough.

The table is ``<prefix>domain_lists``; rows an older version wrote to
``<prefix>allow_senders`` are moved into it whenever the tables are made
(``move_legacy``).  The release command and the web console run without
the proxy's store: the blocking functions below (``add_entry``,
``remove_entry``, ``list_entries``, and for the allow list of senders
``allow_sender``, ``remove_sender``, ``list_allowed``) and
``open_allow_list`` serve them.
"""
from __future__ import annotations

import builtins
import dataclasses
import ipaddress
import os
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, NamedTuple, Optional, Sequence

from sqlalchemy import delete, func, insert, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from twisted.internet import defer
from twisted.internet.task import LoopingCall

from mppproxy.config.database import DatabaseConfig
from mppproxy.db.base import Database
from mppproxy.db.batch import Batcher
from mppproxy.db.cache import DEFAULT_SIZE, ExpiringCache
from mppproxy.db.engine import (WRITE, cursor_in_transaction, database_url, is_memory_sqlite,
                                make_engine, placeholders)
from mppproxy.db.models import (ADDED_BY_LENGTH, ADDRESS_LENGTH, NOTE_LENGTH,
                                StateTables, clip, create_missing)
from mppproxy.logsetup import Logger
from mppproxy.match import network_of, parse_ip

log = Logger()

# Entries held in memory at most (~150 bytes each); larger lists are
# asked per (domain, sender, client).
MIRROR_MAX_ROWS = 100_000
ALLOW, BLOCK = "allow", "block"
KINDS = (ALLOW, BLOCK)
# The widest network an allow entry may name: a pass that skips every
# check for a quarter of the IPv4 Internet is a mistake, not a decision.
MIN_ALLOW_PREFIX = {4: 8, 6: 16}


@dataclass(frozen=True)
class ListEntry:
    """One row of a domain's lists."""

    domain: str  # the recipient domain, lower-case
    kind: str  # ALLOW or BLOCK
    entry: str  # a sender pattern or a network (``is_network``)
    added: float  # Unix time
    added_by: str = ""
    note: str = ""

    @property
    def what(self) -> str:
        """"network" or "sender"."""
        return "network" if is_network(self.entry) else "sender"

    def to_json(self) -> dict[str, Any]:
        return {"domain": self.domain, "kind": self.kind, "entry": self.entry,
                "what": self.what, "added": self.added, "added_by": self.added_by,
                "note": self.note}


@dataclass(frozen=True)
class AllowEntry:
    """One allowed sender (``list_allowed``: the allow list of senders)."""

    domain: str  # the recipient domain, lower-case
    sender: str  # "user@example.org", "@example.org" or ".example.org"
    added: float  # Unix time
    added_by: str = ""
    note: str = ""


@dataclass(frozen=True)
class Decision:
    """What a domain's lists say about one recipient: the kind and the
    entry that matched."""

    kind: str
    entry: str


# -- the notation ----------------------------------------------------------------

def _domain_text(text: str) -> str:
    return text.strip().rstrip(".").lower()


def _check_domain(domain: str, what: str) -> None:
    if (not domain or len(domain) > 253 or "@" in domain or "*" in domain or ".." in domain
            or domain.startswith(".") or any(c.isspace() for c in domain)):
        raise ValueError(f"{what} is not a domain name")


def normalise_domain(domain: str) -> str:
    """``domain`` as the table keys it (lower-case, no trailing dot);
    ValueError if it is not a domain name."""
    d = _domain_text(domain)
    _check_domain(d, f"recipient domain {domain!r}")
    return d


def normalise_kind(kind: str) -> str:
    k = kind.strip().lower()
    if k not in KINDS:
        raise ValueError(f"kind {kind!r} is neither 'allow' nor 'block'")
    return k


def normalise_sender(pattern: str) -> str:
    """``pattern`` as the table keys it: ``user@example.org``,
    ``@example.org`` or ``.example.org``; ValueError (saying what is
    accepted) for anything else."""
    t = pattern.strip()
    what = f"sender {pattern!r}"
    if not t or t == "<>":
        raise ValueError(f"{what}: the null sender cannot be listed (an allow would pass "
                         "every bounce)")
    local, at, domain = t.rpartition("@")
    if not at:
        local, domain = "", t
    if at and not domain:
        raise ValueError(f"{what}: a local part in any domain is too broad; give "
                         "user@example.org, @example.org or .example.org")
    d = _domain_text(domain)
    if local:
        if any(c.isspace() for c in local) and not local.startswith('"'):
            raise ValueError(f"{what} is not an address")
        _check_domain(d, what)
        out = f"{local.lower()}@{d}"
    else:
        subdomains = d.startswith(".") or d.startswith("*.")
        d = d[2:] if d.startswith("*.") else d[1:] if d.startswith(".") else d
        _check_domain(d, what)
        out = f".{d}" if subdomains else f"@{d}"
    if len(out) > ADDRESS_LENGTH:
        raise ValueError(f"{what} is longer than {ADDRESS_LENGTH} characters")
    return out


def _as_network(text: str) -> Optional[str]:
    """``text`` as a network (IPv4-mapped IPv6 as IPv4), or None when it
    is not an address or a network."""
    t = text.strip()
    if not t or "@" in t:
        return None
    try:
        net = ipaddress.ip_network(t, strict=False)
    except ValueError:
        return None
    if net.version == 6 and net.network_address.ipv4_mapped is not None and net.prefixlen >= 96:
        net = ipaddress.ip_network(f"{net.network_address.ipv4_mapped}/{net.prefixlen - 96}")
    return str(net)


def is_network(entry: str) -> bool:
    """A stored entry names a client network (senders always hold an
    "@" or start with ".")."""
    return "@" not in entry and not entry.startswith(".")


def normalise_entry(text: str, kind: str = BLOCK) -> str:
    """``text`` as the table keys it: a network (``192.0.2.0/24``; an
    address alone is its /32 or /128) or a sender pattern
    (``normalise_sender``); ValueError saying what is accepted."""
    network = _as_network(text)
    if network is None:
        return normalise_sender(text)
    net = ipaddress.ip_network(network)
    if net.prefixlen == 0 or (kind == ALLOW and net.prefixlen < MIN_ALLOW_PREFIX[net.version]):
        raise ValueError(f"network {text.strip()!r} is too broad for a {kind} entry (at least "
                         f"/{MIN_ALLOW_PREFIX[net.version] if kind == ALLOW else 1})")
    return network


def sender_keys(sender: str) -> list[str]:
    """The entries that would match the envelope sender ``sender``, most
    specific first: the address, its domain, each parent as ``.parent``.
    None for the null sender or an address without a domain."""
    local, at, domain = sender.rpartition("@")
    d = _domain_text(domain)
    if not at or not d:
        return []
    keys = [f"{local.lower()}@{d}", f"@{d}"]
    dot = d.find(".")
    while dot >= 0:
        keys.append(d[dot:])
        dot = d.find(".", dot + 1)
    return keys


def network_keys(client_ip: str, prefixes: Optional[dict[int, tuple[int, ...]]] = None
                 ) -> list[str]:
    """The network entries that would match ``client_ip``, most specific
    first: at the prefix lengths given per IP version, or at every one."""
    ip = parse_ip(client_ip) if client_ip else None
    if ip is None:
        return []
    if prefixes is None:
        lengths: Sequence[int] = range(32 if ip.version == 4 else 128, 0, -1)
    else:
        lengths = prefixes.get(ip.version, ())
    return [network_of(ip, p) for p in lengths]


@dataclass
class _Rules:
    """One domain's entries in memory."""

    senders: dict[str, set[str]] = field(default_factory=lambda: {ALLOW: set(), BLOCK: set()})
    networks: dict[str, set[str]] = field(default_factory=lambda: {ALLOW: set(), BLOCK: set()})
    # IP version -> the prefix lengths of its network entries, longest first.
    prefixes: dict[int, tuple[int, ...]] = field(default_factory=dict)

    def set(self, kind: str, entry: str, present: bool) -> bool:
        """Add or remove an entry; whether it was there before."""
        network = is_network(entry)
        entries = (self.networks if network else self.senders)[kind]
        was = entry in entries
        if present:
            entries.add(entry)
        else:
            entries.discard(entry)
        if network and was != present:
            lengths: dict[int, set[int]] = {}
            for e in self.networks[ALLOW] | self.networks[BLOCK]:
                net = ipaddress.ip_network(e)
                lengths.setdefault(net.version, set()).add(net.prefixlen)
            self.prefixes = {v: tuple(sorted(ps, reverse=True)) for v, ps in lengths.items()}
        return was

    def empty(self) -> bool:
        return not any(self.senders.values()) and not any(self.networks.values())

    def decide(self, sender: str, client_ip: str) -> Optional[Decision]:
        keys = sender_keys(sender) if sender and (self.senders[ALLOW] or self.senders[BLOCK]) \
            else []
        nets = network_keys(client_ip, self.prefixes) if self.prefixes else []
        return _first(keys, nets, lambda kind, key: key in (
            self.networks if nets and is_network(key) else self.senders)[kind])


def _first(keys: list[str], nets: list[str], has: Any) -> Optional[Decision]:
    """The first match, block before allow, each most specific first
    (a sender before a network)."""
    for kind in (BLOCK, ALLOW):
        for key in keys:
            if has(kind, key):
                return Decision(kind, key)
        for key in nets:
            if has(kind, key):
                return Decision(kind, key)
    return None


# -- blocking: the release command, the console, the store's threads -------------

def add_entry(engine: Engine, tables: StateTables, domain: str, kind: str, entry: str,
              added_by: str = "", note: str = "", now: Optional[float] = None) -> bool:
    """Put ``entry`` (a sender pattern or a network) on ``domain``'s
    ``kind`` list.  True if the entry is new; False if it was there
    already (left as it was: the first to add it is the one recorded).
    Blocking; ValueError for a value the list does not take."""
    domain, kind = normalise_domain(domain), normalise_kind(kind)
    entry = normalise_entry(entry, kind)
    t = tables.domain_lists
    row = {"domain": domain, "kind": kind, "entry": entry,
           "added": time.time() if now is None else now,
           "added_by": clip(added_by, ADDED_BY_LENGTH), "note": clip(note, NOTE_LENGTH)}
    try:
        with engine.connect().execution_options(**WRITE) as conn, conn.begin():
            found = conn.execute(select(t.c.domain).where(
                (t.c.domain == domain) & (t.c.kind == kind) & (t.c.entry == entry))).first()
            if found is not None:
                return False
            conn.execute(insert(t).values(**row))
    except IntegrityError:
        # MySQL: another node inserted it between our look and our insert.
        return False
    return True


def remove_entry(engine: Engine, tables: StateTables, domain: str, kind: str,
                 entry: str) -> bool:
    """Remove the entry; True if there was one.  Blocking."""
    domain, kind = normalise_domain(domain), normalise_kind(kind)
    entry = _as_network(entry) or normalise_sender(entry)
    t = tables.domain_lists
    with engine.connect().execution_options(**WRITE) as conn, conn.begin():
        deleted = conn.execute(delete(t).where(
            (t.c.domain == domain) & (t.c.kind == kind) & (t.c.entry == entry)))
        return bool(deleted.rowcount)


def list_entries(engine: Engine, tables: StateTables, domains: Optional[Sequence[str]] = None,
                 kind: Optional[str] = None, limit: Optional[int] = None) -> list[ListEntry]:
    """The entries (of ``domains`` only, when given; of one ``kind``),
    by domain, kind and entry.  Blocking."""
    t = tables.domain_lists
    query = select(t.c.domain, t.c.kind, t.c.entry, t.c.added, t.c.added_by, t.c.note)
    if domains is not None:
        query = query.where(t.c.domain.in_([normalise_domain(d) for d in domains]))
    if kind is not None:
        query = query.where(t.c.kind == normalise_kind(kind))
    query = query.order_by(t.c.domain, t.c.kind, t.c.entry).limit(limit)
    with engine.connect() as conn:
        return [ListEntry(r[0], r[1], r[2], float(r[3]), r[4], r[5]) for r in conn.execute(query)]


def allow_sender(engine: Engine, tables: StateTables, domain: str, sender: str,
                 added_by: str = "", note: str = "", now: Optional[float] = None) -> bool:
    """Allow ``sender`` (an address, ``@domain`` or ``.parent``) for
    recipients at ``domain`` (``add_entry`` of a sender); True if new."""
    return add_entry(engine, tables, domain, ALLOW, normalise_sender(sender), added_by, note,
                     now)


def remove_sender(engine: Engine, tables: StateTables, domain: str, sender: str) -> bool:
    """Remove an allowed sender; True if there was one.  Blocking."""
    return remove_entry(engine, tables, domain, ALLOW, normalise_sender(sender))


def list_allowed(engine: Engine, tables: StateTables,
                 domain: Optional[str] = None) -> list[AllowEntry]:
    """Every allowed sender (of ``domain`` only, when given), by domain
    and sender.  Blocking."""
    return [AllowEntry(e.domain, e.entry, e.added, e.added_by, e.note)
            for e in list_entries(engine, tables, None if domain is None else [domain], ALLOW)
            if not is_network(e.entry)]


def move_legacy(engine: Engine, tables: StateTables) -> int:
    """Move the rows of ``allow_senders`` (the allow list before the block
    lists: an older node may still write it) into ``domain_lists`` as
    allow entries; how many.  Blocking; two processes doing it at once
    are harmless (the loser's insert of a row already there is skipped)."""
    old, new = tables.allow_senders, tables.domain_lists
    moved = 0
    for _ in range(3):  # bounded: another process's move is the only conflict
        try:
            with engine.connect().execution_options(**WRITE) as conn, conn.begin():
                rows = conn.execute(select(old.c.domain, old.c.sender, old.c.added,
                                           old.c.added_by, old.c.note).limit(10_000)).all()
                if not rows:
                    return moved
                for domain, sender, added, added_by, note in rows:
                    there = conn.execute(select(new.c.domain).where(
                        (new.c.domain == domain) & (new.c.kind == ALLOW)
                        & (new.c.entry == sender))).first()
                    if there is None:
                        conn.execute(insert(new).values(domain=domain, kind=ALLOW, entry=sender,
                                                        added=added, added_by=added_by,
                                                        note=note))
                    conn.execute(delete(old).where((old.c.domain == domain)
                                                   & (old.c.sender == sender)))
                moved += len(rows)
        except IntegrityError:
            continue
    return moved


class AllowListAdmin:
    """The domain lists for a process without a reactor (the quarantine
    CLI, the web console): its own engine, its tables created if missing.
    A context manager (``open_allow_list``); ``close()`` disposes of the
    connections."""

    def __init__(self, engine: Engine, tables: StateTables):
        self.engine = engine
        self.tables = tables
        create_missing(engine, [tables.allow_senders, tables.domain_lists])
        move_legacy(engine, tables)

    def allow(self, domain: str, sender: str, added_by: str = "", note: str = "") -> bool:
        """``allow_sender``: True if the entry is new."""
        return allow_sender(self.engine, self.tables, domain, sender, added_by, note)

    def remove(self, domain: str, sender: str) -> bool:
        """``remove_sender``: True if there was an entry."""
        return remove_sender(self.engine, self.tables, domain, sender)

    def list(self, domain: Optional[str] = None) -> list[AllowEntry]:
        """``list_allowed``."""
        return list_allowed(self.engine, self.tables, domain)

    def add_entry(self, domain: str, kind: str, entry: str, added_by: str = "",
                  note: str = "") -> bool:
        return add_entry(self.engine, self.tables, domain, kind, entry, added_by, note)

    def remove_entry(self, domain: str, kind: str, entry: str) -> bool:
        return remove_entry(self.engine, self.tables, domain, kind, entry)

    def entries(self, domains: Optional[Sequence[str]] = None, kind: Optional[str] = None,
                limit: Optional[int] = None) -> "builtins.list[ListEntry]":
        return list_entries(self.engine, self.tables, domains, kind, limit)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> AllowListAdmin:
        return self

    def __exit__(self, kind: Optional[type[BaseException]], value: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self.close()


def open_allow_list(db_config: DatabaseConfig, data_dir: str,
                    table_prefix: str = "mpp_") -> AllowListAdmin:
    """The domain lists of the state database ``[database]`` names (empty
    URL: SQLite at ``data_dir/state.sqlite``, as the proxy opens it).
    Blocking: connects and creates the tables if missing; errors are
    SQLAlchemy's."""
    url = database_url(db_config, data_dir)
    if url.get_backend_name() == "sqlite" and not is_memory_sqlite(url):
        os.makedirs(os.path.dirname(str(url.database)), exist_ok=True)
    # A short-lived process: SQLite's own WAL checkpoints (the proxy's
    # checkpoint loop is not running here), one connection is enough.
    config = dataclasses.replace(db_config, sqlite_in_reactor=False, pool_max=1)
    return AllowListAdmin(make_engine(url, config), StateTables(table_prefix))


def _load(engine: Engine, tables: StateTables,
          limit: int) -> tuple[int, Optional[list[tuple[str, str, str]]]]:
    """(rows, every (domain, kind, entry)) for the mirror; the list is
    None when there are more than ``limit`` rows (only counted)."""
    t = tables.domain_lists
    with engine.connect() as conn:
        count = int(conn.execute(select(func.count()).select_from(t)).scalar_one())
        if count > limit:
            return count, None
        return count, [(r[0], r[1], r[2])
                       for r in conn.execute(select(t.c.domain, t.c.kind, t.c.entry))]


class _Lookup(NamedTuple):
    """A (domain, sender, client) the mirror cannot answer: the entries
    that would match, each kind most specific first."""

    domain: str
    keys: list[str]  # the sender's
    nets: list[str]  # the client's


class _Sql:
    """The per-lookup statement for one dialect, as the DB-API driver
    takes it (``engine.cursor_in_transaction``)."""

    def __init__(self, t: StateTables, dialect: Any):
        name = dialect.identifier_preparer.quote(t.domain_lists.name)
        mark = "?" if dialect.paramstyle == "qmark" else "%s"
        self._dialect = dialect
        self._select = f"SELECT kind, entry FROM {name} WHERE domain = {mark} AND entry IN "

    def found(self, cur: Any, item: _Lookup) -> set[tuple[str, str]]:
        keys = item.keys + item.nets
        cur.execute(self._select + placeholders(self._dialect, len(keys)), [item.domain, *keys])
        return {(r[0], r[1]) for r in cur.fetchall()}


def _lookup_batch(engine: Engine, sql: _Sql, items: list[_Lookup]) -> list[Optional[Decision]]:
    """Each lookup's decision, or None, in one transaction."""
    answers: list[Optional[Decision]] = []
    with cursor_in_transaction(engine, write=False) as cur:
        for item in items:
            found = sql.found(cur, item)
            answers.append(_first(item.keys, item.nets, lambda kind, key: (kind, key) in found))
    return answers


# -- the store: the proxy's side -------------------------------------------------

class SqlAllowListStore:
    """The domain lists as the policy checks see them
    (``StateDatabase.allowlist``)."""

    def __init__(self, database: Database, cache_seconds: float,
                 cache_size: int = DEFAULT_SIZE, mirror_max_rows: int = MIRROR_MAX_ROWS):
        self._db = database
        self.cache_seconds = cache_seconds
        self.mirror_max_rows = mirror_max_rows
        # domain -> its entries; None: asked per lookup (too many rows, or
        # cache_seconds = 0).
        self._mirror: Optional[dict[str, _Rules]] = {} if cache_seconds > 0 else None
        # When the last good load began (the state database's clock); None
        # before the first.
        self.mirrored_at: Optional[float] = None
        # Loads started so far; the newest one applied (an older load that
        # ends late must not undo a newer one).
        self._loads_started = 0
        self._loads_applied = 0
        # Loads in flight (the reload loop waits for its own before it
        # schedules the next).
        self.loading = 0
        # Local changes a load may have missed: (domain, kind, entry) ->
        # (present, loads started when the database had it; None: not
        # written yet).
        self._local: dict[tuple[str, str, str], tuple[bool, Optional[int]]] = {}
        self._mirror_loop = LoopingCall(self.refresh_mirror)
        self._mirror_loop.clock = database.clock
        self._mirror_failing = False
        self._too_large_logged = False
        # Per-lookup answers (None for none), for cache_seconds.
        self._answers: ExpiringCache[tuple[str, str, str], tuple[Optional[Decision]]] = \
            ExpiringCache(cache_size)
        self._sql = _Sql(database.tables, database.engine.dialect)
        self.batcher: Batcher[_Lookup, Optional[Decision]] = Batcher(database, self._job)

    def _now(self) -> float:
        return float(self._db.clock.seconds())

    @property
    def mirrored(self) -> bool:
        """Lookups are answered from memory."""
        return self._mirror is not None

    async def decide(self, domain: str, sender: str, client_ip: str) -> Optional[Decision]:
        """What ``domain``'s lists say about mail from ``sender`` sent by
        ``client_ip``: the block entry that matches, else the allow entry,
        else None.  ``domain`` as ``Facts.recipient_domain`` gives it
        (lower-case, no trailing dot)."""
        mirror = self._mirror
        if mirror is not None:
            rules = mirror.get(domain)
            # Most recipient domains have no entries: one dict probe.
            return None if rules is None else rules.decide(sender, client_ip)
        keys = sender_keys(sender) if sender else []
        nets = network_keys(client_ip)
        if not keys and not nets:
            return None
        now = self._now()
        cache_key = (domain, keys[0] if keys else "", nets[0] if nets else "")
        cached = self._answers.get(cache_key, now)
        if cached is not None:
            return cached[0]
        found = await self.batcher.submit(_Lookup(domain, keys, nets))
        if self.cache_seconds > 0:
            self._answers.put(cache_key, (found,), now + self.cache_seconds, now)
        return found

    async def lookup(self, domain: str, sender: str) -> Optional[str]:
        """The allow entry of a sender pattern matching ``sender`` at
        ``domain`` (None too when a block entry matches it)."""
        found = await self.decide(domain, sender, "")
        return found.entry if found is not None and found.kind == ALLOW else None

    def _job(self, engine: Engine, items: list[_Lookup], now: float) -> list[Optional[Decision]]:
        return _lookup_batch(engine, self._sql, items)

    async def add_entry(self, domain: str, kind: str, entry: str, added_by: str = "",
                        note: str = "") -> bool:
        """``add_entry`` from the reactor (in the pool); this node applies
        the entry at once.  True if it is new.  ValueError for a value the
        list does not take; a database failure is ``StateDatabaseError``,
        and the entry is not kept."""
        k = normalise_kind(kind)
        key = (normalise_domain(domain), k, normalise_entry(entry, k))
        return await self._change(key, True, add_entry, *key, added_by, note, self._now())

    async def remove_entry(self, domain: str, kind: str, entry: str) -> bool:
        """``remove_entry`` from the reactor; this node stops applying the
        entry at once.  True if there was one."""
        key = (normalise_domain(domain), normalise_kind(kind),
               _as_network(entry) or normalise_sender(entry))
        return await self._change(key, False, remove_entry, *key)

    async def add(self, domain: str, sender: str, added_by: str = "", note: str = "") -> bool:
        """Allow a sender (``add_entry``)."""
        return await self.add_entry(domain, ALLOW, normalise_sender(sender), added_by, note)

    async def remove(self, domain: str, sender: str) -> bool:
        """Stop allowing a sender (``remove_entry``)."""
        return await self.remove_entry(domain, ALLOW, normalise_sender(sender))

    async def entries(self, domain: Optional[str] = None) -> list[AllowEntry]:
        """``list_allowed`` from the reactor (always the database's rows)."""
        rows: list[AllowEntry] = await self._db.run(list_allowed, self._db.tables, domain)
        return rows

    async def _change(self, key: tuple[str, str, str], present: bool, fn: Any,
                      *args: Any) -> bool:
        before = self._apply(key, present)
        self._local[key] = (present, None)
        try:
            changed: bool = await self._db.run(fn, self._db.tables, *args)
        except BaseException:
            # Not in the database: this node must not act as if it were.
            self._local.pop(key, None)
            self._apply(key, before)
            raise
        if self._local.get(key) == (present, None):
            self._local[key] = (present, self._loads_started)
        return changed

    def _apply(self, key: tuple[str, str, str], present: bool) -> bool:
        """Set ``key`` in memory; whether it was there before."""
        self._answers.clear()  # any cached answer of the domain may change
        mirror = self._mirror
        if mirror is None:
            return present  # nothing held to restore
        domain, kind, entry = key
        rules = mirror.get(domain)
        if rules is None:
            if not present:
                return False
            rules = mirror[domain] = _Rules()
        was = rules.set(kind, entry, present)
        if rules.empty():
            del mirror[domain]
        return was

    # -- the mirror --------------------------------------------------------

    def start_mirror(self) -> defer.Deferred[None]:
        """Load the mirror now and every half ``cache_seconds`` (nothing
        with ``cache_seconds`` = 0).  Fires when the first load is done
        or failed (logged)."""
        if self.cache_seconds <= 0 or self._mirror_loop.running:
            return defer.succeed(None)
        d = self._mirror_loop.start(self.cache_seconds / 2, now=False)
        d.addErrback(lambda f: log.failure("allow-list mirror stopped", f))
        return self.refresh_mirror()

    def stop_mirror(self) -> None:
        if self._mirror_loop.running:
            self._mirror_loop.stop()

    def refresh_mirror(self) -> defer.Deferred[None]:
        """Load every entry (or, past ``mirror_max_rows``, count them);
        never fails: a failure is logged once per outage and the last
        mirror keeps serving."""
        self._loads_started += 1
        self.loading += 1
        seq, started = self._loads_started, self._now()
        d = self._db.run(_load, self._db.tables, self.mirror_max_rows)
        d.addCallbacks(self._mirror_loaded, self._mirror_failed, callbackArgs=(seq, started))
        d.addBoth(self._load_ended)
        return d

    def _load_ended(self, result: None) -> None:
        self.loading -= 1
        return result

    def _mirror_loaded(self, loaded: tuple[int, Optional[list[tuple[str, str, str]]]], seq: int,
                       started: float) -> None:
        if self._mirror_failing:
            log.info("allow-list mirror loaded again from {database}", database=self._db.name)
            self._mirror_failing = False
        if seq < self._loads_applied:
            return  # a newer load is in already
        self._loads_applied = seq
        count, rows = loaded
        if rows is None:
            if not self._too_large_logged:
                log.info("domain allow/block lists hold {count} entries, more than {n}: asked "
                         "per sender from now on", count=count, n=self.mirror_max_rows)
                self._too_large_logged = True
            self._mirror = None
            self.mirrored_at = started
            self._forget_seen_local(seq)
            return
        if self._too_large_logged:
            log.info("domain allow/block lists hold {count} entries: mirrored in memory again",
                     count=count)
            self._too_large_logged = False
        mirror: dict[str, _Rules] = {}
        for domain, kind, entry in rows:
            if kind in KINDS:  # a row edited by hand into nonsense is left out
                mirror.setdefault(domain, _Rules()).set(kind, entry, True)
        self._mirror = mirror
        self._answers.clear()
        # A local change the load may have missed (written after it read,
        # or not written yet) stays until a load that began after it was
        # written.
        self._forget_seen_local(seq)
        for key, (present, _) in self._local.items():
            self._apply(key, present)
        self.mirrored_at = started

    def _forget_seen_local(self, seq: int) -> None:
        for key, (_, written) in list(self._local.items()):
            if written is not None and seq > written:
                del self._local[key]

    def _mirror_failed(self, failure: Any) -> None:
        if not self._mirror_failing:
            log.warn("allow-list mirror not loaded: {error}; the last one ({entries} entries) "
                     "keeps serving", error=failure.getErrorMessage(), entries=len(self))
            self._mirror_failing = True

    def __len__(self) -> int:
        """Entries held in memory (0 when asked per lookup)."""
        return sum(sum(map(len, r.senders.values())) + sum(map(len, r.networks.values()))
                   for r in (self._mirror or {}).values())
