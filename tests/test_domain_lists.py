"""Each recipient domain's own allow and block lists (``db/allowlist.py``,
issue 13): the notation of senders and client networks, what the policy
engine makes of an entry (block refuses that recipient at RCPT with 550
5.7.1 naming the domain's administrator; allow as the sender allow list;
the site's blacklists and a domain's block win over its allow), the move
of older allow-list rows, the per-lookup mode, and the same through the
proxy on loopback: a blocked sender is refused for that domain only, and
a removal takes effect within the cache time.

Database tests run on SQLite and on MariaDB (``require_mariadb``: skipped
locally without one, a failure under ``MPP_REQUIRE_SERVICES=1``); the
helpers are test_allowlist.py's (a task.Clock drives the mirror's reload).
"""
from __future__ import annotations

import smtplib
import time
from typing import Any

import pytest
from sqlalchemy import insert
from twisted.internet import threads
from twisted.internet.task import deferLater
from twisted.trial import unittest

from fakes_backend import FakeBackend
from loopback import CLIENT_TIMEOUT, proxy_config, start_proxy, wait_reactor_quiet
from mppproxy.config.database import DatabaseConfig
from mppproxy.db.allowlist import (ALLOW, BLOCK, Decision, add_entry, list_entries,
                                   normalise_entry, open_allow_list)
from mppproxy.results import HardAction, TransactionRecord
from test_allowlist import CACHE, AllowListTests, facts, reactor


# -- the notation (no database) ------------------------------------------------------

@pytest.mark.parametrize("given, kind, stored", [
    ("192.0.2.7", BLOCK, "192.0.2.7/32"),
    ("192.0.2.77/24", BLOCK, "192.0.2.0/24"),
    ("2001:DB8::1/48", BLOCK, "2001:db8::/48"),
    ("::ffff:192.0.2.0/120", BLOCK, "192.0.2.0/24"),
    ("10.0.0.0/8", ALLOW, "10.0.0.0/8"),
    ("Boss@Partner.Example", BLOCK, "boss@partner.example"),
    ("partner.example", ALLOW, "@partner.example"),
    ("*.partner.example", BLOCK, ".partner.example"),
])
def test_entries_are_stored_in_one_form(given: str, kind: str, stored: str) -> None:
    """Networks lose their host bits (an address is its /32 or /128,
    IPv4-mapped IPv6 is IPv4); senders are stored as the allow list does."""
    assert normalise_entry(given, kind) == stored


@pytest.mark.parametrize("given, kind", [
    ("0.0.0.0/0", BLOCK), ("10.0.0.0/7", ALLOW), ("2001::/15", ALLOW), ("postmaster@", BLOCK),
    ("<>", ALLOW), ("", BLOCK), ("a b@x.example", BLOCK), ("x..example", BLOCK),
])
def test_too_broad_or_malformed_entries_are_refused(given: str, kind: str) -> None:
    """/0, an allowed network wider than /8 (/16 for IPv6), a local part in
    any domain, the null sender and what is not a name are refused."""
    with pytest.raises(ValueError):
        normalise_entry(given, kind)


# -- the policy engine ----------------------------------------------------------------

