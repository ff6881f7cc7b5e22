"""Several database servers in ``database.url``/``store.url`` (issue 16,
"Past one database server"): the syntax and its checks, and the failover of
``mppproxy/db/failover.py`` against the real MariaDB of
``scripts/services/start-mariadb.sh``.

The "servers" are TCP relays on loopback, each in front of that one
MariaDB: closing a relay is a server stopping (its connections cut, new
ones refused), with the real driver, pool and stores on both sides.  The
Galera cluster itself is ``tests/realmta/test_galera.py``.  Skipped without
MariaDB, failed under ``MPP_REQUIRE_SERVICES=1`` (``require_mariadb``).
"""
from __future__ import annotations

import shutil
import socket
import tempfile
import threading
import time
import uuid
from typing import Any

from sqlalchemy.engine import make_url
from twisted.internet import defer, reactor as _reactor, threads
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from helpers import free_port
from mppproxy.config.database import DatabaseConfig, server_urls
from mppproxy.config.errors import ConfigError
from mppproxy.config.load import from_mapping
from mppproxy.db import StateDatabase, StateDatabaseError
from mppproxy.db.engine import database_url, make_engine
from mppproxy.db.failover import failover_of
from mppproxy.config.policy import GreylistConfig
from test_db_stores import drop_tables, require_mariadb

reactor: Any = _reactor

GREY = GreylistConfig(enabled=True, delay=0.0, retry_window=3600.0, lifetime=86400.0,
                      auto_whitelist_after=0)
# The documented switch time for a stopped server (docs/configuration.md,
# database.url): the pool's ping fails at once, the refused server costs
# nothing, the next answers.
SWITCH_SECONDS = 1.0


class Relay:
    """A TCP relay 127.0.0.1:port -> target, one thread per direction."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.accepted = 0
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self.lock:
                self.accepted += 1
                self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            try:
                b.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        """Stop like a server: the port refuses, open connections are cut."""
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes accept() on Linux
        except OSError:
            pass
        self.listener.close()
        with self.lock:
            for s in self.sockets:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()


def via(url: str, port: int) -> str:
    """``url`` with its host and port replaced by the relay's."""
    return make_url(url).set(host="127.0.0.1", port=port).render_as_string(hide_password=False)


class ServerListConfigTests(unittest.SynchronousTestCase):
    """The syntax: a string as before, or a TOML list, checked key by key."""

    def test_a_string_and_a_list_both_load(self) -> None:
        """One URL stays a string; a list becomes a tuple, for both keys."""
        one = from_mapping({"database": {"url": "mysql://u:p@h1/db"}})
        self.assertEqual(one.database.url, "mysql://u:p@h1/db")
        self.assertEqual(server_urls(one.database.url), ("mysql://u:p@h1/db",))
        urls = ["mysql://u:p@h1:3306/db", "mysql://u:p@h2:3307/db"]
        two = from_mapping({"database": {"url": urls}, "store": {"url": urls}})
        self.assertEqual(two.database.url, tuple(urls))
        self.assertEqual(two.store.url, tuple(urls))
        self.assertEqual(server_urls(""), ())
        # The first server names the database (logs, the SQLite path logic).
        self.assertEqual(database_url(two.database, "/tmp").host, "h1")

    def test_bad_lists_are_named_by_key(self) -> None:
        """Each problem names the key (and the item of a list), never a traceback."""
        cases = {
            "database.url: an empty list": {"database": {"url": []}},
            "store.url: several servers are for MySQL/MariaDB": {
                "store": {"url": ["sqlite:////tmp/a.sqlite", "mysql://h/db"]}},
            "database.url: must be a URL or a list of URLs": {"database": {"url": ["mysql://h/db", 3]}},
            "database.url[1]: 'postgresql' is not supported": {
                "database": {"url": ["mysql://h/db", "postgresql://h/db"]}},
            "database.url: not an SQLAlchemy URL": {"database": {"url": "mysql://u:p@h1:3306,h2/db"}},
        }
        for expected, data in cases.items():
            with self.assertRaises(ConfigError) as caught:
                from_mapping(data)
            self.assertIn(expected, str(caught.exception))
        with self.assertRaises(ConfigError) as caught:
            from_mapping({"database": {"url": "mysql://u:p@h1:3306,h2:3307/db"}})
        self.assertIn("give a list of URLs", str(caught.exception))

    def test_one_server_installs_no_failover(self) -> None:
        """A single URL (string or one-item list) keeps the plain engine."""
        for url in ("mysql+pymysql://u:p@h/db", ("mysql+pymysql://u:p@h/db",)):
            config = DatabaseConfig(url=url)
            engine = make_engine(database_url(config, "/tmp"), config)
            self.assertIsNone(failover_of(engine))
            engine.dispose()


