"""DNSBL/RHSBL lookups (policy/dnsbl.py) against a real authoritative DNS server on loopback.

The server is Twisted Names, started in the test's reactor on 127.0.0.1 (UDP
and TCP on one port) from in-memory zones ``zen.test`` (an IP list) and
``dbl.test`` (a domain list); it counts the queries it answers, so cache tests
can prove that no packet was sent.  Names not in the zones get NXDOMAIN with
the zone's SOA (RFC 2308 section 3), and UDP replies over 512 octets are
truncated with TC set (RFC 1035 4.2.1).  A "silent" server is a bound UDP port
that never answers.  The DNS client itself is tested in test_dns_resolver.py.
"""
from __future__ import annotations

import time
from typing import Any, Optional

from twisted.internet import reactor as _reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import LogLevel, capturedLogs
from twisted.names import dns as tdns
from twisted.trial import unittest

from dnszone import MemoryAuthority, ZoneServer, serve
from mppproxy.config.dnsbl import MAX_LISTS, DnsblList, validate_dnsbl_list, validate_dnsbl_lists
from mppproxy.dns.resolver import DnsCache, Resolver
from mppproxy.policy.dnsbl import MAX_DOMAINS, classify, lookup_all, query_name

reactor: Any = _reactor

SOA_TTL = 60
SOA_MINIMUM = 30  # the negative TTL is min(SOA TTL, MINIMUM) = 30 (RFC 2308 section 5)
A_TTL = 60
LONG_TXT = (b"a" * 200, b"b" * 200, b"c" * 200)  # over 512 octets: UDP reply truncated
V6_LISTED = "2001:db8::1"
V6_NAME = "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.zen.test"

# name -> [(type, value, ttl)]
ZONES: dict[str, dict[str, list[tuple[str, Any, int]]]] = {
    "zen.test": {
        "2.0.0.127.zen.test": [("A", "127.0.0.2", A_TTL),
                               ("TXT", (b"https://zen.test/query/ip/127.0.0.2",), A_TTL)],
        "10.0.0.127.zen.test": [("A", "127.0.0.10", A_TTL)],
        # A listing whose TXT tries to end an SMTP reply line early.
        "3.0.0.127.zen.test": [("A", "127.0.0.3", A_TTL),
                               ("TXT", (b"line one\r\n250 injected",), A_TTL)],
        # Two codes in one answer (zen answers SBL and PBL together).
        "4.0.0.127.zen.test": [("A", "127.0.0.4", A_TTL), ("A", "127.0.0.11", A_TTL)],
        V6_NAME: [("A", "127.0.0.2", A_TTL)],
        "99.2.0.192.zen.test": [("A", "127.255.255.254", A_TTL)],  # Spamhaus error code
        "88.2.0.192.zen.test": [("A", "8.8.8.8", A_TTL)],  # wildcard junk
        "5.2.0.192.zen.test": [("A", "127.0.0.2", 5)],  # short TTL
        "77.2.0.192.zen.test": [("A", "127.0.0.3", A_TTL), ("TXT", LONG_TXT, A_TTL)],
    },
    "dbl.test": {
        "dbltest.com.dbl.test": [("A", "127.0.1.2", A_TTL),
                                 ("TXT", (b"listed in dbl.test",), A_TTL)],
        "xn--bcher-kva.example.dbl.test": [("A", "127.0.1.2", A_TTL)],
    },
}
SERVFAIL = {"66.2.0.192.zen.test"}


class _CountingServer(ZoneServer):
    """The test zones' server, remembering each question it was asked."""

    def __init__(self, authorities: list[MemoryAuthority]):
        super().__init__(authorities, servfail=SERVFAIL)
        self.asked: list[tuple[str, int, str, Any]] = []  # (name, type, udp|tcp, client)

    def record(self, name: str, qtype: int, address: Any) -> None:
        self.asked.append((name, qtype, "udp" if address is not None else "tcp", address))

    def count(self, name: Optional[str] = None, transport: Optional[str] = None,
              qtype: Optional[int] = None) -> int:
        return sum(1 for n, q, t, _ in self.asked
                   if (name is None or n == name) and (transport is None or t == transport)
                   and (qtype is None or q == qtype))


