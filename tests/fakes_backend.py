"""A scripted fake backend MTA on loopback, for the relay and smuggling tests.

It listens with ``reactor.listenTCP(0, factory, interface="127.0.0.1")`` inside a
trial test, records every command line and every message it receives (the raw bytes
on the wire and the content with dot-stuffing undone), and has knobs that tests set
before or during a session:

* ``extensions``: the EHLO keywords it announces (``("SIZE 1000", "PIPELINING")``:
  no 8BITMIME, no STARTTLS ...);
* ``replies``: a reply per verb (``{"RCPT": "550 5.1.1 User unknown"}``), or a
  callable ``(conn, line) -> str | None`` (None: the default reply).  Verbs are the
  command words plus ``GREETING`` and ``EOM`` (the reply to the end of data);
* ``drop_at``: close the connection instead of answering that verb (``"MAIL"``,
  ``"EOM"``, or ``"CONTENT"``: after ``drop_after_bytes`` bytes of message data), or
  a callable ``(conn, verb) -> bool``; ``abort_on_drop`` sends a RST instead of FIN;
* ``delays``: seconds to wait before a verb's reply; ``None`` means never answer;
* ``stall_after_bytes``: stop reading the socket after that much message data
  (a backend too slow to take the message); its sockets then get a small, fixed
  receive buffer, so the sender's writes really back up;
* ``lenient_end``: end DATA at any line break, dot, line break (``\\n.\\n``,
  ``\\r.\\r``...), like the MTAs that SMTP smuggling exploits; the default ends
  DATA only at ``CRLF . CRLF``.

Imported as a top-level module (``from fakes_backend import FakeBackend``), as the
realmta fixtures import ``helpers``: pytest puts ``tests/`` on ``sys.path``.
"""
from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

from twisted.internet import defer, task
from twisted.internet.protocol import Factory, Protocol

DEFAULT_EXTENSIONS: tuple[str, ...] = (
    "PIPELINING", "SIZE 52428800", "8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8")

_STRICT_END = re.compile(rb"(\r\n)\.\r\n")
# What a smuggling-prone MTA takes for the end of data.
_LENIENT_END = re.compile(rb"(\r\n|\n|\r)\.(?:\r\n|\n|\r)")
_SENDER = re.compile(rb"^MAIL\s+FROM:\s*<([^>]*)>", re.I)
_RCPT = re.compile(rb"^RCPT\s+TO:\s*<([^>]*)>", re.I)
# The fake refuses a command line longer than this (no real MTA takes more).
_MAX_LINE = 65536

ReplySpec = Union[str, Callable[["FakeBackendConnection", bytes], Optional[str]]]


@dataclass
class ReceivedMessage:
    """One message that reached the fake (the whole DATA, terminator included)."""

    connection: int
    sender: bytes
    recipients: list[bytes]
    raw: bytes
    data: bytes
    reply: Optional[bytes] = None

    @property
    def accepted(self) -> bool:
        """The fake answered 2xx to the end of data."""
        return self.reply is not None and self.reply[:1] == b"2"

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def split_received(self) -> tuple[bytes, bytes]:
        """(the first Received: field with its continuation lines, the rest)."""
        assert self.data.startswith(b"Received: "), self.data[:200]
        pos = 0
        while True:
            end = self.data.index(b"\r\n", pos) + 2
            if self.data[end:end + 1] not in (b" ", b"\t"):
                return self.data[:end], self.data[end:]
            pos = end


@dataclass
class _Transaction:
    sender: Optional[bytes] = None
    recipients: list[bytes] = field(default_factory=list)


