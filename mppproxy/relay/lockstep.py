"""Lockstep relay: each MAIL, RCPT and message goes to the backend while the
client waits, and the client hears the backend's own reply.

Stage: relay (one instance per client session).  The backend connection is
taken from the pool at the first MAIL (so an unreachable backend is found out
before the client sends a body) and given back when the session ends.
docs/design.md promise 1: the client hears 250 at the end of DATA only after the
backend's 250 for that message; any failure on the way becomes a 4xx.
"""
from __future__ import annotations

from typing import Optional

from twisted.python.failure import Failure

from mppproxy._transitions import StateEnum, TransitionError
from mppproxy.config.schema import BackendConfig
from mppproxy.logsetup import Logger
from mppproxy.message import OutboundMessage
from mppproxy.relay.pool import BackendPool
from mppproxy.smtp.address import Address
from mppproxy.smtp.client import BackendError, BackendProtocol, ClientState, _as_transient
from mppproxy.smtp.replies import Reply, ensure_enhanced
from mppproxy.smtp.session import Session, Transaction

log = Logger()


def _xtext(value: str) -> str:
    """RFC 3461 4: xtext, so client-chosen text cannot break the command."""
    out = []
    for ch in value.encode("utf-8"):
        if 33 <= ch <= 126 and ch not in (43, 61):
            out.append(chr(ch))
        else:
            out.append(f"+{ch:02X}")
    return "".join(out)


def _params(params: dict[str, Optional[str]]) -> str:
    if not params:
        return ""
    return "".join(f" {k}={v}" if v is not None else f" {k}" for k, v in params.items())


class RelayState(StateEnum):
    """Where the backend side of one client session stands
    (``LockstepRelay.state``).

    - ``IDLE``: no backend connection held: before the first MAIL, and
      after the connection was dropped or given back.  MAIL takes one from
      the pool (READY).
    - ``READY``: a connection held, no transaction open on it.  A 2xx to
      MAIL moves to TRANSACTION.
    - ``TRANSACTION``: the backend accepted MAIL; RCPTs follow.  DATA
      moves to SENDING; the client's RSET (or a transaction ended without
      a message) sends RSET and moves back to READY.
    - ``SENDING``: the message is being written, from DATA to the final
      reply.  The connection is never reset or handed to another session
      now (a reset or the session's end drops it).  The final reply moves
      to READY; a refused DATA command leaves the backend's transaction
      open (TRANSACTION).

    From every state but IDLE a failure, a 421 or an out-of-protocol reply
    drops the connection (IDLE); the session's end gives it back (IDLE).
    ``_move_to`` checks each move against ``_RELAY_MOVES``.
    """

    IDLE = "idle"
    READY = "ready"
    TRANSACTION = "transaction"
    SENDING = "sending"


_RELAY_MOVES: dict[RelayState, frozenset[RelayState]] = {
    RelayState.IDLE: frozenset({RelayState.READY}),
    RelayState.READY: frozenset({RelayState.TRANSACTION, RelayState.IDLE}),
    RelayState.TRANSACTION: frozenset({RelayState.SENDING, RelayState.READY, RelayState.IDLE}),
    RelayState.SENDING: frozenset({RelayState.READY, RelayState.TRANSACTION, RelayState.IDLE}),
}
_IDLE, _READY = RelayState.IDLE, RelayState.READY
_TRANSACTION, _SENDING = RelayState.TRANSACTION, RelayState.SENDING
_CONN_CLOSED = ClientState.CLOSED


