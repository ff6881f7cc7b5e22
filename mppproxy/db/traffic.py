"""Traffic counts: transactions per UTC hour, node, disposition and reason,
for the web console's dashboard (issue 13) and, later, the metrics (issue 16).

A leaf (docs/design.md, "Floors"): the transaction log (``txlog.py``) is
the one place every transaction passes; it classifies each one once
(``counted``) and hands ``(what, reason)`` to the tallies registered here
(``add_tally``).  This module holds the vocabulary, the in-memory buffer
and the writer; it knows no stage.

How the log's ``Disposition`` maps onto the dashboard's words (``counted``):

===================  ==============================================
``relay``, ``deliver``  ``relayed`` (to the backend, or a local Maildir)
``tag``              ``tagged``
``quarantine``       ``quarantined``
``reject``           ``refused`` (5xx after DATA)
``tempfail``         ``tempfailed`` (4xx after DATA)
``refused``          ``refused`` for a 5xx at RCPT, ``tempfailed`` for a
                     4xx (greylisting, a database down): no recipient
                     accepted, some refused before DATA
``discard``          ``discarded`` (accepted and dropped on purpose)
``aborted``          not counted (RSET/QUIT/hang-up: no message)
===================  ==============================================

Scan mode's verdicts (``scanned:``) are not counted: nothing was done with
those messages.

The hot path is one dict increment (``TrafficCounts.add``).  The
``TrafficRecorder`` of each process writes the buffer every
``database.traffic_flush`` seconds through the state database's thread
pool, one batched upsert that *adds* to the rows, so worker processes and
edges sharing one MariaDB sum correctly.  A flush that fails keeps the
counts for the next (at most ``MAX_PENDING_KEYS`` keys: past it the oldest
hour is dropped, with one error line); ``stop`` flushes once more.
"""
from __future__ import annotations

import enum
import time
from typing import Any, Callable, Iterable, Optional, Sequence

from sqlalchemy import delete, func, select
from sqlalchemy.engine import Engine
from twisted.internet import defer
from twisted.internet.task import LoopingCall

from mppproxy.db.base import Database
from mppproxy.db.engine import WRITE
from mppproxy.db.models import REASON_KEY_LENGTH, StateTables, clip
from mppproxy.db.nodehealth import HealthReport, write_health
from mppproxy.db.upsert import add_counts
from mppproxy.logsetup import Logger
from mppproxy.results import Disposition

log = Logger()

HOUR = 3600
# Keys (hour, disposition, reason) a process holds while the database
# cannot be written: a day of a busy node is a few hundred; this is weeks.
MAX_PENDING_KEYS = 20_000
# Rows per INSERT statement of a flush (all in one transaction): well under
# MariaDB's max_allowed_packet.
UPSERT_CHUNK = 500
# Hours deleted per purge transaction (a day), so the stores' batches get
# the write lock in between.
PURGE_HOURS = 24


class Counted(enum.StrEnum):
    """What the dashboard counts a transaction as (the module docstring
    maps the log's ``Disposition`` onto these)."""

    RELAYED = "relayed"
    TAGGED = "tagged"
    QUARANTINED = "quarantined"
    REFUSED = "refused"
    TEMPFAILED = "tempfailed"
    DISCARDED = "discarded"


# The dashboard's order (the stack's, bottom first, and the legend's).
COUNTED = tuple(Counted)

_BY_DISPOSITION = {
    Disposition.RELAY: Counted.RELAYED, Disposition.DELIVER: Counted.RELAYED,
    Disposition.TAG: Counted.TAGGED, Disposition.QUARANTINE: Counted.QUARANTINED,
    Disposition.REJECT: Counted.REFUSED, Disposition.TEMPFAIL: Counted.TEMPFAILED,
    Disposition.DISCARD: Counted.DISCARDED,
    # A deleted virus (issue 14) was accepted and dropped, as a discard.
    Disposition.DELETE: Counted.DISCARDED,
}


