"""The backend SMTP client: one connection to the MTA behind the proxy.

Stage: relay.  The lockstep forwarder sends one command at a time and hands
the backend's reply (code, enhanced code, text) back to the client.  Every
wait has a timeout from RFC 5321 4.5.3.2; a lost connection, a timeout or a
421 become ``BackendError`` carrying the 4xx reply the client should get
(docs/design.md promise 1: the client keeps its message).
"""
from __future__ import annotations

import ipaddress
from collections import deque
from typing import Any, Callable, Optional

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer  # type: ignore[import-untyped]  # no stubs or py.typed

from mppproxy._transitions import StateEnum, TransitionError
from mppproxy._wire import send_now
from mppproxy.config.schema import BackendConfig
from mppproxy.logsetup import Logger
from mppproxy.smtp import replies
from mppproxy.smtp.framing import dot_stuff
from mppproxy.smtp.replies import Reply, parse_reply_lines

log = Logger()

# A backend reply longer than this is not SMTP; RFC 5321 4.5.3.1.5 allows
# 512 octets per reply line, and we allow generous multi-line replies.
MAX_REPLY_BYTES = 65536
# Message data is written to the backend in blocks of about this size.
SEND_BLOCK = 65536


class BackendError(Exception):
    """The backend could not be used; ``reply`` is what the client gets."""

    def __init__(self, reply: Reply, detail: str = ""):
        super().__init__(detail or str(reply))
        self.reply = reply
        self.detail = detail or str(reply)


def _is_reply_line(line: bytes) -> bool:
    """RFC 5321 4.2: a reply line is a code 2yz-5yz, then SP, "-" or the end."""
    return (len(line) >= 3 and line[:3].isdigit() and line[:1] in b"2345"
            and line[3:4] in (b"", b" ", b"-"))


# Parsed one-line replies by their bytes on the wire; Reply is immutable, so
# one object serves every connection.  Bounded: replies that are unique
# (queue ids) only ever cost a miss.
_REPLY_CACHE: dict[bytes, Reply] = {}
_REPLY_CACHE_SIZE = 256


def _single_line_reply(data: bytes) -> Optional[Reply]:
    """The reply if ``data`` is exactly one final reply line, else None
    (a continuation line, or garbage, goes the general way)."""
    line = data[:-1].rstrip(b"\r")
    if not _is_reply_line(line) or line[3:4] == b"-":
        return None
    reply = parse_reply_lines([line])
    if len(_REPLY_CACHE) >= _REPLY_CACHE_SIZE:
        _REPLY_CACHE.clear()
    _REPLY_CACHE[data] = reply
    return reply


class ClientState(StateEnum):
    """Where one backend connection stands (``BackendProtocol.state``).

    - ``CONNECTING``: built, not connected yet; nothing can be sent.
      ``connectionMade`` moves it to OPEN; a failed connect (``abort``) to
      CLOSED.
    - ``OPEN``: connected; commands go out one at a time in lockstep, each
      waiting for its reply (``_waiting`` holds the one in flight; a command
      issued meanwhile is queued).  A 354 to DATA moves it to BODY.
    - ``BODY``: the message content is being written, from the 354 to the
      final reply; queued commands wait (they would land inside the
      message).  The final reply, or the content failing, moves it back to
      OPEN.
    - ``CLOSED``: QUIT sent (``close``), aborted, or the backend hung up.
      Every command fails with a ``BackendError`` carrying a 4xx.  Final;
      closing again (an abort after the backend hung up) is harmless.

    ``_move_to`` checks each move against ``_CLIENT_MOVES``.
    """

    CONNECTING = "connecting"
    OPEN = "open"
    BODY = "body"
    CLOSED = "closed"


_CLIENT_MOVES: dict[ClientState, frozenset[ClientState]] = {
    ClientState.CONNECTING: frozenset({ClientState.OPEN, ClientState.CLOSED}),
    ClientState.OPEN: frozenset({ClientState.BODY, ClientState.CLOSED}),
    ClientState.BODY: frozenset({ClientState.OPEN, ClientState.CLOSED}),
    ClientState.CLOSED: frozenset({ClientState.CLOSED}),
}
# Module-level names: the hot path compares states without a class lookup.
_OPEN, _BODY, _CLOSED = ClientState.OPEN, ClientState.BODY, ClientState.CLOSED


