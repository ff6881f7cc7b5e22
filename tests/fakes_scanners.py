"""Fake scanner engines on loopback for tests/test_scanners.py.

``FakeEngine`` listens on 127.0.0.1 (or a Unix socket) in the test's
reactor and plays a script, one step per connection (the last step
repeats): answer, stay silent, close at once, answer after a delay, or hold
the answer until the test releases it.  It records every request and
counts connections, including the most open at once, so tests can prove
the connection bound and that no retry followed a partial answer.

``complete(request, eof)`` tells when a request has arrived whole: it
differs per protocol (clamd's zero-length chunk, spamd's Content-length or
half-close, an HTTP body).
"""
from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

from twisted.internet import reactor as _reactor
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.trial import unittest
from zope.interface import implementer

reactor: Any = _reactor


@dataclass(frozen=True)
class Reply:
    """Write ``data`` (when the request is whole), then close."""
    data: bytes
    close: bool = True


@dataclass(frozen=True)
class Delay:
    """Write ``data`` ``seconds`` after the request is whole, then close."""
    seconds: float
    data: bytes


@dataclass(frozen=True)
class Silent:
    """Read the request, never answer."""


@dataclass(frozen=True)
class CloseOnConnect:
    """Close as soon as the client connects, before reading anything."""
    abort: bool = False


@dataclass(frozen=True)
class Hold:
    """Keep the answer until the test calls ``release``."""


@dataclass(frozen=True)
class ReplyEarly:
    """Answer ``data`` and close after ``after`` octets of the request
    (clamd's size limit answer comes while the client is still sending)."""
    after: int
    data: bytes


Step = Union[Reply, Delay, Silent, CloseOnConnect, Hold, ReplyEarly]


@implementer(IHalfCloseableProtocol)
class _Conn(Protocol):
    def __init__(self, engine: "FakeEngine", step: Step):
        self.engine = engine
        self.step = step
        self.buffer = bytearray()
        self.answered = False
        self.eof = False

    def connectionMade(self) -> None:
        e = self.engine
        e.connections += 1
        e.open.append(self)
        e.peak = max(e.peak, len(e.open))
        if isinstance(self.step, CloseOnConnect):
            self.answered = True
            if self.step.abort:
                self.transport.abortConnection()
            else:
                self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        self._maybe_answer()

    def readConnectionLost(self) -> None:
        self.eof = True
        self._maybe_answer()

    def writeConnectionLost(self) -> None:
        pass

    def _maybe_answer(self) -> None:
        if self.answered:
            return
        step = self.step
        if isinstance(step, ReplyEarly):
            if len(self.buffer) >= step.after:
                self.answered = True
                self.engine.requests.append(bytes(self.buffer))
                self.transport.write(step.data)
                self.transport.loseConnection()
            return
        if not self.engine.complete(bytes(self.buffer), self.eof):
            return
        self.answered = True
        self.engine.requests.append(bytes(self.buffer))
        if isinstance(step, Reply):
            self.transport.write(step.data)
            if step.close:
                self.transport.loseConnection()
        elif isinstance(step, Delay):
            call = reactor.callLater(step.seconds, self._late, step.data)
            self.engine._calls.append(call)
        elif isinstance(step, Hold):
            self.engine.held.append(self)

    def _late(self, data: bytes) -> None:
        if self.transport.connected:
            self.transport.write(data)
            self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        if self in self.engine.open:
            self.engine.open.remove(self)
        if self in self.engine.held:
            self.engine.held.remove(self)


