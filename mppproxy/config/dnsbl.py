"""``[[policies.NAME.dnsbl.lists]]``: the DNS lists a policy asks and what
a listing is worth (docs/design.md, "Configuration").

A leaf of ``config/``: the settings and their checks only.  Asking the lists
is the policy stage's job (``policy/dnsbl.py``, over ``dns/resolver.py``).
RFC 5782 describes the zones and the return codes.
"""
from __future__ import annotations

import functools
import ipaddress
import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Optional, Sequence

from mppproxy.dns.names import normalise_domain

# Lists one lookup may ask; more is a configuration error (each list costs a
# query, and a TXT query when listed, for every client).
MAX_LISTS = 32
# Return-code entries per list.
MAX_CODES = 64

# 127.0.0.0/8 is where listings live (RFC 5782 section 2.1); anything else is
# a wildcard, a hijacked zone or a broken list, and is ignored.
LISTING_NET = ipaddress.ip_network("127.0.0.0/8")


def _check_zone(value: str) -> Optional[str]:
    try:
        zone = normalise_domain(value)
    except ValueError as e:
        return f"{value!r} is not a DNS zone name ({e})"
    if "." not in zone:
        return f"{value!r} is not a DNS zone name (a list zone has at least two labels)"
    return None


def _check_kind(value: str) -> Optional[str]:
    if value not in ("ip", "domain"):
        return f"must be 'ip' (an RBL of client addresses) or 'domain' (an RHSBL), not {value!r}"
    return None


def _check_score(value: float) -> Optional[str]:
    # Negative scores are allowed: whitelists such as DNSWL answer the same way.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"must be a finite number, not {value!r}"
    return None


def _check_codes(value: tuple[str, ...]) -> Optional[str]:
    if len(value) > MAX_CODES:
        return f"at most {MAX_CODES} return codes, not {len(value)}"
    try:
        parse_codes(tuple(value))
    except ValueError as e:
        return str(e)
    return None


def _check_name(value: str) -> Optional[str]:
    if not value or len(value) > 255 or not value.isprintable():
        return f"must be 1 to 255 printable characters, not {value!r}"
    return None


@dataclass(frozen=True)
class DnsblList:
    """One DNS list and what a listing in it is worth.

    ``kind`` "ip" asks the list about the client address (an RBL, RFC 5782
    section 2), "domain" about domain names (an RHSBL, RFC 5782 section 3).
    ``codes`` keeps only some return addresses ("127.0.0.2", a range
    "127.0.0.2-127.0.0.11" or a network "127.0.0.0/24"); empty means any
    answer in 127.0.0.0/8 counts.  ``fetch_txt`` asks for the TXT reason
    (RFC 5782 section 2.1) when, and only when, the address is listed.
    """

    zone: str = field(metadata={"check": _check_zone, "doc": "the list's DNS zone"})
    kind: str = field(default="ip", metadata={"check": _check_kind, "doc": "ip or domain"})
    score: float = field(default=1.0, metadata={"check": _check_score, "doc": "added when listed"})
    codes: tuple[str, ...] = field(default=(), metadata={"check": _check_codes,
                                                         "doc": "return codes that count"})
    # For logs and reasons; empty means the zone.
    name: str = field(default="", metadata={"check": _check_name, "doc": "label in logs and reasons"})
    fetch_txt: bool = False
    # The health guard's canaries (policy/dnsguard.py, RFC 5782 section 5):
    # the entry the list must list (empty: 127.0.0.2 for an IP list, "test"
    # for a domain list), and whether to ask for it at all (a private list
    # may have no test entry; 127.0.0.1 / "invalid" are always asked).
    test_entry: str = ""
    check_test_entry: bool = True

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", self.zone)


def validate_dnsbl_list(dnsbl: DnsblList) -> Optional[str]:
    """The first problem with ``dnsbl`` as ``"field: what is wrong"``, or None.

    The config loader calls this (or the per-field ``check`` in the field
    metadata, the convention of ``config/schema.py``)."""
    for f in fields(dnsbl):
        check: Optional[Callable[[Any], Optional[str]]] = f.metadata.get("check")
        if check is not None:
            problem = check(getattr(dnsbl, f.name))
            if problem:
                return f"{f.name}: {problem}"
    return _test_entry_problem(dnsbl)


def _test_entry_problem(dnsbl: DnsblList) -> Optional[str]:
    entry = dnsbl.test_entry
    if not entry:
        return None
    if dnsbl.kind == "ip":
        try:
            addr = ipaddress.IPv4Address(entry)
        except ValueError:
            return f"test_entry: {entry!r} is not an IPv4 address (an IP list's test entry)"
        if str(addr) == "127.0.0.1":
            return "test_entry: 127.0.0.1 is the entry no list may list (RFC 5782 section 5)"
        return None
    try:
        normalise_domain(entry)
    except ValueError as e:
        return f"test_entry: {entry!r} is not a domain name ({e})"
    return None


def validate_dnsbl_lists(lists: Sequence[DnsblList]) -> Optional[str]:
    """Like ``validate_dnsbl_list`` for a whole configuration: bounded in
    number, names unique (results and logs are keyed by them)."""
    if len(lists) > MAX_LISTS:
        return f"at most {MAX_LISTS} DNS lists, not {len(lists)}"
    seen: set[str] = set()
    for i, dnsbl in enumerate(lists):
        problem = validate_dnsbl_list(dnsbl)
        if problem:
            return f"[{i}] {problem}"
        if dnsbl.name in seen:
            return f"[{i}] name: {dnsbl.name!r} is used by two lists"
        seen.add(dnsbl.name)
    return None


@functools.lru_cache(maxsize=256)
def parse_codes(codes: tuple[str, ...]) -> tuple[tuple[int, int], ...]:
    """Return codes as inclusive integer ranges; ValueError names a bad one.
    Cached: the DNS list check classifies every answer by them."""
    ranges = []
    for spec in codes:
        try:
            if "/" in spec:
                net = ipaddress.IPv4Network(spec.strip(), strict=False)
                lo, hi = net.network_address, net.broadcast_address
            elif "-" in spec:
                first, last = spec.split("-", 1)
                lo, hi = ipaddress.IPv4Address(first.strip()), ipaddress.IPv4Address(last.strip())
            else:
                lo = hi = ipaddress.IPv4Address(spec.strip())
        except ValueError:
            raise ValueError(f"{spec!r} is not a return code (127.0.0.2, "
                             f"127.0.0.2-127.0.0.11 or 127.0.0.0/24)") from None
        if lo > hi:
            raise ValueError(f"{spec!r}: the range runs backwards")
        if lo not in LISTING_NET or hi not in LISTING_NET:
            raise ValueError(f"{spec!r} is outside 127.0.0.0/8, where listings live (RFC 5782 2.1)")
        ranges.append((int(lo), int(hi)))
    return tuple(ranges)

