"""Matching clients, HELO names and addresses against admin-written lists.

Ground floor (docs/design.md, "Floors"): relay control, the policy checks,
the do-not-scan lists of the scan stage, the disclaimer tables and the
config loader's validation all use these sets, and they import nothing of
the stages.

One notation everywhere (docs/configuration.md, "Lists"):

* clients: ``192.0.2.7``, ``192.0.2.0/24``, ``2001:db8::/32``;
* addresses: ``user@example.com`` (that address), ``user@`` (that local
  part in any domain), ``example.com`` or ``@example.com`` (the domain),
  ``.example.com`` or ``*.example.com`` (its subdomains, not itself), ``<>``
  (the null sender);
* HELO names: ``mail.example.com``, ``.example.com`` / ``*.example.com``,
  ``[192.0.2.7]``.

Matching is case-insensitive and ignores a trailing dot.  Lookups cost one
set probe per distinct prefix length or domain label, so lists of thousands
of entries stay cheap.  The ``check_*`` functions validate the same
notation for the config loader, so what loads is what matches.
"""
from __future__ import annotations

import functools
import ipaddress
from typing import Iterable, Optional


def _domain_key(text: str) -> str:
    return text.strip().rstrip(".").lower()


# -- clients ------------------------------------------------------------------

def check_cidrs(values: tuple[str, ...]) -> Optional[str]:
    for v in values:
        try:
            ipaddress.ip_network(v.strip(), strict=False)
        except ValueError:
            return f"{v!r} is not an IP address or network (192.0.2.0/24, 2001:db8::/32)"
    return None


