"""The ESMTP state machine (``mppproxy.smtp.server``) without sockets.

Each test builds ``SMTPServerFactory`` with a ``ProxyConfig``, a recording
fake ``SessionHandler`` and a ``MemoryReactorClock``, connects a protocol to
a ``StringTransport``, feeds bytes with ``dataReceived`` and reads replies
from ``transport.value()`` (STYLE.md, Testing; Twisted's
``mail/test/test_smtp.py``).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Optional

import trustme
from twisted.internet import ssl
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mppproxy.config.schema import LimitsConfig, ProxyConfig, SmtpConfig, TimeoutsConfig
from mppproxy.smtp import replies
from mppproxy.smtp.address import Address
from mppproxy.smtp.replies import Reply
from mppproxy.smtp.server import (
    PIPELINE_BUFFER, Capabilities, ConnectionCounter, SessionState, SMTPServerFactory,
    SMTPServerProtocol,
)
from mppproxy.smtp.session import Session, Transaction

HOSTNAME = "mx.example.test"
CONFIG = ProxyConfig()
GREETING = Reply(220, "", f"{HOSTNAME} {CONFIG.smtp.banner}").to_bytes()


def tuned(**sections: dict[str, Any]) -> ProxyConfig:
    """CONFIG with some fields of its sections replaced, e.g. ``tuned(limits={"max_errors": 3})``."""
    parts = {name: replace(getattr(CONFIG, name), **fields) for name, fields in sections.items()}
    return replace(CONFIG, **parts)


class Boom(Exception):
    """What the faulty handler raises."""


class RecordingHandler:
    """A fake ``SessionHandler`` that records every call.

    Replies come from ``replies_for`` (MAIL and end-of-DATA by name, RCPT by
    address text).  With ``deferred=True`` each decision waits on a Deferred
    kept in ``waiting`` until the test fires it, to show that later pipelined
    commands wait.  ``raise_in`` names a hook that raises ``Boom``."""

    def __init__(self, size: int = CONFIG.limits.max_message_size, deferred: bool = False,
                 raise_in: str = "", caps: Optional[Capabilities] = None,
                 connect_reply: Optional[Reply] = None):
        self.caps = caps or Capabilities(size=size)
        self.deferred = deferred
        self.raise_in = raise_in
        self.connect_reply = connect_reply
        self.calls: list[str] = []
        self.resets: list[str] = []
        self.messages: list[bytes] = []
        self.read_errors: list[BaseException] = []
        self.rcpts: list[str] = []
        self.waiting: list[tuple[str, Deferred]] = []
        self.replies_for: dict[str, Reply] = {}
        self.disconnected = 0
        self.sessions: list[Session] = []

    async def _decide(self, name: str, default: Reply) -> Reply:
        if self.raise_in == name:
            raise Boom(name)
        if self.deferred:
            d: Deferred = Deferred()
            self.waiting.append((name, d))
            return await d
        return self.replies_for.get(name, default)

    def fire(self, reply: Optional[Reply] = None) -> str:
        """Answer the oldest pending decision (with its usual reply by default)."""
        name, d = self.waiting.pop(0)
        default = {"capabilities": None, "mail": replies.SENDER_OK, "rcpt": replies.RECIPIENT_OK,
                   "data_end": replies.OK}[name]
        d.callback(reply or default)
        return name

    def on_connect(self, session: Session) -> Optional[Reply]:
        self.calls.append("connect")
        self.sessions.append(session)
        return self.connect_reply

    def on_client_gone(self, session: Session) -> None:
        self.calls.append("client_gone")

    def known_capabilities(self, session: Session) -> Optional[Capabilities]:
        # None: every EHLO takes the asynchronous path, which these tests
        # exercise (the edge handler tests cover the synchronous one).
        return None

    async def capabilities(self, session: Session) -> Capabilities:
        self.calls.append("capabilities")
        if self.raise_in == "capabilities":
            raise Boom("capabilities")
        return self.caps

    async def on_mail(self, session: Session, txn: Transaction) -> Reply:
        self.calls.append("mail")
        return await self._decide("mail", self.replies_for.get("mail", replies.SENDER_OK))

    async def on_rcpt(self, session: Session, txn: Transaction, rcpt: Address,
                      params: dict[str, Optional[str]]) -> Reply:
        self.calls.append("rcpt")
        self.rcpts.append(rcpt.text)
        return await self._decide("rcpt", self.replies_for.get(rcpt.text, replies.RECIPIENT_OK))

    async def on_data_end(self, session: Session, txn: Transaction) -> Reply:
        self.calls.append("data_end")
        # Keep the spool and read it after the decision, as the edge does
        # (prepare() holds the Spool; the relay streams it after DATA's 354).
        spool = txn.spool
        assert spool is not None
        reply = await self._decide("data_end", self.replies_for.get("data_end", replies.OK))
        try:
            self.messages.append(spool.getvalue())
        except BaseException as e:  # recorded for the test to look at
            self.read_errors.append(e)
            raise
        return reply

    def on_reset(self, session: Session, txn: Optional[Transaction], reason: str) -> None:
        self.calls.append("reset")
        self.resets.append(reason)

    def on_disconnect(self, session: Session) -> None:
        self.calls.append("disconnect")
        self.disconnected += 1


class RecordingTransport(StringTransport):
    """A StringTransport that records STARTTLS (StringTransport has no startTLS)."""

    def __init__(self, peer: str = "198.51.100.7", port: int = 40000):
        super().__init__(hostAddress=IPv4Address("TCP", "192.0.2.25", 25),
                         peerAddress=IPv4Address("TCP", peer, port))
        self.tls_started: list[Any] = []

    def startTLS(self, context: Any) -> None:
        self.tls_started.append(context)


def split_replies(data: bytes) -> list[bytes]:
    """Complete replies, each with all its lines (RFC 5321 4.2.1)."""
    out, current = [], b""
    assert data == b"" or data.endswith(b"\r\n"), data
    for line in data.split(b"\r\n")[:-1]:
        current += line + b"\r\n"
        if line[3:4] != b"-":
            out.append(current)
            current = b""
    assert current == b"", data
    return out


def codes(data: bytes) -> list[int]:
    return [int(r[:3]) for r in split_replies(data)]


_TLS_CONTEXT: Any = None


def tls_context() -> Any:
    global _TLS_CONTEXT
    if _TLS_CONTEXT is None:
        cert = trustme.CA().issue_cert(HOSTNAME)
        _TLS_CONTEXT = ssl.PrivateCertificate.loadPEM(cert.private_key_and_cert_chain_pem.bytes()).options()
    return _TLS_CONTEXT


class ServerTestCase(SynchronousTestCase):
    """Builds sessions on a fake clock and a recording transport."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()

    def connect(self, config: ProxyConfig = CONFIG, handler: Optional[RecordingHandler] = None,
                tls: Any = None, counter: Optional[ConnectionCounter] = None,
                peer: str = "198.51.100.7", greet: bool = True
                ) -> tuple[SMTPServerProtocol, RecordingTransport, RecordingHandler]:
        handler = handler or RecordingHandler()
        factory = SMTPServerFactory(config, lambda: handler, self.clock, tls_context=tls,
                                    counter=counter, hostname=HOSTNAME)
        proto = factory.buildProtocol(IPv4Address("TCP", peer, 40000))
        transport = RecordingTransport(peer)
        proto.makeConnection(transport)
        if greet and config.smtp.greet_pause == 0 and transport.value().startswith(b"220 "):
            self.assertEqual(transport.value(), GREETING)
            transport.clear()
        return proto, transport, handler

    def talk(self, proto: SMTPServerProtocol, transport: StringTransport, data: bytes) -> bytes:
        """Feed ``data`` in one read; return the replies it caused."""
        transport.clear()
        proto.dataReceived(data)
        return transport.value()

    def start_transaction(self, proto: SMTPServerProtocol, transport: StringTransport,
                          rcpts: int = 1) -> None:
        data = b"EHLO client.example\r\nMAIL FROM:<sender@client.example>\r\n"
        data += b"".join(b"RCPT TO:<r%d@example.com>\r\n" % i for i in range(rcpts))
        out = self.talk(proto, transport, data)
        self.assertEqual(codes(out), [250] * (2 + rcpts))
        transport.clear()


