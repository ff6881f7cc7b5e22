"""The one coroutine driver (``mppproxy._async``): every way in, one set of semantics."""
from __future__ import annotations

import contextvars
import sys
from typing import Any, Callable, Generator

import pytest
from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from mppproxy._async import (as_deferred, as_deferred_started, async_to_deferred, drive,
                             drive_started)

_var: contextvars.ContextVar[str] = contextvars.ContextVar("_var", default="unset")


class _Yields:
    """An awaitable that yields ``value`` to the driver itself (as a
    hand-written ``__await__`` may): a Deferred already fired, or anything."""

    def __init__(self, value: object):
        self.value = value

    def __await__(self) -> Generator[Any, Any, Any]:
        return (yield self.value)


def _outcomes() -> tuple[list[Any], Callable[..., None]]:
    got: list[Any] = []

    def then(outcome: Any, *args: Any) -> None:
        got.append((outcome, *args))

    return got, then


def _start_inline(coro: Any) -> Any:
    """The fast path as its callers write it: the first step inline."""
    return coro.send(None)


# -- drive: a protocol callback, no Deferred -------------------------------------------

def test_sync_completion_calls_then_before_drive_returns() -> None:
    """A coroutine that never waits has its result given to ``then``, with the extra arguments, before drive returns."""
    async def work() -> int:
        return 7

    got, then = _outcomes()
    drive(work(), then, "a", "b")
    assert got == [(7, "a", "b")]


def test_async_completion_after_several_awaits() -> None:
    """A coroutine awaiting two Deferreds ends when the second fires, and the Deferreds' results went into it."""
    first: Deferred[int] = Deferred()
    second: Deferred[int] = Deferred()

    async def work() -> int:
        return await first + await second

    got, then = _outcomes()
    drive(work(), then)
    first.callback(2)
    assert got == []
    second.callback(3)
    assert got == [(5,)]
    # Consumed by the coroutine: nothing is left in the Deferreds.
    assert (first.result, second.result) == (None, None)


def test_failure_is_thrown_in_at_the_await_and_caught() -> None:
    """A Deferred that fails raises its exception at the coroutine's await, where the coroutine catches it."""
    failing: Deferred[int] = Deferred()

    async def work() -> str:
        try:
            await failing
        except KeyError as e:
            return f"caught {e.args[0]}"
        return "not reached"

    got, then = _outcomes()
    drive(work(), then)
    failing.errback(KeyError("x"))
    assert got == [("caught x",)]


def test_failure_escaping_reaches_then_as_failure() -> None:
    """An exception the coroutine does not catch reaches ``then`` as a Failure of that exception."""
    failing: Deferred[int] = Deferred()

    async def work() -> int:
        return await failing

    got, then = _outcomes()
    drive(work(), then)
    failing.errback(ValueError("db down"))
    [(outcome,)] = got
    assert isinstance(outcome, Failure) and outcome.check(ValueError)
    assert str(outcome.value) == "db down"


def test_error_raised_before_any_await_reaches_then() -> None:
    """A coroutine that raises in its first step gives ``then`` a Failure at once."""
    async def work() -> int:
        raise RuntimeError("at once")

    got, then = _outcomes()
    drive(work(), then)
    [(outcome,)] = got
    assert outcome.check(RuntimeError)


def test_error_in_then_is_not_swallowed() -> None:
    """An exception raised by ``then`` propagates to the caller instead of disappearing."""
    async def work() -> int:
        return 1

    def then(outcome: Any) -> None:
        raise ZeroDivisionError("in then")

    with pytest.raises(ZeroDivisionError):
        drive(work(), then)


def test_contextvars_copied_at_the_start_and_kept() -> None:
    """Every step runs in the context copied when driving began; what the coroutine sets does not leak out."""
    waiting: Deferred[None] = Deferred()
    seen: list[str] = []

    async def work() -> None:
        seen.append(_var.get())
        _var.set("inside")
        await waiting
        seen.append(_var.get())

    token = _var.set("caller")
    try:
        got, then = _outcomes()
        drive(work(), then)
        _var.set("changed later")
        waiting.callback(None)
        assert seen == ["caller", "inside"]
        assert _var.get() == "changed later"
    finally:
        _var.reset(token)


def test_non_deferred_awaitable_is_sent_back() -> None:
    """A value awaited that is not a Deferred is sent straight back into the coroutine."""
    async def work() -> object:
        return await _Yields("plain")

    got, then = _outcomes()
    drive(work(), then)
    assert got == [("plain",)]


