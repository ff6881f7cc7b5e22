"""The service of ``--mode archive``: receiver, queue, writer and store of
the central archive node, reload on SIGHUP.

Composition (docs/design.md, "Floors").  Construction does no I/O
(STYLE.md); ``privilegedStartService`` binds ``archive_node.listen``
(before twistd's ``--uid``/``--gid`` gives up root); ``startService``
opens the node's durable queue (recovering what a dead process held),
starts the writer -- which opens the store in the thread pool and keeps
trying while the database is down, so copies are taken into the queue
regardless -- and then accepts edges on the listeners, with STARTTLS and,
with ``archive_node.require_client_cert``, client certificates verified
against ``archive_node.client_ca_file``.  Beside them: the retention purge
every ``store.purge_interval`` seconds and the queue's depth in the log
every minute.

A reload (SIGHUP) applies new keys, edges, TLS settings and listeners to
new sessions; running sessions keep what they began with.  The queue
directory and the store are opened once: changing them needs a restart
(the reload says so in the log).  A stop stops listening, lets each
session's copy in flight finish (``timeouts.shutdown_grace``), stops the
writer after its batch, then closes the queue and the store.
"""
from __future__ import annotations

import os
import socket
from typing import Any, Callable, Optional

from twisted.internet import defer, task
from twisted.internet.threads import deferToThreadPool

from mppproxy._async import as_deferred
from mppproxy.archive.keys import load_keys
from mppproxy.archive.receiver import ArchiveReceiver, ReceiverContext
from mppproxy.archive.writer import CopyWriter
from mppproxy.archivenode.keeper import StoreKeeper
from mppproxy.config.errors import ConfigError
from mppproxy.config.schema import ProxyConfig, spool_directory
from mppproxy.db.nodeconfig import ConfigRecorder
from mppproxy.listeners import listen_on
from mppproxy.logsetup import Logger
from mppproxy.match import TrustedNetworks
from mppproxy.reloading import ReloadOnHup, TopService, sync_listeners
from mppproxy.smtp.server import ConnectionCounter, SMTPServerFactory, SMTPServerProtocol
from mppproxy.spool.queue import DurableQueue
from mppproxy.store.store import ArchiveStore
from mppproxy.tlsconfig import load_ca_certificate, server_context
from mppproxy.config.web import web_wanted
from mppproxy.web.service import WebConsole
from mppproxy.workers import bind_listeners, close_sockets

log = Logger()

# Seconds between the log lines with the node queue's depth and oldest age.
STATS_INTERVAL = 60.0


def queue_directory(config: ProxyConfig) -> str:
    """archive_node.queue_dir, or data_dir/archive-node-queue."""
    return config.archive_node.queue_dir or os.path.join(config.data_dir, "archive-node-queue")


def tls_context(config: ProxyConfig, hostname: str) -> Optional[Any]:
    """STARTTLS for the edges; with require_client_cert, asking for a
    client certificate signed by client_ca_file."""
    node = config.archive_node
    client_ca = None
    if node.require_client_cert:
        client_ca, problem = load_ca_certificate(node.client_ca_file)
        if problem:
            raise ConfigError([f"archive_node.client_ca_file: {problem}"])
    return server_context(config, hostname, client_ca)


class ArchiveFactory(SMTPServerFactory):
    """The SMTP factory, binding each receiver to its session's TLS peer
    certificate (the receiver sees the session, not the transport)."""

    def buildProtocol(self, addr: Any) -> SMTPServerProtocol:
        protocol = super().buildProtocol(addr)
        handler = protocol.handler
        if isinstance(handler, ArchiveReceiver):
            handler.peer_certificate = lambda: _peer_certificate(protocol)
        return protocol


def _peer_certificate(protocol: SMTPServerProtocol) -> Any:
    """The client certificate the TLS handshake verified, or None (no TLS,
    or a client that sent none)."""
    get = getattr(protocol.transport, "getPeerCertificate", None)
    return get() if get is not None else None


