"""The per-recipient-domain sender allow list (``mppproxy/db/allowlist.py``):
its notation, the blocking API the release command uses, the in-memory
mirror, and what the policy engine and the verdict make of an entry.

Every database test runs against SQLite (a file in a temporary directory)
and against a real MariaDB (``require_mariadb`` of ``test_db_stores``:
skipped locally without one, a failure under ``MPP_REQUIRE_SERVICES=1``).
Each test uses its own table prefix and drops its tables afterwards.  Time
comes from a ``task.Clock`` the test advances (the mirror's reload loop
runs on it); the database work runs in the store's real thread pool.
"""
from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from typing import Any, Callable

import pytest
from sqlalchemy import create_engine
from twisted.internet import defer, reactor as _reactor, threads
from twisted.internet.task import Clock, deferLater
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from helpers import free_port
from mppproxy.config.database import DatabaseConfig
from mppproxy.config.load import from_mapping
from mppproxy.db import StateDatabase, StateDatabaseError
from mppproxy.db.allowlist import (AllowEntry, allow_sender, list_allowed, normalise_domain,
                                   normalise_sender, open_allow_list, remove_sender, sender_keys)
from mppproxy.db.engine import make_engine
from mppproxy.policy.base import Facts
from mppproxy.policy.runtime import PolicyRuntime
from mppproxy.results import CheckResult, Disposition, HardAction, TransactionRecord
from mppproxy.scan.engine import ScanReport
from mppproxy.verdict import decide
from test_db_stores import drop_tables, require_mariadb

reactor: Any = _reactor

START = 1_700_000_000.0
CACHE = 30.0


# -- the notation (no database) ------------------------------------------------------

@pytest.mark.parametrize("given, stored", [
    ("Boss@Partner.Example", "boss@partner.example"),
    ("boss@partner.example.", "boss@partner.example"),
    ("@Partner.Example", "@partner.example"),
    ("partner.example", "@partner.example"),
    (".partner.example", ".partner.example"),
    ("*.partner.example", ".partner.example"),
    ("@.partner.example", ".partner.example"),
    ('"a b"@partner.example', '"a b"@partner.example'),
])
def test_sender_patterns_are_stored_in_one_form(given: str, stored: str) -> None:
    """An address, a domain and a subdomain pattern are each stored in one
    lower-case form, whatever notation of the access lists was given."""
    assert normalise_sender(given) == stored


@pytest.mark.parametrize("given", ["", "<>", "postmaster@", "a@.example.org", "a b@example.org",
                                   "user@exa mple.org", "@", "a@b..c", "x" * 400 + "@example.org"])
def test_too_broad_or_malformed_sender_patterns_are_refused(given: str) -> None:
    """The null sender, a local part in any domain, and malformed patterns
    are refused with a ValueError saying why."""
    with pytest.raises(ValueError):
        normalise_sender(given)


def test_recipient_domains_are_exact_names() -> None:
    """A recipient domain is stored lower-case without its trailing dot; a
    pattern or an address is not a domain."""
    assert normalise_domain("Example.COM.") == "example.com"
    for bad in ("", ".example.com", "*.example.com", "u@example.com", "a..b"):
        with pytest.raises(ValueError):
            normalise_domain(bad)


def test_sender_keys_most_specific_first() -> None:
    """A sender is matched by its address, its domain and each parent of
    its domain, in that order; the null sender by nothing."""
    assert sender_keys("Boss@Mail.Partner.Example") == [
        "boss@mail.partner.example", "@mail.partner.example", ".partner.example", ".example"]
    assert sender_keys("") == []
    assert sender_keys("postmaster") == []


# -- with a database -----------------------------------------------------------------

async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


def policy_config(data_dir: str, url: str, **default: Any) -> Any:
    """A configuration whose default policy greylists (so a skipped check
    shows) and refuses the sender ``bad@partner.example``."""
    policy = {"greylisting": {"enabled": True, "delay": 60},
              "access": {"blacklist_senders": ["bad@partner.example"]}}
    policy.update(default)
    return from_mapping({"data_dir": data_dir,
                         "database": {"url": url, "cache_seconds": CACHE},
                         "policies": {"default": policy}})