class FailoverTests(unittest.TestCase):
    """The state database on a list of servers, the real MariaDB behind relays."""

    def setUp(self) -> None:
        self.url = require_mariadb()
        u = make_url(self.url)
        self.target = (u.host or "127.0.0.1", u.port or 3306)
        self.data_dir = tempfile.mkdtemp(prefix="mpp-failover-")
        self.addCleanup(shutil.rmtree, self.data_dir, True)
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def relay(self) -> Relay:
        r = Relay(self.target)
        self.addCleanup(r.close)
        return r

    async def make_db(self, urls: list[str]) -> StateDatabase:
        db = StateDatabase(DatabaseConfig(url=tuple(urls), cache_seconds=0, pool_max=2,
                                          purge_interval=1e9),
                           self.data_dir, reactor, table_prefix=f"f{uuid.uuid4().hex[:10]}_")

        async def cleanup() -> None:
            await db.stop()
            await threads.deferToThread(drop_tables, self.url, db)

        self.addCleanup(lambda: defer.Deferred.fromCoroutine(cleanup()))
        return db

    def switches(self) -> list[str]:
        return [str(e.get("log_format")) for e in self.events
                if "switched to" in str(e.get("log_format", ""))]

    async def test_a_stopped_server_is_left_for_the_next_within_a_second(self) -> None:
        """The first server answers until it stops; the next transaction (a greylist
        check, a blacklisting) goes through the second within SWITCH_SECONDS, with one
        loud log line, and what was written through the first is there."""
        first, second = self.relay(), self.relay()
        db = await self.make_db([via(self.url, first.port), via(self.url, second.port)])
        self.assertTrue(await db.start())
        failover = failover_of(db.engine)
        assert failover is not None
        self.assertIsNone(await db.greylist.check("192.0.2.0/24", "a@x.test", "b@y.test", GREY))
        self.assertGreater(first.accepted, 0)
        self.assertEqual(second.accepted, 0)
        self.assertEqual(failover.current, 0)
        infos = [e for e in self.events if "using server" in str(e.get("log_format", ""))]
        self.assertEqual(len(infos), 1)

        first.close()
        started = time.monotonic()
        await db.blacklist.add("198.51.100.7/32", 600, "test")
        self.assertIsNone(await db.greylist.check("192.0.2.0/24", "c@x.test", "b@y.test", GREY))
        elapsed = time.monotonic() - started
        self.assertLess(elapsed, SWITCH_SECONDS)
        self.assertGreater(second.accepted, 0)
        self.assertEqual(failover.current, 1)
        self.assertEqual(len(self.switches()), 1)
        entry = await db.blacklist.lookup("198.51.100.7")
        self.assertIsNotNone(entry)
        def triplets(engine: Any) -> list[Any]:
            with engine.connect() as conn:
                return list(conn.execute(db.tables.greylist.select()))

        rows = await db.run(triplets)
        self.assertEqual(len(rows), 2)  # the triplet written through the first is there
        self.assertEqual(len(self.switches()), 1)  # once per switch, not per connection

    async def test_first_server_down_at_start_uses_the_next(self) -> None:
        """A server that refuses at start is passed over for the next in the list."""
        up = self.relay()
        db = await self.make_db([via(self.url, free_port()), via(self.url, up.port)])
        self.assertTrue(await db.start())
        await db.blacklist.add("198.51.100.8/32", 600, "test")
        failover = failover_of(db.engine)
        assert failover is not None
        self.assertEqual(failover.current, 1)
        self.assertEqual(len(self.switches()), 1)

    async def test_every_server_down_fails_naming_each(self) -> None:
        """With no server answering, the check fails (policy.on_error decides) and
        the error names every server tried."""
        ports = [free_port(), free_port()]
        db = await self.make_db([via(self.url, p) for p in ports])
        self.assertFalse(await db.start())
        with self.assertRaises(StateDatabaseError) as caught:
            await db.blacklist.add("198.51.100.9/32", 600, "test")
        for p in ports:
            self.assertIn(f"127.0.0.1:{p}", str(caught.exception))
        self.assertEqual(self.switches(), [])
