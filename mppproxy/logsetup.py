"""Log observers: the optional JSON-lines file beside twistd's own log, and
twistd's text log written in batches; both reopened on SIGUSR1, for
logrotate (``reopen_on_usr1``).

Only Twisted's public API: the text observer reaches twistd as the
application's ``ILogObserver`` component (``text_log_observer``, set by
``reloading.TopService.setServiceParent``; twistd's ``AppLogger.start``
documents that it uses that component), written to the ``--logfile`` of
twistd's own options; the JSON log is a ``FileLogObserver`` of ours on a
file object of ours (``ReopenableFile``), with our own event format
(``json_event_line``): our fields, not Twisted's internals.
"""
from __future__ import annotations

import datetime
import io
import json
import os
import signal
import sys
import threading
import time
from collections import deque
from typing import Any, Optional

from twisted.logger import Logger as _TwistedLogger
from twisted.logger import (FileLogObserver, ILogObserver, LogEvent, LogLevel,
                            formatEvent, formatEventAsClassicLogText, formatTime,
                            globalLogPublisher, timeFormatRFC3339)
from twisted.python.compat import ioType
from twisted.python.logfile import LogFile
from zope.interface import implementer  # type: ignore[import-untyped]  # no stubs or py.typed

_started: list[Any] = []
# The JSON log's file, by path, to reopen it (``reopen_logs``).
_json_paths: dict[str, "ReopenableFile"] = {}
# The batched text observers ``text_log_observer`` made.
_batched: list["BatchedTextLogObserver"] = []
_LEVELS = frozenset(LogLevel.iterconstants())


class Logger(_TwistedLogger):
    """Twisted's ``Logger`` (same events, same observers), used by every
    module of ours.  Its ``emit`` checks the level against
    ``LogLevel.iterconstants()``, which sorts the constants again for
    every event.  Here the check is a set lookup; a level that fails it
    takes Twisted's path, which reports it.  It stays because it pays:
    ``benchmarks/logger_emit.py`` times both in one interleaved run (1.54x
    on emit, 0.77 us saved per event, about 1.3 % of a cached policy-server
    request, whose decision is logged)."""

    def emit(self, level: LogLevel, format: Optional[str] = None, **kwargs: Any) -> None:
        if level not in _LEVELS:
            super().emit(level, format, **kwargs)
            return
        kwargs.update(log_logger=self, log_level=level, log_namespace=self.namespace,
                      log_source=self.source, log_format=format, log_time=time.time())
        if "log_trace" in kwargs:
            kwargs["log_trace"].append((self, self.observer))
        # mypy reads zope interfaces' methods (ILogObserver.__call__) without self.
        self.observer(kwargs)  # type: ignore[call-arg, misc]


def start_json_log(config: Any) -> None:
    path = config.logging.json_file
    if not path or _started:
        return
    out = ReopenableFile(path)
    # One JSON object per line (no RFC 7464 record separator), so
    # `json.loads(line)` and common log shippers read it.
    # FileLogObserver only calls write() and flush() on it.
    observer = FileLogObserver(out, json_event_line)  # type: ignore[arg-type]
    # mypy does not see zope's @implementer(ILogObserver) on FileLogObserver.
    globalLogPublisher.addObserver(observer)  # type: ignore[arg-type]
    _started.append(observer)
    _json_paths[path] = out


class ReopenableFile:
    """The JSON log's file, which ``reopen`` opens again at its path (after
    logrotate renamed it).  The file it replaces is closed at the next
    reopen, not at once: a line another thread is writing at that moment
    still has a file to go to."""

    def __init__(self, path: str):
        self.path = path
        self._file = io.open(path, "a", encoding="utf-8")
        self._retired: Optional[Any] = None

    def write(self, text: str) -> None:
        self._file.write(text)

    def flush(self) -> None:
        self._file.flush()

    def reopen(self) -> None:
        """Open the path again; OSError when it cannot be (the old file
        stays in use)."""
        new = io.open(self.path, "a", encoding="utf-8")
        if self._retired is not None:
            self._retired.close()
        self._retired, self._file = self._file, new
        self._retired.flush()

    def close(self) -> None:
        for f in (self._retired, self._file):
            if f is not None:
                f.close()


