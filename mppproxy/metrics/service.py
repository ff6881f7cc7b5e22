"""The metrics of one process, and, in the main process, the HTTP listener
that serves the node's exposition (``GET /metrics``).

Composition floor.  ``ProxyService`` makes one ``NodeMetrics`` when
``metrics.enabled`` and starts it before anything counts:

* every process (main and workers) writes into the node's shared metric
  files (``registry.py``): the hot-path hooks (``hooks.py``) and its state
  gauges every ``metrics.refresh`` seconds (``state.py``);
* the main process also listens on ``metrics.listen``; a scrape refreshes
  its own gauges, forgets the gauges of processes that ended, adds the
  node-wide figures (``node.py``) and makes the text in a pool thread
  (the files are read there, never on the reactor thread).

A worker that dies is forgotten at once (``worker_ended``, from the
supervisor); a process that stops forgets its own gauges.

``metrics.enabled`` and ``metrics.listen`` are read at start (a reload
that changes them says so in the log; a restart applies them);
``refresh`` follows a reload.
"""
from __future__ import annotations

import os
from typing import Any, Optional

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.threads import deferToThreadPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from mppproxy.config.metrics import MetricsConfig
from mppproxy.logsetup import Logger
from mppproxy.metrics.hooks import HotPath
from mppproxy.metrics.node import NodeFigures, NodeSources, Snapshot, SnapshotCollector
from mppproxy.metrics.registry import (Metrics, directory_for, forget_dead, forget_process,
                                       prepare_directory)
from mppproxy.metrics.state import ProcessState, Sources

log = Logger()


class NodeMetrics:
    """One process's metrics; ``node`` given: the main process, which
    serves the exposition.  Construction does no I/O."""

    def __init__(self, reactor: Any, config: MetricsConfig, data_dir: str, sources: Sources,
                 node: Optional[NodeSources] = None, listen_retries: int = 0):
        self.reactor = reactor
        self.config = config
        self.directory = directory_for(data_dir)
        self.sources = sources
        self.node = node
        self.listen_retries = listen_retries
        self.metrics: Optional[Metrics] = None
        self.hot: Optional[HotPath] = None
        self.state: Optional[ProcessState] = None
        self.figures: Optional[NodeFigures] = None
        self.ports: list[Any] = []
        self._stopped = False
        # Fires when every listener is open (or given up on): for tests.
        self.listening: defer.Deferred[None] = defer.Deferred()

    def start(self) -> None:
        """Open this process's metric files (the main process first removes
        those of processes gone), hook into the stages, start the refresh
        and, in the main process, listen."""
        prepare_directory(self.directory, clean=self.node is not None)
        self.metrics = Metrics()
        self.hot = HotPath(self.metrics)
        self.hot.install()
        self.state = ProcessState(self.reactor, self.metrics, self.sources, self.config.refresh)
        self.state.start()
        if self.node is None:
            return
        self.figures = NodeFigures(self.reactor, self.node, self.config.state_cache)
        root = Resource()  # type: ignore[no-untyped-call]  # Twisted's is unannotated
        root.putChild(b"metrics", _MetricsPage(self))  # type: ignore[arg-type]  # zope: Resource provides IResource
        site = _QuietSite(root, reactor=self.reactor)  # type: ignore[no-untyped-call]  # Twisted's is unannotated
        site.noisy = False
        pending = [self._listen(desc, site) for desc in self.config.listen]
        defer.DeferredList(pending).addBoth(
            lambda _: None if self.listening.called else self.listening.callback(None))

    def _listen(self, desc: str, site: Site, attempt: int = 0) -> defer.Deferred[None]:
        done: defer.Deferred[None] = defer.Deferred()
        endpoint = serverFromString(self.reactor, desc)  # type: ignore[no-untyped-call]  # Twisted's is unannotated

        def listening(port: Any) -> None:
            if self._stopped:
                port.stopListening()
            else:
                self.ports.append(port)
                log.info("metrics listening on {endpoint} (GET /metrics)", endpoint=desc)
            done.callback(None)

        def failed(failure: Any) -> None:
            if attempt < self.listen_retries and not self._stopped:
                # A restart: the previous process gives the port up once this
                # one serves mail (leave()); until then, try again.
                self.reactor.callLater(1.0, lambda: self._listen(desc, site, attempt + 1)
                                       .chainDeferred(done))
                return
            log.error("metrics cannot listen on {endpoint}: {error}", endpoint=desc,
                      error=str(failure.value))
            done.callback(None)

        endpoint.listen(site).addCallbacks(listening, failed)
        return done

    # -- events from the service -------------------------------------------------------------

    def worker_ended(self, pid: int) -> None:
        """The supervisor saw worker ``pid`` end: its gauges leave the sums."""
        try:
            forget_process(self.directory, pid)
        except OSError as e:
            log.warn("metrics: cannot remove the gauges of worker {pid}: {error}", pid=pid,
                     error=str(e))

    def reloaded(self, config: MetricsConfig) -> None:
        """A reload was applied."""
        if self.figures is not None:
            self.figures.reloaded()
        if (config.enabled, config.listen) != (self.config.enabled, self.config.listen):
            log.warn("metrics.enabled and metrics.listen take effect at the next start "
                     "(mppproxy restart)")
        if self.state is not None and config.refresh != self.config.refresh:
            self.state.stop()
            self.state.interval = config.refresh
            self.state.start()
        self.config = config

    def stop_listening(self) -> None:
        """Give the port up (a restart's new process takes it)."""
        ports, self.ports = self.ports, []
        for port in ports:
            port.stopListening()

    def stop(self) -> defer.Deferred[Any]:
        """Unhook, stop the refresh and the listeners, forget this
        process's gauges (its counters stay in the sum)."""
        self._stopped = True
        if self.hot is not None:
            self.hot.uninstall()
        if self.state is not None:
            self.state.stop()
        ds = [defer.maybeDeferred(port.stopListening) for port in self.ports]
        self.ports = []
        if self.metrics is not None:
            try:
                forget_process(self.directory, os.getpid())
            except OSError:
                pass
        return defer.DeferredList(ds)

    # -- the exposition ------------------------------------------------------------------

    async def exposition(self) -> bytes:
        """The node's metrics in the Prometheus text format."""
        assert self.state is not None and self.figures is not None
        self.state.refresh()
        snapshot = await self.figures.snapshot()
        text: bytes = await deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                              self._generate, snapshot)
        return text

    def _generate(self, snapshot: Snapshot) -> bytes:
        """In a pool thread: read every process's files, add the node's figures."""
        forget_dead(self.directory)
        registry = CollectorRegistry(auto_describe=False)
        MultiProcessCollector(registry, self.directory)  # type: ignore[no-untyped-call]  # prometheus-client's is unannotated
        collector = SnapshotCollector()
        collector.snapshot = snapshot
        registry.register(collector)
        return generate_latest(registry)


