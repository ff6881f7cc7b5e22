"""The shared state on a MariaDB Galera cluster (issue 16, "Past one database
server"): two nodes from Debian's packages and a ``garbd`` arbitrator on
loopback, started by ``scripts/services/start-galera.sh`` (ports 23306 and
23307), and two edges' state databases, each given both nodes in
``database.url`` (its own node first):

- each edge sees the other's greylist triplets and blacklistings;
- the node of edge B stopped: B goes on through the other node within
  ``SWITCH_SECONDS`` (the time docs/configuration.md promises), one
  transaction of each kind succeeding;
- the node rejoins (IST) and has the rows written while it was away.

The cluster is started once for the module and stopped after it.  Missing
packages (mariadb-server, galera-4, galera-arbitrator-4, rsync) or a cluster
that does not come up: skipped, or failed with ``MPP_REQUIRE_SERVICES=1``
(CI, whose ``.ci/run`` installs them).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
from sqlalchemy import create_engine, select, text
from twisted.internet import defer, reactor as _reactor, threads
from twisted.internet.task import deferLater
from twisted.trial import unittest

from mppproxy.config.database import DatabaseConfig
from mppproxy.config.policy import GreylistConfig
from mppproxy.db import StateDatabase
from mppproxy.db.failover import failover_of

from .conftest import service_unavailable

reactor: Any = _reactor

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "services" / "start-galera.sh"
GAL_DIR = os.environ.get("MPP_GALERA_DIR", "/tmp/mpp-galera")
PORTS = (23306, 23307)
NODES = [f"mysql+pymysql://mpp:mpp@127.0.0.1:{p}/mpp" for p in PORTS]
# docs/configuration.md (database.url): a stopped node is left within this time.
SWITCH_SECONDS = 2.0
# Galera applies a write set on the other node a moment after the commit
# (virtually synchronous): reads there are polled for at most this long.
REPLICATION_WAIT = 5.0
GREY = GreylistConfig(enabled=True, delay=1.0, retry_window=3600.0, lifetime=86400.0,
                      auto_whitelist_after=0)


def _script(*args: str, timeout: float = 150) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "GAL_DIR": GAL_DIR})


@pytest.fixture(scope="module", autouse=True)
def galera_cluster() -> Iterator[None]:
    """The cluster for this module: started (idempotent), stopped afterwards."""
    missing = [name for name, present in (
        ("mariadb-server", shutil.which("mariadbd") or os.path.exists("/usr/sbin/mariadbd")),
        ("galera-4", os.path.exists("/usr/lib/galera/libgalera_smm.so")),
        ("galera-arbitrator-4", shutil.which("garbd")),
        ("rsync", shutil.which("rsync"))) if not present]
    if missing:
        service_unavailable(f"Galera test cluster needs Debian packages: {' '.join(missing)}")
    if os.geteuid() != 0:
        service_unavailable("start-galera.sh runs mariadbd as user mysql: needs root")
    try:
        started = _script()
    except subprocess.TimeoutExpired:
        _script("stop", timeout=60)
        service_unavailable("start-galera.sh did not finish within 150 s")
    if started.returncode != 0:
        service_unavailable(f"start-galera.sh failed: {started.stderr[-2000:]}")
    try:
        yield
    finally:
        _script("stop", timeout=90)


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


class GaleraEdgesTests(unittest.TestCase):
    """Two edges' state databases on the two nodes of one Galera cluster."""

    timeout = 120

    def setUp(self) -> None:
        self.data_dir = tempfile.mkdtemp(prefix="mpp-galera-edge-")
        self.addCleanup(shutil.rmtree, self.data_dir, True)
        self.prefix = f"g{uuid.uuid4().hex[:10]}_"

    async def edge(self, first: int) -> StateDatabase:
        """An edge's state database: node ``first`` then the other."""
        urls = (NODES[first], NODES[1 - first])
        db = StateDatabase(DatabaseConfig(url=urls, cache_seconds=0, pool_max=2,
                                          purge_interval=1e9),
                           self.data_dir, reactor, table_prefix=self.prefix)
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(self._drop(db)))
        self.assertTrue(await db.start())
        return db

    async def _drop(self, db: StateDatabase) -> None:
        await db.stop()

        def drop() -> None:
            for url in NODES:  # whichever node is up
                engine = create_engine(url, connect_args={"connect_timeout": 2})
                try:
                    db.tables.metadata.drop_all(engine)
                    return
                except Exception:
                    continue
                finally:
                    engine.dispose()

        await threads.deferToThread(drop)

    async def eventually(self, what: Any, seconds: float = REPLICATION_WAIT) -> Any:
        """``await what()`` until it is truthy, at most ``seconds``."""
        deadline = time.monotonic() + seconds
        while True:
            result = await what()
            if result or time.monotonic() >= deadline:
                return result
            await sleep(0.1)

    def server_of(self, db: StateDatabase) -> int:
        failover = failover_of(db.engine)
        assert failover is not None
        return PORTS.index(failover.servers[failover.current].port)

    async def test_edges_on_two_nodes_see_each_others_entries(self) -> None:
        """A triplet greylisted through node 1 passes through node 2 after the delay,
        and a blacklisting made through either node is found through the other."""
        a, b = await self.edge(0), await self.edge(1)
        net, sender, rcpt = "192.0.2.0/24", f"s{uuid.uuid4().hex[:6]}@x.test", "r@y.test"
        self.assertEqual(await a.greylist.check(net, sender, rcpt, GREY), GREY.delay)
        self.assertEqual((self.server_of(a), self.server_of(b)), (0, 1))
        await sleep(GREY.delay + 0.1)
        self.assertIsNone(await b.greylist.check(net, sender, rcpt, GREY))
        self.assertIsNone(await a.greylist.check(net, sender, rcpt, GREY))

        await a.blacklist.add("198.51.100.1/32", 600, "trap at A")
        await b.blacklist.add("198.51.100.2/32", 600, "trap at B")
        self.assertIsNotNone(await self.eventually(lambda: b.blacklist.lookup("198.51.100.1")))
        self.assertIsNotNone(await self.eventually(lambda: a.blacklist.lookup("198.51.100.2")))
        self.assertEqual((self.server_of(a), self.server_of(b)), (0, 1))

    async def test_node_stops_edge_goes_on_node_rejoins_and_catches_up(self) -> None:
        """Node 2 stopped: edge B's next greylist check and blacklisting succeed through
        node 1 within SWITCH_SECONDS; node 2 rejoins (IST) and has every row written
        while it was away."""
        a, b = await self.edge(0), await self.edge(1)
        await b.blacklist.add("203.0.113.1/32", 600, "before")
        stopped = await threads.deferToThread(_script, "stop-node", "2", timeout=60)
        self.assertEqual(stopped.returncode, 0, stopped.stderr)
        try:
            started = time.monotonic()
            await b.blacklist.add("203.0.113.2/32", 600, "while node 2 is down")
            wait = await b.greylist.check("192.0.2.0/24", "late@x.test", "r@y.test", GREY)
            elapsed = time.monotonic() - started
            self.assertEqual(wait, GREY.delay)
            self.assertLess(elapsed, SWITCH_SECONDS)
            self.assertEqual(self.server_of(b), 0)
            await a.blacklist.add("203.0.113.3/32", 600, "edge A meanwhile")
            self.assertIsNotNone(await a.blacklist.lookup("203.0.113.2"))
        finally:
            rejoined = await threads.deferToThread(_script, "start-node", "2", timeout=120)
        self.assertEqual(rejoined.returncode, 0, rejoined.stderr)

        def on_node_2() -> list[str]:
            engine = create_engine(NODES[1], connect_args={"connect_timeout": 2})
            try:
                with engine.connect() as conn:
                    state = conn.execute(text("SHOW STATUS LIKE 'wsrep_local_state_comment'"))
                    assert state.one()[1] == "Synced"
                    t = a.tables.blacklist
                    return sorted(r[0] for r in conn.execute(select(t.c.network)))
            finally:
                engine.dispose()

        networks = await threads.deferToThread(on_node_2)
        self.assertEqual(networks, ["203.0.113.1/32", "203.0.113.2/32", "203.0.113.3/32"])
        # B stays on node 1 (no flapping back); it still works.
        await b.blacklist.add("203.0.113.4/32", 600, "after the rejoin")
        self.assertEqual(self.server_of(b), 0)
