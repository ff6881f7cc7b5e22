"""The state database: one SQLAlchemy engine, its own thread pool, the
periodic purge, and the two stores the policy checks use.

All database work runs in the pool's threads (``deferToThreadPool``); the
reactor thread only reads the in-process caches and waits on Deferreds
(DESIGN.md: "the reactor never blocks on I/O").  A failure comes back as a
``StateDatabaseError`` naming the database (without its password) and the
driver's reason; the policy engine turns it into a tempfail or a skip per
``policy.on_error`` (DESIGN.md promise 4).
"""
from __future__ import annotations

import os
import threading
from typing import Any, Callable, TypeVar

from sqlalchemy import delete
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, OperationalError, ProgrammingError, SQLAlchemyError
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from mppproxy.db.blacklist import SqlBlacklistStore
from mppproxy.db.engine import WRITE, database_url, is_memory_sqlite, make_engine
from mppproxy.db.greylist import SqlGreylistStore
from mppproxy.db.models import StateTables
from mppproxy.logsetup import Logger
from mppproxy.policy.config import DatabaseConfig

log = Logger()

T = TypeVar("T")

# MySQL/MariaDB: deadlock found, lock wait timeout: the transaction is
# retried (InnoDB's advice for both).  SQLite: "database is locked" past
# the busy timeout is not retried (it already waited).
_RETRY_CODES = (1213, 1205)
_ATTEMPTS = 3


class StateDatabaseError(Exception):
    """The state database could not be used; the text says which one and why."""


