"""The shared state in SQL (``mppproxy.db``): greylist and auto-blacklist
stores, their caches, the purge, and two nodes sharing one database.

Every store test runs twice: against SQLite (a file in a temporary
directory) and against a real MariaDB (``MPP_MARIADB_URL``, default
``mysql+pymysql://test:test@127.0.0.1:3306/test``, started by
``scripts/services/start-mariadb.sh``).  MariaDB tests skip when the server
cannot be reached, and fail instead when ``MPP_REQUIRE_SERVICES=1`` (CI).
Each test uses its own table prefix and drops its tables afterwards, so
runs from several checkouts can share one server.

Time comes from a ``task.Clock`` the test advances; the database work
still runs in the store's real thread pool, under trial's real reactor.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import unittest as stdlib_unittest
import uuid
from pathlib import Path
from typing import Any, Optional

import pytest
from sqlalchemy import create_engine, event, select
from twisted.internet import defer, reactor as _reactor, threads
from twisted.internet.task import Clock, deferLater
from twisted.trial import unittest

from helpers import free_port
from mppproxy.config.load import from_mapping
from mppproxy.db import StateDatabase, StateDatabaseError
from mppproxy.db.blacklist import BlacklistEntry, covering_networks, normalise_network
from mppproxy.db.cache import ExpiringCache
from mppproxy.db.engine import database_url
from mppproxy.db.models import triplet_key
from mppproxy._transitions import TransitionError, unreachable
from mppproxy.db.state import (_CHECKPOINT_MOVES, _DATABASE_MOVES, CheckpointState,
                               DatabaseState)
from mppproxy.config.database import DatabaseConfig
from mppproxy.config.policy import GreylistConfig
from mppproxy.match import parse_ip
from mppproxy.policy.runtime import runtime_for

reactor: Any = _reactor

ROOT = Path(__file__).resolve().parents[1]
NODE = ROOT / "tests" / "db_node.py"
MARIADB_URL = os.environ.get("MPP_MARIADB_URL", "mysql+pymysql://test:test@127.0.0.1:3306/test")
START = 1_700_000_000.0

NET = "192.0.2.0/24"
GREY = GreylistConfig(enabled=True, delay=300.0, retry_window=3600.0, lifetime=86400.0,
                      auto_whitelist_after=0)

_mariadb_problem: Optional[list[Optional[str]]] = None


def mariadb_problem() -> Optional[str]:
    """Why MariaDB cannot be used, or None (asked once per run)."""
    global _mariadb_problem
    if _mariadb_problem is None:
        engine = create_engine(MARIADB_URL, connect_args={"connect_timeout": 3})
        try:
            with engine.connect():
                pass
            _mariadb_problem = [None]
        except Exception as e:  # any reason at all means: no MariaDB here
            _mariadb_problem = [f"MariaDB at {MARIADB_URL} unreachable: {e}"]
        finally:
            engine.dispose()
    return _mariadb_problem[0]


def require_mariadb() -> str:
    problem = mariadb_problem()
    if problem is not None:
        if os.environ.get("MPP_REQUIRE_SERVICES") == "1":
            raise AssertionError(f"required service unavailable: {problem}")
        raise stdlib_unittest.SkipTest(problem)
    return MARIADB_URL


def drop_tables(url: str, db: StateDatabase) -> None:
    """Drop a test's tables (with an engine of its own: ``db`` may be stopped)."""
    engine = create_engine(url)
    try:
        db.tables.metadata.drop_all(engine)
    finally:
        engine.dispose()


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


