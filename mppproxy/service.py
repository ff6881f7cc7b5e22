"""The top service of one node: listeners, the edge, reload on SIGHUP.

Construction does no I/O (STYLE.md): ``make_service`` only builds objects;
``privilegedStartService`` binds the TCP listeners (before twistd's
``--uid``/``--gid`` gives up root, so port 25 needs no capability);
``startService`` builds the rest and accepts on them.  A reload builds a
complete new configuration and context and swaps them into the factory;
sessions already running keep the snapshot they began with, and no open
session is dropped.  ``stopService`` lets the messages in flight finish
within ``timeouts.shutdown_grace`` and fires when they have.

The archive queue (issue 12): every process opens the node's one durable
queue at start (``archive.queue_dir``; its ``recover`` runs then), and the
hold action and archive copies of every process write into it.  Only the
main process forwards (``archive.node`` set): one forwarder per node, so
``archive.connections`` is the number of connections the archive node
sees from this edge whatever ``workers`` says, one stats line per node,
and no forwarding lost while a worker restarts.  The forwarder polls the
queue each second, so the workers' copies leave without a wake-up.
Without ``archive.node`` nothing here forwards: ``archive_queue`` is the
queue a local writer (``archive/writer.py``) stores from.
"""
from __future__ import annotations

import os
import socket
from typing import Any, Callable, Optional

from twisted.internet import defer

from mppproxy.archive.copies import ArchiveCopies, node_name, open_queue, queue_directory
from mppproxy.archive.forwarder import Forwarder
from mppproxy.archivenode.keeper import StoreKeeper
from mppproxy.archive.keys import KeyFileError, KeyRing, node_keys
from mppproxy.config.schema import ProxyConfig, spool_directory
from mppproxy.edge.context import EdgeContext, make_context, resolve_hostname
from mppproxy.edge.handler import EdgeSession
from mppproxy.edge.traffic import make_recorder, traffic_node
from mppproxy.connshare import (ENV_COLUMN, ENV_PATH, ConnectionTable, SharedConnectionCounter,
                                from_environment, slots_for)
from mppproxy.listeners import listen_on
from mppproxy.logsetup import Logger
from mppproxy.metrics.service import NodeMetrics, for_proxy
from mppproxy.policy.runtime import PolicyRuntime, runtime_for
from mppproxy.scan.runtime import ScanStage
from mppproxy.reloading import ReloadOnHup, TopService, sync_listeners
from mppproxy.restart import (Handover, leave_on_usr2, linger, linger_seconds, place_inherited,
                              stop_accepting)
from mppproxy.smtp.server import ConnectionCounter, SMTPServerFactory
from mppproxy.spool.committer import GroupCommitter, PoolCommitter
from mppproxy.spool.queue import DurableQueue
from mppproxy.tlsconfig import backend_context, server_context
from mppproxy.config.web import web_wanted
from mppproxy.db.nodeconfig import ConfigRecorder
from mppproxy.db.traffic import TrafficRecorder
from mppproxy.web.service import WebConsole
from mppproxy.workers import (WORKER_STOP_MARGIN, StopOnce, WorkerSupervisor, adopt_listeners,
                              bind_listeners, close_sockets)

log = Logger()


