"""The service of ``--mode policy``: the policy listeners, the engine's
runtime, reload on SIGHUP.

Construction does no I/O (STYLE.md); ``privilegedStartService`` binds the
TCP listeners of ``policyd.listen`` (before twistd's ``--uid``/``--gid``
gives up root); ``startService`` builds the runtime (``policy/runtime.py``,
the one way to get an engine) and accepts on them.  A reload builds the new configuration off the reactor
thread, then rebuilds the engine (``PolicyRuntime.reconfigure``, which keeps
the DNS cache and the database) and opens or closes listeners; connections
stay open and requests in flight finish with the engine they began with.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Optional

from twisted.internet import defer

from mppproxy.config.schema import ProxyConfig
from mppproxy.edge.context import resolve_hostname
from mppproxy.match import TrustedNetworks
from mppproxy.listeners import listen_on
from mppproxy.logsetup import Logger
from mppproxy.policy.runtime import PolicyRuntime, make_database
from mppproxy.policyd.protocol import PolicyServerFactory
from mppproxy.reloading import ReloadOnHup, TopService, sync_listeners
from mppproxy.workers import (StopOnce, WorkerSupervisor, adopt_listeners, bind_listeners,
                              close_sockets)

log = Logger()


def open_database(config: ProxyConfig, reactor: Any) -> Optional[Any]:
    """The shared state database for the greylist and auto-blacklist
    stores, started (its tables are created in the background; an
    unreachable database is logged and tried again on each use)."""
    database = make_database(config, reactor)
    database.start()
    return database


class PolicyServerService(ReloadOnHup, TopService):
    """``twistd mppproxy --mode policy``."""

    def __init__(self, config: ProxyConfig, reactor: Any,
                 reload_config: Optional[Callable[[], ProxyConfig]] = None,
                 database: Optional[Any] = None,
                 inherited_fds: tuple[tuple[int, int], ...] = (),
                 worker_argv: Optional[list[str]] = None):
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.reload_config = reload_config
        self.database = database
        self.runtime: Optional[PolicyRuntime] = None
        self.factory: Optional[PolicyServerFactory] = None
        self.ports: dict[str, Any] = {}
        self.hostname = ""
        # workers > 1: the main process supervises the workers; a worker
        # serves the listeners it inherited (mppproxy/workers.py).
        self.inherited_fds = inherited_fds
        self.worker_argv = worker_argv
        self.workers: Optional[WorkerSupervisor] = None
        self.adopted: list[Any] = []
        self._stop_once = StopOnce(reactor)
        # Listening sockets bound by privilegedStartService, by endpoint.
        self.prebound: dict[str, Any] = {}

    # -- the engine

    def _engine(self) -> Any:
        if self.runtime is None or not self.config.policy.enabled:
            return None
        return self.runtime.engine

    def _make_runtime(self, config: ProxyConfig) -> PolicyRuntime:
        # Built even with policy.enabled = false (construction does no I/O),
        # so a reload that turns the engine on finds its resolver and
        # database in place.
        if self.database is None:
            self.database = open_database(config, self.reactor)
        return PolicyRuntime(config, self.reactor, self.hostname, database=self.database)

    def _configure_factory(self, config: ProxyConfig) -> None:
        assert self.factory is not None
        self.factory.config = config.policyd
        self.factory.trusted = TrustedNetworks(config.trusted_networks)
        self.factory.skip_trusted = config.policy.skip_trusted

    # -- lifetime

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if not self.inherited_fds:  # a worker's listeners are the main process's
            count = (self.config.workers
                     if self.config.workers > 1 and self.worker_argv is not None else 1)
            self.prebound = bind_listeners(self.reactor, self.config.policyd.listen,
                                           self.config.listen_backlog, count)

    def startService(self) -> None:
        super().startService()
        os.makedirs(self.config.data_dir, exist_ok=True)
        self.hostname = resolve_hostname(self.config)
        self.runtime = self._make_runtime(self.config)
        if not self.config.policy.enabled:
            log.warn("policy.enabled is false: every policy request is answered DUNNO")
        self.factory = PolicyServerFactory(self.config.policyd, self._engine, self.reactor)
        self._configure_factory(self.config)
        if self.inherited_fds:
            self.adopted = adopt_listeners(self.reactor, self.inherited_fds, self.factory,
                                           self._stop_once)
        elif self.config.workers > 1 and self.worker_argv is not None:
            self.workers = WorkerSupervisor(self.reactor, self.ports, self.worker_argv,
                                            self.config.workers, "policy worker")
            for desc in self.config.policyd.listen:
                self.workers.listen(desc, self.factory, self.config.listen_backlog, self._listen,
                                    self.prebound)
            self.workers.start()
        else:
            for desc in self.config.policyd.listen:
                self._listen(desc)
        self.reload_on_hup()
        log.info("mppproxy policy server starting (Postfix check_policy_service), "
                 "default action {action}", action=self.config.policyd.default_action)

    def _listen(self, desc: str) -> defer.Deferred[None]:
        return listen_on(self.reactor, desc, self.factory, self.config.listen_backlog,
                         self.ports, desc, "policy server", self.prebound)

    def apply(self, config: ProxyConfig) -> None:
        """Swap in a new, already validated configuration."""
        assert self.runtime is not None
        self.runtime.reconfigure(config)
        self._configure_factory(config)
        if not self.inherited_fds:
            # A worker's listeners are the main process's.
            sync_listeners(self.ports, config.policyd.listen, self._listen,
                           self.workers.forget if self.workers is not None else None)
        if self.workers is not None:
            self.workers.signal_all("HUP")
        self.config = config
        if not config.policy.enabled:
            log.warn("policy.enabled is false: every policy request is answered DUNNO")
        log.info("configuration reloaded")

    def stopService(self) -> Any:
        close_sockets(self.prebound)
        ds = [defer.maybeDeferred(p.stopListening) for p in [*self.ports.values(), *self.adopted]]
        if self.workers is not None:
            ds.append(self.workers.stop(self.config.timeouts.shutdown_grace))
        self.ports.clear()
        if self.factory is not None:
            # Requests in flight are answered first (within the grace);
            # the runtime they use stops after them.
            ds.append(self.factory.drain(self.config.timeouts.shutdown_grace))
        d = defer.DeferredList(ds)
        d.addBoth(lambda _: self._stop_the_rest())
        return d

    def _stop_the_rest(self) -> defer.Deferred[Any]:
        ds = []
        if self.runtime is not None:
            ds.append(self.runtime.stop())
        ds.append(defer.maybeDeferred(super().stopService))
        return defer.DeferredList(ds)
