"""twistd's text log written in batches (mppproxy/logsetup.py): the same
lines as twistd's own observer, held for one reactor iteration at most,
warnings at once."""
from __future__ import annotations

import io
import os
import threading

from twisted.internet.task import Clock
from twisted.logger import LogLevel, LogPublisher, Logger, textFileLogObserver

from mppproxy.logsetup import EXIT_DRAIN_SECONDS, BatchedTextLogObserver, text_log_observer


class RunningClock(Clock):
    running = True

    def __init__(self) -> None:
        super().__init__()
        self.triggers: list = []

    def addSystemEventTrigger(self, phase, event, f, *args):  # noqa: N802 (Twisted's name)
        self.triggers.append((phase, event, f, args))


def written(batched: BatchedTextLogObserver, out: io.StringIO) -> str:
    """What the writer thread has written once it has written everything handed to it."""
    assert batched._writer is None or batched._writer.wait_idle(10)
    return out.getvalue()


def event(text: str, level: LogLevel = LogLevel.info, when: float = 1_800_000_000.25) -> dict:
    return {"log_format": text, "log_level": level, "log_namespace": "mpp.test", "log_time": when}


def test_lines_are_twistds_and_held_until_the_next_iteration():
    """Info lines are held until the next reactor iteration, then written exactly as twistd's
    own text observer writes them."""
    clock = RunningClock()
    out, ref = io.StringIO(), io.StringIO()
    batched = BatchedTextLogObserver(out, clock)
    plain = textFileLogObserver(ref)
    for i in range(3):
        e = event(f"line {i} {{x}}") | {"x": "y"}
        batched(e)
        plain(e)
    assert written(batched, out) == ""
    clock.advance(0)
    assert written(batched, out) == ref.getvalue()
    assert out.getvalue().count("\n") == 3 and "line 2 y" in out.getvalue()


def test_timestamp_follows_the_second():
    """Each line's timestamp equals twistd's, changing when the second changes even within one
    batch."""
    clock = RunningClock()
    out, ref = io.StringIO(), io.StringIO()
    batched, plain = BatchedTextLogObserver(out, clock), textFileLogObserver(ref)
    for when in (1_800_000_000.1, 1_800_000_000.9, 1_800_000_001.0, 1_800_003_600.5):
        batched(event("t", when=when))
        plain(event("t", when=when))
    clock.advance(0)
    assert written(batched, out) == ref.getvalue()
    assert len(set(line.split(" ")[0] for line in out.getvalue().splitlines())) == 3


def test_warning_writes_everything_held_at_once():
    """A warning is written at once together with the lines held before it, in order, and the
    scheduled flush then writes nothing twice."""
    clock = RunningClock()
    out = io.StringIO()
    batched = BatchedTextLogObserver(out, clock)
    batched(event("first"))
    batched(event("trouble", LogLevel.warn))
    lines = written(batched, out).splitlines()
    assert [line.rsplit("] ", 1)[1] for line in lines] == ["first", "trouble"]
    clock.advance(0)  # the scheduled flush finds nothing more
    assert written(batched, out).splitlines() == lines


def test_other_threads_and_a_stopped_reactor_write_at_once():
    """Events from another thread, and any event once the reactor has stopped, are written
    without waiting for a reactor iteration."""
    clock = RunningClock()
    out = io.StringIO()
    batched = BatchedTextLogObserver(out, clock)
    t = threading.Thread(target=batched, args=(event("from a thread"),))
    t.start()
    t.join(10)
    assert "from a thread" in written(batched, out)
    clock.running = False
    batched(event("stopped"))
    # Written before the call returns: twistd may end the process next.
    assert "stopped" in out.getvalue()


def test_a_large_backlog_is_written_without_waiting():
    """A large backlog goes to the writer before the next reactor iteration rather than piling
    up."""
    clock = RunningClock()
    out = io.StringIO()
    batched = BatchedTextLogObserver(out, clock)
    for i in range(2000):
        batched(event("x" * 100))
    # No reactor iteration has passed, yet the writer had the lines.
    assert written(batched, out).count("\n") > 500


def test_a_broken_file_drops_lines_counts_them_and_says_so_later():
    """A log file that fails (a full disk) costs its lines, not the caller; the count is written once it works again."""
    class Full(io.StringIO):
        full = True

        def write(self, s):
            if self.full:
                raise OSError(28, "No space left on device")
            return super().write(s)

    clock = RunningClock()
    out = Full()
    batched = BatchedTextLogObserver(out, clock)
    batched(event("lost", LogLevel.error))
    batched(event("held"))
    clock.advance(0)
    assert written(batched, out) == "" and batched.dropped == 2
    out.full = False
    batched(event("back", LogLevel.warn))
    text = written(batched, out)
    assert "2 log line(s) dropped" in text and text.endswith("back\n")
    assert batched.dropped == 0