class ProxyService(ReloadOnHup, TopService):
    """The edge proxy (and, in all-in-one mode, local delivery)."""

    def __init__(self, config: ProxyConfig, reactor: Any,
                 reload_config: Optional[Callable[[], ProxyConfig]] = None,
                 inherited_fds: tuple[tuple[int, int], ...] = (),
                 worker_argv: Optional[list[str]] = None,
                 inherited: Optional[dict[str, list[socket.socket]]] = None):
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.reload_config = reload_config
        self.inherited_fds = inherited_fds
        self.worker_argv = worker_argv
        # Replaced at start (_connection_counter): shared by the workers.
        self.counter: Any = ConnectionCounter()
        self.factory: Optional[SMTPServerFactory] = None
        self.ports: dict[str, Any] = {}
        self.adopted: list[Any] = []
        self.workers: Optional[WorkerSupervisor] = None
        self._stop_once = StopOnce(reactor)
        self._ctx: Optional[EdgeContext] = None
        # The two stages, built side by side: neither builds the other, so
        # policy.enabled = false leaves scanning as the policies say.
        self.policy: Optional[PolicyRuntime] = None
        self.scan: Optional[ScanStage] = None
        # Listening sockets bound by privilegedStartService, by endpoint.
        self.prebound: dict[str, Any] = {}
        # The archive queue (opened in startService), what the edge copies
        # into it, and the forwarder to the archive node (main process,
        # archive.node set).  Queues left by a reload that moved
        # archive.queue_dir stay open until the stop: sessions that began
        # before it may still write there.
        self.archive_queue: Optional[DurableQueue] = None
        self.archive: Optional[ArchiveCopies] = None
        self.forwarder: Optional[Forwarder] = None
        # Without archive.node: the store, its writer and purge (main process).
        self.keeper: Optional[StoreKeeper] = None
        self._old_queues: list[DurableQueue] = []
        # The web console (all-in-one, embedded store; main process only).
        self.web: Optional[WebConsole] = None
        self._old_committers: list[GroupCommitter | PoolCommitter] = []
        # The dashboard's traffic counts and engine health of this process
        # (edge/traffic.py); None with database.traffic_flush = 0.
        self.traffic: Optional[TrafficRecorder] = None
        # The Prometheus metrics of this process ([metrics], mppproxy/metrics/).
        self.metrics: Optional[NodeMetrics] = None
        # This node's configuration row for the console (db/nodeconfig.py);
        # the main process's only (the workers run the same configuration).
        self.node_config: Optional[ConfigRecorder] = None
        # A restart (restart.py): the listening sockets the previous main
        # process handed on; the ones beyond what this node needs, accepted
        # on here besides; the handover to a later process; and the ports
        # this process stopped accepting on when it handed over.
        self.inherited = inherited or {}
        self._restarted = False
        self._extra_sockets: list[tuple[str, socket.socket]] = []
        self.extra_ports: list[tuple[str, Any]] = []
        self.handover: Optional[Handover] = None
        self.leaving = False
        self._left: list[Any] = []

    def _build_factory_parts(self, config: ProxyConfig) -> tuple[Any, Any]:
        threadpool = self.reactor.getThreadPool()
        bctx = backend_context(config.backend) if config.backend else None
        ctx = make_context(config, self.reactor, threadpool, bctx, self.policy, self.scan,
                           self.archive)
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

    def _update_scan(self, config: ProxyConfig) -> None:
        """A new scan stage for ``config`` (its engines follow the new
        settings); the old one stops watching its engines.  The new one
        starts watching on the next reactor turn: no I/O while building."""
        old = self.scan
        self.scan = ScanStage(config, self.reactor)
        self.scan.start_soon()
        if old is not None:
            old.stop()

    def _update_archive(self, config: ProxyConfig) -> None:
        """Open (or keep) the archive queue for ``config`` and start,
        keep or rebuild the forwarder.  Blocking only when a queue is
        opened (at start, or a reload that moves archive.queue_dir): a few
        directory listings.  The key file is read before anything changes,
        so a key file that cannot be read leaves the running setup as it
        was (ConfigError)."""
        old = self.config if self.archive_queue is not None else None
        forwards = bool(config.archive.node) and not self.inherited_fds
        # Every process verifies the X-MPP-Released mark of released mail
        # with the archive keys: the shared key file, or, without one, the
        # node's own, made at first start (archive/keys.py).
        ring: Optional[KeyRing]
        try:
            ring = node_keys(config)
        except KeyFileError as e:
            if config.archive.key_file:
                raise  # the administrator's file: the loader named it already
            # The node's own key file cannot be made (a full data disk): mail
            # must flow all the same; only the release mark goes unverified.
            log.error("cannot make the archive key file under data_dir ({error}): a released "
                      "message will be held again until it can be made",
                      error="; ".join(e.errors))
            ring = None
        keys = ring if forwards else None
        hostname = resolve_hostname(config)
        queue = self.archive_queue
        directory = queue_directory(config.archive, config.data_dir)
        if queue is None or queue.directory != directory:
            new_queue = open_queue(config.archive, config.data_dir)
            new_queue.open()
            if queue is not None:
                self._old_queues.append(queue)
            queue = self.archive_queue = new_queue
        else:
            # The limits are read at each retry: a reload changes them in place.
            queue.base_delay = config.archive.retry_base
            queue.max_delay = config.archive.retry_max
            queue.max_age = config.archive.max_age
        # One committer thread writes each queue: a reload that keeps the
        # queue keeps its committer; one that moves it ends the old one at the stop.
        previous = self.archive
        committer = previous.committer if previous is not None and previous.queue is queue else None
        if previous is not None and committer is None:
            self._old_committers.append(previous.committer)
        self.archive = ArchiveCopies(self.reactor, queue, config.archive,
                                     node_name(config.archive, hostname), committer)
        self.archive.keys = ring
        forwarder = self.forwarder
        same = (old is not None and forwarder is not None and forwarder.queue is queue
                and old.archive == config.archive and resolve_hostname(old) == hostname
                and old.timeouts.shutdown_grace == config.timeouts.shutdown_grace)
        if same and keys is not None:
            assert forwarder is not None
            forwarder.keys = keys  # a rotated key file takes effect at the next copy
        else:
            if forwarder is not None:
                self.forwarder = None
                forwarder.stop().addErrback(
                    lambda f: log.failure("stopping the old archive forwarder failed", f))
            if keys is not None:
                self._start_forwarder(config, queue, keys, hostname)
        if self.forwarder is not None:
            self.archive.wake = self.forwarder.wake
        self._update_keeper(config, queue)

    def _update_keeper(self, config: ProxyConfig, queue: DurableQueue) -> None:
        """Without archive.node the main process stores the queue's copies
        itself (archivenode/keeper.py: the embedded store by default), so
        a held message is listed and released on this host; a reload that
        changes [store] or [archive_node] starts a new keeper after the old
        one has ended its batch."""
        wanted = not config.archive.node and not self.inherited_fds
        old = self.keeper
        if old is not None and wanted and old.queue is queue and (
                old.config.store, old.config.archive_node, old.config.data_dir) == (
                config.store, config.archive_node, config.data_dir):
            old.config = config
        else:
            self.keeper = None
            started = old.stop() if old is not None else defer.succeed(None)
            if wanted:
                keeper = StoreKeeper(self.reactor, config, queue)
                self.keeper = keeper
                started.addBoth(lambda _: keeper.start() if self.keeper is keeper else None)
        if self.keeper is not None and self.archive is not None:
            self.archive.wake = self.keeper.wake

    def _start_forwarder(self, config: ProxyConfig, queue: DurableQueue, keys: KeyRing,
                         hostname: str) -> None:
        forwarder = Forwarder(self.reactor, self.reactor.getThreadPool(), queue, config.archive,
                              keys, hostname, grace=config.timeouts.shutdown_grace)
        forwarder.start()
        self.forwarder = forwarder

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if not self.inherited_fds:  # a worker's listeners are the main process's
            descs = list(self.config.listen)
            if self.inherited:
                # A restart: the previous process's sockets, never bound anew.
                self.prebound, self._extra_sockets = place_inherited(
                    self.reactor, self.inherited, descs, self._processes())
                self._restarted, self.inherited = True, {}
                descs = [desc for desc in descs if desc not in self.prebound]
            self.prebound.update(bind_listeners(self.reactor, descs, self.config.listen_backlog,
                                                self._processes()))

    def _processes(self) -> int:
        return self.config.workers if self.config.workers > 1 and self.worker_argv is not None else 1

    def startService(self) -> None:
        super().startService()
        os.makedirs(self.config.data_dir, exist_ok=True)
        os.makedirs(spool_directory(self.config), mode=0o700, exist_ok=True)
        # Before the state database starts: its flush at the reactor's
        # shutdown must come before the database's stop (db/traffic.py).
        self.traffic = make_recorder(self.config, self.reactor, lambda: self.policy,
                                     lambda: self.scan)
        if self.traffic is not None:
            self.traffic.start()
        # Before the workers start: they inherit its environment.
        self.metrics = for_proxy(self)
        if self.metrics is not None:
            self.metrics.start()
        self._update_policy(self.config)
        if not self.inherited_fds:
            # Through the policy runtime's state database, when there is one.
            self.node_config = ConfigRecorder(
                self.reactor, self.config,
                lambda: self.policy.database if self.policy is not None else None)
            self.node_config.record(self.config, traffic_node(self.config))
            self.node_config.start()
        self._update_scan(self.config)
        self._update_archive(self.config)
        if (not self.inherited_fds and not self.config.archive.node
                and web_wanted(self.config.mode, self.config.web)):
            self.web = WebConsole(self.config, self.reactor)
            if self._restarted:
                # The previous process gives up the console's port once
                # this one serves mail (leave()); until then, try again.
                self.web.listen_retries = 60
            self.web.setServiceParent(self)  # type: ignore[no-untyped-call]  # stopped with the other children (Twisted is unannotated)
        self._ctx, tls = self._build_factory_parts(self.config)
        ctx = self._ctx
        self.counter = self._connection_counter()
        self.factory = SMTPServerFactory(self.config, lambda: EdgeSession(ctx), self.reactor,
                                         tls_context=tls, counter=self.counter,
                                         is_trusted=ctx.trusted, hostname=ctx.hostname)
        if self.inherited_fds:
            self.adopted = adopt_listeners(self.reactor, self.inherited_fds, self.factory,
                                           self._stop_once)
        elif self.config.workers > 1 and self.worker_argv is not None:
            self.workers = WorkerSupervisor(self.reactor, self.ports, self.worker_argv,
                                            self.config.workers)
            if self.metrics is not None:
                self.workers.on_exit.append(self.metrics.worker_ended)
            if isinstance(self.counter, SharedConnectionCounter):
                share_with_workers(self.workers, self.counter.table)
            for desc in self.config.listen:
                self.workers.listen(desc, self.factory, self.config.listen_backlog, self._listen,
                                    self.prebound)
            self.workers.start(take_over=self._restarted)
        else:
            for desc in self.config.listen:
                self._listen(desc)
        for desc, sock in self._extra_sockets:
            self.extra_ports.append((desc, self.reactor.adoptStreamPort(sock.fileno(), sock.family,
                                                                        self.factory)))
            sock.close()  # adoptStreamPort holds its own copy
        self._extra_sockets = []
        self.reload_on_hup()
        if self.inherited_fds:
            leave_on_usr2(self.reactor, self.leave)  # the main process hands over
        else:
            self.handover = Handover(self.reactor, self.config.data_dir, self._hand_on,
                                     self.leave)
            self.handover.install()
        log.info("mppproxy {mode} starting, {target}", mode=self.config.mode,
                 target=(f"relaying to {self.config.backend.host}:{self.config.backend.port}"
                         if self.config.backend else
                         f"delivering to Maildirs under {os.path.abspath(self.config.data_dir)}"))

    def _connection_counter(self) -> Any:
        """The counter of max_connections and max_connections_per_ip: with
        workers, one table shared by every process of the node (connshare.py:
        the main process makes it, a worker attaches to it); else this
        process's own."""
        if self.inherited_fds:
            try:
                shared = from_environment()
            except (OSError, ValueError) as e:
                log.error("connection limits count this worker alone: the shared table "
                          "cannot be opened ({error})", error=str(e))
                shared = None
            return shared if shared is not None else ConnectionCounter()
        if self.config.workers > 1 and self.worker_argv is not None:
            path = os.path.join(self.config.data_dir, "run", f"connections.{os.getpid()}")
            table = ConnectionTable.create(path, slots_for(self.config.limits.max_connections),
                                           self.config.workers)
            self.reactor.addSystemEventTrigger("after", "shutdown", _remove_quietly, path)
            return SharedConnectionCounter(table, 0)
        return ConnectionCounter()

    def _listen(self, desc: str) -> None:
        listen_on(self.reactor, desc, self.factory, self.config.listen_backlog, self.ports, desc,
                  prebound=self.prebound)

    def _hand_on(self) -> dict[str, list[int]]:
        """The listening descriptors a restart hands to the new process, by
        endpoint: this process's own first, then each worker's."""
        groups: dict[str, list[int]] = {}
        for desc, port in self.ports.items():
            groups[desc] = [port.fileno()]
            if self.workers is not None:
                groups[desc] += [sock.fileno() for sock in self.workers.worker_sockets.get(desc, [])]
        for desc, port in self.extra_ports:
            groups.setdefault(desc, []).append(port.fileno())
        return groups

    def leave(self) -> None:
        """Another process serves the listeners now (a restart, restart.py;
        in a worker: SIGUSR2 from the main process).  Stop accepting without
        closing the sockets, let the sessions (and the workers) end for up
        to ``linger_seconds``, then stop as on SIGTERM: messages still in
        flight finish within the shutdown grace."""
        if self.leaving:
            return
        self.leaving = True
        ports = [*self.ports.values(), *self.adopted, *(port for _, port in self.extra_ports)]
        self._left = stop_accepting(ports)
        self.ports.clear()  # the supervisor's dict too: no worker is restarted
        self.adopted, self.extra_ports = [], []
        if self.web is not None:
            # The new process binds the console's port once it is free (a
            # second's gap for the console, none for mail).
            for port in self.web.ports:
                port.stopListening()
            self.web.ports = []
        if self.metrics is not None:
            self.metrics.stop_listening()  # the new process serves them
        grace = self.config.timeouts.shutdown_grace
        wait = linger_seconds(grace)
        ds = [linger(self.reactor, self.factory, wait)]
        if self.workers is not None:
            ds.append(self.workers.hand_over(wait + grace + WORKER_STOP_MARGIN))
        defer.DeferredList(ds).addBoth(lambda _: self._stop_once())

    def apply(self, config: ProxyConfig) -> None:
        """Swap in a new, already validated configuration (``reload``)."""
        os.makedirs(spool_directory(config), mode=0o700, exist_ok=True)
        self._update_archive(config)
        self._update_policy(config)
        self._update_scan(config)
        if self.traffic is not None:
            self.traffic.node = traffic_node(config)
        if self.metrics is not None:
            self.metrics.reloaded(config.metrics)
        if self.web is not None:
            self.web.apply(config)
        ctx, tls = self._build_factory_parts(config)
        old_ctx = self._ctx
        assert self.factory is not None
        self._ctx = ctx
        self.factory.config = config
        self.factory.make_handler = lambda: EdgeSession(ctx)
        self.factory.tls_context = tls
        self.factory.is_trusted = ctx.trusted
        self.factory.hostname = ctx.hostname
        if not self.inherited_fds and not self.leaving:
            # A worker's listeners are the main process's (and a process
            # that handed over opens none).
            sync_listeners(self.ports, config.listen, self._listen,
                           self.workers.forget if self.workers is not None else None)
        if self.workers is not None:
            self.workers.signal_all("HUP")
        self.config = config
        if old_ctx is not None and old_ctx.pool is not None:
            # Idle backend connections follow the old settings; running
            # sessions still hold their own and give them back later.
            old_ctx.pool.close_all()
        if self.node_config is not None:
            self.node_config.record(config, traffic_node(config))
        log.info("configuration reloaded")

    def stopService(self) -> defer.Deferred[list[tuple[bool, Any]]]:
        """Stop accepting, let the messages in flight finish (at most
        ``timeouts.shutdown_grace``), then close the backend pool and the
        policy engine, which those messages still use.  twistd waits for
        the Deferred (a 'before shutdown' trigger)."""
        grace = self.config.timeouts.shutdown_grace
        close_sockets(self.prebound)
        ds = [defer.maybeDeferred(p.stopListening) for p in self.ports.values()]
        ds += [defer.maybeDeferred(p.stopListening) for p in self.adopted]
        ds += [defer.maybeDeferred(p.stopListening) for _, p in self.extra_ports]
        if self.handover is not None:
            self.handover.abort()  # a new process not yet serving stops too
        if self.workers is not None:
            ds.append(self.workers.stop(grace))
        if self.factory is not None:
            ds.append(self.factory.shut_down(grace))
        if self.forwarder is not None:
            # Alongside the sessions' drain: copies in flight finish or are
            # handed back within the same grace.
            ds.append(self.forwarder.stop(grace))
        if self.node_config is not None:
            # Before the state database stops (_stop_the_rest).
            ds.append(self.node_config.stop())
        d = defer.DeferredList(ds)
        d.addBoth(lambda _: self._stop_the_rest())
        return d

    def _stop_the_rest(self) -> defer.Deferred[list[tuple[bool, Any]]]:
        if self._ctx is not None and self._ctx.pool is not None:
            self._ctx.pool.close_all()
        ds = [defer.maybeDeferred(super().stopService)]
        if self.metrics is not None:
            ds.append(self.metrics.stop())
        if self.scan is not None:
            self.scan.stop()
        if self.policy is not None:
            # The last traffic counts are written before the database stops.
            policy = self.policy
            flushed = self.traffic.stop() if self.traffic is not None else defer.succeed(None)
            ds.append(flushed.addCallback(lambda _: policy.stop()))
        elif self.traffic is not None:
            ds.append(self.traffic.stop())
        # Nothing writes to the queues now (the sessions have ended) and
        # nothing sends from them: this process's claims are all settled,
        # once the local writer has ended its batch.
        if self.keeper is not None:
            keeper, self.keeper = self.keeper, None
            ds.append(keeper.stop().addBoth(lambda _: self._close_queues()))
        else:
            self._close_queues()
        return defer.DeferredList(ds)

    def _close_queues(self) -> None:
        for committer in self._old_committers:
            committer.stop()
        if self.archive is not None:
            self.archive.close()
        for queue in self._old_queues:
            queue.close()


def share_with_workers(workers: WorkerSupervisor, table: ConnectionTable) -> None:
    """Worker ``i`` counts into column ``i + 1`` of ``table`` (the main
    process is column 0); a worker that ends has its column cleared before
    the next one starts, so what it held is not counted any more."""
    workers.worker_env = lambda index: {ENV_PATH: table.path, ENV_COLUMN: str(index + 1)}
    workers.on_worker_gone.append(lambda index: table.clear_column(index + 1))


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
