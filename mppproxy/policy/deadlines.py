"""Time limits for the checks that wait, on one timer per engine.

``Deferred.addTimeout`` arms a ``DelayedCall`` per Deferred and cancels it
when the Deferred fires: at a few thousand waiting checks a second that
was ~7 % of the policy server's CPU (py-spy, GIL samples).  Every check of
one engine has the same limit (``policy.check_timeout``), so deadlines
arrive in the order the checks start: a FIFO queue, and one timer for its
head, do the same work.  Checks that finish in time leave the queue from
the head, the next time anything is queued or the timer fires, so the
queue holds about the checks of the last moment, not of the last
``check_timeout`` seconds.
"""
from __future__ import annotations

import collections
from typing import Any, Optional

from twisted.internet import defer


class Deadlines:
    """``watch(d)`` cancels ``d`` if it has not fired ``seconds`` from now;
    ``expired(d)`` then tells a timeout from any other cancellation."""

    def __init__(self, reactor: Any, seconds: float):
        self.reactor = reactor
        self.seconds = seconds
        self._queue: collections.deque[tuple[float, defer.Deferred[Any]]] = collections.deque()
        self._timer: Optional[Any] = None
        self._expired: set[int] = set()

    def __len__(self) -> int:
        return len(self._queue)

    def watch(self, d: defer.Deferred[Any]) -> None:
        queue = self._queue
        while queue and queue[0][1].called:
            queue.popleft()
        queue.append((self.reactor.seconds() + self.seconds, d))
        if self._timer is None:
            self._timer = self.reactor.callLater(self.seconds, self._fire)

    def expired(self, d: defer.Deferred[Any]) -> bool:
        """Whether ``d`` was cancelled by its deadline (asked once, when its
        CancelledError arrives)."""
        try:
            self._expired.remove(id(d))
        except KeyError:
            return False
        return True

    def _fire(self) -> None:
        self._timer = None
        now = self.reactor.seconds()
        queue = self._queue
        while queue and (queue[0][1].called or queue[0][0] <= now):
            _, d = queue.popleft()
            if not d.called:
                # Marked first: cancel() runs the waiter's errback at once.
                self._expired.add(id(d))
                d.cancel()
                self._expired.discard(id(d))
        if queue:
            self._timer = self.reactor.callLater(max(0.0, queue[0][0] - now), self._fire)

    def stop(self) -> None:
        """Drop the timer, at shutdown.  (An engine replaced by a reload
        keeps its timer while its checks in flight wait, then it lapses.)"""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
