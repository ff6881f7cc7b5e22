"""Worker processes: more processes accepting on the listening sockets of
the main one, so a node uses every core (``workers`` in the config).

Shared by the proxy (``service.py``) and the policy server
(``policyd/service.py``).  The main process binds the listeners, then
starts ``workers - 1`` copies of its own twistd command line with
``--worker-fds FD:FAMILY,...``; each worker adopts those descriptors
(``adopt_listeners``) and the kernel spreads new connections over every
process accepting on them.  A connection stays with the process that
accepted it, so everything kept per connection (an SMTP session, a
Postfix policy client's per-message record) stays whole.

Spreading the connections.  On one shared listening socket the kernel
wakes every waiting process and the same one keeps winning the accept()
race: 40 connections opened one after another all went to one process,
which for the policy server (Postfix keeps its connections for minutes)
left the other core idle.  So a TCP listener (``tcp:``/``tcp6:``) gets one
socket per process, bound together with SO_REUSEPORT, and the kernel
spreads new connections over them by address hash.  The main process
binds them all and hands each worker its own (a worker needs no right to
bind port 25).  While a worker is down the main process accepts on
that worker's socket too, so connections hashed to it do not wait for the
restart; it stops a few seconds after the new worker has started.  Other
listeners (``unix:``) stay one shared socket.

The supervisor restarts a worker that dies (backing off when it cannot
start), forwards SIGHUP to the workers and stops them with the main
process.  A worker watches a pipe from the main process on its stdin:
EOF means the main process is gone, and an orphan must not keep serving
on the port.

A restart without downtime (``restart.py``) hands every one of these
sockets to the new main process, which gives each to its own workers
(``start(take_over=True)``: it accepts on them itself until they run); the
old workers hear SIGUSR2 (``hand_over``), stop accepting and end after
their sessions.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
from typing import Any, Callable, Optional

from twisted.internet import defer
from twisted.internet.error import ProcessExitedAlready, ReactorNotRunning
from twisted.internet.protocol import ProcessProtocol, Protocol

from mppproxy.listeners import with_backlog
from mppproxy.logsetup import Logger

log = Logger()

# A worker that ran this long before dying was a good run: its back-off
# starts again at 1 s.
GOOD_RUN_SECONDS = 30
MAX_BACKOFF_SECONDS = 60.0
# Seconds the main process keeps accepting on a restarted worker's socket
# (the new process needs about one to load the configuration and listen).
TAKEOVER_GRACE_SECONDS = 5.0
# Seconds past the shutdown grace a stopping worker gets to exit (its own
# grace started a moment later, and twistd's exit takes a little) before
# the main process kills it.
WORKER_STOP_MARGIN = 3.0


def parse_worker_fds(text: str) -> tuple[tuple[int, int], ...]:
    """``--worker-fds`` (``FD:FAMILY,...``) into (fd, family) pairs."""
    if not text:
        return ()
    return tuple((int(fd), int(family))
                 for fd, family in (item.split(":") for item in text.split(",")))


def reuseport_sockets(reactor: Any, desc: str, count: int,
                      reuseport: bool = True) -> Optional[list[socket.socket]]:
    """``count`` listening sockets for the TCP endpoint ``desc``, bound to
    one address with SO_REUSEPORT (the first picks the port when ``desc``
    says 0); None for any other kind of endpoint, or where the system has
    no SO_REUSEPORT.  OSError if the address cannot be bound.  With
    ``reuseport=False`` (one socket, one process) no SO_REUSEPORT: a second
    instance started by mistake must fail to bind, not share the port."""
    from twisted.internet.endpoints import (TCP4ServerEndpoint, TCP6ServerEndpoint,
                                            serverFromString)

    if reuseport and not hasattr(socket, "SO_REUSEPORT"):
        return None
    endpoint = serverFromString(reactor, desc)  # type: ignore[no-untyped-call]  # Twisted's is unannotated
    if type(endpoint) not in (TCP4ServerEndpoint, TCP6ServerEndpoint):
        return None
    try:
        port, interface, backlog = endpoint._port, endpoint._interface, endpoint._backlog
    except AttributeError:  # a Twisted that keeps them elsewhere
        return None
    family = socket.AF_INET6 if isinstance(endpoint, TCP6ServerEndpoint) else socket.AF_INET
    if not interface:
        interface = "::" if family == socket.AF_INET6 else "0.0.0.0"
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuseport:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((interface, port))
            port = sock.getsockname()[1]
            sock.listen(backlog)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def bind_listeners(reactor: Any, descs: Any, backlog: int,
                   count: int) -> dict[str, list[socket.socket]]:
    """Bind the TCP listeners ``descs`` now, ``count`` sockets each (one per
    process; SO_REUSEPORT when more than one): a service's
    ``privilegedStartService``, which twistd runs before it gives up root
    for ``--uid``/``--gid``, so port 25 needs no capability.  The sockets
    are adopted later (``listeners.listen_on``, ``WorkerSupervisor.listen``).
    Other endpoints (``unix:``), and an address that cannot be bound, are
    left to ``startService``'s ordinary listen, which logs why it fails."""
    bound: dict[str, list[socket.socket]] = {}
    for desc in descs:
        try:
            sockets = reuseport_sockets(reactor, with_backlog(desc, backlog), count,
                                        reuseport=count > 1)
        except (OSError, ValueError):
            continue
        if sockets:
            bound[desc] = sockets
    return bound


