"""Several database servers for one engine: ``database.url`` or
``store.url`` given as a list (the nodes of a MariaDB Galera cluster),
used one at a time, the next one taken when the one in use fails.

A leaf (``db/``): ``engine.py`` installs it on a MySQL/MariaDB engine with
more than one server; every engine site (the state database, the archive
store, the console's readers) gets it from there.  It rests on three
documented SQLAlchemy hooks (Core Events, "DialectEvents" and "PoolEvents";
"Dealing with Disconnects" in Connection Pooling):

- ``do_connect``: every new DBAPI connection is made here, the servers
  tried in order starting with the one in use, each with a short connect
  timeout; the first that answers and is ready (Galera: ``wsrep_ready``)
  is used.  A connection made to another server than the one in use is a
  switch: logged once, at warning level, and the pool's older connections
  are dropped (the ``checkout`` hook below).
- ``handle_error``: an error that says the server is gone or not usable
  (the MySQL dialect's disconnect codes; Galera's 1047 "WSREP has not yet
  prepared node for application use") marks the connection disconnected,
  so SQLAlchemy discards it and the pool's other connections.
- ``checkout`` (with ``pool_pre_ping``): a pooled connection whose server
  is dead fails its ping and is replaced through ``do_connect``; one made
  before the last switch is replaced too (``DisconnectionError``), so the
  engine never works on two servers for long.

The stores' batch jobs use DBAPI cursors directly (``cursor_in_transaction``),
which SQLAlchemy's ``handle_error`` does not see: ``server_failed`` does
the same for them.

The engine stays on the server it switched to until that one fails (no
going back to the first when it returns: a node that rejoins a cluster is
only ready once it has caught up, and flapping between nodes would make
two edges write through two nodes for nothing).
"""
from __future__ import annotations

import threading
import weakref
from typing import Any, Optional

from sqlalchemy import event
from sqlalchemy.engine import Engine, URL
from sqlalchemy.exc import DisconnectionError

from mppproxy.logsetup import Logger

log = Logger()

# Seconds a connection attempt to one server of a list waits (PyMySQL's
# connect_timeout) before the next is tried: a host that drops packets
# costs this much per attempt; a stopped server (connection refused)
# costs nothing.  One server alone keeps engine.py's longer timeout.
CONNECT_TIMEOUT = 2
# MySQL/MariaDB error codes that mean "this server cannot serve us now"
# besides the dialect's disconnect codes: 1047 ER_UNKNOWN_COM_ERROR, what a
# Galera node answers while it is not in the primary component or not yet
# synced ("WSREP has not yet prepared node for application use"); 1053
# ER_SERVER_SHUTDOWN; 2003 CR_CONN_HOST_ERROR (cannot connect).
_UNUSABLE_CODES = frozenset({1047, 1053, 2003})
# A connection's pool-record key: the switch count it was made under.
_GENERATION = "mpp_failover_generation"
_SERVER = "mpp_failover_server"

_by_engine: "weakref.WeakKeyDictionary[Engine, Failover]" = weakref.WeakKeyDictionary()


class Failover:
    """The servers of one engine and the one in use (``current``, an index
    into ``servers``).  Thread-safe: connections are made in the thread
    pool's threads."""

    def __init__(self, engine: Engine, urls: list[URL], name: str):
        self.name = name
        self.servers = urls
        # host:port of each, for the log (never the password).
        self.labels = [f"{u.host or 'localhost'}:{u.port or 3306}" for u in urls]
        self._params = [engine.dialect.create_connect_args(u)[1] for u in urls]
        self.current = 0
        self.generation = 0
        self.switches = 0
        self.connected_once = False
        self._lock = threading.Lock()

    def describe(self, i: int) -> str:
        return f"{self.labels[i]} ({i + 1} of {len(self.servers)})"

    def connect(self, dialect: Any, cparams: dict[str, Any]) -> Any:
        """A DBAPI connection to the first server that answers and is
        ready, starting with the one in use."""
        with self._lock:
            start = self.current
        reasons: list[str] = []
        n = len(self.servers)
        for k in range(n):
            i = (start + k) % n
            params = {**cparams, **self._params[i], "connect_timeout": CONNECT_TIMEOUT}
            try:
                conn = dialect.loaded_dbapi.connect(**params)
            except dialect.loaded_dbapi.Error as e:
                reasons.append(f"{self.labels[i]}: {_reason(e)}")
                continue
            problem = _not_ready(conn)
            if problem is not None:
                _close_quietly(conn)
                reasons.append(f"{self.labels[i]}: {problem}")
                continue
            self._using(i, start, "; ".join(reasons))
            return conn, i
        # A driver error (2003, can't connect), so that SQLAlchemy and the
        # callers treat it as any database that cannot be reached.
        raise dialect.loaded_dbapi.OperationalError(
            2003, f"no server of the list is ready: {'; '.join(reasons)}")

    def _using(self, i: int, start: int, reasons: str) -> None:
        with self._lock:
            first = not self.connected_once
            self.connected_once = True
            if i == self.current:
                if first:
                    log.info("database {database}: using server {server}",
                             database=self.name, server=self.describe(i))
                return
            if self.current != start:  # another thread switched meanwhile
                return
            old, self.current = self.current, i
            self.generation += 1
            self.switches += 1
        # Loud, once per switch (the next connections go here without a word).
        log.warn("database {database}: server {old} failed ({reason}); switched to {new}",
                 database=self.name, old=self.describe(old), new=self.describe(i),
                 reason=reasons or "not ready")

    def failed(self, server: Optional[int]) -> None:
        """A connection to ``server`` found it gone or not usable: the
        pool's connections made so far are replaced on their next
        checkout, through ``connect`` (which tries that server again
        first: it may only have dropped one connection)."""
        with self._lock:
            if server is None or server == self.current:
                self.generation += 1


