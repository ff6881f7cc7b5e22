"""The ESMTP server state machine: parse, enforce limits, reply; decide nothing.

Stage: session.  It reads bytes from the client, frames commands and message
data, enforces the protocol rules and bounds, and asks a ``SessionHandler``
(the edge) what to answer to MAIL, RCPT and the end of DATA, as Twisted's
``SMTP`` asks an ``IMessageDelivery``.  Unlike Twisted's ``mail/smtp.py`` it
keeps one command in flight: while a decision is pending, later pipelined
lines wait in order (RFC 2920; Haraka's pause state).
"""
from __future__ import annotations

import enum
import functools
import re
from dataclasses import dataclass
from typing import Any, Callable, Coroutine, Optional, Protocol as TypingProtocol

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from mppproxy._async import drive
from mppproxy._wire import close_now, send_now
from mppproxy.config.schema import ProxyConfig, spool_directory
from mppproxy.logsetup import Logger
from mppproxy.match import TrustedNetworks
from mppproxy.smtp import replies
from mppproxy.smtp.address import Address, AddressError, parse_path, split_argument
from mppproxy.smtp.commands import Command, parse_command
from mppproxy.smtp.forwarded import (FORWARD_OK, IN_TRANSACTION, NOT_AUTHORISED,
                                     XCLIENT_ATTRIBUTES, XFORWARD_ATTRIBUTES,
                                     ForwardedSyntaxError, parse_attributes)
from mppproxy.smtp.framing import DataError, DataReader
from mppproxy.smtp.replies import Reply
from mppproxy.smtp.session import Session, Transaction
from mppproxy.spool.spool import Spool

log = Logger()

# A host name (underscores allowed: many Windows clients send them) or an
# address literal such as [192.0.2.1] or [IPv6:2001:db8::1].
_HELO_ARGUMENT = re.compile(r"^(?:[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?|\[[A-Za-z0-9:.]+\])$")

# While a command is in flight, a client may pipeline this much before we
# stop reading from its socket (flat memory, docs/design.md promise 6).
PIPELINE_BUFFER = 262144
# Seconds a closing connection may take to flush our last reply.
CLOSE_GRACE = 10.0


def counts_as_error(reply: Reply) -> bool:
    """Whether ``reply`` counts toward limits.max_errors.

    The limit is for clients that misbehave, so only permanent (5xx)
    replies count: syntax and sequence errors (500-504, 555) and requests
    refused for good (relay denied, unknown user, a policy or content
    refusal).  Repeated, these mark a broken client or one probing for
    addresses; Postfix's smtpd_hard_error_limit counts the same failed
    commands.  A transient (4xx) reply never counts: it reports our or the
    backend's state (storage, an unreachable or busy backend, a backend's
    4xx relayed in lockstep) or asks the client to send later (452 4.5.3
    for recipients past the limit or of another policy group, greylisting).
    A client that obeys it conforms: RFC 5321 4.5.3.1.10 expects it to send
    the message to the recipients already accepted and retry the rest, and
    closing the session would stop that.  (Postfix does not count its
    recipient limit either, up to smtpd_recipient_overshoot_limit; here
    ``_recipients_full`` bounds what those RCPTs may cost.)  421 closes
    the session anyway."""
    return reply.code >= 500


@functools.lru_cache(maxsize=1024)
def _own_reply(code: int, enhanced: str, text: str) -> Reply:
    """A reply of ours whose text is built per session (greeting, HELO,
    QUIT): the same few texts again and again, so built once each."""
    return Reply(code, enhanced, text)


# (configuration, its spool directory): one tuple, swapped whole.
_spool_dir_for: tuple[Optional[ProxyConfig], Optional[str]] = (None, None)


def _spool_directory(config: ProxyConfig) -> Optional[str]:
    """spool_directory(config), remembered for the configuration of the
    moment (a new object only after a reload)."""
    global _spool_dir_for
    cached = _spool_dir_for
    if cached[0] is not config:
        cached = _spool_dir_for = (config, spool_directory(config))
    return cached[1]


def _cancel(call: Any) -> None:
    """Cancel a pending DelayedCall, if any."""
    if call is not None and call.active():
        call.cancel()


class ReactorTime(TypingProtocol):
    """What the sessions use of the reactor (``IReactorTime``: a
    ``MemoryReactorClock`` in tests).  A typing protocol, because mypy reads
    zope interfaces' methods without ``self``."""

    def callLater(self, delay: float, callable: Callable[..., Any], *args: Any,
                  **kw: Any) -> Any: ...
    def seconds(self) -> float: ...


class SessionState(enum.Enum):
    """Where one SMTP session stands.

    - ``GREETING``: connected, greeting not yet sent (greet pause); any byte
      from the client now makes it an early talker.
    - ``READY``: greeted (or TLS just started); waiting for EHLO/HELO.
    - ``MAIL``: HELO/EHLO done, no transaction; waiting for MAIL.
    - ``RCPT``: MAIL accepted; RCPT commands and then DATA.
    - ``DATA``: reading message data up to CRLF.CRLF.
    - ``CLOSING``: the last reply is out; nothing more is read.
    """

    GREETING = "greeting"
    READY = "ready"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"
    CLOSING = "closing"