# Keys of Twisted's legacy events (twisted.python.log), which are not ours.
_LEGACY_KEYS = frozenset(["message", "isError", "system", "time", "format", "why", "failure",
                          "printed"])


def json_event_line(event: LogEvent) -> Optional[str]:
    """One event as one JSON line: ``time`` (RFC 3339, UTC, microseconds),
    ``level``, ``namespace``, ``text`` (the formatted line), the event's
    own fields (the keyword arguments of the ``log.info(...)`` call) and,
    for a failure, ``traceback``; none of Twisted's ``log_*`` keys.  A value
    JSON cannot carry is written as its ``repr``."""
    level = event.get("log_level")
    when = event.get("log_time")
    out: dict[str, Any] = {
        "time": (datetime.datetime.fromtimestamp(when, datetime.timezone.utc)
                 .isoformat(timespec="microseconds").replace("+00:00", "Z")
                 if isinstance(when, (int, float)) else None),
        "level": level.name if isinstance(level, type(LogLevel.info)) else None,
        "namespace": event.get("log_namespace"),
        "text": formatEvent(event),
    }
    for key, value in event.items():
        if key.startswith("log_") or key in _LEGACY_KEYS or key in out:
            continue
        out[key] = value
    failure = event.get("log_failure")
    if failure is not None:
        try:
            out["traceback"] = failure.getTraceback()
        except Exception:
            out["traceback"] = repr(failure)
    return json.dumps(out, default=repr, ensure_ascii=False, separators=(",", ":")) + "\n"


# -- twistd's text log, written in batches ---------------------------------------

# Flush at once from this level up: a warning or error must be on disk
# before anything else can go wrong.
_FLUSH_LEVELS = frozenset([LogLevel.warn, LogLevel.error, LogLevel.critical])
# Bytes held before a write whatever the level.
_MAX_HELD = 64 * 1024
# Bytes of lines waiting for a log sink that does not take them (a pipe
# nobody reads): past this, new lines are dropped and counted, so memory
# stays flat (docs/design.md promise 6) and the service goes on.
MAX_BACKLOG = 8 * 1024 * 1024
# Seconds the writer gets, once the reactor has stopped, to write what is
# held.  A sink that takes longer loses it rather than hold up the stop.
EXIT_DRAIN_SECONDS = 2.0
_UNKNOWN = object()
# How often a wait for the writer looks again (only while the reactor is
# stopped, and in tests).
WAIT_POLL_SECONDS = 0.002