class _QuietSite(Site):
    """No access log line per scrape (one every 15 s from Prometheus)."""

    def log(self, request: Any) -> None:
        pass


class _MetricsPage(Resource):
    isLeaf = True

    def __init__(self, owner: NodeMetrics):
        super().__init__()  # type: ignore[no-untyped-call]  # Twisted's is unannotated
        self.owner = owner

    def render_GET(self, request: Any) -> Any:  # noqa: N802 (Twisted's name)
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        d = defer.Deferred.fromCoroutine(self.owner.exposition())

        def write(body: bytes) -> None:
            if gone:
                return
            request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
            request.write(body)
            request.finish()

        def failed(failure: Any) -> None:
            log.failure("metrics: the exposition failed", failure)
            if gone:
                return
            request.setResponseCode(500)
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            request.write(b"metrics could not be collected; see the log\n")
            request.finish()

        d.addCallbacks(write, failed)
        return NOT_DONE_YET


def for_proxy(proxy: Any) -> Optional[NodeMetrics]:
    """The metrics of a ``service.ProxyService`` (Any: this package sits
    beside it on the composition floor and must not import it), or None
    with ``metrics.enabled`` off.  Read at the time of each call: a reload
    replaces the pool, the stages and the TLS context."""
    config = proxy.config
    if not config.metrics.enabled:
        return None

    def pool() -> Any:
        ctx = proxy._ctx
        return ctx.pool if ctx is not None else None

    def sessions() -> tuple[int, int]:
        # This process's own (the connection counter may be the node's).
        factory = proxy.factory
        return (len(factory.sessions), factory.accepted) if factory is not None else (0, 0)

    sources = Sources(sessions=sessions, pool=pool, scan=lambda: proxy.scan,
                      policy=lambda: proxy.policy)
    if proxy.inherited_fds:  # a worker: its main process serves the exposition
        return NodeMetrics(proxy.reactor, config.metrics, config.data_dir, sources)

    def tls() -> tuple[Any, str]:
        cfg = proxy.config
        label = cfg.tls.cert_file or os.path.join(cfg.data_dir, "tls", "selfsigned.crt")
        factory = proxy.factory
        return (factory.tls_context if factory is not None else None), label

    def database() -> Any:
        policy = proxy.policy
        return policy.database if policy is not None else None

    def queues() -> list[tuple[str, Any]]:
        queue = proxy.archive_queue
        return [("archive", queue)] if queue is not None else []

    node = NodeSources(queues=queues, tls=tls, database=database)
    return NodeMetrics(proxy.reactor, config.metrics, config.data_dir, sources, node,
                       listen_retries=60 if proxy._restarted else 0)
