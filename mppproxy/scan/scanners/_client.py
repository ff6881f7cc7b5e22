"""What the stream scanners (clamd, spamd) share: one request and one reply
per connection, bounded, timed and retried.  (rspamd speaks HTTP through
Twisted's ``Agent`` and keeps the same rules in ``rspamd.py``.)

Stage: post-DATA scanning, a building block.  A scanner hands ``request``
the pieces of its request (an iterator of bytes, sent with flow control so
a 25 MB message is not copied into the socket buffer at once) and a
``parse`` function that turns the bytes received so far into a reply, or
None while the reply is incomplete.  It gets the reply back, or
``ScannerUnavailable`` with a reason for the log (docs/design.md promise 4).

* At most ``max_connections`` connections per engine at once; more scans
  wait for a slot (a ``DeferredSemaphore``), inside their timeout.
* ``timeout`` bounds the whole call: the wait for a slot, every attempt
  and the pauses between them.  A timeout is never retried.
* A refused connection, or one closed or reset before any reply byte
  arrived, is tried again up to ``retries`` times after ``retry_delay``
  seconds (scanning is idempotent; the engine may be restarting).  Once a
  reply byte has arrived nothing is retried: a half answer is a failure.
"""
from __future__ import annotations

import ipaddress
from typing import Any, Callable, Iterator, Optional

from twisted.internet import defer, error
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import (HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint,
                                        UNIXClientEndpoint)
from twisted.internet.interfaces import IPullProducer
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from zope.interface import implementer  # type: ignore[import-untyped]  # no stubs or py.typed

from mppproxy._async import as_deferred
from mppproxy.logsetup import Logger
from mppproxy.scan.base import DOWN, ERROR, GARBAGE, TIMEOUT, ScannerUnavailable
from mppproxy.config.scanners import parse_address

log = Logger()

# A pull producer writes at least this much per call, so many small pieces
# do not each cost a reactor turn.
WRITE_BATCH = 64 * 1024

# parse(received, eof) -> the reply, or None while incomplete; raises BadReply.
Parse = Callable[[bytes, bool], Any]


class BadReply(Exception):
    """The engine answered something we cannot read; the text says what."""


class _Closed(Exception):
    """The connection ended before the reply was complete."""

    def __init__(self, received: int, why: str):
        super().__init__(why)
        self.received = received
        self.why = why


class _Retryable(Exception):
    """A failure before any reply byte: another attempt may succeed."""


def _describe(reason: Failure) -> str:
    # isinstance on the value: what Failure.check tells, typed.
    value = reason.value
    if isinstance(value, error.ConnectionDone):
        return "connection closed"
    if isinstance(value, error.ConnectionLost):
        return "connection reset"
    return str(value) or type(value).__name__


@implementer(IPullProducer)
class _PieceProducer:
    """Writes the request's pieces as the transport drains (a pull
    producer), then unregisters itself.  A piece that cannot be produced
    (a spool file that vanished) aborts the connection with the error."""

    def __init__(self, transport: Any, pieces: Iterator[bytes], failed: Callable[[str], None],
                 half_close: bool):
        self._transport = transport
        self._pieces = pieces
        self._failed = failed
        self._half_close = half_close
        self.done = False

    def resumeProducing(self) -> None:
        if self.done:
            return
        written = 0
        while written < WRITE_BATCH:
            try:
                piece = next(self._pieces)
            except StopIteration:
                self.stop()
                if self._half_close:
                    self._transport.loseWriteConnection()
                return
            except (OSError, ValueError) as e:
                self.stop()
                self._failed(f"cannot read the message: {e}")
                return
            if piece:
                self._transport.write(piece)
                written += len(piece)

    def stopProducing(self) -> None:
        self.done = True

    def stop(self) -> None:
        if not self.done:
            self.done = True
            self._transport.unregisterProducer()


