"""The archive writer (mppproxy/archive/writer.py): copies from a real
durable queue into the real store, on SQLite and on MariaDB.

Every test runs twice, against SQLite (a file in a temporary directory)
and against MariaDB (``MPP_MARIADB_URL``; skipped when unreachable, failed
under ``MPP_REQUIRE_SERVICES=1``), each MariaDB test with its own table
prefix, dropped afterwards.  A database that goes away is a real one:
SQLite with its write lock held by another connection, or a parent
directory that cannot be made; MariaDB behind a TCP relay on loopback that
the test closes (connections cut, port refused) and opens again.
"""
from __future__ import annotations

import errno
import os
import shutil
import sqlite3
import tempfile
import threading
import time
import uuid
from typing import Any, Awaitable, Callable, Optional, Union

from sqlalchemy.engine import make_url
from twisted.internet import defer, reactor as _reactor
from twisted.internet.task import deferLater
from twisted.logger import globalLogPublisher
from twisted.protocols import portforward
from twisted.trial import unittest

from helpers import free_port
from test_db_stores import require_mariadb
from mppproxy.archive.state import CopyState, encode_state
from mppproxy.archive.copies import metadata_for
from mppproxy.archive.writer import CopyWriter, copy_of, state_json
from mppproxy.config.archive import StoreConfig
from mppproxy.db import engine as db_engine
from mppproxy.results import Disposition
from mppproxy.spool.queue import DurableQueue
from mppproxy.store.store import ArchiveStore, Search

reactor: Any = _reactor

RECEIVED = 1_700_000_000.5
MESSAGE = b"Received: from edge\r\nSubject: held copy\r\n\r\nThe body.\r\n"
# Bounds every wait: the writer's own retries are 0.1 s apart.
WAIT = 20.0


def state(queue_id: str, recipients: tuple[str, ...] = ("bob@example.com", "eve@example.net"),
          node: str = "edge-1") -> CopyState:
    return CopyState(node=node, queue_id=queue_id, received=RECEIVED, client="192.0.2.7",
                     helo="mail.example.org", tls=True, sender="alice@example.org",
                     recipients=recipients, policy="default", verdict=Disposition.QUARANTINE,
                     disposition=Disposition.QUARANTINE, score=7.5,
                     reasons=("listed in zen",))


def events_of(case: unittest.TestCase) -> list[dict[str, Any]]:
    """Every log event from now to the end of the test."""
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    case.addCleanup(globalLogPublisher.removeObserver, events.append)
    return events


def said(events: list[dict[str, Any]], start: str) -> list[dict[str, Any]]:
    return [e for e in events if (e.get("log_format") or "").startswith(start)]


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


