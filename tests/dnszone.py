"""An authoritative DNS server in the test's reactor, for the DNS-list
and SPF tests: Twisted Names serving zones built in memory, on UDP and TCP
of one loopback port.

Each test module keeps its own zone data and the record of questions it
asserts on (``ZoneServer.record``); what they share is here: the zones,
RFC 1035 4.2.1's 512-octet UDP limit (Twisted Names would send the reply
whole), the SOA in NXDOMAIN answers (RFC 2308 section 3), names answered
SERVFAIL or never answered.
"""
from __future__ import annotations

from typing import Any, Iterable

from twisted.internet import defer, reactor
from twisted.internet.error import CannotListenError
from twisted.names import authority, common, dns as tdns, server


class MemoryAuthority(authority.FileAuthority):
    """An authoritative zone built in memory rather than read from a file;
    ``records`` maps owner names to Twisted Names record objects."""

    def __init__(self, zone: str, records: dict[str, list[Any]], soa_ttl: int, soa_minimum: int):
        common.ResolverBase.__init__(self)
        self._cache: dict[Any, Any] = {}
        z = zone.encode()
        self.soa = (z, tdns.Record_SOA(mname=b"ns." + z, rname=b"hostmaster." + z, serial=1,
                                       refresh=3600, retry=600, expire=86400,
                                       minimum=soa_minimum, ttl=soa_ttl))
        self.records: dict[bytes, list[Any]] = {z: [self.soa[1], tdns.Record_NS(b"ns." + z,
                                                                                ttl=soa_ttl)]}
        for name, recs in records.items():
            self.records.setdefault(name.lower().encode(), []).extend(recs)


class ZoneServer(server.DNSServerFactory):
    """Twisted Names' server over ``authorities``: names in ``servfail``
    get SERVFAIL, names in ``drop`` no answer; every question goes to
    ``record`` first."""

    def __init__(self, authorities: list[MemoryAuthority], servfail: Iterable[str] = (),
                 drop: Iterable[str] = ()):
        super().__init__(authorities=authorities, verbose=0)
        self.servfail = frozenset(servfail)
        self.drop = frozenset(drop)
        self._soas = {a.soa[0].decode(): a.soa for a in authorities}

    def record(self, name: str, qtype: int, address: Any) -> None:
        """One question (``address`` None: over TCP)."""

    def handleQuery(self, message: Any, protocol: Any, address: Any) -> Any:  # noqa: N802
        q = message.queries[0]
        name = q.name.name.decode("utf-8", "replace").lower()
        self.record(name, q.type, address)
        if name in self.drop:
            return defer.succeed(None)
        if name in self.servfail:
            self.sendReply(protocol, self._responseFromMessage(message=message, rCode=tdns.ESERVER),
                           address)
            return defer.succeed(None)
        return super().handleQuery(message, protocol, address)

    def sendReply(self, protocol: Any, message: Any, address: Any) -> None:  # noqa: N802
        # RFC 1035 4.2.1: a UDP reply without EDNS is at most 512 octets, cut
        # with TC set.  Twisted Names sends it whole (its ticket #6949), so
        # the fixture sets the limit itself; over TCP there is none.
        message.maxSize = 512 if address is not None else 0
        super().sendReply(protocol, message, address)

    def gotResolverError(self, failure: Any, protocol: Any, message: Any,  # noqa: N802
                         address: Any) -> None:
        if not failure.check(tdns.DomainError, tdns.AuthoritativeDomainError):
            return super().gotResolverError(failure, protocol, message, address)
        name = message.queries[0].name.name.decode("utf-8", "replace").lower()
        zone = next((z for z in self._soas if name == z or name.endswith("." + z)), None)
        authority_section = []
        if zone is not None:
            owner, soa = self._soas[zone]
            authority_section.append(tdns.RRHeader(owner, tdns.SOA, tdns.IN, soa.ttl, soa,
                                                   auth=True))
        self.sendReply(protocol, self._responseFromMessage(
            message=message, rCode=tdns.ENAME, authority=authority_section), address)


def serve(case: Any, factory: ZoneServer) -> int:
    """``factory`` on UDP and TCP 127.0.0.1:<port>, stopped at the test's
    cleanup; the port."""
    for _ in range(10):  # the TCP port of the same number may be taken: try another
        udp = reactor.listenUDP(0, tdns.DNSDatagramProtocol(factory), interface="127.0.0.1")
        port = udp.getHost().port
        try:
            tcp = reactor.listenTCP(port, factory, interface="127.0.0.1")
        except CannotListenError:
            udp.stopListening()
            continue
        case.addCleanup(udp.stopListening)
        case.addCleanup(tcp.stopListening)
        return port
    raise RuntimeError("no port free on UDP and TCP at once")
