"""The one coroutine driver: how our ``async def`` code runs on Twisted.

Ground floor (docs/design.md, "Floors"): used by every stage that runs
coroutines; it knows nothing of them.  Three ways in, one loop:

- ``drive(coro, then, *args)``: a protocol callback starts a coroutine and
  hears ``then(result, *args)`` when it ends, ``result`` a ``Failure`` if it
  raised.  No Deferred is made for the result and nothing can cancel it:
  the SMTP session runs each MAIL, RCPT and end of DATA this way, several
  microseconds per command cheaper than ``Deferred.fromCoroutine``.
- ``drive_started(coro, awaited, then, *args)``: the fast path.  The caller
  sends the coroutine's first step inline (``coro.send(None)``: most policy
  decisions and checks end there, from memory, with no driver at all);
  only a coroutine that awaits is handed over, with what it awaited.
- ``as_deferred(coro)`` / ``@async_to_deferred`` / ``as_deferred_started``:
  a Deferred where Twisted wants one (``addTimeout``, ``gatherResults``, a
  service's ``stopService``).  These are ``Deferred.fromCoroutine``:
  cancelling the Deferred raises ``CancelledError`` at the current
  ``await`` (per-check time limits rely on it).

The loop keeps Twisted's semantics: each step runs in the ``contextvars``
context copied when the driver took the coroutine; a failure is thrown in
at the ``await`` (the coroutine may catch it); anything awaited that is not
a Deferred is sent straight back; a Deferred that fires while the driver
attaches to it hands its result to the running loop instead of starting a
nested one, so a long run of such awaits takes constant stack.  An error
raised by ``then`` is not swallowed: it propagates to whoever fired the
last Deferred (or to the caller of ``drive`` when nothing waited).
"""
from __future__ import annotations

import functools
from contextvars import copy_context
from typing import Any, Callable, Coroutine, ParamSpec, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure

__all__ = ["drive", "drive_started", "as_deferred", "as_deferred_started", "async_to_deferred"]

_T = TypeVar("_T")
_P = ParamSpec("_P")

# Marks "no result arrived while attaching" (None is a result).
_NOTHING: Any = object()

# A cancellable Deferred for a coroutine not yet started.  Twisted's own
# function under our name: no extra call on the way.
as_deferred = Deferred.fromCoroutine


def drive(coro: Coroutine[Any, Any, Any], then: Callable[..., object], *args: Any) -> None:
    """Run ``coro`` now; when it ends, ``then(result, *args)``, where the
    result is a ``Failure`` if it raised.  ``then`` runs before ``drive``
    returns if the coroutine never waits."""
    _driver(coro, then, args)(None, False)


def drive_started(coro: Coroutine[Any, Any, Any], awaited: object,
                  then: Callable[..., object], *args: Any) -> None:
    """``drive`` for a coroutine whose first step the caller ran inline and
    which then awaited ``awaited`` (what ``coro.send(None)`` returned).

    The first step ran in the caller's context; the later ones run in a
    copy of the context taken here."""
    step = _driver(coro, then, args)
    if isinstance(awaited, Deferred):
        awaited.addCallbacks(step, step, callbackArgs=(False,), errbackArgs=(True,))
    else:
        step(awaited, False)


def as_deferred_started(coro: Coroutine[Any, Any, _T], awaited: object) -> Deferred[_T]:
    """``as_deferred`` for a coroutine whose first step the caller ran
    inline and which then awaited ``awaited``: a cancellable Deferred of
    its result (cancelling it cancels the Deferred it waits on)."""
    while not isinstance(awaited, Deferred):
        # Sent straight back, as the driver does, until it waits on a
        # Deferred or ends.
        try:
            awaited = coro.send(awaited)
        except StopIteration as e:
            return succeed(e.value)
        except BaseException:
            return fail()
    # Sending None again to a coroutine suspended in ``await d`` (``d``
    # without a result) hands back ``d`` itself: Twisted's loop picks it
    # up there.
    return Deferred.fromCoroutine(coro)


def async_to_deferred(f: Callable[_P, Coroutine[Any, Any, _T]]) -> Callable[_P, Deferred[_T]]:
    """Decorate an ``async def`` for callers that want a Deferred (Twisted
    interfaces), like Tahoe-LAFS's decorator of the same name."""

    @functools.wraps(f)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> Deferred[_T]:
        return Deferred.fromCoroutine(f(*args, **kwargs))

    return wrapper


def _driver(coro: Coroutine[Any, Any, Any], then: Callable[..., object],
            args: tuple[Any, ...]) -> Callable[[Any, bool], None]:
    """The step function of one driven coroutine: ``step(result, failed)``
    sends ``result`` in (throws it, if ``failed``) and goes on until the
    coroutine waits on a Deferred without a result, or ends.

    A closure rather than an object: the Deferreds call ``step`` itself,
    where a method would cost a bound-method object per ``await``."""
    context = copy_context()
    # True while the loop attaches ``step`` to a Deferred that already has
    # a result; the result then waits in ``early`` for the loop.
    attaching = False
    early: Any = _NOTHING
    early_failed = False

    def step(result: Any, failed: bool) -> None:
        nonlocal attaching, early, early_failed
        if attaching:
            early, early_failed = result, failed
            return None
        while True:
            try:
                if failed:
                    awaited = context.run(result.throwExceptionIntoGenerator, coro)
                else:
                    awaited = context.run(coro.send, result)
            except StopIteration as e:
                outcome = e.value
                break
            except BaseException:
                outcome = Failure()  # type: ignore[no-untyped-call]
                break
            if isinstance(awaited, Deferred):
                if not awaited.called:
                    # The usual case: the Deferred resumes us.  Its result
                    # goes into the coroutine (``await`` reads it while our
                    # callback runs), so it then holds None.
                    awaited.addCallbacks(step, step, callbackArgs=(False,), errbackArgs=(True,))
                    return None
                # Fired already (a hand-written awaitable may yield such a
                # one; ``await d`` never does): attached, it would call
                # ``step`` at once, one level deeper per await.  Its result
                # comes back to this loop instead.
                attaching = True
                awaited.addCallbacks(step, step, callbackArgs=(False,), errbackArgs=(True,))
                attaching = False
                result = early
                if result is _NOTHING:  # paused, or running its callbacks: later
                    return None
                early, failed = _NOTHING, early_failed
                continue
            # Anything else awaited is sent back at once, as Twisted does.
            result, failed = awaited, False
        # Outside the except clauses: an error in ``then`` must not read
        # as raised while handling the coroutine's end.
        then(outcome, *args)
        return None

    return step
