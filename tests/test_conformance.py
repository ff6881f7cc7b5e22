"""SMTP conformance items of issue 15: which replies count toward
limits.max_errors, the hop count that stops mail loops, and the trust
headers (X-Spam-*, our own Authentication-Results) removed at the edge.

The error count is shown on the state machine with a ``StringTransport``
(test_server's helpers), also with the real policy engine deciding the
policy-group split; the header rules on ``message.prepare`` (table tests),
through the edge handler with local Maildir delivery, and through the in-process
proxy in front of the fake backend on loopback.  The same with a real
twistd proxy and Postfix: tests/realmta/test_many_recipients.py.
"""
from __future__ import annotations

import os
from typing import Any, Optional

from twisted.internet.defer import Deferred
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from mppproxy.config.errors import ConfigError
from mppproxy.config.load import from_mapping
from mppproxy.config.schema import LimitsConfig, SmtpConfig
from mppproxy.message import HeaderRules, TooManyHops, header_rules, prepare
from mppproxy.results import TransactionRecord
from mppproxy.smtp import replies
from mppproxy.smtp.address import Address
from mppproxy.smtp.replies import Reply
from mppproxy.smtp.server import counts_as_error
from mppproxy.smtp.session import Session, Transaction

from fakes_backend import FakeBackend
from test_actions_loopback import SPAM, _header, _policy
from test_edge_handler import HOSTNAME, make_config, make_gateway, make_session, make_txn, temp_dir
from test_policy_engine import facts, make_engine
from test_policy_loopback import PolicyCase
from test_server import RecordingHandler, ServerTestCase, codes, tuned

# --- which replies count toward limits.max_errors -------------------------------------


class CountsAsErrorTests(SynchronousTestCase):

    def test_table(self) -> None:
        """Permanent (5xx) replies count as client errors; transient (4xx) ones, 421 included, never do."""
        counted = [replies.UNKNOWN_COMMAND, replies.SYNTAX_ERROR, replies.NOT_IMPLEMENTED,
                   replies.BAD_SEQUENCE, Reply(504, "5.5.4", "Command parameter not implemented"),
                   replies.UNKNOWN_PARAMETER, replies.RELAY_DENIED,
                   Reply(550, "5.1.1", "User unknown"), replies.MESSAGE_TOO_BIG,
                   replies.TOO_MANY_HOPS]
        not_counted = [replies.TOO_MANY_RECIPIENTS, Reply(452, "4.5.3", "Recipient of another policy "
                                                                     "group: send it in a separate transaction"),
                       Reply(450, "4.2.1", "Mailbox busy"), Reply(450, "4.7.1", "Greylisted"),
                       replies.BACKEND_UNAVAILABLE, replies.BACKEND_LOST, replies.STORAGE_ERROR,
                       replies.TLS_NOT_AVAILABLE, replies.SHUTTING_DOWN, replies.TOO_MANY_ERRORS]
        self.assertEqual([r for r in counted if not counts_as_error(r)], [])
        self.assertEqual([r for r in not_counted if counts_as_error(r)], [])


def _rcpts(n: int, domain: str = "example.com") -> bytes:
    return b"".join(b"RCPT TO:<r%d@%s>\r\n" % (i, domain.encode()) for i in range(n))


