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

The supervisor restarts a worker that dies (backing off when it cannot
start), forwards SIGHUP to the workers and stops them with the main
process.  A worker watches a pipe from the main process on its stdin:
EOF means the main process is gone, and an orphan must not keep serving
on the port.
"""
from __future__ import annotations

import os
import signal
import sys
from typing import Any, Callable

from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.logger import Logger

log = Logger()

# A worker that ran this long before dying was a good run: its back-off
# starts again at 1 s.
GOOD_RUN_SECONDS = 30
MAX_BACKOFF_SECONDS = 60.0


def parse_worker_fds(text: str) -> tuple[tuple[int, int], ...]:
    """``--worker-fds`` (``FD:FAMILY,...``) into (fd, family) pairs."""
    if not text:
        return ()
    return tuple((int(fd), int(family))
                 for fd, family in (item.split(":") for item in text.split(",")))


class WorkerSupervisor:
    """The main process's side: starts, restarts, signals and stops the
    workers.  ``ports`` is the service's live dict of listening ports (a
    reload may open or close some; a restarted worker gets those open
    then); ``argv`` the twistd plugin arguments to repeat."""

    def __init__(self, reactor: Any, ports: dict[str, Any], argv: list[str], what: str = "worker"):
        self.reactor = reactor
        self.ports = ports
        self.argv = argv
        self.what = what
        self.processes: list[Any] = []
        self._failures: dict[int, int] = {}
        self.stopping = False

    def start(self, count: int) -> None:
        """Start ``count`` workers (none when nothing is listening)."""
        if not self.ports:
            return
        for index in range(count):
            self._start(index)

    def command(self) -> tuple[list[str], dict[int, Any]]:
        """The command line and descriptors for a worker, from the
        listeners open now."""
        fds: list[str] = []
        # fd 0 is a pipe from us: when we die the worker reads EOF and stops.
        child_fds: dict[int, Any] = {0: "w", 1: 1, 2: 2}
        for port in self.ports.values():
            fd = port.fileno()
            child_fds[fd] = fd
            fds.append(f"{fd}:{int(port.socket.family)}")
        argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                "-n", "--pidfile=", "mppproxy", *self.argv, "--worker-fds", ",".join(fds)]
        return argv, child_fds

    def _start(self, index: int) -> None:
        supervisor = self
        started = self.reactor.seconds()

        class Worker(ProcessProtocol):
            def processEnded(self, reason: Any) -> None:
                supervisor.processes.remove(self)
                if supervisor.stopping or not supervisor.ports:
                    return
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

        argv, child_fds = self.command()
        worker = Worker()
        self.processes.append(worker)
        self.reactor.spawnProcess(worker, sys.executable, argv, env=os.environ.copy(),
                                  childFDs=child_fds)

    def signal_all(self, name: str) -> None:
        for proc in list(self.processes):
            try:
                proc.transport.signalProcess(name)
            except ProcessExitedAlready:
                pass

    def stop(self) -> None:
        self.stopping = True
        self.signal_all("TERM")


def adopt_listeners(reactor: Any, fds: tuple[tuple[int, int], ...], factory: Any,
                    on_parent_gone: Callable[[], None]) -> list[Any]:
    """The worker's side: accept on the inherited descriptors with
    ``factory``, and call ``on_parent_gone`` when the main process dies or
    SIGTERM arrives.  Returns the adopted ports."""
    ports = [reactor.adoptStreamPort(fd, family, factory) for fd, family in fds]
    log.info("worker {pid} serving {n} inherited listeners", pid=os.getpid(), n=len(ports))
    # A worker gets SIGTERM twice on shutdown (from its process group and
    # from the main process); Twisted's handler would raise
    # ReactorNotRunning on the second one.
    signal.signal(signal.SIGTERM, lambda *_: reactor.callFromThread(on_parent_gone))
    from twisted.internet import stdio

    # Kept alive by the reactor's reader set.
    stdio.StandardIO(_ParentWatch(on_parent_gone), reactor=reactor)
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
            self.reactor.stop()