@implementer(IPushProducer)
class BackendProtocol(Protocol):
    """Reads replies and matches them to the one command in flight; its
    life is a ``ClientState``."""

    # A TCP transport (producer, STARTTLS, abortConnection); Any: mypy reads
    # zope interfaces' methods without self.
    transport: Any

    def __init__(self, reactor: Any):
        self.reactor = reactor
        self._buf = bytearray()
        self._lines: list[bytes] = []
        self._waiting: Optional[Deferred[Reply]] = None
        self._timer: Any = None
        self._awaited: str | bytes = ""
        self._paused: Optional[Deferred[None]] = None
        self._connected: Deferred[None] = Deferred()
        self.state = ClientState.CONNECTING
        self._queue: deque[tuple[bytes, float, Deferred[Reply]]] = deque()
        self.extensions: dict[str, str] = {}
        self.greeting: Optional[Reply] = None
        self.tls = False
        # The session this connection was handed to with XCLIENT, if any.
        self.xclient_for: Optional[str] = None
        # Called once when the connection is gone (the pool counts its
        # open connections for the metrics, relay/pool.py).
        self.on_lost: Optional[Callable[[], None]] = None

    def _move_to(self, new: ClientState) -> None:
        if new not in _CLIENT_MOVES[self.state]:
            raise TransitionError(self, self.state, new)
        self.state = new

    # -- transport events ------------------------------------------------------

    def connectionMade(self) -> None:
        self._move_to(_OPEN)
        if hasattr(self.transport, "setTcpNoDelay"):
            self.transport.setTcpNoDelay(True)
        self.transport.registerProducer(self, True)

    def dataReceived(self, data: bytes) -> None:
        if not self._buf and not self._lines:
            # Nearly every read is one whole one-line reply ("250 2.1.0 Ok"),
            # and most are the same few texts again and again.
            reply = _REPLY_CACHE.get(data)
            if reply is None and data.find(b"\n") == len(data) - 1:
                reply = _single_line_reply(data)
            if reply is not None:
                self._deliver(reply)
                return
        self._buf += data
        while True:
            end = self._buf.find(b"\n")
            if end < 0:
                if len(self._buf) > MAX_REPLY_BYTES:
                    self._fail(BackendError(replies.BACKEND_LOST, "backend sent an over-long line"))
                return
            line = bytes(self._buf[:end]).rstrip(b"\r")
            del self._buf[:end + 1]
            if not _is_reply_line(line):
                self._fail(BackendError(replies.BACKEND_LOST, f"backend sent garbage: {line[:80]!r}"))
                return
            self._lines.append(line)
            if line[3:4] == b"-":
                if sum(map(len, self._lines)) > MAX_REPLY_BYTES:
                    self._fail(BackendError(replies.BACKEND_LOST, "backend reply too long"))
                    return
                continue
            reply = parse_reply_lines(self._lines)
            self._lines = []
            self._deliver(reply)

    def discard_input(self) -> None:
        del self._buf[:]
        self._lines = []

    def connectionLost(self, reason: Optional[Failure] = None) -> None:
        self._move_to(_CLOSED)
        if self.on_lost is not None:
            lost, self.on_lost = self.on_lost, None
            lost()
        self._cancel_timer()
        if self._paused is not None:
            paused, self._paused = self._paused, None
            paused.callback(None)
        if self._waiting is not None:
            waiting, self._waiting = self._waiting, None
            waiting.errback(BackendError(replies.BACKEND_LOST, "backend closed the connection"))
        self._send_next()  # fails what is still queued

    # IPushProducer: the transport tells us when its write buffer is full, so
    # a large message is read from the spool only as fast as the backend takes it.
    def pauseProducing(self) -> None:
        if self._paused is None:
            self._paused = Deferred()

    def resumeProducing(self) -> None:
        if self._paused is not None:
            d, self._paused = self._paused, None
            d.callback(None)

    def stopProducing(self) -> None:
        self.resumeProducing()

    # -- replies ---------------------------------------------------------------

    def _deliver(self, reply: Reply) -> None:
        if self._waiting is None:
            # An unsolicited reply: most often a 421 from an idle backend
            # that is about to close.  This connection is finished.
            log.info("backend said {reply} unasked; closing", reply=str(reply))
            self.close()
            return
        # The reply timer stays armed: the next expect() resets it, which
        # is cheaper than cancelling and scheduling one per command; if it
        # fires with nothing awaited it does nothing.
        d, self._waiting = self._waiting, None
        d.callback(reply)
        self._send_next()

    def _fail(self, error: BackendError) -> None:
        log.warn("backend protocol error: {detail}", detail=error.detail)
        self._cancel_timer()
        if self._waiting is not None:
            d, self._waiting = self._waiting, None
            d.errback(error)
        self.abort()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self, what: str) -> None:
        self._fail(BackendError(replies.BACKEND_TIMEOUT, f"backend timed out waiting for {what}"))

    def _reply_timer_fired(self) -> None:
        self._timer = None
        if self._waiting is not None:
            what = self._awaited
            if isinstance(what, bytes):
                # A command line: named by its verb only when it timed out.
                what = what.split(b" ", 1)[0].decode("ascii", "replace")
            self._timed_out(what)

    def expect(self, timeout: float, what: str | bytes) -> Deferred[Reply]:
        """The next reply, or a BackendError after ``timeout`` seconds.
        ``what`` names what is awaited, or is the command line sent."""
        if self.state is not _OPEN and self.state is not _BODY:
            if self.state is _CLOSED:
                return defer.fail(BackendError(replies.BACKEND_LOST, "backend connection is closed"))
            return defer.fail(BackendError(replies.LOCAL_ERROR, "backend not connected yet"))
        if self._waiting is not None:
            return defer.fail(BackendError(replies.LOCAL_ERROR, "two backend commands in flight"))
        self._waiting = Deferred()
        self._awaited = what
        if self._timer is not None and self._timer.active():
            self._timer.reset(timeout)
        else:
            self._timer = self.reactor.callLater(timeout, self._reply_timer_fired)
        return self._waiting

    def command(self, line: bytes, timeout: float) -> Deferred[Reply]:
        """Send one command and return its reply.  Commands issued while
        another is in flight (an RSET sent without waiting, then the next
        MAIL) are queued and sent in order, one at a time (lockstep)."""
        state = self.state
        if state is _OPEN and self._waiting is None and not self._queue:
            # Nothing ahead of it: send at once.
            d = self.expect(timeout, line)
            send_now(self.transport, line + b"\r\n")
            return d
        if state is not _OPEN and state is not _BODY:
            return self.expect(timeout, line)  # CLOSED or CONNECTING: its failure
        d = Deferred()
        self._queue.append((line, timeout, d))
        self._send_next()
        return d

    def _send_next(self) -> None:
        while self._queue and self._waiting is None and self.state is not _BODY:
            line, timeout, d = self._queue.popleft()
            if self.state is _CLOSED:
                d.errback(BackendError(replies.BACKEND_LOST, "backend connection is closed"))
                continue
            self.expect(timeout, line).chainDeferred(d)
            send_now(self.transport, line + b"\r\n")

    async def send_message(self, chunks: Any, config: BackendConfig,
                           abandoned: Callable[[], bool] = lambda: False) -> tuple[Reply, bool]:
        """DATA, the dot-stuffed content, and the final reply, and whether the
        content was sent (False: the DATA command itself was refused).
        ``chunks`` yields the content with CRLF line ends (RFC 5321 4.5.2)."""
        reply = await self.command(b"DATA", config.data_init_timeout)
        if reply.code != 354:
            return reply, False
        self._move_to(_BODY)
        try:
            return await self._send_body(chunks, config, abandoned), True
        finally:
            if self.state is _BODY:
                self._move_to(_OPEN)
            self._send_next()

    async def _send_body(self, chunks: Any, config: BackendConfig,
                         abandoned: Callable[[], bool]) -> Reply:
        at_line_start = True
        carry = b""
        last = b"\r\n"
        # Small pieces (our Received: header, a short message, the final dot)
        # go out in one send: on loopback each send costs ~20 us of CPU.
        pending: list[bytes] = []
        pending_len = 0
        for chunk in chunks:
            data = carry + chunk
            # Stuff only whole lines, so "\r\n." is never split between chunks.
            cut = data.rfind(b"\r\n") + 2
            if cut < 2:
                carry = data
                if len(carry) < SEND_BLOCK:
                    continue
                cut = len(data)
            carry = data[cut:]
            out = dot_stuff(data[:cut], at_line_start)
            at_line_start = data[cut - 2:cut] == b"\r\n"
            last = out[-2:]
            pending.append(out)
            pending_len += len(out)
            if pending_len < SEND_BLOCK:
                continue
            send_now(self.transport, b"".join(pending))
            pending, pending_len = [], 0
            if self._paused is not None:
                await self._wait_resume(config.data_block_timeout)
            if self.state is _CLOSED:
                raise BackendError(replies.BACKEND_LOST, "backend closed the connection during DATA")
        if carry:
            out = dot_stuff(carry, at_line_start)
            pending.append(out)
            last = out[-2:]
        if abandoned():
            # Without the final dot the backend discards the message.
            self.abort()
            raise BackendError(replies.BACKEND_LOST, "client left before the end of data; message abandoned")
        # A message always ends in CRLF before the dot (RFC 5321 4.1.1.4).
        pending.append(b".\r\n" if last == b"\r\n" else b"\r\n.\r\n")
        send_now(self.transport, b"".join(pending))
        return await self.expect(config.data_done_timeout, "end of data")

    async def _wait_resume(self, timeout: float) -> None:
        paused = self._paused
        if paused is None:
            return
        timer = self.reactor.callLater(timeout, self._timed_out, "data block")
        try:
            await paused
        finally:
            if timer.active():
                timer.cancel()

    def close(self) -> None:
        """Polite close: QUIT and let the backend hang up."""
        if self.state is not _CLOSED and self.transport is not None:
            self._move_to(_CLOSED)
            self.transport.write(b"QUIT\r\n")
            # Over TLS the close (close_notify) starts only once no producer
            # is registered (twisted.protocols.tls): ours would hold the
            # connection open until the server timed it out.
            self.transport.unregisterProducer()
            self.transport.loseConnection()

    def abort(self) -> None:
        self._move_to(_CLOSED)
        if self.transport is not None:
            self.transport.abortConnection()


