"""SQLAlchemy engines for the state database (the stores build their own
dialect-specific statements: ``greylist.py``, ``blacklist.py``).

SQLite (the default, ``data_dir/state.sqlite``): WAL journal so readers
never wait for the writer, a busy timeout, and every writing transaction
opened with ``BEGIN IMMEDIATE`` so two processes never both read and then
both try to upgrade to a write lock (the second would fail at once with
SQLITE_BUSY, which no busy timeout retries).

MySQL/MariaDB through PyMySQL: ``pool_pre_ping`` and ``pool_recycle``
survive server restarts and idle timeouts; READ COMMITTED so a row
another node inserted a moment ago is visible to the next statement of an
open transaction (InnoDB's REPEATABLE READ would hide it); utf8mb4.
Several servers (``database.url`` as a list, a Galera cluster): one at a
time, the next when it fails (``failover.py``).
"""
from __future__ import annotations

import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator, Optional

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine, URL, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import StaticPool

from mppproxy.config.database import DatabaseConfig, server_urls
from mppproxy.db import failover

# Seconds a statement waits for another process's SQLite write lock.
SQLITE_BUSY_TIMEOUT = 5.0
# PyMySQL: seconds to connect, to wait for a reply, to send.
MYSQL_CONNECT_TIMEOUT = 5
MYSQL_IO_TIMEOUT = 30
# Connections older than this are replaced (below MySQL's wait_timeout).
MYSQL_POOL_RECYCLE = 1800
# Connections beyond the thread pool's size (the purge, a racing stop).
POOL_OVERFLOW = 2
# Seconds a thread waits for a free connection.
POOL_TIMEOUT = 10.0

WRITE = {"mpp_write": True}


def database_url(config: DatabaseConfig, data_dir: str, filename: str = "state.sqlite") -> URL:
    """The configured URL (the first server of a list); empty means SQLite
    at ``data_dir/<filename>`` (``state.sqlite``; the archive store's is
    ``archive.sqlite``).  ``mysql://`` and ``mariadb://`` without a driver
    use PyMySQL."""
    urls = server_urls(config.url)
    if not urls:
        path = os.path.abspath(os.path.join(data_dir, filename))
        return URL.create("sqlite", database=path)
    return _server_url(urls[0])


def _server_url(text: str) -> URL:
    url = make_url(text)
    if url.drivername in ("mysql", "mariadb"):
        url = url.set(drivername=f"{url.drivername}+pymysql")
    if url.get_backend_name() in ("mysql", "mariadb") and "charset" not in url.query:
        url = url.update_query_dict({"charset": "utf8mb4"})
    return url


def is_memory_sqlite(url: URL) -> bool:
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")


def make_engine(url: URL, config: DatabaseConfig, durable: bool = False) -> Engine:
    """An engine for ``url``; no connection is made yet (no I/O).

    ``durable``: SQLite fsyncs every commit (``synchronous = FULL``), for
    a store that holds mail (the archive store: its writer removes a
    queued copy once the row is committed); the state database does not."""
    backend = url.get_backend_name()
    if backend == "sqlite":
        return _sqlite_engine(url, config, durable)
    if backend in ("mysql", "mariadb"):
        engine = create_engine(
            url, pool_pre_ping=True, pool_recycle=MYSQL_POOL_RECYCLE,
            pool_size=config.pool_max, max_overflow=POOL_OVERFLOW, pool_timeout=POOL_TIMEOUT,
            isolation_level="READ COMMITTED",
            connect_args={"connect_timeout": MYSQL_CONNECT_TIMEOUT,
                          "read_timeout": MYSQL_IO_TIMEOUT, "write_timeout": MYSQL_IO_TIMEOUT})
        # Several servers (a Galera cluster): one at a time, the next when
        # it fails (db/failover.py).
        servers = [_server_url(u) for u in server_urls(config.url)]
        if len(servers) > 1 and url in servers:
            failover.install(engine, servers[servers.index(url):] + servers[:servers.index(url)],
                             url.render_as_string(hide_password=True))
        return engine
    raise ValueError(f"database {backend!r} is not supported (sqlite, or mysql+pymysql)")


# Seconds between tries of BEGIN IMMEDIATE while another process writes.
SQLITE_RETRY_INTERVAL = 0.0002
_BUSY_TIMEOUT_MS = int(SQLITE_BUSY_TIMEOUT * 1000)
# Connection-record info keys: the journal is WAL; busy_timeout is now 0.
_WAL = "mpp_wal"
_BUSY_OFF = "mpp_busy_off"