def counted(action: Disposition, reply_code: Optional[int]) -> Optional[Counted]:
    """What a transaction logged with ``action`` and a reply of
    ``reply_code`` counts as; None for one that is not counted (aborted)."""
    if action is Disposition.REFUSED:
        # RFC 5321 4.2.1: 4yz is a transient failure; the client retries.
        return Counted.TEMPFAILED if reply_code is not None and 400 <= reply_code < 500 \
            else Counted.REFUSED
    return _BY_DISPOSITION.get(action)


def reason_key(text: Optional[str]) -> str:
    """The short key of a reason or deciding check ("" for none)."""
    return clip(text, REASON_KEY_LENGTH) if text else ""


# -- the tallies: who hears of each counted transaction --------------------------

Tally = Callable[[Counted, str], None]
# The transaction log calls each with (what, reason); few (the recorder,
# later the metrics), so a list.
tallies: list[Tally] = []


def add_tally(tally: Tally) -> None:
    """Hear of every counted transaction of this process from now on."""
    if tally not in tallies:
        tallies.append(tally)


def remove_tally(tally: Tally) -> None:
    if tally in tallies:
        tallies.remove(tally)


# -- the buffer ---------------------------------------------------------------

Key = tuple[int, str, str]  # (hour, disposition, reason)