class _Exchange(Protocol):
    """One request, one reply.  ``done`` fires with ``parse``'s reply, or
    fails with _Closed, BadReply or ScannerUnavailable; cancelling it
    aborts the connection."""

    transport: Any

    def __init__(self, pieces: Iterator[bytes], parse: Parse, max_reply: int,
                 half_close: bool = False):
        self._pieces = pieces
        self._half_close = half_close
        self._parse = parse
        self._max_reply = max_reply
        self._buffer = bytearray()
        self._producer: Optional[_PieceProducer] = None
        self._local_failure: Optional[str] = None
        self._settled = False
        self.done: Deferred[Any] = Deferred(self._cancel)

    @property
    def received(self) -> int:
        return len(self._buffer)

    def connectionMade(self) -> None:
        self._producer = _PieceProducer(self.transport, self._pieces, self._write_failed,
                                        self._half_close)
        self.transport.registerProducer(self._producer, False)

    def dataReceived(self, data: bytes) -> None:
        if self._settled or self.done.called:
            return
        self._buffer += data
        if len(self._buffer) > self._max_reply:
            self._finish(failure=BadReply(f"reply longer than {self._max_reply} octets"))
            return
        try:
            reply = self._parse(bytes(self._buffer), False)
        except BadReply as e:
            self._finish(failure=e)
            return
        if reply is not None:
            self._finish(reply=reply)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._producer is not None:
            self._producer.done = True
        if self._settled or self.done.called:
            return
        if self._local_failure is not None:
            self.done.errback(ScannerUnavailable("", self._local_failure, ERROR))
            return
        try:
            reply = self._parse(bytes(self._buffer), True)
        except BadReply as e:
            self.done.errback(e)
            return
        if reply is not None:
            self.done.callback(reply)
        else:
            self.done.errback(_Closed(len(self._buffer), _describe(reason)))

    def _finish(self, reply: Any = None, failure: Optional[Exception] = None) -> None:
        # The reply may come before the request is all sent (clamd's size
        # limit answer): stop sending, then close.
        # Closing may call connectionLost at once (a half-closed
        # connection), so the outcome is settled first.
        self._settled = True
        if self._producer is not None and not self._producer.done:
            self._producer.stop()
        if failure is not None:
            self.transport.abortConnection()
            self.done.errback(failure)
        else:
            self.transport.loseConnection()
            self.done.callback(reply)

    def _write_failed(self, why: str) -> None:
        self._local_failure = why
        self.transport.abortConnection()

    def _cancel(self, _: Deferred[Any]) -> None:
        if self.transport is not None:
            self.transport.abortConnection()


class _OneProtocol(Factory):
    noisy = False   # one factory per engine connection: no start/stop log lines

    def __init__(self, proto: Protocol):
        self._proto = proto

    def buildProtocol(self, addr: Any) -> Protocol:
        return self._proto


