"""DNSBL (RBL) and RHSBL lookups: the DNS part of the pre-DATA policy stage.

Stage: policy, as a building block.  The policy engine wraps this module in a
Check: it hands over the client IP and the domains worth asking about (HELO,
MAIL FROM) and gets back one ``DnsblResult`` per configured list, with its
score, the return codes, an optional TXT reason and an error name.

A list that times out, fails or answers nonsense scores nothing and is logged:
a broken list never blocks mail by itself, and the error travels in the result
so the engine records it (docs/design.md promises 4 and 5).

dnspython builds and parses the messages; Twisted carries them, one UDP
datagram per query (random source port, renewed every ROTATE_AFTER queries;
random 16-bit id; reply source and question checked), asked again over TCP
when the reply comes truncated.  Answers are cached for their TTL.
RFC 5782 describes the query names and answers.

``DnsblResolver.query`` is the same client for any question (TXT, A, AAAA,
MX, PTR), telling NXDOMAIN from NODATA; the SPF evaluator
(``policy/spf.py``) asks through it.
"""
from __future__ import annotations

import functools
import ipaddress
import math
import random
import re
import socket
import struct
from collections import OrderedDict
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Hashable, Iterable, Optional, Sequence, Union

import dns.exception
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import idna
from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.python.failure import Failure

from mppproxy.logsetup import Logger

log = Logger()

# -- bounds and defaults -------------------------------------------------------

# Lists one lookup may ask; more is a configuration error (each list costs a
# query, and a TXT query when listed, for every client).
MAX_LISTS = 32
# Domains one lookup may ask each RHSBL about (HELO, MAIL FROM, PTR ...).
MAX_DOMAINS = 8
# Return-code entries per list.
MAX_CODES = 64
MAX_NAMESERVERS = 8
# Queries on the wire at once, per resolver (bounds the table of pending ids
# and sizes the socket's receive buffer).  Queries past this wait for a
# slot, inside their own timeout.
MAX_IN_FLIGHT = 256
# Far below the five minutes RFC 5321 4.5.3.2 gives the client for a reply to
# MAIL or RCPT: a slow list costs each session at most this per query.
DEFAULT_TIMEOUT = 5.0
DEFAULT_CACHE_ENTRIES = 10000
# Negative answers without an SOA carry no TTL.  RFC 2308 section 5 says not
# to cache them, because two servers could pass them back and forth forever;
# this cache is never served to anyone else, so that loop cannot happen, and
# a short default saves re-asking a list for every connection.
DEFAULT_NEGATIVE_TTL = 300.0
# TTL caps: one day for answers (as common resolvers cap them) and three
# hours for negative answers (RFC 2308 section 5: one to three hours "work
# well"); a list's huge TTL must not pin a stale entry.
MAX_TTL = 86400.0
MAX_NEGATIVE_TTL = 10800.0
# Queries carry no EDNS, so a UDP reply is at most 512 octets (RFC 1035
# 4.2.1); a longer one comes truncated with TC set, and we ask again over TCP
# (RFC 7766 5).  DNSBL answers are a few A records or one TXT string, so TCP
# is rare, and without EDNS there is no fragmentation and no FORMERR fallback
# (RFC 6891 7).  We read more than 512, so an oversized reply from a server
# that does not truncate is parsed rather than cut by the socket.
UDP_READ_SIZE = 4096
# Receive buffer asked for per query socket and query in flight: the replies
# to a burst of queries arrive together, and Linux's default buffer (208 KiB)
# overflowed at 256 in flight on loopback, dropping 6% of them (measured).
RCVBUF_PER_QUERY = 4096
# A query socket carries this many queries, then a fresh one (a new random
# source port) takes over.
ROTATE_AFTER = 1000
# A TXT reason may end up in a reply line (RFC 5321 4.5.3.1.5: 512 octets).
MAX_REASON = 200