class LockstepRelay:
    """The backend side of one client session; its life is a ``RelayState``."""

    def __init__(self, pool: BackendPool, config: BackendConfig):
        self.pool = pool
        self.config = config
        self.state = RelayState.IDLE
        self._conn: Optional[BackendProtocol] = None
        # Whether the connection held came from the pool's idle list (the
        # backend may have closed it meanwhile: MAIL then retries once).
        self._reused = False
        # What the client did, not where the backend stands: it hung up
        # while its message was pending, so the final dot is withheld.
        self._client_gone = False

    def _move_to(self, new: RelayState) -> None:
        if new not in _RELAY_MOVES[self.state]:
            raise TransitionError(self, self.state, new)
        self.state = new

    async def extensions(self) -> Optional[dict[str, str]]:
        """The backend's EHLO extensions, learning them once if need be."""
        if self.pool.extensions is None:
            try:
                conn, _ = await self.pool.acquire()
            except BackendError as e:
                log.warn("backend unavailable while answering EHLO: {detail}", detail=e.detail)
                return None
            self.pool.release(conn, dirty=False)
        return self.pool.extensions

    async def mail(self, session: Session, txn: Transaction) -> Reply:
        line = f"MAIL FROM:<{txn.sender.text}>{_params(txn.mail_params)}".encode("utf-8")
        announce = self.config.xclient or self.config.xforward
        if self.state is not _READY and self.state is not _IDLE:
            # A second MAIL with a transaction open (or a message being sent).
            raise TransitionError(self, self.state, _TRANSACTION)
        # A pooled connection may have been closed by the backend while idle;
        # then one fresh connection is tried before the client hears a 4xx.
        for attempt in (1, 2):
            conn = self._conn
            # Only a connection that is not brand new may be stale.
            may_retry = attempt == 1 and conn is not None and conn.state is not _CONN_CLOSED
            try:
                if conn is None or conn.state is _CONN_CLOSED:
                    conn = await self._connection()
                may_retry = may_retry or (attempt == 1 and self._reused)
                if announce:
                    await self._announce_client(conn, session)
                reply = await conn.command(line, self.config.mail_timeout)
                if reply.code == 421 and may_retry:
                    # The backend is closing this idle connection (its own
                    # idle timeout): try a fresh one before blaming it.
                    self._drop()
                    continue
            except BackendError as e:
                self._drop()
                if may_retry:
                    continue
                log.warn("backend failed at MAIL: {detail}", detail=e.detail, session_id=session.id)
                return e.reply
            break
        if 200 <= reply.code < 300:
            self._move_to(_TRANSACTION)
        return self._relayable(reply, session, "MAIL")

    async def rcpt(self, session: Session, txn: Transaction, rcpt: Address,
                   params: dict[str, Optional[str]]) -> Reply:
        conn = self._conn
        if conn is None:
            return Reply(451, "4.4.2", "Connection to next-hop mail server lost, try again later")
        line = f"RCPT TO:<{rcpt.text}>{_params(params)}".encode("utf-8")
        try:
            reply = await conn.command(line, self.config.rcpt_timeout)
        except BackendError as e:
            self._drop()
            log.warn("backend failed at RCPT: {detail}", detail=e.detail, session_id=session.id)
            return e.reply
        return self._relayable(reply, session, "RCPT")

    async def data(self, session: Session, txn: Transaction, message: OutboundMessage) -> Reply:
        conn = self._conn
        if conn is None:
            return Reply(451, "4.4.2", "Connection to next-hop mail server lost, try again later")
        self._move_to(_SENDING)
        try:
            reply, sent = await conn.send_message(message.chunks(), self.config,
                                                  abandoned=lambda: self._client_gone)
        except BackendError as e:
            self._drop()
            log.warn("backend failed at DATA: {detail}", detail=e.detail, session_id=session.id)
            return e.reply
        except BaseException:
            # Anything else (the spool unreadable) leaves the backend inside
            # the message: the connection cannot be used again.
            self._drop()
            raise
        if not sent and reply.code < 400:
            # Anything but 354 or a refusal to DATA is out of protocol: the
            # message was not taken, whatever the code says.
            return self._out_of_protocol(reply, session, "DATA")
        # A final reply to the content ends the backend's transaction; a
        # refused DATA command leaves it open, so it is reset now (queued
        # before the client's next MAIL).
        self._move_to(_READY if sent else _TRANSACTION)
        relayed = self._relayable(reply, session, "end of data" if sent else "DATA")
        if not sent and self._conn is not None:
            self.reset()
        return relayed

    def _relayable(self, reply: Reply, session: Session, what: str) -> Reply:
        """The backend's reply as the client gets it (RFC 5321 4.2: a
        positive completion here is 2yz; 421 closes the connection)."""
        if reply.code == 421:
            self._drop()
            return _as_transient(reply)
        if not (200 <= reply.code < 300 or 400 <= reply.code < 600):
            return self._out_of_protocol(reply, session, what)
        return ensure_enhanced(reply)

    def _out_of_protocol(self, reply: Reply, session: Session, what: str) -> Reply:
        """A reply code that makes no sense at this step (a 3yz to MAIL, a
        2yz to DATA): the backend's state is unknown, so the connection is
        dropped and the client keeps its message (docs/design.md promise 1)."""
        log.warn("backend answered {what} with {reply}; dropping the connection", what=what,
                 reply=str(reply), session_id=session.id)
        self._drop()
        return Reply(451, "4.5.0", "Next-hop mail server answered out of protocol, try again later")

    def client_gone(self) -> None:
        """Stop a message still being sent before its final dot: with no
        client to hear the 250, completing it would only make the client's
        retry a duplicate (docs/design.md promise 1)."""
        self._client_gone = True

    def reset(self) -> None:
        """The client's transaction ended without a message (RSET, refused
        MAIL, framing error): the backend must forget it too."""
        state = self.state
        if state is _SENDING:
            self._drop()
            return
        if state is _TRANSACTION and self._conn is not None:
            # READY first: a RSET that fails at once drops the connection (IDLE).
            self._move_to(_READY)
            d = self._conn.command(b"RSET", self.config.mail_timeout)
            d.addErrback(self._rset_failed)

    def _rset_failed(self, failure: Failure) -> None:
        failure.trap(BackendError)  # type: ignore[no-untyped-call]  # Twisted's Failure.trap is unannotated
        self._drop()

    def finish(self) -> None:
        """The client session is over: the connection goes back to the pool."""
        state = self.state
        if state is _SENDING:
            self._drop()
            return
        conn, self._conn = self._conn, None
        if state is not _IDLE:
            self._move_to(_IDLE)
        if conn is not None:
            if conn.xclient_for is not None:
                conn.close()
            else:
                self.pool.release(conn, state is _TRANSACTION)

    async def _connection(self) -> BackendProtocol:
        if self._conn is None or self._conn.state is _CONN_CLOSED:
            self._conn, self._reused = await self.pool.acquire()
            if self.state is _IDLE:
                self._move_to(_READY)
        return self._conn

    async def _announce_client(self, conn: BackendProtocol, session: Session) -> None:
        """XCLIENT / XFORWARD (Postfix), so the backend logs and checks the
        real client instead of the proxy."""
        attrs = {
            "NAME": "[UNAVAILABLE]",
            "ADDR": session.peer_host,
            "PORT": str(session.peer_port),
            "PROTO": "ESMTP" if session.esmtp else "SMTP",
            "HELO": session.helo or "[UNAVAILABLE]",
        }
        if self.config.xclient and "XCLIENT" in conn.extensions:
            if conn.xclient_for == session.id:
                return  # once per connection: Postfix refuses a second one
            await self._send_attributes(conn, "XCLIENT", attrs, 220)
            # From now on the backend takes this connection for the client's
            # own; it is closed, not pooled, when the session ends.
            conn.xclient_for = session.id
            # XCLIENT restarts the backend's session: greet it again, with the
            # client's own HELO name, which a new EHLO would otherwise replace
            # (Postfix XCLIENT_README).
            helo = session.helo or self.pool.helo_name
            await self._expect_ok(conn, b"EHLO " + helo.encode("utf-8", "replace"), 250, "EHLO after XCLIENT")
        elif self.config.xforward and "XFORWARD" in conn.extensions:
            await self._send_attributes(conn, "XFORWARD", attrs, 250)

    async def _send_attributes(self, conn: BackendProtocol, verb: str, attrs: dict[str, str],
                               expected: int) -> None:
        """Send the attributes the backend says it takes (its EHLO line)."""
        offered = set(conn.extensions[verb].upper().split())
        words = " ".join(f"{k}={_xtext(v)}" for k, v in attrs.items() if k in offered)
        await self._expect_ok(conn, f"{verb} {words}".encode("ascii"), expected, verb)

    async def _expect_ok(self, conn: BackendProtocol, line: bytes, expected: int, what: str) -> None:
        reply = await conn.command(line, self.config.mail_timeout)
        if reply.code != expected:
            raise BackendError(_as_transient(reply), f"backend refused {what}: {reply}")

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        self._reused = False
        if self.state is not _IDLE:
            self._move_to(_IDLE)
        if conn is not None:
            conn.abort()