@dataclass(frozen=True)
class Capabilities:
    """What the path behind the proxy can carry; only these are announced
    (an extension the backend lacks would be a promise we cannot keep)."""

    size: int
    eightbitmime: bool = True
    smtputf8: bool = True
    dsn: bool = False


class SessionHandler(TypingProtocol):
    """What the state machine asks; implemented by ``mppproxy.edge.handler``."""

    def on_connect(self, session: Session) -> Optional[Reply]: ...
    def known_capabilities(self, session: Session) -> Optional[Capabilities]: ...
    async def capabilities(self, session: Session) -> Capabilities: ...
    async def on_mail(self, session: Session, txn: Transaction) -> Reply: ...
    async def on_rcpt(self, session: Session, txn: Transaction, rcpt: Address,
                      params: dict[str, Optional[str]]) -> Reply: ...
    async def on_data_end(self, session: Session, txn: Transaction) -> Reply: ...
    def on_reset(self, session: Session, txn: Optional[Transaction], reason: str) -> None: ...
    def on_client_gone(self, session: Session) -> None: ...
    def on_disconnect(self, session: Session) -> None: ...


class ConnectionCounter:
    """Open connections in total and per client address, shared by all
    listeners of one process (docs/design.md promise 6)."""

    def __init__(self) -> None:
        self.total = 0
        self.per_host: dict[str, int] = {}

    def add(self, host: str) -> None:
        self.total += 1
        self.per_host[host] = self.per_host.get(host, 0) + 1

    def remove(self, host: str) -> None:
        self.total -= 1
        n = self.per_host.get(host, 0) - 1
        if n > 0:
            self.per_host[host] = n
        else:
            self.per_host.pop(host, None)


class SMTPServerFactory(Factory):
    """Builds sessions with the configuration of the moment; a reload swaps
    ``config``/``handler`` and running sessions keep what they began with."""

    noisy = False

    def __init__(self, config: ProxyConfig, make_handler: Callable[[], SessionHandler],
                 reactor: ReactorTime, tls_context: Any = None,
                 counter: Optional[ConnectionCounter] = None,
                 is_trusted: Callable[[str], bool] = lambda host: False,
                 hostname: str = "localhost"):
        self.config = config
        self.hostname = hostname
        # One handler per session: it may hold the session's backend connection.
        self.make_handler = make_handler
        self.reactor = reactor
        self.tls_context = tls_context
        self.counter = counter or ConnectionCounter()
        self.is_trusted = is_trusted
        # Open sessions, so a shutdown can say goodbye (RFC 5321 3.8).
        self.sessions: set["SMTPServerProtocol"] = set()
        # Connections taken since the start, refused ones included (the
        # metrics' mppproxy_sessions_total).
        self.accepted = 0
        # Set by shut_down: new sessions are refused with 421.
        self.stopping = False
        self._drain_waiters: list[Deferred[None]] = []
        self._grace_call: Any = None

    def shut_down(self, grace: float) -> Deferred[None]:
        """The service is stopping (docs/design.md promise 1: a message in
        flight is carried to its end).  New sessions get 421 at once; so do
        sessions idle between commands; a session with a message in flight
        finishes it first (``SMTPServerProtocol.shut_down``).  Fires when
        every session has ended, or after ``grace`` seconds, when those
        still open are cut."""
        d: Deferred[None] = Deferred()
        self._drain_waiters.append(d)
        if not self.stopping:
            self.stopping = True
            for session in list(self.sessions):
                session.shut_down()
            if self.sessions:
                self._grace_call = self.reactor.callLater(grace, self._cut)
        if not self.sessions:
            self._drained()
        return d

    def session_ended(self, session: "SMTPServerProtocol") -> None:
        self.sessions.discard(session)
        if self.stopping and not self.sessions:
            self._drained()

    def _drained(self) -> None:
        _cancel(self._grace_call)
        self._grace_call = None
        waiters, self._drain_waiters = self._drain_waiters, []
        for d in waiters:
            d.callback(None)

    def _cut(self) -> None:
        self._grace_call = None
        log.warn("shutdown grace over: cutting {n} session(s) still open", n=len(self.sessions))
        for session in list(self.sessions):
            session._abort()
        self._drained()

    def buildProtocol(self, addr: Any) -> "SMTPServerProtocol":
        p = SMTPServerProtocol(self.config, self.make_handler(), self.reactor, self.tls_context,
                               self.counter, self.is_trusted, self.hostname)
        p.factory = self
        return p