class FakeBackendConnection(Protocol):
    """One session at the fake."""

    def __init__(self, backend: "FakeBackend", index: int):
        self.backend = backend
        self.index = index
        self.commands: list[bytes] = []
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.open = False
        self.opened_at = 0.0
        self._buf = bytearray()
        self._data: Optional[bytearray] = None
        self._searched = 0
        self._txn = _Transaction()
        self._busy = False
        self._timer: Any = None
        self._closing = False
        self.stalled = False

    # -- transport -----------------------------------------------------------

    def connectionMade(self) -> None:
        self.open = True
        self.opened_at = time.monotonic()
        self._answer("GREETING", b"", self.backend.default_reply("GREETING", self))

    def connectionLost(self, reason: Any = None) -> None:
        self.open = False
        self._closing = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if not self.lost.called:
            self.lost.callback(None)

    def dataReceived(self, data: bytes) -> None:
        self.backend.bytes_received += len(data)
        self._buf += data
        self._process()

    # -- input ---------------------------------------------------------------

    def _process(self) -> None:
        while not self._busy and not self._closing:
            if self._data is not None:
                if not self._data_step():
                    return
                continue
            end = self._buf.find(b"\n")
            if end < 0:
                if len(self._buf) > _MAX_LINE:
                    self._write(b"500 5.5.2 Line too long\r\n")
                    self.drop()
                return
            line = bytes(self._buf[:end])
            del self._buf[:end + 1]
            if line.endswith(b"\r"):
                line = line[:-1]
            self._command(line)

    def _data_step(self) -> bool:
        """Move buffered bytes into the message; True when it ended."""
        assert self._data is not None
        backend = self.backend
        self._data += self._buf
        del self._buf[:]
        regex = _LENIENT_END if backend.lenient_end else _STRICT_END
        m = regex.search(self._data, max(0, self._searched - 6))
        if m is None:
            self._searched = len(self._data)
            if (self._drops("CONTENT")
                    and len(self._data) - 2 >= backend.drop_after_bytes):
                self.drop()
            elif (backend.stall_after_bytes is not None
                  and len(self._data) - 2 >= backend.stall_after_bytes and not self.stalled):
                # Stop reading: the sender's writes back up (a slow backend).
                self.stalled = True
                self.transport.pauseProducing()
            return False
        data = self._data
        self._data = None
        self._buf[:0] = data[m.end():]
        raw = bytes(data[2:m.end()])
        content = bytes(data[:m.end(1)])
        if backend.lenient_end:
            content = re.sub(rb"(\r\n|\n|\r)\.", rb"\1", content)
        else:
            content = content.replace(b"\r\n.", b"\r\n")
        msg = ReceivedMessage(self.index, self._txn.sender or b"", list(self._txn.recipients),
                              raw, content[2:])
        backend.messages.append(msg)
        self._txn = _Transaction()
        self._answer("EOM", b"", backend.default_reply("EOM", self), message=msg)
        return True

    def _command(self, line: bytes) -> None:
        backend = self.backend
        self.commands.append(line)
        backend.log.append((self.index, line))
        verb = line.split(b" ", 1)[0].upper().decode("ascii", "replace")
        reply = backend.default_reply(verb, self)
        self._answer(verb, line, reply)

    # -- replies ---------------------------------------------------------------

    def _drops(self, verb: str) -> bool:
        drop_at = self.backend.drop_at
        if drop_at is None:
            return False
        if callable(drop_at):
            return bool(drop_at(self, verb))
        return drop_at.upper() == verb

    def _answer(self, verb: str, line: bytes, default: str,
                message: Optional[ReceivedMessage] = None) -> None:
        backend = self.backend
        if self._drops(verb):
            self.drop()
            return
        spec = backend.replies.get(verb)
        text: Optional[str] = None
        if callable(spec):
            text = spec(self, line)
        elif spec is not None:
            text = spec
        reply = _render(text if text is not None else default)
        if verb in backend.delays:
            delay = backend.delays[verb]
            self._busy = True
            if delay is None:
                return  # never answer; the other side has to time out
            self._timer = backend.reactor.callLater(
                delay, self._delayed, verb, line, reply, message)
            return
        self._apply(verb, line, reply, message)

    def _delayed(self, verb: str, line: bytes, reply: bytes,
                 message: Optional[ReceivedMessage]) -> None:
        self._timer = None
        self._busy = False
        if self._closing:
            return
        self._apply(verb, line, reply, message)
        self._process()

    def _apply(self, verb: str, line: bytes, reply: bytes,
               message: Optional[ReceivedMessage]) -> None:
        """Send the reply and change the session's state the way it says."""
        ok = reply[:1] == b"2"
        if message is not None:
            message.reply = reply
        if verb in ("EHLO", "HELO", "RSET", "XCLIENT") and ok:
            self._txn = _Transaction()
        elif verb == "MAIL" and ok:
            m = _SENDER.match(line)
            self._txn = _Transaction(sender=m.group(1) if m else line[10:])
        elif verb == "RCPT" and ok:
            m = _RCPT.match(line)
            self._txn.recipients.append(m.group(1) if m else line[8:])
        self._write(reply)
        if verb == "DATA" and reply[:3] == b"354":
            self._data = bytearray(b"\r\n")
            self._searched = 0
        if verb == "QUIT":
            self._closing = True
            self.transport.loseConnection()

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self._closing:
            self.transport.write(data)

    def drop(self) -> None:
        """Close without a reply (RST when the backend's ``abort_on_drop``)."""
        if self._closing or self.transport is None:
            return
        self._closing = True
        self.backend.drops += 1
        if self.backend.abort_on_drop:
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()

    def send_and_close(self, reply: bytes) -> None:
        """An unsolicited reply (e.g. ``421`` of an idle timeout), then close."""
        if self._closing or self.transport is None:
            return
        self.transport.write(reply)
        self._closing = True
        self.transport.loseConnection()