class _OneConnection(Factory):
    """Hands out one prepared protocol; quiet, unlike connectProtocol's
    factory, which logs twice per backend connection."""

    noisy = False

    def __init__(self, proto: BackendProtocol):
        self.proto = proto

    def buildProtocol(self, addr: Any) -> BackendProtocol:
        return self.proto


def _endpoint(reactor: Any, config: BackendConfig) -> Any:
    try:
        ip = ipaddress.ip_address(config.host)
    except ValueError:
        return HostnameEndpoint(reactor, config.host.encode("idna"), config.port,
                                timeout=config.connect_timeout)
    cls = TCP4ClientEndpoint if ip.version == 4 else TCP6ClientEndpoint
    return cls(reactor, config.host, config.port, timeout=config.connect_timeout)


def parse_ehlo(reply: Reply) -> dict[str, str]:
    """Extension keywords (upper case) and their parameters from an EHLO
    reply (RFC 5321 4.1.1.1: the first line is the greeting)."""
    exts = {}
    for line in reply.lines()[1:]:
        word, _, rest = line.strip().partition(" ")
        if word:
            exts[word.upper()] = rest
    return exts


async def connect_backend(reactor: Any, config: BackendConfig, helo_name: str,
                          tls_context_factory: Any = None) -> BackendProtocol:
    """Open a connection, read the greeting, EHLO, STARTTLS if configured.

    Raises BackendError with a 4xx reply for the client when anything fails."""
    proto = BackendProtocol(reactor)
    try:
        await _endpoint(reactor, config).connect(_OneConnection(proto))
    except Exception as e:  # every connect failure means the same to the client
        raise BackendError(replies.BACKEND_UNAVAILABLE, f"cannot connect to backend: {e}") from None
    try:
        greeting = await proto.expect(config.greeting_timeout, "greeting")
        proto.greeting = greeting
        if greeting.code != 220:
            raise BackendError(_as_transient(greeting), f"backend greeting: {greeting}")
        await _ehlo(proto, config, helo_name)
        if config.tls != "none":
            if "STARTTLS" in proto.extensions and tls_context_factory is not None:
                reply = await proto.command(b"STARTTLS", config.mail_timeout)
                if reply.code != 220 and config.tls == "opportunistic":
                    # Like Postfix's "may": no TLS is better than no mail.
                    log.warn("backend refused STARTTLS ({reply}); continuing without TLS",
                             reply=str(reply))
                    return proto
                if reply.code != 220:
                    raise BackendError(_as_transient(reply), f"backend refused STARTTLS: {reply}")
                # RFC 3207 4.2: nothing the backend sent before TLS counts;
                # bytes already buffered after its 220 are discarded, not
                # read as the reply to our EHLO inside TLS.
                proto.discard_input()
                proto.transport.startTLS(tls_context_factory)
                proto.tls = True
                await _ehlo(proto, config, helo_name)
            elif config.tls == "required":
                raise BackendError(Reply(451, "4.7.5", "Next-hop mail server does not offer TLS"),
                                   "backend offers no STARTTLS and backend.tls is required")
    except BaseException:
        proto.abort()
        raise
    return proto


async def _ehlo(proto: BackendProtocol, config: BackendConfig, helo_name: str) -> None:
    reply = await proto.command(b"EHLO " + helo_name.encode("idna"), config.mail_timeout)
    if reply.code == 250:
        proto.extensions = parse_ehlo(reply)
        return
    reply = await proto.command(b"HELO " + helo_name.encode("idna"), config.mail_timeout)
    if reply.code != 250:
        raise BackendError(_as_transient(reply), f"backend refused HELO: {reply}")
    proto.extensions = {}


def _as_transient(reply: Reply) -> Reply:
    """A session-level failure of the backend is never the client's fault:
    the client gets a 4xx and keeps its message (docs/design.md promise 1)."""
    if reply.is_transient and reply.code != 421:
        return reply
    return Reply(451, "4.4.0" if not reply.enhanced else "4" + reply.enhanced[1:],
                 f"Next-hop mail server said: {reply.text.splitlines()[0] if reply.text else reply.code}")
