"""The Postfix policy-delegation server (``mppproxy.policyd``) without sockets.

The protocol is connected to a ``StringTransport``; requests are fed with
``dataReceived`` (whole, byte by byte, pipelined) and answers read from
``transport.value()``.  The engine is the real one (``PolicyRuntime``) with
in-memory stores from ``fakes_policy``, or a scripted fake where a test
needs to hold an answer back.  Time is a ``MemoryReactorClock``.
"""
from __future__ import annotations

from typing import Any, Optional

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from fakes_policy import MemoryDatabase
from mppproxy.config.load import from_mapping, merge
from mppproxy.match import TrustedNetworks
from mppproxy.policy.base import Facts
from mppproxy.results import TransactionRecord
from mppproxy.policy.runtime import PolicyRuntime
from mppproxy.config.policyd import check_action
from mppproxy.policyd.protocol import (PolicyProtocol, PolicyServerFactory, action_for_reply,
                                       facts_from_request)
from mppproxy.smtp.replies import Reply

BASE: dict[str, Any] = {
    "mode": "policy",
    # 127.0.0.1 and 192.0.2.0/24 are not trusted: the checks run for them.
    "trusted_networks": ["10.255.255.0/24"],
    "policies": {
        "default": {
            "spamtrap": {"enabled": True, "patterns": ["^trap@"]},
            "access": {"blacklist_senders": ["spammer@bad.example"],
                       "whitelist_recipients": ["postmaster@example.com"]},
        },
        "other": {"domains": ["example.net"]},
    },
}


POLICY_GROUP = ("452 4.5.3 Recipient belongs to another policy group, please send it in a "
                "separate transaction")


def request(**attrs: str) -> bytes:
    """One Postfix RCPT request (SMTPD_POLICY_README's example attributes)."""
    base = {"request": "smtpd_access_policy", "protocol_state": "RCPT", "protocol_name": "ESMTP",
            "helo_name": "mail.sender.example", "queue_id": "", "sender": "alice@sender.example",
            "recipient": "bob@example.com", "recipient_count": "0",
            "client_address": "192.0.2.10", "client_name": "unknown",
            "reverse_client_name": "unknown", "instance": "7a3.5f2c1d.0.0", "size": "0",
            "encryption_protocol": "", "server_address": "127.0.0.1", "server_port": "25"}
    base.update(attrs)
    return b"".join(f"{k}={v}\n".encode() for k, v in base.items() if v is not None) + b"\n"


def answers(transport: StringTransport) -> list[str]:
    raw = transport.value().decode()
    assert raw == "" or raw.endswith("\n\n"), raw
    out = []
    for block in raw.split("\n\n")[:-1]:
        assert block.startswith("action="), block
        out.append(block[len("action="):])
    return out


class Server:
    """One factory and one connection on a StringTransport."""

    def __init__(self, data: Optional[dict[str, Any]] = None, engine: Any = "real",
                 database: bool = True):
        self.clock = MemoryReactorClock()
        self.config = from_mapping(merge(BASE, data or {}))
        self.database = MemoryDatabase(self.clock) if database else None
        self.runtime = PolicyRuntime(self.config, self.clock, "policy.test", database=self.database)
        self.engine = self.runtime.engine if engine == "real" else engine
        self.factory = PolicyServerFactory(
            self.config.policyd, lambda: self.engine, self.clock,
            trusted=TrustedNetworks(self.config.trusted_networks),
            skip_trusted=self.config.policy.skip_trusted)
        self.proto, self.transport = self.connect()

    def connect(self) -> tuple[PolicyProtocol, StringTransport]:
        proto = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        proto.makeConnection(transport)
        return proto, transport

    def ask(self, *requests: bytes) -> list[str]:
        self.transport.clear()
        self.proto.dataReceived(b"".join(requests))
        return answers(self.transport)