class StateDatabase:
    """Shared greylist and blacklist state in SQL.

    ``StateDatabase(db_config, data_dir, reactor)``: construction does no
    I/O.  ``start()`` starts the thread pool, creates missing tables and
    the purge of expired rows every ``purge_interval``; ``stop()`` stops
    them and closes the connections.  ``blacklist`` and ``greylist`` are the
    stores (``policy/services.py`` protocols).

    ``clock`` (default: the reactor) gives the time the stores and the
    purge use; tests pass a ``task.Clock``.  ``table_prefix`` names the
    tables (``mpp_blacklist``...).
    """

    def __init__(self, db_config: DatabaseConfig, data_dir: str, reactor: Any, *,
                 clock: Any = None, table_prefix: str = "mpp_"):
        self.config = db_config
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.url = database_url(db_config, data_dir)
        # Safe for logs and error messages.
        self.name = self.url.render_as_string(hide_password=True)
        self.engine: Engine = make_engine(self.url, db_config)
        self.tables = StateTables(table_prefix)
        threads = 1 if is_memory_sqlite(self.url) else db_config.pool_max
        self._pool = ThreadPool(minthreads=min(db_config.pool_min, threads), maxthreads=threads,
                                name="mppproxy-db")
        self._purge_loop = LoopingCall(self._purge_logged)
        self._purge_loop.clock = self.clock
        self._schema_ready = False
        self._schema_lock = threading.Lock()
        self._state = "new"
        self._shutdown_trigger: Any = None
        # Calls that went to the database (tests prove cache hits with it).
        self.calls = 0
        self.blacklist = SqlBlacklistStore(self, db_config.cache_seconds)
        self.greylist = SqlGreylistStore(self, db_config.cache_seconds)

    @property
    def running(self) -> bool:
        return self._state == "running"

    # -- life cycle --------------------------------------------------------

    def start(self) -> defer.Deferred:
        """Start the thread pool and the purge; create missing tables.

        Fires with True once the tables exist, or False (logged) when the
        database cannot be reached now: the stores then try again on each
        use, and fail until it can (checks tempfail, DESIGN.md promise 4).
        """
        if self._state != "new":
            raise RuntimeError(f"state database {self.name} already {self._state}")
        self._state = "running"
        self._pool.start()
        # A pool left running would keep the process alive after the
        # reactor stops: stop with the reactor if nobody stopped us first.
        self._shutdown_trigger = self.reactor.addSystemEventTrigger(
            "before", "shutdown", self._stop_at_shutdown)
        self._purge_loop.start(self.config.purge_interval, now=False)
        log.info("state database {database}: {threads} threads, purge every {interval}s",
                 database=self.name, threads=self._pool.max,
                 interval=self.config.purge_interval)

        def failed(f: Any) -> bool:
            log.error("state database {database} is not ready: {error}; "
                      "trying again on first use", database=self.name, error=f.getErrorMessage())
            return False

        def mirror(ready: bool) -> Any:
            # The blacklist's lookups are answered from memory once this
            # load is in (db/blacklist.py); a failed one is tried again.
            if self._state != "running":  # stopped while the check ran
                return ready
            loaded = self.blacklist.start_mirror()
            loaded.addBoth(lambda _: ready)
            return loaded

        d = self.run(lambda engine: True)
        d.addErrback(failed)
        d.addCallback(mirror)
        return d

    def stop(self) -> defer.Deferred:
        """Stop the purge and the thread pool (joined off the reactor
        thread), then close every connection."""
        state, self._state = self._state, "stopped"
        if state == "stopped":
            return defer.succeed(None)
        if self._purge_loop.running:
            self._purge_loop.stop()
        self.blacklist.stop_mirror()
        if state == "running":
            g, b = self.greylist.batcher, self.blacklist.batcher
            log.info("state database {database} stopping: greylist {g_items} calls in {g_jobs} "
                     "jobs (largest {g_largest}), blacklist {b_items} in {b_jobs} (largest "
                     "{b_largest})", database=self.name, g_items=g.items, g_jobs=g.jobs,
                     g_largest=g.largest, b_items=b.items, b_jobs=b.jobs, b_largest=b.largest)
        if self._shutdown_trigger is not None:
            self.reactor.removeSystemEventTrigger(self._shutdown_trigger)
            self._shutdown_trigger = None
        if state == "new":
            self.engine.dispose()
            return defer.succeed(None)

        def shutdown() -> None:
            self._pool.stop()
            self.engine.dispose()

        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), shutdown)

    def _stop_at_shutdown(self) -> defer.Deferred:
        self._shutdown_trigger = None
        return self.stop()

    # -- running work ------------------------------------------------------

    def run(self, fn: Callable[..., T], *args: Any) -> defer.Deferred:
        """``fn(engine, *args)`` in a pool thread; its result, or a
        ``StateDatabaseError``."""
        if self._state != "running":
            return defer.fail(StateDatabaseError(f"state database {self.name} is {self._state}"))
        self.calls += 1
        return deferToThreadPool(self.reactor, self._pool, self._call, fn, args)

    def _call(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        attempt = 0
        while True:
            attempt += 1
            try:
                self._ensure_schema()
                return fn(self.engine, *args)
            except DBAPIError as e:
                code = e.orig.args[0] if e.orig is not None and e.orig.args else None
                if code in _RETRY_CODES and attempt < _ATTEMPTS:
                    continue
                raise StateDatabaseError(f"state database {self.name}: {e.orig}") from e
            except (SQLAlchemyError, OSError) as e:
                raise StateDatabaseError(f"state database {self.name}: {e}") from e

    def _ensure_schema(self) -> None:
        if self._schema_ready:
            return
        with self._schema_lock:
            if self._schema_ready:
                return
            if self.url.get_backend_name() == "sqlite" and not is_memory_sqlite(self.url):
                os.makedirs(os.path.dirname(str(self.url.database)), exist_ok=True)
            # SQLite: one IMMEDIATE transaction, so two processes creating
            # the tables at once take turns.  MySQL commits each CREATE on
            # its own: a table another node created between our look and
            # our CREATE ("already exists") is taken as it is.
            with self.engine.connect().execution_options(**WRITE) as conn:
                for table in self.tables.metadata.sorted_tables:
                    try:
                        with conn.begin():
                            table.create(conn, checkfirst=True)
                    except (OperationalError, ProgrammingError) as e:
                        if "already exists" not in str(e.orig):
                            raise
            self._schema_ready = True

    # -- purge -------------------------------------------------------------

    def purge(self) -> defer.Deferred:
        """Delete expired rows now; fires with {table: rows deleted}."""
        return self.run(_purge, self.tables, float(self.clock.seconds()))

    def _purge_logged(self) -> defer.Deferred:
        def done(counts: dict[str, int]) -> None:
            if any(counts.values()):
                log.info("state database purge deleted {counts}", counts=counts,
                         database=self.name)

        def failed(f: Any) -> None:
            log.error("state database {database} purge failed: {error}", database=self.name,
                      error=f.getErrorMessage())

        d = self.purge()
        d.addCallbacks(done, failed)
        return d

    def __repr__(self) -> str:
        return f"<StateDatabase {self.name} {self._state}>"


def _purge(engine: Engine, tables: StateTables, now: float) -> dict[str, int]:
    counts: dict[str, int] = {}
    for table in (tables.blacklist, tables.greylist, tables.greylist_whitelist):
        with engine.connect().execution_options(**WRITE) as conn, conn.begin():
            counts[table.name] = conn.execute(delete(table).where(table.c.expires <= now)).rowcount
    return counts

