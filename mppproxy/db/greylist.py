"""Greylisting state in SQL (``GreylistStore`` of ``policy/services.py``),
the way postgrey keeps it (RFC 6647 section 2.2):

* a triplet (client network, sender, recipient) seen for the first time is
  recorded and must wait ``delay`` seconds;
* a retry after the delay and within ``retry_window`` of the first attempt
  passes, and the triplet is marked passed; a retry after the window
  starts the triplet again;
* a passed triplet passes until ``lifetime`` after its last use;
* a client network with ``auto_whitelist_after`` passed triplets (0: never)
  is auto-whitelisted for ``lifetime`` after its last use and skips
  greylisting altogether.

Cache (the hot path): passed triplets and whitelisted networks are
answered from memory for ``cache_seconds``, waiting triplets until their
delay is over (their first attempt cannot change before then); the
database hears of a passing triplet or network at most once per cache
period per node, which is when ``last_seen`` is updated.

Database (``batch.py``): the checks that miss the cache are answered in
batches, one transaction each: one SELECT for the batch's triplets, one
for its networks' whitelist rows, a count of passed triplets only for
networks that may reach ``auto_whitelist_after``, then each attempt is
decided in Python by the rules above, in the order the attempts came (a
second attempt of a triplet sees what the first did), and the batch's
changes are written with one executemany per table.  Every attempt of a
batch is decided at the batch's time (when its job started: a few
milliseconds after the call at most).  Two nodes inserting one new
triplet at once: SQLite's ``BEGIN IMMEDIATE`` lets only one of them
read before it writes; on MySQL/MariaDB a batch that finds another
node's row where it inserted its own is rolled back and decided again
from that row.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Protocol

from sqlalchemy.engine import Engine

from mppproxy.db.base import Database
from mppproxy.db.batch import Batcher
from mppproxy.db.cache import DEFAULT_SIZE, ExpiringCache
from mppproxy.db.engine import cursor_in_transaction, placeholders
from mppproxy.db.models import ADDRESS_LENGTH, StateTables, clip, triplet_key


class GreylistSettings(Protocol):
    """What the store reads of a policy's greylisting settings
    (``config/policy.py``'s ``GreylistConfig``; ``db/`` imports no policy)."""

    @property
    def delay(self) -> float: ...
    @property
    def retry_window(self) -> float: ...
    @property
    def lifetime(self) -> float: ...
    @property
    def auto_whitelist_after(self) -> int: ...


@dataclass(frozen=True)
class GreylistAnswer:
    """What the database said about one attempt."""

    # Seconds still to wait; None: pass.
    wait: Optional[float]
    # First attempt of the triplet's current round (waiting triplets).
    first_seen: float = 0.0
    # The client network is (now) auto-whitelisted.
    whitelisted: bool = False


class _Attempt(NamedTuple):
    """One check that missed the cache, for the batch job."""

    key: str
    client_net: str
    sender: str
    recipient: str
    settings: GreylistSettings


@dataclass(frozen=True)
class _Cached:
    passed: bool
    first_seen: float = 0.0


class SqlGreylistStore:
    def __init__(self, database: Database, cache_seconds: float,
                 cache_size: int = DEFAULT_SIZE):
        self._db = database
        self.cache_seconds = cache_seconds
        self._whitelisted: ExpiringCache[str, bool] = ExpiringCache(cache_size)
        self._triplets: ExpiringCache[str, _Cached] = ExpiringCache(cache_size)
        # The engine exists before the stores; its dialect needs no connection.
        self._sql = _Sql(database.tables, database.engine.dialect)
        self.batcher: Batcher[_Attempt, GreylistAnswer] = Batcher(database, self._job)

    async def check(self, client_net: str, sender: str, recipient: str,
                    settings: GreylistSettings) -> Optional[float]:
        """None when the triplet (or its auto-whitelisted network) may pass
        now; else the seconds the client should still wait.  ``settings``
        is the policy's ``GreylistConfig``."""
        now = float(self._db.clock.seconds())
        if settings.auto_whitelist_after and self._whitelisted.get(client_net, now):
            return None
        key = triplet_key(client_net, sender, recipient)
        cached = self._triplets.get(key, now)
        if cached is not None:
            if cached.passed:
                return None
            wait = cached.first_seen + settings.delay - now
            if wait > 0:
                return wait
        answer: GreylistAnswer = await self.batcher.submit(
            _Attempt(key, client_net, sender, recipient, settings))
        self._remember(key, client_net, answer, settings, now)
        return answer.wait

    def _remember(self, key: str, client_net: str, answer: GreylistAnswer,
                  settings: GreylistSettings, now: float) -> None:
        until = now + self.cache_seconds
        if answer.whitelisted:
            self._whitelisted.put(client_net, True, until, now)
        if answer.wait is None:
            self._triplets.put(key, _Cached(True), until, now)
        else:
            # Until the delay is over nothing can change the answer but an
            # auto-whitelisting elsewhere (seen within cache_seconds).
            self._triplets.put(key, _Cached(False, answer.first_seen),
                               min(until, answer.first_seen + settings.delay), now)

    def clear_cache(self) -> None:
        self._whitelisted.clear()
        self._triplets.clear()

    def _job(self, engine: Engine, attempts: list[_Attempt], now: float) -> list[GreylistAnswer]:
        return check_batch(engine, self._sql, attempts, now)


# -- in the database thread ----------------------------------------------------

# A MySQL/MariaDB batch that lost an insert race to another node is decided
# again this many times at most; the last round keeps the other node's row.
_RACE_ROUNDS = 3


# Rows per INSERT statement: 8 values each, within the 999 variables of
# SQLite builds before 3.32 (SQLITE_MAX_VARIABLE_NUMBER).
INSERT_ROWS = 120


class _Raced(Exception):
    """Another node inserted a triplet this batch inserted too."""


class _Sql:
    """The batch job's statements for one dialect, as the DB-API driver
    takes them (``engine.cursor_in_transaction``: no SQLAlchemy work per statement
    on the hot path); built once per store and dialect."""

    def __init__(self, t: StateTables, dialect: Any):
        q = dialect.identifier_preparer.quote
        g, w = q(t.greylist.name), q(t.greylist_whitelist.name)
        self._dialect = dialect
        m = "?" if dialect.paramstyle == "qmark" else "%s"
        self.check_inserts = dialect.name != "sqlite"
        self._rows = f"SELECT id, first_seen, last_seen, passed, expires FROM {g} WHERE id IN "
        self._whitelist = f"SELECT client_net, last_seen FROM {w} WHERE client_net IN "
        self._count = (f"SELECT client_net, COUNT(*) FROM {g} WHERE passed = 1 AND last_seen >= {m} "
                       "AND client_net IN ")
        self.update = (f"UPDATE {g} SET first_seen = {m}, last_seen = {m}, passed = {m}, "
                       f"expires = {m} WHERE id = {m}")
        self._insert = (f"INSERT INTO {g} (id, client_net, sender, recipient, first_seen, "
                        "last_seen, passed, expires) VALUES ")
        self._one_row = placeholders(dialect, 8)
        upsert = (f"INSERT INTO {w} (client_net, created, last_seen, expires) "
                  f"VALUES {placeholders(dialect, 4)}")
        if dialect.name == "sqlite":
            self._insert_end = " ON CONFLICT (id) DO NOTHING"
            self.whitelist_upsert = upsert + (" ON CONFLICT (client_net) DO UPDATE SET "
                                              "last_seen = excluded.last_seen, "
                                              "expires = excluded.expires")
        elif dialect.name in ("mysql", "mariadb"):
            # A no-op update: unlike INSERT IGNORE it hides no other error.
            self._insert_end = " ON DUPLICATE KEY UPDATE id = id"
            self.whitelist_upsert = upsert + (" ON DUPLICATE KEY UPDATE "
                                              "last_seen = VALUES(last_seen), "
                                              "expires = VALUES(expires)")
        else:
            raise NotImplementedError(f"no greylist statements for {dialect.name}")

    def _in(self, n: int) -> str:
        return placeholders(self._dialect, n)

    # An empty IN () is an error on MySQL: nothing asked, nothing found.
    def rows(self, cur: Any, keys: list[str]) -> list[tuple[Any, ...]]:
        if not keys:
            return []
        cur.execute(self._rows + self._in(len(keys)), keys)
        found: list[tuple[Any, ...]] = cur.fetchall()
        return found

    def whitelist(self, cur: Any, nets: list[str]) -> list[tuple[Any, ...]]:
        if not nets:
            return []
        cur.execute(self._whitelist + self._in(len(nets)), nets)
        found: list[tuple[Any, ...]] = cur.fetchall()
        return found

    def count(self, cur: Any, nets: list[str], since: float) -> list[tuple[Any, ...]]:
        if not nets:
            return []
        cur.execute(self._count + self._in(len(nets)) + " GROUP BY client_net", [since, *nets])
        found: list[tuple[Any, ...]] = cur.fetchall()
        return found

    def insert(self, cur: Any, rows: list[tuple[Any, ...]]) -> None:
        """New triplets, as one multi-row INSERT per INSERT_ROWS rows.
        ``executemany`` steps SQLite once per row, and each step lets go
        of the GIL and waits to get it back from the busy reactor thread:
        a context switch or two per row on both threads."""
        for i in range(0, len(rows), INSERT_ROWS):
            chunk = rows[i:i + INSERT_ROWS]
            cur.execute(self._insert + ", ".join([self._one_row] * len(chunk)) + self._insert_end,
                        [value for row in chunk for value in row])


def check_batch(engine: Engine, sql: _Sql, attempts: list[_Attempt],
                now: float) -> list[GreylistAnswer]:
    """The answers to ``attempts``, in order, decided and written in one
    transaction (see the module docstring)."""
    for round_ in range(1, _RACE_ROUNDS + 1):
        try:
            with cursor_in_transaction(engine) as cur:
                return _decide(cur, sql, attempts, now,
                               check_inserts=sql.check_inserts and round_ < _RACE_ROUNDS)
        except _Raced:
            continue
    raise AssertionError("unreachable: the last round does not check its inserts")


def _decide(cur: Any, sql: _Sql, attempts: list[_Attempt], now: float,
            check_inserts: bool) -> list[GreylistAnswer]:
    # The database's rows as the batch found them, and as it leaves them:
    # key -> [first_seen, last_seen, passed, expires].
    before: dict[str, tuple[float, float, bool, float]] = {}
    keys_of: dict[str, list[str]] = {}
    for a in attempts:
        keys = keys_of.setdefault(a.client_net, [])
        if a.key not in keys:
            keys.append(a.key)
    for r in sql.rows(cur, [k for keys in keys_of.values() for k in keys]):
        before[r[0]] = (float(r[1]), float(r[2]), bool(r[3]), float(r[4]))
    rows: dict[str, list[Any]] = {k: list(v) for k, v in before.items()}

    whitelist: dict[str, float] = {}
    aw = [a for a in attempts if a.settings.auto_whitelist_after]
    if aw:
        nets = list(dict.fromkeys(a.client_net for a in aw))
        whitelist = {r[0]: float(r[1]) for r in sql.whitelist(cur, nets)}

    # Passed triplets per (network, since) as the batch found them, asked
    # at once for the networks that may reach auto_whitelist_after here.
    counts: dict[tuple[str, float], int] = {}
    wanted: dict[float, set[str]] = {}
    for a in aw:
        s = a.settings
        last = whitelist.get(a.client_net)
        if (last is None or now - last > s.lifetime) and _may_pass(before.get(a.key), s, now):
            wanted.setdefault(now - s.lifetime, set()).add(a.client_net)
    for since, nets_ in wanted.items():
        for net in nets_:
            counts[(net, since)] = 0
        for r in sql.count(cur, sorted(nets_), since):
            counts[(r[0], since)] = int(r[1])

    def passed_triplets(net: str, since: float) -> int:
        """Passed triplets of ``net`` used since ``since``, this batch's
        decisions so far included."""
        base = counts.get((net, since))
        if base is None:  # not foreseen (two policies for one triplet)
            base = counts[(net, since)] = _count_one(cur, sql, net, since)
        for key in keys_of[net]:
            now_row, was = rows.get(key), before.get(key)
            base += (now_row is not None and now_row[2] and now_row[1] >= since) - \
                (was is not None and was[2] and was[1] >= since)
        return base

    inserted: dict[str, _Attempt] = {}
    changed: set[str] = set()
    whitelist_writes: dict[str, float] = {}  # network -> expires
    answers: list[GreylistAnswer] = []
    for a in attempts:
        s = a.settings
        if s.auto_whitelist_after:
            last = whitelist.get(a.client_net)
            if last is not None and now - last <= s.lifetime:
                whitelist[a.client_net] = now
                whitelist_writes[a.client_net] = now + s.lifetime
                answers.append(GreylistAnswer(None, whitelisted=True))
                continue
        row = rows.get(a.key)
        if row is None:
            row = rows[a.key] = [now, now, False, now + s.retry_window]
            inserted[a.key] = a
        first_seen, last_seen, passed = row[0], row[1], row[2]
        if (now - last_seen > s.lifetime) if passed else (now - first_seen > s.retry_window):
            # Too late: unused past its lifetime, or the retry came after
            # the window.  A new round begins.
            row[:] = [now, now, False, now + s.retry_window]
            changed.add(a.key)
            first_seen, passed = now, False
        if not passed:
            waited = now - first_seen
            if waited < s.delay:
                answers.append(GreylistAnswer(s.delay - waited, first_seen=first_seen))
                continue
        row[1:] = [now, True, now + s.lifetime]
        changed.add(a.key)
        whitelisted = False
        if s.auto_whitelist_after and \
                passed_triplets(a.client_net, now - s.lifetime) >= s.auto_whitelist_after:
            whitelist[a.client_net] = now
            whitelist_writes[a.client_net] = now + s.lifetime
            whitelisted = True
        answers.append(GreylistAnswer(None, whitelisted=whitelisted))

    if inserted:
        sql.insert(cur, [
            (key, a.client_net, clip(a.sender, ADDRESS_LENGTH), clip(a.recipient, ADDRESS_LENGTH),
             *rows[key])
            # In key order: two nodes' batches lock rows in the same order.
            for key, a in sorted(inserted.items())])
        if check_inserts:
            # Without SQLite's write lock another node may have inserted
            # one of them since we looked: its row stands, ours did not.
            found = sql.rows(cur, list(inserted))
            if any((float(r[1]), float(r[2]), bool(r[3]), float(r[4])) != tuple(rows[r[0]])
                   for r in found):
                raise _Raced()
    updates = [(*rows[key], key) for key in sorted(changed) if key not in inserted]
    if updates:
        cur.executemany(sql.update, updates)
    if whitelist_writes:
        cur.executemany(sql.whitelist_upsert, [
            (net, now, now, expires) for net, expires in sorted(whitelist_writes.items())])
    return answers


def _count_one(cur: Any, sql: _Sql, net: str, since: float) -> int:
    found = sql.count(cur, [net], since)
    return int(found[0][1]) if found else 0


def _may_pass(row: Optional[tuple[float, float, bool, float]], s: GreylistSettings,
              now: float) -> bool:
    """Whether an attempt of a triplet found as ``row`` can pass now."""
    if s.delay <= 0:
        return True
    if row is None:
        return False
    first_seen, last_seen, passed, _ = row
    if passed:
        return now - last_seen <= s.lifetime
    return s.delay <= now - first_seen <= s.retry_window