async def wait_until(predicate: Callable[[], Union[bool, Awaitable[bool]]], what: str,
                     timeout: float = WAIT) -> None:
    """Poll ``predicate`` (on the reactor thread) until it holds; bounded."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if not isinstance(value, bool):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        await sleep(0.05)


class Relay(portforward.ProxyFactory):
    """A TCP relay on loopback to the database that a test can close
    (open connections cut, new ones refused) and open again."""

    def __init__(self, host: str, port: int):
        super().__init__(host, port)
        self.listen_port = free_port()
        self.listening: Any = None
        self.open_connections: list[Any] = []

    def buildProtocol(self, addr: Any) -> Any:
        p = super().buildProtocol(addr)
        self.open_connections.append(p)
        return p

    def open(self) -> None:
        self.listening = reactor.listenTCP(self.listen_port, self, interface="127.0.0.1")

    async def close(self) -> None:
        if self.listening is not None:
            await self.listening.stopListening()
            self.listening = None
        for p in self.open_connections:
            if p.transport is not None:
                p.transport.abortConnection()
            if p.peer is not None and p.peer.transport is not None:
                p.peer.transport.abortConnection()
        self.open_connections = []


class WriterTests:
    """Mixed into one TestCase per database."""

    backend = ""

    def setUp(self) -> None:
        self.url = require_mariadb() if self.backend == "mariadb" else ""
        self.data_dir = tempfile.mkdtemp(prefix="mpp-writer-")
        self.addCleanup(shutil.rmtree, self.data_dir, True)
        self.prefix = f"w{uuid.uuid4().hex[:10]}_"
        self.queue = DurableQueue(os.path.join(self.data_dir, "queue"))
        self.queue.open()
        self.addCleanup(self.queue.close)
        self.events = events_of(self)

    # -- helpers ------------------------------------------------------------------

    def make_store(self, url: Optional[str] = None) -> ArchiveStore:
        store = ArchiveStore(StoreConfig(url=self.url if url is None else url), self.data_dir,
                             table_prefix=self.prefix)
        self.addCleanup(self._drop, store)
        return store

    async def _drop(self, store: ArchiveStore) -> None:
        def drop() -> None:
            store.close()
            if self.backend == "mariadb":
                ArchiveStore(StoreConfig(url=self.url), self.data_dir,
                             table_prefix=self.prefix).drop_all()
        await self.thread(drop)

    def thread(self, f: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        from twisted.internet.threads import deferToThreadPool
        return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

    def start_writer(self, store: ArchiveStore, **kw: Any) -> CopyWriter:
        kw.setdefault("retry_delay", 0.1)
        kw.setdefault("poll_interval", 0.05)
        writer = CopyWriter(reactor, reactor.getThreadPool(), self.queue, store, **kw)
        writer.start()
        self.addCleanup(writer.stop)
        return writer

    def enqueue(self, queue_id: str, **kw: Any) -> str:
        return self.queue.enqueue(MESSAGE, metadata_for(state(queue_id, **kw)))

    def depth(self) -> int:
        return self.queue.stats().depth

    async def rows(self, store: ArchiveStore, **search: Any) -> list[Any]:
        # The test opens its own view when the writer has not opened it.
        def read() -> list[Any]:
            store.open()
            return store.search(Search(limit=1000, **search))
        return await self.thread(read)

    def new_names(self) -> list[str]:
        return sorted(os.listdir(os.path.join(self.queue.directory, "new")))

    # -- storing ------------------------------------------------------------------

    async def test_copies_are_stored_once_each_with_their_state(self) -> None:
        """Queued copies become one row per recipient domain with the state, the raw message and the envelope, and leave the queue."""
        store = self.make_store()
        for i in range(5):
            self.enqueue(f"Q{i}")
        writer = self.start_writer(store, batch=2)
        await wait_until(lambda: self.depth() == 0, "queue emptied")
        rows = await self.rows(store)
        self.assertEqual(len(rows), 10)
        self.assertEqual(sorted({(r.queue_id, r.rcpt_domain) for r in rows}),
                         sorted((f"Q{i}", d) for i in range(5)
                                for d in ("example.com", "example.net")))
        row = (await self.rows(store, ref="Q3", domain="example.net"))[0]
        self.assertEqual((row.node, row.sender, row.recipients, row.verdict, row.client_ip),
                         ("edge-1", "alice@example.org", ("eve@example.net",), "quarantine",
                          "192.0.2.7"))
        self.assertEqual(row.subject, "held copy")
        self.assertEqual(await self.thread(store.raw, row), MESSAGE)
        saved = await self.thread(store.state, row)
        self.assertEqual(saved["queue_id"], "Q3")
        self.assertEqual(saved["recipients"], ["bob@example.com", "eve@example.net"])
        self.assertEqual(writer.stored, 5)
        self.assertFalse(said(self.events, "archive store unavailable"))

    async def test_a_stop_mid_drain_leaves_every_copy_stored_or_queued_uncounted(self) -> None:
        """Stopped while it drains a long queue (the next batch claimed ahead of the one being stored): each copy is either stored or back in new/ with no attempt counted, and nothing stays claimed."""
        store = self.make_store()
        for i in range(60):
            self.enqueue(f"M{i:02d}", recipients=("bob@example.com",))
        writer = self.start_writer(store, batch=4, linger=0.0)
        await wait_until(lambda: writer.stored >= 8, "a few batches stored")
        await writer.stop()
        stored = {r.queue_id for r in await self.rows(store)}
        waiting = self.new_names()
        self.assertEqual(len(stored) + len(waiting), 60, (len(stored), len(waiting)))
        self.assertEqual(os.listdir(os.path.join(self.queue.directory, "claimed")), [])
        # <due>_<id>_<attempts>_<recoveries>: handed back, never counted.
        self.assertEqual({name.split("_")[2] for name in waiting} - {"0"}, set())
        writer.start()
        await wait_until(lambda: self.depth() == 0, "the rest stored after a restart")
        self.assertEqual(len({r.queue_id for r in await self.rows(store)}), 60)

    async def test_the_next_batch_is_claimed_while_one_is_stored(self) -> None:
        """Under load the next full batch is claimed and read while the
        database stores the one before (the writer's pipelining); every
        copy is stored once and leaves the queue."""
        store = self.make_store()
        for i in range(12):
            self.enqueue(f"P{i:02d}", recipients=("bob@example.com",))
        claimed_dir = os.path.join(self.queue.directory, "claimed")
        overlapped = threading.Event()
        real_add = store.add_copies
        calls = []

        def add_copies(copies: Any) -> int:
            calls.append(len(copies))
            if len(calls) == 1:
                # Held until the next batch is claimed too (bounded).
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    if len(os.listdir(claimed_dir)) >= 8:
                        overlapped.set()
                        break
                    time.sleep(0.01)
            return real_add(copies)

        self.patch(store, "add_copies", add_copies)
        writer = self.start_writer(store, batch=4, linger=0.0)
        await wait_until(lambda: self.depth() == 0, "queue emptied")
        self.assertTrue(overlapped.is_set(), "the next batch was not claimed during the store")
        self.assertEqual(sorted(r.queue_id for r in await self.rows(store)),
                         [f"P{i:02d}" for i in range(12)])
        # The first batch through add_copies, the ones claimed ahead
        # through prepare_copies + store_prepared.
        self.assertEqual((calls, writer.stored), ([4], 12))

    async def test_a_store_outage_hands_back_the_batch_claimed_ahead_too(self) -> None:
        """The store fails while a batch is stored and the next was claimed
        ahead: both go back to new/ uncounted, and once the store works
        every copy is stored once."""
        store = self.make_store()
        for i in range(8):
            self.enqueue(f"O{i:02d}", recipients=("bob@example.com",))
        claimed_dir = os.path.join(self.queue.directory, "claimed")
        real_add = store.add_copies
        failed: list[list[str]] = []

        def add_copies(copies: Any) -> int:
            if not failed:
                deadline = time.monotonic() + 10
                while len(os.listdir(claimed_dir)) < 8 and time.monotonic() < deadline:
                    time.sleep(0.01)
                failed.append(sorted(os.listdir(claimed_dir)))
                raise OSError(errno.EIO, "the store's disk failed")  # the store's side
            return real_add(copies)

        self.patch(store, "add_copies", add_copies)
        writer = self.start_writer(store, batch=4, linger=0.0, retry_delay=0.3)
        await wait_until(lambda: bool(said(self.events, "archive store unavailable")),
                         "store reported unavailable")
        self.assertEqual(len(failed[0]), 8)  # both batches were claimed
        await wait_until(lambda: self.depth() == 0, "queue emptied after the outage")
        self.assertEqual(sorted(r.queue_id for r in await self.rows(store)),
                         [f"O{i:02d}" for i in range(8)])
        self.assertEqual(writer.stored, 8)
        (line,) = said(self.events, "archive store available again")
        self.assertEqual(line["waited"], 8)

    async def test_wake_stores_a_new_copy_before_the_next_poll(self) -> None:
        """A copy queued while the writer idles is stored at once after wake(), not at the next poll."""
        store = self.make_store()
        writer = self.start_writer(store, poll_interval=30.0)
        await wait_until(lambda: writer.store_ready, "store opened")
        await sleep(0.2)  # the writer now sleeps for its poll interval
        self.enqueue("W1")
        writer.wake()
        await wait_until(lambda: self.depth() == 0, "copy stored after wake", timeout=5.0)
        self.assertEqual(len(await self.rows(store, ref="W1")), 2)

    async def test_the_same_copy_queued_twice_is_stored_once(self) -> None:
        """An edge that sent a copy twice (its 250 lost) leaves two items and one set of rows."""
        store = self.make_store()
        self.enqueue("DUP")
        self.enqueue("DUP")
        self.start_writer(store, batch=1)
        await wait_until(lambda: self.depth() == 0, "both items finished")
        self.assertEqual(len(await self.rows(store, ref="DUP")), 2)

    async def test_rows_committed_before_a_crash_are_not_stored_again(self) -> None:
        """Items whose rows were committed before the process died (no finish) are finished without new rows."""
        store = self.make_store()
        self.enqueue("C1")
        self.enqueue("C2")
        # What a writer that died between its commit and its finish leaves:
        # the rows, and the items back in new/.
        item = self.queue.claim()
        assert item is not None
        await self.thread(lambda: (store.open(), store.add_copies([copy_of(item)])))
        self.queue.release(item)
        self.start_writer(store)
        await wait_until(lambda: self.depth() == 0, "items finished")
        rows = await self.rows(store)
        self.assertEqual(sorted((r.queue_id, r.rcpt_domain) for r in rows),
                         [("C1", "example.com"), ("C1", "example.net"),
                          ("C2", "example.com"), ("C2", "example.net")])

    async def test_an_item_that_does_not_decode_goes_to_bad_and_the_rest_is_stored(self) -> None:
        """Items without a decodable state go to bad/ with a reason and a log line; the good ones of the same batch are stored."""
        store = self.make_store()
        self.enqueue("G1")
        self.queue.enqueue(MESSAGE, {"v": 1, "state": "not-base64-json"})
        self.queue.enqueue(MESSAGE, {"v": 2, "state": encode_state(state("V2"))})
        self.queue.enqueue(MESSAGE, {"something": "else"})
        self.enqueue("G2")
        self.start_writer(store)
        await wait_until(lambda: self.depth() == 0, "queue emptied")
        self.assertEqual(sorted({r.queue_id for r in await self.rows(store)}), ["G1", "G2"])
        self.assertEqual(self.queue.stats().bad, 3)
        bad_dir = os.path.join(self.queue.directory, "bad")
        self.assertEqual(len([n for n in os.listdir(bad_dir) if n.endswith(".reason.json")]), 3)
        logged = said(self.events, "queue item {item_id} moved to bad/")
        self.assertEqual(len(logged), 3)
        self.assertTrue(all("not an archive copy" in e["reason"] for e in logged))

    # -- a store that is away -------------------------------------------------------

    async def away_at_start(self) -> tuple[ArchiveStore, Callable[[], Awaitable[None]]]:
        """A store that cannot be opened, and what brings it back."""
        if self.backend == "sqlite":
            # The store's directory cannot be made: a file is in the way.
            blocker = os.path.join(self.data_dir, "blocked")
            with open(blocker, "w") as f:
                f.write("not a directory")

            async def back() -> None:
                os.unlink(blocker)
                os.mkdir(blocker)

            return self.make_store(f"sqlite:///{blocker}/archive.sqlite"), back
        relay = self.relay()
        return self.make_store(self.relay_url(relay)), self.as_async(relay.open)

    def relay(self) -> Relay:
        url = make_url(self.url)
        relay = Relay(url.host or "127.0.0.1", url.port or 3306)
        self.addCleanup(relay.close)
        return relay

    def relay_url(self, relay: Relay) -> str:
        return make_url(self.url).set(host="127.0.0.1", port=relay.listen_port).render_as_string(
            hide_password=False)

    @staticmethod
    def as_async(f: Callable[[], Any]) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            f()
        return run

    async def test_a_store_down_at_start_keeps_the_copies_until_it_opens(self) -> None:
        """With the store unreachable at start the copies stay queued, unsent and uncounted, with one log line; once it opens they are stored, with one line saying how many waited."""
        store, back = await self.away_at_start()
        for i in range(3):
            self.enqueue(f"S{i}")
        writer = self.start_writer(store)
        await wait_until(lambda: bool(said(self.events, "archive store unavailable")),
                         "store reported unavailable")
        await sleep(0.5)  # several retries
        self.assertEqual(self.depth(), 3)
        self.assertEqual(len(said(self.events, "archive store unavailable")), 1)
        self.assertTrue(all(n.endswith("_0_0") for n in self.new_names()))
        self.enqueue("S3")  # taken into the queue meanwhile
        await back()
        await wait_until(lambda: bool(said(self.events, "archive store available again")),
                         "store reported back")
        self.assertEqual(self.depth(), 0)
        self.assertEqual(len(await self.rows(store)), 8)
        (line,) = said(self.events, "archive store available again")
        self.assertEqual(line["waited"], 4)
        self.assertEqual(len(said(self.events, "archive store unavailable")), 1)
        self.assertEqual(writer.stored, 4)

    async def test_a_store_lost_while_running_hands_the_copies_back_then_stores_them(self) -> None:
        """A store that fails under the writer gets the batch back uncounted; the copies are stored once it works again, each once."""
        if self.backend == "sqlite":
            store = self.make_store()
            writer = self.start_writer(store)
            await wait_until(lambda: writer.store_ready, "store opened")
            # Another connection holds the write lock: the writer's
            # transaction waits the busy timeout (shortened) and fails.
            self.patch(db_engine, "SQLITE_BUSY_TIMEOUT", 0.2)
            path = make_url(store.display_url).database
            assert path is not None
            holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self.addCleanup(holder.close)
            holder.execute("BEGIN IMMEDIATE")

            async def back() -> None:
                holder.execute("COMMIT")
        else:
            relay = self.relay()
            relay.open()
            store = self.make_store(self.relay_url(relay))
            writer = self.start_writer(store)
            await wait_until(lambda: writer.store_ready, "store opened")
            await relay.close()
            back = self.as_async(relay.open)
        for i in range(4):
            self.enqueue(f"L{i}")
        writer.wake()
        await wait_until(lambda: bool(said(self.events, "archive store unavailable")),
                         "store reported unavailable")
        await sleep(0.3)
        self.assertEqual(self.depth(), 4)
        self.assertTrue(all(n.endswith("_0_0") for n in self.new_names()), self.new_names())
        await back()
        await wait_until(lambda: bool(said(self.events, "archive store available again")),
                         "store reported back")
        self.assertEqual(self.depth(), 0)
        self.assertEqual(len(await self.rows(store)), 8)
        self.assertEqual(len(said(self.events, "archive store unavailable")), 1)
        self.assertEqual(len(said(self.events, "archive store available again")), 1)

    async def test_stop_while_the_store_is_away_leaves_the_copies_queued(self) -> None:
        """stop() during an outage ends at once; the copies stay in the queue, uncounted, for the next start."""
        store, _ = await self.away_at_start()
        self.enqueue("T1")
        writer = self.start_writer(store, retry_delay=60.0)
        await wait_until(lambda: bool(said(self.events, "archive store unavailable")),
                         "store reported unavailable")
        started = time.monotonic()
        await writer.stop()
        self.assertLess(time.monotonic() - started, 5.0)
        self.assertEqual(self.queue.stats().queued, 1)
        self.assertTrue(all(n.endswith("_0_0") for n in self.new_names()))


class SQLiteWriterTests(WriterTests, unittest.TestCase):
    backend = "sqlite"


class MariaDBWriterTests(WriterTests, unittest.TestCase):
    backend = "mariadb"


def test_item_metadata_round_trips_and_names_what_is_wrong() -> None:
    """The writer reads what copies.metadata_for writes, with the state's JSON; a wrong version, a missing or bad state is refused by name."""
    s = state("R1")
    back, text = state_json(metadata_for(s))
    assert back == s and '"queue_id":"R1"' in text
    for metadata, problem in (({"v": 2, "state": "x"}, "version"), ({"v": 1}, "without a state"),
                              ({"v": 1, "state": "@@"}, "does not parse")):
        try:
            state_json(metadata)
        except ValueError as e:
            assert problem in str(e), (metadata, e)
        else:
            raise AssertionError(f"{metadata} accepted")