# 127.0.0.0/8 is where listings live (RFC 5782 section 2.1); anything else is
# a wildcard, a hijacked zone or a broken list, and is ignored.
_LISTING_NET = ipaddress.ip_network("127.0.0.0/8")
# Answers that report a problem with the query, not a listing: Spamhaus keeps
# 127.255.255.0/24 for errors (.252 typo in the zone name, .254 query through
# a public resolver, .255 excessive queries), and the DBL answers 127.0.1.255
# to an IP address asked as a domain.  They must never score.
_ERROR_NETS = (ipaddress.ip_network("127.255.255.0/24"), ipaddress.ip_network("127.0.1.255/32"))

_rng = random.SystemRandom()

IpLike = Union[str, ipaddress.IPv4Address, ipaddress.IPv6Address]


# -- configuration ------------------------------------------------------------

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
        _parse_codes(tuple(value))
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


def check_nameservers(nameservers: Sequence[tuple[str, int]]) -> Optional[str]:
    """A problem with a nameserver list, or None: 1 to MAX_NAMESERVERS
    (IP address, port) pairs.  Addresses, not names: resolving the resolver
    would need a resolver."""
    if not 1 <= len(nameservers) <= MAX_NAMESERVERS:
        return f"needs 1 to {MAX_NAMESERVERS} nameservers, not {len(nameservers)}"
    for entry in nameservers:
        try:
            host, port = entry
            ipaddress.ip_address(host)
        except (TypeError, ValueError):
            return f"{entry!r} is not an (IP address, port) pair"
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            return f"{entry!r}: the port must be 1 to 65535"
    return None


@functools.lru_cache(maxsize=256)
def _parse_codes(codes: tuple[str, ...]) -> tuple[tuple[int, int], ...]:
    """Return codes as inclusive integer ranges; ValueError names a bad one."""
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
        if lo not in _LISTING_NET or hi not in _LISTING_NET:
            raise ValueError(f"{spec!r} is outside 127.0.0.0/8, where listings live (RFC 5782 2.1)")
        ranges.append((int(lo), int(hi)))
    return tuple(ranges)


# -- query names ----------------------------------------------------------------

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


def query_name(dnsbl: DnsblList, subject: str) -> dns.name.Name:
    """The absolute name to ask: ``subject`` (a ``reverse_ip`` or
    ``normalise_domain`` result) under the list's zone.  ValueError when
    the whole name is over 255 octets (RFC 1035 3.1)."""
    zone = normalise_domain(dnsbl.zone)
    labels = tuple(label.encode("ascii") for label in f"{subject}.{zone}".split("."))
    try:
        return dns.name.Name(labels + (b"",))
    except dns.exception.DNSException as e:  # NameTooLong, LabelTooLong, EmptyLabel
        raise ValueError(f"no query name for {subject!r} in {zone}: {e}") from None


# -- results -------------------------------------------------------------------

@dataclass(frozen=True)
class DnsblResult:
    """What one list said about one client.

    ``listed`` and ``score`` (0 when not listed); ``codes`` the return
    addresses that counted; ``hits`` the subjects (reversed IP or domain)
    that were listed; ``reason`` the TXT text when asked for and found;
    ``error`` None, or why the list could not tell ("timeout", "servfail",
    "refused", "network", "bad_reply", "list_error", "bogus_answer",
    "closed", or another rcode's name in lower case).  A listing in
    one subject wins over an error on another.
    """

    dnsbl: DnsblList
    listed: bool = False
    score: float = 0.0
    codes: tuple[str, ...] = ()
    hits: tuple[str, ...] = ()
    reason: Optional[str] = None
    error: Optional[str] = None

    @property
    def name(self) -> str:
        return self.dnsbl.name


@dataclass(frozen=True)
class _Answer:
    """A cached reply: the records for one question in text form (A and
    AAAA addresses, TXT strings joined per record, "PREF NAME" for MX,
    names for PTR); empty for NXDOMAIN and NODATA, which ``nxdomain`` tells
    apart (SPF counts both as void lookups, RFC 7208 4.6.4)."""

    rdatas: tuple[str, ...]
    nxdomain: bool = False