class ScriptedEngine:
    """An engine whose answers the test releases one by one."""

    def __init__(self) -> None:
        self.waiting: list[tuple[Facts, Deferred]] = []
        self.running = 0
        self.most_running = 0
        self.records: list[TransactionRecord] = []

    async def on_recipient(self, facts: Facts, record: TransactionRecord) -> Optional[Reply]:
        if facts.recipient.startswith("sync"):
            # Decided from memory: no waiting at all.
            self.records.append(record)
            return None
        d: Deferred = Deferred()
        self.waiting.append((facts, d))
        self.records.append(record)
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            return await d
        finally:
            self.running -= 1

    def release(self, recipient: str, reply: Optional[Reply] = None) -> None:
        for i, (facts, d) in enumerate(self.waiting):
            if facts.recipient == recipient:
                del self.waiting[i]
                d.callback(reply)
                return
        raise AssertionError(f"no pending request for {recipient}")


# -- the mapping of engine outcomes ---------------------------------------------------

@pytest.mark.parametrize("reply, action", [
    (Reply(550, "5.7.1", "Recipient address rejected: access denied"), "550 5.7.1 access denied"),
    (Reply(554, "5.7.1", "Access denied: sender <a@b> is not accepted here"),
     "554 5.7.1 Access denied: sender <a@b> is not accepted here"),
    (Reply(550, "5.7.23", "SPF fail"), "550 5.7.23 SPF fail"),
    (Reply(451, "4.7.1", "Greylisted: please try again in 300 seconds"),
     "DEFER_IF_PERMIT Greylisted: please try again in 300 seconds"),
    (Reply(451, "4.3.0", "Temporary local problem"), "DEFER_IF_PERMIT Temporary local problem"),
    (Reply(452, "4.5.3", "Please send this recipient in a separate transaction"),
     "452 4.5.3 Please send this recipient in a separate transaction"),
    (Reply(550, "5.7.1", "line one\nline two"), "550 5.7.1 line one line two"),
    (Reply(250, "2.0.0", "ok"), "DUNNO"),
])
def test_engine_reply_becomes_access_action(reply, action):
    """Each engine refusal maps to one access(5) action that keeps its code where Postfix can."""
    assert action_for_reply(reply) == action


def test_request_becomes_facts():
    """Postfix attributes map onto the engine's Facts; "unknown" names and the null sender become ""."""
    attrs = {"client_address": "192.0.2.1", "helo_name": "h.example", "sender": "",
             "recipient": "Bob@Example.COM.", "client_name": "unknown", "instance": "i1",
             "queue_id": "ABC", "encryption_protocol": "TLSv1.3"}
    facts = facts_from_request(attrs)
    assert (facts.client_ip, facts.helo, facts.sender, facts.sender_domain) == \
        ("192.0.2.1", "h.example", "", "")
    assert (facts.recipient, facts.recipient_domain) == ("Bob@Example.COM.", "example.com")
    assert (facts.client_name, facts.session_id, facts.queue_id, facts.tls) == ("", "i1", "ABC", True)


@pytest.mark.parametrize("value, ok", [
    ("DUNNO", True), ("DEFER_IF_PERMIT Service unavailable", True), ("451 4.3.5 try later", True),
    ("REJECT go away", True), ("OK", False), ("PERMIT", False), ("DUNNO\naction=OK", False),
])
def test_configurable_default_actions(value, ok):
    """The default action is one access(5) action on one line, never OK."""
    assert (check_action(value) is None) == ok


