"""The quarantine list's counts (ArchiveStore.tally, app.py COUNT_CAP and
COUNT_SECONDS; issue 13's benchmark): exact up to the cap, "N or more"
past it, per verdict and per reason; on MariaDB bounded in time, the page
then saying the counts were skipped.  Real stores: SQLite, and MariaDB
with ``require_mariadb`` (skipped locally without a server, failing
under ``MPP_REQUIRE_SERVICES=1``).
"""
from __future__ import annotations

import uuid
from typing import Any

from twisted.trial import unittest

from test_db_stores import require_mariadb
from test_web_console import ROOT_NAME, ConsoleCase, copy
from mppproxy.config.archive import StoreConfig
from mppproxy.store.store import ArchiveStore, Search
from mppproxy.web import app as web_app


class TallyTests(ConsoleCase):
    """The store's tally and the list's words, on SQLite."""

    def test_exact_below_the_cap_and_capped_above(self) -> None:
        """Seven rows: with a cap of 10 exact counts per verdict and reason;
        with a cap of 3 the three newest, marked capped."""
        tally = self.store.tally(Search(), 10)
        assert tally is not None
        self.assertEqual((tally.total, tally.capped), (7, False))
        self.assertEqual(tally.by_verdict, [("reject", 6), ("hold", 1)])
        self.assertEqual(tally.by_reason[0], ("clamav: Eicar-Signature", 6))
        self.assertEqual(self.store.count(Search()), 7)
        tally = self.store.tally(Search(domains=("a.test",)), 3)
        assert tally is not None
        self.assertEqual((tally.total, tally.capped), (3, True))
        # The three newest of a.test: REFA1, REFA2 (hold), REFA3.
        self.assertEqual(dict(tally.by_verdict), {"reject": 2, "hold": 1})
        self.assertIsNotNone(self.store.tally(Search(), 3, seconds=0.000001))  # SQLite: no bound

    async def test_list_says_or_more_past_the_cap(self) -> None:
        """Past COUNT_CAP the list says "N or more matching" and that the
        counts are of the newest N; the bulk box says so too."""
        self.patch(web_app, "COUNT_CAP", 4)
        await self.start()
        root = await self.logged_in(ROOT_NAME)
        page = await root.get("/quarantine")
        self.assertIn("<strong>4</strong> or more matching (the counts are of the newest 4)",
                      page.text)
        self.assertIn("every row matching the search (4 or more)", page.text)
        page = await root.get("/quarantine?domain=b.test")
        self.assertIn("<strong>2</strong> matching", page.text)
        self.assertNotIn("or more", page.text)


class MariaDBTallyTests(unittest.TestCase):
    """The time bound, on MariaDB."""

    def setUp(self) -> None:
        url = require_mariadb()
        self.store = ArchiveStore(StoreConfig(url=url), self.mktemp(),
                                  table_prefix=f"t{uuid.uuid4().hex[:10]}_")
        self.store.open()
        self.addCleanup(self.store.close)
        self.addCleanup(self.store.drop_all)

    def test_time_bound_gives_none_and_the_session_is_reset(self) -> None:
        """A tally the server stops at its bound answers None (not an
        error); the connection's bound is reset: the next unbounded tally
        of the same rows answers."""
        # Enough rows that the scan outlasts the server's timer (3,000 rows
        # sometimes finished before a 1 us bound was noticed).
        copies: list[Any] = [copy(f"T{n:05d}", (f"u{n}@a.test",), f"Row {n}", n / 100.0)
                             for n in range(15_000)]
        self.assertEqual(self.store.add_copies(copies), 15_000)
        search = Search(subject="no such subject anywhere")
        self.assertIsNone(self.store.tally(search, 10_000, seconds=0.000001))
        tally = self.store.tally(search, 10_000)
        assert tally is not None
        self.assertEqual(tally.total, 0)
        tally = self.store.tally(Search(), 10_000, seconds=10.0)
        assert tally is not None
        self.assertEqual((tally.total, tally.capped), (10_000, True))
        for _ in range(5):  # every pooled connection lost its bound
            self.assertIsNotNone(self.store.tally(search, 10_000))
