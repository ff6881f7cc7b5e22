"""rspamd through its HTTP scan endpoint: a scoring scanner of the post-DATA
stage.

Stage: post-DATA scanning.  Hands the scan engine a ``CheckResult`` whose
score is rspamd's score times ``score_factor`` and whose reasons are the
symbols that carried weight (all of them when rspamd skipped its rules for
a pre-result such as GTUBE); rspamd's action, score, required score and
every symbol's weight travel in ``template_vars``.  It never decides
alone.  No answer raises ``ScannerUnavailable``.

The request is ``POST /checkv2`` (rspamd's "protocol" documentation) with
the message as the body and the envelope in headers: ``IP``, ``Helo``,
``From``, ``Rcpt`` (one per recipient), ``Queue-Id``, and ``Password`` when
configured.  The reply is JSON::

    {"is_skipped": false, "score": 5.2, "required_score": 15.0,
     "action": "add header", "symbols": {"NAME": {"score": 1.5, ...}, ...}}

HTTP is Twisted's own client (``twisted.web.client.Agent``) over a pool of
persistent connections: one that the server keeps open (a proxy in front
of rspamd) is used again; rspamd's normal worker closes each one.  The
discipline of the other engine clients holds (docs/design.md promise 4):
at most ``max_connections`` requests at once, one ``timeout`` for the
whole scan (the wait for a slot and the retries included), a retry only
when no reply byte has arrived, and a reply read up to ``MAX_REPLY``
octets, no further.  ``GET /ping`` answers ``pong``; its ``Server:`` header
(``rspamd/3.4``) gives the version for the health check.
"""
from __future__ import annotations

import ipaddress
import json
import math
from typing import Any, Callable, ClassVar, Iterator, NoReturn, Optional
from urllib.parse import urlsplit

from twisted.internet import defer, error
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.web.client import (URI, Agent, HTTPConnectionPool, RequestGenerationFailed,
                                RequestTransmissionFailed, ResponseDone, ResponseFailed,
                                ResponseNeverReceived)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer  # type: ignore[import-untyped]  # no stubs or py.typed

from mppproxy._async import as_deferred
from mppproxy.config.scanners import RspamdConfig
from mppproxy.logsetup import Logger
from mppproxy.results import CheckResult
from mppproxy.scan.base import (DOWN, ERROR, GARBAGE, TIMEOUT, EngineHealth, ScanInput, Scanner,
                                ScannerUnavailable)
from mppproxy.scan.scanners._client import BadReply, printable

log = Logger()

# The JSON of a message with many URLs and symbol options can reach a few
# hundred KiB; more is not rspamd.
MAX_REPLY = 4 * 1024 * 1024
MAX_PING_REPLY = 64 * 1024
MAX_SYMBOLS = 100
# An idle connection is closed after this many seconds: before the usual
# keep-alive timeouts of servers (Apache's 5 s, nginx's 75 s) run out, so
# the server rarely closes one under us; under load a connection is used
# again within milliseconds.
IDLE_TIMEOUT = 4


class _Retryable(Exception):
    """A failure before any reply byte: another attempt may succeed.
    ``reused``: the request went out on a connection from the pool, which
    the server may have closed while it was idle."""

    def __init__(self, why: str, reused: bool):
        super().__init__(why)
        self.reused = reused


@implementer(IAgentEndpointFactory, IStreamClientEndpoint)
class _Endpoint:
    """The one endpoint of the Agent (every request goes to rspamd), which
    counts the connections it opens: a request that opened none went out
    on a pooled connection.

    An address connects at once; a host name is resolved at connect time,
    as for the other engines (Agent's own endpoints resolve even an address
    in a thread).  Connection factories are quiet: no "Starting factory"
    log lines per connection."""

    def __init__(self, reactor: Any, host: str, port: int, timeout: float):
        self.opened = 0
        # Any: mypy reads zope interfaces' methods without self.
        self._endpoint: Any
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            self._endpoint = HostnameEndpoint(reactor, host, port, timeout=timeout)
        else:
            cls = TCP6ClientEndpoint if ip.version == 6 else TCP4ClientEndpoint
            self._endpoint = cls(reactor, host, port, timeout=timeout)

    def endpointForURI(self, uri: URI) -> _Endpoint:
        return self

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        self.opened += 1
        if isinstance(protocolFactory, Factory):
            protocolFactory.noisy = False
        connected: Deferred[IProtocol] = self._endpoint.connect(protocolFactory)
        return connected


