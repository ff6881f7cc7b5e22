"""XFORWARD and XCLIENT from an upstream MTA (mppproxy/smtp/forwarded.py and
the server's use of them), without sockets: the state machine of
``test_server.py`` with the networks of ``smtp.xforward_hosts`` and
``smtp.xclient_hosts``.  The real Postfix in front, before and after its
queue, is in tests/realmta/test_postfix_filter_modes.py.
"""
from __future__ import annotations

from typing import Any, Optional

from twisted.internet.address import IPv4Address

from mppproxy.match import TrustedNetworks
from mppproxy.smtp.address import Address
from mppproxy.smtp.forwarded import ForwardedSyntaxError, parse_attributes, XFORWARD_ATTRIBUTES
from mppproxy.smtp.replies import Reply
from mppproxy.smtp.server import SMTPServerFactory, SMTPServerProtocol
from mppproxy.smtp.session import Session, Transaction
from test_server import (HOSTNAME, RecordingHandler, RecordingTransport, ServerTestCase, codes,
                         split_replies, tuned)

UPSTREAM = "127.0.0.1"
CONFIG = tuned(smtp={"xforward_hosts": ("127.0.0.0/8",), "xclient_hosts": ("127.0.0.0/8",)})
TRUSTED = TrustedNetworks(("127.0.0.0/8", "10.0.0.0/8"))


class FactsHandler(RecordingHandler):
    """Records the session's client facts as MAIL and RCPT see them."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.facts: list[tuple[str, str, Optional[str], bool, Optional[str], bool]] = []

    def _note(self, when: str, session: Session) -> None:
        self.facts.append((when, session.peer_host, session.helo, session.trusted, session.via,
                           session.relay_checked))

    async def on_mail(self, session: Session, txn: Transaction) -> Reply:
        self._note("mail", session)
        return await super().on_mail(session, txn)

    async def on_rcpt(self, session: Session, txn: Transaction, rcpt: Address,
                      params: dict[str, Optional[str]]) -> Reply:
        self._note("rcpt", session)
        return await super().on_rcpt(session, txn, rcpt, params)


class ParseTests(ServerTestCase):

    def test_attributes_are_xtext_decoded_and_checked(self) -> None:
        """Names in any case, xtext escapes decoded, IPv6 with Postfix's IPV6: prefix, [UNAVAILABLE] as None."""
        got = parse_attributes("name=mail.example.org ADDR=IPV6:2001:db8::1 PORT=2525 "
                               "proto=esmtp HELO=[192.0.2.1] SOURCE=remote IDENT=A+2BB",
                               XFORWARD_ATTRIBUTES)
        self.assertEqual(got, {"NAME": "mail.example.org", "ADDR": "2001:db8::1", "PORT": "2525",
                               "PROTO": "ESMTP", "HELO": "[192.0.2.1]", "SOURCE": "REMOTE",
                               "IDENT": "A+B"})
        self.assertEqual(parse_attributes("ADDR=[unavailable]", XFORWARD_ATTRIBUTES),
                         {"ADDR": None})

    def test_bad_attributes_are_refused_with_a_reason(self) -> None:
        """Unknown names, bad xtext, too long, control characters, non-addresses: each a 501 naming the problem."""
        for arg in ("", "FOO=1", "ADDR", "ADDR=not-an-ip", "PORT=70000", "HELO=a+20b",
                    "NAME=" + "a" * 256, "SOURCE=ELSEWHERE", "PROTO=E+", "HELO=bad<name>",
                    "NAME=caf\u00e9.example"):
            with self.assertRaises(ForwardedSyntaxError, msg=arg) as caught:
                parse_attributes(arg, XFORWARD_ATTRIBUTES)
            self.assertEqual(caught.exception.reply.code, 501)