def close_sockets(bound: dict[str, list[socket.socket]]) -> None:
    """Close pre-bound sockets nobody adopted (the service stopped first)."""
    for sockets in bound.values():
        for sock in sockets:
            sock.close()
    bound.clear()


class WorkerSupervisor:
    """The main process's side: opens the listeners, starts, restarts,
    signals and stops the workers.  ``ports`` is the service's live dict
    of listening ports (a reload may open or close some; a restarted
    worker gets those open then); ``argv`` the twistd plugin arguments to
    repeat; ``count`` the number of processes, this one included."""

    def __init__(self, reactor: Any, ports: dict[str, Any], argv: list[str], count: int,
                 what: str = "worker"):
        self.reactor = reactor
        self.ports = ports
        self.argv = argv
        self.count = count
        self.what = what
        # Environment added for worker ``index`` (the shared connection
        # table, service.share_with_workers), and hooks told the index of a
        # worker that ended, before the next one starts.
        self.worker_env: Callable[[int], dict[str, str]] = lambda index: {}
        self.on_worker_gone: list[Callable[[int], None]] = []
        self.processes: list[Any] = []
        self._failures: dict[int, int] = {}
        # Per TCP listener: each worker's own SO_REUSEPORT socket.
        self.worker_sockets: dict[str, list[socket.socket]] = {}
        # Worker index -> ports this process accepts on for it while it is down.
        self._takeovers: dict[int, list[Any]] = {}
        self.factory: Any = None
        self.stopping = False
        self._stop_waiters: list[defer.Deferred[None]] = []
        self._kill_call: Any = None
        # Told the pid of each worker that ended (the metrics forget its
        # gauges: mppproxy/metrics/).
        self.on_exit: list[Callable[[int], None]] = []

    def listen(self, desc: str, factory: Any, backlog: int,
               fallback: Callable[[str], Any],
               prebound: Optional[dict[str, list[socket.socket]]] = None) -> None:
        """Open the listener ``desc`` for every process: SO_REUSEPORT
        sockets for TCP (this process adopts the first; taken from
        ``prebound`` when ``bind_listeners`` bound them already), else
        ``fallback(desc)``, which opens one socket shared by all.  A TCP
        address that cannot be bound is left to ``fallback`` too, which
        logs why."""
        sockets = (prebound or {}).pop(desc, None)
        if sockets is not None and prebound is not None and len(sockets) < self.count:
            # Inherited by a restart from a node that ran one process (a
            # socket without SO_REUSEPORT, restart.place_inherited): every
            # process accepts on that one socket.
            prebound[desc] = sockets
            fallback(desc)
            return
        if sockets is None:
            try:
                sockets = reuseport_sockets(self.reactor, with_backlog(desc, backlog), self.count)
            except OSError:
                sockets = None
        if sockets is None:
            fallback(desc)
            return
        own = sockets[0]
        self.ports[desc] = self.reactor.adoptStreamPort(own.fileno(), own.family, factory)
        own.close()  # adoptStreamPort holds its own copy
        self.worker_sockets[desc] = sockets[1:]
        self.factory = factory
        log.info("listening on {endpoint} ({n} processes, SO_REUSEPORT)", endpoint=desc,
                 n=self.count)

    def forget(self, desc: str) -> None:
        """A listener closed by a reload: its workers' sockets are closed
        here (workers keep serving theirs until they restart)."""
        for sock in self.worker_sockets.pop(desc, []):
            sock.close()

    def start(self, take_over: bool = False) -> None:
        """Start the workers (none when nothing is listening).  With
        ``take_over`` (a restart: the sockets were inherited and connections
        may wait in their queues) this process accepts on every worker's
        socket until that worker has started."""
        if not self.ports:
            return
        for index in range(self.count - 1):
            if take_over:
                self._take_over(index)
            self._start(index)

    def command(self, index: int) -> tuple[list[str], dict[int, Any]]:
        """The command line and descriptors for worker ``index``, from the
        listeners open now."""
        fds: list[str] = []
        # fd 0 is a pipe from us: when we die the worker reads EOF and stops.
        child_fds: dict[int, Any] = {0: "w", 1: 1, 2: 2}
        for desc, port in self.ports.items():
            own = self.worker_sockets.get(desc)
            fd = own[index].fileno() if own else port.fileno()
            family = own[index].family if own else port.socket.family
            child_fds[fd] = fd
            fds.append(f"{fd}:{int(family)}")
        argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                "-n", "--pidfile=", "mppproxy", *self.argv, "--worker-fds", ",".join(fds)]
        return argv, child_fds

    def _start(self, index: int) -> None:
        supervisor = self
        started = self.reactor.seconds()

        class Worker(ProcessProtocol):
            pid = 0

            def connectionMade(self) -> None:
                self.pid = getattr(self.transport, "pid", 0) or 0

            def processEnded(self, reason: Any) -> None:
                supervisor.processes.remove(self)
                for hook in supervisor.on_exit:
                    hook(self.pid)
                if supervisor.stopping:
                    supervisor._worker_stopped()
                    return
                for gone in supervisor.on_worker_gone:
                    gone(index)
                if not supervisor.ports:
                    return
                supervisor._take_over(index)
                # Back off when a worker cannot start (say, the file on disk
                # became invalid): 1, 2, 4 ... 60 s, reset after a good run.
                failures = supervisor._failures.get(index, 0)
                ran = supervisor.reactor.seconds() - started
                failures = 0 if ran > GOOD_RUN_SECONDS else failures + 1
                supervisor._failures[index] = failures
                delay = min(MAX_BACKOFF_SECONDS, 2.0 ** failures)
                log.warn("{what} {index} ended ({reason}); restarting in {delay:.0f} s",
                         what=supervisor.what, index=index, reason=str(reason.value), delay=delay)
                supervisor.reactor.callLater(delay, supervisor._start, index)

        argv, child_fds = self.command(index)
        worker = Worker()
        self.processes.append(worker)
        self.reactor.spawnProcess(worker, sys.executable, argv,
                                  env={**os.environ, **self.worker_env(index)},
                                  childFDs=child_fds)
        if index in self._takeovers:
            self.reactor.callLater(TAKEOVER_GRACE_SECONDS, self._hand_back, index, worker)

    def _take_over(self, index: int) -> None:
        """Accept on worker ``index``'s sockets here until it is back.  A
        socket that cannot be adopted (no descriptor left) is logged and
        left to the restarted worker; the restart is scheduled anyway."""
        if index in self._takeovers:
            return
        ports = []
        for desc, sockets in self.worker_sockets.items():
            sock = sockets[index]
            try:
                ports.append(self.reactor.adoptStreamPort(sock.fileno(), sock.family,
                                                          self.factory))
            except OSError as e:
                log.error("cannot accept on {what} {index}'s socket of {endpoint} while it "
                          "is down: {error}", what=self.what, index=index, endpoint=desc,
                          error=str(e))
        self._takeovers[index] = ports

    def _hand_back(self, index: int, worker: Any) -> None:
        if worker not in self.processes:  # it died again meanwhile
            return
        for port in self._takeovers.pop(index, []):
            port.stopListening()

    def signal_all(self, name: str | int) -> None:
        """Signal every worker: a name Twisted knows (TERM, KILL, HUP, INT)
        or a number (SIGUSR2, which Twisted has no name for)."""
        for proc in list(self.processes):
            try:
                proc.transport.signalProcess(name)
            except ProcessExitedAlready:
                pass

    def hand_over(self, timeout: float) -> defer.Deferred[None]:
        """A restart (restart.py): SIGUSR2 tells each worker to stop
        accepting and end after its sessions; none is restarted.  Fires
        when all have ended; one still running after ``timeout`` is killed.
        The sockets this process took over for a worker are closed here:
        the new process holds them too."""
        self.stopping = True
        for ports in self._takeovers.values():
            for port in ports:
                port.stopListening()
        self._takeovers.clear()
        self.signal_all(signal.SIGUSR2)
        d: defer.Deferred[None] = defer.Deferred()
        self._stop_waiters.append(d)
        if not self.processes:
            self._worker_stopped()
        elif self._kill_call is None:
            self._kill_call = self.reactor.callLater(timeout, self._kill_rest)
        return d

    def stop(self, grace: float = 0.0) -> defer.Deferred[None]:
        """SIGTERM to every worker, each of which finishes its messages in
        flight within ``grace`` (``timeouts.shutdown_grace``) like this
        process.  Fires when all have ended; one still running
        ``WORKER_STOP_MARGIN`` seconds after the grace is killed."""
        self.stopping = True
        self.signal_all("TERM")
        for ports in self._takeovers.values():
            for port in ports:
                port.stopListening()
        self._takeovers.clear()
        d: defer.Deferred[None] = defer.Deferred()
        self._stop_waiters.append(d)
        if not self.processes:
            self._worker_stopped()
        elif self._kill_call is None:
            self._kill_call = self.reactor.callLater(grace + WORKER_STOP_MARGIN, self._kill_rest)
        return d

    def _kill_rest(self) -> None:
        self._kill_call = None
        log.warn("{what}s still running after the shutdown grace: killing them", what=self.what)
        self.signal_all("KILL")
        self._stop_waiters, waiters = [], self._stop_waiters
        for d in waiters:
            d.callback(None)

    def _worker_stopped(self) -> None:
        if self.processes:
            return
        if self._kill_call is not None and self._kill_call.active():
            self._kill_call.cancel()
        self._kill_call = None
        self._stop_waiters, waiters = [], self._stop_waiters
        for d in waiters:
            d.callback(None)


