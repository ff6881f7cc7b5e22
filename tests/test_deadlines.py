"""One timer for every waiting check's time limit (mppproxy/policy/deadlines.py)."""
from __future__ import annotations

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock

from mppproxy.policy.deadlines import Deadlines


def watched(deadlines: Deadlines, seen: list) -> Deferred:
    d: Deferred = Deferred()
    d.addErrback(lambda f: seen.append((f.check(CancelledError), deadlines.expired(d))))
    deadlines.watch(d)
    return d


def test_late_deferred_is_cancelled_at_its_deadline_and_marked_expired():
    """A watched Deferred still waiting at its deadline, and not before, is cancelled and
    reported as expired, leaving no timer behind."""
    clock = Clock()
    deadlines = Deadlines(clock, 2.0)
    seen: list = []
    watched(deadlines, seen)
    clock.advance(1.9)
    assert seen == []
    clock.advance(0.2)
    assert seen == [(CancelledError, True)]
    assert len(deadlines) == 0 and not clock.getDelayedCalls()


def test_deadlines_in_start_order_on_one_timer():
    """Deadlines of Deferreds watched at different times share one timer, and each fires at its
    own time only for Deferreds that have not fired yet."""
    clock = Clock()
    deadlines = Deadlines(clock, 2.0)
    seen: list = []
    first = watched(deadlines, seen)
    clock.advance(1.0)
    watched(deadlines, seen)
    watched(deadlines, seen)
    assert len(clock.getDelayedCalls()) == 1
    first.callback("in time")
    clock.advance(1.5)  # the first's deadline passed, but it had fired
    assert seen == []
    clock.advance(0.6)  # the other two's
    assert seen == [(CancelledError, True), (CancelledError, True)]
    assert not clock.getDelayedCalls()


def test_finished_deferreds_leave_the_queue_without_waiting_for_the_timer():
    """Deferreds that fired before their deadline are dropped from the queue as new ones are
    watched, so it does not grow with them."""
    clock = Clock()
    deadlines = Deadlines(clock, 10.0)
    for _ in range(1000):
        d: Deferred = Deferred()
        deadlines.watch(d)
        d.callback(None)
    assert len(deadlines) == 1  # only the last one, not yet pruned


def test_other_cancellation_is_not_an_expiry():
    """A Deferred cancelled by someone else is not reported as expired, and its deadline later
    does nothing more."""
    clock = Clock()
    deadlines = Deadlines(clock, 2.0)
    seen: list = []
    d = watched(deadlines, seen)
    d.cancel()
    assert seen == [(CancelledError, False)]
    clock.advance(3)  # the timer finds it fired and does nothing more
    assert seen == [(CancelledError, False)]


def test_stop_drops_the_timer():
    """stop() cancels the pending timer."""
    clock = Clock()
    deadlines = Deadlines(clock, 2.0)
    watched(deadlines, [])
    deadlines.stop()
    assert not clock.getDelayedCalls()
