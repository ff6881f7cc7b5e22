"""Any command-line scanner: a program that takes a file and answers by exit
code and output.

Stage: post-DATA scanning.  Hands the scan engine a ``CheckResult``:
clean, a hard ``HardAction.REJECT`` for a virus (template ``virus`` unless
configured) whose reason names what the program found, or -- for spam
engines (issue 14) -- a spam verdict and a score that joins the combined
score, read from the exit code, a pattern or a JSON line
(``command_answer.py``).  A program that cannot answer (not found, killed,
an exit code that means nothing configured, garbage, the timeout) raises
``ScannerUnavailable``.  With ``persistent`` the engine is a pool of
long-running processes fed on stdin (``command_pool.py``) instead of one
program per message.

The programs run through a bounded pool: at most ``max_processes`` at once
(a ``DeferredSemaphore``; a process's slot is freed only when it has ended,
killed or not), so a slow tool makes scans wait, inside their timeout, but
cannot fill the machine with processes or starve the proxy.  Each program
runs in its own process group (``setsid``), so the timeout kills the
program *and* whatever it started.  The message goes to the program as a
file: the spool file when the message was spooled to disk, otherwise a
temporary file (mode 0600) written in the reactor's thread pool and
removed when the program has ended.  No shell is involved: ``command`` is
an argv, and ``{file}`` in an argument becomes the file's path.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import tempfile
from typing import Any, Optional, TypeVar

from twisted.internet import defer, threads
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from mppproxy._async import as_deferred
from mppproxy.logsetup import Logger
from mppproxy.results import CheckResult
from mppproxy.scan.base import DOWN, GARBAGE, TIMEOUT, ScanInput, Scanner, ScannerUnavailable
from mppproxy.config.scanners import CommandScannerConfig
from mppproxy.scan.scanners.command_answer import (BadAnswer, EngineAnswer, from_exit,
                                                   from_json_line, from_json_output,
                                                   from_pattern, to_result)
from mppproxy.scan.scanners.command_pool import ProcessPool

log = Logger()

_T = TypeVar("_T")

# Output kept for the pattern and the log; a chatty tool's rest is dropped.
MAX_OUTPUT = 64 * 1024
# When no setsid(1) is installed: start a new session, then exec the program.
_SETSID_SHIM = "import os, sys; os.setsid(); os.execvp(sys.argv[1], sys.argv[1:])"


class _Run(ProcessProtocol):
    """One program run: ``ended`` fires with (exit code, signal) once the
    process has exited and its pipes are closed; it is never cancelled, so
    the pool slot and the temporary file outlive a timeout until then."""

    transport: Any

    def __init__(self) -> None:
        self.output = bytearray()
        self.ended: Deferred[tuple[Optional[int], Optional[int]]] = Deferred()
        self.killed = False

    def connectionMade(self) -> None:
        self.transport.closeStdin()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        room = MAX_OUTPUT - len(self.output)
        if room > 0:
            self.output += data[:room]

    def processEnded(self, reason: Failure) -> None:
        value = reason.value
        if isinstance(value, (ProcessDone, ProcessTerminated)):
            self.ended.callback((value.exitCode, value.signal))
        else:  # pragma: no cover - Twisted passes only these two
            self.ended.callback((None, None))

    def kill_group(self) -> None:
        """SIGKILL the program's process group (it leads its own)."""
        pid = getattr(self.transport, "pid", None)
        if pid is None:
            return
        self.killed = True
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        except PermissionError as e:  # pragma: no cover - our own child
            log.warn("cannot kill scanner process group {pid}: {error}", pid=pid, error=str(e))


