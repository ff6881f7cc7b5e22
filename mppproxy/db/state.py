"""The state database: one SQLAlchemy engine, its own thread pool, the
periodic purge, and the three stores the policy checks use (greylist,
auto-blacklist, the per-domain sender allow list).

All database work runs in the pool's threads (``deferToThreadPool``); the
reactor thread only reads the in-process caches and waits on Deferreds
(docs/design.md: "the reactor never blocks on I/O").  A failure comes back as a
``StateDatabaseError`` naming the database (without its password) and the
driver's reason; the policy engine turns it into a tempfail or a skip per
``policy.on_error`` (docs/design.md promise 4).
"""
from __future__ import annotations

import os
import threading
from typing import Any, Callable, Optional, TypeVar

from sqlalchemy import delete, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from mppproxy._transitions import StateEnum, TransitionError
from mppproxy.db.allowlist import SqlAllowListStore, move_legacy
from mppproxy.db.blacklist import SqlBlacklistStore
from mppproxy.db.engine import (WRITE, WriteLockBusy, database_url, is_memory_sqlite,
                                make_engine, no_lock_wait)
from mppproxy.db.greylist import SqlGreylistStore
from mppproxy.db.models import StateTables, create_missing
from mppproxy.db.nodehealth import purge_health
from mppproxy.db.traffic import purge_traffic
from mppproxy.logsetup import Logger
from mppproxy.config.database import DatabaseConfig

log = Logger()

T = TypeVar("T")

# Seconds between WAL checkpoints when batch jobs run on the reactor
# thread (SQLite's own threshold, 1000 pages, is a few seconds of a busy
# policy server's writes).
CHECKPOINT_INTERVAL = 1.0
# Expired rows deleted per purge transaction.
PURGE_CHUNK = 1000
# MySQL/MariaDB: deadlock found, lock wait timeout: the transaction is
# retried (InnoDB's advice for both).  SQLite: "database is locked" past
# the busy timeout is not retried (it already waited).
_RETRY_CODES = (1213, 1205)
_ATTEMPTS = 3


class StateDatabaseError(Exception):
    """The state database could not be used; the text says which one and why."""


class DatabaseState(StateEnum):
    """Where a ``StateDatabase`` stands (``StateDatabase.state``).

    - ``NEW``: built, nothing started (construction does no I/O).
      ``start()`` moves it to RUNNING; ``stop()`` to STOPPED.
    - ``RUNNING``: the thread pool, the purge and (SQLite in the reactor)
      the checkpoints run; work is accepted.  ``stop()`` (or the reactor's
      shutdown) moves it to STOPPED.
    - ``STOPPED``: nothing runs; work fails with ``StateDatabaseError``
      (the checks' failure outcome, docs/design.md promise 4).  Final;
      stopping again is harmless, starting again is a ``TransitionError``.
    """

    NEW = "new"
    RUNNING = "running"
    STOPPED = "stopped"


_DATABASE_MOVES: dict[DatabaseState, frozenset[DatabaseState]] = {
    DatabaseState.NEW: frozenset({DatabaseState.RUNNING, DatabaseState.STOPPED}),
    DatabaseState.RUNNING: frozenset({DatabaseState.STOPPED}),
    DatabaseState.STOPPED: frozenset({DatabaseState.STOPPED}),
}


class CheckpointState(StateEnum):
    """The WAL checkpoints of a SQLite file whose batch jobs run on the
    reactor thread (``StateDatabase.checkpoint_state``).

    - ``IDLE``: none in flight; the last one worked (or none ran yet).
      The checkpoint loop moves it to RUNNING.
    - ``RUNNING``: one in flight in the pool (the loop skips its turns).
      Done: IDLE; failed: FAILING, logged.
    - ``FAILING``: none in flight; the last one failed and the WAL grows.
      The loop moves it to RETRYING.
    - ``RETRYING``: one in flight after a failure.  Done: IDLE, logged as
      working again; failed: FAILING, not logged again.
    """

    IDLE = "idle"
    RUNNING = "running"
    FAILING = "failing"
    RETRYING = "retrying"