class StreamClient:
    """Connections to one engine at ``address`` (``"tcp:HOST:PORT"`` or
    ``"unix:/path"``), for the scanner called ``name``.

    Construction does no I/O.  ``active`` is the number of connections open
    or being opened right now (never more than ``max_connections``).
    """

    @classmethod
    def for_settings(cls, name: str, reactor: Any, address: str, settings: Any) -> "StreamClient":
        """The client an engine's settings describe (``timeout``,
        ``connect_timeout``, ``max_connections``, ``retries``, ``retry_delay``)."""
        return cls(name, reactor, address, timeout=settings.timeout,
                   connect_timeout=settings.connect_timeout,
                   max_connections=settings.max_connections, retries=settings.retries,
                   retry_delay=settings.retry_delay)

    def __init__(self, name: str, reactor: Any, address: str, *, timeout: float,
                 connect_timeout: float, max_connections: int, retries: int,
                 retry_delay: float):
        self.name = name
        self.address = address
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.max_connections = max_connections
        self.retries = retries
        self.retry_delay = retry_delay
        self.active = 0
        self._reactor = reactor
        self._where = parse_address(address)
        self._slots = defer.DeferredSemaphore(max_connections)

    def endpoint(self) -> Any:
        kind, host, port = self._where
        if kind == "unix":
            return UNIXClientEndpoint(self._reactor, host, timeout=self.connect_timeout)  # type: ignore[no-untyped-call]  # Twisted's is unannotated
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return HostnameEndpoint(self._reactor, host, port, timeout=self.connect_timeout)
        cls = TCP6ClientEndpoint if ip.version == 6 else TCP4ClientEndpoint
        return cls(self._reactor, host, port, timeout=self.connect_timeout)

    async def request(self, pieces: Callable[[], Iterator[bytes]], parse: Parse,
                      max_reply: int, timeout: Optional[float] = None,
                      half_close: bool = False) -> Any:
        """Send ``pieces()`` and return ``parse``'s reply, within
        ``timeout`` (default: the client's) for everything, retries
        included.  ``pieces`` is called once per attempt.  ``half_close``
        shuts our side of the connection once the request is sent (spamd
        reads lines and waits for the end of a last line without one)."""
        limit = self.timeout if timeout is None else timeout
        d = as_deferred(self._attempts(pieces, parse, max_reply, half_close))
        d.addTimeout(limit, self._reactor)
        try:
            return await d
        except defer.TimeoutError:
            raise ScannerUnavailable(self.name, f"timeout after {limit:g}s "
                                     f"({self.address})", TIMEOUT) from None

    async def _attempts(self, pieces: Callable[[], Iterator[bytes]], parse: Parse,
                        max_reply: int, half_close: bool) -> Any:
        attempts = 1 + self.retries
        for attempt in range(1, attempts + 1):
            await self._slots.acquire()
            self.active += 1
            try:
                return await self._once(pieces(), parse, max_reply, half_close)
            except _Retryable as e:
                if attempt == attempts:
                    suffix = f" (after {attempts} attempts)" if attempts > 1 else ""
                    raise ScannerUnavailable(self.name, f"{e}{suffix}", DOWN) from None
                log.info("{scanner}: {why}; trying again ({attempt}/{attempts})",
                         scanner=self.name, why=str(e), attempt=attempt + 1, attempts=attempts)
            finally:
                self.active -= 1
                self._slots.release()
            if self.retry_delay > 0:
                await deferLater(self._reactor, self.retry_delay, lambda: None)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _once(self, pieces: Iterator[bytes], parse: Parse, max_reply: int,
                    half_close: bool) -> Any:
        exchange = _Exchange(pieces, parse, max_reply, half_close)
        try:
            await self.endpoint().connect(_OneProtocol(exchange))
        except (CancelledError, error.ConnectingCancelledError):
            # A timeout or the caller cancelled while connecting.
            raise CancelledError() from None
        except (error.ConnectError, OSError) as e:
            raise _Retryable(f"cannot connect to {self.address}: {_connect_error(e)}") from None
        try:
            return await exchange.done
        except _Closed as e:
            if e.received == 0:
                raise _Retryable(f"{e.why} before any reply ({self.address})") from None
            raise ScannerUnavailable(self.name, f"{e.why} mid-reply after {e.received} "
                                     f"octets ({self.address})", DOWN) from None
        except BadReply as e:
            raise ScannerUnavailable(self.name, f"bad reply: {e}", GARBAGE) from None
        except ScannerUnavailable as e:
            raise ScannerUnavailable(self.name, e.reason, e.kind) from None


def _connect_error(e: Exception) -> str:
    if isinstance(e, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, error.TimeoutError):
        return "connect timeout"
    text = str(e).strip()
    return text or type(e).__name__


def printable(data: bytes, limit: int = 80) -> str:
    """A reply fragment fit for a log line or a reason: ASCII, escaped, cut."""
    text = data[:limit].decode("ascii", "backslashreplace")
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text + ("..." if len(data) > limit else "")