class DnsError(Exception):
    """A query that got no usable answer: a timeout, SERVFAIL, REFUSED, a
    network failure or a malformed reply.  ``kind`` names it ("timeout",
    "servfail", "refused", "network", "bad_reply", "closed", "overload" or
    another rcode's name in lower case)."""

    def __init__(self, kind: str):
        super().__init__(kind)
        self.kind = kind


class _QueryError(DnsError):
    """The resolver's own name for DnsError (kept for the DNSBL code)."""


@dataclass(frozen=True)
class DnsAnswer:
    """The public form of an answer: what ``DnsblResolver.query`` returns.

    ``nxdomain`` is True for RCODE 3 (the name does not exist); a NOERROR
    reply without records of the type asked has ``nxdomain`` False and no
    ``records``.  Both are "void" in RFC 7208 4.6.4's sense (``void``).
    ``records`` holds the text form; the properties parse it per type."""

    name: dns.name.Name
    rdtype: dns.rdatatype.RdataType
    records: tuple[str, ...]
    nxdomain: bool = False

    @property
    def void(self) -> bool:
        return not self.records

    @property
    def texts(self) -> tuple[str, ...]:
        """TXT: one string per record, its character-strings joined without
        anything between them (RFC 7208 3.3)."""
        return self.records

    @property
    def addresses(self) -> tuple[Union[ipaddress.IPv4Address, ipaddress.IPv6Address], ...]:
        """A or AAAA: the addresses."""
        return tuple(ipaddress.ip_address(r) for r in self.records)

    @property
    def mx(self) -> tuple[tuple[int, dns.name.Name], ...]:
        """MX: (preference, exchange) pairs, in the order the server gave."""
        out = []
        for r in self.records:
            pref, exchange = r.split(None, 1)
            out.append((int(pref), dns.name.from_text(exchange)))
        return tuple(out)

    @property
    def names(self) -> tuple[dns.name.Name, ...]:
        """PTR (or NS, CNAME): the target names."""
        return tuple(dns.name.from_text(r) for r in self.records)


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


def classify(dnsbl: DnsblList, addresses: Iterable[str]) -> tuple[tuple[str, ...], Optional[str]]:
    """The return codes that count for ``dnsbl`` among the A records of an
    answer, and an error: "list_error" if any is an error code (the answer
    means nothing then), "bogus_answer" if none is in 127.0.0.0/8.
    Addresses outside 127.0.0.0/8 are dropped and logged; codes outside
    ``dnsbl.codes`` are dropped quietly (a PBL code on an SBL-only list)."""
    ranges = _parse_codes(tuple(dnsbl.codes))
    counted: list[str] = []
    in_net = 0
    for text in addresses:
        try:
            addr = ipaddress.IPv4Address(text)
        except ValueError:
            continue
        if addr not in _LISTING_NET:
            log.warn("DNS list {dnsbl} answered {address}, outside 127.0.0.0/8; ignored "
                     "(a wildcard or broken list)", dnsbl=dnsbl.name, address=text)
            continue
        if any(addr in net for net in _ERROR_NETS):
            log.warn("DNS list {dnsbl} answered error code {address}; the list is not "
                     "usable as configured, nothing scored", dnsbl=dnsbl.name, address=text)
            return (), "list_error"
        in_net += 1
        if not ranges or any(lo <= int(addr) <= hi for lo, hi in ranges):
            counted.append(text)
    if not in_net:
        return (), "bogus_answer"
    return tuple(counted), None


def _reason_text(strings: Iterable[str]) -> Optional[str]:
    """TXT strings as one line fit for a log or a reply: control characters
    (a CR LF would end an SMTP reply early) become spaces, and it is bounded."""
    text = "; ".join(s for s in strings if s)
    text = "".join(c if c.isprintable() else " " for c in text)
    text = " ".join(text.split())
    return text[:MAX_REASON] or None


# -- cache ---------------------------------------------------------------------