# Clients seen lately (an MX sees tens of thousands an hour); ~200 bytes each.
@functools.lru_cache(maxsize=32768)
def parse_ip(text: str) -> Optional[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The client address, IPv4-mapped IPv6 as IPv4; None if not an address.
    Cached: each check asks again about the same client (the addresses are
    immutable values)."""
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


# Network masks by prefix length.
V4_MASKS = tuple(((1 << 32) - 1) ^ ((1 << (32 - p)) - 1) for p in range(33))
V6_MASKS = tuple(((1 << 128) - 1) ^ ((1 << (128 - p)) - 1) for p in range(129))


def v4_text(n: int) -> str:
    return f"{n >> 24}.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"


def v6_text(n: int) -> str:
    """``str(IPv6Address(n))`` without building the object: the longest
    run of two or more zero hextets (the first of equals) becomes "::"
    (RFC 5952 section 4.2)."""
    if n >> 32 == 0xFFFF:
        # IPv4-mapped: Python versions write these differently.
        return str(ipaddress.IPv6Address(n))
    hextets = [n >> shift & 0xFFFF for shift in range(112, -1, -16)]
    best, best_len, start, length = -1, 1, -1, 0
    for i, h in enumerate(hextets):
        if h:
            length = 0
            continue
        if not length:
            start = i
        length += 1
        if length > best_len:
            best, best_len = start, length
    words = [f"{h:x}" for h in hextets]
    if best < 0:
        return ":".join(words)
    return ":".join(words[:best]) + "::" + ":".join(words[best + best_len:])


def network_of(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, prefix: int) -> str:
    """The network of ``ip`` at ``prefix`` as ``str(ipaddress.ip_network(...,
    strict=False))`` writes it, without building the network object."""
    if ip.version == 4:
        return f"{v4_text(int(ip) & V4_MASKS[prefix])}/{prefix}"
    return f"{v6_text(int(ip) & V6_MASKS[prefix])}/{prefix}"


class NetworkSet:
    """A set of IPv4/IPv6 networks; ``in`` takes an address string."""

    def __init__(self, networks: Iterable[str]):
        # version -> prefix length -> network addresses as integers
        by_prefix: dict[int, dict[int, set[int]]] = {4: {}, 6: {}}
        for text in networks:
            net = ipaddress.ip_network(text.strip(), strict=False)
            if net.version == 6 and net.prefixlen >= 96 and net.network_address.ipv4_mapped:
                mapped = net.network_address.ipv4_mapped
                net = ipaddress.ip_network(f"{mapped}/{net.prefixlen - 96}", strict=False)
            by_prefix[net.version].setdefault(net.prefixlen, set()).add(int(net.network_address))
        # version -> [(mask, networks)]: one AND and one set probe per
        # prefix length in use (asked several times per recipient).
        masks = {4: V4_MASKS, 6: V6_MASKS}
        self._probes: dict[int, list[tuple[int, set[int]]]] = {
            version: [(masks[version][prefix], nets) for prefix, nets in sorted(prefixes.items())]
            for version, prefixes in by_prefix.items()}
        self._empty = not any(self._probes.values())

    def __bool__(self) -> bool:
        return not self._empty

    def __contains__(self, host: str) -> bool:
        if self._empty:
            return False
        ip = parse_ip(host)
        if ip is None:
            return False
        value = int(ip)
        for mask, nets in self._probes[ip.version]:
            if value & mask in nets:
                return True
        return False


# -- domains and addresses ----------------------------------------------------

def _split_domain_pattern(text: str) -> tuple[str, bool]:
    """(domain, subdomains_only) for ``example.com``/``.example.com``/``*.example.com``."""
    t = _domain_key(text)
    if t.startswith("*."):
        return t[2:], True
    if t.startswith("."):
        return t[1:], True
    return t, False


def _bad_domain(domain: str) -> bool:
    return (not domain or any(c.isspace() for c in domain) or "@" in domain
            or "*" in domain or ".." in domain)


def check_address_patterns(values: tuple[str, ...]) -> Optional[str]:
    for v in values:
        t = v.strip()
        if t == "<>":
            continue
        if "@" in t:
            local, _, domain = t.rpartition("@")
            if domain and _bad_domain(_split_domain_pattern(domain)[0]):
                return f"{v!r}: {domain!r} is not a domain name"
            if not local and not domain:
                return f"{v!r} is not an address pattern"
            continue
        if _bad_domain(_split_domain_pattern(t)[0]):
            return (f"{v!r} is not an address pattern (user@example.com, user@, example.com, "
                    f".example.com or <>)")
    return None


class DomainSet:
    """Domains matched exactly or by a parent listed as ``.parent``."""

    def __init__(self) -> None:
        self.exact: set[str] = set()
        self.parents: set[str] = set()

    def add(self, pattern: str) -> None:
        domain, subdomains = _split_domain_pattern(pattern)
        (self.parents if subdomains else self.exact).add(domain)

    def __bool__(self) -> bool:
        return bool(self.exact or self.parents)

    def __contains__(self, domain: str) -> bool:
        d = _domain_key(domain)
        if d in self.exact:
            return True
        if not self.parents:
            return False
        # Each parent of d: the text after each dot (no lists or joins).
        dot = d.find(".")
        while dot >= 0:
            if d[dot + 1:] in self.parents:
                return True
            dot = d.find(".", dot + 1)
        return False


class AddressSet:
    """Envelope addresses matched by the patterns above."""

    def __init__(self, patterns: Iterable[str]):
        self._addresses: set[str] = set()
        self._locals: set[str] = set()
        self._domains = DomainSet()
        self._null = False
        for p in patterns:
            t = p.strip()
            if t == "<>":
                self._null = True
            elif t.endswith("@"):
                self._locals.add(t[:-1].lower())
            elif t.startswith("@"):
                self._domains.add(t[1:])
            elif "@" in t:
                local, _, domain = t.rpartition("@")
                self._addresses.add(f"{local.lower()}@{_domain_key(domain)}")
            else:
                self._domains.add(t)
        self._empty = not (self._addresses or self._locals or self._domains or self._null)

    def __bool__(self) -> bool:
        return not self._empty

    def __contains__(self, address: str) -> bool:
        if self._empty:
            return False
        if not address:
            return self._null
        local, at, domain = address.rpartition("@")
        if not at:
            local, domain = address, ""
        local = local.lower()
        domain = _domain_key(domain)
        if f"{local}@{domain}" in self._addresses or local in self._locals:
            return True
        return bool(domain) and domain in self._domains


def check_helo_patterns(values: tuple[str, ...]) -> Optional[str]:
    for v in values:
        t = v.strip()
        if t.startswith("[") and t.endswith("]"):
            continue
        if _bad_domain(_split_domain_pattern(t)[0]):
            return f"{v!r} is not a HELO name pattern (mail.example.com, .example.com or [192.0.2.7])"
    return None


class HeloSet:
    def __init__(self, patterns: Iterable[str]):
        self._domains = DomainSet()
        for p in patterns:
            self._domains.add(p.strip())

    def __bool__(self) -> bool:
        return bool(self._domains)

    def __contains__(self, helo: str) -> bool:
        return bool(helo) and helo in self._domains


# -- trust --------------------------------------------------------------------

class TrustedNetworks:
    """Client addresses that may relay anywhere (Postfix's mynetworks;
    docs/design.md promise 3)."""

    def __init__(self, networks: tuple[str, ...]):
        # The policy lists' matcher: a set probe per prefix length, on the
        # address parse the policy checks share (parse_ip's cache).
        self._nets = NetworkSet(networks)

    def __call__(self, host: str) -> bool:
        return host in self._nets


# -- per configuration ----------------------------------------------------------

class SetCache:
    """The sets of one configuration snapshot's lists (do-not-scan clients,
    senders, recipients; disclaimer senders), built on first use and kept
    as long as the snapshot: the config's tuples are the keys."""

    def __init__(self) -> None:
        self._addresses: dict[tuple[str, ...], AddressSet] = {}
        self._networks: dict[tuple[str, ...], NetworkSet] = {}

    def address_set(self, patterns: tuple[str, ...]) -> AddressSet:
        found = self._addresses.get(patterns)
        if found is None:
            found = self._addresses[patterns] = AddressSet(patterns)
        return found

    def network_set(self, networks: tuple[str, ...]) -> NetworkSet:
        found = self._networks.get(networks)
        if found is None:
            found = self._networks[networks] = NetworkSet(networks)
        return found