@implementer(ILogObserver)
class BatchedTextLogObserver:
    """twistd's text log, same lines, cheaper per line, and never able to
    block the reactor or a stop.

    twistd's ``textFileLogObserver`` writes and flushes every event at once
    (a system call per line) and formats its timestamp anew for each (a
    time zone lookup per line): together about a fifth of the policy
    server's CPU at full load.  This observer formats the timestamp once
    per second and hands the lines of one reactor iteration over together,
    at the start of the next (``callLater(0)``), so a busy node writes a few
    hundred times a second rather than once per line.  Warnings and errors
    are handed over at once, with everything before them; events from
    other threads too (their order then stays that of the calls).

    Writing is a thread of its own (``_LogWriter``), and the two sides share
    a ``deque``, whose ``append`` and ``popleft`` are atomic and take no
    lock.  Why (issue 15): with a lock here, a signal handler that logs
    while the reactor thread held it (Twisted's SIGTERM handler does) waited
    for itself for ever; and with the write on the reactor thread, a pipe
    whose reader paused, or a slow disk, held the whole service, its stop
    included.  Now a sink that takes nothing only fills the backlog, up to
    ``MAX_BACKLOG`` bytes; lines beyond are dropped and counted, and the
    count is written as soon as the sink takes lines again.  A write that
    fails (a full disk) drops its lines the same way."""

    def __init__(self, out_file: Any, reactor: Any, max_backlog: int = MAX_BACKLOG):
        self._out = out_file
        self._reactor = reactor
        self._binary = ioType(out_file) is not str  # type: ignore[no-untyped-call]  # Twisted's, unannotated
        self._max_backlog = max_backlog
        # Lines not yet written, oldest first (see the class docstring).
        self._held: deque[str] = deque()
        # Bytes in ``_held``; only an estimate when threads race (``+=`` is
        # not atomic), which is all a bound needs.
        self._held_bytes = 0
        # Bytes held since the last hand-over to the writer.
        self._batch_bytes = 0
        self.dropped = 0
        self._scheduled = False
        # A drain timed out: the sink takes nothing (see ``drain``).
        self._stalled = False
        self._reactor_thread = threading.get_ident()
        self._writer: Optional[_LogWriter] = None
        # Set by ``reopen``: the writer thread reopens the file before its
        # next write (it alone writes, so no write races the reopen).
        self._reopen_wanted = False
        # The descriptor the writer uses (``_raw_fd``), found on its first write.
        self._fd: Any = _UNKNOWN
        self._second = -1
        self._stamp = ""

    def _time(self, when: Optional[float]) -> str:
        if when is None:
            return "-"
        second = int(when)
        if second != self._second:
            self._stamp = formatTime(second, timeFormatRFC3339)
            self._second = second
        return self._stamp

    def _line(self, event: LogEvent) -> Optional[str]:
        """``formatEventAsClassicLogText(event)``, cheaper for the usual
        event: a text format of plain fields, which ``str.format_map`` reads
        as Twisted's formatter does (that one parses the format in Python,
        ~40 % of a log line's cost).  Anything else (``{f()}`` calls,
        tracebacks, legacy events, a format that fails) goes the Twisted way."""
        fmt = event.get("log_format")
        if type(fmt) is not str or "log_failure" in event or "log_flattened" in event:
            return formatEventAsClassicLogText(event, formatTime=self._time)
        try:
            text = fmt.format_map(event)
        except Exception:
            return formatEventAsClassicLogText(event, formatTime=self._time)
        if not text:
            return None
        system = event.get("log_system")
        if system is None:
            level = event.get("log_level")
            system = f"{event.get('log_namespace', '-')}#{'-' if level is None else level.name}"
        else:
            try:
                system = str(system)
            except Exception:
                system = "UNFORMATTABLE"
        line = f"{self._time(event.get('log_time'))} [{system}] {text}"
        return line.replace("\n", "\n\t") + "\n"

    def __call__(self, event: LogEvent) -> None:
        text = self._line(event)
        if not text:
            return
        if self._held_bytes > self._max_backlog:
            self.dropped += 1
            return
        self._held.append(text)
        self._held_bytes += len(text)
        self._batch_bytes += len(text)
        urgent = (event.get("log_level") in _FLUSH_LEVELS or self._batch_bytes > _MAX_HELD
                  or threading.get_ident() != self._reactor_thread
                  or not self._reactor.running)
        if urgent:
            self.flush()
            if not self._reactor.running and not self._stalled:
                # The reactor has stopped (twistd's last lines: "Main loop
                # terminated.", "Server Shut Down."): twistd may end the
                # process right after, so the line is written before this
                # returns, unless the sink has already failed to keep up.
                self.drain(EXIT_DRAIN_SECONDS)
        elif not self._scheduled:
            self._scheduled = True
            self._reactor.callLater(0, self.flush)

    def flush(self) -> None:
        """Hand what is held to the writer thread; returns at once."""
        self._scheduled = False
        self._batch_bytes = 0
        if self._writer is None:
            self._writer = _LogWriter(self)
        self._writer.wake()

    @property
    def reopens(self) -> bool:
        """Whether the sink is a file that can be reopened (twistd's
        ``--logfile``, a ``LogFile``), not standard output."""
        return callable(getattr(self._out, "reopen", None)) and hasattr(self._out, "path")

    @property
    def path(self) -> str:
        """The log file's path, or a description of the sink."""
        return str(getattr(self._out, "path", "standard output"))

    def reopen(self) -> None:
        """Have the writer thread reopen the log file at its path (after
        logrotate renamed it) before it writes again; returns at once."""
        self._reopen_wanted = True
        self.flush()

    def _reopen_if_wanted(self) -> None:
        """The writer's side of ``reopen``."""
        if not self._reopen_wanted:
            return
        self._reopen_wanted = False
        try:
            # twisted.python.logfile's reopen closes the file before it opens
            # the path: a path that cannot be opened would leave no file at
            # all.  Tried first, so the old file stays in use then.
            with open(self._out.path, "ab"):
                pass
            self._out.reopen()
        except (OSError, ValueError) as e:
            # The old file stays open and in use: nothing is lost.
            self._held.appendleft(
                f"{self._time(time.time())} [mppproxy.logsetup#error] cannot reopen the log "
                f"file (it stays written where it was): {e}\n")

    def drain(self, timeout: float) -> bool:
        """Hand over what is held and wait, at most ``timeout`` seconds,
        until it is written (or dropped).  True if it was.  The reactor
        calls it once it has stopped.  A sink that did not keep up is
        marked stalled and not waited for again: the exit's lines cost
        ``timeout`` once, not per line."""
        if self._stalled:
            return False
        self.flush()
        assert self._writer is not None
        done = self._writer.wait_idle(timeout)
        self._stalled = not done
        return done

    def _take(self) -> str:
        """The writer's side: every held line, oldest first, as one text."""
        held = self._held
        lines = []
        try:
            while True:
                lines.append(held.popleft())
        except IndexError:
            pass
        text = "".join(lines)
        self._held_bytes = max(0, self._held_bytes - len(text))
        return text

    def _write(self, text: str) -> None:
        """The writer's side: write ``text`` (and, first, how many lines were
        dropped since the last write that worked)."""
        if self.dropped:
            dropped = self.dropped
            text = (f"{self._time(time.time())} [mppproxy.logsetup#warn] {dropped} log "
                    f"line(s) dropped: the log output did not take them\n{text}")
        else:
            dropped = 0
        try:
            data = text.encode("utf-8") if self._binary else text
            if self._fd is _UNKNOWN:
                self._fd = _raw_fd(self._out)
            fd = self._fd
            if fd is None:
                self._out.write(data)
                self._out.flush()
            else:
                _write_all(fd, data.encode("utf-8") if isinstance(data, str) else data)
            self.dropped -= dropped
        except (OSError, ValueError):
            # A full disk or a closed file: nothing better to do with a log
            # line than drop it and say so later; the service carries on.
            self.dropped += text.count("\n") - (1 if dropped else 0)


