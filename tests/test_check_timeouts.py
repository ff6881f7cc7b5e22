"""What a pre-DATA check that never answers does (issue #15, "a check that
times out lets mail through").

Each check's section has ``on_timeout`` ("pass" or "tempfail"): the state
database checks (greylisting, blacklist, spam traps, thresholds) tempfail
by default, DNS lists and SPF pass (docs/design.md promise 4).  The stores
and the resolver here return Deferreds that never fire; time is a
``MemoryReactorClock``, so ``advance`` proves the deadline.  The same
outcome is checked through the engine, the Postfix policy server and the
SMTP edge.
"""
from __future__ import annotations

from typing import Any, Optional

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from fakes_policy import MemoryDatabase
from mppproxy.config.errors import ConfigError
from mppproxy.config.load import from_mapping, merge
from mppproxy.edge.context import make_context
from mppproxy.edge.handler import EdgeSession
from mppproxy.policy.base import Facts
from mppproxy.results import TransactionRecord
from mppproxy.policy.runtime import PolicyRuntime
from mppproxy.policyd.protocol import PolicyServerFactory
from mppproxy.smtp.server import SMTPServerFactory

CHECK_TIMEOUT = 3.0


class HangingGreylist:
    """A triplet store whose database never answers."""

    def __init__(self) -> None:
        self.pending: list[Deferred] = []

    async def check(self, client_net: str, sender: str, recipient: str, settings: Any) -> Optional[float]:
        d: Deferred = Deferred()
        self.pending.append(d)
        return await d


class HangingBlacklist:
    """An auto-blacklist whose database never answers (lookups counted)."""

    def __init__(self) -> None:
        self.lookups = 0

    async def lookup(self, client_ip: str) -> Any:
        self.lookups += 1
        return await Deferred()

    async def add(self, network: str, seconds: float, reason: str) -> None:
        await Deferred()


class HangingResolver:
    """A resolver whose queries never come back (the DNS lists ask ``lookup``)."""

    async def lookup(self, qname: Any, rdtype: Any) -> Any:
        return await Deferred()


GREYLIST = {"greylisting": {"enabled": True}}
DNSBL = {"dnsbl": {"enabled": True, "lists": [{"zone": "bl.test"}]}}


def runtime_for(policy: dict, clock: MemoryReactorClock, mode: str = "edge",
                greylist: Any = None, blacklist: Any = None, resolver: Any = None) -> PolicyRuntime:
    data: dict[str, Any] = {"mode": mode, "policy": {"check_timeout": CHECK_TIMEOUT},
                            "relay_domains": ["example.com"], "policies": {"default": policy}}
    if mode == "edge":
        data["backend"] = {"host": "127.0.0.1"}
    config = from_mapping(data)
    database = MemoryDatabase(clock)
    if greylist is not None:
        database.greylist = greylist
    if blacklist is not None:
        database.blacklist = blacklist
    runtime = PolicyRuntime(config, clock, "mx.test", database=database)
    if resolver is not None:
        runtime.services.resolver = resolver
    return runtime


def facts(rcpt: str = "bob@example.com") -> Facts:
    return Facts(client_ip="192.0.2.10", helo="client.example", sender="alice@sender.example",
                 sender_domain="sender.example", recipient=rcpt, recipient_domain="example.com",
                 session_id="S1", queue_id="Q1")


def decide(runtime: PolicyRuntime, clock: MemoryReactorClock, record: TransactionRecord,
           rcpt: str = "bob@example.com") -> list:
    """The engine's answer for one recipient, after the deadline passed."""
    results: list = []
    Deferred.fromCoroutine(runtime.engine.on_recipient(facts(rcpt), record)).addBoth(results.append)
    assert results == [], "the check was expected to wait"
    clock.advance(CHECK_TIMEOUT - 0.1)
    assert results == [], "the deadline fired early"
    clock.advance(0.2)
    return results


def timeout_events(events: list) -> list:
    return [e for e in events if e.get("mpp_event") == "check_timeout"]