class RecipientLimitTests(ServerTestCase):

    def test_1100_recipients_then_data(self) -> None:
        """Of 1,100 pipelined RCPTs the first max_recipients get 250, the rest 452 4.5.3 without closing the session, and DATA then sends the message for the accepted ones (RFC 5321 4.5.3.1.10)."""
        proto, transport, handler = self.connect()
        limit = LimitsConfig().max_recipients
        out = self.talk(proto, transport, b"EHLO c.example\r\nMAIL FROM:<a@c.example>\r\n" + _rcpts(1100))
        got = codes(out)
        self.assertEqual(got, [250, 250] + [250] * limit + [452] * (1100 - limit))
        self.assertEqual(out.count(replies.TOO_MANY_RECIPIENTS.to_bytes()), 1100 - limit)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(proto.session.errors, 0)
        out = self.talk(proto, transport, b"DATA\r\n")
        self.assertEqual(codes(out), [354])
        out = self.talk(proto, transport, b"Subject: many\r\n\r\nbody\r\n.\r\n")
        self.assertEqual(codes(out), [250])
        self.assertEqual(len(handler.messages), 1)
        self.assertEqual(len(handler.rcpts), limit)

    def test_backend_4xx_in_lockstep_does_not_count(self) -> None:
        """A backend's 4xx for thirty recipients, relayed in lockstep, does not close the session: the accepted recipient's message goes through."""
        handler = RecordingHandler()
        for i in range(1, 31):
            handler.replies_for[f"r{i}@example.com"] = Reply(450, "4.2.1", "Mailbox busy, try later")
        proto, transport, handler = self.connect(handler=handler)
        out = self.talk(proto, transport, b"EHLO c.example\r\nMAIL FROM:<a@c.example>\r\n" + _rcpts(31)
                        + b"DATA\r\n")
        self.assertEqual(codes(out), [250, 250, 250] + [450] * 30 + [354])
        out = self.talk(proto, transport, b"Subject: s\r\n\r\nb\r\n.\r\n")
        self.assertEqual(codes(out), [250])
        self.assertFalse(transport.disconnecting)

    def test_transient_end_of_data_does_not_count(self) -> None:
        """Twenty-five messages tempfailed at the end of DATA (a backend's 451) leave the session open for the next one."""
        handler = RecordingHandler()
        handler.replies_for["data_end"] = replies.BACKEND_LOST
        proto, transport, handler = self.connect(handler=handler)
        one = b"MAIL FROM:<a@c.example>\r\nRCPT TO:<r@example.com>\r\nDATA\r\nS: s\r\n\r\nb\r\n.\r\n"
        out = self.talk(proto, transport, b"EHLO c.example\r\n" + one * 25)
        self.assertEqual(codes(out), [250] + [250, 250, 354, 451] * 25)
        self.assertFalse(transport.disconnecting)

    def test_permanent_refusals_still_count(self) -> None:
        """Unknown-user refusals (5xx) still count: at max_errors the session gets 421 4.7.0 and closes."""
        handler = RecordingHandler()
        for i in range(3):
            handler.replies_for[f"r{i}@example.com"] = Reply(550, "5.1.1", "User unknown")
        proto, transport, handler = self.connect(config=tuned(limits={"max_errors": 3}), handler=handler)
        out = self.talk(proto, transport, b"EHLO c.example\r\nMAIL FROM:<a@c.example>\r\n" + _rcpts(4))
        self.assertEqual(codes(out), [250, 250, 550, 550, 550, 421])
        self.assertTrue(transport.disconnecting)

    def test_refused_recipients_are_bounded(self) -> None:
        """After max_recipients transient refusals in one transaction, further RCPTs get 452 4.5.3 without the handler being asked, and the session stays open."""
        handler = RecordingHandler()
        for i in range(40):
            handler.replies_for[f"r{i}@example.com"] = Reply(450, "4.7.1", "Greylisted, try later")
        proto, transport, handler = self.connect(config=tuned(limits={"max_recipients": 10}),
                                                 handler=handler)
        out = self.talk(proto, transport, b"EHLO c.example\r\nMAIL FROM:<a@c.example>\r\n" + _rcpts(40))
        self.assertEqual(codes(out), [250, 250] + [450] * 10 + [452] * 30)
        self.assertEqual(len(handler.rcpts), 10)
        self.assertEqual(len(proto.txn.rcpt_log), 10)
        self.assertFalse(transport.disconnecting)
        # A new transaction asks the handler again.
        out = self.talk(proto, transport, b"RSET\r\nMAIL FROM:<a@c.example>\r\nRCPT TO:<new@example.com>\r\n")
        self.assertEqual(codes(out), [250, 250, 250])


