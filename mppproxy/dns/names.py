"""DNS names as the DNS lists and SPF ask them (docs/design.md, "Floors": a leaf).

Pure functions, no I/O: the RFC 5782 query label of a client address, a
domain normalised to IDNA A-labels, and the absolute ``dns.name.Name`` of a
text taken literally (SPF macro expansions).  The resolver
(``dns/resolver.py``), the DNS list settings (``config/dnsbl.py``) and the
checks (``policy/dnsbl.py``, ``policy/spf.py``) share them.
"""
from __future__ import annotations

import ipaddress
import re
from typing import Union

import dns.exception
import dns.name
import idna

IpLike = Union[str, ipaddress.IPv4Address, ipaddress.IPv6Address]

_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\Z")


def reverse_ip(ip: IpLike) -> str:
    """The RFC 5782 query label for an address: reversed octets for IPv4
    (section 2.1), reversed nibbles for IPv6 (section 2.4).  An IPv4-mapped
    IPv6 address (a dual-stack listener's view of an IPv4 client) is asked
    as the IPv4 address it is.  ValueError if ``ip`` is not an address."""
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if isinstance(addr, ipaddress.IPv4Address):
        return ".".join(reversed(str(addr).split(".")))
    return ".".join(reversed(addr.exploded.replace(":", "")))


def normalise_domain(domain: str) -> str:
    """A domain as an RHSBL wants it: lower case, no trailing dot, IDNA
    A-labels (UTS 46 mapping, so upper-case and full-width forms work).
    ValueError for an IP address, an address literal or a malformed name:
    RHSBLs list names, and some answer IP queries with an error code."""
    d = domain.strip()
    if d.endswith("."):
        d = d[:-1]
    if not d:
        raise ValueError("empty domain")
    if d.startswith("["):
        raise ValueError("an address literal, not a domain")
    try:
        ipaddress.ip_address(d)
    except ValueError:
        pass
    else:
        raise ValueError("an IP address, not a domain")
    if not d.isascii():
        try:
            d = idna.encode(d, uts46=True).decode("ascii")
        except idna.IDNAError as e:
            raise ValueError(f"not a valid internationalised domain ({e})") from None
    d = d.lower()
    # RFC 1035 2.3.4: 63 octets a label, 255 a name (253 in text form);
    # underscores are allowed because HELO names and DKIM-ish names use them.
    if len(d) > 253 or not all(_LABEL.match(label) for label in d.split(".")):
        raise ValueError("not a domain name")
    return d


def to_query_name(name: Union[str, dns.name.Name]) -> dns.name.Name:
    """An absolute DNS name from text taken literally: split at dots, every
    other octet kept as it is (SPF macro expansions may hold ``:``, ``/`` or
    ``@``, RFC 7208 7.3), a trailing dot allowed.  A ``dns.name.Name`` is made
    absolute.  ValueError for an empty label inside the name, a label over
    63 octets or a name over 255 (RFC 1035 2.3.4)."""
    if isinstance(name, dns.name.Name):
        return name if name.is_absolute() else name.concatenate(dns.name.root)
    text = name[:-1] if name.endswith(".") else name
    if not text:
        raise ValueError("empty domain name")
    labels = tuple(label.encode("utf-8") for label in text.split("."))
    if any(not label for label in labels):
        raise ValueError(f"{name!r} has an empty label")
    try:
        return dns.name.Name(labels + (b"",))
    except dns.exception.DNSException as e:  # NameTooLong, LabelTooLong
        raise ValueError(f"{name!r} is not a DNS name: {e}") from None