class DnsCache:
    """Answers by (name, type), kept for their TTL, at most ``max_entries``,
    least recently used evicted first.  ``clock`` is anything with
    ``seconds()`` (the reactor, or a ``task.Clock`` in tests)."""

    def __init__(self, clock: Any, max_entries: int = DEFAULT_CACHE_ENTRIES,
                 negative_ttl: float = DEFAULT_NEGATIVE_TTL, max_ttl: float = MAX_TTL,
                 max_negative_ttl: float = MAX_NEGATIVE_TTL):
        if max_entries < 0:
            raise ValueError("max_entries must be at least 0")
        self._clock = clock
        self.max_entries = max_entries
        self.negative_ttl = negative_ttl
        self.max_ttl = max_ttl
        self.max_negative_ttl = max_negative_ttl
        self._entries: OrderedDict[Hashable, tuple[float, _Answer]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> Optional[_Answer]:
        entry = self._entries.get(key)
        if entry is not None:
            expires, answer = entry
            if self._clock.seconds() < expires:
                self._entries.move_to_end(key)
                self.hits += 1
                return answer
            del self._entries[key]
        self.misses += 1
        return None

    def put(self, key: Hashable, answer: _Answer, ttl: float) -> None:
        """Keep ``answer`` for ``ttl`` seconds, capped; 0 means not at all."""
        cap = self.max_ttl if answer.rdatas else self.max_negative_ttl
        ttl = min(ttl, cap)
        if ttl <= 0 or self.max_entries == 0:
            return
        self._entries[key] = (self._clock.seconds() + ttl, answer)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()


# -- transport -----------------------------------------------------------------

class _UdpChannel(DatagramProtocol):
    """A UDP socket shared by the queries in flight, bound to port 0 so the
    kernel picks a random source port, and replaced by a fresh one (a new
    random port) after ``rotate_after`` queries.

    A reply is delivered only when its source is the server asked, its id
    is in flight to that server, and its question is ours (dnspython's
    ``is_response``); anything else is ignored and the wait goes on, so a
    spoofed or garbled packet cannot end a query.  Together with the random
    16-bit id that is about 32 bits an off-path spoofer must guess.

    Why one socket for many queries and not one per query: Twisted logs two
    lines for every UDP port opened and closed, which at a few thousand
    queries a minute would drown the log; rotating keeps the port moving."""

    noisy = False

    def __init__(self, rotate_after: int):
        self.rotate_after = rotate_after
        self.sent = 0
        self.port: Any = None
        self.closing: Optional[Deferred[None]] = None
        self._closed = False
        self._pending: dict[tuple[int, tuple[str, int]],
                            tuple[dns.message.Message, Deferred[Optional[dns.message.Message]]]] = {}

    @property
    def worn_out(self) -> bool:
        return self.closing is not None or self.sent >= self.rotate_after

    def send(self, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType,
             server: tuple[str, int]) -> tuple[dns.message.Message, Deferred[Optional[dns.message.Message]]]:
        """Send one query; the Deferred fires with the reply, or None when it
        came truncated (TC), and cancelling it forgets the query."""
        # At most MAX_IN_FLIGHT of 65536 ids are taken, so a free one comes
        # at the first try but for a vanishing chance.
        for _ in range(32):
            qid = _rng.getrandbits(16)
            if (qid, server) not in self._pending:
                break
        else:
            raise _QueryError("overload")
        query = dns.message.make_query(qname, rdtype, id=qid)
        key = (qid, server)
        d: Deferred[Optional[dns.message.Message]] = Deferred(lambda _: self._forget(key))
        try:
            self.port.write(query.to_wire(), server)
        except OSError as e:
            log.warn("cannot send a DNS query to {server}: {error}", server=server, error=str(e))
            raise _QueryError("network") from None
        self.sent += 1
        self._pending[key] = (query, d)
        return query, d

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        if len(data) < 12:
            return
        try:
            source = (str(ipaddress.ip_address(addr[0])), addr[1])
        except ValueError:
            return
        key = (struct.unpack("!H", data[:2])[0], source)
        entry = self._pending.get(key)
        if entry is None:
            log.debug("ignored a DNS datagram from {source} matching no query", source=source)
            return
        query, d = entry
        if data[2] & 0x82 == 0x82:
            # QR and TC: the reply was cut at 512 octets and may not parse;
            # the id and source suffice to go to TCP, where spoofing is hard
            # (RFC 7766 5).
            self._forget(key)
            d.callback(None)
            return
        try:
            reply = dns.message.from_wire(data)
        except dns.exception.DNSException as e:
            log.debug("ignored an unparsable DNS datagram from {source}: {error}",
                      source=source, error=str(e))
            return
        if not query.is_response(reply):
            log.debug("ignored a DNS reply from {source} whose question is not ours", source=source)
            return
        self._forget(key)
        d.callback(reply)

    def _forget(self, key: tuple[int, tuple[str, int]]) -> None:
        self._pending.pop(key, None)
        if self.closing is not None and not self._pending:
            self._close_port()

    def retire(self) -> Deferred[None]:
        """Take no more queries; close once those in flight are done (each
        is bounded by its timeout)."""
        if self.closing is None:
            self.closing = Deferred()
            if not self._pending:
                self._close_port()
        return self.closing

    def stop(self) -> Deferred[None]:
        """Close now, cancelling what is in flight."""
        closing = self.retire()
        for _, d in list(self._pending.values()):
            d.cancel()
        return closing

    def _close_port(self) -> None:
        if self._closed:
            return
        self._closed = True
        port, self.port = self.port, None
        closed = port.stopListening() if port is not None else None
        assert self.closing is not None
        if isinstance(closed, Deferred):
            closed.chainDeferred(self.closing)
        else:
            self.closing.callback(None)


class _TcpExchange(Protocol):
    """One query over TCP: a two-octet length, then the message, each way
    (RFC 1035 4.2.2)."""

    def __init__(self, query: dns.message.Message):
        self.query = query
        self.done: Deferred[dns.message.Message] = Deferred(self._cancel)
        self._buf = bytearray()
        self._cancelled = False

    def connectionMade(self) -> None:
        wire = self.query.to_wire()
        self.transport.write(struct.pack("!H", len(wire)) + wire)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self._buf += data
        if len(self._buf) < 2:
            return
        size = struct.unpack("!H", self._buf[:2])[0]
        if len(self._buf) < 2 + size:
            return  # the length prefix bounds this buffer at 64 KiB
        try:
            reply: Optional[dns.message.Message] = dns.message.from_wire(bytes(self._buf[2:2 + size]))
        except dns.exception.DNSException:
            reply = None
        self.transport.loseConnection()  # type: ignore[union-attr]
        if reply is None or not self.query.is_response(reply):
            self.done.errback(_QueryError("bad_reply"))
        else:
            self.done.callback(reply)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if not self.done.called and not self._cancelled:
            self.done.errback(_QueryError("network"))

    def _cancel(self, d: Deferred[Any]) -> None:
        self._cancelled = True
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]


