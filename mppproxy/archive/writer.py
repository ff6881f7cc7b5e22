"""The writer: archive copies from a durable queue into the store.

Stage: after the queue (issue 12, "Archive node").  On the archive node the
receiver (``receiver.py``) queues each verified copy and this writer stores
it; in all-in-one mode the hold action queues into the edge's own queue and
the same writer stores into the embedded SQLite store.  It knows the queue
item's metadata (``copies.metadata_for``, the same on both) and the store's
``NewCopy``, nothing of SMTP.

The loop: claim up to ``batch`` items (and at most ``max_batch_bytes`` of
messages), decode each one's state, store them all with one
``add_copies`` (one database transaction), then finish every item.  Under
load the work overlaps: while the database stores a full batch, the next
one is claimed, read from the queue and prepared (its rows made, its
messages compressed: ``ArchiveStore.prepare_copies``), and a stored
batch's items are finished while the next is stored (the queue's files and the database's
round trips each wait on their own I/O; done one after the other the
writer ran at 0.23-0.42 of the raw INSERT rate on MariaDB).  So up to two
batches are in memory at once.

* Nothing lost: an item leaves the queue only after the transaction that
  holds its rows has committed.  A store that is away -- a database down
  or unreachable, a locked or full SQLite file, the raw files' disk, a
  schema to upgrade (``_is_outage``) -- hands the items back without
  counting an attempt (the store being away is not the copy's fault),
  logs one line when the store becomes unavailable and one when it is
  back (with the copies that waited), and tries again after
  ``retry_delay`` seconds.  The receiver keeps accepting copies into the
  queue meanwhile.
* Nothing stored twice: the store skips a row it has (node + queue id +
  recipient domain), so a crash between the commit and the finish, or the
  same copy sent twice by an edge, stores it once.
* An item whose metadata does not decode goes to the queue's ``bad/``
  with the reason (the queue logs it).  An error from a database that
  still answers (MariaDB refuses a row larger than its
  ``max_allowed_packet`` with an ``OperationalError`` too) is the batch's:
  it is narrowed down copy by copy, and a copy that fails alone is
  retried with the queue's backoff (counted; ``bad/`` after its maximum
  age), so one copy the store cannot take never holds up the rest.

Blocking work (the queue's files, the store) runs in the thread pool; the
loop itself runs on the reactor thread.
"""
from __future__ import annotations

import sqlite3
import time
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence, TypeVar

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool

from mppproxy._async import as_deferred
from mppproxy.archive.copies import state_and_text
from mppproxy.archive.state import CopyState
from mppproxy.logsetup import Logger
from mppproxy.spool.queue import DurableQueue, QueueItem
from mppproxy.store.store import NewCopy, PreparedCopies, StoreError

log = Logger()

_T = TypeVar("_T")

# The messages of one batch are read into memory for the store: bounded
# here whatever their sizes (one item always goes, however large).
MAX_BATCH_BYTES = 32 * 1024 * 1024
# Seconds between looks at an idle queue: another process may enqueue
# (all-in-one workers), and handed-back items fall due, without a wake().
POLL_INTERVAL = 1.0
# Seconds the writer waits after a batch that emptied the queue before it
# claims again: copies queued meanwhile go into one transaction (the client
# has its 250 already; only the row appears this much later).
LINGER = 0.05

# Errors that may mean "the store is not there": a connection refused or
# lost, a server gone away, a pool that cannot give a connection.  Whether
# it is the store or the batch (MariaDB answers a packet too large for
# max_allowed_packet with an OperationalError too) is asked of the
# database itself: see CopyWriter._is_outage.
MAYBE_OUTAGE: tuple[type[BaseException], ...] = (
    sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError,
    sa_exc.DisconnectionError)
# Errors that are the store's whatever the copies hold: the raw files'
# disk, a schema that is missing or behind (the store builds every
# statement itself, so no copy makes one wrong), a store not open, and
# SQLite's own (a locked, full or unopenable file; db/engine.py's BEGIN
# IMMEDIATE raises "database is locked" as sqlite3's, unwrapped).
STORE_SIDE: tuple[type[BaseException], ...] = (OSError, sa_exc.ProgrammingError, StoreError,
                                               sqlite3.OperationalError)


class CopyStore(Protocol):
    """What the writer uses of ``mppproxy.store.store.ArchiveStore``."""

    @property
    def engine(self) -> Engine: ...
    def open(self) -> None: ...
    def add_copies(self, copies: Sequence[NewCopy]) -> int: ...
    def prepare_copies(self, copies: Sequence[NewCopy]) -> PreparedCopies: ...
    def store_prepared(self, prepared: PreparedCopies) -> int: ...