# --- greeting and EHLO -------------------------------------------------------------

class GreetingTests(ServerTestCase):

    def test_greeting(self) -> None:
        """On connect the server greets with 220, its hostname and the banner."""
        proto, transport, handler = self.connect(greet=False)
        self.assertEqual(transport.value(), b"220 mx.example.test ESMTP mppproxy\r\n")
        self.assertEqual(handler.calls, ["connect"])
        self.assertIs(proto.state, SessionState.READY)
        self.assertFalse(transport.disconnecting)

    def test_session_facts(self) -> None:
        """The Session carries the peer and local addresses seen on the transport."""
        proto, transport, handler = self.connect(peer="203.0.113.9")
        session = handler.sessions[0]
        self.assertEqual((session.peer_host, session.peer_port), ("203.0.113.9", 40000))
        self.assertEqual((session.local_host, session.local_port), ("192.0.2.25", 25))
        self.assertFalse(session.trusted)

    def test_connect_refusal(self) -> None:
        """A reply from on_connect is sent instead of the greeting and the connection closes."""
        refusal = Reply(554, "5.7.1", "Go away")
        proto, transport, handler = self.connect(handler=RecordingHandler(connect_reply=refusal),
                                                 greet=False)
        self.assertEqual(transport.value(), refusal.to_bytes())
        self.assertTrue(transport.disconnecting)


class EhloTests(ServerTestCase):

    def ehlo_lines(self, out: bytes) -> list[str]:
        [reply] = split_replies(out)
        return [line[4:].decode() for line in reply.split(b"\r\n")[:-1]]

    def test_ehlo_extensions(self) -> None:
        """EHLO lists PIPELINING, SIZE with the limit, 8BITMIME, SMTPUTF8 and ENHANCEDSTATUSCODES, and no STARTTLS without a TLS context."""
        proto, transport, handler = self.connect(handler=RecordingHandler(size=123456))
        lines = self.ehlo_lines(self.talk(proto, transport, b"EHLO client.example\r\n"))
        self.assertEqual(lines[0], f"{HOSTNAME} Hello client.example")
        self.assertEqual(set(lines[1:]), {"PIPELINING", "SIZE 123456", "8BITMIME", "SMTPUTF8",
                                          "ENHANCEDSTATUSCODES"})
        self.assertIs(proto.state, SessionState.MAIL)

    def test_ehlo_only_what_the_backend_has(self) -> None:
        """Extensions the handler's capabilities lack are not announced; DSN is when present."""
        caps = Capabilities(size=5000, eightbitmime=False, smtputf8=False, dsn=True)
        proto, transport, handler = self.connect(handler=RecordingHandler(caps=caps))
        lines = self.ehlo_lines(self.talk(proto, transport, b"EHLO client.example\r\n"))
        self.assertEqual(set(lines[1:]), {"PIPELINING", "SIZE 5000", "DSN", "ENHANCEDSTATUSCODES"})

    def test_ehlo_starttls_with_tls_context(self) -> None:
        """With a TLS context EHLO also offers STARTTLS (RFC 3207)."""
        proto, transport, handler = self.connect(tls=tls_context())
        lines = self.ehlo_lines(self.talk(proto, transport, b"EHLO client.example\r\n"))
        self.assertIn("STARTTLS", lines)

    def test_helo_no_extensions(self) -> None:
        """HELO gets a one-line 250 without any extension."""
        proto, transport, handler = self.connect()
        out = self.talk(proto, transport, b"HELO client.example\r\n")
        self.assertEqual(out, f"250 {HOSTNAME} Hello client.example\r\n".encode())
        self.assertIs(proto.state, SessionState.MAIL)

    def test_ehlo_needs_one_argument(self) -> None:
        """EHLO or HELO without a name, or with two words, gets 501."""
        proto, transport, handler = self.connect()
        for line in (b"EHLO\r\n", b"HELO\r\n", b"EHLO two words\r\n"):
            out = self.talk(proto, transport, line)
            self.assertEqual(codes(out), [501], line)
        self.assertIs(proto.state, SessionState.READY)

    def test_ehlo_argument_must_be_a_name_or_literal(self) -> None:
        """Non-ASCII or punctuation in the EHLO name gets 501; names, underscores and literals pass."""
        for bad in ("ｈｅｌｏ.例え".encode(), b"odd=name", b"a<b>", b"x;y", b"[1.2.3.4"):
            proto, transport, handler = self.connect()
            self.assertEqual(codes(self.talk(proto, transport, b"EHLO " + bad + b"\r\n")), [501], bad)
        for good in (b"mx.example.com", b"WIN_PC-7", b"localhost.", b"[192.0.2.1]", b"[IPv6:2001:db8::1]"):
            proto, transport, handler = self.connect()
            self.assertEqual(codes(self.talk(proto, transport, b"EHLO " + good + b"\r\n")), [250], good)

    def test_ehlo_resets_transaction(self) -> None:
        """A second EHLO in the middle of a transaction resets it."""
        proto, transport, handler = self.connect()
        self.start_transaction(proto, transport)
        self.assertEqual(codes(self.talk(proto, transport, b"EHLO again.example\r\n")), [250])
        self.assertIn("new EHLO/HELO", handler.resets)
        self.assertEqual(self.talk(proto, transport, b"RCPT TO:<r@example.com>\r\n"), replies.NEED_MAIL.to_bytes())


# --- command sequence ----------------------------------------------------------------

