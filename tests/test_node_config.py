"""Each node's configuration in the state database (``db/nodeconfig.py``,
issue 13): two nodes write their rows, one through a real
``StateDatabase`` (an edge's path), the other through the recorder's own
engine (the archive node's); a reload updates its row; a database that
refuses is logged once and written at the next tick; and no secret (a
database or store password in a URL, a key file's contents, a secret
named key) ever reaches the table.  On SQLite and on MariaDB (a table
prefix of the test's own).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, select
from twisted.internet import reactor
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from test_db_stores import require_mariadb
from mppproxy.config.load import from_mapping
from mppproxy.config.schema import ProxyConfig
from mppproxy.config.show import MASK
from mppproxy.db.nodeconfig import (ConfigRecorder, WriteState, config_table, read_configs,
                                    snapshot)
from mppproxy.db.state import StateDatabase

DB_PASSWORD = "Db-Passw0rd-never-stored"
STORE_PASSWORD = "Store-Passw0rd-never-stored"
ARCHIVE_KEY = "9a8b7c6d5e4f30211203f4e5d6c7b8a99a8b7c6d5e4f30211203f4e5d6c7b8a9"
SECRETS = (DB_PASSWORD, STORE_PASSWORD, ARCHIVE_KEY)


def edge_config(data: Path, node: str, max_connections: int = 100) -> ProxyConfig:
    """An edge's configuration full of secrets: passwords in URLs, an
    archive key file (its path is stored, never its contents)."""
    key_file = data / "archive.keys"
    key_file.write_text(f"k1 = {ARCHIVE_KEY}\n", encoding="utf-8")
    return from_mapping({
        "data_dir": str(data),
        "limits": {"max_connections": max_connections},
        "database": {"url": f"mysql+pymysql://mpp:{DB_PASSWORD}@db.test/mpp"},
        "store": {"url": f"mysql+pymysql://store:{STORE_PASSWORD}@db.test/archive"},
        "archive": {"node_name": node, "key_file": str(key_file)},
    })


class NodeConfigCase:
    """The tests, for a backend (SQLite or MariaDB: the subclasses)."""

    url: str
    prefix: str
    data: Path

    def setUp(self: Any) -> None:
        self.data = Path(tempfile.mkdtemp(prefix="mpp-nodeconfig-"))
        self.addCleanup(shutil.rmtree, self.data, True)
        self.prepare()
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def state(self: Any, start: bool = True) -> StateDatabase:
        """A real state database on the test's URL and prefix."""
        config = from_mapping({"data_dir": str(self.data), "database": {"url": self.url}})
        db = StateDatabase(config.database, str(self.data), reactor, table_prefix=self.prefix)
        if start:
            db.start()
        self.addCleanup(db.stop)
        return db

    def own_config(self: Any, node: str, max_connections: int) -> ProxyConfig:
        """The second node: it writes with its own engine on its
        [database] (the test's URL, whose password is then masked)."""
        return dataclasses.replace(
            edge_config(self.data, node, max_connections),
            database=from_mapping({"database": {"url": self.url,
                                                "traffic_flush": 5}}).database)

    def raw_table(self: Any) -> str:
        """Every cell of the table, as text (what a reader of the
        database could see)."""
        engine = create_engine(self.url)
        try:
            from mppproxy.db.models import StateTables
            t = config_table(StateTables(self.prefix))
            with engine.connect() as conn:
                return "\n".join(" ".join(str(v) for v in row)
                                 for row in conn.execute(select(t)))
        finally:
            engine.dispose()

    def read(self: Any) -> dict[str, Any]:
        engine = create_engine(self.url)
        try:
            from mppproxy.db.models import StateTables
            return {r.node: r for r in read_configs(engine, StateTables(self.prefix))}
        finally:
            engine.dispose()

    async def test_two_nodes_write_and_a_reload_updates(self: Any) -> None:
        """Edge A writes through a StateDatabase, edge B through its own
        engine: two rows (node, mode, version, generation 1, digest,
        loaded, the masked trees, the differing key's two values).  A's
        reload (another max_connections) updates its row in place:
        generation 2, a new digest, a later loaded time."""
        db = self.state()
        a = ConfigRecorder(reactor, edge_config(self.data, "edge-a", 100), lambda: db,
                           table_prefix=self.prefix)
        b = ConfigRecorder(reactor, self.own_config("edge-b", 200), table_prefix=self.prefix)
        self.addCleanup(b.stop)
        self.addCleanup(a.stop)
        self.assertEqual(b.interval, 5)  # database.traffic_flush, under the heartbeat
        await a.record(edge_config(self.data, "edge-a", 100))
        await b.record(self.own_config("edge-b", 200))
        rows = self.read()
        self.assertEqual(sorted(rows), ["edge-a", "edge-b"])
        first = rows["edge-a"]
        self.assertEqual((first.mode, first.generation), ("all-in-one", 1))
        self.assertEqual(first.all_keys["limits"]["max_connections"], 100)
        self.assertEqual(rows["edge-b"].all_keys["limits"]["max_connections"], 200)
        self.assertEqual(first.changed["limits"], {"max_connections": 100})
        self.assertEqual(first.all_keys["database"]["url"],
                         f"mysql+pymysql://mpp:{MASK}@db.test/mpp")
        self.assertEqual(first.all_keys["archive"]["key_file"], str(self.data / "archive.keys"))
        self.assertNotEqual(first.digest, rows["edge-b"].digest)
        # A reload applied on A.
        await a.record(edge_config(self.data, "edge-a", 150))
        rows = self.read()
        self.assertEqual(len(rows), 2)
        again = rows["edge-a"]
        self.assertEqual(again.generation, 2)
        self.assertEqual(again.all_keys["limits"]["max_connections"], 150)
        self.assertNotEqual(again.digest, first.digest)
        self.assertGreaterEqual(again.loaded, first.loaded)
        self.assertEqual(rows["edge-b"].generation, 1)
        # No secret in any cell; the masks are there.
        text = self.raw_table()
        for secret in SECRETS:
            self.assertNotIn(secret, text)
        self.assertIn(f"mpp:{MASK}@db.test", text)
        self.assertEqual(a.state, WriteState.OK)

    async def test_ticks_refresh_and_stale(self: Any) -> None:
        """A tick after a write only refreshes ``reported`` (same
        generation and digest); a row older than STALE_AFTER is stale; a
        row deleted behind the recorder's back is written whole again."""
        db = self.state()
        config = edge_config(self.data, "edge-a")
        a = ConfigRecorder(reactor, config, lambda: db, table_prefix=self.prefix)
        self.addCleanup(a.stop)
        await a.record(config)
        before = self.read()["edge-a"]
        await a.tick()
        after = self.read()["edge-a"]
        self.assertEqual((after.generation, after.digest, after.loaded),
                         (before.generation, before.digest, before.loaded))
        self.assertGreaterEqual(after.reported, before.reported)
        self.assertEqual(a.writes, 1)
        self.assertFalse(after.stale(after.reported + 299))
        self.assertTrue(after.stale(after.reported + 301))
        # Gone from the table (a purge, an administrator): written again.
        await db.run(lambda engine: _delete_all(engine, db))
        await a.tick()  # finds no row
        await a.tick()  # writes it whole
        self.assertEqual(a.writes, 2)
        self.assertIn("edge-a", self.read())

    async def test_a_failure_is_logged_once_and_retried(self: Any) -> None:
        """A state database that refuses (not started yet): the record
        fails with one warning, the next tick fails silently; once it
        runs, the tick writes the row and says so once."""
        db = self.state(start=False)
        config = edge_config(self.data, "edge-a")
        a = ConfigRecorder(reactor, config, lambda: db, table_prefix=self.prefix)
        self.addCleanup(a.stop)
        await a.record(config)  # never fails
        await a.tick()
        self.assertEqual(a.state, WriteState.FAILING)
        warned = [e for e in self.events
                  if "node configuration not written" in str(e.get("log_format", ""))]
        self.assertEqual(len(warned), 1)
        db.start()
        await a.tick()
        self.assertEqual(a.state, WriteState.OK)
        self.assertEqual(self.read()["edge-a"].generation, 1)
        again = [e for e in self.events
                 if "node configuration written again" in str(e.get("log_format", ""))]
        self.assertEqual(len(again), 1)

    def test_snapshot_masks(self: Any) -> None:
        """The snapshot itself holds no secret, in either tree, and its
        JSON holds only plain data."""
        row = snapshot(edge_config(self.data, "edge-a"), "edge-a", 1, 0.0)
        text = json.dumps([row.all_keys, row.changed])
        for secret in SECRETS:
            self.assertNotIn(secret, text)
        self.assertIn(MASK, text)


def _delete_all(engine: Any, db: StateDatabase) -> None:
    t = config_table(db.tables)
    with engine.begin() as conn:
        conn.execute(t.delete())


class SQLiteNodeConfigTests(NodeConfigCase, unittest.TestCase):

    def prepare(self) -> None:
        """A SQLite file in the test's directory."""
        self.url = f"sqlite:///{self.data / 'state.sqlite'}"
        self.prefix = "mpp_"


class MariaDBNodeConfigTests(NodeConfigCase, unittest.TestCase):

    def prepare(self) -> None:
        """The test MariaDB, tables of a prefix of the test's own."""
        self.url = require_mariadb()
        self.prefix = f"t{uuid.uuid4().hex[:10]}_"
        self.addCleanup(self.drop)

    def drop(self) -> None:
        """Drop the test's table."""
        from mppproxy.db.models import StateTables
        engine = create_engine(self.url)
        try:
            tables = StateTables(self.prefix)
            config_table(tables)
            tables.metadata.drop_all(engine)
        finally:
            engine.dispose()
