"""The backend client without sockets: reply parsing and the STARTTLS boundary."""
from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from mppproxy.smtp.client import BackendProtocol


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