class SequenceTests(ServerTestCase):

    def test_mail_before_helo(self) -> None:
        """MAIL, RCPT or DATA before EHLO/HELO gets 503."""
        proto, transport, handler = self.connect()
        for line in (b"MAIL FROM:<a@b.example>\r\n", b"RCPT TO:<c@example.com>\r\n", b"DATA\r\n"):
            self.assertEqual(self.talk(proto, transport, line), replies.NEED_HELO.to_bytes(), line)
        self.assertEqual(handler.calls, ["connect"])

    def test_nested_mail(self) -> None:
        """A second MAIL inside a transaction gets 503 and the first transaction stands."""
        proto, transport, handler = self.connect()
        self.start_transaction(proto, transport)
        out = self.talk(proto, transport, b"MAIL FROM:<other@client.example>\r\n")
        self.assertEqual(out, replies.NESTED_MAIL.to_bytes())
        self.assertEqual(handler.calls.count("mail"), 1)
        self.assertIs(proto.state, SessionState.RCPT)

    def test_rcpt_before_mail(self) -> None:
        """RCPT before MAIL gets 503."""
        proto, transport, handler = self.connect()
        self.talk(proto, transport, b"EHLO client.example\r\n")
        out = self.talk(proto, transport, b"RCPT TO:<r@example.com>\r\n")
        self.assertEqual(out, replies.NEED_MAIL.to_bytes())
        self.assertNotIn("rcpt", handler.calls)

    def test_data_without_mail(self) -> None:
        """DATA without MAIL gets 503."""
        proto, transport, handler = self.connect()
        self.talk(proto, transport, b"EHLO client.example\r\n")
        self.assertEqual(self.talk(proto, transport, b"DATA\r\n"), replies.NEED_MAIL.to_bytes())

    def test_data_without_valid_recipients(self) -> None:
        """DATA after MAIL whose recipients were all refused gets 554 (RFC 5321 3.3) and no 354."""
        handler = RecordingHandler()
        handler.replies_for["nobody@example.com"] = replies.RELAY_DENIED
        proto, transport, handler = self.connect(handler=handler)
        out = self.talk(proto, transport, b"EHLO client.example\r\nMAIL FROM:<a@client.example>\r\n"
                                          b"RCPT TO:<nobody@example.com>\r\nDATA\r\n")
        self.assertEqual(codes(out), [250, 250, 554, 554])
        self.assertEqual(split_replies(out)[2], replies.RELAY_DENIED.to_bytes())
        self.assertIs(proto.state, SessionState.RCPT)

    def test_data_with_argument(self) -> None:
        """DATA with an argument gets 501."""
        proto, transport, handler = self.connect()
        self.start_transaction(proto, transport)
        self.assertEqual(codes(self.talk(proto, transport, b"DATA now\r\n")), [501])

    def test_rset(self) -> None:
        """RSET answers 250, ends the transaction (on_reset) and keeps the EHLO."""
        proto, transport, handler = self.connect()
        self.start_transaction(proto, transport)
        self.assertEqual(self.talk(proto, transport, b"RSET\r\n"), replies.RESET_OK.to_bytes())
        self.assertEqual(handler.resets, ["RSET"])
        self.assertIsNone(proto.txn)
        self.assertEqual(self.talk(proto, transport, b"RCPT TO:<r@example.com>\r\n"), replies.NEED_MAIL.to_bytes())
        self.assertEqual(codes(self.talk(proto, transport, b"MAIL FROM:<a@client.example>\r\n")), [250])

    def test_rset_before_helo(self) -> None:
        """RSET before EHLO is harmless: 250 and still no EHLO."""
        proto, transport, handler = self.connect()
        self.assertEqual(self.talk(proto, transport, b"RSET\r\n"), replies.RESET_OK.to_bytes())
        self.assertIs(proto.state, SessionState.READY)

    def test_noop_vrfy_help(self) -> None:
        """NOOP answers 250, VRFY 252 (RFC 5321 3.5.3), HELP 214, in any state."""
        proto, transport, handler = self.connect()
        for _ in range(2):
            self.assertEqual(self.talk(proto, transport, b"NOOP\r\n"), replies.NOOP_OK.to_bytes())
            self.assertEqual(self.talk(proto, transport, b"VRFY postmaster\r\n"), replies.CANNOT_VRFY.to_bytes())
            self.assertEqual(self.talk(proto, transport, b"HELP\r\n"), replies.HELP.to_bytes())
            self.start_transaction(proto, transport)

    def test_quit(self) -> None:
        """QUIT answers 221 and closes; nothing after it is answered."""
        proto, transport, handler = self.connect()
        out = self.talk(proto, transport, b"QUIT\r\nNOOP\r\n")
        self.assertEqual(codes(out), [221])
        self.assertTrue(out.startswith(b"221 2.0.0 "))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.talk(proto, transport, b"NOOP\r\n"), b"")

    def test_quit_in_transaction(self) -> None:
        """QUIT during a transaction resets it before closing."""
        proto, transport, handler = self.connect()
        self.start_transaction(proto, transport)
        self.assertEqual(codes(self.talk(proto, transport, b"QUIT\r\n")), [221])
        self.assertEqual(handler.resets, ["QUIT"])

    def test_unknown_command(self) -> None:
        """An unknown verb gets 500 5.5.2."""
        proto, transport, handler = self.connect()
        for line in (b"XYZZY\r\n", b"EHLOX foo\r\n", b" NOOP\r\n", b"\r\n"):
            self.assertEqual(self.talk(proto, transport, line), replies.UNKNOWN_COMMAND.to_bytes(), line)

    def test_not_implemented(self) -> None:
        """EXPN and AUTH get 502."""
        proto, transport, handler = self.connect()
        self.assertEqual(codes(self.talk(proto, transport, b"EXPN list\r\nAUTH PLAIN\r\n")), [502, 502])

    def test_nul(self) -> None:
        """A NUL in a command line gets 500 5.5.2 and the session goes on."""
        proto, transport, handler = self.connect()
        self.assertEqual(self.talk(proto, transport, b"NO\x00OP\r\n"), replies.NUL_IN_COMMAND.to_bytes())
        self.assertEqual(self.talk(proto, transport, b"NOOP\r\n"), replies.NOOP_OK.to_bytes())

    def test_command_line_over_512(self) -> None:
        """A command line over 512 octets gets 500 5.5.2 and the session goes on."""
        proto, transport, handler = self.connect()
        out = self.talk(proto, transport, b"NOOP " + b"x" * 600 + b"\r\nNOOP\r\n")
        self.assertEqual(split_replies(out), [replies.LINE_TOO_LONG.to_bytes(), replies.NOOP_OK.to_bytes()])

    def test_endless_command_line(self) -> None:
        """A line that never ends gets one 500 5.5.2, is not kept in memory, and what follows its LF is a new command."""
        proto, transport, handler = self.connect()
        transport.clear()
        for _ in range(100):
            proto.dataReceived(b"A" * 1000)
        self.assertEqual(transport.value(), replies.LINE_TOO_LONG.to_bytes())
        self.assertLess(len(proto._buffer), 2048)
        out = self.talk(proto, transport, b"AAAA\r\nNOOP\r\n")
        self.assertEqual(out, replies.NOOP_OK.to_bytes())

    def test_bare_lf_in_command(self) -> None:
        """A command ended by a bare LF gets 500 5.5.2 (RFC 5321 2.3.8)."""
        proto, transport, handler = self.connect()
        out = self.talk(proto, transport, b"EHLO client.example\nNOOP\r\n")
        self.assertEqual(split_replies(out), [replies.BARE_NEWLINE_COMMAND.to_bytes(), replies.NOOP_OK.to_bytes()])
        self.assertIs(proto.state, SessionState.READY)

    def test_two_transactions(self) -> None:
        """After a message, the next MAIL starts a new transaction in the same session."""
        proto, transport, handler = self.connect()
        for n in range(2):
            self.start_transaction(proto, transport)
            out = self.talk(proto, transport, b"DATA\r\nmsg %d\r\n.\r\n" % n)
            self.assertEqual(split_replies(out), [replies.START_DATA.to_bytes(), replies.OK.to_bytes()])
        self.assertEqual(handler.messages, [b"msg 0\r\n", b"msg 1\r\n"])
        self.assertEqual(handler.sessions[0].transactions, 2)


# --- MAIL/RCPT parameters -------------------------------------------------------------

class ParameterTests(ServerTestCase):

    def ehlo(self, **kw: Any) -> tuple[SMTPServerProtocol, RecordingTransport, RecordingHandler]:
        proto, transport, handler = self.connect(handler=RecordingHandler(**kw))
        self.assertEqual(codes(self.talk(proto, transport, b"EHLO client.example\r\n")), [250])
        return proto, transport, handler

    def test_size_over_limit(self) -> None:
        """MAIL with SIZE= over the announced limit gets 552 5.3.4 (RFC 1870 6) and the handler is not asked."""
        proto, transport, handler = self.ehlo(size=10000)
        out = self.talk(proto, transport, b"MAIL FROM:<a@client.example> SIZE=10001\r\n")
        self.assertEqual(out, replies.SIZE_PARAM_TOO_BIG.to_bytes())
        self.assertEqual((replies.SIZE_PARAM_TOO_BIG.code, replies.SIZE_PARAM_TOO_BIG.enhanced), (552, "5.3.4"))
        self.assertNotIn("mail", handler.calls)

    def test_size_at_limit(self) -> None:
        """MAIL with SIZE= equal to the limit is accepted."""
        proto, transport, handler = self.ehlo(size=10000)
        self.assertEqual(self.talk(proto, transport, b"MAIL FROM:<a@client.example> SIZE=10000\r\n"),
                         replies.SENDER_OK.to_bytes())

    def test_size_not_a_number(self) -> None:
        """SIZE= without a number gets 501."""
        proto, transport, handler = self.ehlo()
        self.assertEqual(codes(self.talk(proto, transport, b"MAIL FROM:<a@client.example> SIZE=ten\r\n")), [501])

    def test_body(self) -> None:
        """BODY=8BITMIME and BODY=7BIT are accepted, anything else gets 501."""
        proto, transport, handler = self.ehlo()
        self.assertEqual(codes(self.talk(proto, transport, b"MAIL FROM:<a@client.example> BODY=8BITMIME\r\n")), [250])
        self.assertTrue(proto.txn is not None and proto.txn.body_8bit)
        self.talk(proto, transport, b"RSET\r\n")
        self.assertEqual(codes(self.talk(proto, transport, b"MAIL FROM:<a@client.example> BODY=7bit\r\n")), [250])
        self.talk(proto, transport, b"RSET\r\n")
        self.assertEqual(self.talk(proto, transport, b"MAIL FROM:<a@client.example> BODY=BINARYMIME\r\n"),
                         replies.BAD_BODY_PARAMETER.to_bytes())

    def test_unknown_parameter(self) -> None:
        """An unknown MAIL or RCPT parameter gets 555."""
        proto, transport, handler = self.ehlo()
        self.assertEqual(codes(self.talk(proto, transport, b"MAIL FROM:<a@client.example> XFOO=1\r\n")), [555])
        self.start_transaction(proto, transport)
        self.assertEqual(codes(self.talk(proto, transport, b"RCPT TO:<b@example.com> NOTIFY=NEVER\r\n")), [555])

    def test_parameters_need_ehlo(self) -> None:
        """After HELO, MAIL parameters get 555."""
        proto, transport, handler = self.connect()
        self.talk(proto, transport, b"HELO client.example\r\n")
        self.assertEqual(codes(self.talk(proto, transport, b"MAIL FROM:<a@client.example> SIZE=10\r\n")), [555])

    def test_bad_addresses(self) -> None:
        """Unparseable sender or recipient addresses get 501."""
        proto, transport, handler = self.ehlo()
        out = self.talk(proto, transport, b"MAIL FROM:<a b@client.example>\r\n")
        self.assertEqual(codes(out), [501])
        self.assertTrue(out.startswith(b"501 5.1.7 "))
        self.talk(proto, transport, b"MAIL FROM:<>\r\n")
        out = self.talk(proto, transport, b"RCPT TO:<>\r\n")
        self.assertTrue(out.startswith(b"501 5.1.3 "))

    def test_utf8_needs_smtputf8(self) -> None:
        """A non-ASCII address without the SMTPUTF8 parameter gets 553 5.6.7 (RFC 6531 3.4)."""
        proto, transport, handler = self.ehlo()
        out = self.talk(proto, transport, "MAIL FROM:<jürgen@client.example>\r\n".encode())
        self.assertEqual(out, replies.UTF8_NEEDS_SMTPUTF8.to_bytes())
        out = self.talk(proto, transport, "MAIL FROM:<jürgen@client.example> SMTPUTF8\r\n".encode())
        self.assertEqual(codes(out), [250])
        out = self.talk(proto, transport, "RCPT TO:<jürgen@example.com>\r\n".encode())
        self.assertEqual(codes(out), [250])

    def test_null_sender(self) -> None:
        """MAIL FROM:<> (bounces) is accepted."""
        proto, transport, handler = self.ehlo()
        self.assertEqual(self.talk(proto, transport, b"MAIL FROM:<>\r\n"), replies.SENDER_OK.to_bytes())