def facts(rcpt: str, sender: str = "boss@partner.example", ip: str = "192.0.2.10") -> Facts:
    return Facts(client_ip=ip, helo="mail.partner.example", sender=sender,
                 sender_domain=sender.rpartition("@")[2].lower(), recipient=rcpt,
                 recipient_domain=rcpt.rpartition("@")[2].lower())


class AllowListTests:
    """Mixed into one TestCase per database backend."""

    backend = ""

    def setUp(self) -> None:
        self.url = require_mariadb() if self.backend == "mariadb" else ""
        self.data_dir = tempfile.mkdtemp(prefix="mpp-allow-")
        self.addCleanup(shutil.rmtree, self.data_dir, True)
        self.prefix = f"a{uuid.uuid4().hex[:10]}_"
        self.clock = Clock()
        self.clock.advance(START)
        self.dbs: list[StateDatabase] = []
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    async def make_db(self, cache_seconds: float = CACHE, drop: bool = True) -> StateDatabase:
        db = StateDatabase(DatabaseConfig(url=self.url, cache_seconds=cache_seconds, pool_max=4,
                                          purge_interval=1e9),
                           self.data_dir, reactor, clock=self.clock, table_prefix=self.prefix)
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(self._drop(db, drop)))
        self.assertTrue(await db.start())
        self.dbs.append(db)
        return db

    async def _drop(self, db: StateDatabase, drop: bool) -> None:
        await db.stop()
        if drop and self.backend == "mariadb":
            await threads.deferToThread(drop_tables, self.url, db)

    def runtime(self, db: StateDatabase, **default: Any) -> PolicyRuntime:
        runtime = PolicyRuntime(policy_config(self.data_dir, self.url, **default), reactor,
                                "mx.test", database=db)
        # Stops the database too; make_db's cleanup then drops the tables.
        self.addCleanup(runtime.stop)
        return runtime

    def admin(self) -> Any:
        """The release command's view: a blocking handle of its own."""
        admin = open_allow_list(DatabaseConfig(url=self.url), self.data_dir, self.prefix)
        self.addCleanup(admin.close)
        return admin

    async def blocking(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn`` in a thread, as another process would run it (never on the reactor)."""
        return await threads.deferToThread(fn, *args)

    async def until(self, done: Callable[[], bool], what: str) -> None:
        """Wait (real time, bounded) for the mirror's reload in the pool."""
        deadline = time.monotonic() + 10
        while not done():
            if time.monotonic() > deadline:
                self.fail(f"timed out waiting for {what}")
            await sleep(0.01)

    async def reload_by_the_loop(self, db: StateDatabase, seconds: float) -> None:
        """Advance the clock ``seconds``; wait for the reload loop's load.
        Every node's loads in flight end first: the clock is shared, and a
        loop whose last load is still running schedules its next one only
        when that ends."""
        await self.until(lambda: not any(d.allowlist.loading for d in self.dbs),
                         "the loads in flight")
        target = self.clock.seconds() + seconds
        self.clock.advance(seconds)
        await self.until(lambda: (db.allowlist.mirrored_at or 0) >= target, "the mirror's reload")

    # -- the blocking API ------------------------------------------------------

    async def test_blocking_api_adds_lists_and_removes(self) -> None:
        """allow_sender is True for a new entry and False for one already
        there (kept as the first adder wrote it); list_allowed and
        remove_sender see the same rows, through open_allow_list without
        a reactor."""
        admin = self.admin()
        self.assertTrue(await self.blocking(admin.allow, "Example.com", "Boss@Partner.Example",
                                            "alice", "released Q1"))
        self.assertFalse(await self.blocking(admin.allow, "example.com", "boss@partner.example",
                                             "bob", "again"))
        self.assertTrue(await self.blocking(admin.allow, "example.com", ".partner.example", "bob"))
        self.assertTrue(await self.blocking(admin.allow, "other.example", "@partner.example"))
        rows = await self.blocking(admin.list, "example.com")
        self.assertEqual([(r.domain, r.sender, r.added_by, r.note) for r in rows],
                         [("example.com", ".partner.example", "bob", ""),
                          ("example.com", "boss@partner.example", "alice", "released Q1")])
        self.assertIsInstance(rows[0], AllowEntry)
        self.assertEqual(len(await self.blocking(list_allowed, admin.engine, admin.tables)), 3)
        self.assertTrue(await self.blocking(remove_sender, admin.engine, admin.tables,
                                            "example.com", "BOSS@partner.example"))
        self.assertFalse(await self.blocking(admin.remove, "example.com", "boss@partner.example"))
        self.assertEqual([r.sender for r in await self.blocking(admin.list)],
                         [".partner.example", "@partner.example"])
        with self.assertRaises(ValueError):
            await self.blocking(admin.allow, "example.com", "postmaster@")

    async def test_two_releases_at_once_add_one_entry(self) -> None:
        """Two administrators allowing the same sender at the same moment,
        each with a connection of its own: one hears "new", the other "already
        there", and there is one row."""
        one, two = self.admin(), self.admin()
        answers = await defer.gatherResults([
            threads.deferToThread(allow_sender, one.engine, one.tables, "example.com",
                                  "boss@partner.example", "alice"),
            threads.deferToThread(allow_sender, two.engine, two.tables, "example.com",
                                  "boss@partner.example", "bob")])
        self.assertEqual(sorted(answers), [False, True])
        self.assertEqual(len(await self.blocking(one.list)), 1)

    # -- the mirror and the policy engine ------------------------------------------

    async def test_release_command_entry_reaches_the_engine_within_cache_seconds(self) -> None:
        """An entry the release command writes is used by a running node's
        access check after its next reload (half cache_seconds), not before:
        the allowed recipient then skips greylisting, another domain's
        recipient does not."""
        db = await self.make_db()
        engine = self.runtime(db).engine
        self.assertEqual((await engine.on_recipient(facts("u1@example.com"),
                                                    TransactionRecord())).code, 451)
        await self.blocking(self.admin().allow, "example.com", "boss@partner.example", "alice")
        # Not yet: the mirror answers from memory until its reload.
        self.assertEqual((await engine.on_recipient(facts("u2@example.com"),
                                                    TransactionRecord())).code, 451)
        await self.reload_by_the_loop(db, CACHE / 2)
        calls = db.calls
        record = TransactionRecord()
        self.assertIsNone(await engine.on_recipient(facts("u3@example.com"), record))
        # Answered from memory: nothing asked of the database.
        self.assertEqual(db.calls, calls)
        self.assertEqual(record.recorded[-1].check, "access")
        self.assertIs(record.recorded[-1].result.action, HardAction.WHITELIST_RECIPIENT)
        self.assertIn("sender allowed for example.com (boss@partner.example)",
                      record.recorded[-1].result.reasons)
        self.assertEqual(record.allowed_recipients, {"u3@example.com"})
        # Another recipient domain, or another sender, is greylisted as before.
        self.assertEqual((await engine.on_recipient(facts("u3@other.example"),
                                                    TransactionRecord())).code, 451)
        self.assertEqual((await engine.on_recipient(
            facts("u3@example.com", sender="x@partner.example"), TransactionRecord())).code, 451)

    async def test_another_node_sees_an_add_and_a_removal(self) -> None:
        """An entry added through one node's store is used by that node at
        once and by a second node on the same database after its reload; a
        removal likewise."""
        one = await self.make_db()
        two = await self.make_db(drop=False)
        engine_one, engine_two = self.runtime(one).engine, self.runtime(two).engine
        self.assertTrue(await one.allowlist.add("example.com", "@partner.example", "alice", "FP"))
        self.assertIsNone(await engine_one.on_recipient(facts("u@example.com"), TransactionRecord()))
        self.assertEqual((await engine_two.on_recipient(facts("u@example.com"),
                                                        TransactionRecord())).code, 451)
        await self.reload_by_the_loop(two, CACHE / 2)
        self.assertIsNone(await engine_two.on_recipient(facts("v@example.com"), TransactionRecord()))
        self.assertEqual([(e.sender, e.added_by, e.note) for e in await two.allowlist.entries()],
                         [("@partner.example", "alice", "FP")])
        self.assertTrue(await two.allowlist.remove("example.com", "@partner.example"))
        self.assertEqual((await engine_two.on_recipient(facts("w@example.com"),
                                                        TransactionRecord())).code, 451)
        await self.reload_by_the_loop(one, CACHE / 2)
        self.assertEqual((await engine_one.on_recipient(facts("x@example.com"),
                                                        TransactionRecord())).code, 451)

    async def test_subdomain_pattern_allows_subdomains_only(self) -> None:
        """``.partner.example`` allows senders of its subdomains, not of
        partner.example itself; the recipient domain must match exactly."""
        db = await self.make_db()
        await db.allowlist.add("example.com", ".partner.example")
        store = db.allowlist
        self.assertEqual(await store.lookup("example.com", "a@mail.partner.example"),
                         ".partner.example")
        self.assertIsNone(await store.lookup("example.com", "a@partner.example"))
        self.assertIsNone(await store.lookup("sub.example.com", "a@mail.partner.example"))
        self.assertIsNone(await store.lookup("example.com", ""))

    # -- the verdict ----------------------------------------------------------------

    async def transaction(self, engine: Any, rcpts: list[str],
                          sender: str = "boss@partner.example") -> TransactionRecord:
        """One transaction's recipients through the engine (all let through)."""
        record = TransactionRecord()
        for rcpt in rcpts:
            self.assertIsNone(await engine.on_recipient(facts(rcpt, sender), record), rcpt)
        return record

    async def test_verdict_relays_high_score_only_when_every_recipient_allows(self) -> None:
        """A message whose scanners scored far over the reject threshold is
        relayed when every recipient's domain allows the sender, and
        refused when one recipient's domain does not; a virus is refused
        either way."""
        db = await self.make_db()
        runtime = self.runtime(db, greylisting={"enabled": False})
        engine = runtime.engine
        scoring = runtime.config.policies["default"].scoring
        await db.allowlist.add("example.com", "boss@partner.example")
        await db.allowlist.add("example.org", "@partner.example")

        record = await self.transaction(engine, ["a@example.com", "b@example.org", "a@example.com"])
        self.assertTrue(record.allowed_for_all)
        self.assertFalse(record.whitelisted)
        record.score += 50  # what the scanners found
        verdict = decide(record, scoring)
        self.assertEqual((verdict.action, verdict.reasons), (Disposition.RELAY, ("sender allowed",)))

        record = await self.transaction(engine, ["a@example.com", "c@third.example"])
        self.assertFalse(record.allowed_for_all)
        record.score += 50
        self.assertIs(decide(record, scoring).action, Disposition.REJECT)

        record = await self.transaction(engine, ["a@example.com"])
        virus = CheckResult(reasons=("Eicar-Test-Signature",), action=HardAction.REJECT,
                            template="virus")
        report = ScanReport(hard=("clamd", virus), hard_hits=[("clamd", virus)])
        verdict = decide(record, scoring, report)
        self.assertIs(verdict.action, Disposition.REJECT)
        self.assertEqual(verdict.template, "virus")

    async def test_config_whitelisted_recipient_does_not_whitelist_the_message(self) -> None:
        """A recipient of the policy's own whitelist_recipients still skips
        only its own checks: with it, a message whose other recipient is
        allowed by the database is scored as usual (the config lists keep
        their meaning)."""
        db = await self.make_db()
        runtime = self.runtime(db, access={"whitelist_recipients": ["postmaster@example.net"]})
        await db.allowlist.add("example.com", "boss@partner.example")
        record = await self.transaction(runtime.engine, ["a@example.com", "postmaster@example.net"])
        self.assertFalse(record.allowed_for_all)
        record.score += 50
        self.assertIs(decide(record, runtime.config.policies["default"].scoring).action,
                      Disposition.REJECT)

    async def test_blacklists_win_over_the_allow_list(self) -> None:
        """A sender on the policy's blacklist is refused with 554 5.7.1 even
        when allowed; an auto-blacklisted client gets no allow-list pass and
        is refused by the blacklist check."""
        db = await self.make_db()
        engine = self.runtime(db).engine
        await db.allowlist.add("example.com", "@partner.example")
        reply = await engine.on_recipient(facts("a@example.com", "bad@partner.example"),
                                          TransactionRecord())
        self.assertEqual((reply.code, reply.enhanced), (554, "5.7.1"))
        await db.blacklist.add("198.51.100.7/32", 3600, "spamtrap trap@example.com")
        record = TransactionRecord()
        reply = await engine.on_recipient(facts("a@example.com", ip="198.51.100.7"), record)
        self.assertEqual((reply.code, reply.enhanced), (554, "5.7.1"))
        self.assertEqual(record.refused_by, "blacklist")
        self.assertFalse(record.allowed_for_all)

    # -- failures and bounds ---------------------------------------------------------

    def break_database(self, db: StateDatabase) -> Any:
        """Point ``db`` at a database that cannot be reached (a closed port,
        or a SQLite file in a directory that does not exist); returns the
        working engine to put back."""
        good = db.engine
        if self.backend == "mariadb":
            url = f"mysql+pymysql://test:test@127.0.0.1:{free_port()}/test"
        else:
            url = f"sqlite:///{self.data_dir}/missing/dir/state.sqlite"
        from sqlalchemy.engine import make_url
        db.engine = make_engine(make_url(url), db.config)
        self.addCleanup(db.engine.dispose)
        return good

    async def test_database_down_the_last_mirror_keeps_serving(self) -> None:
        """With the database unreachable, reloads fail (logged once per
        outage) and the last mirror keeps allowing the sender without
        asking the database; once it answers again the reload is logged
        and picks up changes made meanwhile."""
        db = await self.make_db()
        engine = self.runtime(db, greylisting={"enabled": False}).engine
        await db.allowlist.add("example.com", "boss@partner.example")
        good = self.break_database(db)
        loaded_at = db.allowlist.mirrored_at
        for _ in range(3):
            self.clock.advance(CACHE / 2)
            await db.allowlist.refresh_mirror()
        self.assertEqual(db.allowlist.mirrored_at, loaded_at)
        warnings = [e for e in self.events
                    if "allow-list mirror not loaded" in e.get("log_format", "")]
        self.assertEqual(len(warnings), 1)
        record = TransactionRecord()
        self.assertIsNone(await engine.on_recipient(facts("a@example.com"), record))
        self.assertTrue(record.allowed_for_all)
        # The auto-blacklist's own mirror is stale by now: its absence could
        # not be confirmed, which is logged, and the allowed sender passes.
        self.assertTrue(any("auto-blacklist not consulted" in e.get("log_format", "")
                            for e in self.events))
        # An add that cannot be written is not kept.
        with self.assertRaises(StateDatabaseError):
            await db.allowlist.add("example.com", "other@partner.example")
        self.assertIsNone(await db.allowlist.lookup("example.com", "other@partner.example"))
        db.engine = good
        await self.blocking(self.admin().remove, "example.com", "boss@partner.example")
        await self.reload_by_the_loop(db, CACHE / 2)
        self.assertTrue(any("allow-list mirror loaded again" in e.get("log_format", "")
                            for e in self.events))
        self.assertIsNone(await db.allowlist.lookup("example.com", "boss@partner.example"))

    async def test_local_add_survives_a_reload_that_missed_it(self) -> None:
        """A reload that began before this node's add was written keeps the
        add; the first reload that began after it holds it from the rows."""
        db = await self.make_db()
        store = db.allowlist
        before = store._loads_started
        await store.add("example.com", "boss@partner.example")
        store._mirror_loaded((0, []), before, self.clock.seconds())  # read before the write
        self.assertEqual(await store.lookup("example.com", "boss@partner.example"),
                         "boss@partner.example")
        await store.refresh_mirror()
        self.assertEqual(store._local, {})
        self.assertEqual(await store.lookup("example.com", "boss@partner.example"),
                         "boss@partner.example")

    async def test_too_large_a_list_is_asked_per_lookup(self) -> None:
        """Past mirror_max_rows the list is not held in memory: a lookup
        asks the database (its answer kept for cache_seconds), and the
        mirror comes back once the rows are few enough again."""
        db = await self.make_db()
        store = db.allowlist
        admin = self.admin()
        for i in range(3):
            await self.blocking(admin.allow, "example.com", f"s{i}@partner.example")
        store.mirror_max_rows = 2
        await store.refresh_mirror()
        self.assertFalse(store.mirrored)
        jobs = store.batcher.jobs
        self.assertEqual(await store.lookup("example.com", "S1@partner.example"),
                         "s1@partner.example")
        self.assertIsNone(await store.lookup("example.com", "nobody@partner.example"))
        self.assertEqual(store.batcher.jobs, jobs + 2)
        # Cached for cache_seconds: no new job; then asked again.
        await self.blocking(admin.allow, "example.com", "@partner.example")
        self.assertIsNone(await store.lookup("example.com", "nobody@partner.example"))
        self.assertEqual(store.batcher.jobs, jobs + 2)
        self.clock.advance(CACHE)
        self.assertEqual(await store.lookup("example.com", "nobody@partner.example"),
                         "@partner.example")
        self.assertTrue(any("asked per sender" in e.get("log_format", "") for e in self.events))
        for i in range(3):
            await self.blocking(admin.remove, "example.com", f"s{i}@partner.example")
        await store.refresh_mirror()
        self.assertTrue(store.mirrored)
        jobs = store.batcher.jobs
        self.assertEqual(await store.lookup("example.com", "any@partner.example"),
                         "@partner.example")
        self.assertEqual(store.batcher.jobs, jobs)

    async def test_zero_cache_seconds_asks_every_time(self) -> None:
        """With cache_seconds = 0 there is no mirror: each lookup asks the
        database and sees another writer's entry at once."""
        db = await self.make_db(cache_seconds=0)
        store = db.allowlist
        self.assertFalse(store.mirrored)
        self.assertIsNone(await store.lookup("example.com", "boss@partner.example"))
        await self.blocking(self.admin().allow, "example.com", "boss@partner.example")
        self.assertEqual(await store.lookup("example.com", "boss@partner.example"),
                         "boss@partner.example")
        self.assertEqual(store.batcher.jobs, 2)


class SqliteAllowListTests(AllowListTests, unittest.TestCase):
    backend = "sqlite"


class MariadbAllowListTests(AllowListTests, unittest.TestCase):
    backend = "mariadb"


def test_construction_creates_no_table(tmp_path: Any) -> None:
    """Building a StateDatabase (and its allow-list store) does no I/O: no
    database file appears until it starts."""
    db = StateDatabase(DatabaseConfig(), str(tmp_path / "data"), Clock())
    assert not (tmp_path / "data").exists()
    assert db.allowlist.mirrored and len(db.allowlist) == 0
    assert db.allowlist.mirrored_at is None


def test_open_allow_list_creates_the_table_for_a_fresh_node(tmp_path: Any) -> None:
    """The release command can run before any proxy made the database: the
    data directory, the SQLite file and the table are created."""
    with open_allow_list(DatabaseConfig(), str(tmp_path / "fresh")) as admin:
        assert admin.allow("example.com", "boss@partner.example", "alice")
        assert [e.sender for e in admin.list()] == ["boss@partner.example"]
    assert (tmp_path / "fresh" / "state.sqlite").exists()
    engine = create_engine(f"sqlite:///{tmp_path / 'fresh' / 'state.sqlite'}")
    try:
        from mppproxy.db.models import StateTables
        assert [e.domain for e in list_allowed(engine, StateTables())] == ["example.com"]
    finally:
        engine.dispose()

