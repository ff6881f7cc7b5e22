"""Group commit for the durable queue: the items of many sessions written by
one thread of the queue's own, a batch at a time (issue 12, "relay rate with
copy-all on vs off").

Ground floor (spool/), beside ``queue.py``.  The first archive copy path
handed every item to the reactor's thread pool on its own: one thread-pool
round trip per message (the pool's locks and condition variables, a wake-up
of a worker thread, a ``callFromThread`` back) and one directory fsync per
message.  With 20 sessions copying every message the relay ran at 0.46 of
its rate without copies, and at 0.51 with the fsyncs switched off: the
round trips, not the disk, were most of the cost.

Here the reactor thread only appends the item to a list and notifies the
thread; the thread takes everything that is waiting, writes it with
``DurableQueue.enqueue_many`` (each file written and fsync'ed, then renamed,
then one fsync of ``new/`` for the batch) and hands all the results back
with one ``callFromThread``.  Under load the batches grow by themselves (the
items that arrive while a batch is being written are the next batch); a
lone message is written at once, as before.  The promise does not change:
a caller's Deferred fires only once its item is durable, or fails with the
``OSError`` (ENOSPC...) of its own item, and then nothing of it is visible.

A thread of its own, not the reactor's pool, also means a disk that hangs
holds one thread and the sessions waiting on it, not the pool's threads
that DNS, the databases and the scanners share.
"""
from __future__ import annotations

import threading
from collections import deque
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool

from mppproxy.logsetup import Logger
from mppproxy.spool.queue import DurableQueue, Message

log = Logger()

# Items written in one batch at most: bounds the open descriptors of a batch
# and the wait of the last item in it (each item costs one write and one fsync).
MAX_BATCH = 64
# Seconds ``stop`` waits for the thread's batch in hand to be written.
STOP_TIMEOUT = 10.0

_Pending = tuple[Message, Mapping[str, Any], "defer.Deferred[str]"]


class GroupCommitter:
    """Writes items into ``queue`` from a thread of its own, in batches.

    ``prepare`` runs in that thread before each batch (opening the queue on
    first use: ``open`` runs ``recover``, which is blocking).  The thread
    starts at the first ``submit`` and ends at ``stop``."""

    def __init__(self, reactor: Any, queue: DurableQueue,
                 prepare: Callable[[], None] = lambda: None, max_batch: int = MAX_BATCH):
        self.reactor = reactor
        self.queue = queue
        self.prepare = prepare
        self.max_batch = max_batch
        self._pending: deque[_Pending] = deque()
        self._cond = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        # Batches written, for the tests and the logs.
        self.batches = 0

    def submit(self, message: Message, metadata: Mapping[str, Any]) -> "defer.Deferred[str]":
        """Queue one item; the Deferred fires with its id once it is durable
        (reactor thread only).  ``message`` is bytes or an iterable of
        chunks, read in the committer's thread."""
        d: defer.Deferred[str] = defer.Deferred()
        with self._cond:
            if self._stopping:
                return defer.fail(RuntimeError(f"the queue {self.queue.directory} is stopping"))
            self._pending.append((message, metadata, d))
            self._cond.notify()
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=f"queue-commit {self.queue.directory}", daemon=True)
                self._thread.start()
        return d

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """End the thread once what is waiting is written (blocking, at most
        ``timeout`` seconds: called at the stop, after the sessions have
        ended, when there is normally nothing left to write).  Items
        submitted afterwards fail at once."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                log.error("the queue {queue} is still writing after {timeout:g} s at the stop "
                          "(a hung disk?): the clients waiting on it were not answered 250",
                          queue=self.queue.directory, timeout=timeout)

    # -- the committer's thread ---------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if not self._pending:
                    return
                batch = [self._pending.popleft()
                         for _ in range(min(self.max_batch, len(self._pending)))]
            results: Sequence[Union[str, BaseException]]
            try:
                self.prepare()
                results = self.queue.enqueue_many([(m, meta) for m, meta, _ in batch])
            except Exception as e:
                # enqueue_many answers per item; this is the queue not
                # opening (its directory unwritable...): every item fails.
                results = [e] * len(batch)
            self.batches += 1
            self.reactor.callFromThread(_settle, [d for _, _, d in batch], results)


class PoolCommitter:
    """``GroupCommitter``'s interface on a thread pool: each item written
    by ``enqueue`` in a pool thread of its own.  For a context built
    without a service (tools, tests: ``edge/context.make_context``), whose
    pool may run the work inline; the service's queues use the
    ``GroupCommitter``."""

    def __init__(self, reactor: Any, threadpool: Any, queue: DurableQueue,
                 prepare: Callable[[], None] = lambda: None):
        self.reactor = reactor
        self.threadpool = threadpool
        self.queue = queue
        self.prepare = prepare

    def submit(self, message: Message, metadata: Mapping[str, Any]) -> "defer.Deferred[str]":
        return deferToThreadPool(self.reactor, self.threadpool, self._write, message, metadata)

    def _write(self, message: Message, metadata: Mapping[str, Any]) -> str:
        self.prepare()
        return self.queue.enqueue(message, metadata)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        pass  # nothing of its own runs


def _settle(waiting: list["defer.Deferred[str]"],
            results: Sequence[Union[str, BaseException]]) -> None:
    """Fire each caller's Deferred with its item's id or its error (reactor thread)."""
    for d, result in zip(waiting, results):
        if isinstance(result, BaseException):
            d.errback(result)
        else:
            d.callback(result)
