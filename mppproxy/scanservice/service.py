"""The service of ``--mode scan``: the SMTP and HTTP listeners of
``[scanservice]`` in front of one ``ScanRuntime``, reload on SIGHUP.

Construction does no I/O (STYLE.md); ``privilegedStartService`` binds the
TCP listeners (before twistd's ``--uid``/``--gid`` gives up root);
``startService`` builds the runtime and accepts on them.  A stop lets the
SMTP sessions' messages in flight finish, as the proxy's do.  A reload builds the new configuration off the
reactor thread, then a new runtime; scans in flight finish with the one
they began with; listeners are opened and closed to match.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Optional

from twisted.internet import defer

from mppproxy.config.schema import ProxyConfig, spool_directory
from mppproxy.edge.context import resolve_hostname
from mppproxy.match import TrustedNetworks
from mppproxy.listeners import listen_on
from mppproxy.logsetup import Logger
from mppproxy.reloading import ReloadOnHup, TopService, sync_listeners
from mppproxy.scanservice.core import ScanRuntime
from mppproxy.scanservice.http import make_site
from mppproxy.scanservice.smtp import ScanSessionHandler
from mppproxy.smtp.server import ConnectionCounter, SMTPServerFactory
from mppproxy.tlsconfig import server_context
from mppproxy.workers import bind_listeners, close_sockets

log = Logger()


class ScanService(ReloadOnHup, TopService):
    """``twistd mppproxy --mode scan``."""

    def __init__(self, config: ProxyConfig, reactor: Any,
                 reload_config: Optional[Callable[[], ProxyConfig]] = None):
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.reload_config = reload_config
        self.runtime: Optional[ScanRuntime] = None
        self.trusted = TrustedNetworks(config.trusted_networks)
        self.smtp_factory: Optional[SMTPServerFactory] = None
        self.site: Any = None
        # ("smtp" | "http", endpoint description) -> listening port
        self.ports: dict[tuple[str, str], Any] = {}
        self.counter = ConnectionCounter()
        # Listening sockets bound by privilegedStartService, by endpoint.
        self.prebound: dict[str, Any] = {}

    def _runtime(self) -> ScanRuntime:
        assert self.runtime is not None
        return self.runtime

    def _is_trusted(self, host: str) -> bool:
        return self.trusted(host)

    def _make_handler(self) -> ScanSessionHandler:
        return ScanSessionHandler(self._runtime, self.config.limits.max_message_size)

    def _wanted(self, config: ProxyConfig) -> list[tuple[str, str]]:
        return ([("smtp", d) for d in config.scanservice.smtp_listen]
                + [("http", d) for d in config.scanservice.http_listen])

    # -- lifetime

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self.prebound = bind_listeners(self.reactor, [desc for _, desc in self._wanted(self.config)],
                                       self.config.listen_backlog, 1)

    def startService(self) -> None:
        super().startService()
        os.makedirs(self.config.data_dir, exist_ok=True)
        os.makedirs(spool_directory(self.config), mode=0o700, exist_ok=True)
        self.runtime = ScanRuntime(self.config, self.reactor)
        self.runtime.start()
        hostname = resolve_hostname(self.config)
        self.smtp_factory = SMTPServerFactory(
            self.config, self._make_handler, self.reactor,
            tls_context=server_context(self.config, hostname), counter=self.counter,
            is_trusted=self._is_trusted, hostname=hostname)
        # Idle HTTP connections close after the SMTP command timeout.
        self.site = make_site(self._runtime, self._is_trusted, self.config.limits.max_message_size,
                              self.config.timeouts.command)
        wanted = self._wanted(self.config)
        if not wanted:
            log.critical("scanservice.smtp_listen and http_listen are both empty: nothing to serve")
        for key in wanted:
            self._listen(key)
        self.reload_on_hup()
        log.info("mppproxy scan service starting: nothing is relayed, verdicts only")

    def _listen(self, key: tuple[str, str]) -> defer.Deferred[None]:
        kind, desc = key
        return listen_on(self.reactor, desc, self.smtp_factory if kind == "smtp" else self.site,
                         self.config.listen_backlog, self.ports, key, f"scan service ({kind})",
                         self.prebound)

    def apply(self, config: ProxyConfig) -> None:
        """Swap in a new, already validated configuration."""
        assert self.smtp_factory is not None
        os.makedirs(spool_directory(config), mode=0o700, exist_ok=True)
        old = self.runtime
        self.runtime = ScanRuntime(config, self.reactor)
        self.runtime.start()
        if old is not None:
            old.stop()
        self.trusted = TrustedNetworks(config.trusted_networks)
        self.config = config
        self.smtp_factory.config = config
        for request_class in (self.site.requestFactory,):
            request_class.max_body = config.limits.max_message_size
        sync_listeners(self.ports, self._wanted(config), self._listen)
        log.info("configuration reloaded")

    def stopService(self) -> Any:
        close_sockets(self.prebound)
        ds = [defer.maybeDeferred(p.stopListening) for p in self.ports.values()]
        self.ports.clear()
        if self.smtp_factory is not None:
            ds.append(self.smtp_factory.shut_down(self.config.timeouts.shutdown_grace))
        d = defer.DeferredList(ds)
        d.addBoth(lambda _: self._stop_the_rest())
        return d

    def _stop_the_rest(self) -> defer.Deferred[Any]:
        # After the sessions: their scans still use the runtime.
        if self.runtime is not None:
            self.runtime.stop()
        return defer.maybeDeferred(super().stopService)
