"""The top service of one node: listeners, the gateway, reload on SIGHUP.

Construction does no I/O (STYLE.md): ``make_service`` only builds objects;
``privilegedStartService`` binds the TCP listeners (before twistd's
``--uid``/``--gid`` gives up root, so port 25 needs no capability);
``startService`` builds the rest and accepts on them.  A reload builds a
complete new configuration and context and swaps them into the factory;
sessions already running keep the snapshot they began with, and no open
session is dropped.  ``stopService`` lets the messages in flight finish
within ``timeouts.shutdown_grace`` and fires when they have.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Optional

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString

from mppproxy.config.schema import ProxyConfig, spool_directory
from mppproxy.gateway import SessionGateway, make_context, resolve_hostname
from mppproxy.logsetup import Logger
from mppproxy.policy.runtime import PolicyRuntime, runtime_for
from mppproxy.reloading import ReloadOnHup, sync_listeners
from mppproxy.smtp.server import ConnectionCounter, SMTPServerFactory
from mppproxy.tlsconfig import backend_context, server_context
from mppproxy.workers import (StopOnce, WorkerSupervisor, adopt_listeners, bind_listeners,
                              close_sockets)

log = Logger()


class ProxyService(ReloadOnHup, MultiService):
    """The edge proxy (and, in all-in-one mode, local delivery)."""

    def __init__(self, config: ProxyConfig, reactor: Any,
                 reload_config: Optional[Callable[[], ProxyConfig]] = None,
                 inherited_fds: tuple[tuple[int, int], ...] = (),
                 worker_argv: Optional[list[str]] = None):
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.reload_config = reload_config
        self.inherited_fds = inherited_fds
        self.worker_argv = worker_argv
        self.counter = ConnectionCounter()
        self.factory: Optional[SMTPServerFactory] = None
        self.ports: dict[str, Any] = {}
        self.adopted: list[Any] = []
        self.workers: Optional[WorkerSupervisor] = None
        self._stop_once = StopOnce(reactor)
        self._ctx: Any = None
        self.policy: Optional[PolicyRuntime] = None
        # Listening sockets bound by privilegedStartService, by endpoint.
        self.prebound: dict[str, Any] = {}

    def _build_factory_parts(self, config: ProxyConfig) -> tuple[Any, Any]:
        threadpool = self.reactor.getThreadPool()
        bctx = backend_context(config.backend) if config.backend else None
        ctx = make_context(config, self.reactor, threadpool, bctx, self.policy)
        tls = server_context(config, ctx.hostname)
        return ctx, tls

    def _update_policy(self, config: ProxyConfig) -> None:
        """Start, reconfigure or stop the policy runtime for ``config``; its
        resolver cache and database connections survive a reload."""
        if not config.policy.enabled:
            if self.policy is not None:
                self.policy.stop()
                self.policy = None
        elif self.policy is None:
            self.policy = runtime_for(config, self.reactor, resolve_hostname(config))
        else:
            self.policy.reconfigure(config)

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if not self.inherited_fds:  # a worker's listeners are the main process's
            self.prebound = bind_listeners(self.reactor, self.config.listen,
                                           self.config.listen_backlog, self._processes())

    def _processes(self) -> int:
        return self.config.workers if self.config.workers > 1 and self.worker_argv is not None else 1

    def startService(self) -> None:
        super().startService()
        os.makedirs(self.config.data_dir, exist_ok=True)
        os.makedirs(spool_directory(self.config), mode=0o700, exist_ok=True)
        self._update_policy(self.config)
        self._ctx, tls = self._build_factory_parts(self.config)
        ctx = self._ctx
        self.factory = SMTPServerFactory(self.config, lambda: SessionGateway(ctx), self.reactor,
                                         tls_context=tls, counter=self.counter,
                                         is_trusted=ctx.trusted, hostname=ctx.hostname)
        if self.inherited_fds:
            self.adopted = adopt_listeners(self.reactor, self.inherited_fds, self.factory,
                                           self._stop_once)
        elif self.config.workers > 1 and self.worker_argv is not None:
            self.workers = WorkerSupervisor(self.reactor, self.ports, self.worker_argv,
                                            self.config.workers)
            for desc in self.config.listen:
                self.workers.listen(desc, self.factory, self.config.listen_backlog, self._listen,
                                    self.prebound)
            self.workers.start()
        else:
            for desc in self.config.listen:
                self._listen(desc)
        self.reload_on_hup()
        log.info("mppproxy {mode} starting, {target}", mode=self.config.mode,
                 target=(f"relaying to {self.config.backend.host}:{self.config.backend.port}"
                         if self.config.backend else
                         f"delivering to Maildirs under {os.path.abspath(self.config.data_dir)}"))

    def _listen(self, desc: str) -> None:
        listen_on(self.reactor, desc, self.factory, self.config.listen_backlog, self.ports, desc,
                  prebound=self.prebound)

    def apply(self, config: ProxyConfig) -> None:
        """Swap in a new, already validated configuration (``reload``)."""
        os.makedirs(spool_directory(config), mode=0o700, exist_ok=True)
        self._update_policy(config)
        ctx, tls = self._build_factory_parts(config)
        old_ctx = self._ctx
        assert self.factory is not None
        self._ctx = ctx
        self.factory.config = config
        self.factory.make_handler = lambda: SessionGateway(ctx)
        self.factory.tls_context = tls
        self.factory.is_trusted = ctx.trusted
        self.factory.hostname = ctx.hostname
        if not self.inherited_fds:
            # A worker's listeners are the main process's.
            sync_listeners(self.ports, config.listen, self._listen,
                           self.workers.forget if self.workers is not None else None)
        if self.workers is not None:
            self.workers.signal_all("HUP")
        self.config = config
        if old_ctx is not None and old_ctx.pool is not None:
            # Idle backend connections follow the old settings; running
            # sessions still hold their own and give them back later.
            old_ctx.pool.close_all()
        log.info("configuration reloaded")

    def stopService(self) -> defer.Deferred:
        """Stop accepting, let the messages in flight finish (at most
        ``timeouts.shutdown_grace``), then close the backend pool and the
        policy engine, which those messages still use.  twistd waits for
        the Deferred (a 'before shutdown' trigger)."""
        grace = self.config.timeouts.shutdown_grace
        close_sockets(self.prebound)
        ds = [defer.maybeDeferred(p.stopListening) for p in self.ports.values()]
        ds += [defer.maybeDeferred(p.stopListening) for p in self.adopted]
        if self.workers is not None:
            ds.append(self.workers.stop(grace))
        if self.factory is not None:
            ds.append(self.factory.shut_down(grace))
        d = defer.DeferredList(ds)
        d.addBoth(lambda _: self._stop_the_rest())
        return d

    def _stop_the_rest(self) -> defer.Deferred:
        if self._ctx is not None and self._ctx.pool is not None:
            self._ctx.pool.close_all()
        ds = [defer.maybeDeferred(super().stopService)]
        if self.policy is not None:
            ds.append(self.policy.stop())
        return defer.DeferredList(ds)


def listen_on(reactor: Any, desc: str, factory: Any, backlog: int, ports: dict,
              key: Any, what: str = "", prebound: Optional[dict] = None) -> defer.Deferred:
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
    endpoint = serverFromString(reactor, with_backlog(desc, backlog))
    d = endpoint.listen(factory)

    def listening(port: Any) -> None:
        ports[key] = port
        log.info("{label}listening on {endpoint}", label=label, endpoint=desc)

    def failed(f: Any) -> None:
        log.critical("cannot listen on {endpoint}: {error}", endpoint=desc, error=str(f.value))
        if not ports:
            reactor.callLater(0, _stop_with_error, reactor)

    d.addCallbacks(listening, failed)
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


def exit_code_hook(reactor: Any) -> None:
    """twistd exits 0 after reactor.stop(); make a failed start exit 1."""
    reactor.addSystemEventTrigger("after", "shutdown",
                                  lambda: os._exit(_exit_code[0]) if _exit_code[0] else None)
