"""The DNS client (dns/resolver.py), its names (dns/names.py) and its
nameservers (dns/nameservers.py), against real authoritative servers on
loopback: the DNS list zones of test_dnsbl.py and the SPF zones of
test_spf.py (Twisted Names; they count what they are asked, so the cache
tests can prove that no packet was sent).
"""
from __future__ import annotations

import ipaddress
from typing import Any, Optional

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
from twisted.internet import defer, reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock, deferLater
from twisted.names import dns as tdns
from twisted.trial import unittest

from mppproxy.config.dns import DnsConfig
from mppproxy.dns.names import normalise_domain, reverse_ip, to_query_name
from mppproxy.dns.nameservers import nameservers
from mppproxy.dns.resolver import Answer, DnsCache, DnsError, Resolver
from test_dnsbl import A_TTL, SOA_MINIMUM, start_dns_server, start_silent_server
from test_spf import start_server as start_spf_server

reactor: Any = _reactor


class ResolverCase(unittest.TestCase):
    """The DNS list zones (zen.test, dbl.test) on 127.0.0.1."""

    timeout = 30

    def setUp(self) -> None:
        self.server, self.port = start_dns_server(self)

    def resolver(self, port: Optional[int] = None, timeout: float = 2.0,
                 cache: Optional[DnsCache] = None, **kw: Any) -> Resolver:
        r = Resolver(reactor, [("127.0.0.1", port or self.port)], timeout=timeout,
                     cache=cache, **kw)
        self.addCleanup(r.close)
        return r


class NameTests(unittest.TestCase):

    def test_reverse_ip_table(self) -> None:
        """IPv4 octets and IPv6 nibbles are reversed as RFC 5782 2.1 and 2.4 show."""
        self.assertEqual(reverse_ip("192.0.2.99"), "99.2.0.192")
        # The example of RFC 5782 section 2.4.
        self.assertEqual(reverse_ip("2001:db8:abc:123::42"),
                         "2.4.0.0.0.0.0.0.0.0.0.0.0.0.0.0.3.2.1.0.c.b.a.0.8.b.d.0.1.0.0.2")
        self.assertEqual(reverse_ip("::ffff:192.0.2.99"), "99.2.0.192")
        with self.assertRaises(ValueError):
            reverse_ip("not-an-ip")

    def test_normalise_domain_table(self) -> None:
        """Domains are lower-cased, lose a trailing dot and become IDNA A-labels; literals are refused."""
        self.assertEqual(normalise_domain("DblTest.COM."), "dbltest.com")
        self.assertEqual(normalise_domain("BÜCHER.example"), "xn--bcher-kva.example")
        self.assertEqual(normalise_domain("xn--bcher-kva.example"), "xn--bcher-kva.example")
        for bad in ("[192.0.2.1]", "192.0.2.1", "a..b", "", ".", "a b.test", "x" * 64 + ".test",
                    "a\\.b.test"):
            with self.assertRaises(ValueError, msg=bad):
                normalise_domain(bad)


class NameserverTests(unittest.TestCase):

    def test_configured_nameservers_are_parsed(self) -> None:
        """Configured nameservers become (IP, port) pairs, port 53 unless given."""
        config = DnsConfig(nameservers=("192.0.2.1", "192.0.2.2:5353", "[2001:db8::1]:53"))
        self.assertEqual(nameservers(config),
                         (("192.0.2.1", 53), ("192.0.2.2", 5353), ("2001:db8::1", 53)))

    def test_without_configured_nameservers_the_system_is_asked(self) -> None:
        """With none configured, the system's nameservers (or 127.0.0.1) are used."""
        found = nameservers(DnsConfig())
        self.assertTrue(1 <= len(found) <= 4, found)
        for host, port in found:
            ipaddress.ip_address(host)
            self.assertTrue(1 <= port <= 65535)


class TcpTests(ResolverCase):

    async def test_truncated_reply_is_asked_again_over_tcp(self) -> None:
        """A TXT reply too long for 512 octets of UDP comes truncated and is fetched over TCP."""
        answer = await self.resolver().query("77.2.0.192.zen.test", "TXT")
        self.assertEqual(answer.texts, ("a" * 200 + "b" * 200 + "c" * 200,))
        self.assertEqual(self.server.count("77.2.0.192.zen.test", "tcp"), 1)


class SlotTests(ResolverCase):

    async def test_slots_bound_queries_in_flight(self) -> None:
        """With one slot, queries wait their turn and all still get answers."""
        r = self.resolver(max_in_flight=1, cache=DnsCache(Clock(), max_entries=0))
        names = [f"{i}.0.0.127.zen.test" for i in (2, 3, 4, 10)]
        answers = await defer.gatherResults(
            [Deferred.fromCoroutine(r.query(name, "A")) for name in names])
        self.assertEqual([bool(a.records) for a in answers], [True] * 4)
        self.assertEqual(self.server.count(), 4)