class EngineHandler(RecordingHandler):
    """RecordingHandler whose RCPT decision is the real policy engine's, as
    the edge asks it (Facts per recipient, one record per transaction)."""

    def __init__(self, engine: Any):
        super().__init__()
        self.engine = engine

    async def on_rcpt(self, session: Session, txn: Transaction, rcpt: Address,
                      params: dict[str, Optional[str]]) -> Reply:
        self.rcpts.append(rcpt.text)
        record = txn.record
        if record is None:
            record = txn.record = TransactionRecord()
        refusal = await self.engine.on_recipient(facts(rcpt.text, ip=session.peer_host), record)
        return refusal or replies.RECIPIENT_OK


class PolicySplitTests(ServerTestCase):

    def test_mixed_policy_groups_do_not_close_the_session(self) -> None:
        """Sixty recipients alternating between two policy groups: the other group's thirty get the engine's 452 4.5.3, the session stays open and DATA delivers to the first group's thirty."""
        engine, _, _ = make_engine({"policies": {"school": {"domains": ["school.example"]}}})
        handler = EngineHandler(engine)
        proto, transport, handler = self.connect(handler=handler)
        rcpts = b"".join(b"RCPT TO:<r%d@%s>\r\n" % (i, b"school.example" if i % 2 == 0 else b"other.example")
                         for i in range(60))
        out = self.talk(proto, transport, b"EHLO c.example\r\nMAIL FROM:<a@c.example>\r\n" + rcpts)
        self.assertEqual(codes(out), [250, 250] + [250, 452] * 30)
        self.assertEqual(out.count(b"452 4.5.3 "), 30)
        self.assertFalse(transport.disconnecting)
        out = self.talk(proto, transport, b"DATA\r\nS: s\r\n\r\nb\r\n.\r\n")
        self.assertEqual(codes(out), [354, 250])
        self.assertEqual(len(handler.messages), 1)


# --- mail loops: limits.max_hop_count ------------------------------------------------

def _looped(hops: int, body: bytes = b"body\r\n") -> bytes:
    received = b"".join(b"Received: from hop%d.example by hop%d.example;\r\n\tMon, 1 Jan 2024 00:00:00 +0000\r\n"
                        % (i, i + 1) for i in range(hops))
    return received + b"From: a@c.example\r\nSubject: loop\r\n\r\n" + body


def _maildir_files(data_dir: str) -> list[str]:
    found = []
    for root, _, files in os.walk(os.path.join(data_dir, "maildir")):
        found += [os.path.join(root, f) for f in files]
    return found