def _render(text: str) -> bytes:
    """A reply text as given (one or several lines) into wire format."""
    lines = [ln.rstrip("\r") for ln in text.split("\n") if ln.rstrip("\r")]
    return ("".join(ln + "\r\n" for ln in lines)).encode("utf-8")


class FakeBackend(Factory):
    """The listening fake MTA; see the module docstring for the knobs."""

    noisy = False

    def __init__(self, reactor: Any = None, *, hostname: str = "fake.backend",
                 extensions: tuple[str, ...] | list[str] = DEFAULT_EXTENSIONS,
                 replies: Optional[dict[str, ReplySpec]] = None,
                 drop_at: Union[None, str, Callable[[FakeBackendConnection, str], bool]] = None,
                 drop_after_bytes: int = 0, abort_on_drop: bool = False,
                 delays: Optional[dict[str, Optional[float]]] = None,
                 lenient_end: bool = False, stall_after_bytes: Optional[int] = None):
        if reactor is None:
            from twisted.internet import reactor as _reactor
            reactor = _reactor
        self.reactor = reactor
        self.hostname = hostname
        self.extensions = list(extensions)
        self.replies: dict[str, ReplySpec] = dict(replies or {})
        self.drop_at = drop_at
        self.drop_after_bytes = drop_after_bytes
        self.abort_on_drop = abort_on_drop
        self.delays: dict[str, Optional[float]] = dict(delays or {})
        self.lenient_end = lenient_end
        self.stall_after_bytes = stall_after_bytes
        self.connections: list[FakeBackendConnection] = []
        self.messages: list[ReceivedMessage] = []
        self.log: list[tuple[int, bytes]] = []
        self.bytes_received = 0
        self.drops = 0
        self._port: Any = None

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> int:
        """Listen on 127.0.0.1, a free port; return it."""
        self._port = self.reactor.listenTCP(0, self, interface="127.0.0.1")
        if self.stall_after_bytes is not None and hasattr(self._port, "socket"):
            # A stalled backend must back the sender up: with the kernel's
            # autotuned receive buffer (tcp_rmem up to 32 MiB here) a
            # backend that stops reading still takes megabytes, and whether
            # the sender ever waits becomes a race.  Accepted sockets inherit
            # this fixed, small buffer.
            import socket
            self._port.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        return self.port

    def start_for(self, testcase: Any) -> int:
        """``start()`` and register ``stop()`` as the test's cleanup."""
        port = self.start()
        testcase.addCleanup(self.stop)
        return port

    @property
    def port(self) -> int:
        assert self._port is not None, "FakeBackend not started"
        return self._port.getHost().port

    def buildProtocol(self, addr: Any) -> FakeBackendConnection:
        conn = FakeBackendConnection(self, len(self.connections))
        conn.factory = self
        self.connections.append(conn)
        return conn

    def stop(self) -> defer.Deferred[Any]:
        """Stop listening and close every session; fires when all are gone."""
        ds: list[defer.Deferred[Any]] = []
        if self._port is not None:
            ds.append(defer.maybeDeferred(self._port.stopListening))
            self._port = None
        for conn in self.connections:
            if conn.open and conn.transport is not None:
                conn._closing = True
                conn.transport.abortConnection()
            ds.append(conn.lost)
        return defer.DeferredList(ds)

    # -- what happened -----------------------------------------------------------

    @property
    def open_connections(self) -> list[FakeBackendConnection]:
        return [c for c in self.connections if c.open]

    def commands(self) -> list[bytes]:
        """Every command line received, in arrival order over all sessions."""
        return [line for _, line in self.log]

    def verbs(self) -> list[str]:
        return [line.split(b" ", 1)[0].upper().decode("ascii", "replace") for _, line in self.log]

    def senders(self) -> list[bytes]:
        """The address of every MAIL command received, accepted or not."""
        out = []
        for _, line in self.log:
            m = _SENDER.match(line)
            if m:
                out.append(m.group(1))
        return out

    def close_idle(self, reply: bytes = b"421 4.4.2 fake.backend Error: timeout exceeded\r\n") -> None:
        """Every open session gets an unsolicited ``reply`` and is closed."""
        for conn in self.open_connections:
            conn.send_and_close(reply)

    def default_reply(self, verb: str, conn: FakeBackendConnection) -> str:
        h = self.hostname
        if verb == "GREETING":
            return f"220 {h} ESMTP fake"
        if verb == "EHLO":
            lines = [h] + list(self.extensions)
            return "\n".join(f"250{'-' if i < len(lines) - 1 else ' '}{ln}"
                             for i, ln in enumerate(lines))
        # Sequence errors answered as Postfix answers them.
        if verb == "MAIL" and conn._txn.sender is not None:
            return "503 5.5.1 Error: nested MAIL command"
        if verb == "RCPT" and conn._txn.sender is None:
            return "503 5.5.1 Error: need MAIL command"
        if verb == "DATA":
            if conn._txn.sender is None:
                return "503 5.5.1 Error: need RCPT command"
            if not conn._txn.recipients:
                return "554 5.5.1 Error: no valid recipients"
            return "354 End data with <CR><LF>.<CR><LF>"
        if verb == "EOM":
            return f"250 2.0.0 Ok: queued as FAKE{len(self.messages)}"
        return {
            "HELO": f"250 {h}",
            "MAIL": "250 2.1.0 Ok",
            "RCPT": "250 2.1.5 Ok",
            "RSET": "250 2.0.0 Ok",
            "NOOP": "250 2.0.0 Ok",
            "QUIT": "221 2.0.0 Bye",
            "XFORWARD": "250 2.0.0 Ok",
            "XCLIENT": f"220 {h} ESMTP fake",
            "STARTTLS": "454 4.7.0 TLS not available due to local problem",
        }.get(verb, "502 5.5.2 Error: command not recognized")

    def wait_until(self, predicate: Callable[[], Any], timeout: float = 5.0,
                   what: str = "condition") -> defer.Deferred[Any]:
        """Poll ``predicate`` on the reactor (every 10 ms, at most ``timeout`` s)."""
        return poll_until(self.reactor, predicate, timeout, what)


def poll_until(reactor: Any, predicate: Callable[[], Any], timeout: float = 5.0,
               what: str = "condition", interval: float = 0.01) -> defer.Deferred[Any]:
    """A Deferred that fires with ``predicate()``'s first truthy value, polled on
    the reactor, or fails with ``TimeoutError`` after ``timeout`` seconds."""

    async def run() -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{what} not reached within {timeout:.1f} s")
            await task.deferLater(reactor, interval, lambda: None)

    return defer.Deferred.fromCoroutine(run())