class UndecodableItem(ValueError):
    """A queue item that is not an archive copy this writer can store."""


def state_json(metadata: Mapping[str, Any]) -> tuple[CopyState, str]:
    """The state of an item's metadata (``copies.metadata_for``: the edge's
    hold action and the node's receiver write the same) and its JSON text
    for the store; UndecodableItem naming what is wrong."""
    try:
        return state_and_text(metadata)
    except ValueError as e:
        raise UndecodableItem(str(e)) from None


def copy_of(item: QueueItem) -> NewCopy:
    """The store's value for a claimed item (blocking: reads its message)."""
    state, text = state_json(item.metadata)
    return NewCopy(node=state.node, queue_id=state.queue_id, received=state.received,
                   client=state.client, helo=state.helo, tls=state.tls, sender=state.sender,
                   recipients=state.recipients, policy=state.policy, verdict=str(state.verdict),
                   disposition=str(state.disposition), score=state.score,
                   reasons=state.reasons, state_json=text, message=item.message())


class CopyWriter:
    """Stores the copies of ``queue`` into ``store`` (see the module
    docstring).  ``start`` opens the store (retried while it fails) and
    runs the loop; ``stop`` ends it after the batch in hand and fires when
    it has; ``wake`` says a copy was just queued."""

    def __init__(self, reactor: Any, threadpool: Any, queue: DurableQueue, store: CopyStore,
                 batch: int = 100, retry_delay: float = 5.0, *,
                 max_batch_bytes: int = MAX_BATCH_BYTES, poll_interval: float = POLL_INTERVAL,
                 linger: float = LINGER,
                 clock: Callable[[], float] = time.time):
        self.reactor = reactor
        self.threadpool = threadpool
        self.queue = queue
        self.store = store
        self.batch = batch
        self.retry_delay = retry_delay
        self.max_batch_bytes = max_batch_bytes
        self.poll_interval = poll_interval
        self.linger = linger
        # The last batch took as many copies as a batch may: more wait.
        self._last_full = False
        self._clock = clock
        # True once store.open() succeeded.
        self.store_ready = False
        # Copies stored (rows may be more: one per recipient domain).
        self.stored = 0
        self._running: Optional[Deferred[None]] = None
        self._stopping = False
        # The sleep in progress: its Deferred and whether wake() ends it.
        self._sleeper: Optional[tuple[Deferred[None], bool]] = None
        self._woken = False
        # When the store was found unavailable; None while it works.
        self._down_since: Optional[float] = None
        # The next batch, claimed (and prepared, unless that failed: the
        # store step then meets the error itself) while the last one was
        # being stored.
        self._prefetched: Optional[tuple[list[tuple[QueueItem, NewCopy]],
                                         Optional[PreparedCopies]]] = None
        # The finishing of the last stored batch, running in the pool.
        self._finishing: Optional[Deferred[None]] = None

    # -- lifetime ------------------------------------------------------------------

    def start(self) -> None:
        if self._running is not None:
            return
        self._stopping = False
        self._running = as_deferred(self._run())
        self._running.addErrback(lambda f: log.failure("the archive writer stopped", f))

    def stop(self) -> Deferred[None]:
        """End the loop once the batch in hand is stored or handed back."""
        self._stopping = True
        self._end_sleep()
        running, self._running = self._running, None
        if running is None:
            return succeed(None)
        done: Deferred[None] = Deferred()
        running.addBoth(lambda _: done.callback(None))
        return done

    def wake(self) -> None:
        """A copy was queued: look at the queue now rather than at the next
        poll.  A wait for an unavailable store is not cut short."""
        self._woken = True
        if self._sleeper is not None and self._sleeper[1]:
            self._end_sleep()

    @property
    def store_down(self) -> bool:
        return self._down_since is not None

    # -- the loop ------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            await self._loop()
        finally:
            # Claimed ahead but not stored: back to the queue, uncounted;
            # and the last finish ends before the stop does.
            await self._give_back_prefetched()
            await self._finished()

    async def _loop(self) -> None:
        while not self._stopping:
            try:
                busy = await self._step()
            except Exception:
                # A fault of ours: loud, and the loop goes on after a pause
                # (a claimed item comes back at the next start's recover).
                log.failure("archive writer error; trying again in {delay} s",
                            delay=self.retry_delay)
                await self._sleep(self.retry_delay, wakeable=False)
                continue
            if not busy:
                await self._sleep(self.poll_interval, wakeable=True)
            if self.linger and not self._last_full:
                # The queue was drained (or a copy just woke us): let more
                # arrive, so one transaction takes them together.  A commit
                # per copy costs a database fsync each and, on a busy edge
                # with its own writer, the relay's CPU.
                await self._sleep(self.linger, wakeable=False)

    async def _step(self) -> bool:
        """One batch; False when there was nothing to do."""
        if not self.store_ready:
            try:
                await self._in_thread(self.store.open)
            except Exception as e:
                # Whatever keeps it from opening (a server down, a schema to
                # upgrade by hand), copies wait in the queue meanwhile.
                self._unavailable(e)
                await self._sleep(self.retry_delay, wakeable=False)
                return True
            self.store_ready = True
            log.info("archive store open: {store}", store=getattr(self.store, "display_url", ""))
        if self._stopping:
            # Stopped while the store was opening: claim nothing more.
            return False
        self._woken = False
        prefetched, self._prefetched = self._prefetched, None
        prepared: Optional[PreparedCopies] = None
        if prefetched is None:
            batch = await self._in_thread(self._claim_batch)
        else:
            batch, prepared = prefetched
        self._last_full = len(batch) >= self.batch
        if not batch:
            if self._down_since is not None and self.store_ready:
                # Opened again, and nothing waited.
                await self._available(0)
            return False
        await self._store(batch, prepared)
        return True

    async def _claim_ahead(self) -> None:
        """Claim and prepare the next batch (called while one is being stored)."""
        self._prefetched = await self._in_thread(self._claim_and_prepare)

    def _claim_and_prepare(self) -> tuple[list[tuple[QueueItem, NewCopy]],
                                          Optional[PreparedCopies]]:
        batch = self._claim_batch()
        if not batch:
            return batch, None
        try:
            return batch, self.store.prepare_copies([copy for _, copy in batch])
        except Exception:
            # The store step does it again and handles what it meets.
            return batch, None

    async def _give_back_prefetched(self) -> None:
        prefetched, self._prefetched = self._prefetched, None
        if prefetched and prefetched[0]:
            await self._in_thread(self._hand_back, [item for item, _ in prefetched[0]])

    async def _finished(self) -> None:
        """Wait for the last batch's finish (its failure is logged: the
        items stay claimed, come back at the next start and are found
        stored)."""
        finishing, self._finishing = self._finishing, None
        if finishing is not None:
            try:
                await finishing
            except Exception:
                log.failure("archive writer: finishing stored copies in the queue")

    def _claim_batch(self) -> list[tuple[QueueItem, NewCopy]]:
        """Claim and decode up to ``batch`` items (in the thread pool; one
        listing of the queue per batch)."""
        out: list[tuple[QueueItem, NewCopy]] = []
        for item in self.queue.claim_many(self.batch, self.max_batch_bytes):
            try:
                copy = copy_of(item)
            except UndecodableItem as e:
                # The queue logs it, with the reason, and keeps the file.
                self.queue.bad(item, f"not an archive copy: {e}")
                continue
            except OSError as e:
                # The message cannot be read back (EIO): not the store's
                # fault; counted, and given up once too old.
                self.queue.retry(item, f"cannot read the queued copy: {e}")
                continue
            out.append((item, copy))
        return out

    async def _store(self, batch: list[tuple[QueueItem, NewCopy]],
                     prepared: Optional[PreparedCopies] = None) -> None:
        items = [item for item, _ in batch]
        storing = (self._in_thread(self.store.store_prepared, prepared) if prepared is not None
                   else self._in_thread(self.store.add_copies, [copy for _, copy in batch]))
        ahead: Optional[Deferred[None]] = None
        if len(batch) >= self.batch and not self._stopping and self._down_since is None:
            # More are likely waiting: read them while the database works.
            ahead = as_deferred(self._claim_ahead())
        try:
            await storing
        except Exception as e:
            if ahead is not None:
                try:
                    await ahead
                except Exception:
                    log.failure("archive writer: claiming the next batch")
            # A batch the store refused is handled alone: the one claimed
            # ahead goes back and is claimed again afterwards.
            await self._give_back_prefetched()
            if await self._in_thread(self._is_outage, e):
                await self._wait_for_store(items, e)
            elif len(batch) == 1:
                await self._give_back(batch[0][0], e)
            else:
                log.warn("archive store refused a batch of {n} copies ({error}); storing them "
                         "one by one", n=len(batch), error=_describe(e))
                await self._one_by_one(batch)
            return
        # The previous batch's finish has had the whole store to run.
        await self._finished()
        self._finishing = self._in_thread(self._finish, items)
        self.stored += len(items)
        if ahead is not None:
            await ahead
        if self._down_since is not None:
            # The line counts what still waits in the queue: not these.
            await self._finished()
            await self._available(len(items))

    async def _one_by_one(self, batch: list[tuple[QueueItem, NewCopy]]) -> None:
        """Store each copy alone: one the store cannot take is retried
        later (counted), the others are stored now."""
        for i, (item, copy) in enumerate(batch):
            try:
                await self._in_thread(self.store.add_copies, [copy])
            except Exception as e:
                if await self._in_thread(self._is_outage, e):
                    await self._wait_for_store([it for it, _ in batch[i:]], e)
                    return
                await self._give_back(item, e)
                continue
            await self._in_thread(self._finish, [item])
            self.stored += 1

    async def _wait_for_store(self, items: list[QueueItem], error: BaseException) -> None:
        """The store is away: the items go back uncounted, and the writer
        waits ``retry_delay`` before it claims them again."""
        await self._in_thread(self._hand_back, items)
        self._unavailable(error)
        await self._sleep(self.retry_delay, wakeable=False)

    def _is_outage(self, error: BaseException) -> bool:
        """Whether ``error`` means the store is away rather than that the
        batch holds something it cannot take (blocking: may ask the
        database).  SQLite's errors (a locked, full or unopenable file)
        are the file's, not a copy's."""
        if isinstance(error, STORE_SIDE):
            return True
        if not isinstance(error, MAYBE_OUTAGE):
            return False
        if isinstance(getattr(error, "orig", None), sqlite3.Error):
            return True
        try:
            with self.store.engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
        except Exception:
            return True
        return False

    async def _give_back(self, item: QueueItem, error: Exception) -> None:
        log.error("archive store refused copy {item_id} ({error}); it is tried again later",
                  item_id=item.id, error=_describe(error), queue=self.queue.directory)
        await self._in_thread(self.queue.retry, item, f"the store refused it: {_describe(error)}")

    def _finish(self, items: list[QueueItem]) -> None:
        # Stored: the store is idempotent on node + queue id + domain, so a
        # removal a power cut undoes re-stores nothing; no fsync per item.
        self.queue.finish_many(items, durable=False)

    def _hand_back(self, items: list[QueueItem]) -> None:
        for item in items:
            self.queue.release(item)

    # -- the store's availability -------------------------------------------------

    def _unavailable(self, error: BaseException) -> None:
        """One log line when the store goes away, none while it stays away."""
        if self._down_since is not None:
            return
        self._down_since = self._clock()
        log.error("archive store unavailable: {error}; copies wait in the queue {queue}, "
                  "trying again every {delay} s", error=_describe(error),
                  queue=self.queue.directory, delay=self.retry_delay)

    async def _available(self, stored: int) -> None:
        """One log line when the store is back, with the copies that waited
        (those just stored and those still queued)."""
        if self._down_since is None:
            return
        down_for = self._clock() - self._down_since
        self._down_since = None
        try:
            queued = (await self._in_thread(self.queue.stats)).depth
        except OSError:
            queued = 0
        log.info("archive store available again after {down_for:.0f} s; {waited} copies "
                 "waited in the queue", down_for=down_for, waited=stored + queued,
                 queue=self.queue.directory)

    # -- helpers ---------------------------------------------------------------------

    def _in_thread(self, f: Callable[..., _T], *args: Any) -> Deferred[_T]:
        return deferToThreadPool(self.reactor, self.threadpool, f, *args)

    async def _sleep(self, seconds: float, wakeable: bool) -> None:
        """Wait ``seconds``; ``stop`` ends the wait, and ``wake`` too when
        ``wakeable`` (a wake that came while busy ends it at once)."""
        if self._stopping or (wakeable and self._woken):
            return
        d: Deferred[None] = Deferred()
        self._sleeper = (d, wakeable)
        call = self.reactor.callLater(seconds, self._end_sleep)
        try:
            await d
        finally:
            if call.active():
                call.cancel()

    def _end_sleep(self) -> None:
        sleeper, self._sleeper = self._sleeper, None
        if sleeper is not None and not sleeper[0].called:
            sleeper[0].callback(None)


def _describe(error: BaseException) -> str:
    """A short description for a log line: SQLAlchemy's messages carry the
    statement and its parameters (message octets among them)."""
    if isinstance(error, sa_exc.StatementError) and error.orig is not None:
        return f"{type(error).__name__}: {error.orig}"[:500]
    return f"{type(error).__name__}: {error}"[:500]
