"""A bounded in-process cache whose entries expire: the hot path's answer
before the database is asked (docs/design.md, "with an in-process cache")."""
from __future__ import annotations

from collections import OrderedDict
from typing import Generic, Hashable, Optional, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

DEFAULT_SIZE = 100_000


class ExpiringCache(Generic[K, V]):
    """An LRU mapping of at most ``max_size`` entries, each valid until
    its own time.  Only the reactor thread uses it (no locks)."""

    def __init__(self, max_size: int = DEFAULT_SIZE):
        self.max_size = max_size
        self._data: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def get(self, key: K, now: float) -> Optional[V]:
        entry = self._data.get(key)
        if entry is None:
            return None
        until, value = entry
        if until <= now:
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return value

    def put(self, key: K, value: V, until: float, now: float) -> None:
        """Remember ``value`` until ``until``; a time already past forgets
        the key instead."""
        if until <= now:
            self._data.pop(key, None)
            return
        self._data[key] = (until, value)
        self._data.move_to_end(key)
        while len(self._data) > self.max_size:
            self._data.popitem(last=False)

    def pop(self, key: K) -> None:
        self._data.pop(key, None)

    def clear(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)
