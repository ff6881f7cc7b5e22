"""A bounded pool of persistent engine processes that read message after
message on stdin (``[[scanners.command]] persistent = true``).

Stage: post-DATA scanning, the persistent half of ``command.py``.  Some
engines start slowly (signature or model loading) and are meant to run as
filters in a loop, as the original product ran Cloudmark and Mailshell;
starting one per message would cost more than the scan.

The framing, per message (docs/configuration.md, "Persistent engines"):

* to the engine: one line, a JSON object ``{"size": N, "queue_id": ...,
  "client_ip": ..., "helo": ..., "sender": ..., "recipients": [...],
  "policy": ...}`` ending in LF, then exactly N octets of the message (RFC
  5322, CRLF line ends);
* from the engine: one line, a JSON object ``{"verdict": "spam",
  "score": 7.5, "name": "..."}`` ending in LF (command_answer.py reads it).

The bounds (docs/design.md promise 6):

* at most ``max_processes`` processes exist at once, counting those being
  killed until they have really ended;
* each process scans one message at a time and at most ``max_messages``
  before it is replaced (EOF on its stdin; killed if it lingers);
* at most ``max_queue`` scans wait for a process; one more fails at once
  (``ScannerUnavailable``: the policy's ``on_failure`` for the engine).

A process that dies (mid-message or idle), hangs past the timeout, or
answers garbage or out of turn is killed with its process group and
forgotten; the next scan starts a fresh one.  The scan it was doing fails
with a reason for the log line (never a traceback): the message takes the
engine's failure path (tempfail by default).
"""
from __future__ import annotations

import json
import os
import signal
from collections import deque
from typing import Any, Callable, Optional, TypeVar

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from mppproxy.config.scanners import CommandScannerConfig
from mppproxy.logsetup import Logger
from mppproxy.scan.base import DOWN, ERROR, GARBAGE, ScanInput, ScannerUnavailable
from mppproxy.scan.scanners.command_answer import BadAnswer, printable_tail

log = Logger()

_T = TypeVar("_T")

# The longest answer line; more without a LF is garbage.
MAX_ANSWER = 64 * 1024
# What is kept of a process's stderr, for the log line when it fails.
STDERR_TAIL = 2048
# Seconds a process replaced after max_messages (or at close) has to exit
# after EOF on its stdin before it is killed.
RETIRE_GRACE = 5.0