class FakeEngine(Factory):
    """A scripted engine; see the module docstring."""

    def __init__(self, complete: Callable[[bytes, bool], bool], script: Sequence[Step]):
        self.complete = complete
        self.script = list(script)
        self.connections = 0
        self.peak = 0
        self.open: list[_Conn] = []
        self.held: list[_Conn] = []
        self.requests: list[bytes] = []
        self._calls: list[Any] = []
        self.port: Any = None

    def buildProtocol(self, addr: Any) -> Protocol:
        index = min(self.connections, len(self.script) - 1)
        return _Conn(self, self.script[index])

    def release(self, data: bytes) -> int:
        """Answer every held request with ``data``; how many there were."""
        held = list(self.held)
        for conn in held:
            conn.transport.write(data)
            conn.transport.loseConnection()
        return len(held)

    def stop(self) -> Any:
        for call in self._calls:
            if call.active():
                call.cancel()
        for conn in list(self.open):
            conn.transport.abortConnection()
        return self.port.stopListening()

    @property
    def address(self) -> str:
        host = self.port.getHost()
        if hasattr(host, "port"):
            return f"tcp:127.0.0.1:{host.port}"
        return f"unix:{host.name.decode() if isinstance(host.name, bytes) else host.name}"


def start_engine(case: unittest.TestCase, complete: Callable[[bytes, bool], bool],
                 script: Sequence[Step], unix_path: Optional[str] = None) -> FakeEngine:
    engine = FakeEngine(complete, script)
    if unix_path:
        engine.port = reactor.listenUNIX(unix_path, engine)
    else:
        engine.port = reactor.listenTCP(0, engine, interface="127.0.0.1")
    case.addCleanup(engine.stop)
    return engine


# -- when a request is whole, per protocol -------------------------------------------

def clamd_complete(data: bytes, eof: bool) -> bool:
    """``zVERSION\\0``/``zPING\\0``, or ``zINSTREAM\\0`` and chunks up to a zero length."""
    if data in (b"zVERSION\0", b"zPING\0"):
        return True
    if not data.startswith(b"zINSTREAM\0"):
        return eof or b"\0" in data
    pos = len(b"zINSTREAM\0")
    while len(data) >= pos + 4:
        (size,) = struct.unpack(">I", data[pos:pos + 4])
        if size == 0:
            return True
        pos += 4 + size
    return False


def instream_payload(request: bytes) -> bytes:
    """The message a zINSTREAM request carried, chunks joined."""
    pos = len(b"zINSTREAM\0")
    out = bytearray()
    while True:
        (size,) = struct.unpack(">I", request[pos:pos + 4])
        if size == 0:
            return bytes(out)
        out += request[pos + 4:pos + 4 + size]
        pos += 4 + size


def _head_and_length(data: bytes, length_header: bytes) -> Optional[tuple[int, int]]:
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    m = re.search(rb"(?im)^" + length_header + rb":\s*(\d+)\r$", data[:end + 2])
    return end + 4, int(m.group(1)) if m else 0


def spamd_complete(data: bytes, eof: bool) -> bool:
    """Headers and Content-length octets (PING has no body)."""
    if data.startswith(b"PING "):
        return data.endswith(b"\r\n\r\n") or eof
    got = _head_and_length(data, b"Content-length")
    return got is not None and len(data) - got[0] >= got[1]


def http_complete(data: bytes, eof: bool) -> bool:
    got = _head_and_length(data, b"Content-Length")
    return got is not None and len(data) - got[0] >= got[1]


# -- replies --------------------------------------------------------------------------

def spamd_reply(body: bytes, spam: str = "True ; 1002.7 / 5.0", code: str = "0 EX_OK") -> bytes:
    return (f"SPAMD/1.1 {code}\r\nContent-length: {len(body)}\r\nSpam: {spam}\r\n\r\n"
            .encode() + body)


def http_reply(body: bytes, status: str = "200 OK", headers: Sequence[str] = (),
               chunked: bool = False) -> bytes:
    head = [f"HTTP/1.1 {status}", "Connection: close", "Server: rspamd/3.4", *headers]
    if chunked:
        head.append("Transfer-Encoding: chunked")
        half = len(body) // 2
        parts = [body[:half], body[half:]]
        payload = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts if p) + b"0\r\n\r\n"
    else:
        head.append(f"Content-Length: {len(body)}")
        payload = body
    return ("\r\n".join(head) + "\r\n\r\n").encode() + payload
