"""A fake rspamd on loopback, served by ``twisted.web``, for the rspamd
client's tests in tests/test_scanners.py.

Unlike the byte-scripted engines of tests/fakes_scanners.py it speaks
real HTTP/1.1 as a server would: keep-alive connections, chunked bodies
when the length is not known.  Each request is answered by the next step
of a script (the last step repeats); the fake records every request and
counts the connections it accepted, so a test can show that two scans
shared one connection.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence, Union

from twisted.internet import reactor as _reactor
from twisted.trial import unittest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

reactor: Any = _reactor


@dataclass(frozen=True)
class Answer:
    """Answer ``body`` with ``status``; ``chunked``: in two chunks, no
    Content-Length; ``close``: the server closes the connection after it."""
    body: bytes
    status: int = 200
    chunked: bool = False
    close: bool = False


@dataclass(frozen=True)
class CutShort:
    """Announce ``length`` octets, send ``body`` (fewer), then close."""
    body: bytes
    length: int


@dataclass(frozen=True)
class Drop:
    """Close the connection at once, with no answer at all."""


@dataclass(frozen=True)
class Stall:
    """Never answer."""


Step = Union[Answer, CutShort, Drop, Stall]


@dataclass(frozen=True)
class Seen:
    """One request as the fake received it."""
    method: bytes
    path: bytes
    headers: dict[bytes, list[bytes]]
    body: bytes
    connection: int   # which connection it came on: 1 for the first that carried one


class _Rspamd(Resource):
    isLeaf = True

    def __init__(self, fake: "FakeRspamd"):
        super().__init__()  # type: ignore[no-untyped-call]
        self.fake = fake

    def render(self, request: Any) -> Any:
        # Any: twisted.web's Request is mostly unannotated.
        fake = self.fake
        step = fake.script[min(len(fake.seen), len(fake.script) - 1)]
        assert request.content is not None
        fake.seen.append(Seen(request.method, request.path,
                              {k.lower(): list(v) for k, v in request.requestHeaders.getAllRawHeaders()},
                              request.content.read(),
                              fake.numbers.setdefault(id(request.channel), len(fake.numbers) + 1)))
        request.setHeader(b"Server", b"rspamd/3.4")
        if isinstance(step, Answer):
            request.setResponseCode(step.status)
            if step.close:
                request.setHeader(b"Connection", b"close")
            if not step.chunked:
                return step.body
            half = len(step.body) // 2
            request.write(step.body[:half])
            request.write(step.body[half:])
            request.finish()
            return NOT_DONE_YET
        if isinstance(step, CutShort):
            request.setHeader(b"Content-Length", b"%d" % step.length)
            request.write(step.body)
            request.channel.transport.loseConnection()
            return NOT_DONE_YET
        if isinstance(step, Drop):
            request.channel.transport.abortConnection()
            return NOT_DONE_YET
        fake.stalled.append(request)
        return NOT_DONE_YET


class FakeRspamd(Site):
    """The fake; see the module docstring.  ``connections`` counts the
    connections accepted, ``open`` the ones not closed yet."""

    def __init__(self, script: Sequence[Step]):
        super().__init__(_Rspamd(self))  # type: ignore[no-untyped-call]
        self.script = list(script)
        self.seen: list[Seen] = []
        self.stalled: list[Any] = []
        self.connections = 0
        self.numbers: dict[int, int] = {}
        # The transports of the connections not closed yet.
        self.open: list[Any] = []
        self.port: Any = None

    def buildProtocol(self, addr: Any) -> Any:
        proto: Any = super().buildProtocol(addr)  # type: ignore[no-untyped-call]
        self.connections += 1
        made, lost = proto.makeConnection, proto.connectionLost
        transports: list[Any] = []

        def make_connection(transport: Any) -> None:
            transports.append(transport)
            self.open.append(transport)
            made(transport)

        def connection_lost(reason: Any = None) -> None:
            self.open.remove(transports[0])
            lost(reason)

        proto.makeConnection = make_connection
        proto.connectionLost = connection_lost
        return proto

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port.getHost().port}"

    def stop(self) -> Any:
        for transport in list(self.open):
            transport.abortConnection()
        return self.port.stopListening()


def start_rspamd(case: unittest.TestCase, script: Sequence[Step]) -> FakeRspamd:
    """A fake rspamd listening on 127.0.0.1, stopped when ``case`` ends."""
    fake = FakeRspamd(script)
    fake.port = reactor.listenTCP(0, fake, interface="127.0.0.1")
    case.addCleanup(fake.stop)
    return fake