def _raw_fd(out: Any) -> Optional[int]:
    """The descriptor under a plain Python file (twistd's stdout), written
    with ``os.write`` so that a writer blocked on a stalled pipe holds no
    lock of the ``io`` object: the interpreter would abort at exit waiting
    for it.  None for anything else (twistd's rotating ``LogFile``: its own
    ``write`` rotates), which is written through its methods."""
    if not isinstance(out, (io.TextIOBase, io.BufferedIOBase, io.RawIOBase)):
        return None
    try:
        fd = out.fileno()
        out.flush()  # whatever the io object still buffers goes first
    except (OSError, ValueError, AttributeError):
        return None
    return fd


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class _LogWriter:
    """The thread that writes a ``BatchedTextLogObserver``'s lines.

    Woken through a pipe of its own, whose write end does not block: a
    wake-up is one ``os.write``, safe from any thread and from a signal
    handler, with no lock.  A daemon thread: one blocked for ever on a
    stalled log pipe does not keep the process alive."""

    def __init__(self, observer: BatchedTextLogObserver):
        self._observer = observer
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._writing = False
        self._thread = threading.Thread(target=self._run, name="mppproxy log writer",
                                        daemon=True)
        self._thread.start()

    def wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already: the thread will run

    def _run(self) -> None:
        observer = self._observer
        while True:
            os.read(self._wake_r, 4096)
            while True:
                self._writing = True
                observer._reopen_if_wanted()
                text = observer._take()
                if not text:
                    self._writing = False
                    break
                observer._write(text)
                self._writing = False

    def wait_idle(self, timeout: float) -> bool:
        """Wait until everything handed over is written, at most
        ``timeout`` seconds; True if it was.  It polls, briefly, rather than
        wait on a ``threading.Event``, so that it too takes no lock."""
        deadline = time.monotonic() + timeout
        self.wake()
        while self._observer._held or self._writing:
            if time.monotonic() >= deadline:
                return False
            time.sleep(WAIT_POLL_SECONDS)
        return True