class EngineOutcomeTests(SynchronousTestCase):
    """The real engine behind the protocol: every kind of outcome."""

    def test_normal_recipient_dunno(self) -> None:
        """A recipient nothing objects to is answered DUNNO."""
        self.assertEqual(Server().ask(request()), ["DUNNO"])

    def test_spamtrap_rejected_with_code(self) -> None:
        """A spam-trap recipient is refused with 550 5.7.1 and the client is then blacklisted."""
        s = Server()
        self.assertEqual(s.ask(request(recipient="trap@example.com")), ["550 5.7.1 access denied"])
        self.assertEqual(s.ask(request(instance="next")),
                         ["554 5.7.1 Access denied: your address 192.0.2.10 is temporarily blocked "
                          "(policy violation)"])

    def test_blacklisted_sender_rejected(self) -> None:
        """A sender on the access blacklist is refused with 554 5.7.1 naming the sender."""
        self.assertEqual(Server().ask(request(sender="spammer@bad.example")),
                         ["554 5.7.1 Access denied: sender <spammer@bad.example> is not accepted here"])

    def test_greylisting_defers_then_passes(self) -> None:
        """A new triplet gets DEFER_IF_PERMIT; the retry after the delay gets DUNNO."""
        s = Server({"policies": {"default": {"greylisting": {"enabled": True, "delay": 300}}}})
        self.assertEqual(s.ask(request()), ["DEFER_IF_PERMIT Greylisted: please try again in 300 seconds"])
        s.clock.advance(60)
        self.assertEqual(s.ask(request(instance="retry1")),
                         ["DEFER_IF_PERMIT Greylisted: please try again in 240 seconds"])
        s.clock.advance(300)
        self.assertEqual(s.ask(request(instance="retry2")), ["DUNNO"])

    def test_second_policy_group_gets_452(self) -> None:
        """A recipient of another policy in the same message (instance) gets 452 4.5.3."""
        s = Server()
        self.assertEqual(s.ask(request(), request(recipient="carol@example.net")),
                         ["DUNNO", POLICY_GROUP])
        # A later message may start with that policy.
        self.assertEqual(s.ask(request(recipient="carol@example.net", instance="new")), ["DUNNO"])

    def test_whitelisted_recipient_only_that_recipient(self) -> None:
        """A whitelisted recipient passes; the next recipient of the message is still checked."""
        s = Server()
        self.assertEqual(s.ask(request(recipient="postmaster@example.com"),
                               request(recipient="trap@example.com")),
                         ["DUNNO", "550 5.7.1 access denied"])

    def test_header_prepended_once_per_message(self) -> None:
        """A header the engine recorded is sent as one PREPEND, once per message."""
        s = Server()

        async def with_header(facts: Facts, record: TransactionRecord) -> Optional[Reply]:
            if not record.headers:
                record.headers.append(("Authentication-Results", "policy.test;\n spf=pass"))
            return None

        s.engine = type("E", (), {"on_recipient": staticmethod(with_header)})()
        self.assertEqual(s.ask(request(recipient="a@example.com"), request(recipient="b@example.com")),
                         ["PREPEND Authentication-Results: policy.test; spf=pass", "DUNNO"])

    def test_other_states_dunno_without_engine(self) -> None:
        """Requests at CONNECT, MAIL, DATA, END-OF-MESSAGE, VRFY... get DUNNO and never reach the engine."""
        engine = ScriptedEngine()
        s = Server(engine=engine)
        states = ["CONNECT", "EHLO", "HELO", "MAIL", "DATA", "END-OF-MESSAGE", "VRFY", "ETRN"]
        got = s.ask(*[request(protocol_state=st, client_address=None) for st in states])
        self.assertEqual(got, ["DUNNO"] * len(states))
        self.assertEqual(engine.waiting, [])

    def test_trusted_client_skips_checks(self) -> None:
        """A client in trusted_networks is answered DUNNO before any check (policy.skip_trusted)."""
        s = Server()
        self.assertEqual(s.ask(request(client_address="10.255.255.7", recipient="trap@example.com")),
                         ["DUNNO"])

    def test_policy_disabled_answers_dunno(self) -> None:
        """With no engine (policy.enabled = false) every request is answered DUNNO."""
        s = Server()
        s.engine = None
        self.assertEqual(s.ask(request(recipient="trap@example.com")), ["DUNNO"])

    def test_engine_failure_gives_default_action(self) -> None:
        """An engine that raises gets the configured default action and a logged failure."""
        s = Server({"policyd": {"default_action": "DEFER_IF_PERMIT policy service trouble"}})

        async def broken(facts: Facts, record: TransactionRecord) -> Optional[Reply]:
            raise ValueError("boom")

        s.engine = type("E", (), {"on_recipient": staticmethod(broken)})()
        with capturedLogs() as events:
            self.assertEqual(s.ask(request(), request(instance="2")),
                             ["DEFER_IF_PERMIT policy service trouble"] * 2)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 2)
        self.assertTrue(any("policy engine failed" in e.get("log_format", "") for e in events))

    def test_engine_failure_after_waiting_gives_default_action(self) -> None:
        """An engine that raises once its wait is over: the default action,
        the failure logged with its own error, later requests unaffected."""
        s = Server()
        waits: list[Deferred] = []

        async def broken(facts: Facts, record: TransactionRecord) -> Optional[Reply]:
            d: Deferred = Deferred()
            waits.append(d)
            await d
            raise ValueError("late boom")

        s.engine = type("E", (), {"on_recipient": staticmethod(broken)})()
        self.assertEqual(s.ask(request()), [])
        with capturedLogs() as events:
            waits[0].callback(None)
        self.assertEqual(answers(s.transport), ["DUNNO"])
        (failure,) = self.flushLoggedErrors(ValueError)
        self.assertEqual(str(failure.value), "late boom")
        self.assertTrue(any("policy engine failed" in e.get("log_format", "") for e in events))

    def test_check_failure_is_tempfail(self) -> None:
        """A check whose store is missing makes the engine tempfail: DEFER_IF_PERMIT, not DUNNO."""
        s = Server(database=False)
        self.assertEqual(s.ask(request()), ["DEFER_IF_PERMIT Temporary local problem checking your "
                                            "message, please try again later"])
        self.flushLoggedErrors(RuntimeError)

    def test_decision_logged_with_checks(self) -> None:
        """Each RCPT decision is one log event with client, recipient, action and every check."""
        s = Server()
        with capturedLogs() as events:
            s.ask(request(recipient="trap@example.com"))
        (event,) = [e for e in events if e.get("log_format", "").startswith("policy {action}")]
        self.assertEqual((event["client"], event["recipient"], event["action"]),
                         ("192.0.2.10", "trap@example.com", "550 5.7.1 access denied"))
        self.assertIn("spamtrap", [c["check"] for c in event["checks"]])
        # The checks that found nothing, by name (as in the transaction log).
        self.assertIn("access", event["checks_passed"])


    def test_dunno_logged_only_when_asked(self) -> None:
        """A DUNNO decision is logged only with policyd.log_dunno (Postfix logs accepted mail)."""
        for log_dunno, expected in ((False, 0), (True, 1)):
            s = Server({"policyd": {"log_dunno": log_dunno}})
            with capturedLogs() as events:
                self.assertEqual(s.ask(request()), ["DUNNO"])
            self.assertEqual(len([e for e in events if e.get("mpp_event") == "policy_decision"]),
                             expected)


