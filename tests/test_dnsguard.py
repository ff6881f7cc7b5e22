"""The DNS-list health guard (mppproxy/policy/dnsguard.py, issue 14): lists
that list everything or stop answering are suspended, loudly, and used
again once their canaries (RFC 5782 section 5) pass.

Real DNS on loopback (tests/dnszone.py: Twisted Names serving in-memory
zones): ``good.test`` behaves, ``dead.test`` answers "listed" for
127.0.0.1 too (what a list that shut down does), ``gone.test`` lists
nothing any more, ``slow.test`` never answers, ``dom.test`` is a good
domain list.  The guard's rounds run on a ``task.Clock`` so the test
decides when the next one is due; the queries go over the real reactor.
"""
from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.names import dns as tdns
from twisted.trial import unittest

from dnszone import MemoryAuthority, ZoneServer, serve
from mppproxy.config.dnsbl import DnsblList, validate_dnsbl_list
from mppproxy.dns.resolver import Resolver
from mppproxy.policy.base import Facts
from mppproxy.policy.checks.dnsbl import DnsblCheck
from mppproxy.policy.dnsbl import DnsblResult
from mppproxy.policy.dnsguard import SUSPENDED_RETRY, DnsListGuard
from mppproxy.policy.services import PolicyServices

LISTED = [tdns.Record_A("127.0.0.2", ttl=1)]
CLIENT = "192.0.2.99"
CLIENT_NAME = "99.2.0.192"


def zones() -> dict[str, dict[str, list[Any]]]:
    return {
        "good.test": {"2.0.0.127.good.test": LISTED, f"{CLIENT_NAME}.good.test": LISTED},
        "dead.test": {"1.0.0.127.dead.test": LISTED, "2.0.0.127.dead.test": LISTED,
                      f"{CLIENT_NAME}.dead.test": LISTED},
        "gone.test": {},
        "slow.test": {},
        "dom.test": {"test.dom.test": LISTED},
    }


GOOD = DnsblList(zone="good.test", score=1.0)
DEAD = DnsblList(zone="dead.test", score=5.0)
GONE = DnsblList(zone="gone.test")
SLOW = DnsblList(zone="slow.test")
DOM = DnsblList(zone="dom.test", kind="domain")


class GuardTests(unittest.TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.zones = zones()
        authorities = [MemoryAuthority(z, r, 1, 1) for z, r in self.zones.items()]
        self.server = ZoneServer(authorities, drop=["1.0.0.127.slow.test", "2.0.0.127.slow.test",
                                                    f"{CLIENT_NAME}.slow.test"])
        port = serve(self, self.server)
        self.resolver = Resolver(reactor, [("127.0.0.1", port)], timeout=0.5)
        self.addCleanup(self.resolver.close)
        self.clock = Clock()
        self.guard = DnsListGuard(self.clock, lambda: self.resolver, interval=300.0)
        self.addCleanup(self.guard.stop)

    async def test_canaries_tell_sane_lists_from_broken_ones(self) -> None:
        """good and dom pass; dead lists 127.0.0.1, gone lost its test entry, slow does not answer; a list without a test entry is not asked for one."""
        problems = {d.zone: await self.guard.canary_problem(d)
                    for d in (GOOD, DOM, DEAD, GONE, SLOW)}
        self.assertIsNone(problems["good.test"])
        self.assertIsNone(problems["dom.test"])
        self.assertIn("lists 127.0.0.1", problems["dead.test"] or "")
        self.assertIn("test entry 127.0.0.2 is not listed", problems["gone.test"] or "")
        self.assertIn("no answer (timeout)", problems["slow.test"] or "")
        no_test = DnsblList(zone="gone.test", check_test_entry=False)
        self.assertIsNone(await self.guard.canary_problem(no_test))

    async def test_a_list_that_lists_everything_is_suspended_then_used_again(self) -> None:
        """Through the dnsbl check: dead.test scores until the first round suspends it (an error line), then is not asked; after its zone is fixed and SUSPENDED_RETRY passes it is used again (a warning)."""
        services = PolicyServices(reactor, resolver=self.resolver, dns_guard=self.guard)
        settings = type("S", (), {"lists": (GOOD, DEAD), "check_sender_domain": False,
                                   "check_helo": False})()
        check = DnsblCheck(settings, services)
        facts = Facts(client_ip=CLIENT, helo="h.example", sender="a@b.example",
                      sender_domain="b.example", recipient="r@example.com",
                      recipient_domain="example.com")
        with capturedLogs() as events:
            first = await check.check(facts)          # starts the guard; the round runs
            self.assertEqual(first.score, 6.0)
            await self.guard.idle()                   # the first canary round
            second = await check.check(facts)
        self.assertEqual(second.score, 1.0)
        self.assertEqual(second.reasons, ("listed in good.test",))
        errors = [e for e in events if e["log_level"] == LogLevel.error]
        self.assertEqual(len(errors), 1)
        self.assertEqual(errors[0]["dnsbl"], "dead.test")
        self.assertIn("lists 127.0.0.1", errors[0]["why"])
        # The zone is fixed (what an operator or a repaired list does).
        for authority in self.server.resolver.resolvers:
            authority.records.pop(b"1.0.0.127.dead.test", None)
        self.resolver.cache.clear()
        with capturedLogs() as events:
            self.clock.advance(SUSPENDED_RETRY + 5)
            await self.guard.idle()
        self.assertIsNone(self.guard.suspended(DEAD))
        self.assertTrue(any(e["log_level"] == LogLevel.warn and "answers sanely again"
                            in e["log_format"] for e in events))
        third = await check.check(facts)
        self.assertEqual(third.score, 6.0)

    def test_lookups_without_answer_suspend_at_once(self) -> None:
        """Three lookups in a row that time out suspend the list without waiting for a round; one answer in between resets the count."""
        self.guard.interval = 0  # no rounds: only the traffic decides
        self.guard.active([SLOW])
        for error in ("timeout", "timeout", None, "timeout", "timeout"):
            self.guard.note(DnsblResult(SLOW, error=error))
        self.assertIsNone(self.guard.suspended(SLOW))
        with capturedLogs() as events:
            self.guard.note(DnsblResult(SLOW, error="servfail"))
        self.assertIn("3 lookups in a row", self.guard.suspended(SLOW) or "")
        self.assertEqual([e["log_level"] for e in events], [LogLevel.error])
        self.assertEqual(self.guard.active([SLOW, GOOD]), [GOOD])

    def test_test_entry_is_validated(self) -> None:
        """test_entry must be an IPv4 address (not 127.0.0.1) for an IP list and a domain for a domain list."""
        self.assertIn("test_entry", validate_dnsbl_list(DnsblList(zone="a.test", test_entry="x y")) or "")
        self.assertIn("RFC 5782", validate_dnsbl_list(
            DnsblList(zone="a.test", test_entry="127.0.0.1")) or "")
        self.assertIsNone(validate_dnsbl_list(DnsblList(zone="a.test", test_entry="127.0.0.4")))
        self.assertIsNone(validate_dnsbl_list(DnsblList(zone="a.test", kind="domain",
                                                        test_entry="test.example")))
