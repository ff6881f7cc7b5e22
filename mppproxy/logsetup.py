"""Log observers: the optional JSON-lines file beside twistd's own log, and
twistd's text log written in batches."""
from __future__ import annotations

import io
import threading
import time
from typing import Any, Optional

from twisted.logger import Logger as _TwistedLogger
from twisted.logger import (FileLogObserver, ILogObserver, LogLevel, formatEventAsClassicLogText,
                            formatTime, globalLogPublisher, jsonFileLogObserver,
                            timeFormatRFC3339)
from twisted.python.compat import ioType
from zope.interface import implementer

_started: list[Any] = []
_LEVELS = frozenset(LogLevel.iterconstants())


class Logger(_TwistedLogger):
    """Twisted's ``Logger`` (same events, same observers), used by every
    module of ours.  Its ``emit`` checks the level against
    ``LogLevel.iterconstants()``, which sorts the constants again for
    every event: 2-3 % of a policy-server request, whose decision is
    logged.  Here the check is a set lookup; a level that fails it takes
    Twisted's path, which reports it."""

    def emit(self, level: LogLevel, format: Optional[str] = None, **kwargs: Any) -> None:
        if level not in _LEVELS:
            super().emit(level, format, **kwargs)
            return
        kwargs.update(log_logger=self, log_level=level, log_namespace=self.namespace,
                      log_source=self.source, log_format=format, log_time=time.time())
        if "log_trace" in kwargs:
            kwargs["log_trace"].append((self, self.observer))
        self.observer(kwargs)


def start_json_log(config: Any) -> None:
    path = config.logging.json_file
    if not path or _started:
        return
    f = io.open(path, "a", encoding="utf-8")
    # One JSON object per line, without Twisted's default RFC 7464 record
    # separator, so `json.loads(line)` and common log shippers read it.
    observer = jsonFileLogObserver(f, recordSeparator="")
    globalLogPublisher.addObserver(observer)
    _started.append(observer)


# -- twistd's text log, written in batches ---------------------------------------

# Flush at once from this level up: a warning or error must be on disk
# before anything else can go wrong.
_FLUSH_LEVELS = frozenset([LogLevel.warn, LogLevel.error, LogLevel.critical])
# Bytes held before a write whatever the level.
_MAX_HELD = 64 * 1024


@implementer(ILogObserver)
class BatchedTextLogObserver:
    """twistd's text log, same lines, cheaper per line.

    twistd's ``textFileLogObserver`` writes and flushes every event at once
    (a system call per line) and formats its timestamp anew for each (a
    time zone lookup per line): together about a fifth of the policy
    server's CPU at full load.  This observer formats the timestamp once
    per second and writes the lines of one reactor iteration together, at
    the start of the next (``callLater(0)``), so a busy node writes a few
    hundred times a second rather than once per line.  Warnings and errors
    are written at once, with everything before them; events from other
    threads too (their order then stays that of the calls)."""

    def __init__(self, out_file: Any, reactor: Any):
        self._out = out_file
        self._reactor = reactor
        self._binary = ioType(out_file) is not str
        self._held: list[str] = []
        self._held_bytes = 0
        self._scheduled = False
        self._lock = threading.Lock()
        self._reactor_thread = threading.get_ident()
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

    def _line(self, event: dict) -> Optional[str]:
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

    def __call__(self, event: dict) -> None:
        text = self._line(event)
        if not text:
            return
        with self._lock:
            self._held.append(text)
            self._held_bytes += len(text)
            urgent = (event.get("log_level") in _FLUSH_LEVELS or self._held_bytes > _MAX_HELD
                      or threading.get_ident() != self._reactor_thread
                      or not self._reactor.running)
            if urgent:
                self._write_held()
                return
            if not self._scheduled:
                self._scheduled = True
                self._reactor.callLater(0, self.flush)

    def flush(self) -> None:
        with self._lock:
            self._scheduled = False
            self._write_held()

    def _write_held(self) -> None:
        # Called with the lock held.
        if not self._held:
            return
        text = "".join(self._held)
        self._held.clear()
        self._held_bytes = 0
        try:
            self._out.write(text.encode("utf-8") if self._binary else text)
            self._out.flush()
        except (OSError, ValueError):
            # A full disk or a closed file: nothing better to do with a log
            # line than drop it; the service carries on.
            pass


def batch_text_log(reactor: Any, publisher: Any = globalLogPublisher) -> bool:
    """Put a ``BatchedTextLogObserver`` in place of twistd's text log
    observer (``--logfile``, or stdout with ``-n``), writing to the same
    file.  Anything else (``--syslog``, ``--logger``, the JSON log) is left
    alone.  Called once the reactor runs, when twistd's logging has begun.
    True when an observer was replaced."""
    observers = getattr(publisher, "_observers", None)
    if not isinstance(observers, list):
        return False
    for i, observer in enumerate(observers):
        formatter = getattr(observer, "formatEvent", None)
        if (isinstance(observer, FileLogObserver) and observer not in _started
                and getattr(formatter, "__qualname__", "") == _TWISTD_FORMATTER):
            batched = BatchedTextLogObserver(observer._outFile, reactor)
            observers[i] = batched
            # Whatever is held when the reactor stops is written then.
            reactor.addSystemEventTrigger("after", "shutdown", batched.flush)
            return True
    return False


# The formatter twistd's observer uses (twisted.logger.textFileLogObserver).
_TWISTD_FORMATTER = "textFileLogObserver.<locals>.formatEvent"
