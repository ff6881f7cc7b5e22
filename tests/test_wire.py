"""send_now: immediate writes on idle TCP transports, ordinary writes otherwise."""
from __future__ import annotations

from twisted.internet import defer, protocol, reactor
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from mppproxy._wire import close_now, send_now


class _Collect(protocol.Protocol):
    def __init__(self, expected: int, done: defer.Deferred) -> None:
        self.data = bytearray()
        self.expected = expected
        self.done = done

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if self.expected and len(self.data) >= self.expected and not self.done.called:
            self.done.callback(bytes(self.data))

    def connectionLost(self, reason: object = None) -> None:
        if not self.done.called:
            self.done.callback(bytes(self.data))


class SendNowTests(unittest.TestCase):
    timeout = 30

    def test_other_transports_use_write(self) -> None:
        """A transport that is not plain TCP (here a StringTransport) gets an ordinary write."""
        t = StringTransport()
        send_now(t, b"250 OK\r\n")
        self.assertEqual(t.value(), b"250 OK\r\n")

    async def test_order_is_kept_when_the_kernel_buffer_fills(self) -> None:
        """Writes larger than the socket buffer, mixed with small ones, arrive whole and in order."""
        pieces = [bytes([65 + i % 26]) * (1 << (i % 21)) for i in range(60)]
        expected = b"".join(pieces)
        done: defer.Deferred = defer.Deferred()
        server_factory = protocol.Factory.forProtocol(lambda: _Collect(len(expected), done))
        port = reactor.listenTCP(0, server_factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = await protocol.ClientCreator(reactor, protocol.Protocol).connectTCP(
            "127.0.0.1", port.getHost().port)
        self.addCleanup(client.transport.loseConnection)
        for p in pieces:
            send_now(client.transport, p)
        received = await done
        self.assertEqual(received, expected)


class _FakeSocket:
    def __init__(self, takes: "int | BaseException") -> None:
        self.takes = takes
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> int:
        if isinstance(self.takes, BaseException):
            raise self.takes
        self.sent.append(bytes(data[:self.takes]))
        return min(self.takes, len(data))


class _IdleTCPLike(StringTransport):
    """What send_now reads of an idle tcp.Connection, over a fake socket."""

    TLS = False
    connected = True
    disconnecting = False
    _writeDisconnected = False
    _tempDataBuffer: list[bytes] = []
    offset = 0
    dataBuffer = b""

    def __init__(self, sock: _FakeSocket) -> None:
        super().__init__()
        self.socket = sock


class SendNowFallbackTests(unittest.SynchronousTestCase):
    def test_whole_send_skips_write(self) -> None:
        """What the kernel takes at once never goes through transport.write."""
        t = _IdleTCPLike(_FakeSocket(100))
        send_now(t, b"250 OK\r\n")
        self.assertEqual((t.socket.sent, t.value()), ([b"250 OK\r\n"], b""))

    def test_partial_send_writes_the_rest(self) -> None:
        """Bytes the kernel did not take are handed to transport.write, in order."""
        t = _IdleTCPLike(_FakeSocket(3))
        send_now(t, b"250 OK\r\n")
        self.assertEqual((t.socket.sent, t.value()), ([b"250"], b" OK\r\n"))

    def test_send_error_leaves_everything_to_write(self) -> None:
        """A full buffer or a reset: the whole reply goes to transport.write."""
        for error in (BlockingIOError(), ConnectionResetError()):
            t = _IdleTCPLike(_FakeSocket(error))
            send_now(t, b"250 OK\r\n")
            self.assertEqual(t.value(), b"250 OK\r\n")


class _ReplyAndClose(protocol.Protocol):
    """Answers the first read with a reply and closes at once, as QUIT does."""

    def __init__(self, closed_at_once: list) -> None:
        self.closed_at_once = closed_at_once
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        send_now(self.transport, b"221 2.0.0 bye\r\n")
        self.closed_at_once.append(close_now(self.transport) and self.lost)

    def connectionLost(self, reason: object = None) -> None:
        self.lost = True


class CloseNowTests(unittest.TestCase):
    timeout = 30

    def test_other_transports_are_left_to_loseConnection(self) -> None:
        """close_now does nothing to a transport that is not idle plain TCP."""
        t = StringTransport()
        self.assertFalse(close_now(t))
        self.assertFalse(t.disconnecting)

    async def test_reply_then_close_arrives_whole(self) -> None:
        """The client reads the whole last reply and then an orderly end of stream;
        the server's connectionLost has run when close_now returns."""
        closed_at_once: list = []
        done: defer.Deferred = defer.Deferred()
        port = reactor.listenTCP(0, protocol.Factory.forProtocol(lambda: _ReplyAndClose(closed_at_once)),
                                 interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = await protocol.ClientCreator(reactor, _Collect, 0, done).connectTCP(
            "127.0.0.1", port.getHost().port)
        client.transport.write(b"QUIT\r\n")
        received = await done
        self.assertEqual(received, b"221 2.0.0 bye\r\n")
        self.assertEqual(closed_at_once, [True])