class _Worker(ProcessProtocol):
    """One engine process; ``ask`` sends one message and fires with its
    answer line.  ``ended`` fires (never fails) once the process has exited
    and its pipes are closed."""

    transport: Any

    def __init__(self, pool: "ProcessPool", serial: int):
        self.pool = pool
        self.serial = serial
        self.served = 0
        self.buffer = bytearray()
        self.stderr = bytearray()
        self.waiting: Optional[Deferred[bytes]] = None
        self.ended: Deferred[None] = Deferred()
        self.exited = False
        self.exit_text = ""
        self.retiring = False

    @property
    def pid(self) -> Optional[int]:
        return getattr(self.transport, "pid", None)

    def ask(self, header: bytes, data: bytes) -> Deferred[bytes]:
        self.buffer.clear()
        waiting: Deferred[bytes] = Deferred()
        self.waiting = waiting
        self.transport.write(header)
        self.transport.write(data)
        return waiting

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == 2:
            self.stderr += data
            del self.stderr[:-STDERR_TAIL]
            return
        self.buffer += data
        end = self.buffer.find(b"\n")
        if end < 0:
            if len(self.buffer) > MAX_ANSWER:
                self._fail(GARBAGE, f"an answer line longer than {MAX_ANSWER} octets")
            return
        line = bytes(self.buffer[:end])
        rest = bytes(self.buffer[end + 1:])
        self.buffer.clear()
        waiting, self.waiting = self.waiting, None
        if waiting is None or waiting.called:
            self._fail(GARBAGE, f"output out of turn: {printable_tail(line.decode('utf-8', 'replace'), 120)}")
            return
        if rest.strip():
            # One line per message: more means the engine and we disagree
            # on which answer belongs to which message from now on.
            self._fail(GARBAGE, "more than one answer line for one message")
            waiting.errback(ScannerUnavailable(self.pool.name, "more than one answer line "
                                               "for one message", GARBAGE))
            return
        waiting.callback(line)

    def processEnded(self, reason: Failure) -> None:
        self.exited = True
        value = reason.value
        if isinstance(value, (ProcessDone, ProcessTerminated)) and value.signal is not None:
            self.exit_text = f"killed by signal {value.signal}"
        elif isinstance(value, (ProcessDone, ProcessTerminated)):
            self.exit_text = f"exited {value.exitCode}"
        else:  # pragma: no cover - Twisted passes only these two
            self.exit_text = "ended"
        waiting, self.waiting = self.waiting, None
        if waiting is not None and not waiting.called:
            waiting.errback(ScannerUnavailable(
                self.pool.name, f"engine process {self.pid_text} {self.exit_text} before it "
                f"answered: {self.stderr_tail()}", DOWN))
        self.pool._ended(self)
        self.ended.callback(None)

    @property
    def pid_text(self) -> str:
        return str(self.pid) if self.pid is not None else "?"

    def stderr_tail(self) -> str:
        return printable_tail(self.stderr.decode("utf-8", "replace"))

    def _fail(self, kind: str, why: str) -> None:
        """Garbage from the process: the scan waiting (if any) fails, the
        process is killed (the framing can no longer be trusted)."""
        log.warn("{scanner}: engine process {pid} killed: {why}", scanner=self.pool.name,
                 pid=self.pid_text, why=why)
        waiting, self.waiting = self.waiting, None
        if waiting is not None and not waiting.called:
            waiting.errback(ScannerUnavailable(self.pool.name, why, kind))
        self.kill()

    def kill(self) -> None:
        """SIGKILL the process group (the engine leads its own)."""
        pid = self.pid
        if pid is None or self.exited:
            return
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        except PermissionError as e:  # pragma: no cover - our own child
            log.warn("cannot kill engine process group {pid}: {error}", pid=pid, error=str(e))

    def retire(self, reactor: Any) -> None:
        """EOF on stdin; killed if still there after RETIRE_GRACE."""
        if self.exited or self.retiring:
            return
        self.retiring = True
        try:
            self.transport.closeStdin()
        except Exception:  # pragma: no cover - a transport already gone
            pass
        timer = reactor.callLater(RETIRE_GRACE, self.kill)
        self.ended.addBoth(lambda _: timer.cancel() if timer.active() else None)