class XforwardTests(ServerTestCase):

    def open(self, peer: str = UPSTREAM, config: Any = CONFIG
             ) -> tuple[SMTPServerProtocol, RecordingTransport, FactsHandler]:
        handler = FactsHandler()
        factory = SMTPServerFactory(config, lambda: handler, self.clock, hostname=HOSTNAME,
                                    is_trusted=TRUSTED)
        proto = factory.buildProtocol(IPv4Address("TCP", peer, 40000))
        transport = RecordingTransport(peer)
        proto.makeConnection(transport)
        transport.clear()
        return proto, transport, handler

    def test_announced_only_to_the_configured_hosts(self) -> None:
        """EHLO lists XFORWARD and XCLIENT with their attributes to an authorised upstream, to nobody else."""
        proto, transport, _ = self.open()
        ehlo = self.talk(proto, transport, b"EHLO postfix.example\r\n").decode()
        self.assertIn("250-XFORWARD NAME ADDR PORT PROTO HELO IDENT SOURCE\r\n", ehlo)
        self.assertIn("XCLIENT NAME ADDR PORT PROTO HELO LOGIN DESTADDR DESTPORT", ehlo)
        proto, transport, _ = self.open(peer="198.51.100.7")
        ehlo = self.talk(proto, transport, b"EHLO client.example\r\n").decode()
        self.assertNotIn("XFORWARD", ehlo)
        self.assertNotIn("XCLIENT", ehlo)

    def test_refused_from_others_and_when_not_configured(self) -> None:
        """XFORWARD and XCLIENT from a client outside the lists get 550 5.7.0 and change nothing."""
        for peer, config in (("198.51.100.7", CONFIG), (UPSTREAM, tuned())):
            proto, transport, handler = self.open(peer=peer, config=config)
            out = self.talk(proto, transport, b"EHLO c.example\r\nXFORWARD ADDR=203.0.113.9\r\n"
                            b"XCLIENT ADDR=203.0.113.9\r\nMAIL FROM:<a@b.example>\r\n")
            self.assertEqual(codes(out), [250, 550, 550, 250])
            self.assertIn(b"5.7.0", split_replies(out)[1])
            self.assertEqual(handler.facts[0][1], peer)

    def test_forwarded_client_for_one_transaction_then_the_real_one(self) -> None:
        """The forwarded address and HELO are the transaction's client (its own trust, relay checked upstream); after the end of DATA the connection's own facts return."""
        proto, transport, handler = self.open()
        out = self.talk(proto, transport,
                        b"EHLO postfix.example\r\n"
                        b"XFORWARD NAME=mail.example.org ADDR=203.0.113.9 PROTO=ESMTP\r\n"
                        b"XFORWARD HELO=mail.example.org\r\n"
                        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
        self.assertEqual(codes(out), [250, 250, 250, 250, 250, 354])
        out = self.talk(proto, transport, b"hello\r\n.\r\nMAIL FROM:<c@example.org>\r\n")
        self.assertEqual(codes(out), [250, 250])
        self.assertEqual(handler.facts, [
            ("mail", "203.0.113.9", "mail.example.org", False, UPSTREAM, True),
            ("rcpt", "203.0.113.9", "mail.example.org", False, UPSTREAM, True),
            ("mail", UPSTREAM, "postfix.example", True, None, False)])

    def test_rset_resets_the_attributes(self) -> None:
        """After RSET the next transaction has the real client again (XFORWARD_README: reset at RSET or DOT)."""
        proto, transport, handler = self.open()
        out = self.talk(proto, transport, b"EHLO p.example\r\nXFORWARD ADDR=203.0.113.9\r\n"
                        b"MAIL FROM:<a@example.org>\r\nRSET\r\nMAIL FROM:<a@example.org>\r\n")
        self.assertEqual(codes(out), [250, 250, 250, 250, 250])
        self.assertEqual([f[1] for f in handler.facts], ["203.0.113.9", UPSTREAM])

    def test_unavailable_address_is_a_local_submission(self) -> None:
        """ADDR=[UNAVAILABLE] keeps the connection's own client facts, relay control still upstream."""
        proto, transport, handler = self.open()
        self.talk(proto, transport, b"EHLO p.example\r\nXFORWARD ADDR=[UNAVAILABLE] HELO=x.example\r\n"
                  b"MAIL FROM:<a@example.org>\r\n")
        self.assertEqual(handler.facts, [("mail", UPSTREAM, "p.example", True, UPSTREAM, True)])

    def test_not_inside_a_transaction_and_bad_syntax(self) -> None:
        """XFORWARD between MAIL and the end of DATA gets 503 5.5.1; a bad attribute 501 5.5.4; before EHLO 503."""
        proto, transport, _ = self.open()
        out = self.talk(proto, transport, b"XFORWARD ADDR=203.0.113.9\r\n")
        self.assertEqual(codes(out), [503])
        out = self.talk(proto, transport, b"EHLO p.example\r\nXFORWARD ADDR=nonsense\r\n"
                        b"MAIL FROM:<a@example.org>\r\nXFORWARD ADDR=203.0.113.9\r\n")
        self.assertEqual(codes(out), [250, 501, 250, 503])
        self.assertIn(b"5.5.1", split_replies(out)[3])

    def test_refused_mail_keeps_the_attributes_for_the_next(self) -> None:
        """A MAIL the handler refuses starts no transaction: the facts return, and the next MAIL gets the forwarded ones again."""
        proto, transport, handler = self.open()
        handler.replies_for["mail"] = Reply(451, "4.3.0", "try later")
        self.talk(proto, transport, b"EHLO p.example\r\nXFORWARD ADDR=203.0.113.9\r\n"
                  b"MAIL FROM:<a@example.org>\r\n")
        self.assertEqual(proto.session.peer_host if proto.session else None, UPSTREAM)
        del handler.replies_for["mail"]
        out = self.talk(proto, transport, b"MAIL FROM:<a@example.org>\r\n")
        self.assertEqual(codes(out), [250])
        self.assertEqual([f[1] for f in handler.facts], ["203.0.113.9", "203.0.113.9"])

    def test_xclient_replaces_the_client_for_the_session(self) -> None:
        """XCLIENT answers 220, needs EHLO again, and its client stays for every later transaction, relay control included."""
        proto, transport, handler = self.open()
        out = self.talk(proto, transport, b"EHLO p.example\r\n"
                        b"XCLIENT ADDR=203.0.113.9 HELO=mail.example.org NAME=[UNAVAILABLE]\r\n")
        self.assertEqual(codes(out), [250, 220])
        out = self.talk(proto, transport, b"MAIL FROM:<a@example.org>\r\n")
        self.assertEqual(codes(out), [503])
        out = self.talk(proto, transport, b"EHLO mail.example.org\r\nMAIL FROM:<a@example.org>\r\n"
                        b"RSET\r\nMAIL FROM:<a@example.org>\r\n")
        self.assertEqual(codes(out), [250, 250, 250, 250])
        self.assertEqual(handler.facts, [
            ("mail", "203.0.113.9", "mail.example.org", False, UPSTREAM, False),
            ("mail", "203.0.113.9", "mail.example.org", False, UPSTREAM, False)])
        self.assertEqual(handler.calls.count("connect"), 2)

    def test_connection_count_follows_the_real_peer(self) -> None:
        """After XCLIENT the per-address connection count is still released for the connection's own address."""
        proto, transport, _ = self.open()
        counter = proto.counter
        self.talk(proto, transport, b"EHLO p.example\r\nXCLIENT ADDR=203.0.113.9\r\n")
        self.assertEqual(counter.per_host.get(UPSTREAM), 1)
        proto.connectionLost(None)
        self.assertEqual(counter.per_host.get(UPSTREAM, 0), 0)
        self.assertNotIn("203.0.113.9", counter.per_host)
