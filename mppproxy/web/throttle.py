"""Login throttling for the web console: per account name and per client
address (issue 13), so neither guessing one account's password from many
addresses nor many accounts' from one address goes fast.

Floor 3 (``mppproxy/web/``).  After ``failures`` failed logins for a key
each further attempt must wait: ``lockout`` seconds, doubled with each
further failure, at most MAX_WAIT (the doubling of OWASP's authentication
cheat sheet, "login throttling").  A success clears the account's and the
address's counts.  IPv6 clients count per /64: one host usually holds a
whole /64 (RFC 4291 2.5.1; RFC 7421).

Kept in memory, per process: a restart forgets the counts, and with
several nodes behind a load balancer each node counts on its own
(docs/console.md says so).  Memory is bounded: at most MAX_KEYS keys,
those expired first and then the oldest dropped.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Sequence

# An hour: the longest wait, and how long a key's failures are remembered
# after its last one.
MAX_WAIT = 3600.0
MAX_KEYS = 10000


@dataclass
class _Entry:
    failures: int
    until: float
    last: float


def address_key(address: str) -> str:
    """The key of a client address: the address, or an IPv6 one's /64."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return f"ip:{address}"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return f"ip:{ip.ipv4_mapped}"
        return f"ip:{ipaddress.ip_network(f'{ip}/64', strict=False)}"
    return f"ip:{ip}"


def keys_for(name: str, address: str) -> tuple[str, str]:
    return (f"name:{name.strip().lower()[:64]}", address_key(address))


class LoginThrottle:
    """Counts failures per key; says how long an attempt must wait."""

    def __init__(self, failures: int, lockout: float) -> None:
        self.failures = failures
        self.lockout = lockout
        self._entries: dict[str, _Entry] = {}

    def wait(self, keys: Sequence[str], now: float) -> float:
        """Seconds until an attempt for ``keys`` may be made (0: now)."""
        return max([0.0] + [self._entries[k].until - now for k in keys if k in self._entries])

    def failed(self, keys: Sequence[str], now: float) -> None:
        for key in keys:
            entry = self._entries.get(key)
            if entry is None or now - entry.last > MAX_WAIT:
                entry = self._entries[key] = _Entry(0, 0.0, now)
            entry.failures += 1
            entry.last = now
            over = entry.failures - self.failures
            if over >= 0:
                entry.until = now + min(self.lockout * 2.0 ** min(over, 20), MAX_WAIT)
        if len(self._entries) > MAX_KEYS:
            self._prune(now)

    def succeeded(self, keys: Sequence[str]) -> None:
        for key in keys:
            self._entries.pop(key, None)

    def _prune(self, now: float) -> None:
        for key in [k for k, e in self._entries.items()
                    if e.until <= now and now - e.last > MAX_WAIT]:
            del self._entries[key]
        if len(self._entries) > MAX_KEYS:
            oldest = sorted(self._entries, key=lambda k: self._entries[k].last)
            for key in oldest[:len(self._entries) - MAX_KEYS]:
                del self._entries[key]