def install(engine: Engine, urls: list[URL], name: str) -> Failover:
    """Make ``engine`` connect through the servers ``urls`` (in order)."""
    failover = Failover(engine, urls, name)
    _by_engine[engine] = failover

    # SQLAlchemy Core Events, DialectEvents.do_connect: "override the call
    # to connect() entirely, by returning a non-None DBAPI connection".
    @event.listens_for(engine, "do_connect")
    def _do_connect(dialect: Any, conn_rec: Any, cargs: Any, cparams: dict[str, Any]) -> Any:
        conn, server = failover.connect(dialect, cparams)
        conn_rec.info[_SERVER] = server
        conn_rec.info[_GENERATION] = failover.generation
        return conn

    # DialectEvents.handle_error: "by assigning to this flag [is_disconnect],
    # a 'disconnect' event which then results in a connection and pool
    # invalidation can be invoked".
    @event.listens_for(engine, "handle_error")
    def _handle_error(ctx: Any) -> None:
        if ctx.is_disconnect or _code(ctx.original_exception) in _UNUSABLE_CODES:
            ctx.is_disconnect = True
            server = None
            if ctx.connection is not None and not ctx.connection.invalidated:
                server = ctx.connection.connection.info.get(_SERVER)
            failover.failed(server)

    # PoolEvents.checkout: "If a DisconnectionError is raised, the current
    # connection will be disposed and a fresh connection retrieved."
    @event.listens_for(engine, "checkout")
    def _checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        if record.info.get(_GENERATION) != failover.generation:
            raise DisconnectionError("made before the last server switch or failure")

    return failover


def failover_of(engine: Engine) -> Optional[Failover]:
    return _by_engine.get(engine)


def server_failed(engine: Engine, raw: Any, error: BaseException) -> bool:
    """For work on DBAPI cursors (``engine.cursor_in_transaction``): True
    when ``error`` says the connection's server is gone or not usable; the
    connection is then invalidated and the pool's others replaced, as
    ``handle_error`` does for SQLAlchemy's own statements."""
    dialect = engine.dialect
    try:
        gone = bool(dialect.is_disconnect(error, raw.dbapi_connection, None))  # type: ignore[arg-type]
    except Exception:  # a driver error the dialect cannot classify
        gone = False
    if not gone and _code(error) not in _UNUSABLE_CODES:
        return False
    failover = failover_of(engine)
    if failover is not None:
        failover.failed(raw.info.get(_SERVER))
    return True


def _code(error: Any) -> Any:
    args = getattr(error, "args", None)
    return args[0] if args else None


def _reason(error: BaseException) -> str:
    return " ".join(str(error).split())[:200] or type(error).__name__


def _not_ready(conn: Any) -> Optional[str]:
    """Why a Galera node may not be used now (``wsrep_ready`` is OFF: not
    in the primary component, or still joining), or None.  A server
    without Galera (``wsrep_on`` OFF, or no such variable: MySQL) is ready;
    MariaDB built with wsrep reports ``wsrep_ready`` OFF there too."""
    try:
        cursor = conn.cursor()
        try:
            cursor.execute("SHOW GLOBAL VARIABLES LIKE 'wsrep_on'")
            on = cursor.fetchone()
            row = None
            if on is not None and str(on[1]).upper() == "ON":
                cursor.execute("SHOW GLOBAL STATUS LIKE 'wsrep_ready'")
                row = cursor.fetchone()
        finally:
            cursor.close()
    except Exception as e:  # the server went away between connect and this
        return _reason(e)
    if row is not None and str(row[1]).upper() != "ON":
        return "Galera node not ready (wsrep_ready OFF)"
    return None


def _close_quietly(conn: Any) -> None:
    try:
        conn.close()
    except Exception:
        pass
