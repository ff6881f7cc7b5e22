"""The per-recipient-domain sender allow list in SQL (``AllowListStore`` of
``policy/services.py``): "release and allow this sender" writes it, the
``access`` check reads it for every recipient (issue #12).

Semantics.  An entry (domain D, sender S) means: mail from S to recipients
at D is allowed.

* For each such recipient the ``access`` check answers
  ``WHITELIST_RECIPIENT``: that recipient's later pre-DATA checks
  (auto-blacklist, spam traps, thresholds, DNS lists, SPF, the score,
  greylisting) are skipped.
* When EVERY recipient the policy engine let through in the transaction is
  allowed this way, the transaction counts as whitelisted for the verdict
  (``TransactionRecord.allowed_for_all``; ``verdict.py``): the message is
  relayed whatever its spam score.  A virus or another hard scan result is
  still refused (the verdict looks at those first), and a recipient the
  allow list does not cover keeps the message scored as usual.
* Blacklists win: a client, HELO, sender or recipient on the policy's
  access blacklists is refused before the allow list is asked, and an
  auto-blacklisted client gets no allow-list pass (an explicit "no" wins
  over a "yes"; ``policy/checks/access.py``).

S is an address (``user@example.org``: that address), ``@example.org``
(any sender of that domain) or ``.example.org`` (any sender of its
subdomains), as in the access lists (docs/configuration.md, "Lists");
``example.org`` and ``*.example.org`` are read as the latter two.  Case and
a trailing dot are ignored (everything is stored lower-cased).  ``user@``
(a local part in any domain) and ``<>`` (bounces) are refused: too broad
for a pass that skips every check.  D is a recipient domain, matched
exactly (a subdomain has entries of its own).

Mirror (the hot path): with ``cache_seconds`` > 0 every entry is held in
memory, loaded when the database starts and again every half
``cache_seconds``, so a lookup is a dict probe and a few set probes and
never waits for the database; a local add or removal is seen at once, other
nodes' within ``cache_seconds``.  Before the first load the mirror is empty
(mail is scored as usual).  A load that fails is logged once per outage
and the last mirror keeps serving: an allow list changes by hand, rarely,
so a stale one is right far more often than an empty one.

Past ``MIRROR_MAX_ROWS`` entries (or with ``cache_seconds`` = 0) each
(domain, sender) is asked of the database instead, in batches
(``batch.py``), the answer kept for ``cache_seconds``; a database that
fails then fails the check (``policy.on_error``, docs/design.md promise 4),
as the other state-database checks do.  The periodic load counts the rows
first, so it loads them again once they are few enough.

The release command runs in another process, without a reactor: the
blocking functions below (``allow_sender``, ``remove_sender``,
``list_allowed``) and ``open_allow_list`` serve it.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any, NamedTuple, Optional

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

log = Logger()

# Entries held in memory at most (~150 bytes each); a larger allow list
# is asked per (domain, sender).
MIRROR_MAX_ROWS = 100_000


@dataclass(frozen=True)
class AllowEntry:
    """One allow-list row."""

    domain: str  # the recipient domain, lower-case
    sender: str  # "user@example.org", "@example.org" or ".example.org"
    added: float  # Unix time
    added_by: str = ""
    note: str = ""


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


def normalise_sender(pattern: str) -> str:
    """``pattern`` as the table keys it: ``user@example.org``,
    ``@example.org`` or ``.example.org``; ValueError (saying what is
    accepted) for anything else."""
    t = pattern.strip()
    what = f"sender {pattern!r}"
    if not t or t == "<>":
        raise ValueError(f"{what}: the null sender cannot be allowed (it would pass every bounce)")
    local, at, domain = t.rpartition("@")
    if not at:
        local, domain = "", t
    if at and not domain:
        raise ValueError(f"{what}: a local part in any domain is too broad for an allow list; "
                         "give user@example.org, @example.org or .example.org")
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


def sender_keys(sender: str) -> list[str]:
    """The entries that would allow the envelope sender ``sender``, most
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


def _first_in(patterns: set[str], sender: str) -> Optional[str]:
    for key in sender_keys(sender):
        if key in patterns:
            return key
    return None


# -- blocking: the release command and the store's threads -------------------------

def allow_sender(engine: Engine, tables: StateTables, domain: str, sender: str,
                 added_by: str = "", note: str = "", now: Optional[float] = None) -> bool:
    """Allow ``sender`` (an address, ``@domain`` or ``.parent``) for
    recipients at ``domain``.  True if the entry is new; False if it was
    there already (left as it was: the first to add it is the one
    recorded).  Blocking; ValueError for a pattern the list does not take."""
    domain, sender = normalise_domain(domain), normalise_sender(sender)
    t = tables.allow_senders
    row = {"domain": domain, "sender": sender,
           "added": time.time() if now is None else now,
           "added_by": clip(added_by, ADDED_BY_LENGTH), "note": clip(note, NOTE_LENGTH)}
    try:
        with engine.connect().execution_options(**WRITE) as conn, conn.begin():
            found = conn.execute(select(t.c.domain).where(
                (t.c.domain == domain) & (t.c.sender == sender))).first()
            if found is not None:
                return False
            conn.execute(insert(t).values(**row))
    except IntegrityError:
        # MySQL: another node inserted it between our look and our insert.
        return False
    return True