class FramingTests(SynchronousTestCase):
    def test_one_byte_at_a_time(self) -> None:
        """Requests fed one byte at a time get the same answers as whole ones."""
        s = Server()
        data = request() + request(recipient="trap@example.com", instance="2")
        for i in range(len(data)):
            s.proto.dataReceived(data[i:i + 1])
        self.assertEqual(answers(s.transport), ["DUNNO", "550 5.7.1 access denied"])

    def test_odd_chunks(self) -> None:
        """Chunks that split lines and requests anywhere change nothing."""
        s = Server()
        data = b"".join(request(instance=str(i), recipient=f"u{i}@example.com") for i in range(20))
        for i in range(0, len(data), 37):
            s.proto.dataReceived(data[i:i + 37])
        self.assertEqual(answers(s.transport), ["DUNNO"] * 20)

    def test_crlf_tolerated(self) -> None:
        """A CR before the LF (a person testing with nc -C) is ignored."""
        s = Server()
        self.assertEqual(s.ask(request().replace(b"\n", b"\r\n")), ["DUNNO"])

    def test_unknown_attributes_ignored(self) -> None:
        """Attributes we do not use (newer Postfix versions add some) are ignored."""
        self.assertEqual(Server().ask(request(policy_context="submission", compatibility_level="3.6",
                                              mail_version="3.9.0")), ["DUNNO"])

    def test_pipelined_answers_in_order(self) -> None:
        """Pipelined requests are evaluated concurrently and answered in request order."""
        engine = ScriptedEngine()
        s = Server(engine=engine)
        s.proto.dataReceived(b"".join(request(instance=f"i{n}", recipient=f"r{n}@example.com")
                                      for n in range(3)))
        self.assertEqual(engine.most_running, 3)
        engine.release("r2@example.com", Reply(550, "5.7.1", "third"))
        engine.release("r1@example.com", Reply(451, "4.7.1", "second"))
        self.assertEqual(answers(s.transport), [])
        engine.release("r0@example.com")
        self.assertEqual(answers(s.transport), ["DUNNO", "DEFER_IF_PERMIT second", "550 5.7.1 third"])

    def test_recipients_of_one_message_share_a_record_in_turn(self) -> None:
        """Recipients with the same instance share one record and are evaluated one after another."""
        engine = ScriptedEngine()
        s = Server(engine=engine)
        s.proto.dataReceived(request(recipient="a@example.com") + request(recipient="b@example.com")
                             + request(recipient="c@example.com", instance="other"))
        self.assertEqual([f.recipient for f, _ in engine.waiting], ["a@example.com", "c@example.com"])
        engine.release("a@example.com")
        engine.release("b@example.com")
        engine.release("c@example.com")
        self.assertIs(engine.records[0], engine.records[2])
        self.assertIsNot(engine.records[0], engine.records[1])
        self.assertEqual(answers(s.transport), ["DUNNO"] * 3)

    def test_recipients_of_one_message_wait_for_each_other_in_order(self) -> None:
        """Three recipients of one message behind a waiting one, the middle
        one decided from memory: each starts only when the one before it is
        done, and the answers keep the request order."""
        engine = ScriptedEngine()
        s = Server(engine=engine)
        s.proto.dataReceived(request(recipient="a@example.com") + request(recipient="sync@example.com")
                             + request(recipient="c@example.com")
                             + request(recipient="sync2@example.com", instance="other"))
        # The other message's recipient is answered from memory at once,
        # but after the ones before it.
        self.assertEqual([f.recipient for f, _ in engine.waiting], ["a@example.com"])
        self.assertEqual(answers(s.transport), [])
        engine.release("a@example.com", Reply(451, "4.7.1", "first"))
        # sync ran as soon as a was done, then c started.
        self.assertEqual([f.recipient for f, _ in engine.waiting], ["c@example.com"])
        self.assertEqual(answers(s.transport), ["DEFER_IF_PERMIT first", "DUNNO"])
        engine.release("c@example.com")
        self.assertEqual(answers(s.transport), ["DEFER_IF_PERMIT first", "DUNNO", "DUNNO", "DUNNO"])
        self.assertEqual(engine.most_running, 1)
        self.assertIs(engine.records[0], engine.records[2])
        self.assertIs(engine.records[0], engine.records[3])
        # Nothing is left waiting on the message's record.
        txn = s.factory.transaction(s.proto.peer, "7a3.5f2c1d.0.0")
        self.assertIsNone(txn.tail)

    def test_many_connections_share_transactions_by_instance(self) -> None:
        """A message's record survives a reconnect from the same Postfix host."""
        s = Server()
        s.ask(request(recipient="trap@example.com", client_address="192.0.2.99"))
        proto, transport = s.connect()
        proto.dataReceived(request(recipient="carol@example.net", client_address="192.0.2.99"))
        # Same instance: still the default policy's transaction.
        self.assertEqual(answers(transport),
                         [POLICY_GROUP])

    def test_pipelining_bounded(self) -> None:
        """Past policyd.max_pending unanswered requests the connection stops being read."""
        engine = ScriptedEngine()
        s = Server({"policyd": {"max_pending": 2}}, engine=engine)
        s.proto.dataReceived(b"".join(request(instance=f"i{n}", recipient=f"r{n}@example.com")
                                      for n in range(5)))
        self.assertEqual(s.transport.producerState, "paused")
        self.assertEqual(len(engine.waiting), 2)
        engine.release("r0@example.com")
        self.assertEqual(s.transport.producerState, "producing")
        s.clock.advance(0)
        engine.release("r1@example.com")
        s.clock.advance(0)
        for n in range(2, 5):
            engine.release(f"r{n}@example.com")
            s.clock.advance(0)
        self.assertEqual(answers(s.transport), ["DUNNO"] * 5)

    def test_transactions_bounded(self) -> None:
        """At most policyd.max_transactions message records are kept, least recently used dropped."""
        s = Server({"policyd": {"max_transactions": 100}})
        s.ask(*[request(instance=f"i{n}") for n in range(250)])
        self.assertEqual(len(s.factory._transactions), 100)

    def test_idle_connection_closed(self) -> None:
        """A connection idle for policyd.idle_timeout is closed; activity restarts the timer."""
        s = Server({"policyd": {"idle_timeout": 10}})
        s.clock.advance(9)
        s.ask(request())
        s.clock.advance(9)
        self.assertFalse(s.transport.disconnecting)
        s.clock.advance(1.5)
        self.assertTrue(s.transport.disconnecting)

    def test_idle_timer_waits_for_pending_answer(self) -> None:
        """A connection with a request still being decided is not closed as idle."""
        engine = ScriptedEngine()
        s = Server({"policyd": {"idle_timeout": 10}}, engine=engine)
        s.proto.dataReceived(request())
        s.clock.advance(11)
        self.assertFalse(s.transport.disconnecting)
        engine.release("bob@example.com")
        self.assertEqual(answers(s.transport), ["DUNNO"])

    def test_connection_limit(self) -> None:
        """A connection past policyd.max_connections is closed at once and logged."""
        s = Server({"policyd": {"max_connections": 1}})
        with capturedLogs() as events:
            proto, transport = s.connect()
        self.assertTrue(transport.disconnecting)
        self.assertTrue(any(e.get("log_level") == LogLevel.warn for e in events))
        proto.dataReceived(request())
        self.assertEqual(transport.value(), b"")
        # The first connection is still served.
        self.assertEqual(s.ask(request()), ["DUNNO"])