class EngineTimeoutTests(SynchronousTestCase):
    """The engine applies each check's on_timeout."""

    def test_greylisting_timeout_tempfails(self) -> None:
        """A greylisting store that never answers gives 451 4.3.0 after
        check_timeout, and one warning names the check, seconds, client
        and queue id."""
        clock = MemoryReactorClock()
        runtime = runtime_for(GREYLIST, clock, greylist=HangingGreylist())
        record = TransactionRecord()
        with capturedLogs() as events:
            [reply] = decide(runtime, clock, record)
        self.assertEqual((reply.code, reply.enhanced), (451, "4.3.0"))
        self.assertTrue(reply.text.endswith("(ref Q1)"), reply.text)
        [event] = timeout_events(events)
        self.assertEqual((event["check"], event["seconds"], event["client"], event["queue_id"],
                          event["outcome"]), ("greylisting", CHECK_TIMEOUT, "192.0.2.10", "Q1",
                                              "tempfail"))
        self.assertEqual((record.recorded[-1].check, record.recorded[-1].skipped),
                         ("greylisting", "timeout"))
        self.assertEqual(record.refused_by, "greylisting")

    def test_dnsbl_timeout_passes(self) -> None:
        """A DNS list that never answers scores nothing and the recipient
        goes on (None), logged with the check's name."""
        clock = MemoryReactorClock()
        runtime = runtime_for(DNSBL, clock, resolver=HangingResolver())
        record = TransactionRecord()
        with capturedLogs() as events:
            self.assertEqual(decide(runtime, clock, record), [None])
        [event] = timeout_events(events)
        self.assertEqual((event["check"], event["outcome"]), ("dnsbl", "pass"))
        self.assertEqual(record.score, 0.0)
        self.assertEqual([(r.check, r.skipped) for r in record.recorded if r.skipped],
                         [("dnsbl", "timeout")])

    def test_blacklist_timeout_tempfails_and_later_recipients_do_not_wait(self) -> None:
        """The auto-blacklist (once per transaction) tempfails on a timeout,
        and the next recipient gets the same 451 at once, without a second
        lookup or another check_timeout of waiting."""
        clock = MemoryReactorClock()
        blacklist = HangingBlacklist()
        runtime = runtime_for({}, clock, blacklist=blacklist)
        record = TransactionRecord()
        [reply] = decide(runtime, clock, record)
        self.assertEqual((reply.code, reply.enhanced), (451, "4.3.0"))
        again: list = []
        Deferred.fromCoroutine(runtime.engine.on_recipient(facts("carol@example.com"), record)
                               ).addBoth(again.append)
        self.assertEqual([(r.code, r.enhanced) for r in again], [(451, "4.3.0")])
        self.assertEqual(blacklist.lookups, 1)

    def test_on_timeout_pass_lets_greylisting_through(self) -> None:
        """greylisting.on_timeout = "pass" turns the same timeout into an accepted recipient."""
        clock = MemoryReactorClock()
        runtime = runtime_for({"greylisting": {"enabled": True, "on_timeout": "pass"}}, clock,
                              greylist=HangingGreylist())
        self.assertEqual(decide(runtime, clock, TransactionRecord()), [None])

    def test_on_timeout_tempfail_for_dnsbl(self) -> None:
        """dnsbl.on_timeout = "tempfail" makes a silent DNS list a 451 4.3.0."""
        clock = MemoryReactorClock()
        runtime = runtime_for({"dnsbl": dict(DNSBL["dnsbl"], on_timeout="tempfail")}, clock,
                              resolver=HangingResolver())
        [reply] = decide(runtime, clock, TransactionRecord())
        self.assertEqual((reply.code, reply.enhanced), (451, "4.3.0"))


def test_defaults_per_check():
    """State-database checks tempfail on a timeout by default, DNS lists and SPF pass."""
    policy = from_mapping({}).policies["default"]
    assert {name: getattr(policy, name).on_timeout for name in
            ("blacklist", "spamtrap", "thresholds", "greylisting", "dnsbl", "spf")} == {
        "blacklist": "tempfail", "spamtrap": "tempfail", "thresholds": "tempfail",
        "greylisting": "tempfail", "dnsbl": "pass", "spf": "pass"}


@pytest.mark.parametrize("section", ["greylisting", "blacklist", "dnsbl", "spf", "spamtrap",
                                     "thresholds"])
def test_bad_on_timeout_names_file_and_key(section):
    """An on_timeout other than pass/tempfail is a config error naming the file and key."""
    with pytest.raises(ConfigError) as info:
        from_mapping({"policies": {"default": {section: {"on_timeout": "continue"}}}},
                     source="/etc/mpp.toml")
    assert info.value.errors == [
        f"/etc/mpp.toml: policies.default.{section}.on_timeout: must be one of 'pass', "
        "'tempfail', not 'continue'"]


# -- the same outcome through the Postfix policy server and the SMTP edge ---------

POLICYD_BASE: dict[str, Any] = {"mode": "policy", "trusted_networks": ["10.255.255.0/24"],
                                "policy": {"check_timeout": CHECK_TIMEOUT}}


