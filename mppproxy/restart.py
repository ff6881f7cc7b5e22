"""Zero-downtime restart and upgrade: a new main process takes over the
listening sockets while this one lets its sessions end (issue 16;
docs/operations.md, "Restart and upgrade without downtime").

Floor 3 (composition), beside ``workers.py``, whose sockets it hands on.

How others do it, and what is taken from each:

* nginx's binary upgrade: SIGUSR2 makes the running master exec the binary
  on disk with its listening sockets inherited (their numbers in the
  ``NGINX`` environment variable); the old master then stops its workers
  gracefully.  Here too: **SIGUSR2** (or ``mppproxy restart``, which sends
  it) starts the new process with the sockets inherited and named in an
  environment variable, ``MPP_LISTEN_FDS``, as systemd's ``LISTEN_FDS`` and
  nginx's ``NGINX`` do.
* HAProxy's ``-x`` passes the sockets over a Unix socket (SCM_RIGHTS) to a
  new process started by someone else.  Not needed here: the old process
  starts the new one itself, so plain inheritance is enough.
* systemd: the unit's main PID moves to the new process with
  ``MAINPID=`` sent by the old main process (``NotifyAccess=main`` lets the
  main process send it; the new process is in the unit's control group, so
  systemd accepts it), as sozu does after its hot upgrade.

The sequence (the old process's side is ``Handover``):

1. SIGUSR2: the command is, in this order, the one ``mppproxy restart
   --command`` left in ``data_dir/restart-command`` (read once and removed),
   ``$MPP_RESTART_COMMAND``, or this process's own command line (the code at
   that path now: an upgrade installed in place).
2. The new process starts with every listening socket of this node (this
   process's, and each worker's own SO_REUSEPORT socket) and the write end
   of a pipe, ``MPP_RESTART_READY_FD``.  It adopts the sockets
   (``place_inherited``) instead of binding, starts its own workers, and
   once it runs with the listeners open writes ``READY`` and its status
   line into the pipe (``report_ready``).  It sends no ``READY=1`` to
   systemd itself: it is not the unit's main process yet.
3. On ``READY`` this process tells systemd ``MAINPID=<new>`` and ``READY=1``
   and says nothing to systemd afterwards; it stops *accepting*
   (``stopReading``: the sockets stay open, never closed before the new
   process accepts, and a Unix socket's path is not unlinked), tells its
   workers to do the same (SIGUSR2 to a worker), lets its sessions go on
   for up to ``linger_seconds`` so that clients end them with QUIT, then
   stops as on SIGTERM: a message in flight finishes within
   ``timeouts.shutdown_grace``.
4. The new process never answered (``READY_TIMEOUT``), exited, or broke the
   pipe: this process keeps serving as before, logs it as critical, and
   writes ``failed`` in ``data_dir/restart.json``; the new process, if still
   there, is stopped.

Connections that arrive during the switch wait in the listen queue of the
shared socket and are accepted by whichever process accepts first; once
this process stops accepting, only the new one does.  The SO_REUSEPORT
group of a TCP listener never changes (no socket is added or closed), so
the kernel's spreading over the processes stays as it was.
"""
from __future__ import annotations

import ipaddress
import json
import os
import shlex
import shutil
import signal
import socket
import sys
import time
from typing import Any, Callable, Iterable, MutableMapping, Optional

from twisted.internet import defer
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall

from mppproxy import sdnotify
from mppproxy.logsetup import Logger

log = Logger()

LISTEN_FDS_ENV = "MPP_LISTEN_FDS"
READY_FD_ENV = "MPP_RESTART_READY_FD"
COMMAND_ENV = "MPP_RESTART_COMMAND"
# In data_dir: the command left by ``mppproxy restart --command``, and the
# outcome of the last restart (read by ``mppproxy restart --wait``).
COMMAND_FILE = "restart-command"
STATUS_FILE = "restart.json"
# Seconds the new process has to load its configuration, open its stores
# and say READY; past it, it is stopped and this process keeps serving.
READY_TIMEOUT = 60.0
# Seconds a new process that failed gets after SIGTERM before SIGKILL.
KILL_AFTER = 10.0
# Sessions of the old process go on unhindered for at most this long
# (clients end them with QUIT); those still open then hear 421 when idle.
LINGER_MAX = 10.0