class DomainListTests:
    """Mixed into one TestCase per backend, with test_allowlist's set-up
    and helpers (not its tests)."""

    backend = ""
    setUp = AllowListTests.setUp
    make_db = AllowListTests.make_db
    _drop = AllowListTests._drop
    runtime = AllowListTests.runtime
    admin = AllowListTests.admin
    blocking = AllowListTests.blocking
    until = AllowListTests.until
    reload_by_the_loop = AllowListTests.reload_by_the_loop

    async def test_block_refuses_that_domains_recipient_only(self) -> None:
        """A sender blocked by example.com: its recipients get 550 5.7.1
        naming the domain's administrator (the reference too); another
        domain's recipient and another sender go on as before (greylisted)."""
        db = await self.make_db()
        engine = self.runtime(db).engine
        self.assertTrue(await db.allowlist.add_entry("example.com", "block",
                                                     "boss@partner.example", "anna", "spam"))
        record = TransactionRecord()
        f = facts("u@example.com")
        reply = await engine.on_recipient(f, record)
        assert reply is not None
        self.assertEqual((reply.code, reply.enhanced), (550, "5.7.1"))
        self.assertIn("sender <boss@partner.example> is blocked by the administrator of "
                      "example.com", reply.text)
        self.assertEqual(record.refused_by, "access")
        self.assertEqual((await engine.on_recipient(facts("u@other.example"),
                                                    TransactionRecord())).code, 451)
        self.assertEqual((await engine.on_recipient(facts("u@example.com", "x@partner.example"),
                                                    TransactionRecord())).code, 451)

    async def test_network_entries_block_and_allow(self) -> None:
        """A blocked client network refuses whatever the sender (the null
        sender too); an allowed one passes its recipients like an allowed
        sender (the later checks skipped), most specific entry named."""
        db = await self.make_db()
        engine = self.runtime(db).engine
        await db.allowlist.add_entry("example.com", "block", "198.51.100.0/24")
        await db.allowlist.add_entry("example.com", "allow", "203.0.113.0/24")
        await db.allowlist.add_entry("example.com", "allow", "203.0.113.64/26")
        for sender in ("boss@partner.example", ""):
            reply = await engine.on_recipient(facts("u@example.com", sender, ip="198.51.100.9"),
                                              TransactionRecord())
            self.assertEqual((reply.code, reply.enhanced), (550, "5.7.1"))
            self.assertIn("client 198.51.100.9 is blocked by the administrator", reply.text)
        record = TransactionRecord()
        self.assertIsNone(await engine.on_recipient(facts("u@example.com", ip="203.0.113.70"),
                                                    record))
        self.assertIs(record.recorded[-1].result.action, HardAction.WHITELIST_RECIPIENT)
        self.assertIn("client allowed for example.com (203.0.113.64/26)",
                      record.recorded[-1].result.reasons)
        self.assertTrue(record.allowed_for_all)
        self.assertEqual(await db.allowlist.decide("example.com", "", "203.0.113.1"),
                         Decision(ALLOW, "203.0.113.0/24"))
        self.assertIsNone(await db.allowlist.decide("example.com", "", "192.0.2.1"))

    async def test_what_wins(self) -> None:
        """A domain's block wins over its allow of the same sender and over
        the policy's own whitelist; the policy's blacklist wins over a
        domain's allow (554 from the site's access template)."""
        db = await self.make_db()
        engine = self.runtime(db, access={
            "whitelist_clients": ["192.0.2.0/24"],
            "blacklist_senders": ["bad@partner.example"]}).engine
        await db.allowlist.add_entry("example.com", "allow", "@partner.example")
        await db.allowlist.add_entry("example.com", "block", "boss@partner.example")
        reply = await engine.on_recipient(facts("u@example.com", ip="192.0.2.10"),
                                          TransactionRecord())
        self.assertEqual((reply.code, reply.enhanced), (550, "5.7.1"))
        reply = await engine.on_recipient(facts("u@example.com", "bad@partner.example"),
                                          TransactionRecord())
        self.assertEqual((reply.code, reply.enhanced), (554, "5.7.1"))
        record = TransactionRecord()
        self.assertIsNone(await engine.on_recipient(
            facts("u@example.com", "ok@partner.example", ip="198.51.100.1"), record))
        self.assertTrue(record.allowed_for_all)
        # The lookup of the sender allow list says no for a blocked sender.
        self.assertIsNone(await db.allowlist.lookup("example.com", "boss@partner.example"))

    async def test_removal_by_another_process_within_cache_seconds(self) -> None:
        """A block the console (another process) adds is applied after the
        mirror's next reload (half cache_seconds); its removal likewise."""
        db = await self.make_db()
        engine = self.runtime(db, greylisting={"enabled": False}).engine
        admin = self.admin()
        await self.blocking(admin.add_entry, "example.com", "block", "@partner.example", "anna")
        self.assertIsNone(await engine.on_recipient(facts("u@example.com"), TransactionRecord()))
        await self.reload_by_the_loop(db, CACHE / 2)
        self.assertEqual((await engine.on_recipient(facts("u@example.com"),
                                                    TransactionRecord())).code, 550)
        self.assertTrue(await self.blocking(admin.remove_entry, "example.com", "block",
                                            "partner.example"))
        await self.reload_by_the_loop(db, CACHE / 2)
        self.assertIsNone(await engine.on_recipient(facts("u@example.com"), TransactionRecord()))

    async def test_older_allow_rows_are_moved(self) -> None:
        """Rows an older node wrote to allow_senders become allow entries of
        domain_lists when the tables are made, once."""
        db = await self.make_db()
        t = db.tables.allow_senders
        with db.engine.begin() as conn:
            conn.execute(insert(t).values(domain="example.com", sender="@old.example",
                                          added=1.0, added_by="legacy", note=""))
        admin = self.admin()  # makes the tables: moves the row
        rows = await self.blocking(list_entries, admin.engine, admin.tables)
        self.assertEqual([(r.domain, r.kind, r.entry, r.added_by) for r in rows],
                         [("example.com", "allow", "@old.example", "legacy")])
        self.assertEqual([e.sender for e in await self.blocking(admin.list)], ["@old.example"])
        self.assertEqual(len(await self.blocking(self.admin().entries)), 1)

    async def test_per_lookup_mode_decides_the_same(self) -> None:
        """Past mirror_max_rows each (domain, sender, client) is asked of the
        database: block before allow, networks included."""
        db = await self.make_db()
        store = db.allowlist
        admin = self.admin()
        for kind, entry in ((ALLOW, "@partner.example"), (BLOCK, "boss@partner.example"),
                            (BLOCK, "198.51.100.0/24"), (ALLOW, "203.0.113.0/24")):
            await self.blocking(add_entry, admin.engine, admin.tables, "example.com", kind, entry)
        store.mirror_max_rows = 2
        await store.refresh_mirror()
        self.assertFalse(store.mirrored)
        self.assertEqual(await store.decide("example.com", "boss@partner.example", "192.0.2.1"),
                         Decision(BLOCK, "boss@partner.example"))
        self.assertEqual(await store.decide("example.com", "x@partner.example", "198.51.100.1"),
                         Decision(BLOCK, "198.51.100.0/24"))
        self.assertEqual(await store.decide("example.com", "x@partner.example", "192.0.2.1"),
                         Decision(ALLOW, "@partner.example"))
        self.assertEqual(await store.decide("example.com", "", "203.0.113.9"),
                         Decision(ALLOW, "203.0.113.0/24"))
        self.assertIsNone(await store.decide("other.example", "boss@partner.example",
                                             "198.51.100.1"))