@implementer(IBodyProducer)
class _MessageBody:
    """The message as the request body, read from the spool as the
    connection takes it (a push producer: the transport pauses it when its
    buffer is full), so a 20 MB message is never in memory twice.  A
    message that cannot be read (a spool file that vanished, a size that
    does not match) fails the request with the reason."""

    def __init__(self, message: ScanInput):
        self.length = message.size
        self._message = message
        self._chunks: Iterator[bytes] = iter(())
        # Any (an IConsumer): mypy reads zope interfaces' methods without self.
        self._consumer: Any = None
        self._finished: Deferred[None] = Deferred()
        self._paused = False
        self._stopped = False

    def startProducing(self, consumer: Any) -> Deferred[None]:
        self._consumer = consumer
        self._chunks = self._message.exact_chunks()
        self._write()
        return self._finished

    def _write(self) -> None:
        consumer = self._consumer
        while not (self._paused or self._stopped):
            try:
                chunk = next(self._chunks)
            except StopIteration:
                self._end(None)
                return
            except (OSError, ValueError) as e:
                self._end(e)
                return
            consumer.write(chunk)

    def _end(self, failure: Optional[Exception]) -> None:
        self._stopped = True
        if self._finished.called:
            return
        if failure is None:
            self._finished.callback(None)
        else:
            self._finished.errback(failure)

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._write()

    def stopProducing(self) -> None:
        # IBodyProducer: after this, the Deferred of startProducing never fires.
        self._stopped = True


class _BoundedBody(Protocol):
    """Reads a reply body up to ``limit`` octets; a longer one (announced
    or as it arrives) is garbage, and the connection is dropped rather than
    read on.  ``done`` fires with the body once the response has ended (so
    the pool is done with its connection); cancelling it drops the
    connection."""

    def __init__(self, limit: int, announced: int):
        self.done: Deferred[bytes] = Deferred(self._cancel)
        self._limit = limit
        self._announced = announced
        self._parts: list[bytes] = []
        self._size = 0
        self._too_long = False

    def connectionMade(self) -> None:
        if self._announced > self._limit:
            self._drop()

    def dataReceived(self, data: bytes) -> None:
        if self._too_long:
            return
        self._size += len(data)
        if self._size > self._limit:
            self._drop()
            return
        self._parts.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if self._too_long:
            self.done.errback(BadReply(f"reply longer than {self._limit} octets"))
        # PotentialDataLoss: a body without a length, read to the end of
        # the connection (HTTP/1.0 style).
        elif isinstance(reason.value, (ResponseDone, PotentialDataLoss)):
            self.done.callback(b"".join(self._parts))
        else:
            self.done.errback(reason)

    def _drop(self) -> None:
        self._too_long = True
        self._parts = []
        transport = self.transport
        assert transport is not None  # the response's body: connectionMade has run
        transport.stopProducing()

    def _cancel(self, _: Deferred[bytes]) -> None:
        transport = self.transport
        assert transport is not None  # handed to the response: connectionMade has run
        transport.stopProducing()


class _Discard(Protocol):
    """Drops the connection of a response that will not be read."""

    def connectionMade(self) -> None:
        transport = self.transport
        assert transport is not None  # set by makeConnection
        transport.stopProducing()


def _cancelled(e: BaseException) -> bool:
    """Whether ``e`` is how a cancelled request ended (a timeout, or the
    scan engine giving up on us): it is not retried, and the canceller
    says what happened."""
    if isinstance(e, (CancelledError, error.ConnectingCancelledError)):
        return True
    return any(isinstance(f.value, CancelledError) for f in _reasons(e))


