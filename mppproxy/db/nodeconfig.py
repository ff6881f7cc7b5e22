"""Each node's effective configuration, secrets masked, in the state
database, so the web console's configuration page (issue 13) shows what
every node runs, not only the one that serves it.

A leaf (docs/design.md, "Floors").  The console runs in the archive node
or in the main process of an all-in-one node; an edge's configuration
lives in the edge's memory.  So each node's main process writes one row
(``NodeConfigRow``: node, mode, version, generation, digest, when it was
loaded, the masked configuration as JSON) at start and after every
SIGHUP reload that was applied (``ConfigRecorder.record``), and the
console reads the rows back (``read_configs``).

What is stored is ``config/show.py``'s tree, under its masking rule (the
one of ``mppproxy show-config``): keys named for passwords, secrets,
tokens and keys and the password of any URL are ``MASK``; file paths are
stored, no file a key names is ever read.  Both trees are stored: every
key (the console's diff compares these) and the keys that differ from
their defaults (what the page shows first).  ``digest`` is a SHA-256 of
the every-key tree: two nodes with the same digest run the same
configuration (secrets aside: they are masked before hashing, so a hash
never helps guess one).

The writes go through the state database's thread pool (``Writer.run``:
a ``StateDatabase`` where the process has one, else ``OwnDatabase``, an
engine of the recorder's own on ``[database]`` in the reactor's pool,
e.g. on the archive node), never on the reactor thread.  Besides the
writes at start and reload, the recorder ticks every ``database.
traffic_flush`` seconds (at most ``HEARTBEAT``): a write that failed is
tried again then (the failure is logged once, the recovery once), and
otherwise the row's ``reported`` time is refreshed (one small UPDATE),
so the console can tell a node that stopped (``STALE_AFTER``) from one
that has not been reloaded for a month.  Rows nobody wrote for ``KEEP``
seconds (a node taken out of service) are deleted at the next full write
of any node.

The table is this module's own, on ``StateTables``' metadata
(``config_table``, as ``ratecounts.py`` does), created when missing.
"""
from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import os
import socket
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol

from sqlalchemy import (Column, Double, Index, Integer, String, Table, Text, delete, select,
                        update)
from sqlalchemy.dialects import mysql, sqlite
from sqlalchemy.engine import Engine
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool

from mppproxy import __version__
from mppproxy.config.database import DatabaseConfig
from mppproxy.config.schema import ProxyConfig
from mppproxy.config.show import config_tree
from mppproxy.db.engine import WRITE, database_url, is_memory_sqlite, make_engine
from mppproxy.db.models import NODE_LENGTH, StateTables, clip, create_missing
from mppproxy.logsetup import Logger

log = Logger()

# Seconds between two ticks at most (database.traffic_flush when smaller).
HEARTBEAT = 60.0
# Seconds without a write after which the console shows a node as stale:
# five heartbeats missed.
STALE_AFTER = 300.0
# Seconds after which a row nobody wrote again is deleted.
KEEP = 30 * 86400.0
MODE_LENGTH = 16
VERSION_LENGTH = 64
DIGEST_LENGTH = 64


def config_table(tables: StateTables) -> Table:
    """The node configurations' table in ``tables``' metadata (made once).
    The key is (node, mode): an edge and the archive node on one host
    (one host name) keep a row each."""
    name = f"{tables.prefix}node_config"
    found = tables.metadata.tables.get(name)
    if found is not None:
        return found
    # A configuration with many policies and routes can pass TEXT's 64 KiB
    # on MariaDB; MEDIUMTEXT holds 16 MiB.  SQLite's TEXT has no limit.
    big_text = Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb")
    return Table(
        name, tables.metadata,
        Column("node", String(NODE_LENGTH), primary_key=True),
        Column("mode", String(MODE_LENGTH), primary_key=True),
        Column("version", String(VERSION_LENGTH), nullable=False, default=""),
        # 1 at the process's start, +1 per reload applied.
        Column("generation", Integer, nullable=False),
        Column("digest", String(DIGEST_LENGTH), nullable=False),
        # When the node loaded this configuration, and when it last wrote
        # the row (its clock, Unix seconds).
        Column("loaded", Double, nullable=False),
        Column("reported", Double, nullable=False),
        # JSON: config_tree(all_keys=True) and config_tree(), masked.
        Column("all_keys", big_text, nullable=False),
        Column("changed", big_text, nullable=False),
        Index(f"{tables.prefix}node_config_reported", "reported"),
    )