def _over_long() -> bytes:
    return request(helo_name="h" * 5000)


def _too_many() -> bytes:
    return request() [:-1] + b"".join(f"x{i}=1\n".encode() for i in range(120)) + b"\n"


MALFORMED = [
    ("no request attribute", request(request=None)),
    ("is not smtpd_access_policy", request(request="junk_policy")),
    ("no client_address", request(client_address=None)),
    ("not an IP address", request(client_address="mail.example")),
    ("longer than", _over_long()),
    ("more than 100 attributes", _too_many()),
    ("not UTF-8", request(sender="NONUTF8@x").replace(b"NONUTF8", b"\xff\xfe")),
    ("control characters", request(helo_name="a\x00b")),
    ("not name=value", b"GET / HTTP/1.0\nHost: x\n\n"),
    ("given twice", request()[:-1] + b"recipient=evil@example.com\n\n"),
    ("empty request", b"\n"),
    ("not name=value", bytes(range(0, 10)).replace(b"\n", b"") + b"\x80\xfe\xff\n\n"),
]


@pytest.mark.parametrize("problem, data", MALFORMED, ids=[f"{i}-{p}" for i, (p, _) in enumerate(MALFORMED)])
def test_malformed_request_default_action(problem, data):
    """A malformed request gets the default action and a log line naming the problem;
    the connection stays in step for the next request."""
    s = Server({"policyd": {"default_action": "451 4.3.5 policy request not understood"}})
    with capturedLogs() as events:
        got = s.ask(data, request(recipient="trap@example.com", instance="after"))
    assert got == ["451 4.3.5 policy request not understood", "550 5.7.1 access denied"]
    warnings = [e for e in events if e.get("log_format", "").startswith("malformed policy request")]
    assert len(warnings) == 1 and problem in warnings[0]["problem"], [w["problem"] for w in warnings]
    assert not s.transport.disconnecting


