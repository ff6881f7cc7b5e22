"""What the checks share: DNS, the shared stores, counters, the clock.

Built once per process by the service (``make_services``) and handed to
every check; construction does no I/O (STYLE.md).  The stores keep their
state in SQL (``mppproxy/db``) so several edge nodes share it, behind an
in-process cache that keeps the hot path off the database.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

from mppproxy.db.allowlist import Decision
from mppproxy.db.blacklist import BlacklistEntry
from mppproxy.dns.resolver import Resolver
from mppproxy.policy.dnshealth import DnsListHealth


class BlacklistStore(Protocol):
    """The shared auto-blacklist (spam traps and thresholds write it, the
    ``blacklist`` check reads it)."""

    async def lookup(self, client_ip: str) -> Optional[BlacklistEntry]:
        """The unexpired entry covering ``client_ip`` (any prefix), or None."""

    async def add(self, network: str, seconds: float, reason: str) -> None:
        """List ``network`` (CIDR) for ``seconds`` from now; an existing
        entry is extended, never shortened."""


class AllowListStore(Protocol):
    """Each recipient domain's allow and block lists (``db/allowlist.py``:
    domain administrators and "release and allow this sender" write them,
    the ``access`` check reads them).  Answered from memory; only lists
    too large to mirror wait for the database."""

    async def decide(self, domain: str, sender: str, client_ip: str) -> Optional[Decision]:
        """The block entry of ``domain`` matching the sender or the client
        network, else its allow entry, else None."""

    async def lookup(self, domain: str, sender: str) -> Optional[str]:
        """The entry allowing ``sender`` to recipients at ``domain`` (an
        address, ``@domain`` or ``.parent``), or None."""


class GreylistStore(Protocol):
    async def check(self, client_net: str, sender: str, recipient: str,
                    settings: Any) -> Optional[float]:
        """None when the triplet (or the client network, auto-whitelisted)
        may pass now; else the seconds the client should still wait."""


@dataclass
class PolicyServices:
    reactor: Any
    # Our name, the authserv-id of Authentication-Results (RFC 8601 2.5).
    hostname: str = "localhost"
    resolver: Optional[Resolver] = None
    blacklist: Optional[BlacklistStore] = None
    greylist: Optional[GreylistStore] = None
    allowlist: Optional[AllowListStore] = None
    counters: Any = None  # mppproxy.policy.counters.RateCounters
    spf: Any = None  # the SPF evaluator
    # Each DNS list's recent answers (the dnsbl check notes them), for the
    # dashboard's health table (policy/dnshealth.py).
    dns_health: DnsListHealth = field(default_factory=DnsListHealth)
    # Suspends a DNS list that lists everything or stops answering
    # (policy/dnsguard.py); None: every configured list is always asked.
    dns_guard: Any = None

    def now(self) -> float:
        return float(self.reactor.seconds())