@dataclass(frozen=True)
class NodeConfigRow:
    """One node's configuration as stored (the trees masked)."""

    node: str
    mode: str
    version: str
    generation: int
    digest: str
    loaded: float
    reported: float
    all_keys: dict[str, Any]
    changed: dict[str, Any]

    def stale(self, now: float, stale_after: float = STALE_AFTER) -> bool:
        """Whether the node has not written for ``stale_after`` seconds."""
        return now - self.reported > stale_after


def config_node(config: ProxyConfig) -> str:
    """The node's name in the table: archive.node_name, or the host name
    (smtp.hostname, or the host's FQDN): the traffic counts' name."""
    return config.archive.node_name or config.smtp.hostname or socket.getfqdn()


def _json(tree: dict[str, Any]) -> str:
    # sort_keys: the same configuration gives the same text and digest.
    # default=str: a value config_tree leaves as an object is text here.
    return json.dumps(tree, sort_keys=True, ensure_ascii=False, default=str)


def snapshot(config: ProxyConfig, node: str, generation: int, loaded: float) -> NodeConfigRow:
    """``config`` as a row, secrets masked (config/show.py's rule); the
    trees are round-tripped through JSON, so they are what a reader gets."""
    all_text = _json(config_tree(config, all_keys=True))
    changed_text = _json(config_tree(config))
    return NodeConfigRow(clip(node, NODE_LENGTH), clip(config.mode, MODE_LENGTH),
                         clip(__version__, VERSION_LENGTH), generation,
                         hashlib.sha256(all_text.encode("utf-8")).hexdigest(), loaded, loaded,
                         json.loads(all_text), json.loads(changed_text))


# -- blocking queries (run them in a thread) ----------------------------------------

def write_config(engine: Engine, tables: StateTables, row: NodeConfigRow, now: float) -> None:
    """Upsert ``row`` with ``reported = now``; create the table when
    missing and delete the rows nobody wrote for ``KEEP`` seconds."""
    t = config_table(tables)
    create_missing(engine, [t])
    values = {"node": row.node, "mode": row.mode, "version": row.version,
              "generation": row.generation, "digest": row.digest, "loaded": row.loaded,
              "reported": now, "all_keys": _json(row.all_keys), "changed": _json(row.changed)}
    fields = [k for k in values if k not in ("node", "mode")]
    statement: Any
    if engine.dialect.name == "sqlite":
        lite = sqlite.insert(t)
        statement = lite.on_conflict_do_update(index_elements=[t.c.node, t.c.mode],
                                               set_={f: lite.excluded[f] for f in fields})
    else:
        my = mysql.insert(t)
        statement = my.on_duplicate_key_update({f: my.inserted[f] for f in fields})
    with engine.connect().execution_options(**WRITE) as conn, conn.begin():
        conn.execute(statement, [values])
        conn.execute(delete(t).where(t.c.reported < now - KEEP))


def touch_config(engine: Engine, tables: StateTables, node: str, mode: str, digest: str,
                 now: float) -> bool:
    """Set ``reported = now`` on the node's row if it still holds
    ``digest``; False when it does not (deleted, or another process wrote
    another configuration under this name): the caller writes it whole."""
    t = config_table(tables)
    query = (update(t).where(t.c.node == clip(node, NODE_LENGTH),
                             t.c.mode == clip(mode, MODE_LENGTH), t.c.digest == digest)
             .values(reported=now))
    with engine.connect().execution_options(**WRITE) as conn, conn.begin():
        return bool(conn.execute(query).rowcount)