def text_log_observer(twistd_options: Any, reactor: Any) -> Optional[BatchedTextLogObserver]:
    """The batched observer for twistd's text log, writing where twistd's own
    would (``--logfile``: ``-`` or none with ``-n`` is standard output,
    none without ``-n`` is ``twistd.log``), or None to leave twistd its own
    (``--syslog``, ``--logger``, a daemon told to log to ``-``, which twistd
    refuses itself, or no twistd options: tests).  The caller makes it the
    application's ``ILogObserver`` component (``reloading.TopService``).
    twistd's ``LogFile`` would rename itself to .1, .2 ... every 1 MB with
    no end to their number: rotation is logrotate's job here (SIGUSR1
    reopens: ``reopen_on_usr1``), so the file is opened without it."""
    if twistd_options is None:
        return None
    get = getattr(twistd_options, "get", None)
    if get is None or get("syslog") or get("logger"):
        return None
    path = get("logfile")
    nodaemon = bool(get("nodaemon"))
    out: Any
    if path == "-":
        if not nodaemon:
            return None
        out = sys.stdout
    elif not path and nodaemon:
        out = sys.stdout
    else:
        out = LogFile.fromFullPath(  # type: ignore[no-untyped-call]  # Twisted's, unannotated
            path or "twistd.log", rotateLength=None)
    batched = BatchedTextLogObserver(out, reactor)
    _batched.append(batched)
    # Whatever is held when the reactor stops is written then, if the log
    # sink takes it soon enough (EXIT_DRAIN_SECONDS).
    reactor.addSystemEventTrigger("after", "shutdown", batched.drain, EXIT_DRAIN_SECONDS)
    return batched


# -- reopening for logrotate --------------------------------------------------------

_log = Logger()


def reopen_logs() -> list[str]:
    """Reopen the log files at their paths (after logrotate renamed them):
    twistd's ``--logfile`` (by its writer thread, before its next line) and
    the JSON log.  On the reactor thread; the paths reopened."""
    reopened = []
    for batched in _batched:
        if batched.reopens:
            batched.reopen()
            reopened.append(str(batched.path))
    for path, out in _json_paths.items():
        try:
            out.reopen()
        except OSError as e:
            _log.error("cannot reopen the JSON log {path} (it stays written where it was): "
                       "{error}", path=path, error=e.strerror or str(e))
            continue
        reopened.append(path)
    return reopened


def reopen_on_usr1(reactor: Any) -> bool:
    """Make SIGUSR1 reopen the log files (``reopen_logs``), in place of
    twistd's handler, which renames its file to ``.1`` itself and does
    nothing once logrotate has moved it.  The handler only schedules the
    work on the reactor thread (reloading.py says why).  Called once the
    reactor runs, after ``batch_text_log``; True when there is a file to
    reopen (standard output alone: the handler is left as it is)."""
    if not any(b.reopens for b in _batched) and not _json_paths:
        return False

    def reopen_now() -> None:
        paths = reopen_logs()
        _log.info("SIGUSR1: reopened {paths}", paths=", ".join(paths) or "no log file")

    signal.signal(signal.SIGUSR1, lambda *_: reactor.callFromThread(reopen_now))
    return True