# --- DATA ----------------------------------------------------------------------------

class DataTests(ServerTestCase):

    def test_message_reaches_handler(self) -> None:
        """The message content reaches on_data_end unstuffed and the handler's reply is sent."""
        proto, transport, handler = self.connect()
        self.start_transaction(proto, transport, rcpts=2)
        out = self.talk(proto, transport, b"DATA\r\nSubject: hi\r\n\r\n..dot\r\nend\r\n.\r\n")
        self.assertEqual(split_replies(out), [replies.START_DATA.to_bytes(), replies.OK.to_bytes()])
        self.assertEqual(handler.messages, [b"Subject: hi\r\n\r\n.dot\r\nend\r\n"])
        self.assertIs(proto.state, SessionState.MAIL)
        self.assertIsNone(proto.txn)

    def test_message_over_size_limit(self) -> None:
        """A message over the size limit gets 552 5.3.4 at the end of data and nothing reaches on_data_end."""
        proto, transport, handler = self.connect(handler=RecordingHandler(size=2000))
        self.start_transaction(proto, transport)
        out = self.talk(proto, transport, b"DATA\r\n" + (b"x" * 98 + b"\r\n") * 30 + b".\r\nNOOP\r\n")
        self.assertEqual(split_replies(out), [replies.START_DATA.to_bytes(), replies.MESSAGE_TOO_BIG.to_bytes(),
                                              replies.NOOP_OK.to_bytes()])
        self.assertEqual((replies.MESSAGE_TOO_BIG.code, replies.MESSAGE_TOO_BIG.enhanced), (552, "5.3.4"))
        self.assertNotIn("data_end", handler.calls)
        self.assertEqual(handler.resets, ["message too big"])
        self.assertIs(proto.state, SessionState.MAIL)

    def test_size_limit_from_config_after_helo(self) -> None:
        """After HELO (no capabilities asked) the configured max_message_size bounds the message."""
        config = tuned(limits={"max_message_size": 1024})
        proto, transport, handler = self.connect(config=config)
        out = self.talk(proto, transport, b"HELO c.example\r\nMAIL FROM:<a@c.example>\r\nRCPT TO:<b@example.com>\r\n"
                                          b"DATA\r\n" + b"y" * 500 + b"\r\n" + b"z" * 600 + b"\r\n.\r\n")
        self.assertEqual(split_replies(out)[-1], replies.MESSAGE_TOO_BIG.to_bytes())
        self.assertNotIn("data_end", handler.calls)

    def test_line_over_1000(self) -> None:
        """A text line over 1000 octets gets 550 5.5.2 at the end of data and nothing reaches on_data_end."""
        proto, transport, handler = self.connect()
        self.start_transaction(proto, transport)
        out = self.talk(proto, transport, b"DATA\r\nok\r\n" + b"x" * 999 + b"\r\nmore\r\n.\r\nNOOP\r\n")
        self.assertEqual(split_replies(out), [replies.START_DATA.to_bytes(), replies.DATA_LINE_TOO_LONG.to_bytes(),
                                              replies.NOOP_OK.to_bytes()])
        self.assertEqual((replies.DATA_LINE_TOO_LONG.code, replies.DATA_LINE_TOO_LONG.enhanced), (550, "5.5.2"))
        self.assertNotIn("data_end", handler.calls)

    def test_bare_lf_in_data(self) -> None:
        """A bare LF in DATA gets 550 5.5.2, the connection closes, and nothing reaches on_data_end."""
        proto, transport, handler = self.connect()
        self.start_transaction(proto, transport)
        out = self.talk(proto, transport, b"DATA\r\nhello\n.\nMAIL FROM:<evil@client.example>\r\n"
                                          b"RCPT TO:<victim@example.com>\r\nDATA\r\nforged\r\n.\r\n")
        self.assertEqual(split_replies(out), [replies.START_DATA.to_bytes(), replies.BARE_NEWLINE_DATA.to_bytes()])
        self.assertEqual((replies.BARE_NEWLINE_DATA.code, replies.BARE_NEWLINE_DATA.enhanced), (550, "5.5.2"))
        self.assertTrue(transport.disconnecting)
        self.assertNotIn("data_end", handler.calls)
        self.assertEqual(handler.calls.count("mail"), 1)
        self.assertEqual(handler.resets, ["bare newline in DATA"])

    def test_bare_cr_in_data(self) -> None:
        """A bare CR in DATA is refused like a bare LF."""
        proto, transport, handler = self.connect()
        self.start_transaction(proto, transport)
        out = self.talk(proto, transport, b"DATA\r\nhello\r.\rmore text here\r\n.\r\n")
        self.assertEqual(split_replies(out)[-1], replies.BARE_NEWLINE_DATA.to_bytes())
        self.assertTrue(transport.disconnecting)
        self.assertNotIn("data_end", handler.calls)

    def test_normalise_mode(self) -> None:
        """With bare_newline = "normalise", bare LFs become CRLF and the message is accepted."""
        proto, transport, handler = self.connect(config=tuned(smtp={"bare_newline": "normalise"}))
        self.start_transaction(proto, transport)
        out = self.talk(proto, transport, b"DATA\r\na\nb\r\n.\nNOOP\r\n")
        self.assertEqual(split_replies(out), [replies.START_DATA.to_bytes(), replies.OK.to_bytes(),
                                              replies.NOOP_OK.to_bytes()])
        self.assertEqual(handler.messages, [b"a\r\nb\r\n"])

    def test_normalise_mode_byte_at_a_time(self) -> None:
        """In normalise mode, feeding a conversation one byte at a time gives the same replies as one chunk."""
        config = tuned(smtp={"bare_newline": "normalise"})
        talk = (b"EHLO c.example\r\nMAIL FROM:<a@c.example>\r\nRCPT TO:<b@example.com>\r\n"
                b"DATA\r\nhi\r\n.\r\nQUIT\r\n")
        proto, transport, handler = self.connect(config=config)
        proto.dataReceived(talk)
        whole = transport.value()
        proto, transport, handler = self.connect(config=config)
        for i in range(len(talk)):
            proto.dataReceived(talk[i:i + 1])
        self.assertEqual(transport.value(), whole)

    def test_too_many_recipients(self) -> None:
        """RCPT past max_recipients gets 452 4.5.3 without asking the handler; the accepted ones still get the message."""
        proto, transport, handler = self.connect(config=tuned(limits={"max_recipients": 2}))
        out = self.talk(proto, transport, b"EHLO c.example\r\nMAIL FROM:<a@c.example>\r\n"
                                          b"RCPT TO:<r1@example.com>\r\nRCPT TO:<r2@example.com>\r\n"
                                          b"RCPT TO:<r3@example.com>\r\nDATA\r\nm\r\n.\r\n")
        self.assertEqual(codes(out), [250, 250, 250, 250, 452, 354, 250])
        self.assertEqual(split_replies(out)[4], replies.TOO_MANY_RECIPIENTS.to_bytes())
        self.assertEqual(handler.rcpts, ["r1@example.com", "r2@example.com"])

    def test_handler_refused_recipient_not_kept(self) -> None:
        """A recipient the handler refuses is not added to the transaction."""
        handler = RecordingHandler()
        handler.replies_for["no@example.com"] = replies.RELAY_DENIED
        proto, transport, handler = self.connect(handler=handler)
        out = self.talk(proto, transport, b"EHLO c.example\r\nMAIL FROM:<a@c.example>\r\n"
                                          b"RCPT TO:<no@example.com>\r\nRCPT TO:<yes@example.com>\r\n")
        self.assertEqual(codes(out), [250, 250, 554, 250])
        assert proto.txn is not None
        self.assertEqual([r.text for r in proto.txn.recipients], ["yes@example.com"])
        self.assertEqual(proto.txn.rcpt_log, [("no@example.com", "554"), ("yes@example.com", "250")])

    def test_refused_mail_resets(self) -> None:
        """A MAIL the handler refuses leaves no transaction and calls on_reset."""
        handler = RecordingHandler()
        handler.replies_for["mail"] = Reply(451, "4.4.1", "backend down")
        proto, transport, handler = self.connect(handler=handler)
        out = self.talk(proto, transport, b"EHLO c.example\r\nMAIL FROM:<a@c.example>\r\nRCPT TO:<b@example.com>\r\n")
        self.assertEqual(codes(out), [250, 451, 503])
        self.assertEqual(handler.resets, ["MAIL refused: 451"])
        self.assertIsNone(proto.txn)