def read_configs(engine: Engine, tables: Optional[StateTables] = None) -> list[NodeConfigRow]:
    """Every node's row, by mode and node (blocking).  A table not made
    yet (no node has written) is made, empty."""
    t = config_table(tables if tables is not None else StateTables())
    create_missing(engine, [t])
    with engine.connect() as conn:
        return [NodeConfigRow(r.node, r.mode, r.version, int(r.generation), r.digest,
                              float(r.loaded), float(r.reported), json.loads(r.all_keys),
                              json.loads(r.changed))
                for r in conn.execute(select(t).order_by(t.c.mode, t.c.node))]


# -- where the writes go -----------------------------------------------------------

class Writer(Protocol):
    """What the recorder needs of a database: ``StateDatabase`` has it."""

    name: str
    tables: StateTables

    def run(self, fn: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        """``fn(engine, *args)`` in a thread, never the reactor's."""


class OwnDatabase:
    """An engine of one connection on ``[database]``, made at the first
    write in the reactor's thread pool, for a process without a state
    database (the archive node; an edge with ``policy.enabled = false``)."""

    def __init__(self, db_config: DatabaseConfig, data_dir: str, reactor: Any,
                 table_prefix: str = "mpp_") -> None:
        self.reactor = reactor
        self.url = database_url(db_config, data_dir)
        self.name = self.url.render_as_string(hide_password=True)
        self.tables = StateTables(table_prefix)
        self._config = dataclasses.replace(db_config, pool_min=0, pool_max=1,
                                           sqlite_in_reactor=False)
        self._engine: Optional[Engine] = None
        self._lock = threading.Lock()

    def _made(self) -> Engine:
        with self._lock:
            if self._engine is None:
                if self.url.get_backend_name() == "sqlite" and not is_memory_sqlite(self.url):
                    os.makedirs(os.path.dirname(os.path.abspath(str(self.url.database))),
                                exist_ok=True)
                self._engine = make_engine(self.url, self._config)
            return self._engine

    def _call(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        return fn(self._made(), *args)

    def run(self, fn: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), self._call, fn,
                                 args)

    def close(self) -> None:
        """Dispose of the engine (blocking)."""
        with self._lock:
            if self._engine is not None:
                self._engine.dispose()
                self._engine = None


# -- the recorder ------------------------------------------------------------------

class WriteState(enum.Enum):
    """How the recorder's last write went, so an outage is logged once."""

    OK = "ok"
    FAILING = "failing"


class ConfigRecorder:
    """Writes this node's configuration row: ``record`` at start and after
    each reload applied, a tick every ``interval`` seconds (a failed write
    again, else the ``reported`` time).

    ``database()`` gives the state database to write through, or None: the
    recorder's own engine on ``[database]`` then (``OwnDatabase``; made at
    the first write, closed by ``stop``).  Construction does no I/O; one
    write at a time, the newest configuration last."""

    def __init__(self, reactor: Any, config: ProxyConfig,
                 database: Callable[[], Optional[Writer]] = lambda: None,
                 interval: Optional[float] = None, table_prefix: str = "mpp_") -> None:
        self.reactor = reactor
        self.database = database
        flush = config.database.traffic_flush
        self.interval = interval if interval is not None else (
            min(flush, HEARTBEAT) if flush > 0 else HEARTBEAT)
        self.own = OwnDatabase(config.database, config.data_dir, reactor, table_prefix)
        self.generation = 0
        self.row: Optional[NodeConfigRow] = None
        # The generation the database holds (0: none yet, or lost).
        self.written = 0
        self.state = WriteState.OK
        self.writes = 0
        self._busy: Optional[defer.Deferred[None]] = None
        self._loop = LoopingCall(self.tick)
        self._loop.clock = reactor

    def start(self) -> None:
        """Tick every ``interval`` seconds from now on."""
        if not self._loop.running:
            d = self._loop.start(self.interval, now=False)
            d.addErrback(lambda f: log.failure("node configuration writer stopped", f))

    def record(self, config: ProxyConfig, node: Optional[str] = None) -> defer.Deferred[None]:
        """A configuration was loaded (start) or applied (reload): snapshot
        it now and write it as soon as no other write is in flight.  Fires
        when written or given up till the next tick (never fails)."""
        self.generation += 1
        try:
            self.row = snapshot(config, node if node is not None else config_node(config),
                                self.generation, float(self.reactor.seconds()))
        except Exception:
            # Never a reason to refuse a start or a reload: the page shows
            # the previous row (or none) for this node.
            log.failure("the node configuration cannot be recorded")
            return defer.succeed(None)
        return self._write_now()

    def tick(self) -> defer.Deferred[None]:
        """The loop's turn: a write that failed again, else the row's
        ``reported`` time; nothing while a write is in flight."""
        if self._busy is not None:
            return defer.succeed(None)
        return self._write_now()

    def _write_now(self) -> defer.Deferred[None]:
        if self._busy is not None:
            # After the write in flight (it sees the newer generation).
            waiting: defer.Deferred[None] = defer.Deferred()
            self._busy.addBoth(lambda _: self._write_now().chainDeferred(waiting))
            return waiting
        row = self.row
        if row is None:
            return defer.succeed(None)
        db = self.database()
        writer: Writer = db if db is not None else self.own
        now = float(self.reactor.seconds())
        d: defer.Deferred[Any]
        # maybeDeferred: a database that refuses at once (stopped) fails
        # the Deferred, never the start or the reload that called us.
        if self.written == row.generation:
            d = defer.maybeDeferred(lambda: writer.run(touch_config, writer.tables, row.node,
                                                       row.mode, row.digest, now))
            d.addCallback(self._touched, row)
        else:
            d = defer.maybeDeferred(lambda: writer.run(write_config, writer.tables, row, now))
            d.addCallback(self._written, row)
        d.addErrback(self._failed, writer)
        self._busy = d
        d.addBoth(self._done)
        return d

    def _written(self, _: object, row: NodeConfigRow) -> None:
        self.writes += 1
        self.written = row.generation
        if self.state is WriteState.FAILING:
            log.info("node configuration written again")
            self.state = WriteState.OK

    def _touched(self, found: bool, row: NodeConfigRow) -> None:
        if not found:
            self.written = 0  # written whole at the next tick
        elif self.state is WriteState.FAILING:
            log.info("node configuration written again")
            self.state = WriteState.OK

    def _failed(self, failure: Any, writer: Writer) -> None:
        self.written = 0  # the whole row again at the next tick
        if self.state is WriteState.OK:
            log.warn("node configuration not written to {database}: {error}; tried again "
                     "every {interval} s", database=getattr(writer, "name", "?"),
                     error=failure.getErrorMessage(), interval=self.interval)
            self.state = WriteState.FAILING

    def _done(self, _: object) -> None:
        self._busy = None

    def stop(self) -> defer.Deferred[None]:
        """Stop ticking; wait for a write in flight; close the own engine.
        Never fails."""
        if self._loop.running:
            self._loop.stop()
        waiting: defer.Deferred[None] = defer.Deferred()
        if self._busy is None:
            waiting.callback(None)
        else:
            self._busy.addBoth(lambda _: waiting.callback(None))

        def close(_: object) -> defer.Deferred[None]:
            closed: defer.Deferred[None] = deferToThreadPool(
                self.reactor, self.reactor.getThreadPool(), self.own.close)
            closed.addErrback(lambda f: log.failure("closing the node configuration's engine", f))
            return closed

        return waiting.addCallback(close)