class _OneProtocol(Factory):
    noisy = False

    def __init__(self, proto: Protocol):
        self.proto = proto

    def buildProtocol(self, addr: Any) -> Protocol:
        return self.proto


def _bind_address(host: str) -> str:
    """Where a query socket binds: loopback for a loopback server (nothing
    leaves the host), otherwise every address of the server's family."""
    addr = ipaddress.ip_address(host)
    if addr.is_loopback:
        return str(addr)
    return "::" if addr.version == 6 else "0.0.0.0"


# -- resolver ------------------------------------------------------------------

class DnsblResolver:
    """Asks DNS lists about one client at a time, all lists at once.

    ``reactor`` provides UDP, TCP and time; ``nameservers`` are the
    recursive resolvers to ask, (IP, port) pairs, normally one on the same
    host (list operators such as Spamhaus refuse queries through public
    resolvers, and nobody off the host can spoof a loopback reply).  Every
    query goes to the preferred nameserver; one that lets a query time out
    hands that place to the next, so a dead resolver costs a timeout or
    two, not one per query.  ``timeout`` bounds each query in seconds,
    waiting for a slot and a TCP retry included.  ``cache`` may run on its
    own clock.

    Construction does no I/O; sockets open with the first query.  ``close``
    releases them (the service calls it on stop).
    """

    def __init__(self, reactor: Any, nameservers: Sequence[tuple[str, int]],
                 timeout: float = DEFAULT_TIMEOUT, cache: Optional[DnsCache] = None,
                 max_in_flight: int = MAX_IN_FLIGHT, rotate_after: int = ROTATE_AFTER):
        problem = check_nameservers(nameservers)
        if problem:
            raise ValueError(problem)
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, not {timeout!r}")
        if not 1 <= max_in_flight <= 4096:
            raise ValueError(f"max_in_flight must be 1 to 4096, not {max_in_flight!r}")
        self._reactor = reactor
        self.nameservers = tuple((str(ipaddress.ip_address(h)), p) for h, p in nameservers)
        self.timeout = timeout
        self.cache = cache if cache is not None else DnsCache(reactor)
        self.rotate_after = max(1, rotate_after)
        self._slots = defer.DeferredSemaphore(max_in_flight)
        self._preferred = 0
        self._channels: dict[str, _UdpChannel] = {}
        self._retired: set[_UdpChannel] = set()
        self._closed = False

    async def lookup_all(self, lists: Sequence[DnsblList], ip: Optional[IpLike] = None,
                         domains: Iterable[str] = ()) -> list[DnsblResult]:
        """One result per list, in order, for the client at ``ip`` (asked of
        the "ip" lists) and ``domains`` (asked of the "domain" lists).

        All queries run at once.  A domain that is not a domain name (an
        address literal in HELO, say) is skipped and logged; a list with
        nothing to ask is not listed.  Never raises for DNS trouble: that is
        each result's ``error``.  ValueError for a bad ``ip``, more than
        MAX_LISTS lists or more than MAX_DOMAINS distinct domains."""
        if len(lists) > MAX_LISTS:
            raise ValueError(f"at most {MAX_LISTS} lists per lookup, not {len(lists)}")
        ip_subject = reverse_ip(ip) if ip is not None else None
        domain_subjects: list[str] = []
        for domain in domains:
            try:
                d = normalise_domain(domain)
            except ValueError as e:
                log.debug("not asking domain lists about {domain}: {why}", domain=domain, why=str(e))
                continue
            if d not in domain_subjects:
                domain_subjects.append(d)
        if len(domain_subjects) > MAX_DOMAINS:
            raise ValueError(f"at most {MAX_DOMAINS} domains per lookup, not {len(domain_subjects)}")
        work = []
        for dnsbl in lists:
            if dnsbl.kind == "ip":
                subjects = [ip_subject] if ip_subject is not None else []
            else:
                subjects = domain_subjects
            work.append(Deferred.fromCoroutine(self._check_list(dnsbl, subjects)))
        results: list[DnsblResult] = await _gather(work)
        return results

    @property
    def reactor(self) -> Any:
        """The reactor the resolver runs on (callers bound their own work
        with its clock)."""
        return self._reactor

    async def query(self, name: Union[str, dns.name.Name],
                    rdtype: Union[str, dns.rdatatype.RdataType]) -> DnsAnswer:
        """The records of type ``rdtype`` ("TXT", "A", "AAAA", "MX", "PTR"...)
        at ``name`` (text as ``to_query_name`` reads it, or a Name), from
        the cache or the wire, within ``self.timeout``; CNAMEs are followed.

        NXDOMAIN and NODATA are answers (``DnsAnswer.nxdomain`` tells them
        apart), not errors.  Raises DnsError when no usable answer came
        (timeout, SERVFAIL, REFUSED, network, malformed reply) and
        ValueError for a name that cannot be asked."""
        qname = to_query_name(name)
        qtype = dns.rdatatype.RdataType.make(rdtype)
        answer = await self._query(qname, qtype)
        return DnsAnswer(qname, qtype, answer.rdatas, answer.nxdomain)

    def close(self) -> Deferred[None]:
        """Cancel what is in flight and close the sockets; fires when closed."""
        self._closed = True
        channels = list(self._channels.values()) + list(self._retired)
        self._channels.clear()
        self._retired.clear()
        closing = defer.gatherResults([c.stop() for c in channels], consumeErrors=True)
        return closing.addCallback(lambda _: None)

    async def _check_list(self, dnsbl: DnsblList, subjects: list[str]) -> DnsblResult:
        outcomes = await _gather(
            [Deferred.fromCoroutine(self._check_subject(dnsbl, s)) for s in subjects])
        codes: list[str] = []
        hits: list[str] = []
        reasons: list[str] = []
        error = None
        for subject, (found, reason, problem) in zip(subjects, outcomes):
            if found:
                hits.append(subject)
                codes.extend(c for c in found if c not in codes)
                if reason:
                    reasons.append(reason)
            elif problem and error is None:
                error = problem
        if hits:
            return DnsblResult(dnsbl, True, dnsbl.score, tuple(codes), tuple(hits),
                               _reason_text(reasons))
        return DnsblResult(dnsbl, error=error)

    async def _check_subject(self, dnsbl: DnsblList, subject: str
                             ) -> tuple[tuple[str, ...], Optional[str], Optional[str]]:
        """(counted codes, TXT reason, error) for one subject in one list."""
        try:
            qname = query_name(dnsbl, subject)
        except ValueError as e:  # the name would be too long
            log.debug("not asking {dnsbl} about {subject}: {why}",
                      dnsbl=dnsbl.name, subject=subject, why=str(e))
            return (), None, None
        try:
            answer = await self._query(qname, dns.rdatatype.A)
        except _QueryError as e:
            log.warn("DNS list {dnsbl} gave no answer for {qname}: {error}; nothing scored",
                     dnsbl=dnsbl.name, qname=qname.to_text(), error=e.kind)
            return (), None, e.kind
        if not answer.rdatas:
            return (), None, None
        codes, problem = classify(dnsbl, answer.rdatas)
        if not codes or not dnsbl.fetch_txt:
            return codes, None, problem
        try:
            txt = await self._query(qname, dns.rdatatype.TXT)
        except _QueryError as e:
            # The listing stands; only its explanation is missing.
            log.info("DNS list {dnsbl} gave no TXT for {qname}: {error}",
                     dnsbl=dnsbl.name, qname=qname.to_text(), error=e.kind)
            return codes, None, None
        return codes, _reason_text(txt.rdatas), None

    async def _query(self, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> _Answer:
        """The records of type ``rdtype`` at ``qname``, from the cache or the
        wire, within ``self.timeout``; empty for NXDOMAIN or NODATA.
        Raises _QueryError for a timeout or a failure."""
        key = (qname, rdtype)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        sent_to: list[int] = []
        d = Deferred.fromCoroutine(self._ask(qname, rdtype, sent_to))
        d.addTimeout(self.timeout, self._reactor)
        try:
            answer, ttl = await d
        except defer.TimeoutError:
            if sent_to:
                self._note_silent(sent_to[0])
            raise _QueryError("timeout") from None
        self.cache.put(key, answer, ttl)
        return answer

    async def _ask(self, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType,
                   sent_to: list[int]) -> tuple[_Answer, float]:
        """One exchange; the index of the nameserver asked goes in ``sent_to``
        so that a timeout can be held against it."""
        await self._slots.acquire()
        try:
            if self._closed:
                raise _QueryError("closed")
            index = self._preferred
            server = self.nameservers[index]
            sent_to.append(index)
            query, waiting = self._channel(server).send(qname, rdtype, server)
            reply = await waiting
            if reply is None:
                log.debug("DNS reply for {qname} truncated; asking again over TCP",
                          qname=qname.to_text())
                reply = await self._tcp(query, server)
        finally:
            self._slots.release()
        return _parse_reply(reply, self.cache.negative_ttl)

    def _channel(self, server: tuple[str, int]) -> _UdpChannel:
        bind = _bind_address(server[0])
        channel = self._channels.get(bind)
        if channel is not None and channel.worn_out:
            del self._channels[bind]
            self._retired.add(channel)
            channel.retire().addBoth(lambda _, old=channel: self._retired.discard(old))
            channel = None
        if channel is None:
            channel = _UdpChannel(self.rotate_after)
            try:
                channel.port = self._reactor.listenUDP(0, channel, interface=bind,
                                                       maxPacketSize=UDP_READ_SIZE)
            except CannotListenError as e:
                log.warn("cannot open a UDP socket on {bind} for DNS queries: {error}",
                         bind=bind, error=str(e))
                raise _QueryError("network") from None
            _grow_receive_buffer(channel.port, self._slots.limit * RCVBUF_PER_QUERY)
            self._channels[bind] = channel
        return channel

    def _note_silent(self, index: int) -> None:
        if self._preferred == index and len(self.nameservers) > 1:
            self._preferred = (index + 1) % len(self.nameservers)
            log.warn("nameserver {server} let a DNS list query time out; now asking {next}",
                     server=self.nameservers[index], next=self.nameservers[self._preferred])

    async def _tcp(self, query: dns.message.Message, server: tuple[str, int]) -> dns.message.Message:
        host, port = server
        cls = TCP6ClientEndpoint if ":" in host else TCP4ClientEndpoint
        exchange = _TcpExchange(query)
        try:
            await cls(self._reactor, host, port, timeout=self.timeout).connect(_OneProtocol(exchange))
        except CancelledError:
            raise
        except Exception as e:  # every connect failure means the same here
            log.warn("cannot reach {server} over TCP: {error}", server=server, error=str(e))
            raise _QueryError("network") from None
        return await exchange.done


def _grow_receive_buffer(port: Any, size: int) -> None:
    """Ask for a receive buffer of ``size`` bytes (the kernel caps it at
    net.core.rmem_max).  Best effort: a reactor whose ports have no
    ``socket`` keeps its default."""
    sock = getattr(port, "socket", None)
    if sock is None:
        return
    try:
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) < size:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    except OSError as e:
        log.info("cannot grow the DNS query socket's receive buffer: {error}", error=str(e))