class ProcessPool:
    """The persistent processes of one engine.  ``spawn(protocol)`` starts
    one process for ``protocol`` (command.py: the argv, setsid, the
    environment) and raises ScannerUnavailable when it cannot."""

    def __init__(self, settings: CommandScannerConfig, reactor: Any,
                 spawn: Callable[[ProcessProtocol], None]):
        self.settings = settings
        self.reactor = reactor
        self.name = settings.name
        self._spawn = spawn
        self.procs: set[_Worker] = set()
        self.idle: list[_Worker] = []
        self.waiters: deque[Deferred[_Worker]] = deque()
        self.started = 0
        self.closed = False

    @property
    def running(self) -> int:
        return len(self.procs)

    async def scan(self, message: ScanInput, data: bytes, parse: Callable[[bytes], _T]) -> _T:
        """``parse`` of the answer line for ``message`` (``data``: its
        octets).  ``parse`` raises ``BadAnswer`` for garbage: the process is
        then killed (its framing cannot be trusted) and the scan fails.  A
        cancel (the scanner's timeout) kills the process at work."""
        worker = await self._acquire()
        healthy = False
        try:
            line = await _view(worker.ask(_header(message, len(data)), data))
            try:
                answer = parse(line)
            except BadAnswer as e:
                log.warn("{scanner}: engine process {pid} killed: garbage answer ({why})",
                         scanner=self.name, pid=worker.pid_text, why=str(e))
                raise ScannerUnavailable(self.name, f"bad answer: {e}", GARBAGE) from None
            healthy = True
            return answer
        except defer.CancelledError:
            log.warn("{scanner}: engine process {pid} gave no answer in time: killed "
                     "(a new one starts for the next message)", scanner=self.name,
                     pid=worker.pid_text)
            raise
        finally:
            self.release(worker, healthy)

    def release(self, worker: _Worker, healthy: bool) -> None:
        """After a scan: back to work, or (unhealthy, used up, closing)
        away, its place freed once it has ended."""
        worker.served += 1
        if not healthy:
            worker.kill()
            return
        if worker.exited:
            return
        if worker.served >= self.settings.max_messages or self.closed:
            log.info("{scanner}: engine process {pid} replaced after {n} messages",
                     scanner=self.name, pid=worker.pid_text, n=worker.served)
            worker.retire(self.reactor)
            return
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.called:
                waiter.callback(worker)
                return
        self.idle.append(worker)

    async def _acquire(self) -> _Worker:
        while self.idle:
            worker = self.idle.pop()
            if not worker.exited and not worker.retiring:
                return worker
        if len(self.procs) < self.settings.max_processes:
            return self._start()
        if len(self.waiters) >= self.settings.max_queue:
            raise ScannerUnavailable(self.name, f"queue full: {len(self.waiters)} scans wait "
                                     f"for {self.settings.max_processes} busy engine processes",
                                     ERROR)

        def forget(d: Deferred[_Worker]) -> None:
            try:
                self.waiters.remove(d)
            except ValueError:
                pass

        waiter: Deferred[_Worker] = Deferred(forget)
        self.waiters.append(waiter)
        return await waiter

    def _start(self) -> _Worker:
        self.started += 1
        worker = _Worker(self, self.started)
        self._spawn(worker)  # raises ScannerUnavailable
        self.procs.add(worker)
        log.info("{scanner}: engine process {pid} started", scanner=self.name,
                 pid=worker.pid_text)
        return worker

    def _ended(self, worker: _Worker) -> None:
        """The process exited: its place is free; a waiting scan gets a
        fresh process."""
        self.procs.discard(worker)
        if worker in self.idle:
            self.idle.remove(worker)
            log.warn("{scanner}: idle engine process {pid} {how}: {stderr}", scanner=self.name,
                     pid=worker.pid_text, how=worker.exit_text, stderr=worker.stderr_tail())
        while self.waiters and len(self.procs) < self.settings.max_processes:
            waiter = self.waiters.popleft()
            if waiter.called:
                continue
            try:
                waiter.callback(self._start())
            except ScannerUnavailable as e:
                waiter.errback(e)

    def close(self) -> Deferred[None]:
        """Retire the idle processes (EOF, then a kill); busy ones retire
        after their message.  Fires when the idle ones have ended.  A scan
        after close starts a process again, retired after its message."""
        self.closed = True
        idle, self.idle = self.idle, []
        for worker in idle:
            worker.retire(self.reactor)
        done: Deferred[None] = defer.gatherResults(
            [w.ended for w in idle if not w.exited]).addCallback(lambda _: None)
        return done


def _header(message: ScanInput, size: int) -> bytes:
    """The framing's first line (ASCII JSON, so one line whatever the
    envelope holds)."""
    head = {"size": size, "queue_id": message.queue_id, "client_ip": message.client_ip,
            "helo": message.helo, "sender": message.sender,
            "recipients": list(message.recipients), "policy": message.policy}
    return json.dumps(head, ensure_ascii=True, separators=(",", ":")).encode("ascii") + b"\n"


def _view(d: Deferred[_T]) -> Deferred[_T]:
    """A Deferred with ``d``'s result whose cancel leaves ``d`` alone."""
    view: Deferred[_T] = Deferred()

    def forward(result: Any) -> Any:
        if not view.called:
            if isinstance(result, Failure):
                view.errback(result)
            else:
                view.callback(result)
        return None

    d.addBoth(forward)
    return view
