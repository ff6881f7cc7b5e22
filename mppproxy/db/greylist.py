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
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from sqlalchemy import func, select, update
from sqlalchemy.dialects.mysql import insert as mysql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, Engine

from mppproxy.db.cache import DEFAULT_SIZE, ExpiringCache
from mppproxy.db.engine import WRITE, insert_ignore
from mppproxy.db.models import ADDRESS_LENGTH, StateTables, clip, triplet_key

if TYPE_CHECKING:
    from mppproxy.db.state import StateDatabase


@dataclass(frozen=True)
class GreylistAnswer:
    """What the database said about one attempt."""

    # Seconds still to wait; None: pass.
    wait: Optional[float]
    # First attempt of the triplet's current round (waiting triplets).
    first_seen: float = 0.0
    # The client network is (now) auto-whitelisted.
    whitelisted: bool = False


@dataclass(frozen=True)
class _Cached:
    passed: bool
    first_seen: float = 0.0


class SqlGreylistStore:
    def __init__(self, database: "StateDatabase", cache_seconds: float,
                 cache_size: int = DEFAULT_SIZE):
        self._db = database
        self.cache_seconds = cache_seconds
        self._whitelisted: ExpiringCache[str, bool] = ExpiringCache(cache_size)
        self._triplets: ExpiringCache[str, _Cached] = ExpiringCache(cache_size)

    async def check(self, client_net: str, sender: str, recipient: str,
                    settings: Any) -> Optional[float]:
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
        answer: GreylistAnswer = await self._db.run(
            _check, self._db.tables, key, client_net, sender, recipient, settings, now)
        self._remember(key, client_net, answer, settings, now)
        return answer.wait

    def _remember(self, key: str, client_net: str, answer: GreylistAnswer, settings: Any,
                  now: float) -> None:
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


# -- in the database thread ----------------------------------------------------

def _check(engine: Engine, t: StateTables, key: str, client_net: str, sender: str,
           recipient: str, s: Any, now: float) -> GreylistAnswer:
    g, w = t.greylist, t.greylist_whitelist
    with engine.connect().execution_options(**WRITE) as conn, conn.begin():
        if s.auto_whitelist_after:
            row = conn.execute(select(w.c.last_seen).where(w.c.client_net == client_net)).first()
            if row is not None and now - row.last_seen <= s.lifetime:
                conn.execute(update(w).where(w.c.client_net == client_net)
                             .values(last_seen=now, expires=now + s.lifetime))
                return GreylistAnswer(None, whitelisted=True)

        columns = (g.c.first_seen, g.c.last_seen, g.c.passed)
        row = conn.execute(select(*columns).where(g.c.id == key)).first()
        if row is None:
            insert_ignore(conn, g, {
                "id": key, "client_net": client_net, "sender": clip(sender, ADDRESS_LENGTH),
                "recipient": clip(recipient, ADDRESS_LENGTH), "first_seen": now,
                "last_seen": now, "passed": False, "expires": now + s.retry_window})
            # Ours, or the one another node inserted a moment before.
            row = conn.execute(select(*columns).where(g.c.id == key)).one()
        first_seen, last_seen, passed = float(row.first_seen), float(row.last_seen), bool(row.passed)

        if (now - last_seen > s.lifetime) if passed else (now - first_seen > s.retry_window):
            # Too late: unused past its lifetime, or the retry came after
            # the window.  A new round begins.
            conn.execute(update(g).where(g.c.id == key).values(
                first_seen=now, last_seen=now, passed=False, expires=now + s.retry_window))
            first_seen, passed = now, False

        if not passed:
            waited = now - first_seen
            if waited < s.delay:
                return GreylistAnswer(s.delay - waited, first_seen=first_seen)
        conn.execute(update(g).where(g.c.id == key).values(
            passed=True, last_seen=now, expires=now + s.lifetime))
        whitelisted = bool(s.auto_whitelist_after) and _auto_whitelist(conn, t, client_net, s, now)
        return GreylistAnswer(None, whitelisted=whitelisted)


def _auto_whitelist(conn: Connection, t: StateTables, client_net: str, s: Any,
                    now: float) -> bool:
    """Whitelist ``client_net`` if it has passed enough distinct triplets
    that are still alive."""
    g, w = t.greylist, t.greylist_whitelist
    passed = conn.execute(select(func.count()).select_from(g).where(
        g.c.client_net == client_net, g.c.passed.is_(True),
        g.c.last_seen >= now - s.lifetime)).scalar_one()
    if passed < s.auto_whitelist_after:
        return False
    values = {"client_net": client_net, "created": now, "last_seen": now,
              "expires": now + s.lifetime}
    dialect = conn.dialect.name
    if dialect == "sqlite":
        stmt = sqlite_insert(w).values(**values)
        conn.execute(stmt.on_conflict_do_update(
            index_elements=[w.c.client_net],
            set_={"last_seen": stmt.excluded.last_seen, "expires": stmt.excluded.expires}))
    elif dialect in ("mysql", "mariadb"):
        stmt = mysql_insert(w).values(**values)
        conn.execute(stmt.on_duplicate_key_update(
            last_seen=stmt.inserted.last_seen, expires=stmt.inserted.expires))
    else:
        raise NotImplementedError(f"no whitelist upsert for {dialect}")
    return True