class WriteLockBusy(Exception):
    """Another connection holds SQLite's write lock, and this thread may
    not wait for it (``no_lock_wait``)."""


class _NoWait(threading.local):
    on = False  # in a no_lock_wait block, on this thread


_no_wait = _NoWait()


def _is_lock_error(error: Optional[BaseException]) -> bool:
    # SQLITE_BUSY ("database is locked") or SQLITE_LOCKED ("database
    # table is locked").
    return isinstance(error, sqlite3.OperationalError) and "locked" in str(error)


@contextmanager
def no_lock_wait() -> Iterator[None]:
    """Within this block (on this thread), a transaction of
    ``cursor_in_transaction`` that finds a SQLite lock taken (the write
    lock, or any other a statement would wait for) is rolled back and
    raises ``WriteLockBusy`` at once: SQLite's busy handler is off and
    nothing is tried again, so the reactor thread never waits for it."""
    _no_wait.on = True
    try:
        yield
    finally:
        _no_wait.on = False


def _begin_immediate(dbapi_connection: Any, info: dict[str, Any]) -> None:
    """BEGIN IMMEDIATE, tried again every SQLITE_RETRY_INTERVAL while
    another process holds the write lock, for at most SQLITE_BUSY_TIMEOUT
    (then the "database is locked" error goes up, as with a busy timeout).

    SQLite's own busy handler sleeps 1, 2, 5, 10 ... ms between tries: long
    next to a write transaction of ours (well under 1 ms), and two worker
    processes then spent more time asleep than writing.  So it is off for
    writing transactions.  Holding the write lock of a WAL database, none
    of their statements can meet another's lock, so it stays off until a
    reading transaction needs it back (``_busy_timeout_on``): the two
    PRAGMAs per write were a fifth of the database thread's time.  Without
    WAL (COMMIT then waits for readers) it is restored at once."""
    _busy_timeout_off(dbapi_connection, info)
    try:
        deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT
        while True:
            try:
                dbapi_connection.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as e:
                if not _is_lock_error(e):
                    raise
                if _no_wait.on:
                    raise WriteLockBusy() from e
                if time.monotonic() >= deadline:
                    raise
                time.sleep(SQLITE_RETRY_INTERVAL)
    finally:
        if not info.get(_WAL) and not _no_wait.on:
            _busy_timeout_on(dbapi_connection, info)


def _busy_timeout_off(dbapi_connection: Any, info: dict[str, Any]) -> None:
    if not info.get(_BUSY_OFF):
        dbapi_connection.execute("PRAGMA busy_timeout = 0")
        info[_BUSY_OFF] = True


def _busy_timeout_on(dbapi_connection: Any, info: dict[str, Any]) -> None:
    # Reads wait for a lock the usual way (switching the journal to WAL,
    # reading while another process recovers the WAL).
    if info.get(_BUSY_OFF):
        dbapi_connection.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        info[_BUSY_OFF] = False


@contextmanager
def cursor_in_transaction(engine: Engine, write: bool = True) -> Iterator[Any]:
    """A DB-API cursor in a transaction: writing (SQLite: BEGIN IMMEDIATE)
    or reading, committed when the block ends, rolled back if it raises.

    For the stores' batch jobs (``greylist.py``, ``blacklist.py``):
    SQLAlchemy's work around each statement (~40 µs, holding the GIL that
    the reactor thread waits for after each of its socket calls) was most
    of a job's Python time.  Driver errors come out as ``DBAPIError``, as
    from SQLAlchemy, so ``StateDatabase`` handles them the same way."""
    dbapi_error = engine.dialect.loaded_dbapi.Error
    sqlite = engine.dialect.name == "sqlite"
    no_wait = sqlite and _no_wait.on
    try:
        raw = engine.raw_connection()
    except (DBAPIError, dbapi_error) as e:  # a new connection's set-up failed
        if no_wait and _is_lock_error(e.orig if isinstance(e, DBAPIError) else e):
            raise WriteLockBusy() from e  # it met a lock
        if isinstance(e, DBAPIError):
            raise
        raise DBAPIError.instance(None, None, e, dbapi_error) from e
    try:
        try:
            if sqlite:
                # Any: the sqlite3 connection (execute), which SQLAlchemy
                # types as an optional DBAPIConnection.
                dbapi_connection: Any = raw.dbapi_connection
                if write:
                    _begin_immediate(dbapi_connection, raw.info)
                else:
                    if no_wait:
                        _busy_timeout_off(dbapi_connection, raw.info)
                    else:
                        _busy_timeout_on(dbapi_connection, raw.info)
                    dbapi_connection.execute("BEGIN")
            cursor = raw.cursor()
            yield cursor
            cursor.close()
            raw.commit()
        except BaseException:
            try:
                raw.rollback()
            except dbapi_error:
                # A connection that cannot roll back is not handed out again.
                raw.invalidate()
            raise
    except dbapi_error as e:
        if no_wait and _is_lock_error(e):
            # Rolled back above; the caller runs it where it may wait.
            raise WriteLockBusy() from e
        if not sqlite and failover.server_failed(engine, raw, e) and raw.is_valid:
            # Gone or not usable: not handed out again (SQLAlchemy does
            # this for its own statements, not for DBAPI cursors).
            raw.invalidate(e)
        raise DBAPIError.instance(None, None, e, dbapi_error) from e
    finally:
        raw.close()