def _records(records: dict[str, list[tuple[str, Any, int]]]) -> dict[str, list[Any]]:
    """The zone notation above as Twisted Names records."""
    return {name: [tdns.Record_A(value, ttl=ttl) if rtype == "A" else tdns.Record_TXT(*value, ttl=ttl)
                   for rtype, value, ttl in recs]
            for name, recs in records.items()}


def start_dns_server(case: unittest.TestCase) -> tuple[_CountingServer, int]:
    """The test zones on UDP and TCP 127.0.0.1:<port>; stopped at cleanup."""
    factory = _CountingServer([MemoryAuthority(z, _records(r), SOA_TTL, SOA_MINIMUM)
                               for z, r in ZONES.items()])
    return factory, serve(case, factory)


def start_silent_server(case: unittest.TestCase) -> int:
    """A bound UDP port that reads queries and never answers."""
    port = reactor.listenUDP(0, DatagramProtocol(), interface="127.0.0.1")
    case.addCleanup(port.stopListening)
    return port.getHost().port


ZEN = DnsblList(zone="zen.test", kind="ip", score=5.0, fetch_txt=True)
DBL = DnsblList(zone="dbl.test", kind="domain", score=3.0, fetch_txt=True)


class DnsblCase(unittest.TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.server, self.port = start_dns_server(self)

    def resolver(self, port: Optional[int] = None, timeout: float = 2.0,
                 cache: Optional[DnsCache] = None, **kw: Any) -> Resolver:
        r = Resolver(reactor, [("127.0.0.1", port or self.port)], timeout=timeout,
                     cache=cache, **kw)
        self.addCleanup(r.close)
        return r


class ListedTests(DnsblCase):

    async def test_listed_ip_scores_and_carries_codes_and_txt(self) -> None:
        """A listed IPv4 client scores the list's score, with its return code and TXT reason."""
        [res] = await lookup_all(self.resolver(), [ZEN], ip="127.0.0.2")
        self.assertTrue(res.listed)
        self.assertEqual(res.score, 5.0)
        self.assertEqual(res.codes, ("127.0.0.2",))
        self.assertEqual(res.hits, ("2.0.0.127",))
        self.assertEqual(res.reason, "https://zen.test/query/ip/127.0.0.2")
        self.assertIsNone(res.error)
        self.assertEqual(res.name, "zen.test")

    async def test_not_listed_nxdomain_scores_zero(self) -> None:
        """An address the list does not hold (NXDOMAIN) is not listed, scores 0 and is no error."""
        [res] = await lookup_all(self.resolver(), [ZEN], ip="192.0.2.1")
        self.assertEqual((res.listed, res.score, res.error, res.codes), (False, 0.0, None, ()))
        self.assertEqual(self.server.count("1.2.0.192.zen.test"), 1)

    async def test_txt_fetched_only_when_listed_and_asked(self) -> None:
        """TXT is asked only for a listed address of a list with fetch_txt set."""
        r = self.resolver()
        plain = DnsblList(zone="zen.test", name="zen-plain")
        await lookup_all(r, [ZEN], ip="192.0.2.1")
        [res] = await lookup_all(r, [plain], ip="127.0.0.10")
        self.assertTrue(res.listed)
        self.assertIsNone(res.reason)
        self.assertEqual([t for _, t, _, _ in self.server.asked], [tdns.A, tdns.A])

    async def test_txt_reason_cannot_break_a_reply_line(self) -> None:
        """CR and LF in a TXT reason become spaces, so it cannot end an SMTP reply early."""
        [res] = await lookup_all(self.resolver(), [ZEN], ip="127.0.0.3")
        self.assertEqual(res.reason, "line one 250 injected")

    async def test_servfail_is_an_error_scoring_zero(self) -> None:
        """A SERVFAIL from the list scores 0 with error "servfail"."""
        [res] = await lookup_all(self.resolver(), [ZEN], ip="192.0.2.66")
        self.assertEqual((res.listed, res.score, res.error), (False, 0.0, "servfail"))

    async def test_truncated_reply_is_asked_again_over_tcp(self) -> None:
        """A TXT reply too long for 512 octets of UDP comes truncated and is fetched over TCP."""
        [res] = await lookup_all(self.resolver(), [ZEN], ip="192.0.2.77")
        self.assertTrue(res.listed)
        self.assertEqual(self.server.count("77.2.0.192.zen.test", "tcp"), 1)
        assert res.reason is not None
        self.assertEqual(len(res.reason), 200)  # bounded (MAX_REASON)
        self.assertTrue(res.reason.startswith("a" * 200))


class CodeFilterTests(DnsblCase):

    async def test_range_keeps_codes_inside(self) -> None:
        """A code inside a configured range counts, one outside it does not list the address."""
        sbl = DnsblList(zone="zen.test", codes=("127.0.0.2-127.0.0.3",), name="sbl")
        pbl = DnsblList(zone="zen.test", codes=("127.0.0.10-127.0.0.11",), name="pbl")
        r = self.resolver()
        res = await lookup_all(r, [sbl, pbl], ip="127.0.0.10")
        self.assertEqual([(x.name, x.listed, x.codes) for x in res],
                         [("sbl", False, ()), ("pbl", True, ("127.0.0.10",))])
        self.assertIsNone(res[0].error)

    async def test_only_matching_codes_of_a_multi_answer_are_reported(self) -> None:
        """Of several codes in one answer, only those the list accepts are reported."""
        single = DnsblList(zone="zen.test", codes=("127.0.0.11", "127.0.0.0/30"), name="x")
        [res] = await lookup_all(self.resolver(), [single], ip="127.0.0.4")
        self.assertEqual(res.codes, ("127.0.0.11",))
        [res] = await lookup_all(self.resolver(), [DnsblList(zone="zen.test")], ip="127.0.0.4")
        self.assertEqual(sorted(res.codes), ["127.0.0.11", "127.0.0.4"])

    async def test_error_code_is_an_error_not_a_listing(self) -> None:
        """127.255.255.254 (Spamhaus: query via a public resolver) scores 0 with error "list_error"."""
        [res] = await lookup_all(self.resolver(), [ZEN], ip="192.0.2.99")
        self.assertEqual((res.listed, res.score, res.error), (False, 0.0, "list_error"))

    async def test_answer_outside_loopback_net_is_ignored(self) -> None:
        """An answer outside 127.0.0.0/8 (wildcard junk) lists nothing and reports "bogus_answer"."""
        with capturedLogs() as events:
            [res] = await lookup_all(self.resolver(), [ZEN], ip="192.0.2.88")
        self.assertEqual((res.listed, res.score, res.codes, res.error),
                         (False, 0.0, (), "bogus_answer"))
        self.assertEqual([(e["log_level"], e["dnsbl"]) for e in events if e.get("address") == "8.8.8.8"],
                         [(LogLevel.warn, "zen.test")])

    def test_classify_table(self) -> None:
        """classify keeps 127/8 codes in range, drops junk, and lets an error code void the answer."""
        any_code = DnsblList(zone="l.test")
        some = DnsblList(zone="l.test", codes=("127.0.0.2-127.0.0.11",))
        cases = [
            (any_code, ["127.0.0.2"], (("127.0.0.2",), None)),
            (any_code, ["8.8.8.8", "127.0.0.5"], (("127.0.0.5",), None)),
            (any_code, ["8.8.8.8"], ((), "bogus_answer")),
            (any_code, ["127.0.0.2", "127.255.255.252"], ((), "list_error")),
            (any_code, ["127.0.1.255"], ((), "list_error")),
            (some, ["127.0.0.12"], ((), None)),
            (some, ["127.0.0.11", "127.0.0.1"], (("127.0.0.11",), None)),
        ]
        for dnsbl, answers, expected in cases:
            self.assertEqual(classify(dnsbl, answers), expected, (dnsbl.codes, answers))


class QueryNameTests(DnsblCase):

    def test_query_name_too_long_is_refused(self) -> None:
        """A subject that would make the query name longer than 255 octets is a ValueError."""
        long_domain = ".".join(["a" * 60] * 4 + ["b" * 8])  # 252 + ".dbl.test" > 255 octets
        with self.assertRaises(ValueError):
            query_name(DBL, long_domain)

    async def test_ipv6_client_is_asked_by_nibbles(self) -> None:
        """An IPv6 client is asked as its 32 reversed nibbles under the zone and found listed."""
        [res] = await lookup_all(self.resolver(), [ZEN], ip=V6_LISTED)
        self.assertTrue(res.listed)
        self.assertEqual(self.server.count(V6_NAME, qtype=tdns.A), 1)

    async def test_rhsbl_domain_listed(self) -> None:
        """A listed domain on an RHSBL scores, found under its normalised name."""
        [res] = await lookup_all(self.resolver(), [DBL], domains=["DBLTEST.com."])
        self.assertEqual((res.listed, res.score, res.codes, res.hits),
                         (True, 3.0, ("127.0.1.2",), ("dbltest.com",)))
        self.assertEqual(res.reason, "listed in dbl.test")

    async def test_rhsbl_idna_domain_asked_as_a_labels(self) -> None:
        """An internationalised domain is asked as its IDNA A-labels and found listed."""
        [res] = await lookup_all(self.resolver(), [DBL], domains=["Bücher.example"])
        self.assertTrue(res.listed)
        self.assertEqual(self.server.count("xn--bcher-kva.example.dbl.test", qtype=tdns.A), 1)

    async def test_address_literal_domain_is_not_asked(self) -> None:
        """An address literal or IP among the domains is skipped; nothing is sent, nothing scored."""
        [res] = await lookup_all(self.resolver(), [DBL], domains=["[127.0.0.2]", "127.0.0.2"])
        self.assertEqual((res.listed, res.error), (False, None))
        self.assertEqual(self.server.asked, [])

    async def test_lists_of_the_other_kind_are_not_asked(self) -> None:
        """An IP list with no IP and a domain list with no domains are not listed and send nothing."""
        res = await lookup_all(self.resolver(), [ZEN, DBL])
        self.assertEqual([(x.listed, x.error) for x in res], [(False, None), (False, None)])
        self.assertEqual(self.server.asked, [])

    async def test_any_listed_domain_lists_the_client(self) -> None:
        """With several domains, one listed domain lists the client and is named in hits."""
        [res] = await lookup_all(self.resolver(), [DBL], domains=["clean.example", "dbltest.com",
                                                                  "dbltest.com"])
        self.assertEqual((res.listed, res.hits), (True, ("dbltest.com",)))
        self.assertEqual(self.server.count(transport="udp"), 3)  # 2 A (deduplicated) + 1 TXT


class ConcurrencyTests(DnsblCase):

    async def test_several_lists_for_one_client(self) -> None:
        """All lists for one client are asked and answered in one lookup, one result each, in order."""
        sbl = DnsblList(zone="zen.test", codes=("127.0.0.2",), name="sbl", score=2.0)
        pbl = DnsblList(zone="zen.test", codes=("127.0.0.10",), name="pbl", score=1.0)
        res = await lookup_all(self.resolver(), [ZEN, sbl, pbl, DBL], ip="127.0.0.2",
                               domains=["dbltest.com"])
        self.assertEqual([(x.name, x.listed, x.score) for x in res],
                         [("zen.test", True, 5.0), ("sbl", True, 2.0), ("pbl", False, 0.0),
                          ("dbl.test", True, 3.0)])

    async def test_queries_run_concurrently(self) -> None:
        """Four lists on a silent server all time out together, in about one timeout, not four."""
        silent = start_silent_server(self)
        lists = [DnsblList(zone=f"l{i}.test") for i in range(4)]
        start = time.monotonic()
        res = await lookup_all(self.resolver(port=silent, timeout=0.5), lists, ip="127.0.0.2")
        elapsed = time.monotonic() - start
        self.assertEqual([x.error for x in res], ["timeout"] * 4)
        self.assertLess(elapsed, 1.5)

    def test_too_many_lists_or_domains_is_refused(self) -> None:
        """More than MAX_LISTS lists or MAX_DOMAINS domains in one lookup is a ValueError."""
        r = self.resolver()
        lists = [DnsblList(zone="zen.test", name=f"z{i}") for i in range(MAX_LISTS + 1)]
        self.failureResultOf(Deferred.fromCoroutine(lookup_all(r, lists)), ValueError)
        domains = [f"d{i}.example" for i in range(MAX_DOMAINS + 1)]
        self.failureResultOf(Deferred.fromCoroutine(lookup_all(r, [DBL], domains=domains)), ValueError)
        self.assertEqual(self.server.asked, [])


class TimeoutTests(DnsblCase):

    async def test_silent_server_times_out_and_scores_zero(self) -> None:
        """A list whose server never answers gives error "timeout", score 0, within the timeout."""
        silent = start_silent_server(self)
        start = time.monotonic()
        with capturedLogs() as events:
            [res] = await lookup_all(self.resolver(port=silent, timeout=0.3), [ZEN], ip="127.0.0.2")
        elapsed = time.monotonic() - start
        self.assertEqual((res.listed, res.score, res.error), (False, 0.0, "timeout"))
        self.assertEqual([(e["dnsbl"], e["qname"]) for e in events if e.get("error") == "timeout"],
                         [("zen.test", "2.0.0.127.zen.test.")])
        self.assertGreaterEqual(elapsed, 0.25)
        self.assertLess(elapsed, 1.3)

    def test_cancel_closes_everything(self) -> None:
        """Cancelling a lookup in flight fails it with CancelledError and leaves no query pending."""
        silent = start_silent_server(self)
        r = self.resolver(port=silent, timeout=10)
        d = Deferred.fromCoroutine(lookup_all(r, [ZEN, DBL], ip="127.0.0.2", domains=["x.example"]))
        self.assertNoResult(d)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual([c._pending for c in r._channels.values()], [{}])


class ValidationTests(unittest.TestCase):

    def test_valid_list_and_default_name(self) -> None:
        """A well-formed list validates, and its name defaults to its zone."""
        lst = DnsblList(zone="zen.spamhaus.org", codes=("127.0.0.2-127.0.0.11", "127.0.1.0/24"))
        self.assertIsNone(validate_dnsbl_list(lst))
        self.assertEqual(lst.name, "zen.spamhaus.org")

    def test_bad_values_are_named(self) -> None:
        """Each bad field gives an error string naming the field, never an exception."""
        cases = {
            "zone": DnsblList(zone="not a zone"),
            "kind": DnsblList(zone="zen.test", kind="url"),
            "score": DnsblList(zone="zen.test", score=float("nan")),
            "codes": DnsblList(zone="zen.test", codes=("8.8.8.8",)),
        }
        for fieldname, lst in cases.items():
            problem = validate_dnsbl_list(lst)
            assert problem is not None, fieldname
            self.assertTrue(problem.startswith(fieldname + ":"), problem)
        for codes in (("127.0.0.9-127.0.0.2",), ("127.0.0.x",), ("127.0.0.2-128.0.0.1",)):
            self.assertIsNotNone(validate_dnsbl_list(DnsblList(zone="zen.test", codes=codes)), codes)

    def test_list_of_lists_bounded_and_unique(self) -> None:
        """Too many lists or two lists with one name are configuration errors."""
        self.assertIsNone(validate_dnsbl_lists([ZEN, DBL]))
        self.assertIn("two lists", validate_dnsbl_lists([ZEN, ZEN]) or "")
        many = [DnsblList(zone="zen.test", name=f"z{i}") for i in range(MAX_LISTS + 1)]
        self.assertIn("at most", validate_dnsbl_lists(many) or "")