def _reasons(e: BaseException) -> list[Failure]:
    """The failures that Twisted's request errors (ResponseFailed and kin) wrap."""
    reasons: Optional[list[Failure]] = getattr(e, "reasons", None)
    return reasons or []


def _describe(reason: Failure) -> str:
    if isinstance(reason.value, error.ConnectionDone):
        return "connection closed"
    if isinstance(reason.value, error.ConnectionLost):
        return "connection reset"
    return reason.getErrorMessage() or type(reason.value).__name__


def _connect_error(e: Exception) -> str:
    if isinstance(e, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, error.TimeoutError):
        return "connect timeout"
    return str(e).strip() or type(e).__name__


def _header_safe(value: str) -> Optional[str]:
    """``value`` fit for a request header, or None: envelope text comes from
    the client, and a CR or LF would let it add headers of its own."""
    if not value or any(c in value for c in "\r\n\0") or not value.isprintable():
        return None
    return value


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadReply(f"{what} is not a number: {printable(repr(value).encode())}")
    return float(value)


def interpret(reply: Any) -> tuple[float, float, str, bool, tuple[tuple[str, float], ...]]:
    """(score, required score, action, skipped, ((symbol, weight), ...))
    from the parsed JSON; BadReply when it is not a scan result."""
    if not isinstance(reply, dict):
        raise BadReply("the JSON is not an object")
    if "error" in reply:
        raise BadReply(f"rspamd error: {printable(str(reply['error']).encode())}")
    score = _number(reply.get("score"), "score")
    required = _number(reply.get("required_score", 0.0), "required_score")
    action = reply.get("action")
    if not isinstance(action, str):
        raise BadReply("no action")
    symbols = reply.get("symbols", {})
    if not isinstance(symbols, dict):
        raise BadReply("symbols is not an object")
    weights = []
    for name, info in symbols.items():
        if not isinstance(info, dict):
            raise BadReply(f"symbol {printable(str(name).encode())} is not an object")
        weights.append((str(name), _number(info.get("score", 0.0), f"{name}.score")))
    weights.sort(key=lambda item: (-abs(item[1]), item[0]))
    return score, required, action, bool(reply.get("is_skipped", False)), tuple(weights)


