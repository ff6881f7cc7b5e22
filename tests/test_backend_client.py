"""The backend client without sockets: reply parsing and the STARTTLS boundary."""
from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from mppproxy._transitions import TransitionError, unreachable
from mppproxy.config.schema import BackendConfig
from mppproxy.smtp.client import _CLIENT_MOVES, BackendError, BackendProtocol, ClientState


class _TLSRecordingTransport(StringTransport):
    def __init__(self) -> None:
        super().__init__()
        self.tls_started = False

    def startTLS(self, ctx: object) -> None:
        self.tls_started = True


class StartTLSBoundaryTests(SynchronousTestCase):
    def test_bytes_after_220_to_starttls_are_discarded(self) -> None:
        """Lines the backend sent after its 220 to STARTTLS, before TLS, are never taken
        as the reply to the next command (RFC 3207 4.2: response injection)."""
        clock = Clock()
        proto = BackendProtocol(clock)
        transport = _TLSRecordingTransport()
        proto.makeConnection(transport)
        got = []

        def started(reply: object) -> None:
            # What connect_backend does on 220 before startTLS.
            proto.discard_input()
            transport.startTLS(None)
            proto.command(b"EHLO proxy.test", 30).addCallback(got.append)

        proto.command(b"STARTTLS", 30).addCallback(started)
        proto.dataReceived(b"220 go ahead\r\n250 injected-ehlo\r\n")
        self.assertTrue(transport.tls_started)
        self.assertEqual(got, [])
        proto.dataReceived(b"250-real.backend\r\n250 SIZE 1000\r\n")
        self.assertEqual([r.code for r in got], [250])
        self.assertIn("SIZE 1000", got[0].text)

    def test_reply_codes_outside_2_to_5_are_a_protocol_error(self) -> None:
        """A reply code such as 600 or 199 fails the command instead of being relayed."""
        for bad in (b"600 what\r\n", b"199 hmm\r\n", b"25 short\r\n"):
            proto = BackendProtocol(Clock())
            proto.makeConnection(StringTransport())
            d = proto.command(b"NOOP", 30)
            proto.dataReceived(bad)
            self.failureResultOf(d)


class ReplyReadingTests(SynchronousTestCase):
    """Replies however the backend's bytes are cut into reads (the one-read,
    one-line fast path and the general line reader must agree)."""

    def connect(self) -> tuple[BackendProtocol, Clock]:
        clock = Clock()
        proto = BackendProtocol(clock)
        proto.makeConnection(StringTransport())
        return proto, clock

    def test_same_reply_in_any_cut(self) -> None:
        """One reply read whole, twice (the second from the cache), byte by byte, or with
        the next reply in the same read gives the same code, enhanced code and text."""
        wire = b"250 2.1.0 Sender <a@b> ok\r\n"
        for cuts in ([wire], [wire], [wire[i:i + 1] for i in range(len(wire))],
                     [wire[:5], wire[5:]]):
            proto, _ = self.connect()
            d = proto.command(b"MAIL FROM:<a@b>", 30)
            for piece in cuts:
                proto.dataReceived(piece)
            reply = self.successResultOf(d)
            self.assertEqual((reply.code, reply.enhanced, reply.text), (250, "2.1.0", "Sender <a@b> ok"))
        proto, _ = self.connect()
        first = proto.command(b"RSET", 30)
        second = proto.command(b"MAIL FROM:<a@b>", 30)
        proto.dataReceived(b"250 2.0.0 Ok\r\n" + wire)
        self.assertEqual(self.successResultOf(first).text, "Ok")
        self.assertEqual(self.successResultOf(second).text, "Sender <a@b> ok")

    def test_multiline_reply_in_one_read(self) -> None:
        """A read holding only the first line of a multi-line reply waits for the rest."""
        proto, _ = self.connect()
        d = proto.command(b"EHLO proxy.test", 30)
        proto.dataReceived(b"250-backend.test\r\n")
        self.assertNoResult(d)
        proto.dataReceived(b"250 PIPELINING\r\n")
        self.assertEqual(self.successResultOf(d).text, "backend.test\nPIPELINING")

    def test_garbage_line_in_one_read(self) -> None:
        """A whole line that is no reply fails the command and drops the connection."""
        proto, _ = self.connect()
        d = proto.command(b"NOOP", 30)
        proto.dataReceived(b"hello there\r\n")
        self.failureResultOf(d)
        self.assertIs(proto.state, ClientState.CLOSED)

    def test_timeout_names_the_command(self) -> None:
        """A command without a reply fails after its timeout, naming the command's verb."""
        proto, clock = self.connect()
        d = proto.command(b"RCPT TO:<a@b>", 30)
        clock.advance(30)
        self.assertIn("waiting for RCPT", self.failureResultOf(d).value.detail)


class ClientStateTests(SynchronousTestCase):
    """The backend connection's states (``ClientState``) and their table."""

    def test_table_covers_every_state_and_reaches_them_all(self) -> None:
        """Every ClientState has its row in the table, and each is reachable from CONNECTING."""
        self.assertEqual(set(_CLIENT_MOVES), set(ClientState))
        self.assertEqual(unreachable(_CLIENT_MOVES, ClientState.CONNECTING), set())
        self.assertEqual(_CLIENT_MOVES[ClientState.CLOSED], frozenset({ClientState.CLOSED}))

    def test_life_of_a_connection(self) -> None:
        """Connected is OPEN, a 354 to DATA makes it BODY until the final reply, close() makes it CLOSED."""
        proto = BackendProtocol(Clock())
        self.assertIs(proto.state, ClientState.CONNECTING)
        transport = StringTransport()
        proto.makeConnection(transport)
        self.assertIs(proto.state, ClientState.OPEN)
        sent = Deferred.fromCoroutine(proto.send_message(iter([b"x\r\n"]),
                                                         BackendConfig(host="127.0.0.1")))
        proto.dataReceived(b"354 go ahead\r\n")
        self.assertIs(proto.state, ClientState.BODY)
        queued = proto.command(b"RSET", 30)
        self.assertNotIn(b"RSET", transport.value())  # waits for the final reply
        proto.dataReceived(b"250 queued\r\n")
        self.assertIs(proto.state, ClientState.OPEN)
        self.assertEqual(self.successResultOf(sent)[0].code, 250)
        self.assertTrue(transport.value().endswith(b"RSET\r\n"))
        proto.dataReceived(b"250 reset\r\n")
        self.successResultOf(queued)
        proto.close()
        self.assertIs(proto.state, ClientState.CLOSED)
        proto.abort()  # closing again is harmless
        self.assertIs(proto.state, ClientState.CLOSED)

    def test_commands_before_connecting_or_after_closing_fail_with_4xx(self) -> None:
        """A command on a connection not yet made, or closed, fails with a BackendError carrying a 4xx."""
        proto = BackendProtocol(Clock())
        early = self.failureResultOf(proto.command(b"NOOP", 30), BackendError)
        self.assertEqual(early.value.reply.code // 100, 4)
        proto.makeConnection(StringTransport())
        proto.abort()
        late = self.failureResultOf(proto.command(b"NOOP", 30), BackendError)
        self.assertEqual(late.value.reply.code // 100, 4)

    def test_unexpected_event_is_loud(self) -> None:
        """A connection made again after it was closed raises TransitionError instead of reviving it."""
        proto = BackendProtocol(Clock())
        proto.makeConnection(StringTransport())
        proto.abort()
        with self.assertRaises(TransitionError):
            proto.connectionMade()
        self.assertIs(proto.state, ClientState.CLOSED)