class StoreTests:
    """Mixed into one TestCase per database backend."""

    backend = ""

    # -- set-up ------------------------------------------------------------

    def setUp(self) -> None:
        self.url = require_mariadb() if self.backend == "mariadb" else ""
        self.data_dir = tempfile.mkdtemp(prefix="mpp-db-")
        self.addCleanup(shutil.rmtree, self.data_dir, True)
        self.prefix = f"t{uuid.uuid4().hex[:10]}_"
        self.clock = Clock()
        self.clock.advance(START)

    async def make_db(self, cache_seconds: float = 0.0, clock: Any = None, start: bool = True,
                      drop: bool = True, **config: Any) -> StateDatabase:
        # The purge only runs when a test asks for it.
        config.setdefault("purge_interval", 1e9)
        db = StateDatabase(DatabaseConfig(url=self.url, cache_seconds=cache_seconds, pool_max=4,
                                          **config),
                           self.data_dir, reactor, clock=clock or self.clock,
                           table_prefix=self.prefix)
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(self._drop(db, drop)))
        if start:
            self.assertTrue(await db.start())
        return db

    async def _drop(self, db: StateDatabase, drop: bool) -> None:
        await db.stop()
        if drop and self.backend == "mariadb":
            await threads.deferToThread(drop_tables, self.url, db)

    def count_statements(self, db: StateDatabase) -> list[str]:
        """Every SQL statement ``db`` sends from now on."""
        sent: list[str] = []

        def before(conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
            sent.append(statement)

        event.listen(db.engine, "before_cursor_execute", before)
        self.addCleanup(event.remove, db.engine, "before_cursor_execute", before)
        return sent

    async def row(self, db: StateDatabase, table: str, **where: Any) -> Any:
        t = getattr(db.tables, table)

        def read(engine: Any) -> Any:
            with engine.connect() as conn:
                q = select(t)
                for k, v in where.items():
                    q = q.where(t.c[k] == v)
                return conn.execute(q).first()

        return await db.run(read)

    async def all_rows(self, db: StateDatabase, table: str) -> list[Any]:
        t = getattr(db.tables, table)

        def read(engine: Any) -> list[Any]:
            with engine.connect() as conn:
                return list(conn.execute(select(t)))

        return await db.run(read)

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    # -- greylisting: RFC 6647 semantics -------------------------------------

    async def test_new_triplet_waits_the_delay_then_passes(self) -> None:
        """A first attempt is deferred for ``delay``; an early retry is told
        the time left; a retry after the delay passes and marks the triplet."""
        db = await self.make_db()
        g = db.greylist
        self.assertEqual(await g.check(NET, "a@example.org", "b@example.com", GREY), 300.0)
        self.advance(100)
        self.assertEqual(await g.check(NET, "a@example.org", "b@example.com", GREY), 200.0)
        self.advance(200)
        self.assertIsNone(await g.check(NET, "a@example.org", "b@example.com", GREY))
        row = await self.row(db, "greylist", id=triplet_key(NET, "a@example.org", "b@example.com"))
        self.assertTrue(row.passed)
        self.assertEqual((row.client_net, row.sender, row.recipient),
                         (NET, "a@example.org", "b@example.com"))
        self.assertEqual(row.first_seen, START)
        self.assertEqual(row.expires, START + 300 + GREY.lifetime)

    async def test_triplets_are_independent(self) -> None:
        """Another sender, recipient or network is a new triplet with its own delay."""
        db = await self.make_db()
        g = db.greylist
        await g.check(NET, "a@example.org", "b@example.com", GREY)
        self.advance(300)
        self.assertIsNone(await g.check(NET, "a@example.org", "b@example.com", GREY))
        self.assertEqual(await g.check(NET, "c@example.org", "b@example.com", GREY), 300.0)
        self.assertEqual(await g.check(NET, "a@example.org", "d@example.com", GREY), 300.0)
        self.assertEqual(await g.check("198.51.100.0/24", "a@example.org", "b@example.com", GREY),
                         300.0)

    async def test_retry_after_the_window_starts_again(self) -> None:
        """A retry later than ``retry_window`` after the first attempt is a
        new first attempt."""
        db = await self.make_db()
        g = db.greylist
        await g.check(NET, "a@example.org", "b@example.com", GREY)
        self.advance(GREY.retry_window + 1)
        self.assertEqual(await g.check(NET, "a@example.org", "b@example.com", GREY), 300.0)
        self.advance(300)
        self.assertIsNone(await g.check(NET, "a@example.org", "b@example.com", GREY))

    async def test_retry_at_the_end_of_the_window_passes(self) -> None:
        """A retry exactly ``retry_window`` after the first attempt still passes."""
        db = await self.make_db()
        await db.greylist.check(NET, "a@example.org", "b@example.com", GREY)
        self.advance(GREY.retry_window)
        self.assertIsNone(await db.greylist.check(NET, "a@example.org", "b@example.com", GREY))

    async def test_passed_triplet_lives_for_lifetime_after_its_last_use(self) -> None:
        """Each use of a passed triplet extends it by ``lifetime``; unused
        for longer, it is greylisted again."""
        db = await self.make_db()
        g = db.greylist
        await g.check(NET, "a@example.org", "b@example.com", GREY)
        self.advance(300)
        self.assertIsNone(await g.check(NET, "a@example.org", "b@example.com", GREY))
        for _ in range(3):
            self.advance(GREY.lifetime - 10)
            self.assertIsNone(await g.check(NET, "a@example.org", "b@example.com", GREY))
        self.advance(GREY.lifetime + 1)
        self.assertEqual(await g.check(NET, "a@example.org", "b@example.com", GREY), 300.0)

    async def test_zero_delay_passes_at_once(self) -> None:
        """With ``delay = 0`` a new triplet passes on its first attempt."""
        db = await self.make_db()
        settings = GreylistConfig(enabled=True, delay=0, auto_whitelist_after=0)
        self.assertIsNone(await db.greylist.check(NET, "a@example.org", "b@example.com", settings))

    async def test_auto_whitelist_after_enough_passed_triplets(self) -> None:
        """A network that passed ``auto_whitelist_after`` distinct triplets
        skips greylisting for new triplets; other networks do not."""
        db = await self.make_db()
        g = db.greylist
        settings = GreylistConfig(enabled=True, delay=300, retry_window=3600, lifetime=86400,
                                  auto_whitelist_after=3)
        for i in range(3):
            self.assertEqual(await g.check(NET, f"s{i}@example.org", "b@example.com", settings), 300)
        self.advance(300)
        for i in range(2):
            self.assertIsNone(await g.check(NET, f"s{i}@example.org", "b@example.com", settings))
        self.assertEqual(await g.check(NET, "new@example.org", "b@example.com", settings), 300)
        self.assertIsNone(await g.check(NET, "s2@example.org", "b@example.com", settings))
        self.assertIsNotNone(await self.row(db, "greylist_whitelist", client_net=NET))
        self.assertIsNone(await g.check(NET, "other@example.org", "x@example.com", settings))
        self.assertEqual(
            await g.check("198.51.100.0/24", "other@example.org", "x@example.com", settings), 300)
        # The same triplet counts once, however often it passes.
        self.assertEqual(len(await self.all_rows(db, "greylist_whitelist")), 1)

    async def test_auto_whitelist_zero_never_whitelists(self) -> None:
        """``auto_whitelist_after = 0`` never whitelists a network."""
        db = await self.make_db()
        g = db.greylist
        for i in range(6):
            await g.check(NET, f"s{i}@example.org", "b@example.com", GREY)
        self.advance(300)
        for i in range(6):
            self.assertIsNone(await g.check(NET, f"s{i}@example.org", "b@example.com", GREY))
        self.assertEqual(await g.check(NET, "new@example.org", "b@example.com", GREY), 300)
        self.assertEqual(await self.all_rows(db, "greylist_whitelist"), [])

    async def test_auto_whitelist_lasts_lifetime_after_last_use(self) -> None:
        """A whitelisted network unused for longer than ``lifetime`` is greylisted again."""
        db = await self.make_db()
        g = db.greylist
        settings = GreylistConfig(enabled=True, delay=300, lifetime=86400, auto_whitelist_after=1)
        await g.check(NET, "a@example.org", "b@example.com", settings)
        self.advance(300)
        self.assertIsNone(await g.check(NET, "a@example.org", "b@example.com", settings))
        self.advance(86000)
        self.assertIsNone(await g.check(NET, "n1@example.org", "b@example.com", settings))
        self.advance(86000)  # within lifetime of the last use, not of the first
        self.assertIsNone(await g.check(NET, "n2@example.org", "b@example.com", settings))
        self.advance(86401)
        self.assertEqual(await g.check(NET, "n3@example.org", "b@example.com", settings), 300)

    async def test_concurrent_first_attempts_of_one_triplet_all_succeed(self) -> None:
        """Several threads recording one new triplet at once neither fail nor
        start it twice."""
        db = await self.make_db()
        results = await defer.gatherResults([
            defer.Deferred.fromCoroutine(db.greylist.check(NET, "a@example.org", "b@example.com",
                                                           GREY))
            for _ in range(8)])
        self.assertEqual(results, [300.0] * 8)
        self.assertEqual(len(await self.all_rows(db, "greylist")), 1)

    # -- greylisting: the cache ----------------------------------------------

    async def test_warm_whitelist_does_not_touch_the_database(self) -> None:
        """Once a network is known whitelisted, its checks are answered from
        memory: no SQL is sent, and they pass even with the database stopped."""
        db = await self.make_db(cache_seconds=60)
        settings = GreylistConfig(enabled=True, delay=300, auto_whitelist_after=1)
        await db.greylist.check(NET, "a@example.org", "b@example.com", settings)
        self.advance(300)
        self.assertIsNone(await db.greylist.check(NET, "a@example.org", "b@example.com", settings))
        sent = self.count_statements(db)
        calls = db.calls
        for i in range(50):
            self.assertIsNone(
                await db.greylist.check(NET, f"n{i}@example.org", "b@example.com", settings))
        self.assertEqual((sent, db.calls), ([], calls))
        await db.stop()
        self.assertIsNone(await db.greylist.check(NET, "late@example.org", "b@example.com",
                                                  settings))

    async def test_cache_asks_again_after_cache_seconds_and_updates_last_seen(self) -> None:
        """A passed triplet is served from memory for ``cache_seconds``; the
        next attempt after that goes to the database and updates last_seen
        (once per cache period, not on every hit)."""
        db = await self.make_db(cache_seconds=60)
        g = db.greylist
        key = triplet_key(NET, "a@example.org", "b@example.com")
        await g.check(NET, "a@example.org", "b@example.com", GREY)
        self.advance(300)
        self.assertIsNone(await g.check(NET, "a@example.org", "b@example.com", GREY))
        jobs = g.batcher.jobs  # (db.calls counts the blacklist mirror's reloads too)
        for _ in range(5):
            self.advance(10)
            self.assertIsNone(await g.check(NET, "a@example.org", "b@example.com", GREY))
        self.assertEqual(g.batcher.jobs, jobs)
        self.assertEqual((await self.row(db, "greylist", id=key)).last_seen, START + 300)
        self.advance(20)
        self.assertIsNone(await g.check(NET, "a@example.org", "b@example.com", GREY))
        self.assertEqual(g.batcher.jobs, jobs + 1)
        self.assertEqual((await self.row(db, "greylist", id=key)).last_seen, START + 370)

    async def test_waiting_triplet_is_answered_from_the_cache(self) -> None:
        """Early retries of a waiting triplet get the time left without a
        database call; the retry after the delay asks the database."""
        db = await self.make_db(cache_seconds=600)
        g = db.greylist
        await g.check(NET, "a@example.org", "b@example.com", GREY)
        jobs = g.batcher.jobs
        self.advance(120)
        self.assertEqual(await g.check(NET, "a@example.org", "b@example.com", GREY), 180.0)
        self.assertEqual(g.batcher.jobs, jobs)
        self.advance(180)
        self.assertIsNone(await g.check(NET, "a@example.org", "b@example.com", GREY))
        self.assertEqual(g.batcher.jobs, jobs + 1)

    async def test_passed_answer_is_not_cached_with_zero_cache_seconds(self) -> None:
        """``cache_seconds = 0`` sends every check to the database."""
        db = await self.make_db(cache_seconds=0)
        await db.greylist.check(NET, "a@example.org", "b@example.com", GREY)
        self.advance(300)
        calls = db.calls
        for _ in range(3):
            await db.greylist.check(NET, "a@example.org", "b@example.com", GREY)
        self.assertEqual(db.calls, calls + 3)

    # -- blacklist -----------------------------------------------------------

    async def test_blacklist_finds_entries_at_any_prefix(self) -> None:
        """An entry at /32, /24, /128, /64, /48 (or any other prefix) lists
        every address inside it and no address outside."""
        db = await self.make_db()
        b = db.blacklist
        for network in ("192.0.2.7/32", "198.51.100.0/24", "10.0.0.0/8",
                        "2001:db8::1/128", "2001:db8:1::/64", "2001:db8:2::/48",
                        "2001:db8:3:4:8::/77"):
            await b.add(network, 3600, f"test {network}")
        cases = {
            "192.0.2.7": "192.0.2.7/32", "192.0.2.8": None,
            "198.51.100.200": "198.51.100.0/24", "198.51.101.1": None,
            "10.255.1.2": "10.0.0.0/8", "11.0.0.1": None,
            "::ffff:192.0.2.7": "192.0.2.7/32",
            "2001:db8::1": "2001:db8::1/128", "2001:db8::2": None,
            "2001:db8:1::abcd": "2001:db8:1::/64", "2001:db8:1:1::1": None,
            "2001:db8:2:ffff::9": "2001:db8:2::/48", "2001:db8:2a::1": None,
            "2001:db8:3:4:f::1": "2001:db8:3:4:8::/77", "2001:db8:3:4:10::1": None,
            "not an address": None,
        }
        for fresh in (True, False):
            for ip, expected in cases.items():
                if fresh:
                    b.clear_cache()  # from the database, not the local listing
                entry = await b.lookup(ip)
                self.assertEqual(entry.network if entry else None, expected, ip)
                if entry:
                    self.assertEqual(entry.reason, f"test {expected}")
                    self.assertEqual(entry.expires, START + 3600)

    async def test_blacklist_add_extends_never_shortens(self) -> None:
        """A shorter listing leaves the longer one (and its reason); a longer
        one extends it and carries its own reason."""
        db = await self.make_db()
        b = db.blacklist
        await b.add("192.0.2.7/32", 1000, "spamtrap a@example.com")
        await b.add("192.0.2.7/32", 10, "threshold messages")
        b.clear_cache()
        entry = await b.lookup("192.0.2.7")
        self.assertEqual((entry.expires, entry.reason), (START + 1000, "spamtrap a@example.com"))
        self.advance(500)
        await b.add("192.0.2.7/32", 5000, "threshold spam")
        b.clear_cache()
        entry = await b.lookup("192.0.2.7")
        self.assertEqual((entry.expires, entry.reason), (START + 5500, "threshold spam"))
        self.assertEqual(len(await self.all_rows(db, "blacklist")), 1)

    async def test_blacklist_entry_expires(self) -> None:
        """An entry is not found after its time, and a new listing after
        that starts afresh."""
        db = await self.make_db(cache_seconds=60)
        b = db.blacklist
        await b.add("2001:db8::/64", 100, "threshold messages")
        self.assertIsNotNone(await b.lookup("2001:db8::5"))
        self.advance(100)
        self.assertIsNone(await b.lookup("2001:db8::5"))  # cache and database
        b.clear_cache()
        self.assertIsNone(await b.lookup("2001:db8::5"))
        await b.add("2001:db8::/64", 50, "spamtrap")
        row = await self.row(db, "blacklist", network="2001:db8::/64")
        self.assertEqual((row.created, row.expires, row.reason), (START + 100, START + 150,
                                                                 "spamtrap"))

    async def test_blacklist_normalises_networks(self) -> None:
        """Host bits are cleared and IPv6 is compressed, as client_key writes it."""
        db = await self.make_db()
        await db.blacklist.add("192.0.2.77/24", 60, "x")
        await db.blacklist.add("2001:0db8:0000::0001/128", 60, "x")
        networks = sorted(r.network for r in await self.all_rows(db, "blacklist"))
        self.assertEqual(networks, ["192.0.2.0/24", "2001:db8::1/128"])

    async def test_concurrent_adds_of_one_network_all_succeed(self) -> None:
        """Several threads listing one network at once all succeed; the
        longest listing wins."""
        db = await self.make_db()
        await defer.gatherResults([
            defer.Deferred.fromCoroutine(db.blacklist.add("203.0.113.9/32", 100 + i, f"r{i}"))
            for i in range(8)])
        rows = await self.all_rows(db, "blacklist")
        self.assertEqual([(r.network, r.expires, r.reason) for r in rows],
                         [("203.0.113.9/32", START + 107, "r7")])

    def per_client(self, db: StateDatabase) -> None:
        """Turn the blacklist mirror off: lookups ask the database per client.
        The allow list's reloads stop too, so ``db.calls`` counts only the
        blacklist's lookups."""
        db.blacklist.stop_mirror()
        db.allowlist.stop_mirror()
        db.blacklist.mirrored_at = None

    async def test_blacklist_cache(self) -> None:
        """Without the mirror: a listing is served from memory until it
        expires, an absence for ``cache_seconds``; a local add is seen at once."""
        db = await self.make_db(cache_seconds=60)
        self.per_client(db)
        b = db.blacklist
        calls = db.calls
        self.assertIsNone(await b.lookup("192.0.2.7"))
        self.assertIsNone(await b.lookup("192.0.2.7"))
        self.assertEqual(db.calls, calls + 1)
        await b.add("192.0.2.7/32", 3600, "spamtrap")
        calls = db.calls
        self.assertEqual((await b.lookup("192.0.2.7")).reason, "spamtrap")
        self.advance(3000)
        self.assertEqual((await b.lookup("192.0.2.7")).reason, "spamtrap")
        self.assertEqual(db.calls, calls)
        self.advance(600)
        self.assertIsNone(await b.lookup("192.0.2.7"))
        self.assertEqual(db.calls, calls + 1)

    async def test_other_writers_entries_show_within_cache_seconds(self) -> None:
        """Another node's listing is seen once this node's cached absence
        (``cache_seconds``) runs out."""
        db = await self.make_db(cache_seconds=30)
        self.per_client(db)
        other = await self.make_db(cache_seconds=30)
        self.assertIsNone(await db.blacklist.lookup("192.0.2.7"))
        await other.blacklist.add("192.0.2.0/24", 3600, "threshold messages")
        self.assertIsNone(await db.blacklist.lookup("192.0.2.7"))
        self.advance(30)
        self.assertEqual((await db.blacklist.lookup("192.0.2.7")).network, "192.0.2.0/24")

    # -- the blacklist mirror ------------------------------------------------

    async def test_mirror_answers_every_lookup_from_memory(self) -> None:
        """Loaded at start: listed and unlisted clients alike are answered
        without a database job; a local add is seen at once."""
        seed = await self.make_db(cache_seconds=0)
        await seed.blacklist.add("198.51.100.0/24", 3600, "threshold messages")
        await seed.blacklist.add("2001:db8::/64", 3600, "spamtrap x@example.com")
        await seed.blacklist.add("203.0.113.5/32", 10, "already over")
        self.advance(20)
        db = await self.make_db(cache_seconds=60, drop=False)
        b = db.blacklist
        self.assertEqual(b.mirrored_at, START + 20)
        jobs = b.batcher.jobs
        self.assertEqual((await b.lookup("198.51.100.77")).network, "198.51.100.0/24")
        self.assertEqual((await b.lookup("2001:db8::1")).reason, "spamtrap x@example.com")
        for client in ("192.0.2.1", "203.0.113.5", "2001:db8:1::1", "::ffff:192.0.2.9"):
            self.assertIsNone(await b.lookup(client), client)
        await b.add("192.0.2.1/32", 600, "spamtrap")
        self.assertEqual((await b.lookup("192.0.2.1")).reason, "spamtrap")
        self.assertEqual(b.batcher.jobs, jobs + 1)  # the add's write only
        # An entry runs out in memory as in the database.
        self.advance(601)
        self.assertIsNone(await b.lookup("192.0.2.1"))

    async def test_mirror_sees_other_nodes_within_cache_seconds(self) -> None:
        """Reloaded every half cache_seconds: another node's entry shows by
        then; a mirror not reloaded for cache_seconds is not trusted for
        absences (the database is asked)."""
        db = await self.make_db(cache_seconds=30)
        other = await self.make_db(cache_seconds=0, drop=False)
        self.assertIsNone(await db.blacklist.lookup("192.0.2.7"))
        await other.blacklist.add("192.0.2.0/24", 3600, "threshold messages")
        self.assertIsNone(await db.blacklist.lookup("192.0.2.7"))
        self.advance(15)  # the reload runs in the pool: wait for it
        await db.blacklist.refresh_mirror()
        self.assertEqual((await db.blacklist.lookup("192.0.2.7")).network, "192.0.2.0/24")
        # No reload for cache_seconds: an absence is asked of the database.
        db.blacklist.stop_mirror()
        await other.blacklist.add("198.51.100.99/32", 3600, "spamtrap")
        self.advance(31)
        jobs = db.blacklist.batcher.jobs
        self.assertEqual((await db.blacklist.lookup("198.51.100.99")).reason, "spamtrap")
        self.assertEqual(db.blacklist.batcher.jobs, jobs + 1)

    async def test_local_add_survives_a_reload_that_missed_it(self) -> None:
        """A reload that began before this node's add reached the database
        keeps the add."""
        db = await self.make_db(cache_seconds=60)
        b = db.blacklist
        b._mirror_loaded([], self.clock.seconds() - 1)  # an old load, empty
        await b.add("192.0.2.7/32", 600, "spamtrap")
        b._mirror_loaded([], self.clock.seconds())  # read before the add committed
        self.assertEqual((await b.lookup("192.0.2.7")).reason, "spamtrap")

    async def test_too_large_a_blacklist_is_asked_per_client(self) -> None:
        """A blacklist with more rows than mirror_max_rows is not mirrored in memory, and each
        client is looked up in the database instead."""
        db = await self.make_db(cache_seconds=60)
        b = db.blacklist
        for i in range(3):
            await b.add(f"192.0.2.{i}/32", 600, "spamtrap")
        b.mirror_max_rows = 2
        await b.refresh_mirror()
        self.assertIsNone(b.mirrored_at)
        jobs = b.batcher.jobs
        self.assertIsNone(await b.lookup("198.51.100.1"))
        self.assertEqual(b.batcher.jobs, jobs + 1)

    async def test_mirror_load_failure_is_logged_and_ages_out(self) -> None:
        """A blacklist mirror that fails to load is logged once per outage, the old mirror is
        kept, and it stops counting as fresh once its age passes the cache time."""
        db = await self.make_db(cache_seconds=30)
        b = db.blacklist
        loaded_at = b.mirrored_at
        from mppproxy.db import blacklist as module

        def broken(*args: Any) -> Any:
            raise OSError("disk on fire")

        self.patch(module, "_load_all", broken)
        events: list[dict] = []
        from twisted.logger import globalLogPublisher
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.advance(16)
        await b.refresh_mirror()
        await b.refresh_mirror()
        warnings = [e for e in events if "blacklist mirror not loaded" in e.get("log_format", "")]
        self.assertEqual(len(warnings), 1)  # once per outage
        self.assertEqual(b.mirrored_at, loaded_at)
        self.assertFalse(b.mirror_fresh(self.clock.seconds() + 15))

    # -- batches (mppproxy/db/batch.py) --------------------------------------

    def gather(self, *coros: Any) -> defer.Deferred:
        """The coroutines' results, started together (one reactor turn)."""
        return defer.gatherResults([defer.Deferred.fromCoroutine(c) for c in coros],
                                   consumeErrors=True)

    async def test_concurrent_checks_share_one_job(self) -> None:
        """Checks that miss the cache together are answered by one database
        job (one transaction), each with its own answer."""
        db = await self.make_db()
        g = db.greylist
        answers = await self.gather(*(g.check(NET, f"s{i}@example.org", "b@example.com", GREY)
                                      for i in range(200)))
        self.assertEqual(answers, [300.0] * 200)
        self.assertEqual((g.batcher.jobs, g.batcher.largest), (1, 200))
        self.assertEqual(len(await self.all_rows(db, "greylist")), 200)
        self.advance(300)
        answers = await self.gather(*(g.check(NET, f"s{i}@example.org", "b@example.com", GREY)
                                      for i in range(200)))
        self.assertEqual(answers, [None] * 200)
        self.assertEqual(g.batcher.jobs, 2)

    async def test_calls_during_a_job_wait_for_the_next_one(self) -> None:
        """A lone call gets a job of its own; calls made while it runs share
        the next job."""
        db = await self.make_db()
        g = db.greylist
        first = defer.Deferred.fromCoroutine(g.check(NET, "a@example.org", "b@example.com", GREY))
        await sleep(0)  # the first job is handed to the pool
        self.assertEqual(g.batcher.jobs, 1)
        later = self.gather(*(g.check(NET, f"s{i}@example.org", "b@example.com", GREY)
                              for i in range(10)))
        self.assertEqual(await first, 300.0)
        self.assertEqual(await later, [300.0] * 10)
        self.assertEqual((g.batcher.jobs, g.batcher.largest), (2, 10))

    async def greylist_story(self, db: StateDatabase, together: bool) -> list[Any]:
        """The same attempts against ``db``, one at a time or as batches
        (each step's attempts together)."""
        g = db.greylist
        aw = GreylistConfig(enabled=True, delay=300, retry_window=3600, lifetime=86400,
                            auto_whitelist_after=2)
        other = "198.51.100.0/24"
        steps = [
            [(NET, "a", GREY), (NET, "b", GREY), (NET, "a", GREY), (other, "a", aw),
             (other, "b", aw), (other, "c", aw), ("203.0.113.0/24", "z", GREY)],
            # 120 s later: early retries, and a zero delay
            [(NET, "a", GREY), (other, "a", aw),
             (NET, "n", GreylistConfig(enabled=True, delay=0, auto_whitelist_after=0))],
            # 300 s after the first: retries pass; the second pass of
            # "other" whitelists it, so its new triplet after it passes too
            [(NET, "a", GREY), (other, "a", aw), (other, "new1", aw), (other, "b", aw),
             (other, "new2", aw), (NET, "b", GREY), (other, "a", aw)],
            # past the retry window: "z" starts again, passed ones live on
            [(NET, "a", GREY), ("203.0.113.0/24", "z", GREY), (other, "new3", aw)],
        ]
        gaps = [120, 180, 3600]
        out: list[Any] = []
        for i, step in enumerate(steps):
            calls = [g.check(net, f"{s}@example.org", "r@example.com", settings)
                     for net, s, settings in step]
            if together:
                out.append(await self.gather(*calls))
            else:
                out.append([await c for c in calls])
            if i < len(gaps):
                self.advance(gaps[i])
        rows = sorted((r.client_net, r.sender, r.first_seen - START, r.last_seen - START,
                       bool(r.passed), r.expires - START)
                      for r in await self.all_rows(db, "greylist"))
        whitelist = sorted((r.client_net, r.last_seen - START, r.expires - START)
                           for r in await self.all_rows(db, "greylist_whitelist"))
        return [out, rows, whitelist]

    async def test_batched_answers_match_one_at_a_time(self) -> None:
        """Attempts answered in batches get the answers, and leave the rows,
        that the same attempts one at a time do: in order within a batch
        (a second attempt of a triplet sees the first; a network
        whitelisted by one attempt is whitelisted for the next)."""
        alone = await self.make_db()
        expected = await self.greylist_story(alone, together=False)
        self.clock = Clock()
        self.clock.advance(START)
        self.prefix = f"t{uuid.uuid4().hex[:10]}_"
        batched = await self.make_db()
        self.assertEqual(await self.greylist_story(batched, together=True), expected)
        self.assertEqual(batched.greylist.batcher.jobs, 4)
        answers = expected[0]
        # Spot checks that the story says what the docstring says.
        self.assertEqual(answers[0], [300.0] * 7)
        self.assertEqual(answers[1], [180.0, 180.0, None])
        self.assertEqual(answers[2], [None, None, 300.0, None, None, None, None])
        self.assertEqual(answers[3], [None, 300.0, None])

    async def test_order_decides_within_a_batch(self) -> None:
        """A new triplet of a network is whitelisted when an attempt before
        it in the same batch whitelisted the network, not when one after it does."""
        aw = GreylistConfig(enabled=True, delay=300, auto_whitelist_after=1)
        for order, expected in (("pass first", [None, None]), ("new first", [300.0, None])):
            self.prefix = f"t{uuid.uuid4().hex[:10]}_"
            db = await self.make_db()
            g = db.greylist
            await g.check(NET, "old@example.org", "r@example.com", aw)
            self.advance(300)
            passing = g.check(NET, "old@example.org", "r@example.com", aw)
            new = g.check(NET, f"new-{order}@example.org", "r@example.com", aw)
            calls = [passing, new] if order == "pass first" else [new, passing]
            answers = await self.gather(*calls)
            self.assertEqual(answers, expected, order)
            self.assertEqual(g.batcher.jobs, 2)

    async def test_a_failing_job_fails_every_caller(self) -> None:
        """When the database fails in the middle of a job, every check of
        that job gets a StateDatabaseError; the next job works again."""
        db = await self.make_db()
        table = db.tables.greylist.name
        trigger = f"{table}_fails"
        # The database itself refuses the batch's INSERT (a trigger).
        if self.backend == "sqlite":
            create = (f"CREATE TRIGGER {trigger} BEFORE INSERT ON {table} "
                      "BEGIN SELECT RAISE(ABORT, 'disk on fire'); END")
        else:
            create = (f"CREATE TRIGGER {trigger} BEFORE INSERT ON {table} FOR EACH ROW "
                      "SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'disk on fire'")

        def ddl(engine: Any, statement: str) -> None:
            with engine.begin() as conn:
                conn.exec_driver_sql(statement)

        await db.run(ddl, create)
        results = await defer.DeferredList(
            [defer.Deferred.fromCoroutine(db.greylist.check(NET, f"s{i}@example.org",
                                                            "b@example.com", GREY))
             for i in range(20)], consumeErrors=True)
        self.assertEqual(db.greylist.batcher.jobs, 1)
        for ok, result in results:
            self.assertFalse(ok)
            result.trap(StateDatabaseError)
            self.assertIn("disk on fire", result.getErrorMessage())
        self.assertEqual(await self.all_rows(db, "greylist"), [])  # rolled back
        await db.run(ddl, f"DROP TRIGGER {trigger}")
        self.assertEqual(await db.greylist.check(NET, "s1@example.org", "b@example.com", GREY),
                         300.0)

    async def test_batch_statements_with_nothing_to_ask(self) -> None:
        """The jobs' SELECT helpers asked about no key send nothing (an
        empty IN () is an error on MySQL) and find nothing; the cursor's
        transaction commits."""
        from mppproxy.db.blacklist import _Sql as BlacklistSql
        from mppproxy.db.engine import cursor_in_transaction
        from mppproxy.db.greylist import _Sql as GreylistSql

        db = await self.make_db()

        def ask(engine: Any) -> list:
            grey, black = GreylistSql(db.tables, engine.dialect), BlacklistSql(db.tables, engine.dialect)
            with cursor_in_transaction(engine) as cur:
                return [grey.rows(cur, []), grey.whitelist(cur, []), grey.count(cur, [], 0.0),
                        black.rows(cur, [])]

        self.assertEqual(await db.run(ask), [[], [], [], []])

    async def test_a_cancelled_caller_leaves_its_batch_alone(self) -> None:
        """A check cancelled while its job runs (a timed-out check) gets
        CancelledError; the others of its batch get their answers."""
        db = await self.make_db()
        calls = [defer.Deferred.fromCoroutine(db.greylist.check(NET, f"s{i}@example.org",
                                                                "b@example.com", GREY))
                 for i in range(3)]
        calls[1].cancel()
        self.failureResultOf(calls[1], defer.CancelledError)
        self.assertEqual([await calls[0], await calls[2]], [300.0, 300.0])
        self.assertEqual(len(await self.all_rows(db, "greylist")), 3)

    async def test_blacklist_adds_and_lookups_in_one_batch(self) -> None:
        """Lookups and adds made together share one job: each add extends
        (never shortens) what is there, each lookup sees the adds before it."""
        db = await self.make_db()
        b = db.blacklist
        await b.add("192.0.2.0/24", 1000, "threshold messages")
        b.clear_cache()
        calls = [b.lookup("192.0.2.9"), b.lookup("198.51.100.7"),
                 b.add("198.51.100.7/32", 500, "spamtrap a"),
                 b.add("198.51.100.7/32", 100, "spamtrap b"),
                 b.add("192.0.2.0/24", 5000, "threshold spam"),
                 b.lookup("2001:db8::1")]
        jobs = b.batcher.jobs
        results = await self.gather(*calls)
        self.assertEqual(b.batcher.jobs, jobs + 1)
        self.assertEqual(results[0], BlacklistEntry("192.0.2.0/24", "threshold messages",
                                                    START + 1000))
        self.assertEqual(results[1:], [None, None, None, None, None])
        rows = sorted((r.network, r.reason, r.expires - START)
                      for r in await self.all_rows(db, "blacklist"))
        self.assertEqual(rows, [("192.0.2.0/24", "threshold spam", 5000.0),
                                ("198.51.100.7/32", "spamtrap a", 500.0)])
        b.clear_cache()
        found = await self.gather(b.lookup("198.51.100.7"), b.lookup("192.0.2.200"),
                                  b.lookup("192.0.3.1"))
        self.assertEqual([e and (e.network, e.reason) for e in found],
                         [("198.51.100.7/32", "spamtrap a"),
                          ("192.0.2.0/24", "threshold spam"), None])

    async def test_blacklist_job_answers_in_order(self) -> None:
        """Within one job a lookup before an add does not see it; one after does."""
        from mppproxy.db.blacklist import _Add, _Lookup

        db = await self.make_db()
        ip = parse_ip("203.0.113.5")
        now = START
        items = [_Lookup(covering_networks(ip), now), _Add("203.0.113.0/24", "x", now, now + 60),
                 _Lookup(covering_networks(ip), now), _Add("203.0.113.0/24", "y", now, now + 30)]
        results = await db.run(db.blacklist._job, items, now)
        listed = BlacklistEntry("203.0.113.0/24", "x", now + 60)
        self.assertEqual(results, [None, listed, listed, listed])

    # -- purge ---------------------------------------------------------------

    async def test_purge_deletes_expired_rows_only(self) -> None:
        """The purge deletes blacklist entries past their time, waiting
        triplets past their window, passed triplets and whitelisted networks
        past their lifetime; everything else stays."""
        db = await self.make_db()
        settings = GreylistConfig(enabled=True, delay=300, retry_window=3600, lifetime=86400,
                                  auto_whitelist_after=1)
        g = db.greylist
        await g.check(NET, "passed@example.org", "b@example.com", settings)
        self.advance(300)
        await g.check(NET, "passed@example.org", "b@example.com", settings)  # whitelists NET
        await g.check("198.51.100.0/24", "waiting@example.org", "b@example.com", settings)
        await db.blacklist.add("192.0.2.7/32", 100, "short")
        await db.blacklist.add("192.0.2.8/32", 100_000, "long")
        self.assertEqual(await db.purge(), {f"{self.prefix}blacklist": 0,
                                            f"{self.prefix}greylist": 0,
                                            f"{self.prefix}greylist_whitelist": 0})
        self.advance(3601)  # waiting triplet's window and the short listing are over
        counts = await db.purge()
        self.assertEqual(counts[f"{self.prefix}blacklist"], 1)
        self.assertEqual(counts[f"{self.prefix}greylist"], 1)
        self.assertEqual(counts[f"{self.prefix}greylist_whitelist"], 0)
        self.assertEqual([r.sender for r in await self.all_rows(db, "greylist")],
                         ["passed@example.org"])
        self.advance(86400)  # the lifetime of the passed triplet and of the whitelist
        counts = await db.purge()
        self.assertEqual(counts, {f"{self.prefix}blacklist": 0, f"{self.prefix}greylist": 1,
                                  f"{self.prefix}greylist_whitelist": 1})
        self.assertEqual([r.network for r in await self.all_rows(db, "blacklist")],
                         ["192.0.2.8/32"])

    async def test_purge_deletes_in_chunks(self) -> None:
        """The purge deletes PURGE_CHUNK rows per transaction (the write
        lock is free between two), until none is left."""
        from mppproxy.db import state as state_module

        self.patch(state_module, "PURGE_CHUNK", 10)
        db = await self.make_db()
        for i in range(25):
            await db.blacklist.add(f"192.0.2.{i}/32", 100, "short")
        await db.blacklist.add("192.0.2.200/32", 100_000, "long")
        self.advance(101)
        sent = self.count_statements(db)
        counts = await db.purge()
        self.assertEqual(counts[f"{self.prefix}blacklist"], 25)
        self.assertEqual(len([q for q in sent if q.lstrip().upper().startswith("DELETE")
                              and "blacklist" in q]), 3)
        self.assertEqual([r.network for r in await self.all_rows(db, "blacklist")],
                         ["192.0.2.200/32"])

    async def test_purge_runs_every_purge_interval(self) -> None:
        """started, the database purges on its own every ``purge_interval``."""
        db = await self.make_db(purge_interval=600)
        await db.blacklist.add("192.0.2.7/32", 100, "short")
        self.advance(599)
        await sleep(0.2)
        self.assertEqual(len(await self.all_rows(db, "blacklist")), 1)
        self.advance(1)
        for _ in range(100):
            if not await self.all_rows(db, "blacklist"):
                break
            await sleep(0.05)
        self.assertEqual(await self.all_rows(db, "blacklist"), [])

    # -- failures ------------------------------------------------------------

    async def test_stopped_database_raises(self) -> None:
        """After stop(), store calls that need the database fail with a
        StateDatabaseError naming it."""
        db = await self.make_db()
        await db.stop()
        with self.assertRaises(StateDatabaseError) as info:
            await db.blacklist.lookup("192.0.2.7")
        self.assertIn("stopped", str(info.exception))
        with self.assertRaises(StateDatabaseError):
            await db.greylist.check(NET, "a@example.org", "b@example.com", GREY)

    # -- two processes -------------------------------------------------------

    async def node(self, *args: str) -> dict[str, Any]:
        """Run tests/db_node.py (another node, its own process) on our database."""
        url = self.url or str(database_url(DatabaseConfig(), self.data_dir))
        proc = await threads.deferToThread(
            subprocess.run, [sys.executable, str(NODE), url, self.data_dir, self.prefix, *args],
            capture_output=True, text=True, timeout=120)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        return json.loads(proc.stdout.strip().splitlines()[-1])

    async def test_two_processes_share_greylist_and_blacklist(self) -> None:
        """Two proxy processes on one database see each other's greylist
        triplets and blacklist entries (cache_seconds = 0)."""
        db = await self.make_db(clock=reactor)
        settings = GreylistConfig(enabled=True, delay=1, auto_whitelist_after=0)
        # Our first attempt; the other node sees our first_seen and lets the retry pass.
        self.assertEqual(await db.greylist.check(NET, "a@example.org", "b@example.com",
                                                 settings), 1)
        await sleep(1.1)
        self.assertEqual(await self.node("greylist", NET, "a@example.org", "b@example.com", "1"),
                         {"wait": None})
        # Its first attempt is a waiting triplet here too.
        first = await self.node("greylist", NET, "c@example.org", "d@example.com", "600")
        self.assertAlmostEqual(first["wait"], 600, delta=1)
        wait = await db.greylist.check(NET, "c@example.org", "d@example.com",
                                       GreylistConfig(enabled=True, delay=600))
        self.assertTrue(0 < wait < 600, wait)
        # Blacklist, both ways.
        await db.blacklist.add("192.0.2.7/32", 600, "spamtrap x@example.com")
        out = await self.node("lookup", "192.0.2.7")
        self.assertEqual(out["entry"][:2], ["192.0.2.7/32", "spamtrap x@example.com"])
        await self.node("add", "2001:db8::/64", "600", "threshold messages")
        entry = await db.blacklist.lookup("2001:db8::77")
        self.assertEqual((entry.network, entry.reason), ("2001:db8::/64", "threshold messages"))

    async def test_two_processes_writing_at_once_do_not_fail(self) -> None:
        """Two processes racing on the same triplets and blacklist entries
        both finish without a database error."""
        db = await self.make_db(clock=reactor)  # creates the tables
        results = await defer.gatherResults([
            defer.Deferred.fromCoroutine(self.node("stress", "40")) for _ in range(2)])
        self.assertEqual(results, [{"done": 40}] * 2)
        # The network is whitelisted after two passed triplets (by either node).
        self.assertGreaterEqual(len(await self.all_rows(db, "greylist")), 2)
        self.assertEqual(len(await self.all_rows(db, "greylist_whitelist")), 1)
        self.assertEqual(len(await self.all_rows(db, "blacklist")), 7)


    async def test_processes_creating_the_tables_at_once(self) -> None:
        """Nodes starting on an empty database at the same moment all create
        (or find) the tables and work."""
        await self.make_db(clock=reactor, start=False)  # only to drop the tables afterwards
        results = await defer.gatherResults([
            defer.Deferred.fromCoroutine(self.node("add", f"192.0.2.{i}/32", "60", "x"))
            for i in range(3)])
        self.assertEqual(sorted(r["added"] for r in results),
                         ["192.0.2.0/32", "192.0.2.1/32", "192.0.2.2/32"])

class SqliteStoreTests(StoreTests, unittest.TestCase):
    backend = "sqlite"

    async def test_sqlite_file_in_data_dir_in_wal_mode(self) -> None:
        """Without a URL the state lives in data_dir/state.sqlite, journal in WAL mode."""
        db = await self.make_db()
        self.assertTrue(os.path.exists(os.path.join(self.data_dir, "state.sqlite")))

        def mode(engine: Any) -> str:
            with engine.connect() as conn:
                return conn.exec_driver_sql("PRAGMA journal_mode").scalar()

        self.assertEqual(await db.run(mode), "wal")

    # -- batch jobs on the reactor thread (database.sqlite_in_reactor) --------

    @staticmethod
    def job_threads(db: StateDatabase) -> list[int]:
        """The thread each greylist job of ``db`` runs in, from now on."""
        import threading
        seen: list[int] = []
        original = db.greylist._job

        def job(engine: Any, items: list, now: float) -> list:
            seen.append(threading.get_ident())
            return original(engine, items, now)

        db.greylist.batcher._job = job
        return seen

    async def test_jobs_run_on_the_reactor_thread_while_the_lock_is_free(self) -> None:
        """With SQLite's write lock free, a store's job runs on the reactor thread at once and
        is counted as such."""
        import threading
        db = await self.make_db()
        self.assertTrue(db.in_reactor)
        seen = self.job_threads(db)
        self.assertEqual(await db.greylist.check(NET, "a@example.org", "b@example.com", GREY), 300)
        self.assertEqual(seen, [threading.get_ident()])
        self.assertEqual((db.jobs_in_reactor, db.jobs_deferred_to_pool), (1, 0))

    async def test_a_job_that_finds_the_lock_taken_goes_to_the_pool(self) -> None:
        """Another process holds SQLite's write lock: the job does not wait
        on the reactor thread (a timer fires meanwhile); the pool waits for
        the lock and the answer comes once the holder commits."""
        import sqlite3
        db = await self.make_db()
        holder = sqlite3.connect(os.path.join(self.data_dir, "state.sqlite"), isolation_level=None,
                                 check_same_thread=False)
        self.addCleanup(holder.close)
        holder.execute("BEGIN IMMEDIATE")
        answer = defer.Deferred.fromCoroutine(
            db.greylist.check(NET, "a@example.org", "b@example.com", GREY))
        ticked = await deferLater(reactor, 0.05, lambda: True)
        self.assertTrue(ticked)
        self.assertFalse(answer.called)
        self.assertEqual(db.jobs_deferred_to_pool, 1)
        holder.execute("COMMIT")
        self.assertEqual(await answer, 300)
        self.assertEqual(len(await self.all_rows(db, "greylist")), 1)

    async def test_jobs_in_the_pool_when_turned_off(self) -> None:
        """With sqlite_in_reactor off, every job runs in the thread pool, never on the reactor
        thread."""
        import threading
        db = await self.make_db(sqlite_in_reactor=False)
        self.assertFalse(db.in_reactor)
        seen = self.job_threads(db)
        await db.greylist.check(NET, "a@example.org", "b@example.com", GREY)
        self.assertEqual(len(seen), 1)
        self.assertNotEqual(seen, [threading.get_ident()])
        self.assertEqual(db.jobs_in_reactor, 0)

    async def test_checkpoints_run_in_the_pool(self) -> None:
        """With jobs on the reactor thread SQLite does not checkpoint at
        commit (wal_autocheckpoint = 0); _checkpoint copies the WAL back."""
        db = await self.make_db()
        for i in range(20):
            await db.greylist.check(NET, f"s{i}@example.org", "b@example.com", GREY)

        def autocheckpoint(engine: Any) -> int:
            raw = engine.raw_connection()
            try:
                return raw.dbapi_connection.execute("PRAGMA wal_autocheckpoint").fetchone()[0]
            finally:
                raw.close()

        self.assertEqual(await db.run(autocheckpoint), 0)
        async def idle() -> None:
            for _ in range(1000):  # at most 10 s
                if db.checkpoint_state not in (CheckpointState.RUNNING, CheckpointState.RETRYING):
                    return
                await deferLater(reactor, 0.01, lambda: None)

        await idle()  # the loop's own checkpoint, if one is running now
        db._checkpoint()
        await idle()
        busy, frames, done = db.last_checkpoint
        self.assertGreater(frames, 0)  # the jobs' commits were still in the WAL
        self.assertEqual((busy, done), (0, frames))

    async def test_sqlite_connection_settings(self) -> None:
        """Statement journals in memory (no temporary file per multi-row
        INSERT); after a write (busy handler off) a read has it back."""
        db = await self.make_db()
        await db.greylist.check(NET, "a@example.org", "b@example.com", GREY)

        def settings(engine: Any) -> tuple[int, int]:
            with engine.connect() as conn:
                return (conn.exec_driver_sql("PRAGMA temp_store").scalar(),
                        conn.exec_driver_sql("PRAGMA busy_timeout").scalar())

        self.assertEqual(await db.run(settings), (2, 5000))  # 2: MEMORY

    async def test_unusable_data_dir_raises_a_clear_error(self) -> None:
        """A data_dir that cannot hold the database: start() says False, and
        each use fails with a StateDatabaseError naming the file."""
        blocker = os.path.join(self.data_dir, "file")
        Path(blocker).write_text("not a directory")
        self.data_dir = os.path.join(blocker, "sub")
        db = await self.make_db(start=False)
        self.assertFalse(await db.start())
        with self.assertRaises(StateDatabaseError) as info:
            await db.greylist.check(NET, "a@example.org", "b@example.com", GREY)
        self.assertIn(os.path.join(self.data_dir, "state.sqlite"), str(info.exception))


class MariadbStoreTests(StoreTests, unittest.TestCase):
    backend = "mariadb"

    async def test_unreachable_server_raises_a_clear_error(self) -> None:
        """A MariaDB that does not answer: start() says False, and each use
        fails with a StateDatabaseError naming the server (not the password)
        and the driver's reason."""
        self.url = f"mysql+pymysql://test:secret@127.0.0.1:{free_port()}/test"
        db = await self.make_db(start=False, drop=False)
        self.assertFalse(await db.start())
        for attempt in (db.blacklist.lookup("192.0.2.7"),
                        db.greylist.check(NET, "a@example.org", "b@example.com", GREY),
                        db.blacklist.add("192.0.2.7/32", 10, "x")):
            with self.assertRaises(StateDatabaseError) as info:
                await attempt
            text = str(info.exception)
            self.assertIn("127.0.0.1", text)
            self.assertIn("Can't connect", text)
            self.assertNotIn("secret", text)

    async def test_long_addresses_fit(self) -> None:
        """Addresses longer than any index allows are keyed by their hash and
        kept (cut to the column) for administrators."""
        db = await self.make_db()
        sender = "s" * 300 + "@" + "d" * 200 + ".example"
        self.assertEqual(await db.greylist.check(NET, sender, "b@example.com", GREY), 300)
        row = await self.row(db, "greylist", id=triplet_key(NET, sender, "b@example.com"))
        self.assertEqual(row.sender, sender[:320])


# -- without a database ---------------------------------------------------------

def test_covering_networks_match_client_key() -> None:
    """The networks a lookup asks for are written exactly as client_key
    (and the blacklist's add) writes them, at every prefix."""
    from mppproxy.policy.counters import client_key

    for address in ("192.0.2.77", "2001:db8:abcd:12:ff::1", "::1", "0.0.0.0"):
        ip = parse_ip(address)
        nets = covering_networks(ip)
        assert len(nets) == ip.max_prefixlen + 1
        for prefix, net in enumerate(nets):
            assert net == client_key(address, prefix, prefix) == normalise_network(net)


def test_normalise_network() -> None:
    """IPv4-mapped IPv6 networks become IPv4; bad input is a ValueError."""
    assert normalise_network("::ffff:192.0.2.7/128") == "192.0.2.7/32"
    assert normalise_network("2001:DB8::/32") == "2001:db8::/32"
    try:
        normalise_network("nonsense")
    except ValueError:
        pass
    else:
        raise AssertionError("nonsense accepted")


def test_expiring_cache_is_bounded_lru() -> None:
    """The cache forgets its least recently used entry past its size, and
    entries past their time."""
    cache: ExpiringCache[str, int] = ExpiringCache(max_size=3)
    for i, key in enumerate("abc"):
        cache.put(key, i, until=100, now=0)
    assert cache.get("a", now=1) == 0  # a is now the most recent
    cache.put("d", 3, until=100, now=1)
    assert cache.get("b", now=1) is None
    assert [cache.get(k, now=1) for k in "acd"] == [0, 2, 3]
    assert cache.get("a", now=100) is None
    cache.put("e", 4, until=5, now=5)
    assert cache.get("e", now=5) is None and len(cache) == 2


def test_database_url() -> None:
    """Empty url: SQLite in data_dir; mysql:// gets PyMySQL and utf8mb4."""
    url = database_url(DatabaseConfig(), "/srv/mpp")
    assert (url.get_backend_name(), url.database) == ("sqlite", "/srv/mpp/state.sqlite")
    url = database_url(DatabaseConfig(url="mysql://u:p@db.example/state"), "/srv/mpp")
    assert url.drivername == "mysql+pymysql" and url.query["charset"] == "utf8mb4"
    url = database_url(DatabaseConfig(url="mariadb+pymysql://u:p@db/s?charset=utf8"), "/x")
    assert url.query["charset"] == "utf8"


def test_construction_does_no_io(tmp_path: Path) -> None:
    """Building a StateDatabase creates no file and starts no thread."""
    import threading

    before = threading.active_count()
    db = StateDatabase(DatabaseConfig(), str(tmp_path / "data"), Clock())
    assert not (tmp_path / "data").exists()
    assert threading.active_count() == before
    assert not db.running


def test_database_tables_cover_every_state() -> None:
    """DatabaseState and CheckpointState each have a row per state, reach every state, and STOPPED is final."""
    assert set(_DATABASE_MOVES) == set(DatabaseState)
    assert unreachable(_DATABASE_MOVES, DatabaseState.NEW) == set()
    assert _DATABASE_MOVES[DatabaseState.STOPPED] == frozenset({DatabaseState.STOPPED})
    assert set(_CHECKPOINT_MOVES) == set(CheckpointState)
    assert unreachable(_CHECKPOINT_MOVES, CheckpointState.IDLE) == set()


def test_checkpoint_failures_logged_once_and_recovery_logged(tmp_path: Path) -> None:
    """A failing checkpoint is logged once however often it fails again, and the first one that works says so."""
    from twisted.logger import capturedLogs

    db = StateDatabase(DatabaseConfig(), str(tmp_path / "data"), Clock())
    db._move_to(DatabaseState.RUNNING)  # the state only: no pool, no I/O
    answers: list[defer.Deferred[Any]] = []
    db.run = lambda fn, *args: answers[-1]  # type: ignore[method-assign]
    with capturedLogs() as events:
        for _ in range(2):
            answers.append(defer.fail(StateDatabaseError("disk I/O error")))
            db._checkpoint()
            assert db.checkpoint_state is CheckpointState.FAILING
        answers.append(defer.succeed((0, 5, 5)))
        db._checkpoint()
    assert db.checkpoint_state is CheckpointState.IDLE
    texts = [e["log_format"] for e in events]
    assert sum("checkpoint failed" in t for t in texts) == 1
    assert sum("checkpoints work again" in t for t in texts) == 1


class DatabaseStateTests(unittest.TestCase):
    async def test_life_and_unexpected_start(self) -> None:
        """start() makes it RUNNING, stop() STOPPED (twice is harmless); starting again is a TransitionError and work fails with StateDatabaseError."""
        data_dir = tempfile.mkdtemp(prefix="mpp-db-")
        self.addCleanup(shutil.rmtree, data_dir, True)
        db = StateDatabase(DatabaseConfig(purge_interval=1e9), data_dir, reactor)
        self.assertIs(db.state, DatabaseState.NEW)
        self.assertTrue(await db.start())
        self.assertIs(db.state, DatabaseState.RUNNING)
        await db.stop()
        await db.stop()
        self.assertIs(db.state, DatabaseState.STOPPED)
        with self.assertRaises(TransitionError):
            db.start()
        with self.assertRaises(StateDatabaseError):
            await db.run(lambda engine: True)


class RuntimeTests(unittest.TestCase):
    async def test_runtime_for_starts_and_stops_the_database(self) -> None:
        """runtime_for makes the state database from [database] and data_dir,
        starts it and hands its stores to the checks; stop() closes it."""
        data_dir = tempfile.mkdtemp(prefix="mpp-db-")
        self.addCleanup(shutil.rmtree, data_dir, True)
        config = from_mapping({"data_dir": data_dir, "database": {"cache_seconds": 5}})
        runtime = runtime_for(config, reactor, "mx.test")
        db = runtime.database
        self.assertIsInstance(db, StateDatabase)
        self.assertTrue(db.running)
        self.assertIs(runtime.services.blacklist, db.blacklist)
        self.assertIs(runtime.services.greylist, db.greylist)
        self.assertIsNone(await db.blacklist.lookup("192.0.2.7"))
        self.assertTrue(os.path.exists(os.path.join(data_dir, "state.sqlite")))
        await runtime.stop()
        self.assertFalse(db.running)

    def test_no_database_without_the_policy_engine(self) -> None:
        """With the policy engine off there is no runtime and no database."""
        config = from_mapping({"policy": {"enabled": False}})
        self.assertIsNone(runtime_for(config, reactor, "mx.test"))


class EngineTests(unittest.TestCase):
    """The policy engine with the SQL stores that runtime_for gives it."""

    def setUp(self) -> None:
        self.data_dir = tempfile.mkdtemp(prefix="mpp-db-")
        self.addCleanup(shutil.rmtree, self.data_dir, True)
        config = from_mapping({
            "data_dir": self.data_dir,
            "database": {"cache_seconds": 0},
            "policies": {"default": {
                "greylisting": {"enabled": True, "delay": 60},
                "spamtrap": {"enabled": True, "patterns": ["^trap@"]},
            }},
        })
        self.runtime = runtime_for(config, reactor, "mx.test")
        self.addCleanup(self.runtime.stop)

    async def ask(self, rcpt: str, ip: str = "192.0.2.10") -> Any:
        from mppproxy.policy.base import Facts
        from mppproxy.results import TransactionRecord

        facts = Facts(client_ip=ip, helo="client.example", sender="s@sender.example",
                      sender_domain="sender.example", recipient=rcpt,
                      recipient_domain=rcpt.rpartition("@")[2])
        return await self.runtime.engine.on_recipient(facts, TransactionRecord())

    async def test_greylisting_and_auto_blacklist_through_the_engine(self) -> None:
        """A new triplet gets 451 4.7.1 from the SQL greylist; a spam trap
        puts the client on the SQL blacklist, which refuses its next mail."""
        reply = await self.ask("user@example.com")
        self.assertEqual((reply.code, reply.enhanced), (451, "4.7.1"))
        reply = await self.ask("trap@example.com")
        self.assertEqual(reply.code // 100, 5)
        self.runtime.database.blacklist.clear_cache()  # from the database, not the cache
        reply = await self.ask("user@example.com")
        self.assertEqual((reply.code, reply.enhanced), (554, "5.7.1"))
        reply = await self.ask("user@example.com", ip="198.51.100.1")  # another client
        self.assertEqual((reply.code, reply.enhanced), (451, "4.7.1"))

    async def test_database_failure_is_a_tempfail(self) -> None:
        """With the database gone every recipient gets a 4xx, never a pass
        (docs/design.md promise 4)."""
        await self.runtime.database.stop()
        reply = await self.ask("user@example.com")
        self.assertEqual(reply.code // 100, 4)
        self.assertEqual(len(self.flushLoggedErrors(StateDatabaseError)), 1)


def test_covering_networks_are_written_as_ipaddress_writes_them() -> None:
    """The fast network texts equal ipaddress's, for random and zero-run
    IPv6 addresses and IPv4 addresses, at every prefix."""
    import ipaddress
    import random

    rng = random.Random(7)
    addresses = ["::", "::1", "1::", "0.0.0.0", "255.255.255.255", "1:0:0:1:0:0:0:1",
                 "1:0:0:0:1:0:0:1", "0:1:2:3:4:5:6:7", "2001:db8::ffff:0:1"]
    for _ in range(300):
        addresses.append(str(ipaddress.IPv4Address(rng.getrandbits(32))))
        addresses.append(str(ipaddress.IPv6Address(rng.getrandbits(128))))
        hextets = [rng.choice([0, 0, 0, 1, 0xFFFF, rng.getrandbits(16)]) for _ in range(8)]
        addresses.append(":".join(f"{h:x}" for h in hextets))
    for address in addresses:
        ip = ipaddress.ip_address(address)
        assert covering_networks(ip) == [
            str(ipaddress.ip_network(f"{ip}/{p}", strict=False))
            for p in range(ip.max_prefixlen + 1)], address


def test_begin_immediate_waits_for_another_writer_in_short_steps(tmp_path: Path, monkeypatch) -> None:
    """SQLite: BEGIN IMMEDIATE is tried again every 0.2 ms while another
    process writes (no busy handler's 1-100 ms sleeps), and gives up with
    "database is locked" after SQLITE_BUSY_TIMEOUT.  Without WAL the busy
    handler is back at once; with WAL it stays off until a read needs it."""
    import sqlite3
    import threading

    from mppproxy.db import engine as db_engine

    busy_ms = int(db_engine.SQLITE_BUSY_TIMEOUT * 1000)
    path = str(tmp_path / "state.sqlite")
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("PRAGMA journal_mode = WAL")
    waiter = sqlite3.connect(path, isolation_level=None)
    waiter.execute(f"PRAGMA busy_timeout = {busy_ms}")

    def busy_timeout() -> int:
        return waiter.execute("PRAGMA busy_timeout").fetchone()[0]

    for info, after in (({}, busy_ms), ({db_engine._WAL: True}, 0)):
        holder.execute("BEGIN IMMEDIATE")
        threading.Timer(0.05, lambda: holder.execute("COMMIT")).start()
        started = time.monotonic()
        db_engine._begin_immediate(waiter, info)
        waited = time.monotonic() - started
        assert 0.04 < waited < 1.0, waited
        assert busy_timeout() == after, info
        waiter.execute("COMMIT")
    db_engine._busy_timeout_on(waiter, info)
    assert busy_timeout() == busy_ms
    holder.execute("BEGIN IMMEDIATE")
    monkeypatch.setattr(db_engine, "SQLITE_BUSY_TIMEOUT", 0.1)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        db_engine._begin_immediate(waiter, {})
    holder.execute("COMMIT")
    holder.close()
    waiter.close()


def test_no_lock_wait_never_waits_for_a_lock(tmp_path: Path) -> None:
    """Under no_lock_wait (the reactor thread), a SQLite transaction that
    meets a lock held elsewhere is rolled back and raises WriteLockBusy at
    once, reading or writing; outside it the same read waits as usual."""
    import sqlite3
    import threading

    from sqlalchemy.engine import URL

    from mppproxy.db.engine import (WriteLockBusy, cursor_in_transaction, make_engine,
                                    no_lock_wait)

    path = str(tmp_path / "state.sqlite")
    engine = make_engine(URL.create("sqlite", database=path), DatabaseConfig())
    with cursor_in_transaction(engine) as cur:
        cur.execute("CREATE TABLE t (x)")
    engine.dispose()  # an open WAL connection would keep the holder out
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    # Exclusive locking: nobody else may even read (or open the database
    # in WAL mode: the connection's own set-up) while it holds the lock.
    holder.execute("PRAGMA locking_mode = EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("INSERT INTO t VALUES (1)")
    try:
        for write in (False, True):
            started = time.monotonic()
            with pytest.raises(WriteLockBusy), no_lock_wait():
                with cursor_in_transaction(engine, write=write) as cur:
                    cur.execute("SELECT x FROM t").fetchall()
            assert time.monotonic() - started < 1.0, write
        # Without it the read waits (busy handler) until the holder lets go.
        # (A WAL connection in exclusive locking mode lets go when it closes.)
        threading.Timer(0.2, lambda: (holder.execute("COMMIT"), holder.close())).start()
        started = time.monotonic()
        with cursor_in_transaction(engine, write=False) as cur:
            rows = cur.execute("SELECT x FROM t").fetchall()
        assert rows == [(1,)]
        assert time.monotonic() - started >= 0.15
    finally:
        holder.close()
        engine.dispose()