def _write_temp(directory: Optional[str], message: ScanInput) -> str:
    fd, path = tempfile.mkstemp(prefix="mpp-scan-", suffix=".eml", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in message.iter_chunks():
                f.write(chunk)
    except BaseException:
        os.unlink(path)
        raise
    return path


class CommandScanner(Scanner):
    """Runs ``settings.command`` on each message (``CommandScannerConfig``).

    ``name`` is ``settings.name``, so several command scanners can run side
    by side.  ``running`` counts the programs alive right now.
    """

    name = "command"
    external = True

    def __init__(self, settings: CommandScannerConfig, reactor: Any):
        super().__init__(settings, reactor)
        self.name = settings.name  # one class, many named scanners
        self._running = 0
        self._slots = defer.DeferredSemaphore(settings.max_processes)
        self._pattern = re.compile(settings.infected_pattern, re.M) if settings.infected_pattern else None
        self._output_pattern = (re.compile(settings.output_pattern, re.M)
                                if settings.output_pattern else None)
        self._setsid: Optional[list[str]] = None
        # Persistent engines: processes that read message after message.
        self.pool = (ProcessPool(settings, reactor, self._spawn_worker)
                     if settings.persistent else None)

    @property
    def running(self) -> int:
        """The programs (or persistent processes) alive right now."""
        return self.pool.running if self.pool is not None else self._running

    async def scan(self, message: ScanInput) -> CheckResult:
        settings = self.settings
        too_big = self.over_max_size(message)
        if too_big is not None:
            return too_big
        d = as_deferred(self._scan(message) if self.pool is None else self._ask(message))
        d.addTimeout(settings.timeout, self.reactor)
        try:
            return await d
        except defer.TimeoutError:
            raise ScannerUnavailable(self.name, f"timeout after {settings.timeout:g}s "
                                     f"({settings.command[0]} killed)", TIMEOUT) from None

    async def _scan(self, message: ScanInput) -> CheckResult:
        await self._slots.acquire()
        run: Optional[_Run] = None
        temp: Optional[str] = None
        try:
            path = message.path
            if path is None:
                temp = path = await self._write(message)
            run = self._spawn(path)
            code, sig = await _view(run.ended)
        finally:
            self._after(run, temp)
        return self._verdict(code, sig, bytes(run.output))

    async def _ask(self, message: ScanInput) -> CheckResult:
        """One message to a persistent engine (command_pool.py)."""
        assert self.pool is not None
        if message.path is not None:
            # A spooled message is read off the reactor thread.
            data = await _view(threads.deferToThreadPool(
                self.reactor, self.reactor.getThreadPool(), message.as_bytes))
        else:
            data = message.as_bytes()

        def parse(line: bytes) -> EngineAnswer:
            return from_json_line(line.decode("utf-8", "replace"))

        answer = await self.pool.scan(message, data, parse)
        return to_result(self.settings, self.name, answer)

    def close(self) -> Optional[Deferred[None]]:
        """At a stop or reload (scan/runtime.py): retire the persistent
        processes (idle ones now, busy ones after their message)."""
        return self.pool.close() if self.pool is not None else None

    def _spawn_worker(self, protocol: ProcessProtocol) -> None:
        argv = self._argv("")
        try:
            self.reactor.spawnProcess(protocol, argv[0], argv, env=dict(os.environ),
                                      childFDs={0: "w", 1: "r", 2: "r"})
        except OSError as e:
            raise ScannerUnavailable(self.name, f"cannot start {self.settings.command[0]}: "
                                     f"{e}", DOWN) from None

    async def _write(self, message: ScanInput) -> str:
        """The message in a temporary file, written off the reactor thread.
        A timeout during the write leaves the thread to finish; the file
        is removed when it has."""
        writing = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                            _write_temp, self.settings.temp_dir or None, message)
        try:
            return await _view(writing)
        except defer.CancelledError:
            writing.addCallback(_remove_quietly)
            raise
        except OSError as e:
            raise ScannerUnavailable(self.name, f"cannot write the message to a temporary "
                                     f"file: {e}") from None
        finally:
            writing.addErrback(lambda _: None)  # reported through the view

    def _after(self, run: Optional[_Run], temp: Optional[str]) -> None:
        """Free the slot and the temporary file when the program has ended
        (now, or after the kill that a timeout sends)."""

        def cleanup(result: Any) -> Any:
            self._slots.release()
            if temp is not None:
                try:
                    os.unlink(temp)
                except OSError as e:
                    log.warn("{scanner}: cannot remove {path}: {error}",
                             scanner=self.name, path=temp, error=str(e))
            return result

        if run is None or run.ended.called:
            if run is not None:
                self._running -= 1
            cleanup(None)
            return
        run.kill_group()

        def ended(result: Any) -> Any:
            self._running -= 1
            return cleanup(result)

        run.ended.addBoth(ended)

    def _argv(self, path: str) -> list[str]:
        argv = [arg.format(file=path) for arg in self.settings.command]
        program = argv[0] if os.sep in argv[0] else shutil.which(argv[0])
        if program is None:
            raise ScannerUnavailable(self.name, f"program {argv[0]!r} not found on PATH",
                                     DOWN)
        argv[0] = program
        if self._setsid is None:
            setsid = shutil.which("setsid")
            # setsid(1) execs in place when it is not a group leader, which a
            # freshly forked child never is; the pid stays the group's id.
            self._setsid = [setsid] if setsid else [sys.executable, "-c", _SETSID_SHIM]
        return self._setsid + argv

    def _spawn(self, path: str) -> _Run:
        argv = self._argv(path)
        run = _Run()
        try:
            self.reactor.spawnProcess(run, argv[0], argv, env=dict(os.environ),
                                      childFDs={0: "w", 1: "r", 2: "r"})
        except OSError as e:
            raise ScannerUnavailable(self.name, f"cannot start {self.settings.command[0]}: "
                                     f"{e}", DOWN) from None
        self._running += 1
        return run

    def _verdict(self, code: Optional[int], sig: Optional[int], output: bytes) -> CheckResult:
        """The result of a program that ended with ``code`` (or ``sig``)
        and printed ``output``, read as ``settings.output`` says."""
        settings = self.settings
        text = output.decode("utf-8", "replace")
        command = settings.command[0]
        found = self._pattern.search(text) if self._pattern is not None else None
        if found is None and sig is not None:
            raise ScannerUnavailable(self.name, f"{command} killed by signal {sig}: "
                                     f"{_tail(text)}")
        if found is not None or code in settings.infected_exit_codes:
            answer = from_exit(settings, code, text, found)
            assert answer is not None
            return to_result(settings, self.name, answer, f"exit {code}")
        try:
            if settings.output == "pattern" and self._output_pattern is not None:
                return to_result(settings, self.name, from_pattern(self._output_pattern, text))
            if settings.output == "json":
                return to_result(settings, self.name, from_json_output(text))
        except BadAnswer as e:
            raise ScannerUnavailable(self.name, f"{command} (exit {code}): bad answer: {e}",
                                     GARBAGE) from None
        answer = from_exit(settings, code, text, None)
        if answer is None:
            raise ScannerUnavailable(self.name, f"{command} exited {code}: {_tail(text)}")
        return to_result(settings, self.name, answer, f"exit {code}")


def _view(d: Deferred[_T]) -> Deferred[_T]:
    """A Deferred with ``d``'s result that can be cancelled (by the
    timeout) without cancelling ``d``: the process or the thread goes on
    until it ends, and ``d``'s own callbacks clean up after it."""
    view: Deferred[_T] = Deferred()

    def forward(result: Any) -> Any:
        if not view.called:
            if isinstance(result, Failure):
                view.errback(result)
            else:
                view.callback(result)
        return result

    d.addBoth(forward)
    return view


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _tail(text: str, limit: int = 200) -> str:
    flat = " ".join(text.split())
    return flat[-limit:] if flat else "(no output)"