def _in_thread(target, seconds: float = 5.0) -> bool:
    """Run ``target`` in a daemon thread; True if it returned within ``seconds``."""
    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    return not t.is_alive()


def test_logging_from_inside_a_write_does_not_deadlock():
    """An event logged while the observer is writing, on the same thread (a signal handler that interrupted it), completes."""
    class Reentrant(io.StringIO):
        def write(self, s):
            if "outer" in s and not self.getvalue():
                batched(event("from the signal handler", LogLevel.warn))
            return super().write(s)

    out = Reentrant()
    observers: list[BatchedTextLogObserver] = []

    def batched(e: dict) -> None:
        observers[0](e)

    def run() -> None:
        observers.append(BatchedTextLogObserver(out, RunningClock()))
        batched(event("outer", LogLevel.warn))
        assert observers[0].drain(5)

    assert _in_thread(run), "the observer deadlocked on itself"
    assert "from the signal handler" in out.getvalue()


def test_a_pipe_nobody_reads_neither_blocks_the_caller_nor_grows_without_bound():
    """With the log pipe full and unread, logging returns at once, lines past the backlog bound are dropped and counted, and reported once the reader reads."""
    r, w = os.pipe()
    os.set_blocking(w, False)
    try:
        while True:
            os.write(w, b"f" * 4096)
    except BlockingIOError:
        pass
    os.set_blocking(w, True)
    sink = open(w, "w", encoding="utf-8")
    batched = BatchedTextLogObserver(sink, RunningClock(), max_backlog=20_000)

    def log_a_lot() -> None:
        for i in range(1000):
            batched(event(f"line {i} " + "x" * 60, LogLevel.warn))

    try:
        assert _in_thread(log_a_lot), "logging blocked on the full pipe"
        assert batched.dropped > 500
        assert batched._held_bytes < 20_000 + 200
        assert batched.drain(0.2) is False  # the sink takes nothing
        got = bytearray()

        def read_until_idle() -> None:
            while not batched._writer.wait_idle(0.05):
                got.extend(os.read(r, 1 << 16))
            os.set_blocking(r, False)
            try:
                while True:
                    got.extend(os.read(r, 1 << 16))
            except BlockingIOError:
                pass

        assert _in_thread(read_until_idle, 10)
        assert b"log line(s) dropped" in got and b"line 0 " in got
    finally:
        sink.close()
        os.close(r)


def test_text_log_observer_writes_where_twistd_would(tmp_path, monkeypatch):
    """text_log_observer follows twistd's options: a --logfile path (opened without twistd's
    1 MB rotation), standard output for -n without --logfile or with "-"; None for --syslog,
    --logger, a daemon logging to "-", and no twistd options at all; held lines are drained at
    shutdown within EXIT_DRAIN_SECONDS."""
    import sys

    from mppproxy import logsetup
    monkeypatch.setattr(logsetup, "_batched", [])
    clock = RunningClock()
    path = tmp_path / "twistd.log"
    batched = text_log_observer({"logfile": str(path), "nodaemon": True}, clock)
    assert batched is not None and batched.reopens and batched.path == str(path)
    assert batched._out.rotateLength is None
    batched(event("hello admin"))
    clock.advance(0)
    assert batched._writer is not None and batched._writer.wait_idle(10)
    assert path.read_text().endswith("[mpp.test#info] hello admin\n")
    assert [t[:2] for t in clock.triggers] == [("after", "shutdown")]
    _, _, drain, args = clock.triggers[0]
    assert args == (EXIT_DRAIN_SECONDS,)
    batched(event("last"))
    assert drain(*args) is True and path.read_text().endswith("last\n")
    for options in ({"nodaemon": True}, {"logfile": "-", "nodaemon": True}):
        stdout = text_log_observer(options, RunningClock())
        assert stdout is not None and stdout._out is sys.stdout and not stdout.reopens
    for options in ({"syslog": True, "nodaemon": True}, {"logger": "x.y", "nodaemon": True},
                    {"logfile": "-", "nodaemon": False}, None):
        assert text_log_observer(options, RunningClock()) is None


def test_top_service_hands_its_observer_to_the_application():
    """The top service sets its text log observer as the application's ILogObserver component
    (what twistd's AppLogger.start uses), and sets nothing when it has none."""
    from twisted.application.service import Application
    from twisted.logger import ILogObserver

    from mppproxy.reloading import TopService
    observer = BatchedTextLogObserver(io.StringIO(), RunningClock())
    top = TopService()
    top.log_observer = observer
    app = Application("t")
    top.setServiceParent(app)
    assert app.getComponent(ILogObserver) is observer
    plain, other = TopService(), Application("u")
    plain.setServiceParent(other)
    assert other.getComponent(ILogObserver, None) is None