class RspamdScanner(Scanner):
    """Asks rspamd's normal worker about each message (POST /checkv2).

    ``settings`` is an ``RspamdConfig``.  Messages over ``max_size`` are not
    sent: a "not scanned" reason, no score.  Construction does no I/O;
    ``close`` drops the idle connections of the pool.
    """

    name = "rspamd"
    external: ClassVar[bool] = True
    settings: RspamdConfig

    def __init__(self, settings: RspamdConfig, reactor: Any):
        super().__init__(settings, reactor)
        url = urlsplit(settings.url)
        origin = f"http://{url.netloc}{url.path.rstrip('/')}"
        self._checkv2 = f"{origin}/checkv2".encode()
        self._ping = f"{origin}/ping".encode()
        self._host = url.netloc.encode()
        self._password = [settings.password.encode()] if settings.password else []
        # The pool keeps idle connections but does not bound busy ones.
        self._slots = defer.DeferredSemaphore(settings.max_connections)
        self._endpoint = _Endpoint(reactor, url.hostname or "127.0.0.1", url.port or 80,
                                   settings.connect_timeout)
        # Twisted leaves these unannotated.
        self._pool = HTTPConnectionPool(reactor, persistent=True)  # type: ignore[no-untyped-call]  # Twisted's is unannotated
        self._pool.maxPersistentPerHost = settings.max_connections
        self._pool.cachedConnectionTimeout = IDLE_TIMEOUT
        self._agent: Agent = Agent.usingEndpointFactory(  # type: ignore[no-untyped-call]  # Twisted's is unannotated
            reactor, self._endpoint, self._pool)

    def close(self) -> Deferred[None]:
        """Close the idle pooled connections (a test's cleanup, a stop)."""
        closed: Deferred[None] = self._pool.closeCachedConnections()  # type: ignore[no-untyped-call]  # Twisted's is unannotated
        return closed

    def _headers(self, message: ScanInput) -> Headers:
        # Host given here spares the Agent a copy of the headers to add it.
        raw: dict[bytes, list[bytes]] = {b"Host": [self._host]}
        for key, value in ((b"IP", message.client_ip), (b"Helo", message.helo),
                           (b"From", message.sender), (b"Queue-Id", message.queue_id)):
            safe = _header_safe(value)
            if safe is not None:
                raw[key] = [safe.encode("utf-8")]
        recipients = [safe.encode("utf-8") for safe in map(_header_safe, message.recipients)
                      if safe is not None]
        if recipients:
            raw[b"Rcpt"] = recipients
        if self._password:
            raw[b"Password"] = self._password
        return Headers(raw)

    async def scan(self, message: ScanInput) -> CheckResult:
        settings = self.settings
        too_big = self.over_max_size(message)
        if too_big is not None:
            return too_big
        response, body = await self._call(b"POST", self._checkv2, self._headers(message),
                                          lambda: _MessageBody(message), MAX_REPLY)
        if response.code != 200:
            raise ScannerUnavailable(self.name, f"HTTP {response.code} "
                                     f"{response.phrase.decode('latin-1')}: {printable(body)}")
        try:
            try:
                data = json.loads(body)
            except ValueError as e:
                raise BadReply(f"not JSON ({e}): {printable(body)}") from None
            score, required, action, skipped, weights = interpret(data)
        except BadReply as e:
            raise ScannerUnavailable(self.name, f"bad reply: {e}", GARBAGE) from None
        # The symbols that carried weight; with a pre-result (GTUBE, a
        # settings rule) rspamd skips the rules and the symbol that stopped
        # them has none, so then every symbol is a reason.
        reasons = tuple(n for n, w in weights if w != 0.0 or skipped)[:MAX_SYMBOLS]
        # rspamd's own verdict, for the per-engine actions: the actions it
        # takes on spam (not "greylist" or "soft reject", which defer).
        spam = action in ("reject", "add header", "rewrite subject")
        return CheckResult(score=score * settings.score_factor, reasons=reasons,
                           template_vars=(("rspamd_action", action), ("rspamd_score", score),
                                          ("rspamd_required_score", required),
                                          ("rspamd_symbols", weights[:MAX_SYMBOLS])),
                           facts=(("verdict", "spam" if spam else "clean"),))

    async def health(self) -> EngineHealth:
        response, body = await self._call(b"GET", self._ping, Headers({b"Host": [self._host]}),
                                          None, MAX_PING_REPLY)
        if response.code != 200 or body.strip() != b"pong":
            raise ScannerUnavailable(self.name, f"/ping answered HTTP {response.code}: "
                                     f"{printable(body)}")
        server = response.headers.getRawHeaders(b"Server")
        return EngineHealth(self.name, True, version=server[0].decode("latin-1") if server else "")

    # -- one request: a slot, the attempts, one timeout over all of it -----------------

    async def _call(self, method: bytes, uri: bytes, headers: Headers,
                    body: Optional[Callable[[], _MessageBody]],
                    limit: int) -> tuple[IResponse, bytes]:
        """The response and its body, within ``timeout`` for everything,
        retries included; ``body()`` makes the request body of each attempt."""
        d = as_deferred(self._attempts(method, uri, headers, body, limit))
        d.addTimeout(self.settings.timeout, self.reactor, onTimeoutCancel=self._timed_out)
        return await d

    def _timed_out(self, result: object, timeout: float) -> NoReturn:
        # Whatever the cancelled attempt ended with, the time limit is why.
        raise ScannerUnavailable(self.name, f"timeout after {timeout:g}s "
                                 f"({self.settings.url})", TIMEOUT)

    async def _attempts(self, method: bytes, uri: bytes, headers: Headers,
                        body: Optional[Callable[[], _MessageBody]],
                        limit: int) -> tuple[IResponse, bytes]:
        settings = self.settings
        attempts = 1 + settings.retries
        attempt = 1
        while True:
            await self._slots.acquire()
            try:
                return await self._once(method, uri, headers, body, limit)
            except _Retryable as e:
                if e.reused:
                    # A pooled connection the server closed while idle is
                    # replaced at once and costs no attempt: the message
                    # was never read.
                    continue
                if attempt == attempts:
                    suffix = f" (after {attempts} attempts)" if attempts > 1 else ""
                    raise ScannerUnavailable(self.name, f"{e}{suffix}", DOWN) from None
                log.info("{scanner}: {why}; trying again ({attempt}/{attempts})",
                         scanner=self.name, why=str(e), attempt=attempt + 1, attempts=attempts)
            finally:
                self._slots.release()
            attempt += 1
            if settings.retry_delay > 0:
                await deferLater(self.reactor, settings.retry_delay, lambda: None)

    async def _once(self, method: bytes, uri: bytes, headers: Headers,
                    body: Optional[Callable[[], _MessageBody]],
                    limit: int) -> tuple[IResponse, bytes]:
        opened = self._endpoint.opened
        # Any (an IBodyProducer, an IResponse): mypy reads zope interfaces'
        # methods without self.
        producer: Any = body() if body is not None else None
        d = self._agent.request(method, uri, headers, producer)
        # The pool either handed out an idle connection or opened one, at once.
        reused = self._endpoint.opened == opened
        try:
            response: Any = await d
        except Exception as e:
            self._request_failed(e, reused)
        if response.version[0] != b"HTTP":
            response.deliverBody(_Discard())
            raise ScannerUnavailable(self.name, "bad reply: not HTTP: "
                                     f"{printable(response.version[0])}", GARBAGE)
        length = response.length
        reader = _BoundedBody(limit, length if isinstance(length, int) else -1)
        response.deliverBody(reader)
        try:
            return response, await reader.done
        except BadReply as e:
            raise ScannerUnavailable(self.name, f"bad reply: {e}", GARBAGE) from None
        except Exception as e:
            self._request_failed(e, False)

    def _request_failed(self, e: Exception, reused: bool) -> NoReturn:
        """Raise what the failure ``e`` of one attempt means: CancelledError,
        _Retryable (nothing was answered) or ScannerUnavailable."""
        where = self.settings.url
        if _cancelled(e):
            raise CancelledError() from None
        if isinstance(e, (error.ConnectError, OSError)):
            raise _Retryable(f"cannot connect to {where}: {_connect_error(e)}", False) from None
        reasons = _reasons(e)
        if isinstance(e, RequestGenerationFailed):
            why = reasons[0].getErrorMessage() if reasons else str(e)
            raise ScannerUnavailable(self.name, f"cannot read the message: {why}", ERROR) from None
        if isinstance(e, (ResponseNeverReceived, RequestTransmissionFailed)):
            why = _describe(reasons[0]) if reasons else "connection closed"
            raise _Retryable(f"{why} before any reply ({where})", reused) from None
        if isinstance(e, ResponseFailed):
            raise ScannerUnavailable(self.name, f"bad reply: {_unreadable(e)}", GARBAGE) from None
        raise e


def _unreadable(e: ResponseFailed) -> str:
    """Why a reply that began could not be read: cut short, or not HTTP."""
    first = e.reasons[0]
    if isinstance(first.value, error.ConnectionClosed):
        return f"reply cut short ({_describe(first)})"
    args = first.value.args
    if len(args) == 2 and isinstance(args[1], bytes):
        # twisted.web's ParseError(what, the line it could not read)
        return f"not HTTP: {args[0]}: {printable(args[1])}"
    return f"not HTTP: {first.getErrorMessage()}"