# --- bounds --------------------------------------------------------------------------

class ErrorLimitTests(ServerTestCase):

    def test_max_errors(self) -> None:
        """After max_errors error replies the session gets 421 and is closed."""
        proto, transport, handler = self.connect(config=tuned(limits={"max_errors": 3}))
        out = self.talk(proto, transport, b"BAD1\r\nBAD2\r\nBAD3\r\nNOOP\r\n")
        self.assertEqual(split_replies(out), [replies.UNKNOWN_COMMAND.to_bytes()] * 3 + [replies.TOO_MANY_ERRORS.to_bytes()])
        self.assertTrue(transport.disconnecting)

    def test_errors_counted_across_kinds(self) -> None:
        """Sequence, syntax and handler refusals all count towards max_errors."""
        handler = RecordingHandler()
        handler.replies_for["no@example.com"] = replies.RELAY_DENIED
        proto, transport, handler = self.connect(config=tuned(limits={"max_errors": 3}), handler=handler)
        out = self.talk(proto, transport, b"MAIL FROM:<a@c.example>\r\nEHLO c.example\r\nEHLO\r\n"
                                          b"MAIL FROM:<a@c.example>\r\nRCPT TO:<no@example.com>\r\nNOOP\r\n")
        self.assertEqual(codes(out), [503, 250, 501, 250, 554, 421])
        self.assertTrue(transport.disconnecting)

    def test_good_commands_do_not_count(self) -> None:
        """Successful commands never count as errors."""
        proto, transport, handler = self.connect(config=tuned(limits={"max_errors": 2}))
        out = self.talk(proto, transport, b"NOOP\r\n" * 50 + b"BAD\r\nNOOP\r\n")
        self.assertEqual(codes(out), [250] * 50 + [500, 250])
        self.assertFalse(transport.disconnecting)


class TimeoutTests(ServerTestCase):

    def test_command_timeout(self) -> None:
        """Silence for timeouts.command gets 421 4.4.2 and the connection closes (RFC 5321 4.5.3.2.7)."""
        proto, transport, handler = self.connect()
        self.clock.advance(CONFIG.timeouts.command - 1)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(1)
        self.assertEqual(transport.value(), replies.TIMEOUT.to_bytes())
        self.assertEqual((replies.TIMEOUT.code, replies.TIMEOUT.enhanced), (421, "4.4.2"))
        self.assertTrue(transport.disconnecting)

    def test_activity_restarts_command_timer(self) -> None:
        """Each command starts the command timeout afresh."""
        proto, transport, handler = self.connect(config=tuned(timeouts={"command": 10.0}))
        for _ in range(5):
            self.clock.advance(9)
            self.assertEqual(self.talk(proto, transport, b"NOOP\r\n"), replies.NOOP_OK.to_bytes())
        transport.clear()
        self.clock.advance(10)
        self.assertEqual(transport.value(), replies.TIMEOUT.to_bytes())

    def test_partial_line_restarts_command_timer(self) -> None:
        """Bytes of a command line not yet ended still count as activity and restart the timer."""
        proto, transport, handler = self.connect(config=tuned(timeouts={"command": 10.0}))
        for piece in (b"NO", b"O", b"P"):
            self.clock.advance(9)
            self.assertEqual(self.talk(proto, transport, piece), b"")
        self.clock.advance(9)
        self.assertEqual(self.talk(proto, transport, b"\r\n"), replies.NOOP_OK.to_bytes())
        transport.clear()
        self.clock.advance(9.5)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(0.5)
        self.assertEqual(transport.value(), replies.TIMEOUT.to_bytes())

    def test_data_block_timeout(self) -> None:
        """In DATA, silence for timeouts.data_block gets 421 and a close; each data chunk restarts it."""
        config = tuned(timeouts={"command": 100.0, "data_block": 20.0})
        proto, transport, handler = self.connect(config=config)
        self.start_transaction(proto, transport)
        self.assertEqual(self.talk(proto, transport, b"DATA\r\n"), replies.START_DATA.to_bytes())
        for _ in range(3):
            self.clock.advance(19)
            self.assertEqual(self.talk(proto, transport, b"more data\r\n"), b"")
        self.clock.advance(19.5)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(0.5)
        self.assertEqual(transport.value(), replies.TIMEOUT.to_bytes())
        self.assertTrue(transport.disconnecting)
        self.assertNotIn("data_end", handler.calls)

    def test_data_total_timeout_stops_a_trickle(self) -> None:
        """A client that trickles DATA just fast enough for data_block is cut off at data_total."""
        config = tuned(timeouts={"command": 100.0, "data_block": 20.0, "data_total": 100.0})
        proto, transport, handler = self.connect(config=config)
        self.start_transaction(proto, transport)
        self.assertEqual(self.talk(proto, transport, b"DATA\r\n"), replies.START_DATA.to_bytes())
        for _ in range(5):
            self.clock.advance(19)
            self.assertEqual(self.talk(proto, transport, b"x"), b"")
        self.clock.advance(5)
        self.assertEqual(transport.value(), replies.TIMEOUT.to_bytes())
        self.assertTrue(transport.disconnecting)
        self.assertNotIn("data_end", handler.calls)

    def test_command_timeout_after_refused_message(self) -> None:
        """After a message refused at the end of data, the session waits timeouts.command for the next command, not data_block."""
        config = tuned(timeouts={"command": 100.0, "data_block": 20.0})
        proto, transport, handler = self.connect(config=config, handler=RecordingHandler(size=1000))
        self.start_transaction(proto, transport)
        out = self.talk(proto, transport, b"DATA\r\n" + b"x" * 900 + b"\r\n" + b"y" * 900 + b"\r\n.\r\n")
        self.assertEqual(split_replies(out)[-1], replies.MESSAGE_TOO_BIG.to_bytes())
        transport.clear()
        self.clock.advance(99)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(1)
        self.assertEqual(transport.value(), replies.TIMEOUT.to_bytes())

    def test_command_timeout_after_accepted_message(self) -> None:
        """After a message is accepted, the command timeout applies again."""
        config = tuned(timeouts={"command": 100.0, "data_block": 20.0})
        proto, transport, handler = self.connect(config=config)
        self.start_transaction(proto, transport)
        self.talk(proto, transport, b"DATA\r\nhi\r\n.\r\n")
        transport.clear()
        self.clock.advance(99)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(1)
        self.assertEqual(transport.value(), replies.TIMEOUT.to_bytes())

    def test_no_timeout_while_decision_pending(self) -> None:
        """While the handler decides, the client's command timer does not run; it restarts after the reply."""
        config = tuned(timeouts={"command": 10.0})
        proto, transport, handler = self.connect(config=config, handler=RecordingHandler(deferred=True))
        self.talk(proto, transport, b"EHLO c.example\r\nMAIL FROM:<a@c.example>\r\n")
        transport.clear()
        self.clock.advance(1000)
        self.assertEqual(transport.value(), b"")
        handler.fire()
        self.assertEqual(transport.value(), replies.SENDER_OK.to_bytes())
        transport.clear()
        self.clock.advance(10)
        self.assertEqual(transport.value(), replies.TIMEOUT.to_bytes())

    def test_no_calls_left_after_close(self) -> None:
        """After QUIT and the close, no timer is left on the clock."""
        proto, transport, handler = self.connect()
        self.talk(proto, transport, b"QUIT\r\n")
        proto.connectionLost(None)
        self.assertEqual([c for c in self.clock.getDelayedCalls() if c.active()], [])

    def test_close_that_never_completes_is_aborted(self) -> None:
        """A connection that does not finish closing (client not reading, TLS never
        completed) is aborted CLOSE_GRACE seconds after the last reply."""
        from mppproxy.smtp.server import CLOSE_GRACE
        aborted = []
        proto, transport, handler = self.connect()
        transport.abortConnection = lambda: aborted.append(True)  # type: ignore[method-assign]
        self.talk(proto, transport, b"QUIT\r\n")
        self.clock.advance(CLOSE_GRACE - 0.1)
        self.assertEqual(aborted, [])
        self.clock.advance(0.2)
        self.assertEqual(aborted, [True])

    def test_client_that_does_not_read_stops_being_served(self) -> None:
        """When our replies back up (the transport pauses us as a producer), pipelined
        commands wait and reading stops; they are answered once the client reads."""
        proto, transport, handler = self.connect()
        proto.pauseProducing()  # what the transport does when its buffer is full
        transport.clear()
        proto.dataReceived(b"NOOP\r\n" * 50)
        self.assertEqual(transport.value(), b"")
        self.assertEqual(transport.producerState, "paused")
        proto.resumeProducing()
        self.assertEqual(codes(transport.value()), [250] * 50)
        self.assertEqual(transport.producerState, "producing")

    def test_deep_pipeline_without_recursion(self) -> None:
        """Hundreds of pipelined commands answered at once are all replied to, in order."""
        proto, transport, handler = self.connect()
        self.talk(proto, transport, b"EHLO client.test\r\n")
        out = self.talk(proto, transport, b"MAIL FROM:<a@example.net>\r\nRSET\r\n" * 1500)
        self.assertEqual(codes(out), [250] * 3000)


