"""Listening sockets of every mode: open or adopt one, and exit non-zero
when none opens (docs/design.md, "Floors": composition).

Shared by the proxy (``service.py``), the policy server
(``policyd/service.py``), the scan service (``scanservice/service.py``) and
the worker processes (``workers.py``, which bind the same descriptions);
a module of its own so that none of them imports another for it.
"""
from __future__ import annotations

import os
from typing import Any, Optional

from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.python.failure import Failure

from mppproxy.logsetup import Logger

log = Logger()


def listen_on(reactor: Any, desc: str, factory: Any, backlog: int, ports: dict[Any, Any],
              key: Any, what: str = "", prebound: Optional[dict[str, Any]] = None) -> defer.Deferred[None]:
    """Listen on the endpoint ``desc``; the port lands in ``ports[key]``.
    A socket ``bind_listeners`` bound already (in ``prebound``) is adopted
    instead.  A listener that cannot be opened is logged; when no listener
    of the service is open, the process exits non-zero rather than run deaf.
    Shared by the proxy, the policy server and the scan service."""
    label = f"{what} " if what else ""
    sockets = (prebound or {}).pop(desc, None)
    if sockets:
        sock = sockets[0]
        ports[key] = reactor.adoptStreamPort(sock.fileno(), sock.family, factory)
        sock.close()  # adoptStreamPort holds its own copy
        log.info("{label}listening on {endpoint}", label=label, endpoint=desc)
        return defer.succeed(None)
    # Twisted's serverFromString carries no annotations.
    endpoint = serverFromString(reactor, with_backlog(desc, backlog))  # type: ignore[no-untyped-call]  # Twisted's is unannotated

    def listening(port: Any) -> None:
        ports[key] = port
        log.info("{label}listening on {endpoint}", label=label, endpoint=desc)

    def failed(f: Failure) -> None:
        log.critical("cannot listen on {endpoint}: {error}", endpoint=desc, error=str(f.value))
        if not ports:
            reactor.callLater(0, _stop_with_error, reactor)

    d: defer.Deferred[None] = endpoint.listen(factory).addCallbacks(listening, failed)
    return d


def with_backlog(desc: str, backlog: int) -> str:
    """Add ``backlog=`` to a tcp/tcp6 endpoint description that lacks one."""
    kind = desc.split(":", 1)[0].lower()
    if kind in ("tcp", "tcp6") and "backlog=" not in desc:
        return f"{desc}:backlog={backlog}"
    return desc


def _stop_with_error(reactor: Any) -> None:
    log.critical("no listener could be started; stopping")
    _exit_code[0] = 1
    reactor.stop()


_exit_code = [0]


def start_failed() -> bool:
    """Whether the service is stopping because no listener opened (then
    no readiness is reported to systemd: ``tap.py``)."""
    return bool(_exit_code[0])


def exit_code_hook(reactor: Any) -> None:
    """twistd exits 0 after reactor.stop(); make a failed start exit 1."""
    def exit_now() -> None:
        if _exit_code[0]:
            os._exit(_exit_code[0])

    reactor.addSystemEventTrigger("after", "shutdown", exit_now)
