"""Small in-memory stores that keep the contracts of ``policy/services.py``.

The real stores live in SQL (``mppproxy/db``); these let tests (and only
tests) run greylisting and the auto-blacklist through the real engine.
Time comes from the reactor they are given, so ``Clock.advance`` moves it.
"""
from __future__ import annotations

import ipaddress
from typing import Any, Optional

from mppproxy.db.blacklist import BlacklistEntry


class MemoryGreylist:
    """RFC 6647 greylisting of (network, sender, recipient) triplets."""

    def __init__(self, reactor: Any):
        self.reactor = reactor
        self.first_seen: dict[tuple[str, str, str], float] = {}
        self.passed: dict[tuple[str, str, str], float] = {}
        self.passes_per_network: dict[str, int] = {}

    async def check(self, client_net: str, sender: str, recipient: str,
                    settings: Any) -> Optional[float]:
        now = self.reactor.seconds()
        triplet = (client_net, sender, recipient)
        if settings.auto_whitelist_after and \
                self.passes_per_network.get(client_net, 0) >= settings.auto_whitelist_after:
            return None
        if triplet in self.passed:
            self.passed[triplet] = now
            return None
        first = self.first_seen.get(triplet)
        if first is None or now - first > settings.retry_window:
            self.first_seen[triplet] = now
            return settings.delay
        if now - first < settings.delay:
            return settings.delay - (now - first)
        self.passed[triplet] = now
        self.passes_per_network[client_net] = self.passes_per_network.get(client_net, 0) + 1
        return None


class MemoryBlacklist:
    def __init__(self, reactor: Any):
        self.reactor = reactor
        self.entries: dict[str, BlacklistEntry] = {}
        # IP version -> prefix lengths listed, so a lookup is a few dict probes.
        self.prefixes: dict[int, set[int]] = {}

    async def lookup(self, client_ip: str) -> Optional[BlacklistEntry]:
        ip = ipaddress.ip_address(client_ip)
        now = self.reactor.seconds()
        for prefix in self.prefixes.get(ip.version, ()):
            network = str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))
            entry = self.entries.get(network)
            if entry is not None and entry.expires > now:
                return entry
        return None

    async def add(self, network: str, seconds: float, reason: str) -> None:
        net = ipaddress.ip_network(network, strict=False)
        self.prefixes.setdefault(net.version, set()).add(net.prefixlen)
        expires = self.reactor.seconds() + seconds
        old = self.entries.get(str(net))
        if old is None or old.expires < expires:
            self.entries[str(net)] = BlacklistEntry(str(net), reason, expires)


class MemoryDatabase:
    """What ``PolicyRuntime(database=...)`` reads: ``.greylist``,
    ``.blacklist`` and ``stop()``."""

    def __init__(self, reactor: Any):
        self.greylist = MemoryGreylist(reactor)
        self.blacklist = MemoryBlacklist(reactor)

    def stop(self) -> None:
        pass