def adopt_listeners(reactor: Any, fds: tuple[tuple[int, int], ...], factory: Any,
                    on_parent_gone: Callable[[], None]) -> list[Any]:
    """The worker's side: accept on the inherited descriptors with
    ``factory``, and call ``on_parent_gone`` when the main process dies.
    Returns the adopted ports.  SIGTERM is ``reloading.stop_on_signals``'s,
    as in any process (a worker hears it twice, from its process group and
    from the main process: ``StopOnce`` stops once)."""
    ports = [reactor.adoptStreamPort(fd, family, factory) for fd, family in fds]
    log.info("worker {pid} serving {n} inherited listeners", pid=os.getpid(), n=len(ports))
    from twisted.internet import stdio

    # Kept alive by the reactor's reader set.
    stdio.StandardIO(_ParentWatch(on_parent_gone), reactor=reactor)  # type: ignore[no-untyped-call]  # Twisted's is unannotated
    return ports


class _ParentWatch(Protocol):
    def __init__(self, on_gone: Callable[[], None]):
        self.on_gone = on_gone

    def connectionLost(self, reason: Any = None) -> None:
        log.warn("main process is gone; worker {pid} stopping", pid=os.getpid())
        self.on_gone()


class StopOnce:
    """Stop the reactor once, however many times asked (a worker hears
    SIGTERM from its process group and from the main process)."""

    def __init__(self, reactor: Any):
        self.reactor = reactor
        self.done = False

    def __call__(self) -> None:
        if self.reactor.running and not self.done:
            self.done = True
            try:
                self.reactor.stop()
            except ReactorNotRunning:
                pass  # stopped meanwhile by someone else (another StopOnce)