class TimeoutTests(ResolverCase):

    async def test_timeout_is_a_dns_error_and_not_cached(self) -> None:
        """A timed-out query raises DnsError("timeout") and is asked again next time."""
        silent = start_silent_server(self)
        r = self.resolver(port=silent, timeout=0.2)
        with self.assertRaises(DnsError) as e:
            await r.query("2.0.0.127.zen.test", "A")
        self.assertEqual(e.exception.kind, "timeout")
        self.assertEqual(len(r.cache), 0)

    async def test_dead_nameserver_loses_its_place(self) -> None:
        """After a timeout on the first nameserver, queries go to the second and get answers."""
        silent = start_silent_server(self)
        r = Resolver(reactor, [("127.0.0.1", silent), ("127.0.0.1", self.port)], timeout=0.3)
        self.addCleanup(r.close)
        with self.assertRaises(DnsError):
            await r.query("2.0.0.127.zen.test", "A")
        second = await r.query("2.0.0.127.zen.test", "A")
        self.assertEqual(second.records, ("127.0.0.2",))


class CacheTests(ResolverCase):

    async def test_second_query_sends_no_packet(self) -> None:
        """A second query for the same name and type is answered from the cache: the server sees nothing."""
        r = self.resolver()
        first = await r.query("2.0.0.127.zen.test", "A")
        second = await r.query("2.0.0.127.zen.test", "A")
        self.assertEqual(self.server.count(), 1)
        self.assertEqual(first, second)

    async def test_positive_entry_expires_after_its_ttl(self) -> None:
        """An answer is kept for its TTL on the cache clock and asked again after."""
        clock = Clock()
        r = self.resolver(cache=DnsCache(clock))
        name = "2.0.0.127.zen.test"
        await r.query(name, "A")
        clock.advance(A_TTL - 1)
        await r.query(name, "A")
        self.assertEqual(self.server.count(name), 1)
        clock.advance(2)
        await r.query(name, "A")
        self.assertEqual(self.server.count(name), 2)

    async def test_negative_entry_lives_for_soa_minimum(self) -> None:
        """NXDOMAIN is kept for min(SOA TTL, SOA MINIMUM) seconds (RFC 2308 section 5)."""
        clock = Clock()
        r = self.resolver(cache=DnsCache(clock))
        for step in (0, SOA_MINIMUM - 1, 2):
            clock.advance(step)
            answer = await r.query("1.2.0.192.zen.test", "A")
            self.assertTrue(answer.nxdomain)
        self.assertEqual(self.server.count("1.2.0.192.zen.test"), 2)

    async def test_short_ttl_is_honoured(self) -> None:
        """An answer with a 5 s TTL is asked again after 5 s while others stay cached."""
        clock = Clock()
        r = self.resolver(cache=DnsCache(clock))
        for _ in range(2):
            await r.query("5.2.0.192.zen.test", "A")
            await r.query("10.0.0.127.zen.test", "A")
            clock.advance(6)
        self.assertEqual(self.server.count("5.2.0.192.zen.test"), 2)
        self.assertEqual(self.server.count("10.0.0.127.zen.test"), 1)

    def test_cache_is_bounded_lru(self) -> None:
        """The cache holds at most max_entries, evicting the least recently used."""
        cache = DnsCache(Clock(), max_entries=2)
        cache.put("a", Answer(("127.0.0.2",)), 60)
        cache.put("b", Answer(()), 60)
        self.assertIsNotNone(cache.get("a"))
        cache.put("c", Answer(()), 60)
        self.assertEqual((len(cache), cache.get("b"), cache.get("a") is not None), (2, None, True))

    def test_cache_caps_ttls(self) -> None:
        """A huge TTL is capped (one day positive, three hours negative); 0 is not kept."""
        clock = Clock()
        cache = DnsCache(clock)
        cache.put("pos", Answer(("127.0.0.2",)), 10**9)
        cache.put("neg", Answer(()), 10**9)
        cache.put("zero", Answer(("127.0.0.2",)), 0)
        self.assertIsNone(cache.get("zero"))
        clock.advance(10800 + 1)
        self.assertEqual((cache.get("pos") is not None, cache.get("neg")), (True, None))
        clock.advance(86400)
        self.assertIsNone(cache.get("pos"))