class SqliteDomainListTests(DomainListTests, unittest.TestCase):
    backend = "sqlite"


class MariadbDomainListTests(DomainListTests, unittest.TestCase):
    backend = "mariadb"


# -- through the proxy ----------------------------------------------------------------

class ProxyTests(unittest.TestCase):
    """The in-process proxy on loopback with a fake backend and its own
    state database (SQLite, cache_seconds 1)."""

    timeout = 60

    def setUp(self) -> None:
        wait_reactor_quiet(self)

    async def test_blocked_sender_refused_at_rcpt_for_that_domain_only(self) -> None:
        """The console (another process) blocks boss@partner.example for
        example.com: within cache_seconds the proxy answers 550 5.7.1 to
        RCPT for example.com and relays for other.example in the same
        transaction; after the removal, within cache_seconds, example.com's
        recipient is accepted again."""
        fake = FakeBackend()
        port = fake.start_for(self)
        data = self.mktemp()
        config = proxy_config(data, port, relay_domains=("example.com", "other.example"),
                              policy={"database": {"cache_seconds": 1.0},
                                      "policies": {"default": {}}})
        proxy = start_proxy(self, config)
        admin = open_allow_list(DatabaseConfig(), data)
        self.addCleanup(admin.close)

        def session() -> list[tuple[int, bytes]]:
            with smtplib.SMTP("127.0.0.1", proxy.port, timeout=CLIENT_TIMEOUT) as s:
                s.ehlo("client.test")
                s.mail("boss@partner.example")
                replies = [s.rcpt("u@example.com"), s.rcpt("v@other.example")]
                s.rset()
                return replies

        self.assertEqual([c for c, _ in await threads.deferToThread(session)], [250, 250])
        await threads.deferToThread(admin.add_entry, "example.com", "block",
                                    "boss@partner.example", "anna")
        replies = await self.until(session, lambda r: r[0][0] == 550, 5.0)
        self.assertIn(b"5.7.1 Access denied: sender <boss@partner.example> is blocked by the "
                      b"administrator of example.com", replies[0][1])
        self.assertEqual(replies[1][0], 250)
        await threads.deferToThread(admin.remove_entry, "example.com", "block",
                                    "boss@partner.example")
        await self.until(session, lambda r: r[0][0] == 250, 5.0)

    async def until(self, session: Any, done: Any, seconds: float) -> Any:
        """Sessions until ``done`` holds for the replies (bounded in time)."""
        deadline = time.monotonic() + seconds
        while True:
            replies = await threads.deferToThread(session)
            if done(replies):
                return replies
            if time.monotonic() > deadline:
                self.fail(f"not within {seconds} s: {replies}")
            await deferLater(reactor, 0.1, lambda: None)