def linger_seconds(grace: float) -> float:
    """How long the old process's sessions go on as usual after the new
    process took over: half the shutdown grace, at most ``LINGER_MAX``."""
    return max(0.0, min(LINGER_MAX, grace / 2))


# --------------------------------------------------------------- the command


def own_command() -> list[str]:
    """This process's command line, to start the same code again (the files
    at the same paths: a ``pip install`` into the same virtualenv is an
    upgrade).  ``sys.orig_argv`` is the interpreter's own argv (``python
    /opt/venv/bin/twistd -n ...`` or ``python -c CODE -n ...``); the
    interpreter is named by its full path."""
    argv = list(getattr(sys, "orig_argv", []) or [sys.executable, *sys.argv])
    argv[0] = sys.executable
    return argv


def restart_command(data_dir: str, environ: Optional[MutableMapping[str, str]] = None
                    ) -> tuple[list[str], str]:
    """The new process's command and where it came from.  The command file
    is removed once read: it names one upgrade, not every later restart.
    ValueError for a command that cannot be parsed or is empty; OSError
    for a command file that cannot be read."""
    env = os.environ if environ is None else environ
    path = os.path.join(data_dir, COMMAND_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        text = ""
    else:
        os.unlink(path)
        argv = shlex.split(text)
        if not argv:
            raise ValueError(f"{path} is empty")
        return argv, path
    if env.get(COMMAND_ENV, "").strip():
        return shlex.split(env[COMMAND_ENV]), f"${COMMAND_ENV}"
    return own_command(), "this process's command line"


def executable_of(argv: list[str]) -> str:
    """The program to run for ``argv`` (a bare name is looked up in PATH).
    ValueError when there is none."""
    found = shutil.which(argv[0]) if os.sep not in argv[0] else argv[0]
    if not found or not os.access(found, os.X_OK):
        raise ValueError(f"{argv[0]}: no such program")
    return found


# ------------------------------------------------------- the new process's side


def take_inherited(environ: Optional[MutableMapping[str, str]] = None
                   ) -> dict[str, list[socket.socket]]:
    """The listening sockets the old process handed on (``MPP_LISTEN_FDS``:
    a JSON object, endpoint -> descriptors, the old main process's own
    first), taken out of the environment so that this process's workers
    and any later restart do not see it.  A descriptor that is not a
    listening stream socket is logged and left alone."""
    env = os.environ if environ is None else environ
    text = env.pop(LISTEN_FDS_ENV, "")
    if not text:
        return {}
    try:
        named = json.loads(text)
        groups = {str(desc): [int(fd) for fd in fds] for desc, fds in named.items()}
    except (ValueError, TypeError, AttributeError) as e:
        log.critical("{env} cannot be read ({error}): no listening socket inherited",
                     env=LISTEN_FDS_ENV, error=str(e))
        return {}
    out: dict[str, list[socket.socket]] = {}
    for desc, fds in groups.items():
        for fd in fds:
            try:
                sock = socket.socket(fileno=fd)
                listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            except OSError as e:
                log.critical("inherited descriptor {fd} of {endpoint} is not a socket: {error}",
                             fd=fd, endpoint=desc, error=str(e))
                continue
            if not listening or sock.type != socket.SOCK_STREAM:
                log.critical("inherited descriptor {fd} of {endpoint} is not a listening "
                             "stream socket", fd=fd, endpoint=desc)
                sock.detach()
                continue
            sock.setblocking(False)
            out.setdefault(desc, []).append(sock)
    return out


def endpoint_address(reactor: Any, desc: str) -> Optional[tuple[Any, ...]]:
    """What ``desc`` binds, comparable with ``socket_address``: (family,
    address, port) for TCP, (AF_UNIX, path) for a Unix socket; None for a
    port 0 (any port) or an endpoint of another kind."""
    from twisted.internet.endpoints import (TCP4ServerEndpoint, TCP6ServerEndpoint,
                                            UNIXServerEndpoint, serverFromString)

    try:
        endpoint = serverFromString(reactor, desc)  # type: ignore[no-untyped-call]  # Twisted's is unannotated
    except (ValueError, TypeError, KeyError):
        return None
    if isinstance(endpoint, (TCP4ServerEndpoint, TCP6ServerEndpoint)):
        v6 = isinstance(endpoint, TCP6ServerEndpoint)
        port = getattr(endpoint, "_port", 0)
        interface = getattr(endpoint, "_interface", "") or ("::" if v6 else "0.0.0.0")
        if not port:
            return None
        try:
            host = ipaddress.ip_address(interface.split("%")[0])
        except ValueError:
            return None
        return (socket.AF_INET6 if v6 else socket.AF_INET, host, int(port))
    if isinstance(endpoint, UNIXServerEndpoint):
        return (socket.AF_UNIX, os.path.abspath(getattr(endpoint, "_address", "")))
    return None


def socket_address(sock: socket.socket) -> Optional[tuple[Any, ...]]:
    """A listening socket's address in ``endpoint_address``'s form."""
    try:
        name = sock.getsockname()
    except OSError:
        return None
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        return (sock.family, ipaddress.ip_address(name[0].split("%")[0]), int(name[1]))
    if sock.family == socket.AF_UNIX and isinstance(name, str) and name:
        return (socket.AF_UNIX, os.path.abspath(name))
    return None


def place_inherited(reactor: Any, inherited: dict[str, list[socket.socket]],
                    descs: Iterable[str], processes: int
                    ) -> tuple[dict[str, list[socket.socket]], list[tuple[str, socket.socket]]]:
    """Match the inherited sockets with this configuration's listeners
    ``descs``: by the same endpoint text, else by the address bound (so
    ``tcp:25`` and ``tcp:port=25:interface=0.0.0.0`` are one listener).
    Returns the sockets per listener as ``bind_listeners`` would have bound
    them (``processes`` per TCP listener, this process's first), and the
    sockets this process accepts on besides (the old node had more
    processes than this one: no socket of the SO_REUSEPORT group may go
    unserved, or the connections the kernel puts in its queue would wait
    for ever).  A TCP listener that needs more sockets than it inherited
    gets more, bound with SO_REUSEPORT beside them, when they have it; else
    its one socket is shared by every process.  An inherited listener this
    configuration does not name any more is closed, with a log line."""
    left = dict(inherited)
    placed: dict[str, list[socket.socket]] = {}
    extras: list[tuple[str, socket.socket]] = []
    wanted = list(descs)
    for desc in wanted:
        if desc in left:
            placed[desc] = left.pop(desc)
    for desc in wanted:
        if desc in placed:
            continue
        address = endpoint_address(reactor, desc)
        if address is None:
            continue
        for old_desc, sockets in list(left.items()):
            if sockets and socket_address(sockets[0]) == address:
                placed[desc] = left.pop(old_desc)
                break
    for desc, sockets in placed.items():
        tcp = sockets[0].family in (socket.AF_INET, socket.AF_INET6)
        need = processes if tcp else 1
        if len(sockets) > need:
            extras += [(desc, sock) for sock in sockets[need:]]
            del sockets[need:]
        elif len(sockets) < need:
            sockets += _more_sockets(sockets[0], need - len(sockets), desc)
    for old_desc, sockets in left.items():
        log.warn("the listener {endpoint} of the previous process is not in this "
                 "configuration: closed", endpoint=old_desc)
        for sock in sockets:
            sock.close()
    return placed, extras


def _more_sockets(first: socket.socket, count: int, desc: str) -> list[socket.socket]:
    """``count`` more SO_REUSEPORT sockets on ``first``'s address, or none
    when ``first`` lacks SO_REUSEPORT (the old node ran one process): then
    every process accepts on the one socket (``WorkerSupervisor.listen``)."""
    try:
        shared = first.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
    except (OSError, AttributeError):
        shared = 0
    if not shared:
        log.warn("{endpoint}: the previous process's socket has no SO_REUSEPORT (it ran "
                 "one process): every process accepts on that one socket until a full "
                 "restart", endpoint=desc)
        return []
    more: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(first.family, socket.SOCK_STREAM)
            more.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(first.getsockname())
            sock.listen(socket.SOMAXCONN)
            sock.setblocking(False)
    except OSError as e:
        log.warn("{endpoint}: cannot bind another SO_REUSEPORT socket ({error}): every "
                 "process accepts on the inherited one", endpoint=desc, error=str(e))
        for sock in more:
            sock.close()
        return []
    return more


def take_ready_fd(environ: Optional[MutableMapping[str, str]] = None) -> Optional[int]:
    """The pipe to the old process (``MPP_RESTART_READY_FD``), taken out of
    the environment; None when this process was not started by a restart."""
    env = os.environ if environ is None else environ
    text = env.pop(READY_FD_ENV, "")
    try:
        return int(text) if text else None
    except ValueError:
        return None


def report_ready(fd: int, status: str) -> bool:
    """Tell the old process that this one serves: one line, ``READY`` and
    the status line systemd is to show, then the pipe is closed.  False
    when the old process is gone (it gave up waiting): this one serves on
    all the same, as the only one left."""
    line = ("READY " + " ".join(status.split()) + "\n").encode("utf-8")
    try:
        os.write(fd, line[:4096])  # one write below PIPE_BUF... of 4096: atomic
        ok = True
    except OSError as e:
        log.warn("cannot tell the previous process that this one is ready ({error}); "
                 "serving all the same", error=e.strerror or str(e))
        ok = False
    try:
        os.close(fd)
    except OSError:
        pass
    import mppproxy

    log.info("restart: process {pid} (mppproxy {version} from {path}) serves the "
             "inherited listeners", pid=os.getpid(), version=mppproxy.__version__,
             path=os.path.dirname(os.path.abspath(mppproxy.__file__)))
    return ok


# ------------------------------------------------------- the old process's side


def leave_on_usr2(reactor: Any, leave: Callable[[], None]) -> None:
    """In a worker: SIGUSR2 (from the main process, handing over) calls
    ``leave`` on the reactor thread."""
    if hasattr(signal, "SIGUSR2"):
        signal.signal(signal.SIGUSR2, lambda *_: reactor.callFromThread(leave))


def refuse_usr2(reactor: Any, mode: str) -> None:
    """SIGUSR2 in a mode without a restart: logged, never the signal's
    default action (which ends the process)."""
    def refuse() -> None:
        log.warn("SIGUSR2: no restart without downtime in mode {mode}; use "
                 "'systemctl restart' (or stop and start)", mode=mode)

    if hasattr(signal, "SIGUSR2"):
        signal.signal(signal.SIGUSR2, lambda *_: reactor.callFromThread(refuse))


def stop_accepting(ports: Iterable[Any]) -> list[Any]:
    """Stop accepting on ``ports`` without closing them (``stopReading``):
    the new process holds the same sockets, and ``stopListening`` would
    unlink a Unix listener's path under it.  The ports are returned, to be
    kept (and their descriptors open) until the process exits."""
    kept = []
    for port in ports:
        try:
            port.stopReading()
        except Exception as e:  # a port already closed: nothing accepts on it
            log.debug("stopReading on {port}: {error}", port=repr(port), error=str(e))
        kept.append(port)
    return kept


def linger(reactor: Any, factory: Any, seconds: float) -> defer.Deferred[None]:
    """Fires when ``factory`` has no session left, or after ``seconds``."""
    d: defer.Deferred[None] = defer.Deferred()
    deadline = reactor.seconds() + seconds

    def check() -> None:
        if d.called:
            return
        if factory is None or not factory.sessions or reactor.seconds() >= deadline:
            loop.stop()
            d.callback(None)

    loop = LoopingCall(check)
    loop.clock = reactor
    loop.start(0.1, now=True)
    return d


class _Successor(ProcessProtocol):
    """The new main process, as the old one sees it: its READY line on the
    pipe, or its end."""

    def __init__(self, handover: "Handover", ready_fd: int):
        self.handover = handover
        self.ready_fd = ready_fd
        self.buffer = b""
        self.ready = False
        self.ended = False

    def childDataReceived(self, childFD: int, data: bytes) -> None:  # noqa: N802,N803 (Twisted's names)
        if childFD != self.ready_fd or self.ready:
            return
        self.buffer += data[:8192]
        if b"\n" in self.buffer:
            line = self.buffer.split(b"\n", 1)[0].decode("utf-8", "replace")
            if line.startswith("READY"):
                self.ready = True
                self.handover._ready(self, line[5:].strip())
            else:
                self.handover._failed(self, f"it said {line[:200]!r} on the ready pipe")

    def childConnectionLost(self, childFD: int) -> None:  # noqa: N802,N803
        if childFD == self.ready_fd and not self.ready and not self.ended:
            # The pipe closed without READY: it exited, or will (its
            # processEnded says how); a failure either way.
            self.handover.reactor.callLater(0.5, self._pipe_closed)

    def _pipe_closed(self) -> None:
        if not self.ready and not self.ended:
            self.handover._failed(self, "it closed the ready pipe without saying READY")

    def processEnded(self, reason: Any) -> None:  # noqa: N802
        self.ended = True
        if not self.ready:
            self.handover._failed(self, f"it ended ({reason.value}) before it was ready")

    @property
    def pid(self) -> Optional[int]:
        return getattr(self.transport, "pid", None)

    def signal(self, name: str) -> None:
        transport: Any = self.transport  # IProcessTransport's stub lacks self
        try:
            if transport is not None:
                transport.signalProcess(name)
        except ProcessExitedAlready:
            pass


class Handover:
    """The old main process's side of a restart (module docstring).

    ``listeners()`` gives the sockets to hand on (endpoint -> descriptors,
    this process's own first); ``leave()`` is called once the new process
    serves, and stops this one after its sessions (``ProxyService.leave``)."""

    def __init__(self, reactor: Any, data_dir: str,
                 listeners: Callable[[], dict[str, list[int]]],
                 leave: Callable[[], None]):
        self.reactor = reactor
        self.data_dir = data_dir
        self.listeners = listeners
        self.leave = leave
        self.successor: Optional[_Successor] = None
        self.done = False
        self._timeout: Any = None
        self._status_write: defer.Deferred[None] = defer.succeed(None)

    def install(self) -> None:
        """SIGUSR2 starts a restart (on the reactor thread: a signal handler
        only schedules, reloading.py says why)."""
        if hasattr(signal, "SIGUSR2"):
            signal.signal(signal.SIGUSR2,
                          lambda *_: self.reactor.callFromThread(self.start))

    def start(self) -> None:
        """Start the new process, unless one is starting or took over."""
        if self.done:
            log.warn("SIGUSR2: this process has handed over to process {pid} already; "
                     "signal that one", pid=self.successor.pid if self.successor else "?")
            return
        if self.successor is not None:
            log.warn("SIGUSR2: a restart is under way (process {pid}); ignored",
                     pid=self.successor.pid)
            return
        log.info("SIGUSR2: restarting: starting a new process to take over the listeners")
        try:
            argv, source = restart_command(self.data_dir)
            program = executable_of(argv)
        except (OSError, ValueError) as e:
            self._give_up(f"no command to start: {e}")
            return
        groups = self.listeners()
        fds = [fd for group in groups.values() for fd in group]
        if not fds:
            self._give_up("no listening socket to hand on")
            return
        ready_fd = max([2, *fds]) + 1
        child_fds: dict[int, Any] = {0: 0, 1: 1, 2: 2, ready_fd: "r"}
        for fd in fds:
            child_fds[fd] = fd
        env = dict(os.environ)
        env[LISTEN_FDS_ENV] = json.dumps(groups)
        env[READY_FD_ENV] = str(ready_fd)
        notify = sdnotify.notifier()
        if notify.address:
            # Taken out of this process's environment at start (sdnotify):
            # the new process is to be the unit's main process.
            env[sdnotify.ENV] = notify.address
        successor = _Successor(self, ready_fd)
        self.successor = successor
        try:
            self.reactor.spawnProcess(successor, program, argv, env=env, childFDs=child_fds)
        except OSError as e:
            self.successor = None
            self._give_up(f"cannot start {argv[0]}: {e}")
            return
        log.info("restart: process {pid} started ({source}: {command}); waiting up to "
                 "{timeout:.0f} s for it to serve", pid=successor.pid, source=source,
                 command=shlex.join(argv), timeout=READY_TIMEOUT)
        notify.status(f"restarting: process {successor.pid} is starting")
        self._status("starting", new_pid=successor.pid)
        self._timeout = self.reactor.callLater(READY_TIMEOUT, self._too_slow, successor)

    def _too_slow(self, successor: _Successor) -> None:
        self._timeout = None
        self._failed(successor, f"it was not ready within {READY_TIMEOUT:.0f} s")

    def _ready(self, successor: _Successor, status: str) -> None:
        if successor is not self.successor or self.done:
            return
        self.done = True
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self._timeout = None
        pid = successor.pid
        # systemd: the new process is the unit's main process from now on;
        # this one sends nothing more (its STOPPING=1 would be refused).
        sdnotify.notifier().hand_over(pid or 0, status or f"restarted: process {pid}")
        log.info("restart: process {pid} serves; process {me} stops accepting and lets "
                 "its sessions end", pid=pid, me=os.getpid())
        self._status("ready", new_pid=pid)
        self.leave()

    def _failed(self, successor: _Successor, why: str) -> None:
        if successor is not self.successor or self.done:
            return
        self.successor = None
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self._timeout = None
        if not successor.ended:
            successor.signal("TERM")
            self.reactor.callLater(KILL_AFTER, _kill_unless_ended, successor)
        self._give_up(f"the new process {successor.pid} failed: {why}", successor.pid)

    def _give_up(self, why: str, new_pid: Optional[int] = None) -> None:
        log.critical("RESTART FAILED: {why}. This process ({pid}) keeps serving with its "
                     "running code and configuration; see the new process's lines above",
                     why=why, pid=os.getpid())
        sdnotify.notifier().status(f"restart failed, still serving: {why}")
        self._status("failed", new_pid=new_pid, error=why)

    def abort(self) -> None:
        """This process is stopping (SIGTERM) during a restart: a new
        process not yet ready is stopped with it."""
        successor = self.successor
        if successor is not None and not self.done and not successor.ended:
            self.successor = None
            if self._timeout is not None and self._timeout.active():
                self._timeout.cancel()
            successor.signal("TERM")

    def _status(self, state: str, new_pid: Optional[int] = None, error: str = "") -> None:
        """``data_dir/restart.json``: what ``mppproxy restart --wait`` reads.
        Written in the thread pool, one after the other."""
        record = {"old_pid": os.getpid(), "new_pid": new_pid, "state": state,
                  "error": error, "time": time.time()}
        path = os.path.join(self.data_dir, STATUS_FILE)

        def write() -> None:
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(record, f)
            os.replace(tmp, path)

        def run(_: Any) -> defer.Deferred[None]:
            from twisted.internet.threads import deferToThreadPool

            d: defer.Deferred[None] = deferToThreadPool(self.reactor,
                                                        self.reactor.getThreadPool(), write)
            return d.addErrback(lambda f: log.warn("cannot write {path}: {error}", path=path,
                                                   error=str(f.value)))

        self._status_write.addCallback(run)


def _kill_unless_ended(successor: _Successor) -> None:
    if not successor.ended:
        successor.signal("KILL")


def read_status(data_dir: str) -> Optional[dict[str, Any]]:
    """The last restart's record (``Handover._status``), or None."""
    try:
        with open(os.path.join(data_dir, STATUS_FILE), encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None
