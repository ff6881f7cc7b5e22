"""Store calls batched into database jobs: the cost of one thread-pool hop
and one transaction is shared by every call that waited for it.

A store hands each call that missed its cache to ``Batcher.submit``.  The
batcher runs one job at a time in the state database's pool; a job takes
every call queued so far (at most ``max_batch``) and answers them all in
one transaction, in the order they came.  While it runs, new calls queue
for the next job: the busier the store, the bigger the batches, and there
is no timer.  An idle batcher starts its job at the end of the current
reactor turn (``callLater(0)``), so calls that arrive together (one
wake-up reading many connections) share it and a lone call waits for
nothing else.

A job that fails fails every call in it with the ``StateDatabaseError``
of ``StateDatabase.run`` (docs/design.md promise 4: each caller's check then
applies ``policy.on_error``).
"""
from __future__ import annotations

from typing import Any, Callable, Generic, Optional, Sequence, TypeVar

from twisted.internet import defer
from twisted.python.failure import Failure

from mppproxy.db.base import Database

I = TypeVar("I")
R = TypeVar("R")

# Calls per job.  Bounds the statements' IN lists and executemany sizes,
# and how long one transaction holds SQLite's write lock.
MAX_BATCH = 500

# job(engine, items, now) -> one result per item, in order.  ``now`` is the
# state database clock's time when the job was handed to the pool.
Job = Callable[[Any, list[Any], float], Sequence[Any]]




class Batcher(Generic[I, R]):
    """Queues ``submit``-ted items and runs ``job`` over them in batches.

    ``jobs`` counts the jobs run, ``items`` the calls they answered and
    ``largest`` the biggest batch (tests, benchmarks and the log line at
    stop read them).
    """

    def __init__(self, database: Database, job: Job, max_batch: int = MAX_BATCH):
        self._db = database
        self._job = job
        self.max_batch = max_batch
        self._queue: list[tuple[I, defer.Deferred[R]]] = []
        self._running = False
        self._scheduled: Optional[Any] = None
        self.jobs = 0
        self.items = 0
        self.largest = 0

    def submit(self, item: I) -> "defer.Deferred[R]":
        """A Deferred firing with ``item``'s result (or its job's failure)."""
        d: defer.Deferred[R] = defer.Deferred()
        self._queue.append((item, d))
        if not self._running and self._scheduled is None:
            self._scheduled = self._db.reactor.callLater(0, self._start)
        return d

    def __len__(self) -> int:
        """Items waiting for a job."""
        return len(self._queue)

    def _start(self) -> None:
        self._scheduled = None
        if self._running or not self._queue:
            return
        batch = self._queue[:self.max_batch]
        del self._queue[:self.max_batch]
        self._running = True
        self.jobs += 1
        self.items += len(batch)
        self.largest = max(self.largest, len(batch))
        items = [item for item, _ in batch]
        d = self._db.run_job(self._job, items, float(self._db.clock.seconds()))
        d.addBoth(self._finished, batch)

    def _finished(self, result: Any, batch: list[tuple[I, defer.Deferred[R]]]) -> None:
        self._running = False
        if self._queue:
            # Start the next job before waking this one's callers: the
            # database works while the reactor runs their callbacks.
            self._start()
        if isinstance(result, Failure):
            for _, d in batch:
                d.errback(result)
            return
        if len(result) != len(batch):
            # Twisted's Failure() is unannotated.
            error = Failure(RuntimeError(  # type: ignore[no-untyped-call]
                f"batch job gave {len(result)} answers for {len(batch)} calls"))
            for _, d in batch:
                d.errback(error)
            return
        for (_, d), answer in zip(batch, result):
            # A cancelled caller (a check that timed out) ignores its answer.
            d.callback(answer)
