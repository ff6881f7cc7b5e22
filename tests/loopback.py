"""The proxy in-process on loopback, and blocking SMTP clients for a thread.

``start_proxy(testcase, config)`` runs ``mppproxy.service.ProxyService`` on
``tcp:0:interface=127.0.0.1`` in the test's reactor and registers its shutdown;
``proxy_config(...)`` builds a ``ProxyConfig`` for it.  Clients (smtplib or
``RawClient``) block, so tests run them with ``deferToThread`` while the reactor
serves the proxy and the fake backend.  Every socket operation has a timeout.
"""
from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from typing import Any, Optional

from twisted.internet import defer, tcp

from fakes_backend import poll_until
from mppproxy.config.schema import (BackendConfig, LimitsConfig, ProxyConfig, SmtpConfig,
                                    TimeoutsConfig, TLSConfig)
from mppproxy.config.load import from_mapping
from mppproxy.service import ProxyService

LISTEN = "tcp:0:interface=127.0.0.1"
PROXY_HOSTNAME = "proxy.test"
#: Seconds a blocking client waits for any one reply.
CLIENT_TIMEOUT = 10.0


def proxy_config(data_dir: str, backend_port: Optional[int] = None, *,
                 backend: Optional[dict[str, Any]] = None,
                 smtp: Optional[dict[str, Any]] = None,
                 limits: Optional[dict[str, Any]] = None,
                 timeouts: Optional[dict[str, Any]] = None,
                 relay_domains: tuple[str, ...] = ("example.com",),
                 trusted_networks: tuple[str, ...] = ("10.255.255.0/24",),
                 tls: bool = False,
                 policy: Optional[dict[str, Any]] = None) -> ProxyConfig:
    """A configuration for one in-process proxy.  127.0.0.1 is *not* trusted
    (relay control applies), like ``--trusted-network 10.255.255.0/24``."""
    backend_cfg = None
    if backend_port is not None:
        backend_cfg = BackendConfig(host="127.0.0.1", port=backend_port, **(backend or {}))
    # [policy], [policies.*], [dns], [database] as TOML-like data, through
    # the real loader (default inheritance, validation).
    extra = {}
    if policy is not None:
        loaded = from_mapping(policy, "test policy")
        extra = {"policy": loaded.policy, "policies": loaded.policies, "dns": loaded.dns,
                 "database": loaded.database}
    return ProxyConfig(
        **extra,
        data_dir=data_dir, listen=(LISTEN,), backend=backend_cfg,
        relay_domains=relay_domains, trusted_networks=trusted_networks,
        smtp=SmtpConfig(**{"hostname": PROXY_HOSTNAME, **(smtp or {})}),
        limits=LimitsConfig(**(limits or {})),
        timeouts=TimeoutsConfig(**(timeouts or {})),
        tls=TLSConfig(enabled=tls),
    )


@dataclass
class InProcessProxy:
    service: ProxyService
    port: int

    @property
    def pool(self) -> Any:
        ctx = self.service._ctx
        return ctx.pool if ctx is not None else None


def start_proxy(testcase: Any, config: ProxyConfig) -> InProcessProxy:
    """Start the service on a free loopback port; the test's cleanup stops it
    and waits (bounded) until every client session has ended."""
    from twisted.internet import reactor

    service = ProxyService(config, reactor)
    service.startService()
    port = service.ports[LISTEN].getHost().port

    async def stop() -> None:
        await service.stopService()
        await poll_until(reactor, lambda: service.counter.total == 0, 5.0,
                         "all proxy sessions closed")

    testcase.addCleanup(lambda: defer.Deferred.fromCoroutine(stop()))
    return InProcessProxy(service, port)


def wait_reactor_quiet(testcase: Any) -> None:
    """Register a cleanup (run last) that waits, bounded, until every socket
    opened during the test is closed, so trial's reactor check sees only real
    leaks, not connections a moment away from closing."""
    from twisted.internet import reactor

    def sockets() -> set[Any]:
        return {s for s in set(reactor.getReaders()) | set(reactor.getWriters())
                if isinstance(s, (tcp.Connection, tcp.Port))}

    baseline = sockets()

    def quiet() -> bool:
        return not (sockets() - baseline)

    def check() -> defer.Deferred[Any]:
        d = poll_until(reactor, quiet, 5.0, "all test sockets closed")
        # A leak is reported by trial's own reactor check, with the objects.
        d.addErrback(lambda f: f.trap(TimeoutError))
        return d

    testcase.addCleanup(check)


# --------------------------------------------------------------------------- clients


class ReplyError(AssertionError):
    pass


class RawClient:
    """A blocking SMTP client that sends exactly the bytes it is given."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = CLIENT_TIMEOUT):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.settimeout(timeout)
        self._buf = b""
        self.replies: list[tuple[int, bytes]] = []
        self.closed = False

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_slowly(self, data: bytes, step: int = 1, pause: float = 0.001) -> None:
        """Send ``data`` ``step`` bytes at a time (bounded by ``len(data)``)."""
        for i in range(0, len(data), step):
            self.sock.sendall(data[i:i + step])
            time.sleep(pause)

    def _line(self) -> Optional[bytes]:
        while b"\n" not in self._buf:
            if len(self._buf) > 65536:
                raise ReplyError(f"over-long reply line: {self._buf[:100]!r}")
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                self.closed = True
                return None
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.rstrip(b"\r")

    def reply(self) -> tuple[int, bytes]:
        """The next (possibly multi-line) reply as (code, text lines joined by
        LF); (0, b"") if the server closed the connection first."""
        texts = []
        for _ in range(1000):
            line = self._line()
            if line is None:
                return (0, b"") if not texts else (-1, b"\n".join(texts))
            if len(line) < 3 or not line[:3].isdigit():
                raise ReplyError(f"not an SMTP reply: {line!r}")
            texts.append(line[4:])
            if line[3:4] != b"-":
                r = (int(line[:3]), b"\n".join(texts))
                self.replies.append(r)
                return r
        raise ReplyError("reply with more than 1000 lines")

    def command(self, line: bytes) -> tuple[int, bytes]:
        self.send(line + b"\r\n")
        return self.reply()

    def expect(self, line: bytes, code: int) -> bytes:
        got = self.command(line)
        if got[0] != code:
            raise ReplyError(f"{line!r}: expected {code}, got {got}")
        return got[1]

    def replies_until_close(self, limit: int = 100) -> list[tuple[int, bytes]]:
        """Read replies until the server closes (at most ``limit``)."""
        out = []
        for _ in range(limit):
            r = self.reply()
            if r[0] == 0:
                break
            out.append(r)
        return out

    def is_closed(self, wait: float = 2.0) -> bool:
        """True if the server closed the connection (reads at most ``wait`` s)."""
        if self.closed:
            return True
        self.sock.settimeout(wait)
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout:
            return False
        except ConnectionResetError:
            chunk = b""
        finally:
            self.sock.settimeout(CLIENT_TIMEOUT)
        if not chunk:
            self.closed = True
            return True
        self._buf += chunk
        return False

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> "RawClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