def test_deep_synchronous_chain_does_not_recurse() -> None:
    """Many awaits that complete at once (plain values, Deferreds already fired when handed over) run at constant stack depth."""
    n = sys.getrecursionlimit() * 3

    async def work() -> int:
        total = 0
        for i in range(n):
            total += await _Yields(defer.succeed(1) if i % 2 else 1)
        return total

    got, then = _outcomes()
    drive(work(), then)
    assert got == [(n,)]


def test_already_fired_failure_handed_over_is_thrown_in_and_consumed() -> None:
    """A failed Deferred handed over already fired is thrown in at the await and leaves no unhandled error behind."""
    failed: Deferred[int] = defer.fail(KeyError("early"))

    async def work() -> str:
        try:
            await _Yields(failed)
        except KeyError:
            return "caught"
        return "not reached"

    got, then = _outcomes()
    drive(work(), then)
    assert got == [("caught",)]
    assert failed.result is None


# -- drive_started: the fast path hands over what waits -------------------------------

def test_started_coroutine_finishes_through_the_driver() -> None:
    """A coroutine whose first step ran inline and awaited a Deferred is driven to its end."""
    first: Deferred[int] = Deferred()
    second: Deferred[int] = Deferred()

    async def work() -> int:
        return await first + await second

    coro = work()
    awaited = _start_inline(coro)
    assert awaited is first
    got, then = _outcomes()
    drive_started(coro, awaited, then, "slot")
    first.callback(2)
    second.callback(3)
    assert got == [(5, "slot")]


def test_started_coroutine_failure_reaches_then() -> None:
    """A failure after the hand-over reaches ``then`` as a Failure."""
    failing: Deferred[int] = Deferred()

    async def work() -> int:
        return await failing

    coro = work()
    got, then = _outcomes()
    drive_started(coro, _start_inline(coro), then)
    failing.errback(ValueError("late"))
    [(outcome,)] = got
    assert outcome.check(ValueError)


def test_started_coroutine_awaiting_a_plain_value_gets_it_back() -> None:
    """A first step that awaited a plain value has that value sent back by the driver."""
    async def work() -> object:
        return await _Yields("back")

    coro = work()
    got, then = _outcomes()
    drive_started(coro, _start_inline(coro), then)
    assert got == [("back",)]


# -- Deferreds where Twisted wants them ----------------------------------------------

def test_as_deferred_gives_the_result() -> None:
    """as_deferred's Deferred fires with the coroutine's result once its awaits fire."""
    waiting: Deferred[int] = Deferred()

    async def work() -> int:
        return await waiting * 2

    d = as_deferred(work())
    waiting.callback(21)
    assert d.result == 42


def test_async_to_deferred_decorator() -> None:
    """A decorated async function returns a Deferred of its result, and keeps its name."""
    @async_to_deferred
    async def double(x: int) -> int:
        return x * 2

    d = double(4)
    assert isinstance(d, Deferred) and d.result == 8
    assert double.__name__ == "double"


def test_cancellation_raises_cancelled_error_at_the_await() -> None:
    """Cancelling the Deferred (a timeout) raises CancelledError at the coroutine's await, which may catch it."""
    waiting: Deferred[int] = Deferred()

    async def work() -> str:
        try:
            await waiting
        except CancelledError:
            return "timed out"
        return "not reached"

    clock = Clock()
    d = as_deferred(work())
    d.addTimeout(5, clock)
    clock.advance(5)
    assert d.result == "timed out"
    assert waiting.called


def test_started_deferred_is_cancellable() -> None:
    """The Deferred of a started coroutine cancels the Deferred it waits on, and fails with CancelledError."""
    waiting: Deferred[int] = Deferred()

    async def work() -> int:
        return await waiting

    coro = work()
    d = as_deferred_started(coro, _start_inline(coro))
    d.cancel()
    assert waiting.called
    failures: list[Failure] = []
    d.addErrback(failures.append)
    assert failures[0].check(CancelledError)


def test_started_deferred_of_plain_values_and_errors() -> None:
    """A started coroutine that only awaited plain values, or raised, gives an already fired Deferred."""
    async def fine() -> object:
        return await _Yields("v")

    async def broken() -> object:
        await _Yields("v")
        raise KeyError("k")

    coro = fine()
    assert as_deferred_started(coro, _start_inline(coro)).result == "v"
    coro2 = broken()
    failures: list[Failure] = []
    as_deferred_started(coro2, _start_inline(coro2)).addErrback(failures.append)
    assert failures[0].check(KeyError)