def test_malformed_default_is_dunno():
    """Without configuration a malformed request is answered DUNNO."""
    assert Server().ask(request(request=None)) == ["DUNNO"]


def test_over_long_line_split_across_reads():
    """An over-long line arriving in pieces is skipped to its LF; the next request is answered."""
    s = Server()
    s.proto.dataReceived(b"request=smtpd_access_policy\nhelo_name=")
    for _ in range(10):
        s.proto.dataReceived(b"h" * 1000)
    s.proto.dataReceived(b"\n\n" + request())
    assert answers(s.transport) == ["DUNNO", "DUNNO"]
    assert len(s.proto._buffer) == 0


def test_garbage_stream_never_crashes():
    """Random bytes in random chunks never raise; each empty line gets one answer."""
    import random

    rng = random.Random(5)
    s = Server()
    blob = bytes(rng.choice(b"ab=\n\x00\xff\r" + bytes(range(32, 127))) for _ in range(20000))
    for i in range(0, len(blob), 97):
        s.proto.dataReceived(blob[i:i + 97])
    s.proto.dataReceived(b"\n\n" + request(instance="last", recipient="trap@example.com"))
    got = answers(s.transport)
    assert got[-1] == "550 5.7.1 access denied"
    assert all(a in ("DUNNO", "550 5.7.1 access denied") for a in got)