class ArchiveService(ReloadOnHup, TopService):
    """``twistd mppproxy --mode archive``."""

    def __init__(self, config: ProxyConfig, reactor: Any,
                 reload_config: Optional[Callable[[], ProxyConfig]] = None):
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.reload_config = reload_config
        self.counter = ConnectionCounter()
        self.factory: Optional[ArchiveFactory] = None
        self.ports: dict[str, Any] = {}
        # Listening sockets bound by privilegedStartService, by endpoint.
        self.prebound: dict[str, Any] = {}
        self.queue: Optional[DurableQueue] = None
        self.store: Optional[ArchiveStore] = None
        self.writer: Optional[CopyWriter] = None
        self.keeper: Optional[StoreKeeper] = None
        self.ctx: Optional[ReceiverContext] = None
        self._loops: list[task.LoopingCall] = []
        # The queue directory and store settings opened at start.
        self._opened: tuple[str, Any, str] = ("", None, "")
        # The web console ([web]), a child service.
        self.web: Optional[WebConsole] = None
        # This node's configuration row for the console (db/nodeconfig.py),
        # written on [database] with an engine of its own.
        self.node_config: Optional[ConfigRecorder] = None

    # -- lifetime

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self.prebound = bind_listeners(self.reactor, self.config.archive_node.listen,
                                       self.config.listen_backlog, 1)

    def startService(self) -> None:
        super().startService()
        config = self.config
        os.makedirs(config.data_dir, exist_ok=True)
        os.makedirs(spool_directory(config), mode=0o700, exist_ok=True)
        node = config.archive_node
        # Blocking, once, before anything listens: the receiver needs the
        # queue, and items a dead process held go back first.
        self.queue = DurableQueue(queue_directory(config))
        self.queue.open()
        # The store, its writer and the retention purge: the same parts an
        # all-in-one node runs on its own queue (archivenode/keeper.py).
        self.keeper = StoreKeeper(self.reactor, config, self.queue)
        self.store, self.writer = self.keeper.store, self.keeper.writer
        self._opened = (queue_directory(config), config.store, config.data_dir)
        self.keeper.start()
        self.node_config = ConfigRecorder(self.reactor, config)
        self.node_config.record(config)
        self.node_config.start()
        if web_wanted(config.mode, config.web):
            self.web = WebConsole(config, self.reactor)
            self.web.setServiceParent(self)  # type: ignore[no-untyped-call]  # stopped with the other children (Twisted is unannotated)
        hostname = config.smtp.hostname or socket.getfqdn()
        self.ctx = self._context(config)
        ctx = self.ctx
        self.factory = ArchiveFactory(config, lambda: ArchiveReceiver(ctx), self.reactor,
                                      tls_context=tls_context(config, hostname),
                                      counter=self.counter, is_trusted=ctx.is_edge,
                                      hostname=hostname)
        for desc in node.listen:
            self._listen(desc)
        stats = task.LoopingCall(self._log_stats)
        stats.clock = self.reactor
        self._loops = [stats]
        stats.start(STATS_INTERVAL, now=False)
        self.reload_on_hup()
        log.info("mppproxy archive node starting: edges {edges}, queue {queue}",
                 edges=", ".join(node.edges), queue=self.queue.directory)

    def _context(self, config: ProxyConfig) -> ReceiverContext:
        assert self.queue is not None and self.writer is not None
        node = config.archive_node
        return ReceiverContext(
            reactor=self.reactor, threadpool=self.reactor.getThreadPool(), queue=self.queue,
            keys=load_keys(node.key_file), is_edge=TrustedNetworks(node.edges),
            require_client_cert=node.require_client_cert,
            max_message_size=config.limits.max_message_size, on_queued=self.writer.wake)

    def _listen(self, desc: str) -> None:
        listen_on(self.reactor, desc, self.factory, self.config.listen_backlog, self.ports, desc,
                  "archive node", self.prebound)

    def apply(self, config: ProxyConfig) -> None:
        """Swap in a new, already validated configuration (``reload``):
        keys, edges, TLS and listeners for new sessions."""
        assert self.factory is not None
        os.makedirs(spool_directory(config), mode=0o700, exist_ok=True)
        hostname = config.smtp.hostname or socket.getfqdn()
        ctx = self._context(config)
        tls = tls_context(config, hostname)
        if (queue_directory(config), config.store, config.data_dir) != self._opened:
            log.warn("archive node: a new queue directory, data directory or [store] "
                     "takes a restart; the running ones are kept")
        self.ctx = ctx
        if self.keeper is not None:
            self.keeper.config = config  # retention and purge settings apply at once
        self.factory.config = config
        self.factory.make_handler = lambda: ArchiveReceiver(ctx)
        self.factory.tls_context = tls
        self.factory.is_trusted = ctx.is_edge
        self.factory.hostname = hostname
        if self.web is not None:
            self.web.apply(config)
        self.config = config
        sync_listeners(self.ports, config.archive_node.listen, self._listen)
        if self.node_config is not None:
            self.node_config.record(config)
        log.info("configuration reloaded")

    def stopService(self) -> defer.Deferred[Any]:
        """Stop accepting, let the copies in flight be queued (at most
        ``timeouts.shutdown_grace``), then stop the writer after its batch
        and close the queue and the store."""
        close_sockets(self.prebound)
        ds = [defer.maybeDeferred(p.stopListening) for p in self.ports.values()]
        self.ports.clear()
        if self.factory is not None:
            ds.append(self.factory.shut_down(self.config.timeouts.shutdown_grace))
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops = []
        if self.node_config is not None:
            ds.append(self.node_config.stop())
        d: defer.Deferred[Any] = defer.DeferredList(ds)
        d.addBoth(lambda _: as_deferred(self._stop_the_rest()))
        return d

    async def _stop_the_rest(self) -> None:
        if self.keeper is not None:
            await self.keeper.stop()
        if self.queue is not None:
            self.queue.close()
        await defer.maybeDeferred(super().stopService)

    def _log_stats(self) -> defer.Deferred[None]:
        return as_deferred(self._log_stats_once())

    async def _log_stats_once(self) -> None:
        if self.queue is None:
            return
        try:
            await deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                    self.queue.log_stats)
        except OSError as e:
            log.error("cannot count the archive node queue: {error}", error=str(e))
