"""Threshold counters summed over processes and nodes through the state
database (mppproxy/policy/sharedcounters.py, db/ratecounts.py; issue 16
"Shared limits and counters").

Two ``SharedRateCounters`` stand for two processes (two workers, or two
edges) on one real state database: a SQLite file, and MariaDB with a table
prefix of the test's own.  The counters' clock is a ``task.Clock`` the test
moves; their syncs are called by the test (the loop is off), so each step
is deterministic while the SQL is real.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from typing import Any, Optional

from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import TestCase

from mppproxy.config.database import DatabaseConfig
from mppproxy.db import StateDatabase
from mppproxy.db.ratecounts import BUCKET_SECONDS
from mppproxy.policy.base import Facts
from mppproxy.policy.checks.thresholds import ThresholdsCheck
from mppproxy.policy.services import PolicyServices
from mppproxy.policy.sharedcounters import SharedRateCounters
from test_db_stores import drop_tables, require_mariadb

NET = "192.0.2.0/24"


class Base:
    """The cases, run on SQLite and on MariaDB (subclasses)."""

    url: str = ""
    prefix = "mpp_"

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="mpp-shared-counts-")
        self.addCleanup(shutil.rmtree, self.dir, True)  # type: ignore[attr-defined]
        self.db = StateDatabase(DatabaseConfig(url=self.url), self.dir, reactor,
                                table_prefix=self.prefix)
        self.clock = Clock()
        self.clock.advance(1_800_000_000)

    async def start(self) -> None:
        self.assertTrue(await self.db.start())  # type: ignore[attr-defined]
        if self.url:
            self.addCleanup(drop_tables, self.url, self.db)  # type: ignore[attr-defined]
        self.addCleanup(self.db.stop)  # type: ignore[attr-defined]

    def counters(self, database: Optional[Any] = None) -> SharedRateCounters:
        db = self.db if database is None else database
        return SharedRateCounters(self.clock, lambda: db, interval=0)

    async def test_two_processes_see_each_others_counts(self) -> None:
        """Counts written by one process are added to the other's after a sync, both ways; its own are never counted twice."""
        await self.start()
        a, b = self.counters(), self.counters()
        for _ in range(3):
            a.add_message(NET, "default", 120, shared=True)
        self.assertEqual(b.add_message(NET, "default", 120, shared=True), 1)
        await a.sync()
        await b.sync()
        # b sees a's 3; a does not see b's 1 until its next sync.
        self.assertEqual(b.add_message(NET, "default", 120, shared=True), 2 + 3)
        self.assertEqual(a.add_message(NET, "default", 120, shared=True), 4)
        await a.sync()   # writes a's 4th; reads b's 1 (b's 2nd is not written yet)
        await b.sync()   # writes b's 2nd; reads a's 4
        self.assertEqual(a.add_message(NET, "default", 120, shared=True), 5 + 1)
        self.assertEqual(b.add_message(NET, "default", 120, shared=True), 3 + 4)
        # Spam verdicts the same way; another policy and unshared counts apart.
        a.add_spam(NET, "default", 120, shared=True)
        await a.sync()
        await b.sync()
        self.assertEqual(b.spam_count(NET, "default", 120, shared=True), 1)
        self.assertEqual(b.spam_count(NET, "other", 120, shared=True), 0)
        self.assertEqual(b.add_message(NET, "default", 120, shared=False), 4)

    async def test_the_others_counts_leave_the_window(self) -> None:
        """The other process's counts stop counting once the period has passed (bucket-coarse)."""
        await self.start()
        a, b = self.counters(), self.counters()
        for _ in range(5):
            a.add_message(NET, "default", 60, shared=True)
        await a.sync()
        b.add_message(NET, "default", 60, shared=True)
        await b.sync()
        self.assertEqual(b.add_message(NET, "default", 60, shared=True), 2 + 5)
        self.clock.advance(60 + 2 * BUCKET_SECONDS)
        await b.sync()
        self.assertEqual(b.add_message(NET, "default", 60, shared=True), 1)

    async def test_thresholds_check_blacklists_on_the_sum(self) -> None:
        """max_messages is met by the sum: 3 messages at one process and 3 at the other pass a limit of 5 at the sixth (once the second process has counted the client and synced)."""
        await self.start()
        a, b = self.counters(), self.counters()
        listed: list[tuple[str, float, str]] = []

        class Blacklist:
            async def add(self, network: str, seconds: float, reason: str) -> None:
                listed.append((network, seconds, reason))

        settings = type("S", (), {"ipv4_prefix": 24, "ipv6_prefix": 64, "period": 120.0,
                                   "max_messages": 5, "max_spam": 0, "blacklist_seconds": 60.0,
                                   "shared": True})()
        facts = Facts(client_ip="192.0.2.7", helo="h", sender="s@x.example",
                      sender_domain="x.example", recipient="r@example.com",
                      recipient_domain="example.com", policy="default")
        check_a = ThresholdsCheck(settings, PolicyServices(reactor, counters=a,
                                                           blacklist=Blacklist()))
        check_b = ThresholdsCheck(settings, PolicyServices(reactor, counters=b,
                                                           blacklist=Blacklist()))
        for _ in range(3):
            self.assertIsNone((await check_a.check(facts)).action)
        await a.sync()
        # b's first message from the client: b then reads the others' counts.
        self.assertIsNone((await check_b.check(facts)).action)
        await b.sync()
        self.assertIsNone((await check_b.check(facts)).action)   # 2 + 3
        result = await check_b.check(facts)                          # 3 + 3 > 5
        self.assertEqual(result.reasons, ("threshold messages 6 in 120s",))
        self.assertEqual(listed, [(NET, 60.0, "threshold messages 6 in 120s")])

    async def test_a_database_that_fails_leaves_each_process_alone_and_keeps_its_counts(self) -> None:
        """While syncs fail (one warning), counts are this process's and kept; the next good sync writes them."""
        await self.start()
        real = self.db
        failing = True

        class Flaky:
            tables = real.tables
            name = "flaky"
            running = True

            def run(self, fn: Any, *args: Any) -> Any:
                if failing:
                    from twisted.internet import defer
                    return defer.fail(OSError("database away"))
                return real.run(fn, *args)

        a, b = self.counters(Flaky()), self.counters()
        a.add_message(NET, "default", 120, shared=True)
        a.add_message(NET, "default", 120, shared=True)
        with capturedLogs() as events:
            await a.sync()
            await a.sync()
        self.assertEqual([e["log_level"] for e in events], [LogLevel.warn])
        self.assertEqual(a.add_message(NET, "default", 120, shared=True), 3)
        failing = False
        await a.sync()
        # b reads the others' counts of the clients it has counted itself.
        self.assertEqual(b.add_message(NET, "default", 120, shared=True), 1)
        await b.sync()
        self.assertEqual(b.add_message(NET, "default", 120, shared=True), 2 + 3)


class SQLiteTests(Base, TestCase):
    pass


class MariaDBTests(Base, TestCase):

    def setUp(self) -> None:
        self.url = require_mariadb()
        self.prefix = f"t{uuid.uuid4().hex[:8]}_"
        super().setUp()