class TrafficCounts:
    """Counts not yet written, by (hour, disposition, reason).  ``clock``
    gives Unix time (``time.time``; UTC hours are multiples of 3600)."""

    def __init__(self, clock: Callable[[], float] = time.time,
                 max_keys: int = MAX_PENDING_KEYS):
        self.clock = clock
        self.max_keys = max_keys
        self.pending: dict[Key, int] = {}
        # Counts given up (cap reached), for the log and tests.
        self.dropped = 0

    def add(self, what: Counted, reason: str) -> None:
        """One transaction: a dict increment, nothing else (a tally)."""
        key = (int(self.clock()) // HOUR * HOUR, what.value, reason)
        pending = self.pending
        pending[key] = pending.get(key, 0) + 1

    def take(self) -> dict[Key, int]:
        """Everything pending; the buffer starts empty again."""
        taken, self.pending = self.pending, {}
        return taken

    def give_back(self, counts: dict[Key, int]) -> None:
        """Counts a flush could not write, added to those counted since;
        past ``max_keys`` the oldest hours are dropped, one error line each."""
        pending = self.pending
        for key, n in counts.items():
            pending[key] = pending.get(key, 0) + n
        while len(pending) > self.max_keys:
            oldest = min(key[0] for key in pending)
            gone = [key for key in pending if key[0] == oldest]
            lost = sum(pending.pop(key) for key in gone)
            self.dropped += lost
            log.error("traffic counts: the database has not been written for a long time; "
                      "{lost} transactions of the hour {hour} are dropped from the dashboard",
                      lost=lost, hour=time.strftime("%Y-%m-%d %H:00 UTC", time.gmtime(oldest)))

    def __len__(self) -> int:
        return len(self.pending)


# -- the writer ---------------------------------------------------------------

def upsert_counts(engine: Engine, tables: StateTables, node: str,
                  counts: dict[Key, int]) -> int:
    """Add ``counts`` to the rows of ``node`` in one transaction (blocking):
    MariaDB ``INSERT ... ON DUPLICATE KEY UPDATE n = n + VALUES(n)``,
    SQLite ``INSERT ... ON CONFLICT DO UPDATE SET n = n + excluded.n``.
    Returns the rows written."""
    if not counts:
        return 0
    rows = [{"hour": hour, "node": node, "disposition": what, "reason": reason, "n": n}
            for (hour, what, reason), n in sorted(counts.items())]
    add_counts(engine, tables.traffic, ("hour", "node", "disposition", "reason"), rows,
               UPSERT_CHUNK)
    return len(rows)


def purge_traffic(engine: Engine, tables: StateTables, now: float, retention_days: int) -> int:
    """Delete the hours older than ``retention_days``, a day per
    transaction (blocking); the rows deleted."""
    t = tables.traffic
    cutoff = int(now) - retention_days * 86400
    deleted = 0
    while True:
        with engine.connect().execution_options(**WRITE) as conn, conn.begin():
            oldest = conn.execute(select(func.min(t.c.hour))).scalar()
            if oldest is None or oldest >= cutoff:
                return deleted
            upto = min(cutoff, int(oldest) + PURGE_HOURS * HOUR)
            deleted += conn.execute(delete(t).where(t.c.hour < upto)).rowcount


class FlushState(enum.Enum):
    """How the recorder's last flush went (``TrafficRecorder.flush_state``),
    so an outage is logged once, not every ``traffic_flush``."""

    OK = "ok"
    FAILING = "failing"


class TrafficRecorder:
    """Counts this process's transactions and writes them every
    ``interval`` seconds.

    ``database()`` gives the state database to write through (its
    ``run``), or None while there is none (the counts wait, bounded).
    ``health()``, when given, gives this node's engine and DNS-list
    reports to write at each flush (``nodehealth.py``).  ``node`` names the
    rows (``archive.node_name`` or the host name).  Construction does no
    I/O; ``start`` registers the tally and the loop; ``stop`` ends both
    and flushes once more.
    """

    def __init__(self, reactor: Any, node: str, interval: float,
                 database: Callable[[], Optional[Database]],
                 health: Optional[Callable[[], Sequence[HealthReport]]] = None,
                 counts: Optional[TrafficCounts] = None):
        self.reactor = reactor
        self.node = node
        self.interval = interval
        self.database = database
        self.health = health
        self.counts = counts if counts is not None else TrafficCounts()
        self.flush_state = FlushState.OK
        self.flushes = 0
        self.rows_written = 0
        self._loop = LoopingCall(self._tick)
        self._loop.clock = reactor
        self._flushing: Optional[defer.Deferred[None]] = None
        self._tally: Tally = self.counts.add
        self._shutdown_trigger: Any = None

    def start(self) -> None:
        """Count from now on, and flush every ``interval`` seconds and at
        the reactor's shutdown.  Start it before the state database: the
        database stops at the start of the shutdown too (``StateDatabase``),
        and the reactor runs those triggers in the order they were added,
        so this flush is in the database's pool before the pool stops (it
        finishes the work it holds)."""
        add_tally(self._tally)
        if self.interval > 0:
            d = self._loop.start(self.interval, now=False)
            d.addErrback(lambda f: log.failure("traffic count writer stopped", f))
        self._shutdown_trigger = self.reactor.addSystemEventTrigger(
            "before", "shutdown", self._tick)

    def stop(self) -> defer.Deferred[None]:
        """Stop counting, wait for a flush in flight, flush what is left
        once.  Never fails (a failed last flush is logged with what it
        loses)."""
        remove_tally(self._tally)
        if self._loop.running:
            self._loop.stop()
        if self._shutdown_trigger is not None:
            self.reactor.removeSystemEventTrigger(self._shutdown_trigger)
            self._shutdown_trigger = None
        waiting: defer.Deferred[None] = defer.Deferred()
        if self._flushing is None:
            waiting.callback(None)
        else:
            def done(result: object) -> object:
                waiting.callback(None)
                return result

            self._flushing.addBoth(done)
        return waiting.addCallback(lambda _: self.flush(final=True))

    def _tick(self) -> None:
        if self._flushing is None:  # a slow database: never two at once
            self.flush()

    def flush(self, final: bool = False) -> defer.Deferred[None]:
        """Write what is pending now, and this node's health; fires when
        done (never fails: a failure is logged, the counts kept)."""
        taken = self.counts.take()
        db = self.database()
        if db is None:
            if final and taken:
                log.warn("traffic counts: no state database to write {n} counts to at stop",
                         n=sum(taken.values()))
            else:
                self.counts.give_back(taken)
            return defer.succeed(None)
        health = list(self.health()) if self.health is not None else []
        if not taken and not health:
            return defer.succeed(None)  # an idle node: no database call
        self.flushes += 1
        d: defer.Deferred[Any] = defer.succeed(None)
        if taken:
            d = db.run(upsert_counts, db.tables, self.node, taken)
            d.addCallbacks(self._written, self._failed, errbackArgs=(taken, final, db))
        if health:
            d.addCallback(lambda _: self._write_health(db, health))
        self._flushing = d
        d.addBoth(self._flushed)
        return d

    def _written(self, rows: int) -> None:
        self.rows_written += rows
        if self.flush_state is FlushState.FAILING:
            log.info("traffic counts written again to {database}", database=self._name())
            self.flush_state = FlushState.OK

    def _failed(self, failure: Any, taken: dict[Key, int], final: bool, db: Database) -> None:
        if final:
            log.error("traffic counts: {n} transactions not written at stop: {error}",
                      n=sum(taken.values()), error=failure.getErrorMessage())
            return
        self.counts.give_back(taken)
        if self.flush_state is FlushState.OK:
            log.warn("traffic counts not written to {database}: {error}; kept for the next "
                     "try", database=db.name, error=failure.getErrorMessage())
            self.flush_state = FlushState.FAILING

    def _write_health(self, db: Database, reports: list[HealthReport]) -> defer.Deferred[None]:
        # The counts' clock: the hours and the reports' times agree.
        d: defer.Deferred[None] = db.run(write_health, db.tables, self.node, reports,
                                         float(self.counts.clock()))
        # Traffic failures are logged above; a health write failing with a
        # working traffic write is rare and retried at the next flush.
        d.addErrback(lambda f: log.warn("engine health not written: {error}",
                                        error=f.getErrorMessage()))
        return d

    def _flushed(self, result: object) -> None:
        self._flushing = None

    def _name(self) -> str:
        db = self.database()
        return db.name if db is not None else "(none)"


# -- the console's queries (blocking; run them in a thread) ------------------------

def _tables(tables: Optional[StateTables]) -> StateTables:
    return tables if tables is not None else StateTables()


def hourly(engine: Engine, since: float, until: float, node: Optional[str] = None,
           tables: Optional[StateTables] = None) -> list[tuple[int, str, int]]:
    """(hour, disposition, count) of every hour that starts in
    [floor_hour(since), until), all nodes summed (or ``node``'s),
    ordered by hour then disposition."""
    t = _tables(tables).traffic
    total = func.sum(t.c.n)
    query = (select(t.c.hour, t.c.disposition, total)
             .where(t.c.hour >= int(since) // HOUR * HOUR, t.c.hour < until)
             .group_by(t.c.hour, t.c.disposition).order_by(t.c.hour, t.c.disposition))
    if node is not None:
        query = query.where(t.c.node == node)
    with engine.connect() as conn:
        return [(int(h), str(d), int(n)) for h, d, n in conn.execute(query)]


def top_reasons(engine: Engine, since: float, until: float, limit: int = 10,
                node: Optional[str] = None,
                tables: Optional[StateTables] = None) -> list[tuple[str, str, int]]:
    """(reason, disposition, count) of the ``limit`` largest reasons in the
    hours of [floor_hour(since), until): most first, then by name.
    Transactions without a reason (most relayed mail) are left out."""
    t = _tables(tables).traffic
    total = func.sum(t.c.n).label("total")
    query = (select(t.c.reason, t.c.disposition, total)
             .where(t.c.hour >= int(since) // HOUR * HOUR, t.c.hour < until, t.c.reason != "")
             .group_by(t.c.reason, t.c.disposition)
             .order_by(total.desc(), t.c.reason, t.c.disposition).limit(limit))
    if node is not None:
        query = query.where(t.c.node == node)
    with engine.connect() as conn:
        return [(str(r), str(d), int(n)) for r, d, n in conn.execute(query)]


def nodes(engine: Engine, since: float, tables: Optional[StateTables] = None) -> list[str]:
    """The nodes with counts in the hours from ``since``, by name."""
    t = _tables(tables).traffic
    query = (select(t.c.node).where(t.c.hour >= int(since) // HOUR * HOUR)
             .group_by(t.c.node).order_by(t.c.node))
    with engine.connect() as conn:
        return [str(r[0]) for r in conn.execute(query)]


def per_hour(rows: Iterable[tuple[int, str, int]]) -> dict[int, dict[str, int]]:
    """``hourly``'s rows as {hour: {disposition: count}} (the chart's input)."""
    out: dict[int, dict[str, int]] = {}
    for hour, what, n in rows:
        slot = out.setdefault(hour, {})
        slot[what] = slot.get(what, 0) + n
    return out
