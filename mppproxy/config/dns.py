"""``[dns]``: the recursive resolvers the checks ask (docs/design.md, "Configuration").

A leaf of ``config/``: ``schema.py`` puts ``DnsConfig`` into ``ProxyConfig``,
``dns/nameservers.py`` turns it into the (IP, port) pairs the resolver asks.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Optional

from mppproxy.config.fields import at_least as _at_least, opt as _opt


def parse_nameserver(text: str) -> Optional[tuple[str, int]]:
    """``IP``, ``IP:PORT`` or ``[IPv6]:PORT`` as (ip, port); None if not."""
    t = text.strip()
    host, port = t, 53
    if t.startswith("["):
        host, _, rest = t[1:].partition("]")
        if rest:
            if not rest.startswith(":") or not rest[1:].isdigit():
                return None
            port = int(rest[1:])
    elif t.count(":") == 1:
        host, _, p = t.partition(":")
        if not p.isdigit():
            return None
        port = int(p)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return None
    return (host, port) if 1 <= port <= 65535 else None


@dataclass(frozen=True)
class DnsConfig:
    """Recursive resolvers the checks ask (DNSBL, SPF)."""

    # "IP" or "IP:PORT" ("[v6]:PORT"); empty: the nameservers in /etc/resolv.conf.
    nameservers: tuple[str, ...] = ()
    timeout: float = field(default=5.0, metadata=_opt(_at_least(0.1)))
    # Seconds between the DNS-list health guard's canary rounds (each list's
    # 127.0.0.1 and test entry, policy/dnsguard.py); 0 turns the canaries
    # off (lists that stop answering are still suspended).
    list_check_interval: float = field(default=300.0, metadata=_opt(_at_least(0)))