def remove_sender(engine: Engine, tables: StateTables, domain: str, sender: str) -> bool:
    """Remove the entry; True if there was one.  Blocking."""
    domain, sender = normalise_domain(domain), normalise_sender(sender)
    t = tables.allow_senders
    with engine.connect().execution_options(**WRITE) as conn, conn.begin():
        deleted = conn.execute(delete(t).where((t.c.domain == domain) & (t.c.sender == sender)))
        return bool(deleted.rowcount)


def list_allowed(engine: Engine, tables: StateTables,
                 domain: Optional[str] = None) -> list[AllowEntry]:
    """Every entry (of ``domain`` only, when given), by domain and sender.
    Blocking."""
    t = tables.allow_senders
    query = select(t.c.domain, t.c.sender, t.c.added, t.c.added_by, t.c.note)
    if domain is not None:
        query = query.where(t.c.domain == normalise_domain(domain))
    with engine.connect() as conn:
        return [AllowEntry(r[0], r[1], float(r[2]), r[3], r[4])
                for r in conn.execute(query.order_by(t.c.domain, t.c.sender))]


class AllowListAdmin:
    """The allow list for a process without a reactor (the quarantine
    CLI): its own engine, its table created if missing.  A context manager
    (``open_allow_list``); ``close()`` disposes of the connections."""

    def __init__(self, engine: Engine, tables: StateTables):
        self.engine = engine
        self.tables = tables
        create_missing(engine, [tables.allow_senders])

    def allow(self, domain: str, sender: str, added_by: str = "", note: str = "") -> bool:
        """``allow_sender``: True if the entry is new."""
        return allow_sender(self.engine, self.tables, domain, sender, added_by, note)

    def remove(self, domain: str, sender: str) -> bool:
        """``remove_sender``: True if there was an entry."""
        return remove_sender(self.engine, self.tables, domain, sender)

    def list(self, domain: Optional[str] = None) -> list[AllowEntry]:
        """``list_allowed``."""
        return list_allowed(self.engine, self.tables, domain)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> AllowListAdmin:
        return self

    def __exit__(self, kind: Optional[type[BaseException]], value: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self.close()


def open_allow_list(db_config: DatabaseConfig, data_dir: str,
                    table_prefix: str = "mpp_") -> AllowListAdmin:
    """The allow list of the state database ``[database]`` names (empty
    URL: SQLite at ``data_dir/state.sqlite``, as the proxy opens it).
    Blocking: connects and creates the table if missing; errors are
    SQLAlchemy's."""
    url = database_url(db_config, data_dir)
    if url.get_backend_name() == "sqlite" and not is_memory_sqlite(url):
        os.makedirs(os.path.dirname(str(url.database)), exist_ok=True)
    # A short-lived process: SQLite's own WAL checkpoints (the proxy's
    # checkpoint loop is not running here), one connection is enough.
    config = dataclasses.replace(db_config, sqlite_in_reactor=False, pool_max=1)
    return AllowListAdmin(make_engine(url, config), StateTables(table_prefix))


def _load(engine: Engine, tables: StateTables,
          limit: int) -> tuple[int, Optional[list[tuple[str, str]]]]:
    """(rows, every (domain, sender)) for the mirror; the list is None
    when there are more than ``limit`` rows (only counted)."""
    t = tables.allow_senders
    with engine.connect() as conn:
        count = int(conn.execute(select(func.count()).select_from(t)).scalar_one())
        if count > limit:
            return count, None
        return count, [(r[0], r[1]) for r in conn.execute(select(t.c.domain, t.c.sender))]


class _Lookup(NamedTuple):
    """A (domain, sender) the mirror cannot answer: the entries that would
    allow the sender, most specific first."""

    domain: str
    keys: list[str]


class _Sql:
    """The per-lookup statement for one dialect, as the DB-API driver
    takes it (``engine.cursor_in_transaction``)."""

    def __init__(self, t: StateTables, dialect: Any):
        name = dialect.identifier_preparer.quote(t.allow_senders.name)
        mark = "?" if dialect.paramstyle == "qmark" else "%s"
        self._dialect = dialect
        self._select = f"SELECT sender FROM {name} WHERE domain = {mark} AND sender IN "

    def found(self, cur: Any, item: _Lookup) -> set[str]:
        cur.execute(self._select + placeholders(self._dialect, len(item.keys)),
                    [item.domain, *item.keys])
        return {r[0] for r in cur.fetchall()}


def _lookup_batch(engine: Engine, sql: _Sql, items: list[_Lookup]) -> list[Optional[str]]:
    """Each lookup's most specific entry, or None, in one transaction."""
    answers: list[Optional[str]] = []
    with cursor_in_transaction(engine, write=False) as cur:
        for item in items:
            found = sql.found(cur, item)
            answers.append(next((k for k in item.keys if k in found), None))
    return answers


# -- the store: the proxy's side -------------------------------------------------

class SqlAllowListStore:
    """The allow list as the policy checks see it (``StateDatabase.allowlist``)."""

    def __init__(self, database: Database, cache_seconds: float,
                 cache_size: int = DEFAULT_SIZE, mirror_max_rows: int = MIRROR_MAX_ROWS):
        self._db = database
        self.cache_seconds = cache_seconds
        self.mirror_max_rows = mirror_max_rows
        # domain -> its sender entries; None: asked per lookup (too many
        # rows, or cache_seconds = 0).
        self._mirror: Optional[dict[str, set[str]]] = {} if cache_seconds > 0 else None
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
        # Local changes a load may have missed: (domain, sender) -> (present,
        # loads started when the database had it; None: not written yet).
        self._local: dict[tuple[str, str], tuple[bool, Optional[int]]] = {}
        self._mirror_loop = LoopingCall(self.refresh_mirror)
        self._mirror_loop.clock = database.clock
        self._mirror_failing = False
        self._too_large_logged = False
        # Per-lookup answers ("" for none), for cache_seconds.
        self._answers: ExpiringCache[tuple[str, str], str] = ExpiringCache(cache_size)
        self._sql = _Sql(database.tables, database.engine.dialect)
        self.batcher: Batcher[_Lookup, Optional[str]] = Batcher(database, self._job)

    def _now(self) -> float:
        return float(self._db.clock.seconds())

    @property
    def mirrored(self) -> bool:
        """Lookups are answered from memory."""
        return self._mirror is not None

    async def lookup(self, domain: str, sender: str) -> Optional[str]:
        """The entry allowing ``sender`` to recipients at ``domain`` (most
        specific first), or None.  ``domain`` as ``Facts.recipient_domain``
        gives it (lower-case, no trailing dot)."""
        mirror = self._mirror
        if mirror is not None:
            patterns = mirror.get(domain)
            # Most recipient domains have no entries: one dict probe.
            return None if not patterns or not sender else _first_in(patterns, sender)
        keys = sender_keys(sender)
        if not keys:
            return None
        now = self._now()
        cache_key = (domain, keys[0])
        cached = self._answers.get(cache_key, now)
        if cached is not None:
            return cached or None
        found = await self.batcher.submit(_Lookup(domain, keys))
        if self.cache_seconds > 0:
            self._answers.put(cache_key, found or "", now + self.cache_seconds, now)
        return found

    def _job(self, engine: Engine, items: list[_Lookup], now: float) -> list[Optional[str]]:
        return _lookup_batch(engine, self._sql, items)

    async def add(self, domain: str, sender: str, added_by: str = "", note: str = "") -> bool:
        """``allow_sender`` from the reactor (in the pool); this node sees
        the entry at once.  True if it is new.  ValueError for a pattern
        the list does not take; a database failure is
        ``StateDatabaseError``, and the entry is not kept."""
        key = (normalise_domain(domain), normalise_sender(sender))
        return await self._change(key, True, allow_sender, key[0], key[1], added_by, note,
                                  self._now())

    async def remove(self, domain: str, sender: str) -> bool:
        """``remove_sender`` from the reactor; this node stops allowing the
        sender at once.  True if there was an entry."""
        key = (normalise_domain(domain), normalise_sender(sender))
        return await self._change(key, False, remove_sender, key[0], key[1])

    async def entries(self, domain: Optional[str] = None) -> list[AllowEntry]:
        """``list_allowed`` from the reactor (always the database's rows)."""
        rows: list[AllowEntry] = await self._db.run(list_allowed, self._db.tables, domain)
        return rows

    async def _change(self, key: tuple[str, str], present: bool, fn: Any, *args: Any) -> bool:
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

    def _apply(self, key: tuple[str, str], present: bool) -> bool:
        """Set ``key`` in memory; whether it was there before."""
        self._answers.clear()  # any cached answer of the domain may change
        mirror = self._mirror
        if mirror is None:
            return present  # nothing held to restore
        domain, sender = key
        patterns = mirror.get(domain)
        was = patterns is not None and sender in patterns
        if present:
            mirror.setdefault(domain, set()).add(sender)
        elif patterns is not None:
            patterns.discard(sender)
            if not patterns:
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

    def _mirror_loaded(self, loaded: tuple[int, Optional[list[tuple[str, str]]]], seq: int,
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
                log.info("allow list holds {count} entries, more than {n}: asked per sender "
                         "from now on", count=count, n=self.mirror_max_rows)
                self._too_large_logged = True
            self._mirror = None
            self.mirrored_at = started
            self._forget_seen_local(seq)
            return
        if self._too_large_logged:
            log.info("allow list holds {count} entries: mirrored in memory again", count=count)
            self._too_large_logged = False
        mirror: dict[str, set[str]] = {}
        for domain, sender in rows:
            mirror.setdefault(domain, set()).add(sender)
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
                     "keeps serving", error=failure.getErrorMessage(),
                     entries=sum(map(len, (self._mirror or {}).values())))
            self._mirror_failing = True

    def __len__(self) -> int:
        """Entries held in memory (0 when asked per lookup)."""
        return sum(map(len, (self._mirror or {}).values()))