class ConnectionLimitTests(ServerTestCase):

    def test_total_limit(self) -> None:
        """Past max_connections a new connection gets 421 4.7.0 and is closed; a freed slot is reusable."""
        config = tuned(limits={"max_connections": 1})
        counter = ConnectionCounter()
        p1, t1, h1 = self.connect(config=config, counter=counter, peer="198.51.100.1")
        p2, t2, h2 = self.connect(config=config, counter=counter, peer="198.51.100.2", greet=False)
        self.assertEqual(t2.value(), replies.TOO_MANY_CONNECTIONS.to_bytes())
        self.assertEqual((replies.TOO_MANY_CONNECTIONS.code, replies.TOO_MANY_CONNECTIONS.enhanced), (421, "4.7.0"))
        self.assertTrue(t2.disconnecting)
        self.assertNotIn("connect", h2.calls)
        p2.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(counter.total, 1)
        p1.connectionLost(Failure(ConnectionDone()))
        self.assertEqual((counter.total, counter.per_host), (0, {}))
        p3, t3, h3 = self.connect(config=config, counter=counter, greet=False)
        self.assertEqual(t3.value(), GREETING)

    def test_per_ip_limit(self) -> None:
        """Past max_connections_per_ip a connection from the same address gets 421 4.7.0; other addresses are served."""
        config = tuned(limits={"max_connections_per_ip": 1})
        counter = ConnectionCounter()
        p1, t1, h1 = self.connect(config=config, counter=counter, peer="198.51.100.1")
        p2, t2, h2 = self.connect(config=config, counter=counter, peer="198.51.100.1", greet=False)
        self.assertEqual(t2.value(), replies.TOO_MANY_FROM_HOST.to_bytes())
        self.assertTrue(t2.disconnecting)
        p3, t3, h3 = self.connect(config=config, counter=counter, peer="198.51.100.3", greet=False)
        self.assertEqual(t3.value(), GREETING)
        self.assertEqual(counter.per_host, {"198.51.100.1": 1, "198.51.100.3": 1})

    def test_counter_shared_by_factories(self) -> None:
        """Two factories (listeners) sharing a ConnectionCounter share the limits."""
        config = tuned(limits={"max_connections": 2})
        counter = ConnectionCounter()
        for n in range(2):
            self.connect(config=config, counter=counter, peer=f"198.51.100.{n + 1}")
        p, t, h = self.connect(config=config, counter=counter, peer="198.51.100.9", greet=False)
        self.assertEqual(t.value(), replies.TOO_MANY_CONNECTIONS.to_bytes())


class EarlyTalkerTests(ServerTestCase):

    def test_early_talker(self) -> None:
        """With greet_pause, a client that talks before the greeting gets 554 5.5.1 and is closed."""
        config = tuned(smtp={"greet_pause": 5.0})
        proto, transport, handler = self.connect(config=config, greet=False)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(2)
        proto.dataReceived(b"EHLO spammer.example\r\n")
        self.assertEqual(transport.value(), replies.EARLY_TALKER.to_bytes())
        self.assertEqual((replies.EARLY_TALKER.code, replies.EARLY_TALKER.enhanced), (554, "5.5.1"))
        self.assertTrue(transport.disconnecting)
        transport.clear()
        self.clock.advance(10)
        self.assertEqual(transport.value(), b"")

    def test_patient_client(self) -> None:
        """With greet_pause, the greeting comes after the pause and the session proceeds."""
        config = tuned(smtp={"greet_pause": 5.0})
        proto, transport, handler = self.connect(config=config, greet=False)
        self.clock.advance(4.9)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(0.1)
        self.assertEqual(transport.value(), GREETING)
        self.assertEqual(codes(self.talk(proto, transport, b"EHLO c.example\r\n")), [250])


