"""The worker supervisor's own logic (mppproxy/workers.py), without
processes: the twistd tests (test_service.py, test_policyd_loopback.py)
run real workers."""
from __future__ import annotations

import socket
from typing import Any

from twisted.internet.error import ProcessTerminated
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from mppproxy.workers import WorkerSupervisor, parse_worker_fds, reuseport_sockets


class FakeReactor(Clock):
    """Clock plus what the supervisor asks of a reactor."""

    def __init__(self, adopt_error: Exception | None = None):
        super().__init__()
        self.spawned: list[tuple[Any, list[str], dict]] = []
        self.adopted: list[int] = []
        self.adopt_error = adopt_error

    def spawnProcess(self, proto: Any, executable: str, args: list[str], env: Any = None,  # noqa: N802
                     childFDs: Any = None) -> None:  # noqa: N803 (Twisted's names)
        self.spawned.append((proto, args, childFDs))

    def adoptStreamPort(self, fd: int, family: int, factory: Any) -> Any:  # noqa: N802
        if self.adopt_error is not None:
            raise self.adopt_error
        self.adopted.append(fd)
        return object()


class FakePort:
    def __init__(self, sock: socket.socket):
        self.socket = sock

    def fileno(self) -> int:
        return self.socket.fileno()


def test_parse_worker_fds():
    """--worker-fds parses "fd:family" pairs separated by commas, and empty text to none."""
    assert parse_worker_fds("") == ()
    assert parse_worker_fds("7:2,9:10") == ((7, 2), (9, 10))


def test_reuseport_sockets_share_one_port_and_leave_unix_alone(tmp_path):
    """A TCP listener gets one SO_REUSEPORT socket per process, all on one real port; a Unix
    listener gets none."""
    sockets = reuseport_sockets(Clock(), "tcp:0:interface=127.0.0.1", 3)
    assert sockets is not None and len(sockets) == 3
    try:
        ports = {s.getsockname()[1] for s in sockets}
        assert len(ports) == 1 and ports != {0}
        assert all(s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) for s in sockets)
    finally:
        for s in sockets:
            s.close()
    assert reuseport_sockets(Clock(), f"unix:{tmp_path / 'x.sock'}", 2) is None


def test_each_worker_gets_its_own_socket_and_the_shared_ones():
    """Each worker started is handed its own TCP socket and the shared Unix socket, never the
    main process's own TCP socket."""
    reactor = FakeReactor()
    own = socket.socket()
    shared = socket.socket()
    spare = [socket.socket(), socket.socket()]
    try:
        sup = WorkerSupervisor(reactor, {"tcp:25": FakePort(own), "unix:/x": FakePort(shared)},
                               ["--mode", "policy"], 3)
        sup.worker_sockets["tcp:25"] = spare
        sup.start()
        assert len(reactor.spawned) == 2
        for index, (_, args, fds) in enumerate(reactor.spawned):
            given = args[args.index("--worker-fds") + 1]
            assert f"{spare[index].fileno()}:" in given and f"{shared.fileno()}:" in given
            assert f"{own.fileno()}:" not in given
            assert spare[index].fileno() in fds and fds[0] == "w"
    finally:
        for s in [own, shared, *spare]:
            s.close()


def test_a_dead_worker_is_restarted_even_when_its_socket_cannot_be_taken_over():
    """When a worker dies and its socket cannot be taken over (out of descriptors) the failure
    is logged and the worker is still restarted after the back-off."""
    reactor = FakeReactor(adopt_error=OSError(24, "Too many open files"))
    own, spare = socket.socket(), socket.socket()
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        sup = WorkerSupervisor(reactor, {"tcp:25": FakePort(own)}, [], 2, "policy worker")
        sup.worker_sockets["tcp:25"] = [spare]
        sup.start()
        worker = reactor.spawned[0][0]
        worker.processEnded(Failure(ProcessTerminated(exitCode=1)))
        assert any("cannot accept on" in e.get("log_format", "") for e in events)
        reactor.advance(2)  # the first back-off
        assert len(reactor.spawned) == 2
    finally:
        globalLogPublisher.removeObserver(events.append)
        own.close()
        spare.close()


def test_the_main_process_hands_a_taken_over_socket_back_after_the_restart():
    """The main process accepts on a dead worker's socket until the restarted worker has had its
    grace period, then stops listening on it."""
    reactor = FakeReactor()
    own, spare = socket.socket(), socket.socket()
    stopped: list[Any] = []

    class Port:
        def stopListening(self) -> None:  # noqa: N802
            stopped.append(self)

    reactor.adoptStreamPort = lambda fd, family, factory: Port()  # type: ignore[method-assign]
    try:
        sup = WorkerSupervisor(reactor, {"tcp:25": FakePort(own)}, [], 2)
        sup.worker_sockets["tcp:25"] = [spare]
        sup.start()
        reactor.spawned[0][0].processEnded(Failure(ProcessTerminated(exitCode=1)))
        assert list(sup._takeovers) == [0] and not stopped
        reactor.advance(2)  # restarted
        assert len(reactor.spawned) == 2 and not stopped
        reactor.advance(5)  # TAKEOVER_GRACE_SECONDS after the restart
        assert len(stopped) == 1 and not sup._takeovers
    finally:
        own.close()
        spare.close()