def policyd_request(**attrs: str) -> bytes:
    base = {"request": "smtpd_access_policy", "protocol_state": "RCPT",
            "helo_name": "mail.sender.example", "queue_id": "4FkQ2X0abc",
            "sender": "alice@sender.example", "recipient": "bob@example.com",
            "client_address": "192.0.2.10", "instance": "7a3.1"}
    base.update(attrs)
    return b"".join(f"{k}={v}\n".encode() for k, v in base.items()) + b"\n"


class PolicydTimeoutTests(SynchronousTestCase):
    """The policy server answers what the engine decided on a timeout."""

    def ask_after_timeout(self, policy: dict, **hanging: Any) -> bytes:
        clock = MemoryReactorClock()
        config = from_mapping(merge(POLICYD_BASE, {"policies": {"default": policy}}))
        database = MemoryDatabase(clock)
        for name, store in hanging.items():
            setattr(database, name, store)
        runtime = PolicyRuntime(config, clock, "policy.test", database=database)
        if "resolver" in hanging:
            runtime.services.resolver = hanging["resolver"]
        factory = PolicyServerFactory(config.policyd, lambda: runtime.engine, clock)
        proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        proto.makeConnection(transport)
        proto.dataReceived(policyd_request())
        self.assertEqual(transport.value(), b"")
        clock.advance(CHECK_TIMEOUT + 0.1)
        return transport.value()

    def test_greylisting_timeout_defers(self) -> None:
        """A hanging greylist database is answered DEFER_IF_PERMIT (a 4xx for
        Postfix), never DUNNO, with the Postfix queue id as the reference."""
        answer = self.ask_after_timeout(GREYLIST, greylist=HangingGreylist())
        self.assertEqual(answer, b"action=DEFER_IF_PERMIT Temporary local problem checking your "
                                 b"message, please try again later (ref 4FkQ2X0abc)\n\n")

    def test_dnsbl_timeout_dunno(self) -> None:
        """A DNS list that never answers leaves the decision to Postfix: DUNNO."""
        answer = self.ask_after_timeout(DNSBL, resolver=HangingResolver())
        self.assertEqual(answer, b"action=DUNNO\n\n")


class EdgeTimeoutTests(SynchronousTestCase):
    """Over SMTP (the session machine on a StringTransport): the client's replies."""

    def converse(self, policy: dict, **hanging: Any) -> tuple[bytes, list]:
        clock = MemoryReactorClock()
        runtime = runtime_for(policy, clock, mode="all-in-one", **hanging)
        ctx = make_context(runtime.config, clock, None, policy=runtime)
        factory = SMTPServerFactory(ctx.config, lambda: EdgeSession(ctx), clock,
                                    is_trusted=ctx.trusted, hostname="mx.test")
        proto = factory.buildProtocol(IPv4Address("TCP", "198.51.100.7", 40000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "198.51.100.7", 40000))
        proto.makeConnection(transport)
        with capturedLogs() as events:
            proto.dataReceived(b"EHLO client.example\r\nMAIL FROM:<alice@sender.example>\r\n"
                               b"RCPT TO:<bob@example.com>\r\n")
            clock.advance(CHECK_TIMEOUT + 0.1)
            proto.dataReceived(b"QUIT\r\n")
        return transport.value(), list(events)

    def test_greylisting_timeout_is_451_over_smtp(self) -> None:
        """RCPT gets 451 4.3.0 ending in (ref <queue id>) when the greylist
        database hangs; the transaction log line says refused by greylisting
        under that same queue id."""
        out, events = self.converse(GREYLIST, greylist=HangingGreylist())
        rcpt_reply = out.split(b"\r\n")[-3]
        self.assertTrue(rcpt_reply.startswith(b"451 4.3.0 Temporary local problem"), out)
        [tx] = [e for e in events if e.get("mpp_event") == "transaction"]
        self.assertTrue(rcpt_reply.endswith(f"(ref {tx['queue_id']})".encode()), rcpt_reply)
        self.assertEqual((tx["action"], tx["decided_by"], tx["refused_recipients"], tx["sender"]),
                         ("refused", "greylisting", ["bob@example.com"], "alice@sender.example"))
        [timeout] = timeout_events(events)
        self.assertEqual((timeout["check"], timeout["queue_id"]), ("greylisting", tx["queue_id"]))

    def test_dnsbl_timeout_is_250_over_smtp(self) -> None:
        """RCPT gets 250 when only a DNS list timed out."""
        out, events = self.converse(DNSBL, resolver=HangingResolver())
        self.assertTrue(out.split(b"\r\n")[-3].startswith(b"250 "), out)
        self.assertEqual([e["check"] for e in timeout_events(events)], ["dnsbl"])