class SMTPServerProtocol(Protocol):
    """One client connection.  See ``SessionState`` for the states."""

    # A TCP or TLS transport (producer, STARTTLS, abortConnection); Any:
    # mypy reads zope interfaces' methods without self.
    transport: Any

    def __init__(self, config: ProxyConfig, handler: SessionHandler, reactor: ReactorTime,
                 tls_context: Any, counter: ConnectionCounter,
                 is_trusted: Callable[[str], bool], hostname: str = "localhost"):
        self.config = config
        self.handler = handler
        self.reactor = reactor
        self.tls_context = tls_context
        self.counter = counter
        self.is_trusted = is_trusted
        self.state = SessionState.GREETING
        self.session: Optional[Session] = None
        self.txn: Optional[Transaction] = None
        self._buffer = bytearray()
        self._busy = False
        self._reading_paused = False
        self._skip_long_line = False
        self._reader: Optional[DataReader] = None
        self._timer: Any = None
        # When DATA must be over (timeouts.data_total), as reactor time; the
        # idle timer is shortened to it rather than a second timer kept.
        self._data_deadline: Optional[float] = None
        self._counted = False
        self._caps: Optional[Capabilities] = None
        # The client left while the end-of-DATA decision was pending: the
        # handler still reads the spool, so the cleanup waits for it.
        self._in_process = False
        self._output_blocked = False
        self._after_decision = False
        self._decided_in = SessionState.CLOSING
        self._hostname = hostname
        # The connection's own client address (Session.peer_host may carry
        # forwarded facts: smtp/forwarded.py).
        self._peer = "unknown"
        # XFORWARD attributes for the next transaction, and the session's
        # own facts while forwarded ones are applied (restored at its end).
        self._xforward: Optional[dict[str, Optional[str]]] = None
        self._own_facts: Optional[tuple[str, Optional[str], bool]] = None
        # XCLIENT replaced the connection's client for the rest of it.
        self._xclient = False
        self._spool_dir = _spool_directory(config)
        # Read on every command; the session keeps the configuration it
        # began with anyway.
        self._command_timeout = config.timeouts.command
        self._data_block_timeout = config.timeouts.data_block
        self._max_command_line = config.limits.max_command_line
        # A timeout a command chose for the client's next move (STARTTLS:
        # the TLS handshake), used once instead of the state's own.
        self._next_timeout: Optional[float] = None
        # The service is stopping: close once the message in flight is done.
        self._draining = False

    # -- connection ---------------------------------------------------------

    def connectionMade(self) -> None:
        transport: Any = self.transport
        if hasattr(transport, "setTcpNoDelay"):
            # Replies are small and the client waits for each one: Nagle would
            # add ~40 ms per round trip (the Haraka single-session stall).
            transport.setTcpNoDelay(True)
        # Flow control for our replies: when the client does not read them
        # and the socket's buffer fills, Twisted calls pauseProducing and we
        # stop reading commands until it drains (docs/design.md promise 6).
        transport.registerProducer(self, True)
        factory = getattr(self, "factory", None)
        if factory is not None:
            factory.sessions.add(self)
            factory.accepted += 1
        peer, host = transport.getPeer(), transport.getHost()
        peer_host = getattr(peer, "host", "unknown")
        self.session = Session(peer_host, getattr(peer, "port", 0),
                               getattr(host, "host", ""), getattr(host, "port", 0),
                               trusted=self.is_trusted(peer_host))
        self._peer = peer_host
        if factory is not None and factory.stopping:
            # RFC 5321 3.8: a server shutting down answers a new connection 421.
            self._refuse(replies.SHUTTING_DOWN, "shutting down")
            return
        limits = self.config.limits
        # RFC 5321 3.1 / 4.2.3: refuse with 421 right away when full.
        if self.counter.total >= limits.max_connections:
            self._refuse(replies.TOO_MANY_CONNECTIONS, "max_connections")
            return
        # Trusted networks are exempt, like Postfix's
        # smtpd_client_event_limit_exceptions = $mynetworks.
        if (not self.session.trusted
                and self.counter.per_host.get(peer_host, 0) >= limits.max_connections_per_ip):
            self._refuse(replies.TOO_MANY_FROM_HOST, "max_connections_per_ip")
            return
        self.counter.add(peer_host)
        self._counted = True
        refusal = self.handler.on_connect(self.session)
        if refusal is not None:
            self._refuse(refusal, "refused at connect")
            return
        pause = self.config.smtp.greet_pause
        if pause > 0:
            self._timer = self.reactor.callLater(pause, self._greet)
        else:
            self._greet()

    def _refuse(self, reply: Reply, reason: str) -> None:
        assert self.session is not None
        log.info("refused connection from {client}: {reason}", client=self.session.peer_host,
                 reason=reason, session_id=self.session.id)
        self.state = SessionState.CLOSING
        send_now(self.transport, reply.to_bytes())
        self.transport.loseConnection()
        self._timer = self.reactor.callLater(CLOSE_GRACE, self._abort)

    def _greet(self) -> None:
        self._timer = None
        self.state = SessionState.READY
        self._send(_own_reply(220, "", f"{self._hostname} {self.config.smtp.banner}"))
        self._set_timer(self.config.timeouts.command)
        if self._buffer:
            self._process()

    def connectionLost(self, reason: Optional[Failure] = None) -> None:
        factory = getattr(self, "factory", None)
        if factory is not None:
            factory.session_ended(self)
        self._cancel_timer()
        self._cancel_data_deadline()
        previous = self.state
        self.state = SessionState.CLOSING
        if self._counted and self.session is not None:
            # The connection's own address: XCLIENT may have changed peer_host.
            self.counter.remove(self._peer)
            self._counted = False
        if self.session is None:
            return
        if self._busy:
            if previous is SessionState.DATA:
                # Nobody will hear the reply: the message must not be
                # completed downstream, or the client's retry duplicates it.
                self.handler.on_client_gone(self.session)
            # A decision is still pending (the backend has a command in
            # flight, or on_data_end still reads the spool): the handler is
            # told the session ended only after it, so a backend connection
            # with a command in flight is never given back to the pool.
            self._after_decision = True
            self._decided_in = previous
            return
        self._end_session(previous)

    def _end_session(self, previous: SessionState) -> None:
        assert self.session is not None
        if self.txn is not None:
            if previous is not SessionState.DATA or not self._after_decision:
                why = ("client disconnected during DATA" if previous is SessionState.DATA
                       else "client disconnected")
                self.handler.on_reset(self.session, self.txn, why)
            # else: on_data_end finished the transaction and logged it.
            self.txn.close()
            self.txn = None
        self.handler.on_disconnect(self.session)

    # -- timers ---------------------------------------------------------------

    def _set_timer(self, seconds: float) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.reset(seconds)
        else:
            self._timer = self.reactor.callLater(seconds, self._timed_out)

    def _cancel_timer(self) -> None:
        _cancel(self._timer)
        self._timer = None

    def _timed_out(self) -> None:
        if self._busy:
            self._timer = self.reactor.callLater(self.config.timeouts.command, self._timed_out)
            return
        self._cancel_timer()
        self._cancel_data_deadline()
        assert self.session is not None
        log.info("timeout in state {state} for {client}", state=self.state.value,
                 client=self.session.peer_host, session_id=self.session.id)
        # RFC 5321 4.5.3.2.7: the server may close after its timeout, with 421.
        self._close_with(replies.TIMEOUT)

    # -- input ----------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.state is SessionState.CLOSING:
            return
        if self.state is SessionState.GREETING:
            # RFC 5321 4.3.2 / 3.1: the client must wait for the greeting.
            self._cancel_timer()
            self._close_with(replies.EARLY_TALKER)
            return
        self._buffer += data
        if not self._busy:
            self._process()
        elif len(self._buffer) > PIPELINE_BUFFER and not self._reading_paused:
            self._reading_paused = True
            self._update_reading()

    def _process(self) -> None:
        """Handle buffered input until a decision is pending or it runs out,
        then start the client's timeout (RFC 5321 4.5.3.2) if it is the
        client's turn.

        Not re-entrant: a decision that completes at once (local delivery,
        a refusal) calls back into here, and the loop already running picks
        up the next line, so deep pipelines do not recurse."""
        if self._in_process:
            return
        self._in_process = True
        try:
            self._process_buffer()
        finally:
            self._in_process = False
            if self._reading_paused and not self._busy and len(self._buffer) < PIPELINE_BUFFER // 2:
                self._reading_paused = False
                self._update_reading()
        if self._draining and self._close_if_draining():
            return
        if not self._busy:
            # Once per input or decision, not per line: while a decision is
            # pending the backend's timeouts apply instead.
            state = self.state
            if state is not SessionState.CLOSING and state is not SessionState.GREETING:
                timeout = self._next_timeout
                if timeout is not None:
                    self._next_timeout = None
                elif state is SessionState.DATA:
                    timeout = self._data_block_timeout
                    if self._data_deadline is not None:
                        timeout = max(0.0, min(timeout, self._data_deadline - self.reactor.seconds()))
                else:
                    timeout = self._command_timeout
                self._set_timer(timeout)

    def _update_reading(self) -> None:
        if self.state is SessionState.CLOSING:
            return
        if self._reading_paused or self._output_blocked:
            self.transport.pauseProducing()
        else:
            self.transport.resumeProducing()

    # IPushProducer, for our own replies (see connectionMade).
    def pauseProducing(self) -> None:
        self._output_blocked = True
        self._update_reading()

    def resumeProducing(self) -> None:
        if self._output_blocked:
            self._output_blocked = False
            self._update_reading()
            if not self._busy:
                self._process()

    def stopProducing(self) -> None:
        self._output_blocked = True

    def _process_buffer(self) -> None:
        buf = self._buffer
        while (buf and not self._busy and not self._output_blocked
               and self.state not in (SessionState.CLOSING, SessionState.GREETING)):
            if self._draining and self._close_if_draining():
                return  # stopping: no command after the message in flight
            if self.state is SessionState.DATA:
                assert self._reader is not None
                used = self._reader.feed(buf)
                del buf[:used]
                if not self._reader.done:
                    return
                self._end_of_data()
                continue
            end = buf.find(b"\n")
            if end < 0:
                limit = self._max_command_line + 512
                if len(buf) > limit:
                    # Too long to be any command: refuse once, drop to the next LF.
                    del buf[:]
                    if not self._skip_long_line:
                        self._skip_long_line = True
                        self._send(replies.LINE_TOO_LONG)
                return
            line = bytes(buf[:end + 1])
            del buf[:end + 1]
            if self._skip_long_line:
                self._skip_long_line = False
                continue
            self._line_received(line)

    def _line_received(self, line: bytes) -> None:
        cmd, refusal = parse_command(line, self._max_command_line)
        if refusal is not None:
            self._send(refusal)
            return
        assert cmd is not None
        handler = self._COMMANDS.get(cmd.verb)
        if handler is None:
            self._send(replies.UNKNOWN_COMMAND)
            return
        handler(self, cmd)

    # -- replies ---------------------------------------------------------------

    def _send(self, reply: Reply) -> None:
        if self.state is SessionState.CLOSING:
            return
        send_now(self.transport, reply.to_bytes())
        if counts_as_error(reply) and self.session is not None:
            self.session.errors += 1
            if self.session.errors >= self.config.limits.max_errors:
                self._close_with(replies.TOO_MANY_ERRORS)

    def _close_with(self, reply: Reply) -> None:
        if self.state is SessionState.CLOSING:
            return
        send_now(self.transport, reply.to_bytes())
        self.state = SessionState.CLOSING
        self._cancel_timer()
        if close_now(self.transport):
            return  # the reply went out whole; connectionLost has run
        self.transport.loseConnection()
        # loseConnection waits for our output to drain (and, under TLS, for a
        # close handshake): a client that never reads, or never finishes the
        # TLS handshake, would hold the slot.  It gets CLOSE_GRACE seconds.
        self._timer = self.reactor.callLater(CLOSE_GRACE, self._abort)

    def shut_down(self) -> None:
        """The service is stopping: RFC 5321 3.8 asks for a 421 before the
        close.  A session idle between commands (or not yet greeted) gets it
        at once.  A message in flight is carried to its end first, so that
        the client hears the reply for a message the backend may already
        have (else its retry would deliver it twice): a pending decision
        (end of DATA, the backend's reply, MAIL, RCPT) is awaited and its
        reply sent; a message still being received is read to its end and
        processed.  Then 421, and later commands are not read
        (``_close_if_draining``).  The factory's grace bounds all of it."""
        self._draining = True
        self._close_if_draining()

    def _close_if_draining(self) -> bool:
        """421 and close if the service is stopping and nothing is in flight."""
        if (self._draining and not self._busy
                and self.state not in (SessionState.DATA, SessionState.CLOSING)):
            self._close_with(replies.SHUTTING_DOWN)
            return True
        return False

    def _abort(self) -> None:
        self._timer = None
        abort = getattr(self.transport, "abortConnection", None)
        if abort is not None:
            abort()

    def _await(self, work: Coroutine[Any, Any, Reply], then: Callable[[Reply], None]) -> None:
        """Run a pending decision; later input waits until ``then`` ran.

        An unexpected failure becomes a 451 (never a 250 on an error path,
        STYLE.md) and is logged."""
        self._busy = True
        # The idle timer is left running (re-arming is cheaper than a new
        # one per command); while busy, the backend's own timeouts apply and
        # _timed_out only re-arms it.
        drive(work, self._decided, then)

    def _decided(self, outcome: Any, then: Callable[[Reply], None]) -> None:
        if isinstance(outcome, Failure):
            log.failure("unexpected error handling a command", outcome,
                        session_id=self.session.id if self.session else None)
            outcome = replies.LOCAL_ERROR
        try:
            self._busy = False
            # Read into a local: ``then`` moves ``self.state``, which mypy
            # would take as still narrowed below.
            state = self.state
            if state is SessionState.CLOSING:
                if self._after_decision and self.session is not None:
                    self._end_session(self._decided_in)
                return
            then(outcome)
            if self.state is not SessionState.CLOSING:
                self._process()
        except Exception:
            log.failure("error after a reply")

    # -- commands --------------------------------------------------------------

    def _need_greeted(self) -> bool:
        if self.state is SessionState.READY:
            self._send(replies.NEED_HELO)
            return False
        return True

    def _cmd_ehlo(self, cmd: Command) -> None:
        self._helo(cmd, esmtp=True)

    def _cmd_helo(self, cmd: Command) -> None:
        self._helo(cmd, esmtp=False)

    def _helo(self, cmd: Command, esmtp: bool) -> None:
        assert self.session is not None
        if not _HELO_ARGUMENT.match(cmd.arg):
            # RFC 5321 4.1.1.1: EHLO/HELO take one domain or address literal
            # (ASCII; RFC 6531 3.7.1).  It goes into our Received: header, so
            # nothing else is accepted.
            self._send(replies.SYNTAX_ERROR.with_text("Syntax: EHLO hostname or [address]"))
            return
        self._reset_transaction("new EHLO/HELO")
        self.session.helo = cmd.arg
        self.session.esmtp = esmtp
        if not esmtp:
            self.state = SessionState.MAIL
            self._send(_own_reply(250, "", f"{self._hostname} Hello {cmd.arg}"))
            return

        def answer(reply: Reply) -> None:
            if reply.code == 250:
                self.state = SessionState.MAIL
            self._send(reply)

        known = self.handler.known_capabilities(self.session)
        if known is not None:
            # The common case: no need to wait for anything.
            self._caps = known
            answer(Reply(250, "", "\n".join(self._ehlo_lines(cmd.arg, known))))
            return

        async def ask() -> Reply:
            assert self.session is not None
            self._caps = await self.handler.capabilities(self.session)
            return Reply(250, "", "\n".join(self._ehlo_lines(cmd.arg, self._caps)))

        self._await(ask(), answer)

    def _ehlo_lines(self, name: str, caps: Capabilities) -> list[str]:
        assert self.session is not None
        lines = [f"{self._hostname} Hello {name}", "PIPELINING", f"SIZE {caps.size}"]
        if caps.eightbitmime:
            lines.append("8BITMIME")  # RFC 6152
        if caps.smtputf8:
            lines.append("SMTPUTF8")  # RFC 6531
        if caps.dsn:
            lines.append("DSN")  # RFC 3461, passed through to the backend
        lines.append("ENHANCEDSTATUSCODES")  # RFC 2034
        if self.tls_context is not None and not self.session.tls:
            lines.append("STARTTLS")  # RFC 3207
        # Postfix sends XFORWARD / XCLIENT only to a server that announces
        # them with the attributes it takes (XFORWARD_README, XCLIENT_README).
        if self._may("xforward"):
            lines.append("XFORWARD " + " ".join(XFORWARD_ATTRIBUTES))
        if self._may("xclient"):
            lines.append("XCLIENT " + " ".join(XCLIENT_ATTRIBUTES))
        return lines

    def _may(self, command: str) -> bool:
        """Whether the connection's own client may send XFORWARD or XCLIENT
        (smtp.xforward_hosts / smtp.xclient_hosts)."""
        hosts = (self.config.smtp.xforward_hosts if command == "xforward"
                 else self.config.smtp.xclient_hosts)
        return bool(hosts) and _networks(hosts)(self._peer)

    def _size_limit(self) -> int:
        return self._caps.size if self._caps else self.config.limits.max_message_size

    def _cmd_mail(self, cmd: Command) -> None:
        if not self._need_greeted():
            return
        if self.state is not SessionState.MAIL:
            self._send(replies.NESTED_MAIL)
            return
        parsed = self._parse_path_argument(cmd.arg, "FROM:", replies.BAD_SENDER_SYNTAX)
        if parsed is None:
            return
        sender, params = parsed
        refusal = self._check_mail_params(sender, params)
        if refusal is not None:
            self._send(refusal)
            return
        txn = Transaction(sender, params)
        txn.smtputf8 = "SMTPUTF8" in params
        txn.body_8bit = (params.get("BODY") or "").upper() == "8BITMIME"
        assert self.session is not None
        session = self.session
        self._apply_xforward()

        def answer(reply: Reply) -> None:
            if reply.is_positive:
                self.txn = txn
                self.state = SessionState.RCPT
                session.transactions += 1
            else:
                self.handler.on_reset(session, txn, f"MAIL refused: {reply.code}")
                # No transaction began: the attributes wait for the next MAIL.
                self._restore_own_facts()
            self._send(reply)

        self._await(self.handler.on_mail(session, txn), answer)

    def _parse_path_argument(self, arg: str, prefix: str, refusal: Reply
                             ) -> Optional[tuple[Address, dict[str, Optional[str]]]]:
        """``FROM:<path> params`` or ``TO:<path> params``; on bad syntax the
        refusal is sent (with the reason) and None returned.  Only MAIL may
        carry the null path ``<>`` (RFC 5321 4.1.1.2)."""
        try:
            path, params = split_argument(arg, prefix)
            return parse_path(path, allow_null=prefix == "FROM:"), params
        except AddressError as e:
            self._send(refusal.with_text(f"{refusal.text}: {e}"))
            return None

    def _check_mail_params(self, sender: Address, params: dict[str, Optional[str]]) -> Optional[Reply]:
        assert self.session is not None
        caps = self._caps
        if params and not self.session.esmtp:
            return replies.UNKNOWN_PARAMETER.with_text("Parameters need EHLO")
        for key, value in params.items():
            if key == "SIZE":
                # RFC 1870 section 6: refuse at MAIL when the declared size is too big.
                if value is None or not value.isdigit():
                    return replies.SYNTAX_ERROR.with_text("SIZE needs a number")
                if int(value) > self._size_limit():
                    return replies.SIZE_PARAM_TOO_BIG
            elif key == "BODY":
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    return replies.BAD_BODY_PARAMETER
                if value.upper() == "8BITMIME" and caps is not None and not caps.eightbitmime:
                    return replies.UNKNOWN_PARAMETER.with_text("8BITMIME not supported")
            elif key == "SMTPUTF8":
                if value is not None or (caps is not None and not caps.smtputf8):
                    return replies.UNKNOWN_PARAMETER.with_text("SMTPUTF8 not supported")
            elif key in ("RET", "ENVID") and caps is not None and caps.dsn:
                continue
            else:
                return replies.UNKNOWN_PARAMETER.with_text(f"Unsupported MAIL parameter {key}")
        if not sender.ascii_only and "SMTPUTF8" not in params:
            return replies.UTF8_NEEDS_SMTPUTF8
        return None

    def _cmd_rcpt(self, cmd: Command) -> None:
        if not self._need_greeted():
            return
        if self.state is not SessionState.RCPT or self.txn is None:
            self._send(replies.NEED_MAIL)
            return
        txn = self.txn
        if self._recipients_full(txn):
            self._send(replies.TOO_MANY_RECIPIENTS)
            return
        parsed = self._parse_path_argument(cmd.arg, "TO:", replies.BAD_RECIPIENT_SYNTAX)
        if parsed is None:
            return
        rcpt, params = parsed
        for key in params:
            if not (key in ("NOTIFY", "ORCPT") and self._caps is not None and self._caps.dsn):
                self._send(replies.UNKNOWN_PARAMETER.with_text(f"Unsupported RCPT parameter {key}"))
                return
        if not rcpt.ascii_only and not txn.smtputf8:
            self._send(replies.UTF8_NEEDS_SMTPUTF8)
            return
        assert self.session is not None

        def answer(reply: Reply) -> None:
            txn.rcpt_log.append((rcpt.text, str(reply.code)))
            if reply.is_positive and self.txn is txn:
                txn.recipients.append(rcpt)
                txn.rcpt_params.append(params)
            self._send(reply)

        self._await(self.handler.on_rcpt(self.session, txn, rcpt, params), answer)

    def _recipients_full(self, txn: Transaction) -> bool:
        """Whether the transaction takes no more RCPT (each further one is
        answered 452 4.5.3 here, without asking the handler).

        Full at limits.max_recipients accepted (RFC 5321 4.5.3.1.8: at
        least 100 must be taken), or at as many refused: 4xx refusals do not
        count as errors (``counts_as_error``), yet each asked recipient
        costs a policy run, perhaps a backend round trip, and a log entry;
        this bounds them per transaction.  A client refused that often
        already has a whole next transaction to retry."""
        limit = self.config.limits.max_recipients
        accepted = len(txn.recipients)
        return accepted >= limit or len(txn.rcpt_log) - accepted >= limit

    def _cmd_data(self, cmd: Command) -> None:
        if not self._need_greeted():
            return
        if cmd.arg:
            self._send(replies.SYNTAX_ERROR.with_text("DATA takes no argument"))
            return
        if self.state is not SessionState.RCPT or self.txn is None:
            self._send(replies.NEED_MAIL)
            return
        if not self.txn.recipients:
            self._send(replies.NO_VALID_RECIPIENTS)
            return
        txn = self.txn
        txn.spool = Spool(self.config.limits.memory_spool_bytes, self._spool_dir)
        self._reader = DataReader(txn.spool.write, self._size_limit(),
                                  self.config.limits.max_line_length,
                                  normalise=self.config.smtp.bare_newline == "normalise")
        self.state = SessionState.DATA
        self._send(replies.START_DATA)
        self._data_deadline = self.reactor.seconds() + self.config.timeouts.data_total

    def _cancel_data_deadline(self) -> None:
        self._data_deadline = None

    def _end_of_data(self) -> None:
        self._cancel_data_deadline()
        reader, txn, session = self._reader, self.txn, self.session
        assert reader is not None and txn is not None and session is not None
        self._reader = None
        txn.size = reader.size
        if reader.error is DataError.BARE_NEWLINE:
            # The client and we may disagree about where the message ends:
            # refuse it and close, so nothing after it is read as commands.
            self._reset_transaction("bare newline in DATA")
            self._close_with(replies.BARE_NEWLINE_DATA)
            return
        if reader.storage_error is not None:
            self._not_stored(session, txn, reader.storage_error)
            return
        if reader.error is not None:
            reply = {DataError.TOO_BIG: replies.MESSAGE_TOO_BIG,
                     DataError.LINE_TOO_LONG: replies.DATA_LINE_TOO_LONG,
                     DataError.NUL: replies.NUL_IN_DATA}[reader.error]
            self._reset_transaction(reader.error.value)
            self.state = SessionState.MAIL
            self._send(reply)
            return

        def answer(reply: Reply) -> None:
            self.txn = None
            txn.close()
            self.state = SessionState.MAIL
            self._end_xforward()
            self._send(reply)

        self._await(self.handler.on_data_end(session, txn), answer)

    def _not_stored(self, session: Session, txn: Transaction, error: OSError) -> None:
        """The spool could not take the message (a full disk): our fault,
        logged as such; the client hears 452 4.3.1 (or 451 4.3.0) and the
        session goes on, so it can RSET and send again (docs/design.md
        promises 1 and 4)."""
        log.error("message {queue_id} not stored: spool write failed in {path}: "
                  "{error} (errno {errno})", queue_id=txn.id, path=error.filename,
                  error=error.strerror or str(error), errno=error.errno,
                  session_id=session.id, client=session.peer_host)
        self._reset_transaction(f"{DataError.STORAGE.value}: {error.strerror or error}")
        self.state = SessionState.MAIL
        self._send(replies.storage_failure(error))

    def _reset_transaction(self, reason: str) -> None:
        if self.txn is not None:
            assert self.session is not None
            self.handler.on_reset(self.session, self.txn, reason)
            self.txn.close()
            self.txn = None
        if self.state in (SessionState.RCPT, SessionState.DATA):
            self.state = SessionState.MAIL
        self._end_xforward()

    def _cmd_rset(self, cmd: Command) -> None:
        # RFC 5321 4.1.1.5: RSET clears the transaction, keeps the EHLO.
        self._reset_transaction("RSET")
        self._send(replies.RESET_OK)

    def _cmd_noop(self, cmd: Command) -> None:
        self._send(replies.NOOP_OK)

    def _cmd_quit(self, cmd: Command) -> None:
        self._reset_transaction("QUIT")
        self._close_with(_own_reply(221, "2.0.0", f"{self._hostname} closing connection"))

    def _cmd_vrfy(self, cmd: Command) -> None:
        self._send(replies.CANNOT_VRFY)

    def _cmd_expn(self, cmd: Command) -> None:
        self._send(replies.NOT_IMPLEMENTED.with_text("EXPN not available"))

    def _cmd_help(self, cmd: Command) -> None:
        self._send(replies.HELP)

    def _cmd_starttls(self, cmd: Command) -> None:
        assert self.session is not None
        if self.tls_context is None:
            self._send(replies.TLS_NOT_AVAILABLE)
            return
        if self.session.tls:
            self._send(replies.TLS_ALREADY)
            return
        if cmd.arg:
            self._send(replies.SYNTAX_ERROR.with_text("STARTTLS takes no argument"))
            return
        # RFC 3207 section 4.2 / the 2011 STARTTLS injection: anything the
        # client pipelined after STARTTLS is discarded, and the session
        # forgets all it knew from before TLS.
        del self._buffer[:]
        self._send(replies.READY_TLS)
        self._reset_transaction("STARTTLS")
        self.transport.startTLS(self.tls_context)
        self.session.tls = True
        self.session.helo = None
        self.session.esmtp = False
        self._caps = None
        self.state = SessionState.READY
        self._next_timeout = self.config.timeouts.tls_handshake

    def _cmd_auth(self, cmd: Command) -> None:
        self._send(replies.NOT_IMPLEMENTED.with_text("AUTH not available"))

    # -- XFORWARD / XCLIENT (smtp/forwarded.py) ------------------------------------

    def _forwarded_attributes(self, command: str, allowed: tuple[str, ...], arg: str
                              ) -> Optional[dict[str, Optional[str]]]:
        """The attributes of an XFORWARD or XCLIENT the client may send now,
        or None with the refusal sent."""
        if not self._may(command.lower()):
            log.warn("{command} refused from {client}: not in smtp.{key}", command=command,
                     client=self._peer, key=f"{command.lower()}_hosts",
                     session_id=self.session.id if self.session else None)
            self._send(NOT_AUTHORISED)
            return None
        if not self._need_greeted():
            return None
        if self.state is not SessionState.MAIL:
            self._send(IN_TRANSACTION)
            return None
        try:
            return parse_attributes(arg, allowed)
        except ForwardedSyntaxError as e:
            self._send(e.reply)
            return None

    def _cmd_xforward(self, cmd: Command) -> None:
        attributes = self._forwarded_attributes("XFORWARD", XFORWARD_ATTRIBUTES, cmd.arg)
        if attributes is None:
            return
        # XFORWARD_README, "Server operation": the first XFORWARD sets every
        # attribute to [UNAVAILABLE], each one overwrites those it names.
        if self._xforward is None:
            self._xforward = dict.fromkeys(XFORWARD_ATTRIBUTES)
        self._xforward.update(attributes)
        self._send(FORWARD_OK)

    def _apply_xforward(self) -> None:
        """At MAIL: the forwarded client becomes the transaction's client.
        ADDR [UNAVAILABLE] is a local submission on the upstream host: the
        connection's facts stay (XFORWARD_README), but relay control was
        still the upstream's."""
        session = self.session
        if self._xforward is None or session is None:
            return
        self._own_facts = (session.peer_host, session.helo, session.trusted)
        upstream = session.via or session.peer_host
        addr = self._xforward.get("ADDR")
        if addr is not None:
            session.peer_host = addr
            session.helo = self._xforward.get("HELO")
            session.trusted = self.is_trusted(addr)
        session.via = upstream
        session.relay_checked = True

    def _restore_own_facts(self) -> None:
        session = self.session
        if self._own_facts is None or session is None:
            return
        session.peer_host, session.helo, session.trusted = self._own_facts
        self._own_facts = None
        session.relay_checked = False
        # After XCLIENT the session's facts are still forwarded ones.
        session.via = self._peer if self._xclient else None

    def _end_xforward(self) -> None:
        """The transaction is over (RSET, the end of DATA, a new EHLO):
        XFORWARD_README, "the attributes are reset to the real client
        information"."""
        self._restore_own_facts()
        self._xforward = None

    def _cmd_xclient(self, cmd: Command) -> None:
        attributes = self._forwarded_attributes("XCLIENT", XCLIENT_ATTRIBUTES, cmd.arg)
        if attributes is None:
            return
        session = self.session
        assert session is not None
        self._end_xforward()
        # XCLIENT_README: the forwarded client replaces the connection's for
        # the rest of it, its checks included; the session starts again.
        addr = attributes.get("ADDR")
        if "ADDR" in attributes:
            session.peer_host = addr if addr is not None else self._peer
            session.trusted = self.is_trusted(session.peer_host)
        if "HELO" in attributes:
            session.helo = attributes["HELO"]
        session.via = self._peer
        self._xclient = True
        log.info("XCLIENT from {upstream}: client {client} (helo {helo})", upstream=self._peer,
                 client=session.peer_host, helo=session.helo, session_id=session.id,
                 login=attributes.get("LOGIN"))
        refusal = self.handler.on_connect(session)
        if refusal is not None:
            self._close_with(refusal)
            return
        self.state = SessionState.READY
        self._caps = None
        self._send(_own_reply(220, "", f"{self._hostname} {self.config.smtp.banner}"))

    _COMMANDS: dict[str, Callable[["SMTPServerProtocol", Command], None]] = {
        "EHLO": _cmd_ehlo, "HELO": _cmd_helo, "MAIL": _cmd_mail, "RCPT": _cmd_rcpt,
        "DATA": _cmd_data, "RSET": _cmd_rset, "NOOP": _cmd_noop, "QUIT": _cmd_quit,
        "VRFY": _cmd_vrfy, "EXPN": _cmd_expn, "HELP": _cmd_help, "STARTTLS": _cmd_starttls,
        "AUTH": _cmd_auth, "XFORWARD": _cmd_xforward, "XCLIENT": _cmd_xclient,
    }


@functools.lru_cache(maxsize=16)
def _networks(hosts: tuple[str, ...]) -> TrustedNetworks:
    """The matcher of smtp.xforward_hosts or smtp.xclient_hosts, built once
    per configured list (not per connection)."""
    return TrustedNetworks(hosts)