def placeholders(dialect: Any, n: int) -> str:
    """``(?, ?, ...)`` (or ``%s``) for ``n`` values in the driver's style."""
    mark = "?" if dialect.paramstyle == "qmark" else "%s"
    return f"({', '.join([mark] * n)})"


def _journal_mode_wal(cursor: Any, no_wait: bool) -> Any:
    """``PRAGMA journal_mode = WAL``, tried again for up to the busy timeout
    while the file is locked.  SQLite answers "database is locked" to a
    journal-mode change at once, without its busy handler, while another
    connection holds the file: two processes opening a new database at the
    same moment (workers at start, the archive node and ``mppproxy
    quarantine``) would otherwise fail the second.  Once the file is in WAL
    mode (it stays so) the pragma takes no lock."""
    deadline = time.monotonic() + (0.0 if no_wait else SQLITE_BUSY_TIMEOUT)
    while True:
        try:
            return cursor.execute("PRAGMA journal_mode = WAL").fetchone()
        except sqlite3.OperationalError as e:
            if not _is_lock_error(e) or time.monotonic() >= deadline:
                raise
        time.sleep(0.01)


def _sqlite_engine(url: URL, config: DatabaseConfig, durable: bool = False) -> Engine:
    connect_args = {"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT}
    if is_memory_sqlite(url):
        # One connection for the process (the thread pool has one thread).
        engine = create_engine(url, poolclass=StaticPool, connect_args=connect_args)
    else:
        # LIFO: the jobs, one at a time, keep taking the connection used
        # last, whose page cache is still valid (SQLite drops a connection's
        # cache when another connection has written): pread calls per policy
        # request went from 1.7 to 0.8 with one process.
        engine = create_engine(url, pool_size=config.pool_max, max_overflow=POOL_OVERFLOW,
                               pool_timeout=POOL_TIMEOUT, connect_args=connect_args,
                               pool_use_lifo=True)

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, record: Any) -> None:
        # We issue BEGIN ourselves (below); pysqlite's implicit one would
        # be a deferred BEGIN only before DML.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        # A connection opened on the reactor thread (no_lock_wait) does
        # not wait either: switching to WAL waits for a lock.
        busy_off = _no_wait.on
        cursor.execute(f"PRAGMA busy_timeout = {0 if busy_off else _BUSY_TIMEOUT_MS}")
        record.info[_BUSY_OFF] = busy_off
        if not is_memory_sqlite(url):
            mode = _journal_mode_wal(cursor, busy_off)
            record.info[_WAL] = bool(mode) and str(mode[0]).lower() == "wal"
            # WAL with synchronous=NORMAL: a commit is not fsync'ed, only
            # each checkpoint is.  Greylist and blacklist state is not
            # mail: losing the last second of it on power loss only
            # greylists a few triplets again (docs/design.md promise 1 is about
            # messages, which never live here).  A durable engine (the
            # archive store, where messages do live) fsyncs each commit.
            cursor.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
        if not is_memory_sqlite(url) and config.sqlite_in_reactor:
            # The commit that crosses the WAL's checkpoint threshold would
            # copy pages back and fsync on the reactor thread: checkpoints
            # run in the pool instead (StateDatabase, every second).
            cursor.execute("PRAGMA wal_autocheckpoint = 0")
        # Statement journals (a multi-row INSERT with ON CONFLICT needs one)
        # in memory: on disk each was a temporary file created, unlinked
        # and closed per statement, eight system calls per greylist job.
        cursor.execute("PRAGMA temp_store = MEMORY")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        pooled = conn.connection
        if not conn.get_execution_options().get("mpp_write", False):
            _busy_timeout_on(pooled.dbapi_connection, pooled.info)
            conn.exec_driver_sql("BEGIN")
            return
        _begin_immediate(pooled.dbapi_connection, pooled.info)

    return engine