_CHECKPOINT_MOVES: dict[CheckpointState, frozenset[CheckpointState]] = {
    CheckpointState.IDLE: frozenset({CheckpointState.RUNNING}),
    CheckpointState.RUNNING: frozenset({CheckpointState.IDLE, CheckpointState.FAILING}),
    CheckpointState.FAILING: frozenset({CheckpointState.RETRYING}),
    CheckpointState.RETRYING: frozenset({CheckpointState.IDLE, CheckpointState.FAILING}),
}


class StateDatabase:
    """Shared greylist, blacklist and allow-list state in SQL.

    ``StateDatabase(db_config, data_dir, reactor)``: construction does no
    I/O.  ``start()`` starts the thread pool, creates missing tables and
    the purge of expired rows every ``purge_interval``; ``stop()`` stops
    them and closes the connections.  ``blacklist``, ``greylist`` and
    ``allowlist`` are the stores (``policy/services.py`` protocols).

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
        # SQLite file: batch jobs on the reactor thread while the write lock
        # is free (run_job); WAL checkpoints then run in the pool.
        self.in_reactor = (db_config.sqlite_in_reactor and self.url.get_backend_name() == "sqlite"
                           and not is_memory_sqlite(self.url))
        self._checkpoint_loop = LoopingCall(self._checkpoint)
        self._checkpoint_loop.clock = reactor
        self.checkpoint_state = CheckpointState.IDLE
        # The last checkpoint's (busy, WAL frames, frames checkpointed).
        self.last_checkpoint: Optional[tuple[int, int, int]] = None
        # Jobs run on the reactor thread, and those that found the write
        # lock taken and went to the pool (tests, the log line at stop).
        self.jobs_in_reactor = 0
        self.jobs_deferred_to_pool = 0
        self._schema_ready = False
        self._schema_lock = threading.Lock()
        self.state = DatabaseState.NEW
        self._shutdown_trigger: Any = None
        # Calls that went to the database (tests prove cache hits with it).
        self.calls = 0
        self.blacklist = SqlBlacklistStore(self, db_config.cache_seconds)
        self.greylist = SqlGreylistStore(self, db_config.cache_seconds)
        self.allowlist = SqlAllowListStore(self, db_config.cache_seconds)

    @property
    def running(self) -> bool:
        return self.state is DatabaseState.RUNNING

    def _move_to(self, new: DatabaseState) -> None:
        if new not in _DATABASE_MOVES[self.state]:
            raise TransitionError(self, self.state, new)
        self.state = new

    def _move_checkpoint_to(self, new: CheckpointState) -> None:
        if new not in _CHECKPOINT_MOVES[self.checkpoint_state]:
            raise TransitionError(self, self.checkpoint_state, new)
        self.checkpoint_state = new

    # -- life cycle --------------------------------------------------------

    def start(self) -> defer.Deferred[bool]:
        """Start the thread pool and the purge; create missing tables.

        Fires with True once the tables exist, or False (logged) when the
        database cannot be reached now: the stores then try again on each
        use, and fail until it can (checks tempfail, docs/design.md promise 4).
        """
        self._move_to(DatabaseState.RUNNING)
        self._pool.start()
        # A pool left running would keep the process alive after the
        # reactor stops: stop with the reactor if nobody stopped us first.
        self._shutdown_trigger = self.reactor.addSystemEventTrigger(
            "before", "shutdown", self._stop_at_shutdown)
        self._purge_loop.start(self.config.purge_interval, now=False)
        if self.in_reactor:
            self._checkpoint_loop.start(CHECKPOINT_INTERVAL, now=False)
        log.info("state database {database}: {threads} threads, purge every {interval}s{how}",
                 database=self.name, threads=self._pool.max,
                 interval=self.config.purge_interval,
                 how=", batch jobs on the reactor thread while the write lock is free"
                 if self.in_reactor else "")

        def failed(f: Any) -> bool:
            log.error("state database {database} is not ready: {error}; "
                      "trying again on first use", database=self.name, error=f.getErrorMessage())
            return False

        def mirror(ready: bool) -> bool | defer.Deferred[bool]:
            # The blacklist's and the allow list's lookups are answered
            # from memory once these loads are in (db/blacklist.py,
            # db/allowlist.py); a failed one is tried again.  Neither fails.
            if self.state is not DatabaseState.RUNNING:  # stopped while the check ran
                return ready
            loads = defer.gatherResults([self.blacklist.start_mirror(),
                                         self.allowlist.start_mirror()])
            return loads.addBoth(lambda _: ready)

        d = self.run(lambda engine: True)
        d.addErrback(failed)
        d.addCallback(mirror)
        return d

    def stop(self) -> defer.Deferred[None]:
        """Stop the purge and the thread pool (joined off the reactor
        thread), then close every connection."""
        state = self.state
        self._move_to(DatabaseState.STOPPED)
        if state is DatabaseState.STOPPED:
            return defer.succeed(None)
        if self._purge_loop.running:
            self._purge_loop.stop()
        if self._checkpoint_loop.running:
            self._checkpoint_loop.stop()
        self.blacklist.stop_mirror()
        self.allowlist.stop_mirror()
        if state is DatabaseState.RUNNING:
            g, b = self.greylist.batcher, self.blacklist.batcher
            log.info("state database {database} stopping: greylist {g_items} calls in {g_jobs} "
                     "jobs (largest {g_largest}), blacklist {b_items} in {b_jobs} (largest "
                     "{b_largest}){where}", database=self.name, g_items=g.items, g_jobs=g.jobs,
                     g_largest=g.largest, b_items=b.items, b_jobs=b.jobs, b_largest=b.largest,
                     where=f"; {self.jobs_in_reactor} jobs on the reactor thread, "
                           f"{self.jobs_deferred_to_pool} found the write lock taken"
                     if self.in_reactor else "")
        if self._shutdown_trigger is not None:
            self.reactor.removeSystemEventTrigger(self._shutdown_trigger)
            self._shutdown_trigger = None
        if state is DatabaseState.NEW:
            self.engine.dispose()
            return defer.succeed(None)

        def shutdown() -> None:
            self._pool.stop()
            self.engine.dispose()

        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), shutdown)

    def _stop_at_shutdown(self) -> defer.Deferred[None]:
        self._shutdown_trigger = None
        return self.stop()

    # -- running work ------------------------------------------------------

    def run(self, fn: Callable[..., T], *args: Any) -> defer.Deferred[T]:
        """``fn(engine, *args)`` in a pool thread; its result, or a
        ``StateDatabaseError``."""
        if self.state is not DatabaseState.RUNNING:
            return defer.fail(StateDatabaseError(
                f"state database {self.name} is {self.state.value}"))
        self.calls += 1
        return deferToThreadPool(self.reactor, self._pool, self._call, fn, args)

    def run_job(self, fn: Callable[..., T], *args: Any) -> defer.Deferred[T]:
        """``run`` for the stores' batch jobs.  With a SQLite file
        (``database.sqlite_in_reactor``) the job runs here, on the reactor
        thread, if SQLite's write lock is free: a job is a few hundred
        microseconds of SQLite's own work, and in a pool thread each of its
        SQLite calls handed the GIL over and back (the reactor thread then
        waited for the pool thread's Python), plus a thread wake-up each
        way and a reactor turn before the answers were read.  On two cores
        the policy server answered ~20 % more requests per second this way.
        The reactor never waits for the lock: a job that finds it taken (a
        job of another process, the purge) goes to the pool, which tries
        again as before.  Its pages are read from the OS cache and its WAL
        written without fsync (synchronous = NORMAL); checkpoints, which
        fsync, run in the pool (``_checkpoint``)."""
        if not self.in_reactor or not self._schema_ready or self.state is not DatabaseState.RUNNING:
            return self.run(fn, *args)
        try:
            with no_lock_wait():
                result = self._call(fn, args)
        except WriteLockBusy:
            self.jobs_deferred_to_pool += 1
            return self.run(fn, *args)
        except Exception:
            self.calls += 1
            return defer.fail()
        self.calls += 1
        self.jobs_in_reactor += 1
        return defer.succeed(result)

    def _checkpoint(self) -> None:
        """A PASSIVE checkpoint in the pool (jobs on the reactor thread
        leave them to us): copies what no reader still needs from the WAL
        into the database file, waits for nobody."""
        before = self.checkpoint_state
        if (before is CheckpointState.RUNNING or before is CheckpointState.RETRYING
                or self.state is not DatabaseState.RUNNING):
            return
        self._move_checkpoint_to(CheckpointState.RUNNING if before is CheckpointState.IDLE
                                 else CheckpointState.RETRYING)

        def done(result: tuple[int, int, int]) -> None:
            self.last_checkpoint = result
            if self.checkpoint_state is CheckpointState.RETRYING:
                log.info("state database {database} checkpoints work again", database=self.name)
            self._move_checkpoint_to(CheckpointState.IDLE)

        def failed(f: Any) -> None:
            if self.checkpoint_state is CheckpointState.RUNNING:
                log.warn("state database {database} checkpoint failed: {error}; the WAL file "
                         "grows until one works", database=self.name, error=f.getErrorMessage())
            self._move_checkpoint_to(CheckpointState.FAILING)

        self.run(_checkpoint).addCallbacks(done, failed)

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
            self._create_schema()

    def _create_schema(self) -> None:
        """The tables, once; the caller holds ``_schema_lock``."""
        if self._schema_ready:  # made by another thread while this one waited
            return
        if self.url.get_backend_name() == "sqlite" and not is_memory_sqlite(self.url):
            os.makedirs(os.path.dirname(str(self.url.database)), exist_ok=True)
        create_missing(self.engine, self.tables.metadata.sorted_tables)
        # Allow-list rows an older node wrote go to the domain lists.
        move_legacy(self.engine, self.tables)
        self._schema_ready = True

    # -- purge -------------------------------------------------------------

    def purge(self) -> defer.Deferred[dict[str, int]]:
        """Delete expired rows now; fires with {table: rows deleted}."""
        return self.run(_purge, self.tables, float(self.clock.seconds()))

    def purge_dashboard(self) -> defer.Deferred[dict[str, int]]:
        """Delete the dashboard's traffic hours past
        ``traffic_retention_days`` and engine-health rows no node wrote for
        a week (traffic.py, nodehealth.py); fires with {table: rows deleted}."""
        return self.run(_purge_dashboard, self.tables, float(self.clock.seconds()),
                        self.config.traffic_retention_days)

    def _purge_logged(self) -> defer.Deferred[None]:
        def done(counts: dict[str, int]) -> None:
            if any(counts.values()):
                log.info("state database purge deleted {counts}", counts=counts,
                         database=self.name)

        def failed(f: Any) -> None:
            log.error("state database {database} purge failed: {error}", database=self.name,
                      error=f.getErrorMessage())

        d = self.purge().addCallbacks(done, failed)
        # The dashboard's rows after the expiring ones, each its own jobs.
        d.addCallback(lambda _: self.purge_dashboard().addCallbacks(done, failed))
        return d

    def __repr__(self) -> str:
        return f"<StateDatabase {self.name} {self.state.value}>"


def _checkpoint(engine: Engine) -> tuple[int, int, int]:
    """(busy, frames in the WAL, frames checkpointed)."""
    raw = engine.raw_connection()
    try:
        # In autocommit (no transaction of ours holds the WAL).
        # Any: the sqlite3 connection, which SQLAlchemy types as an
        # optional DBAPIConnection without ``execute``.
        conn: Any = raw.dbapi_connection
        row = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return (int(row[0]), int(row[1]), int(row[2]))
    finally:
        raw.close()


def _purge(engine: Engine, tables: StateTables, now: float) -> dict[str, int]:
    """Delete expired rows, PURGE_CHUNK per transaction: between two, the
    write lock is free for the stores' batches (a whole large table in
    one transaction held it for seconds, and batches waiting on SQLite's
    lock give up after its busy timeout)."""
    counts: dict[str, int] = {}
    for table in (tables.blacklist, tables.greylist, tables.greylist_whitelist):
        key = next(iter(table.primary_key.columns))
        expired = select(key).where(table.c.expires <= now).limit(PURGE_CHUNK)
        deleted = 0
        while True:
            with engine.connect().execution_options(**WRITE) as conn, conn.begin():
                keys = [r[0] for r in conn.execute(expired)]
                if keys:
                    deleted += conn.execute(delete(table).where(key.in_(keys))).rowcount
            if len(keys) < PURGE_CHUNK:
                break
        counts[table.name] = deleted
    return counts


def _purge_dashboard(engine: Engine, tables: StateTables, now: float,
                     retention_days: int) -> dict[str, int]:
    return {tables.traffic.name: purge_traffic(engine, tables, now, retention_days),
            tables.node_health.name: purge_health(engine, tables, now)}