# -- the stop: answered first, then closed --------------------------------------------

class DrainTests(SynchronousTestCase):
    """``PolicyServerFactory.drain``: what a stop (or a restart's old
    process) does to the connections Postfix holds open."""

    def lost(self, server: Server, proto: PolicyProtocol) -> None:
        """What the reactor does after a loseConnection/abortConnection."""
        proto.connectionLost(None)

    def test_idle_connection_closes_at_once(self) -> None:
        """An idle connection is closed at once; the drain fires when it is gone."""
        s = Server(engine=ScriptedEngine())
        drained = s.factory.drain(30)
        self.assertTrue(s.transport.disconnecting)
        self.assertNoResult(drained)
        self.lost(s, s.proto)
        self.successResultOf(drained)

    def test_request_in_flight_is_answered_before_the_close(self) -> None:
        """A request still being decided when the stop comes is answered,
        then the connection closes; not before."""
        engine = ScriptedEngine()
        s = Server(engine=engine)
        s.proto.dataReceived(request(recipient="slow@example.com"))
        drained = s.factory.drain(30)
        self.assertFalse(s.transport.disconnecting)
        s.clock.advance(10)
        self.assertFalse(s.transport.disconnecting)
        engine.release("slow@example.com",
                       Reply(451, "4.7.1", "Greylisted: please try again in 300 seconds"))
        self.assertEqual(answers(s.transport),
                         ["DEFER_IF_PERMIT Greylisted: please try again in 300 seconds"])
        self.assertTrue(s.transport.disconnecting)
        self.assertFalse(s.transport.disconnected)  # closed, not cut
        self.lost(s, s.proto)
        self.successResultOf(drained)

    def test_what_is_still_deciding_after_the_grace_is_cut(self) -> None:
        """A decision that outlasts the grace is cut (abortConnection), with
        a warning naming the key; the idle connection beside it had closed at once."""
        engine = ScriptedEngine()
        s = Server(engine=engine)
        idle, idle_transport = s.connect()
        s.proto.dataReceived(request(recipient="stuck@example.com"))
        with capturedLogs() as events:
            drained = s.factory.drain(5)
            self.assertTrue(idle_transport.disconnecting)
            self.lost(s, idle)
            s.clock.advance(4.9)
            self.assertFalse(s.transport.disconnecting)
            s.clock.advance(0.2)
        self.assertTrue(s.transport.disconnected)  # aborted
        self.assertTrue(any("timeouts.shutdown_grace" in formatEvent(e) for e in events))
        self.lost(s, s.proto)
        self.successResultOf(drained)
        self.assertEqual(s.clock.getDelayedCalls(), [])

    def test_drain_without_connections_fires_at_once(self) -> None:
        """With no connection left the drain has nothing to wait for."""
        s = Server(engine=ScriptedEngine())
        self.lost(s, s.proto)
        self.successResultOf(s.factory.drain(30))
