"""The one adapter between coroutines and Twisted Deferreds (STYLE.md).

We write ``async def`` everywhere and convert once, where Twisted wants a
Deferred, as Tahoe-LAFS's ``async_to_deferred`` does.
"""
from __future__ import annotations

import functools
from typing import Any, Awaitable, Callable, TypeVar

from twisted.internet.defer import Deferred

T = TypeVar("T")


def async_to_deferred(fn: Callable[..., Awaitable[T]]) -> Callable[..., Deferred[T]]:
    """Wrap a coroutine function so that calling it returns a Deferred."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Deferred[T]:
        return Deferred.fromCoroutine(fn(*args, **kwargs))

    return wrapper