def test_json_lines_carry_our_fields_not_twisteds():
    """A JSON log line has time (RFC 3339 UTC), level, namespace, text and the event's own
    fields; no log_* keys, values JSON cannot carry written as their repr, a failure's
    traceback included."""
    import json

    from twisted.python.failure import Failure

    from mppproxy.logsetup import json_event_line
    line = json_event_line({**event("transaction {queue_id} from {client}"), "queue_id": "Q1",
                            "client": "192.0.2.1", "recipients": ["a@b"], "odd": object(),
                            "log_logger": object(), "log_source": None})
    assert line is not None and line.endswith("\n") and "\n" not in line[:-1]
    got = json.loads(line)
    assert got["time"] == "2027-01-15T08:00:00.250000Z"
    assert got["level"] == "info" and got["namespace"] == "mpp.test"
    assert got["text"] == "transaction Q1 from 192.0.2.1"
    assert got["queue_id"] == "Q1" and got["recipients"] == ["a@b"]
    assert got["odd"].startswith("<object object")
    assert not [k for k in got if k.startswith("log_")]
    try:
        1 / 0
    except ZeroDivisionError:
        failure = Failure()
    got = json.loads(json_event_line({**event("boom"), "log_failure": failure,
                                      "log_level": LogLevel.error}))
    assert got["level"] == "error" and "ZeroDivisionError" in got["traceback"]


def test_every_kind_of_event_reads_as_twisteds_line():
    """The fast path (str.format_map) and the fallbacks give twistd's text."""
    from twisted.python.failure import Failure

    try:
        1 / 0
    except ZeroDivisionError:
        failure = Failure()

    class Boom:
        def __str__(self):
            raise RuntimeError("no")

    events = [
        event("plain {a} and {b!r} and {c:>5} {d[k]} {e.real}") | {
            "a": "x", "b": "y", "c": 7, "d": {"k": "v"}, "e": 3},
        event("a call {f()}") | {"f": lambda: "called"},
        event("missing {nothing}"),
        event("positional {0}"),
        event("two\nlines {a}") | {"a": "x\ny"},
        event("failed {why}") | {"why": "it", "log_failure": failure},
        event("system") | {"log_system": "custom"},
        event("system") | {"log_system": Boom()},
        event(b"bytes {a}") | {"a": 1},
        event("") ,
        {"log_format": "no level", "log_time": 1_800_000_000.0},
        {"message": ("legacy",), "log_time": 1_800_000_000.0, "log_format": "{log_text}",
         "log_text": "legacy", "log_legacy": True, "log_level": LogLevel.info},
        event("flat {a}") | {"a": 1, "log_flattened": {"a!:": "1"}},
        event("no time") | {"log_time": None},
    ]
    for e in events:
        clock = RunningClock()
        out, ref = io.StringIO(), io.StringIO()
        batched = BatchedTextLogObserver(out, clock)
        batched(dict(e))
        textFileLogObserver(ref)(dict(e))
        clock.advance(0)
        assert written(batched, out) == ref.getvalue(), e


def test_our_logger_emits_twisteds_events():
    """mppproxy.logsetup.Logger: the events Twisted's Logger emits, key for
    key (namespace from the calling module, source, level, time), and an
    invalid level still reported the Twisted way."""
    from mppproxy.logsetup import Logger as OurLogger

    ours, theirs = [], []
    a = OurLogger(observer=LogPublisher(ours.append))
    b = Logger(observer=LogPublisher(theirs.append))
    assert a.namespace == b.namespace == __name__
    for log in (a, b):
        log.info("policy {action} for {rcpt}", action="DUNNO", rcpt="a@example.com")
        log.warn("warned {n}", n=1)
        log.emit("not a level", "x")
    assert len(ours) == len(theirs) == 3
    for mine, twisted_event in zip(ours, theirs):
        assert mine.keys() == twisted_event.keys()
        for key in mine:
            if key not in ("log_logger", "log_time", "log_failure", "logger"):
                assert mine[key] == twisted_event[key], key
        assert abs(mine["log_time"] - twisted_event["log_time"]) < 5
    assert ours[2]["log_level"] is LogLevel.critical  # Twisted's invalid-level report
    assert "invalid log level" in ours[2]["log_format"].lower()


def test_our_logger_as_a_class_attribute_names_the_class():
    """Our Logger as a class attribute is bound per instance like Twisted's, with the class as
    namespace and the instance as source."""
    from mppproxy.logsetup import Logger as OurLogger

    class Thing:
        log = OurLogger()

    events: list = []
    thing = Thing()
    bound = Thing.__dict__["log"].__get__(thing, Thing)
    bound.observer = LogPublisher(events.append)
    bound.info("hello")
    assert isinstance(bound, OurLogger)
    assert events[0]["log_namespace"].endswith("Thing")
    assert events[0]["log_source"] is thing