class HopCountTests(SynchronousTestCase):

    def rules(self, max_hops: int = 50) -> HeaderRules:
        return header_rules(max_hops, (), ())

    def test_prepare_counts_received_fields(self) -> None:
        """prepare() passes max_hop_count Received: fields and raises TooManyHops, with the count, for one more."""
        prepare(make_session(), make_txn(_looped(50)), HOSTNAME, rules=self.rules())
        with self.assertRaises(TooManyHops) as raised:
            prepare(make_session(), make_txn(_looped(51)), HOSTNAME, rules=self.rules())
        self.assertEqual((raised.exception.hops, raised.exception.limit), (51, 50))
        self.assertEqual(raised.exception.reply, replies.TOO_MANY_HOPS.with_text(
            "Too many hops (51 Received: header fields, limit 50): mail loop suspected"))

    def test_count_variants(self) -> None:
        """Received: fields count in any letter case, folded, with WSP before the colon, and past the first spool chunk; other fields and the body do not."""
        filler = b"".join(b"X-Filler-%05d: %s\r\n" % (i, b"f" * 40) for i in range(3000))
        cases = [
            b"received: a\r\nRECEIVED: b\r\nSubject: s\r\n\r\nbody\r\n",
            b"Received: a\r\n\tfolded\r\n continued\r\nReceived : b\r\nX-Received: no\r\n"
            b"Subject: Received: no\r\n\r\nbody\r\n",
            b"Received: a\r\nReceived: b\r\n\r\nReceived: in the body\r\nReceived: body\r\n",
            filler + b"Received: late\r\nReceived: late\r\n\r\nbody\r\n",
        ]
        for message in cases:
            # Each holds two: a limit of 2 passes it, a limit of 1 refuses it.
            prepare(make_session(), make_txn(message, memory_limit=1024), None, rules=self.rules(2))
            with self.assertRaises(TooManyHops, msg=message[:60]):
                prepare(make_session(), make_txn(message, memory_limit=1024), None, rules=self.rules(1))

    def test_sixty_hops_refused_and_nothing_delivered(self) -> None:
        """Local delivery mode: a message with 60 Received: fields gets 554 5.4.6, no Maildir file is written, and the log line says it was a mail loop."""
        data_dir = temp_dir(self)
        gateway, _ = make_gateway(make_config(data_dir=data_dir))
        with capturedLogs() as events:
            reply = self.successResultOf(Deferred.fromCoroutine(
                gateway.on_data_end(make_session(), make_txn(_looped(60)))))
        self.assertEqual((reply.code, reply.enhanced), (554, "5.4.6"))
        self.assertEqual(_maildir_files(data_dir), [])
        [event] = [e for e in events if e.get("mpp_event") == "transaction"]
        self.assertEqual(event["action"], "reject")
        self.assertIn("mail loop: 60 Received: header fields", event["reason"])

    def test_loop_refusal_carries_a_reference_that_finds_its_text_line(self) -> None:
        """The 554 5.4.6 ends with (ref <queue id>), and the text log line of that id says refused, with sender, recipients and the hop count as what decided."""
        gateway, _ = make_gateway(make_config(data_dir=temp_dir(self)))
        txn = make_txn(_looped(60))
        with capturedLogs() as events:
            reply = self.successResultOf(Deferred.fromCoroutine(
                gateway.on_data_end(make_session(), txn)))
        self.assertTrue(reply.text.endswith(f"(ref {txn.id})"), reply.text)
        [event] = [e for e in events if e.get("mpp_event") == "transaction"]
        line = formatEvent(event)
        self.assertIn(f"transaction {txn.id} ", line)
        self.assertIn(f"refused <{txn.sender.text}> to "
                      + ", ".join(f"<{r.text}>" for r in txn.recipients) + " by hop count", line)

    def test_limit_is_configurable(self) -> None:
        """With limits.max_hop_count = 70, the same 60-hop message is delivered."""
        data_dir = temp_dir(self)
        config = make_config(data_dir=data_dir, limits=LimitsConfig(max_hop_count=70))
        gateway, _ = make_gateway(config)
        reply = self.successResultOf(Deferred.fromCoroutine(
            gateway.on_data_end(make_session(), make_txn(_looped(60)))))
        self.assertEqual(reply.code, 250)
        self.assertEqual(len(_maildir_files(data_dir)), 1)

    def test_bad_limit_is_a_config_error(self) -> None:
        """limits.max_hop_count below 1 is refused naming the file and key."""
        with self.assertRaises(ConfigError) as raised:
            from_mapping({"limits": {"max_hop_count": 0}}, "proxy.toml")
        self.assertEqual(raised.exception.errors, ["proxy.toml: limits.max_hop_count: must be at least 1, not 0"])


# --- trust headers from outside: X-Spam-*, our own Authentication-Results ----------------

OURS = HOSTNAME  # the edge's name: the authserv-id of the Authentication-Results it writes
EDGE_RULES = header_rules(50, SmtpConfig().strip_headers, (OURS,))

