"""The DNS client: any question over UDP and TCP, answers cached by TTL
(docs/design.md, "Floors": a leaf; promise 4 for what a failure becomes).

dnspython builds and parses the messages; Twisted carries them, one UDP
datagram per query (random source port, renewed every ROTATE_AFTER queries;
random 16-bit id; reply source and question checked), asked again over TCP
when the reply comes truncated.  Answers are cached for their TTL.

``Resolver.query`` answers any question (TXT, A, AAAA, MX, PTR), telling
NXDOMAIN from NODATA; the SPF evaluator (``policy/spf.py``) asks through
it.  ``Resolver.lookup`` is the same without the public wrapper, for the
DNS lists (``policy/dnsbl.py``), which ask many names per client.
"""
from __future__ import annotations

import ipaddress
import random
import socket
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Hashable, Optional, Sequence, Union

import dns.exception
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol, connectionDone
from twisted.python.failure import Failure

from mppproxy._async import as_deferred
from mppproxy.dns.names import to_query_name
from mppproxy.logsetup import Logger

log = Logger()

# -- bounds and defaults -------------------------------------------------------

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

_rng = random.SystemRandom()


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


# -- answers -------------------------------------------------------------------

@dataclass(frozen=True)
class Answer:
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


@dataclass(frozen=True)
class DnsAnswer:
    """The public form of an answer: what ``Resolver.query`` returns.

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
        self._entries: OrderedDict[Hashable, tuple[float, Answer]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> Optional[Answer]:
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

    def put(self, key: Hashable, answer: Answer, ttl: float) -> None:
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
            raise DnsError("overload")
        query = dns.message.make_query(qname, rdtype, id=qid)
        key = (qid, server)
        d: Deferred[Optional[dns.message.Message]] = Deferred(lambda _: self._forget(key))
        try:
            self.port.write(query.to_wire(), server)
        except OSError as e:
            log.warn("cannot send a DNS query to {server}: {error}", server=server, error=str(e))
            raise DnsError("network") from None
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
        # Any: mypy reads zope interfaces' methods without self.
        transport: Any = self.transport
        transport.write(struct.pack("!H", len(wire)) + wire)

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
        transport: Any = self.transport
        transport.loseConnection()
        if reply is None or not self.query.is_response(reply):
            self.done.errback(DnsError("bad_reply"))
        else:
            self.done.callback(reply)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.done.called and not self._cancelled:
            self.done.errback(DnsError("network"))

    def _cancel(self, d: Deferred[Any]) -> None:
        self._cancelled = True
        transport: Any = self.transport  # an ITCPTransport once connected
        if transport is not None:
            transport.abortConnection()


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

class Resolver:
    """Asks recursive resolvers any question, answers cached by TTL.

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
        answer = await self.lookup(qname, qtype)
        return DnsAnswer(qname, qtype, answer.rdatas, answer.nxdomain)

    def close(self) -> Deferred[None]:
        """Cancel what is in flight and close the sockets; fires when closed."""
        self._closed = True
        channels = list(self._channels.values()) + list(self._retired)
        self._channels.clear()
        self._retired.clear()
        closing = defer.gatherResults([c.stop() for c in channels], consumeErrors=True)
        return closing.addCallback(lambda _: None)

    async def lookup(self, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> Answer:
        """The records of type ``rdtype`` at ``qname`` (absolute), from the
        cache or the wire, within ``self.timeout``; empty for NXDOMAIN or
        NODATA.  The cached ``Answer`` itself, no wrapper: the DNS lists ask
        several names per client.  Raises DnsError for a timeout or a failure."""
        key = (qname, rdtype)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        sent_to: list[int] = []
        d = as_deferred(self._ask(qname, rdtype, sent_to))
        d.addTimeout(self.timeout, self._reactor)
        try:
            answer, ttl = await d
        except defer.TimeoutError:
            if sent_to:
                self._note_silent(sent_to[0])
            raise DnsError("timeout") from None
        self.cache.put(key, answer, ttl)
        return answer

    async def _ask(self, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType,
                   sent_to: list[int]) -> tuple[Answer, float]:
        """One exchange; the index of the nameserver asked goes in ``sent_to``
        so that a timeout can be held against it."""
        await self._slots.acquire()
        try:
            if self._closed:
                raise DnsError("closed")
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
            retired = channel

            def forget(_: object) -> None:
                self._retired.discard(retired)

            channel.retire().addBoth(forget)
            channel = None
        if channel is None:
            channel = _UdpChannel(self.rotate_after)
            try:
                channel.port = self._reactor.listenUDP(0, channel, interface=bind,
                                                       maxPacketSize=UDP_READ_SIZE)
            except CannotListenError as e:
                log.warn("cannot open a UDP socket on {bind} for DNS queries: {error}",
                         bind=bind, error=str(e))
                raise DnsError("network") from None
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
        # Any: mypy cannot see that Factory provides IProtocolFactory.
        endpoint: Any = cls(self._reactor, host, port, timeout=self.timeout)
        try:
            await endpoint.connect(_OneProtocol(exchange))
        except CancelledError:
            raise
        except Exception as e:  # every connect failure means the same here
            log.warn("cannot reach {server} over TCP: {error}", server=server, error=str(e))
            raise DnsError("network") from None
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


def _parse_reply(reply: dns.message.Message, negative_ttl: float) -> tuple[Answer, float]:
    """The records and how long to keep them, or DnsError for a reply
    that is no answer."""
    if not isinstance(reply, dns.message.QueryMessage):  # is_response checked the opcode
        raise DnsError("bad_reply")
    rcode = reply.rcode()
    if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
        raise DnsError(dns.rcode.to_text(rcode).lower())
    qtype = reply.question[0].rdtype
    chain = None
    # NXDOMAIN is "not listed" whatever CNAMEs led there (RFC 6604 2.1).
    if rcode == dns.rcode.NOERROR and reply.answer:
        try:
            chain = reply.resolve_chaining()  # follows CNAMEs; TTL is the chain's minimum
        except (dns.message.ChainTooLong, dns.exception.FormError):
            raise DnsError("bad_reply") from None
    if chain is not None and chain.answer is not None:
        if qtype == dns.rdatatype.TXT:
            rdatas = tuple(b"".join(rd.strings).decode("utf-8", "replace") for rd in chain.answer)
        else:
            rdatas = tuple(rd.to_text() for rd in chain.answer)
        return Answer(rdatas), float(chain.minimum_ttl)
    # NXDOMAIN or NODATA: not listed.  RFC 2308 section 5: keep it for the
    # smaller of the SOA's TTL and its MINIMUM field.
    nxdomain = rcode == dns.rcode.NXDOMAIN
    for rrset in reply.authority:
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
            return Answer((), nxdomain), float(min(rrset.ttl, rrset[0].minimum))
    return Answer((), nxdomain), negative_ttl
