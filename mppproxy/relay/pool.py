"""Backend connections kept open and reused across transactions.

Stage: relay.  Opening a TCP connection and saying EHLO costs the backend
more than relaying a small message, so a finished connection goes back to
an idle list (after RSET if a transaction was left open) and the next
session takes it.  Idle connections close after ``pool_idle_timeout``.
The pool also remembers what the backend announced in EHLO, so the proxy
can announce only extensions the backend also has.
"""
from __future__ import annotations

from typing import Any, Optional


from mppproxy._transitions import StateEnum, TransitionError
from mppproxy.config.schema import BackendConfig
from mppproxy.logsetup import Logger
from mppproxy.smtp.client import BackendError, BackendProtocol, ClientState, connect_backend

log = Logger()

_CONN_CLOSED = ClientState.CLOSED


class PoolState(StateEnum):
    """Whether a pool still parks connections (``BackendPool.state``).

    - ``OPEN``: connections given back are parked (after RSET if need be)
      for the next session.  ``close_all`` (service stop, or the pool of
      the configuration a reload replaced) moves it to CLOSED.
    - ``CLOSED``: whatever is given back is closed; nothing is parked.
      Final; closing again is harmless.
    """

    OPEN = "open"
    CLOSED = "closed"


_POOL_MOVES: dict[PoolState, frozenset[PoolState]] = {
    PoolState.OPEN: frozenset({PoolState.CLOSED}),
    PoolState.CLOSED: frozenset({PoolState.CLOSED}),
}


class BackendPool:
    """The idle backend connections of one configuration; its life is a
    ``PoolState``."""

    def __init__(self, reactor: Any, config: BackendConfig, helo_name: str,
                 tls_context_factory: Any = None):
        self.reactor = reactor
        self.config = config
        self.helo_name = helo_name
        self.tls_context_factory = tls_context_factory
        # Idle connections with the time each expires, oldest first; one timer
        # for the oldest (a timer per parked connection cost a callLater and
        # a cancel per relayed message).
        self._idle: list[tuple[BackendProtocol, float]] = []
        self._sweep: Any = None
        self.extensions: Optional[dict[str, str]] = None
        self.opened = 0
        self.reused = 0
        self.state = PoolState.OPEN
        # For the metrics (issue 16): connections of this pool open now
        # (idle or lent to a session), connection attempts that failed,
        # and whether the last attempt worked (None before the first).
        self.open = 0
        self.connect_failures = 0
        self.backend_up: Optional[bool] = None

    def _move_to(self, new: PoolState) -> None:
        if new not in _POOL_MOVES[self.state]:
            raise TransitionError(self, self.state, new)
        self.state = new

    async def acquire(self) -> tuple[BackendProtocol, bool]:
        """A ready connection, and whether it was reused (a reused one may
        have been closed by the backend meanwhile; the caller retries once)."""
        while self._idle:
            # The newest: the least likely to have been closed meanwhile.
            proto, _ = self._idle.pop()
            if proto.state is not _CONN_CLOSED:
                self.reused += 1
                return proto, True
        try:
            proto = await connect_backend(self.reactor, self.config, self.helo_name,
                                          self.tls_context_factory)
        except BackendError:
            self.connect_failures += 1
            self.backend_up = False
            raise
        self.opened += 1
        self.open += 1
        self.backend_up = True
        if proto.state is _CONN_CLOSED:
            self.open -= 1  # gone already (the greeting's EHLO raced a close)
        else:
            proto.on_lost = self._lost
        self.extensions = proto.extensions
        return proto, False

    def _lost(self) -> None:
        self.open -= 1

    @property
    def idle(self) -> int:
        """Connections parked now (those the backend closed meanwhile not
        counted: they leave the list when next taken or expired)."""
        return sum(1 for proto, _ in self._idle if proto.state is not _CONN_CLOSED)

    def release(self, proto: BackendProtocol, dirty: bool) -> None:
        """Give a connection back.  ``dirty``: a transaction is open on it,
        so it is reset first (RFC 5321 4.1.1.5)."""
        if proto.state is _CONN_CLOSED:
            return
        if self.state is PoolState.CLOSED or len(self._idle) >= self.config.pool_size:
            proto.close()
            return
        if dirty:
            d = proto.command(b"RSET", self.config.mail_timeout)

            def reset(reply: Any) -> None:
                if reply.code == 250:
                    self._park(proto)
                else:
                    proto.close()

            def failed(f: Any) -> None:
                f.trap(BackendError)
                proto.abort()

            d.addCallbacks(reset, failed)
            return
        self._park(proto)

    def _park(self, proto: BackendProtocol) -> None:
        if proto.state is _CONN_CLOSED:
            return
        if self.state is PoolState.CLOSED:
            proto.close()
            return
        timeout = self.config.pool_idle_timeout
        self._idle.append((proto, self.reactor.seconds() + timeout))
        if self._sweep is None:
            self._sweep = self.reactor.callLater(timeout, self._expire)

    def _expire(self) -> None:
        """Close what has been idle for ``pool_idle_timeout``; wait for the next."""
        self._sweep = None
        now = self.reactor.seconds()
        idle = self._idle
        n = 0
        while n < len(idle) and idle[n][1] <= now:
            n += 1
        expired, self._idle = idle[:n], idle[n:]
        for proto, _ in expired:
            proto.close()
        if self._idle:
            self._sweep = self.reactor.callLater(max(0.0, self._idle[0][1] - now), self._expire)

    def close_all(self) -> None:
        self._move_to(PoolState.CLOSED)
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()
        self._sweep = None
        for proto, _ in self._idle:
            proto.close()
        self._idle = []