class StartTLSTests(ServerTestCase):

    def test_starttls(self) -> None:
        """STARTTLS answers 220, starts TLS with the context, drops pipelined commands and forgets the EHLO."""
        ctx = tls_context()
        proto, transport, handler = self.connect(tls=ctx)
        out = self.talk(proto, transport, b"EHLO c.example\r\nSTARTTLS\r\nMAIL FROM:<a@c.example>\r\n")
        self.assertEqual(split_replies(out)[1:], [replies.READY_TLS.to_bytes()])
        self.assertEqual(transport.tls_started, [ctx])
        self.assertNotIn("mail", handler.calls)
        self.assertTrue(handler.sessions[0].tls)
        self.assertIsNone(handler.sessions[0].helo)
        self.assertIs(proto.state, SessionState.READY)
        self.assertEqual(self.talk(proto, transport, b"MAIL FROM:<a@c.example>\r\n"), replies.NEED_HELO.to_bytes())
        lines = split_replies(self.talk(proto, transport, b"EHLO c.example\r\n"))[0]
        self.assertNotIn(b"STARTTLS", lines)
        self.assertEqual(self.talk(proto, transport, b"STARTTLS\r\n"), replies.TLS_ALREADY.to_bytes())
        self.assertEqual(transport.tls_started, [ctx])

    def test_starttls_resets_transaction(self) -> None:
        """STARTTLS inside a transaction ends it (on_reset)."""
        proto, transport, handler = self.connect(tls=tls_context())
        self.start_transaction(proto, transport)
        self.assertEqual(self.talk(proto, transport, b"STARTTLS\r\n"), replies.READY_TLS.to_bytes())
        self.assertEqual(handler.resets, ["STARTTLS"])
        self.assertIsNone(proto.txn)

    def test_starttls_injection_split_reads(self) -> None:
        """Commands pipelined after STARTTLS in the same read never reach the handler, even a whole transaction."""
        proto, transport, handler = self.connect(tls=tls_context())
        out = self.talk(proto, transport, b"EHLO c.example\r\nSTARTTLS\r\nEHLO c.example\r\n"
                                          b"MAIL FROM:<a@c.example>\r\nRCPT TO:<b@example.com>\r\n")
        self.assertEqual(codes(out), [250, 220])
        self.assertEqual(handler.calls, ["connect", "capabilities"])

    def test_starttls_handshake_timeout(self) -> None:
        """After STARTTLS the handshake must finish within timeouts.tls_handshake."""
        config = tuned(timeouts={"tls_handshake": 7.0})
        proto, transport, handler = self.connect(config=config, tls=tls_context())
        self.talk(proto, transport, b"EHLO c.example\r\nSTARTTLS\r\n")
        transport.clear()
        self.clock.advance(7)
        self.assertEqual(transport.value(), replies.TIMEOUT.to_bytes())

    def test_starttls_without_context(self) -> None:
        """STARTTLS without a TLS context gets 454 4.7.0 and TLS is not started."""
        proto, transport, handler = self.connect()
        out = self.talk(proto, transport, b"EHLO c.example\r\nSTARTTLS\r\n")
        self.assertEqual(split_replies(out)[-1], replies.TLS_NOT_AVAILABLE.to_bytes())
        self.assertEqual(transport.tls_started, [])

    def test_starttls_with_argument(self) -> None:
        """STARTTLS with an argument gets 501 and TLS is not started."""
        proto, transport, handler = self.connect(tls=tls_context())
        self.assertEqual(codes(self.talk(proto, transport, b"STARTTLS now\r\n")), [501])
        self.assertEqual(transport.tls_started, [])


# --- one command in flight, flow control, chunking -----------------------------------