async def _gather(work: list[Deferred[Any]]) -> list[Any]:
    """All results, or the first failure as itself (a CancelledError stays
    one) rather than wrapped in FirstError; cancelling cancels them all."""
    try:
        results: list[Any] = await defer.gatherResults(work, consumeErrors=True)
    except defer.FirstError as e:
        e.subFailure.raiseException()
    return results


def _parse_reply(reply: dns.message.Message, negative_ttl: float) -> tuple[_Answer, float]:
    """The records and how long to keep them, or _QueryError for a reply
    that is no answer."""
    if not isinstance(reply, dns.message.QueryMessage):  # is_response checked the opcode
        raise _QueryError("bad_reply")
    rcode = reply.rcode()
    if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
        raise _QueryError(dns.rcode.to_text(rcode).lower())
    qtype = reply.question[0].rdtype
    chain = None
    # NXDOMAIN is "not listed" whatever CNAMEs led there (RFC 6604 2.1).
    if rcode == dns.rcode.NOERROR and reply.answer:
        try:
            chain = reply.resolve_chaining()  # follows CNAMEs; TTL is the chain's minimum
        except (dns.message.ChainTooLong, dns.exception.FormError):
            raise _QueryError("bad_reply") from None
    if chain is not None and chain.answer is not None:
        if qtype == dns.rdatatype.TXT:
            rdatas = tuple(b"".join(rd.strings).decode("utf-8", "replace") for rd in chain.answer)
        else:
            rdatas = tuple(rd.to_text() for rd in chain.answer)
        return _Answer(rdatas), float(chain.minimum_ttl)
    # NXDOMAIN or NODATA: not listed.  RFC 2308 section 5: keep it for the
    # smaller of the SOA's TTL and its MINIMUM field.
    nxdomain = rcode == dns.rcode.NXDOMAIN
    for rrset in reply.authority:
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
            return _Answer((), nxdomain), float(min(rrset.ttl, rrset[0].minimum))
    return _Answer((), nxdomain), negative_ttl