# (field as the client sent it, removed at the edge?)
STRIP_CASES: list[tuple[bytes, bool]] = [
    (b"X-Spam-Flag: YES\r\n", True),
    (b"x-spam-status: Yes, score=20.0 required=5.0\r\n", True),
    (b"X-SPAM-Level: ****\r\n", True),
    (b"X-Spam-Report: line one\r\n\tline two\r\n  line three\r\n", True),
    (b"X-Spamd-Result: default: False [1.0 / 15.0]\r\n", False),
    (b"X-Spam: Yes\r\n", False),
    (b"X-MPP-Scan: score=0; action=relay\r\n", True),
    (b"Authentication-Results: " + OURS.encode() + b"; spf=pass smtp.mailfrom=a@c.example\r\n", True),
    (b"Authentication-Results: MX.Example.TEST.; dkim=pass header.d=c.example\r\n", True),
    (b"Authentication-Results: (forged) " + OURS.encode() + b" (a; comment) 1; spf=pass\r\n", True),
    (b"Authentication-Results: ((nested) comment) " + OURS.encode() + b"; none\r\n", True),
    (b"Authentication-Results:\r\n\t" + OURS.encode() + b";\r\n\tspf=pass smtp.mailfrom=a@c.example\r\n", True),
    (b"authentication-results : " + OURS.encode() + b"; none\r\n", True),
    # authres cannot parse these; read by the first token they are ours.
    (b'Authentication-Results: "' + OURS.encode() + b'"; spf=pass\r\n', True),
    (b"Authentication-Results: " + OURS.encode() + b"\r\n", True),
    (b"Authentication-Results: " + OURS.encode() + b"; ;;= garbage (\r\n", True),
    (b"Authentication-Results: (" + b"(" * 2000 + b")" * 2000 + b") " + OURS.encode() + b"; none\r\n", True),
    # Other authserv-ids, and ARC's own field, are somebody else's.
    (b"Authentication-Results: mx.other.example; spf=pass smtp.mailfrom=a@c.example\r\n", False),
    (b"Authentication-Results: " + OURS.encode() + b".evil.example; spf=pass\r\n", False),
    (b"Authentication-Results: (" + OURS.encode() + b") mx.other.example; none\r\n", False),
    (b"ARC-Authentication-Results: i=1; " + OURS.encode() + b"; spf=pass\r\n", False),
    (b"Subject: X-Spam-Flag: YES\r\n", False),
]


def _cleaned(message: bytes, rules: HeaderRules = EDGE_RULES, **kw: Any) -> tuple[bytes, int]:
    msg, removed = prepare(make_session(), make_txn(message), None, rules=rules, **kw)
    return b"".join(msg.chunks()), removed


