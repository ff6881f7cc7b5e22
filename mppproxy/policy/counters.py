"""Sliding-window message and spam counters per client (thresholds).

Counted in process: each node limits what it sees, and the resulting
blacklist entries are shared through the database.  Bounded: a key keeps
at most as many timestamps as its limit needs, and keys idle past their
period are dropped when the table grows.
"""
from __future__ import annotations

import functools
from collections import deque
from typing import Any, Optional

from mppproxy.match import network_of, parse_ip

MAX_KEYS = 200_000
# A window never holds more timestamps than this; limits above it are
# counted as "at least this many".
MAX_EVENTS = 100_000


@functools.lru_cache(maxsize=65536)
def client_key(client_ip: str, ipv4_prefix: int, ipv6_prefix: int) -> Optional[str]:
    """The client's address, or its network at the given prefix, as CIDR."""
    ip = parse_ip(client_ip)
    if ip is None:
        return None
    return network_of(ip, ipv4_prefix if ip.version == 4 else ipv6_prefix)


class RateCounters:
    def __init__(self, clock: Any):
        self._clock = clock
        self._messages: dict[tuple[str, str], deque[float]] = {}
        self._spam: dict[tuple[str, str], deque[float]] = {}

    def _add(self, table: dict[tuple[str, str], deque[float]], key: tuple[str, str],
             period: float) -> int:
        now = self._clock.seconds()
        window = table.get(key)
        if window is None:
            if len(table) >= MAX_KEYS:
                self._prune(table, now, period)
            window = table[key] = deque(maxlen=MAX_EVENTS)
        window.append(now)
        return self._trim(window, now, period)

    @staticmethod
    def _trim(window: deque[float], now: float, period: float) -> int:
        cutoff = now - period
        while window and window[0] <= cutoff:
            window.popleft()
        return len(window)

    def _prune(self, table: dict[tuple[str, str], deque[float]], now: float, period: float) -> None:
        for key in [k for k, w in table.items() if not w or w[-1] <= now - period]:
            del table[key]
        if len(table) >= MAX_KEYS:
            table.clear()

    def add_message(self, network: str, policy: str, period: float, shared: bool = False) -> int:
        """Count one message; the number in the last ``period`` seconds.
        ``shared``: also the other processes' (``sharedcounters.py``;
        counted here in this process only)."""
        return self._add(self._messages, (network, policy), period)

    def add_spam(self, network: str, policy: str, period: float, shared: bool = False) -> int:
        """Count one spam verdict (post-DATA scanning calls this)."""
        return self._add(self._spam, (network, policy), period)

    def spam_count(self, network: str, policy: str, period: float, shared: bool = False) -> int:
        window = self._spam.get((network, policy))
        if window is None:
            return 0
        return self._trim(window, self._clock.seconds(), period)