class SpoofingTests(unittest.TestCase):

    async def test_mismatched_replies_are_ignored(self) -> None:
        """Replies with a wrong id or a wrong question are ignored; the true reply is used."""

        class Liar(DatagramProtocol):
            def datagramReceived(self, data: bytes, addr: Any) -> None:
                query = dns.message.from_wire(data)
                wrong_id = dns.message.make_response(query)
                wrong_id.id = (query.id + 1) % 65536
                wrong_id.answer.append(dns.rrset.from_text(query.question[0].name, 60, "IN", "A",
                                                           "127.0.0.2"))
                other = dns.message.make_query("2.0.0.127.other.test", "A", id=query.id)
                wrong_q = dns.message.make_response(other)
                wrong_q.answer.append(dns.rrset.from_text("2.0.0.127.other.test.", 60, "IN", "A",
                                                          "127.0.0.2"))
                truth = dns.message.make_response(query)
                truth.set_rcode(dns.rcode.NXDOMAIN)
                for m in (wrong_id, wrong_q):
                    self.transport.write(m.to_wire(), addr)
                self.transport.write(b"\x00garbage", addr)
                self.transport.write(truth.to_wire(), addr)

        port = reactor.listenUDP(0, Liar(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        r = Resolver(reactor, [("127.0.0.1", port.getHost().port)], timeout=2)
        self.addCleanup(r.close)
        answer = await r.query("2.0.0.127.zen.test", "A")
        self.assertEqual((answer.records, answer.nxdomain), ((), True))

    async def test_source_port_changes_after_rotation(self) -> None:
        """Queries leave from a fresh random source port after rotate_after queries."""
        server_, port = start_dns_server(self)
        r = Resolver(reactor, [("127.0.0.1", port)], timeout=2, rotate_after=2)
        self.addCleanup(r.close)
        for i in range(6):
            await r.query(f"{i + 10}.2.0.192.zen.test", "A")
        ports = {client[1] for _, _, _, client in server_.asked}
        self.assertEqual(len(server_.asked), 6)
        self.assertGreaterEqual(len(ports), 2)
        await deferLater(reactor, 0, lambda: None)  # UDP ports close on the next turn
        self.assertEqual((len(r._channels), len(r._retired)), (1, 0))


class ValidationTests(unittest.TestCase):

    def test_resolver_refuses_bad_nameservers(self) -> None:
        """Nameservers must be (IP address, port) pairs; the constructor does no I/O."""
        for bad in ([], [("ns.example", 53)], [("127.0.0.1", 0)]):
            with self.assertRaises(ValueError):
                Resolver(reactor, bad)


class QueryTests(unittest.TestCase):
    """``query`` against the SPF test zones (every record type)."""

    timeout = 30

    def setUp(self) -> None:
        self.server, self.port = start_spf_server(self)

    def resolver(self, timeout: float = 0.5) -> Resolver:
        r = Resolver(reactor, [("127.0.0.1", self.port)], timeout=timeout)
        self.addCleanup(r.close)
        return r


    async def test_txt_a_aaaa_mx_ptr(self) -> None:
        """query() returns each record type in a usable form."""
        r = self.resolver()
        txt = await r.query("joined.example.com", "TXT")
        self.assertEqual(txt.texts, ("v=spf1 ip4:1.2.3.4 -all",))
        a = await r.query("foo1.example.com", dns.rdatatype.A)
        self.assertEqual(set(map(str, a.addresses)), {"1.1.1.1", "1.2.3.5"})
        aaaa = await r.query("mail.example.com.", "AAAA")
        self.assertEqual(aaaa.addresses, (ipaddress.ip_address("2001:db8::1"),))
        mx = await r.query("foo.example.com", "MX")
        self.assertEqual(mx.mx, ((0, to_query_name("foo1.example.com")),))
        ptr = await r.query("4.3.2.1.in-addr.arpa", "PTR")
        self.assertEqual(len(ptr.names), 3)
        null = await r.query("mail.example.com", "MX")
        self.assertEqual(null.mx[0][1].to_text(), ".")

    async def test_nxdomain_and_nodata_told_apart(self) -> None:
        """NXDOMAIN and NOERROR without records are both void, and told apart."""
        r = self.resolver()
        nx = await r.query("nowhere.example.com", "A")
        nodata = await r.query("mail6.example.com", "A")
        self.assertTrue(nx.void and nx.nxdomain)
        self.assertTrue(nodata.void)
        self.assertFalse(nodata.nxdomain)
        # and from the cache too
        again = await r.query("nowhere.example.com", "A")
        self.assertTrue(again.nxdomain)
        self.assertEqual(self.server.asked.count(("nowhere.example.com", tdns.A)), 1)

    async def test_failures_raise_dns_error(self) -> None:
        """SERVFAIL and timeouts raise DnsError naming the kind; bad names ValueError."""
        r = self.resolver(timeout=0.2)
        with self.assertRaises(DnsError) as e:
            await r.query("servfail.example.com", "A")
        self.assertEqual(e.exception.kind, "servfail")
        with self.assertRaises(DnsError) as e:
            await r.query("drop.example.com", "TXT")
        self.assertEqual(e.exception.kind, "timeout")
        for bad in ("a..example.com", "x" * 64 + ".example.com", "", "."):
            with self.assertRaises(ValueError):
                await r.query(bad, "A")

    async def test_literal_labels(self) -> None:
        """Names are taken literally: ':' '/' '%' and spaces are label octets."""
        r = self.resolver()
        a = await r.query("macro%percent  space%20url-space.example.com", "A")
        self.assertEqual([str(x) for x in a.addresses], ["1.2.3.4"])