class PipeliningTests(ServerTestCase):

    def test_one_command_in_flight(self) -> None:
        """Pipelined MAIL, RCPT, DATA and message wait in order until each pending decision fires."""
        handler = RecordingHandler(deferred=True)
        proto, transport, handler = self.connect(handler=handler)
        out = self.talk(proto, transport, b"EHLO c.example\r\nMAIL FROM:<a@c.example>\r\nRCPT TO:<r1@example.com>\r\n"
                                          b"RCPT TO:<r2@example.com>\r\nDATA\r\nbody\r\n.\r\nQUIT\r\n")
        self.assertEqual(codes(out), [250])
        self.assertEqual(handler.calls, ["connect", "capabilities", "mail"])
        transport.clear()
        self.assertEqual(handler.fire(), "mail")
        self.assertEqual(transport.value(), replies.SENDER_OK.to_bytes())
        self.assertEqual(handler.calls[-1], "rcpt")
        self.assertEqual(handler.rcpts, ["r1@example.com"])
        transport.clear()
        self.assertEqual(handler.fire(), "rcpt")
        self.assertEqual(transport.value(), replies.RECIPIENT_OK.to_bytes())
        self.assertEqual(handler.rcpts, ["r1@example.com", "r2@example.com"])
        transport.clear()
        self.assertEqual(handler.fire(), "rcpt")
        self.assertEqual(split_replies(transport.value()), [replies.RECIPIENT_OK.to_bytes(), replies.START_DATA.to_bytes()])
        self.assertEqual(handler.calls[-1], "data_end")
        self.assertFalse(transport.disconnecting)
        transport.clear()
        self.assertEqual(handler.fire(), "data_end")
        self.assertEqual(codes(transport.value()), [250, 221])
        self.assertEqual(handler.messages, [b"body\r\n"])
        self.assertTrue(transport.disconnecting)

    def test_commands_wait_across_reads(self) -> None:
        """Commands that arrive in later reads while a decision is pending also wait, and are answered in order."""
        handler = RecordingHandler(deferred=True)
        proto, transport, handler = self.connect(handler=handler)
        self.talk(proto, transport, b"EHLO c.example\r\nMAIL FROM:<a@c.example>\r\n")
        transport.clear()
        proto.dataReceived(b"NOOP\r\n")
        proto.dataReceived(b"RCPT TO:<r@example.com>\r\n")
        proto.dataReceived(b"NOOP\r\n")
        self.assertEqual(transport.value(), b"")
        handler.fire()
        self.assertEqual(split_replies(transport.value()), [replies.SENDER_OK.to_bytes(), replies.NOOP_OK.to_bytes()])
        transport.clear()
        handler.fire()
        self.assertEqual(split_replies(transport.value()), [replies.RECIPIENT_OK.to_bytes(), replies.NOOP_OK.to_bytes()])

    def test_large_pipelined_input_pauses_reading(self) -> None:
        """While a decision is pending, more than PIPELINE_BUFFER bytes of input pause reading; it resumes once they are handled."""
        handler = RecordingHandler(deferred=True)
        proto, transport, handler = self.connect(handler=handler)
        self.talk(proto, transport, b"EHLO c.example\r\nMAIL FROM:<a@c.example>\r\n")
        self.assertEqual(transport.producerState, "producing")
        chunk = b"NOOP\r\n" * 1000
        for _ in range(PIPELINE_BUFFER // len(chunk) + 2):
            proto.dataReceived(chunk)
        self.assertEqual(transport.producerState, "paused")
        transport.clear()
        handler.fire()
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(len(proto._buffer), 0)
        self.assertEqual(codes(transport.value())[:2], [250, 250])

    def test_resumes_when_buffer_ends_mid_line(self) -> None:
        """Paused reading resumes once the backlog is handled, even when the buffer ends in half a command line."""
        handler = RecordingHandler(deferred=True)
        proto, transport, handler = self.connect(handler=handler)
        self.talk(proto, transport, b"EHLO c.example\r\nMAIL FROM:<a@c.example>\r\n")
        proto.dataReceived(b"NOOP\r\n" * (PIPELINE_BUFFER // 6 + 10) + b"RCPT TO:<r@exa")
        self.assertEqual(transport.producerState, "paused")
        handler.fire()
        self.assertEqual(bytes(proto._buffer), b"RCPT TO:<r@exa")
        self.assertEqual(transport.producerState, "producing")

    def test_resumes_in_data(self) -> None:
        """Paused reading resumes when the backlog turns out to be message data still without its terminator."""
        handler = RecordingHandler(deferred=True)
        proto, transport, handler = self.connect(handler=handler)
        self.talk(proto, transport, b"EHLO c.example\r\nMAIL FROM:<a@c.example>\r\n")
        proto.dataReceived(b"RCPT TO:<r@example.com>\r\nDATA\r\n" + b"x" * 70 + b"\r\n")
        for _ in range(PIPELINE_BUFFER // 7200 + 2):
            proto.dataReceived((b"x" * 70 + b"\r\n") * 100)
        self.assertEqual(transport.producerState, "paused")
        handler.fire()
        handler.fire()
        self.assertIs(proto.state, SessionState.DATA)
        self.assertEqual(transport.producerState, "producing")

    def test_pause_holds_while_next_decision_pending(self) -> None:
        """Reading stays paused while a later pending decision still holds more than half the buffer."""
        handler = RecordingHandler(deferred=True)
        proto, transport, handler = self.connect(handler=handler)
        self.talk(proto, transport, b"EHLO c.example\r\nMAIL FROM:<a@c.example>\r\n")
        proto.dataReceived(b"RCPT TO:<r@example.com>\r\n" + b"NOOP\r\n" * (PIPELINE_BUFFER // 6 + 10))
        self.assertEqual(transport.producerState, "paused")
        handler.fire()  # MAIL answered; RCPT now pending with the NOOPs behind it
        self.assertEqual(transport.producerState, "paused")
        handler.fire()
        self.assertEqual(transport.producerState, "producing")


CONVERSATION = (
    b"EHLO client.example\r\n"
    b"MAIL FROM:<sender@client.example> SIZE=100\r\n"
    b"RCPT TO:<one@example.com>\r\n"
    b"RCPT TO:<refused@example.com>\r\n"
    b"RCPT TO:<two@example.com>\r\n"
    b"DATA\r\n"
    b"Subject: test\r\n\r\n..leading dot\r\n..\r\nx\r\n\r\n.\r\n"
    b"NOOP\r\n"
    b"VRFY x\r\n"
    b"XYZZY\r\n"
    b"MAIL FROM:<>\r\n"
    b"RCPT TO:<three@example.com>\r\n"
    b"RSET\r\n"
    b"HELP\r\n"
    b"QUIT\r\n"
)


class ChunkingTests(ServerTestCase):

    def run_conversation(self, chunks: list[bytes]) -> tuple[bytes, RecordingHandler]:
        handler = RecordingHandler()
        handler.replies_for["refused@example.com"] = replies.RELAY_DENIED
        proto, transport, handler = self.connect(handler=handler, greet=False)
        for c in chunks:
            proto.dataReceived(c)
        return transport.value(), handler

    def test_one_byte_at_a_time(self) -> None:
        """Feeding the whole conversation one byte at a time gives the same replies and message as one chunk."""
        whole, h1 = self.run_conversation([CONVERSATION])
        self.assertEqual(codes(whole), [220, 250, 250, 250, 554, 250, 354, 250, 250, 252, 500, 250, 250, 250, 214, 221])
        bytewise, h2 = self.run_conversation([CONVERSATION[i:i + 1] for i in range(len(CONVERSATION))])
        self.assertEqual(bytewise, whole)
        self.assertEqual(h2.messages, h1.messages)
        self.assertEqual(h1.messages, [b"Subject: test\r\n\r\n.leading dot\r\n.\r\nx\r\n\r\n"])

    def test_odd_chunk_sizes(self) -> None:
        """Odd chunk sizes give the same replies as one chunk."""
        whole, h1 = self.run_conversation([CONVERSATION])
        for size in (2, 3, 5, 7, 11, 13, 64, 100):
            chunks = [CONVERSATION[i:i + size] for i in range(0, len(CONVERSATION), size)]
            out, h2 = self.run_conversation(chunks)
            self.assertEqual(out, whole, size)
            self.assertEqual(h2.messages, h1.messages, size)


# --- failures and disconnects -------------------------------------------------------

class HandlerFailureTests(ServerTestCase):

    def run_failing(self, hook: str, data: bytes) -> tuple[bytes, RecordingHandler, SMTPServerProtocol]:
        proto, transport, handler = self.connect(handler=RecordingHandler(raise_in=hook))
        out = self.talk(proto, transport, data)
        self.assertEqual(len(self.flushLoggedErrors(Boom)), 1)
        return out, handler, proto

    def test_mail_failure(self) -> None:
        """An exception in on_mail gets 451 4.3.0, never 250, and no transaction starts."""
        out, handler, proto = self.run_failing("mail", b"EHLO c.example\r\nMAIL FROM:<a@c.example>\r\n")
        self.assertEqual(split_replies(out)[-1], replies.LOCAL_ERROR.to_bytes())
        self.assertEqual((replies.LOCAL_ERROR.code, replies.LOCAL_ERROR.enhanced), (451, "4.3.0"))
        self.assertIsNone(proto.txn)

    def test_rcpt_failure(self) -> None:
        """An exception in on_rcpt gets 451 4.3.0 and the recipient is not kept."""
        out, handler, proto = self.run_failing("rcpt", b"EHLO c.example\r\nMAIL FROM:<a@c.example>\r\n"
                                                       b"RCPT TO:<b@example.com>\r\nDATA\r\n")
        self.assertEqual(split_replies(out)[2:], [replies.LOCAL_ERROR.to_bytes(), Reply(554, "5.5.1", "No valid recipients").to_bytes()])

    def test_data_end_failure(self) -> None:
        """An exception in on_data_end gets 451 4.3.0 and the session is ready for a new transaction."""
        out, handler, proto = self.run_failing("data_end", b"EHLO c.example\r\nMAIL FROM:<a@c.example>\r\n"
                                                           b"RCPT TO:<b@example.com>\r\nDATA\r\nhi\r\n.\r\n")
        self.assertEqual(split_replies(out)[-1], replies.LOCAL_ERROR.to_bytes())
        self.assertIs(proto.state, SessionState.MAIL)
        self.assertIsNone(proto.txn)

    def test_capabilities_failure(self) -> None:
        """An exception while answering EHLO gets 451 4.3.0 and the client is not greeted."""
        out, handler, proto = self.run_failing("capabilities", b"EHLO c.example\r\n")
        self.assertEqual(out, replies.LOCAL_ERROR.to_bytes())
        self.assertIs(proto.state, SessionState.READY)

    def test_pending_decision_fails_later(self) -> None:
        """A pending decision that fails later also gets 451 4.3.0, and the waiting commands then run."""
        proto, transport, handler = self.connect(handler=RecordingHandler(deferred=True))
        self.talk(proto, transport, b"EHLO c.example\r\nMAIL FROM:<a@c.example>\r\nNOOP\r\n")
        transport.clear()
        handler.waiting.pop(0)[1].errback(Boom("late"))
        self.assertEqual(len(self.flushLoggedErrors(Boom)), 1)
        self.assertEqual(split_replies(transport.value()), [replies.LOCAL_ERROR.to_bytes(), replies.NOOP_OK.to_bytes()])


class DisconnectTests(ServerTestCase):

    def test_disconnect_during_data(self) -> None:
        """A client that disconnects during DATA gets its transaction reset with a reason, and nothing reaches on_data_end."""
        proto, transport, handler = self.connect()
        self.start_transaction(proto, transport)
        self.talk(proto, transport, b"DATA\r\nhalf a mess")
        proto.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(handler.resets, ["client disconnected during DATA"])
        self.assertEqual(handler.calls[-2:], ["reset", "disconnect"])
        self.assertNotIn("data_end", handler.calls)
        self.assertIsNone(proto.txn)

    def test_disconnect_in_transaction(self) -> None:
        """A client that disconnects after RCPT gets its transaction reset, then on_disconnect."""
        proto, transport, handler = self.connect()
        self.start_transaction(proto, transport)
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(handler.resets, ["client disconnected"])
        self.assertEqual(handler.disconnected, 1)

    def test_disconnect_idle(self) -> None:
        """An idle disconnect calls on_disconnect once, no on_reset, and frees the connection slot."""
        counter = ConnectionCounter()
        proto, transport, handler = self.connect(counter=counter)
        self.assertEqual(counter.total, 1)
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(handler.resets, [])
        self.assertEqual(handler.disconnected, 1)
        self.assertEqual(counter.total, 0)
        self.assertEqual([c for c in self.clock.getDelayedCalls() if c.active()], [])

    def test_disconnect_while_decision_pending(self) -> None:
        """When a pending decision fires after the client left, nothing more is written."""
        proto, transport, handler = self.connect(handler=RecordingHandler(deferred=True))
        self.talk(proto, transport, b"EHLO c.example\r\nMAIL FROM:<a@c.example>\r\nNOOP\r\n")
        proto.connectionLost(Failure(ConnectionDone()))
        transport.clear()
        handler.fire()
        self.assertEqual(transport.value(), b"")

    def test_disconnect_while_data_end_pending(self) -> None:
        """A client that leaves while on_data_end is pending does not pull the spool from under the handler: the message stays readable until the decision is made."""
        proto, transport, handler = self.connect(handler=RecordingHandler(deferred=True))
        self.talk(proto, transport, b"EHLO c.example\r\nMAIL FROM:<a@c.example>\r\n")
        handler.fire()
        self.talk(proto, transport, b"RCPT TO:<b@example.com>\r\n")
        handler.fire()
        self.talk(proto, transport, b"DATA\r\nthe message\r\n.\r\n")
        self.assertEqual(handler.calls[-1], "data_end")
        proto.connectionLost(Failure(ConnectionLost()))
        handler.fire()
        self.flushLoggedErrors(AssertionError)
        self.assertEqual(handler.read_errors, [])
        self.assertEqual(handler.messages, [b"the message\r\n"])
