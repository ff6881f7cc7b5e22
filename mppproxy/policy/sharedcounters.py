"""Threshold counters summed over every process and node on one state
database (issue 16, "Shared limits and counters"), batched so the hot path
stays off it.

Stage: policy, beside ``counters.py``.  ``thresholds.shared = true`` in a
policy counts its clients here: with ``workers = 2`` or two edges behind
one MX, a client spreading its mail over the processes meets the same
``max_messages``/``max_spam`` as one talking to a single process.

Each process counts its own messages exactly, in memory (``RateCounters``),
and adds what the others counted as of its last look at the database.
Every ``SYNC_INTERVAL`` seconds it writes its new counts (one upsert that
adds to the rows: time bucket, client, policy, process;
``db/ratecounts.py``) and reads the other processes' buckets of the clients
it counted lately.  So a count is exact for this process and at most
``SYNC_INTERVAL`` seconds behind for the others, whose window edges are
``BUCKET_SECONDS`` coarse; a client's first message at this process sees
only its own count until the next sync (the others' rows are read for the
clients this process has counted, so a sync reads little).  A database that cannot be reached leaves each
process counting alone (one warning); the writes it missed are kept for the
next sync (bounded by ``MAX_PENDING``).
"""
from __future__ import annotations

import os
import secrets
import socket
from collections import defaultdict
from typing import Any, Callable, Optional

from twisted.internet import defer, task

from mppproxy.db.ratecounts import (BUCKET_SECONDS, MAX_PENDING, MESSAGES, POLICY_LENGTH, SPAM,
                                    SYNC_INTERVAL, Key, sync_counts)
from mppproxy.logsetup import Logger
from mppproxy.policy.counters import RateCounters

log = Logger()


class SharedRateCounters(RateCounters):
    """``RateCounters`` whose counts of ``shared`` policies add the other
    processes' (``policy/checks/thresholds.py`` asks with ``shared``).
    ``database()`` gives the state database (its ``run``), or None."""

    def __init__(self, clock: Any, database: Callable[[], Any],
                 interval: float = SYNC_INTERVAL):
        super().__init__(clock)
        self.database = database
        self.interval = interval
        self.source = f"{socket.gethostname()[:60]}:{os.getpid()}:{secrets.token_hex(4)}"
        self._pending: dict[tuple[int, str, str, str], int] = defaultdict(int)
        self._others: dict[Key, list[tuple[int, int]]] = {}
        # Clients counted lately, shared policies only: network -> last time.
        self._seen: dict[str, float] = {}
        self._horizon = 0.0
        self._loop: Optional[task.LoopingCall] = None
        self._syncing: Optional[defer.Deferred[None]] = None
        self._failing = False
        self._last_purge = 0.0
        self.syncs = 0

    # -- counting -------------------------------------------------------------------------

    def add_message(self, network: str, policy: str, period: float, shared: bool = False) -> int:
        own = super().add_message(network, policy, period)
        if not shared:
            return own
        self._count(MESSAGES, network, policy, period)
        return own + self._other(MESSAGES, network, policy, period)

    def add_spam(self, network: str, policy: str, period: float, shared: bool = False) -> int:
        own = super().add_spam(network, policy, period)
        if not shared:
            return own
        self._count(SPAM, network, policy, period)
        return own + self._other(SPAM, network, policy, period)

    def spam_count(self, network: str, policy: str, period: float, shared: bool = False) -> int:
        own = super().spam_count(network, policy, period)
        if not shared:
            return own
        self._note(network, period)
        return own + self._other(SPAM, network, policy, period)

    def _note(self, network: str, period: float) -> None:
        now = float(self._clock.seconds())
        self._seen[network] = now
        if period > self._horizon:
            self._horizon = period
        if self._loop is None and self.interval > 0:
            self._loop = task.LoopingCall(self.sync)
            self._loop.clock = self._clock
            self._loop.start(self.interval, now=False)

    def _count(self, kind: str, network: str, policy: str, period: float) -> None:
        self._note(network, period)
        if len(self._pending) >= MAX_PENDING:
            oldest = min(self._pending)
            del self._pending[oldest]
        bucket = int(self._clock.seconds()) // BUCKET_SECONDS * BUCKET_SECONDS
        self._pending[(bucket, kind, policy[:POLICY_LENGTH], network)] += 1

    def _other(self, kind: str, network: str, policy: str, period: float) -> int:
        buckets = self._others.get((kind, policy[:POLICY_LENGTH], network))
        if not buckets:
            return 0
        # A bucket counts while any of it is inside the window.
        since = float(self._clock.seconds()) - period - BUCKET_SECONDS
        return sum(n for bucket, n in buckets if bucket > since)

    # -- syncing ----------------------------------------------------------------------------

    def sync(self) -> defer.Deferred[None]:
        """Write ours, read the others' (never two at once; never fails)."""
        if self._syncing is not None:
            return self._syncing
        if not self._pending and not self._seen:
            return defer.succeed(None)  # no shared policy counted anything here
        db = self.database()
        if db is None or not getattr(db, "running", True):
            return defer.succeed(None)  # not started yet, or stopped: next time
        now = float(self._clock.seconds())
        for network in [n for n, t in self._seen.items() if t < now - self._horizon]:
            del self._seen[network]
        pending, self._pending = dict(self._pending), defaultdict(int)
        since = int(now - self._horizon) // BUCKET_SECONDS * BUCKET_SECONDS - BUCKET_SECONDS
        purge = None
        if now - self._last_purge > max(60.0, self._horizon):
            purge, self._last_purge = since - BUCKET_SECONDS, now
        d: defer.Deferred[Any] = db.run(sync_counts, db.tables, self.source, pending, since,
                                        sorted(self._seen), purge)
        d.addCallbacks(self._synced, self._failed, errbackArgs=(pending, db))
        self._syncing = d
        d.addBoth(self._done)
        return d

    def _synced(self, others: dict[Key, list[tuple[int, int]]]) -> None:
        self._others = others
        self.syncs += 1
        if self._failing:
            log.info("shared threshold counts: the state database answers again")
            self._failing = False

    def _failed(self, failure: Any, pending: dict[tuple[int, str, str, str], int],
                db: Any) -> None:
        for key, n in pending.items():
            if len(self._pending) < MAX_PENDING:
                self._pending[key] += n
        if not self._failing:
            log.warn("shared threshold counts: state database {database} not reachable "
                     "({error}); each process counts alone until it is",
                     database=getattr(db, "name", "?"), error=failure.getErrorMessage()[:300])
            self._failing = True

    def _done(self, _: object) -> None:
        self._syncing = None

    def stop(self) -> defer.Deferred[None]:
        """End the loop; write what is pending once more."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        return self.sync()