class TrustHeaderTests(SynchronousTestCase):

    def test_table(self) -> None:
        """Each field of the table is removed or kept as listed, with its folded lines; the fields around it and the body are untouched."""
        for field, removed in STRIP_CASES:
            message = b"From: a@c.example\r\n" + field + b"Subject: s\r\n\r\nX-Spam-Flag: YES in the body\r\n"
            data, count = _cleaned(message)
            expected = message.replace(field, b"") if removed else message
            self.assertEqual((data, count), (expected, int(removed)), field[:80])

    def test_table_in_one_message(self) -> None:
        """All the table's fields in one message, spooled to disk in small chunks: exactly the listed ones go, and the count is theirs."""
        header = b"".join(field for field, _ in STRIP_CASES)
        kept = b"".join(field for field, removed in STRIP_CASES if not removed)
        msg, count = prepare(make_session(), make_txn(header + b"\r\nbody\r\n", memory_limit=256), None,
                             rules=EDGE_RULES)
        self.assertEqual(b"".join(msg.chunks()), kept + b"\r\nbody\r\n")
        self.assertEqual(count, sum(removed for _, removed in STRIP_CASES))

    def test_our_headers_added_after_stripping_stay(self) -> None:
        """Result fields we add (X-Spam-*, our Authentication-Results) stay while the client's forgeries of them go."""
        forged = (b"X-Spam-Flag: NO\r\nAuthentication-Results: " + OURS.encode() + b"; spf=pass\r\n"
                  b"Subject: s\r\n\r\nbody\r\n")
        ours = [("Authentication-Results", f"{OURS}; spf=fail smtp.mailfrom=a@c.example"),
                ("X-Spam-Flag", "YES")]
        data, count = _cleaned(forged, extra_headers=ours)
        self.assertEqual(count, 2)
        self.assertEqual(data, b"Authentication-Results: " + OURS.encode() + b"; spf=fail smtp.mailfrom=a@c.example\r\n"
                               b"X-Spam-Flag: YES\r\nSubject: s\r\n\r\nbody\r\n")

    def test_configurable(self) -> None:
        """smtp.strip_headers = [] keeps X-Spam-* (X-MPP-* still go); smtp.authserv_ids adds names whose Authentication-Results go too."""
        message = (b"X-Spam-Flag: YES\r\nX-MPP-Score: 1\r\nAuthentication-Results: edge2.example; none\r\n"
                   b"X-Virus: yes\r\n\r\nb\r\n")
        self.assertEqual(_cleaned(message, header_rules(50, (), (OURS,))),
                         (b"X-Spam-Flag: YES\r\nAuthentication-Results: edge2.example; none\r\n"
                          b"X-Virus: yes\r\n\r\nb\r\n", 1))
        self.assertEqual(_cleaned(message, header_rules(50, ("x-vir?s", "X-Spam-*"), (OURS, "Edge2.Example"))),
                         (b"\r\nb\r\n", 4))

    def test_config_keys_validated(self) -> None:
        """Bad smtp.strip_headers and smtp.authserv_ids entries are refused naming the file and key."""
        with self.assertRaises(ConfigError) as raised:
            from_mapping({"smtp": {"strip_headers": ["X Spam"], "authserv_ids": ["a; b"]}}, "proxy.toml")
        self.assertEqual(raised.exception.errors, [
            "proxy.toml: smtp.strip_headers: 'X Spam' is not a header field name pattern (such as 'X-Spam-*')",
            "proxy.toml: smtp.authserv_ids: 'a; b' is not an authserv-id (a host name such as 'mx.example.com')"])

    def test_edge_strips_and_counts(self) -> None:
        """Through the edge handler (local delivery) the forged fields are gone from the stored message and the log line counts them in stripped_headers."""
        data_dir = temp_dir(self)
        gateway, _ = make_gateway(make_config(data_dir=data_dir))
        message = (b"X-Spam-Flag: YES\r\nAuthentication-Results: " + OURS.encode() + b"; dkim=pass\r\n"
                   b"Authentication-Results: mx.other.example; dkim=pass\r\nSubject: s\r\n\r\nb\r\n")
        with capturedLogs() as events:
            reply = self.successResultOf(Deferred.fromCoroutine(
                gateway.on_data_end(make_session(), make_txn(message))))
        self.assertEqual(reply.code, 250)
        [path] = _maildir_files(data_dir)
        with open(path, "rb") as f:
            stored = f.read()
        self.assertNotIn(b"X-Spam-Flag", stored)
        self.assertNotIn(b"Authentication-Results: " + OURS.encode(), stored)
        self.assertIn(b"\nAuthentication-Results: mx.other.example; dkim=pass\n", stored)
        [event] = [e for e in events if e.get("mpp_event") == "transaction"]
        self.assertEqual(event["stripped_headers"], 2)


class EdgeLoopbackTests(PolicyCase):
    """Client -> in-process proxy -> fake backend on loopback."""

    async def test_tagged_message_keeps_only_our_verdict(self) -> None:
        """A tagged message arriving with a forged X-Spam-Flag: NO and our forged Authentication-Results leaves with only our X-Spam-* verdict; a foreign Authentication-Results stays."""
        fake, proxy = self.start(_policy())
        forged = (b"X-Spam-Flag: NO\r\nX-Spam-Score: -100\r\n"
                  b"Authentication-Results: proxy.test; spf=pass smtp.mailfrom=s@client.test\r\n"
                  b"Authentication-Results: mx.other.example; dkim=pass\r\n" + SPAM)
        out = await self.run_session(proxy.port, ("a@example.com",), message=forged)
        self.assertEqual(out["data"][0], 250)
        [relayed] = fake.messages
        self.assertEqual(_header(relayed.data, "X-Spam-Flag"), ["YES"])
        self.assertEqual(_header(relayed.data, "X-Spam-Score"), ["6"])
        self.assertEqual(_header(relayed.data, "Authentication-Results"), ["mx.other.example; dkim=pass"])

    async def test_looping_message_never_reaches_the_backend(self) -> None:
        """A message with 60 Received: fields gets 554 5.4.6 and the backend never hears DATA."""
        fake, proxy = self.start(_policy())
        out = await self.run_session(proxy.port, ("a@example.com",), message=_looped(60))
        code, text = out["data"]
        self.assertEqual(code, 554)
        self.assertTrue(text.startswith(b"5.4.6 "), text)
        self.assertEqual(fake.messages, [])
        self.assertNotIn(b"DATA", fake.commands())
