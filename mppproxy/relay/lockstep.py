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


from mppproxy.config.schema import BackendConfig
from mppproxy.logsetup import Logger
from mppproxy.message import OutboundMessage
from mppproxy.relay.pool import BackendPool
from mppproxy.smtp.address import Address
from mppproxy.smtp.client import BackendError, BackendProtocol, _as_transient
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


class LockstepRelay:
    """The backend side of one client session."""

    def __init__(self, pool: BackendPool, config: BackendConfig):
        self.pool = pool
        self.config = config
        self._conn: Optional[BackendProtocol] = None
        self._reused = False
        self._dirty = False
        # True while a message is being written to the backend: then the
        # connection must never be reset or handed to another session.
        self._in_data = False
        self._client_gone = False

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
        # A pooled connection may have been closed by the backend while idle;
        # then one fresh connection is tried before the client hears a 4xx.
        for attempt in (1, 2):
            conn = self._conn
            # Only a connection that is not brand new may be stale.
            may_retry = attempt == 1 and conn is not None and not conn.closed
            try:
                if conn is None or conn.closed:
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
        self._dirty = 200 <= reply.code < 300
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
        self._in_data = True
        try:
            reply, sent = await conn.send_message(message.chunks(), self.config,
                                                  abandoned=lambda: self._client_gone)
        except BackendError as e:
            self._drop()
            log.warn("backend failed at DATA: {detail}", detail=e.detail, session_id=session.id)
            return e.reply
        finally:
            self._in_data = False
        if not sent and reply.code < 400:
            # Anything but 354 or a refusal to DATA is out of protocol: the
            # message was not taken, whatever the code says.
            return self._out_of_protocol(reply, session, "DATA")
        # A final reply to the content ends the backend's transaction; a
        # refused DATA command leaves it open, so it is reset now (queued
        # before the client's next MAIL).
        self._dirty = not sent
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
        if self._in_data:
            self._drop()
            return
        if self._conn is not None and self._dirty:
            d = self._conn.command(b"RSET", self.config.mail_timeout)
            d.addErrback(lambda f: f.trap(BackendError) and self._drop())
            self._dirty = False

    def finish(self) -> None:
        """The client session is over: the connection goes back to the pool."""
        if self._in_data:
            self._drop()
            return
        conn, self._conn = self._conn, None
        if conn is not None:
            if conn.xclient_for is not None:
                conn.close()
            else:
                self.pool.release(conn, self._dirty)
        self._dirty = False

    async def _connection(self) -> BackendProtocol:
        if self._conn is None or self._conn.closed:
            self._conn, self._reused = await self.pool.acquire()
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
        self._dirty = False
        self._reused = False
        if conn is not None:
            conn.abort()
