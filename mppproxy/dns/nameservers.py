"""Whom the resolver asks: the configured nameservers, else the system's
(docs/design.md, "Floors": a leaf).

Reading /etc/resolv.conf (dnspython parses it) is file I/O, not network
I/O; it happens when the runtime is built and on reload.
"""
from __future__ import annotations

import dns.resolver

from mppproxy.config.dns import DnsConfig, parse_nameserver


def system_nameservers() -> tuple[tuple[str, int], ...]:
    """The resolvers in /etc/resolv.conf (dnspython reads it; no I/O on
    the network), else 127.0.0.1."""
    try:
        found = dns.resolver.Resolver(configure=True).nameservers
    except (dns.resolver.NoResolverConfiguration, OSError):
        found = []
    servers = []
    for ns in found[:4]:
        parsed = parse_nameserver(str(ns))
        if parsed is not None:
            servers.append(parsed)
    return tuple(servers) or (("127.0.0.1", 53),)


def nameservers(config: DnsConfig) -> tuple[tuple[str, int], ...]:
    """The (IP, port) pairs of ``config.nameservers``, or the system's when
    none are set."""
    if config.nameservers:
        return tuple(p for p in (parse_nameserver(n) for n in config.nameservers) if p)
    return system_nameservers()
